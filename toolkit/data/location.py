"""Where shards live, and which of those places may be read from a file.

A shard location is a local folder, a URL (``https://host/shards``) or a template whose
``{}`` is each file's name (``pipe:aws s3 cp s3://bucket/shards/{} -``). URLs and templates
are opened by WebDataset's ``gopen``, which reads the scheme of whatever it is given:
``pipe:`` runs a shell command, ``http:`` starts curl. So a location may come from the
user's own command line in any form, but one read from a file (a model file, a config file,
a run's config.yaml, a sweep file) is used only when it is a plain local path.
:func:`shard_url` says where each file of a shard folder is, in any of the three forms.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

from toolkit.errors import DataError


def is_local_location(location) -> bool:
    """True for a plain local path: no URL scheme, no ``pipe:`` command, no ``{}`` template."""
    return isinstance(location, str) and bool(location.strip()) and "{}" not in location and not urlparse(location).scheme


def from_file_message(location, source) -> str:
    """The one line refusing a non-local ``location`` read from ``source``."""
    return (
        f"{source} gives the shard location {str(location)[:120]!r}, which is not a local folder: "
        "URLs and pipe: commands are taken only from your command line (shards=...), never from a file"
    )


def is_remote(folder: str | Path) -> bool:
    """Shards elsewhere: a URL (``http://host/shards``) or a template with ``{}`` for the
    file name (``pipe:aws s3 cp s3://bucket/shards/{} -``), read through WebDataset's gopen."""
    s = str(folder)
    return "{}" in s or "://" in s


PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def shard_url(folder: str | Path, name: str) -> str:
    """Where file ``name`` of a shard folder lives: local path, URL or filled-in template.

    ``name`` must be a plain file name (letters, digits, ``_.-``, not starting with ``.`` or
    ``-``): gopen runs a ``pipe:`` template in a shell, so a name is data that must not be
    able to end the command, start an option or leave the folder. Such a name needs no shell
    quoting (``shlex.quote`` of such a name is the name itself, so a ``{}`` the user quoted in
    the template stays valid); it is quoted anyway for a ``pipe:`` template, as a second guard.
    A local path is made absolute: gopen reads a scheme from any ``word:`` prefix, so a
    relative folder called ``pipe:x`` or ``data:2024`` must never reach it as such.
    """
    if not PLAIN_FILE_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise DataError(f"refusing to use {shown} as a shard file name: not a plain file name")
    s = str(folder)
    if "{}" in s:
        return s.replace("{}", shlex.quote(name) if s.startswith("pipe:") else name)
    if "://" in s:
        return s.rstrip("/") + "/" + name
    return os.path.join(os.path.abspath(s), name)
