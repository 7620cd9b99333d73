"""Shards read through URLs / `pipe:` templates (object stores on multi-node setups)."""
from __future__ import annotations

import pytest

from conftest import craft_shards
from toolkit.data.folder import DataError
from toolkit.data.shards import read_info
from toolkit.data.stream import ShardStream, make_loader


def test_pipe_template_streams_the_same_samples_as_the_folder(tmp_path):
    shards = tmp_path / "shards"
    craft_shards(shards, {"train": [10, 6], "val": [7, 5]}, num_classes=3)
    remote = f"pipe:cat {shards}/{{}}"  # e.g. "pipe:aws s3 cp s3://bucket/shards/{} -"
    assert read_info(remote)["classes"] == read_info(shards)["classes"]
    got = {k for keys, _, _ in make_loader(ShardStream(remote, split="val", mode="eval", batch_size=4), num_workers=0) for k in keys}
    want = {k for keys, _, _ in make_loader(ShardStream(shards, split="val", mode="eval", batch_size=4), num_workers=0) for k in keys}
    assert got == want and len(got) == 12


def test_unreachable_remote_info_is_one_line(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_info(f"pipe:cat {tmp_path}/missing/{{}}")
