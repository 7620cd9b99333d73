"""Where shards live, and which of those places may be read from a file.

A shard location is a local folder, a URL (``https://host/shards``) or a template whose
``{}`` is each file's name (``pipe:aws s3 cp s3://bucket/shards/{} -``). URLs and templates
are opened by WebDataset's ``gopen``, which reads the scheme of whatever it is given:
``pipe:`` runs a shell command, ``http:`` starts curl. So a location may come from the
user's own command line in any form, but one read from a file (a model file, a config file,
a run's config.yaml, a sweep file) is used only when it is a plain local path.
"""
from __future__ import annotations

from urllib.parse import urlparse


def is_local_location(location) -> bool:
    """True for a plain local path: no URL scheme, no ``pipe:`` command, no ``{}`` template."""
    return isinstance(location, str) and bool(location.strip()) and "{}" not in location and not urlparse(location).scheme


def from_file_message(location, source) -> str:
    """The one line refusing a non-local ``location`` read from ``source``."""
    return (
        f"{source} gives the shard location {str(location)[:120]!r}, which is not a local folder: "
        "URLs and pipe: commands are taken only from your command line (shards=...), never from a file"
    )
