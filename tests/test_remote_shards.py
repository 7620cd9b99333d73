"""Shards read through URLs / `pipe:` templates (object stores on multi-node setups)."""
from __future__ import annotations

import pytest

from conftest import craft_shards
from toolkit.errors import DataError
from toolkit.data.shards import read_info
from toolkit.data.stream import ShardStream, make_loader


def test_pipe_template_streams_the_same_samples_as_the_folder(tmp_path):
    shards = tmp_path / "shards"
    craft_shards(shards, {"train": [10, 6], "val": [7, 5]}, num_classes=3)
    remote = f"pipe:cat {shards}/{{}}"  # e.g. "pipe:aws s3 cp s3://bucket/shards/{} -"
    assert read_info(remote).classes == read_info(shards).classes
    got = {k for keys, _, _ in make_loader(ShardStream(remote, split="val", mode="eval", batch_size=4), num_workers=0) for k in keys}
    want = {k for keys, _, _ in make_loader(ShardStream(shards, split="val", mode="eval", batch_size=4), num_workers=0) for k in keys}
    assert got == want and len(got) == 12


def test_unreachable_remote_info_is_one_line(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_info(f"pipe:cat {tmp_path}/missing/{{}}")


def test_shard_names_in_a_remote_info_never_reach_the_shell(tmp_path):
    import json

    shards = tmp_path / "shards"
    craft_shards(shards, {"train": [4], "val": [3]}, num_classes=2)
    marker = tmp_path / "PWNED"
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["train"]["filenames"] = [f"x; touch {marker}; .tar"]
    (shards / "_info.json").write_text(json.dumps(info))
    remote = f"pipe:cat {shards}/{{}}"
    with pytest.raises(DataError, match=r"bad splits\.train\.filenames\[0\] = 'x; touch"):
        read_info(remote)
    with pytest.raises(DataError, match="filenames"):
        for _ in make_loader(ShardStream(remote, split="train", mode="eval", batch_size=2), num_workers=0):
            pass
    assert not marker.exists(), "a shard name from _info.json ran as a shell command"


@pytest.mark.parametrize("name", ["a b.tar", "x;id.tar", "$(id).tar", "`id`.tar", "../up.tar", "sub/train-000000.tar", "'q'.tar", "-rf.tar", ""])
def test_shard_url_only_fills_in_plain_file_names(name):
    from toolkit.data.location import shard_url

    for folder in ("pipe:aws s3 cp s3://bucket/shards/{} -", "https://host/shards", "/data/shards"):
        with pytest.raises(DataError, match="not a plain file name"):
            shard_url(folder, name)
    assert shard_url("pipe:cat '/d/{}'", "train-000001.tar") == "pipe:cat '/d/train-000001.tar'"
    assert shard_url("https://host/shards/", "_info.json") == "https://host/shards/_info.json"
