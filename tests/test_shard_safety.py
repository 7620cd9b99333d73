"""Safety of ``write_shards``: what --overwrite may delete, bad images in decoder processes,
problems reported at shard time, argument ranges, untrusted ``_info.json`` content."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import craft_shards, make_image_folder, write_shards_quietly
from toolkit.errors import DataError
from toolkit.data.shards import (
    _encode_one,
    ShardInfo,
    check_trainable,
    read_info,
    shard_report_lines,
    verify_shards,
    write_shards,
)


_write = write_shards_quietly


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- 1. overwrite


@pytest.mark.parametrize("where", ["the source", "above the source", "inside the source", "a link to the source"])
def test_output_overlapping_the_source_is_refused_and_no_image_is_touched(tmp_path, where):
    src = make_image_folder(tmp_path / "data" / "images", {"a": 3, "b": 3}, size=(4, 4))
    before = _snapshot(tmp_path / "data")
    out = {
        "the source": src,
        "above the source": tmp_path / "data",
        "inside the source": src / "a" / "shards",
        "a link to the source": tmp_path / "link",
    }[where]
    if where == "a link to the source":
        os.symlink(src, out)
    with pytest.raises(DataError, match="image folder") as e:
        _write(src, out, overwrite=True)
    _one_line(e)
    assert _snapshot(tmp_path / "data") == before, "source images deleted or changed"
    assert not (src / "a" / "shards").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data"] + (["link"] if where.startswith("a link") else []))


@pytest.mark.parametrize("what", ["a file", "a folder of user files", "a folder with a foreign _info.json", "a link to shards"])
def test_overwrite_refuses_anything_that_is_not_a_shard_folder(tmp_path, what):
    src = make_image_folder(tmp_path / "images", {"a": 3, "b": 3}, size=(4, 4))
    out = tmp_path / "out"
    if what == "a file":
        out.write_text("precious")
    elif what == "a link to shards":
        _write(src, tmp_path / "real_shards")
        os.symlink(tmp_path / "real_shards", out)
    else:
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
        if what == "a folder with a foreign _info.json":
            (out / "_info.json").write_text(json.dumps({"splits": {}}))  # no format_version
    before = {p.name for p in tmp_path.iterdir()}
    kept = _snapshot(tmp_path)

    with pytest.raises(DataError, match="refusing to replace") as e:
        _write(src, out, overwrite=True)
    _one_line(e)
    assert _snapshot(tmp_path) == kept
    assert {p.name for p in tmp_path.iterdir()} == before, "something left beside the output"


def test_an_empty_folder_or_a_shard_folder_may_be_replaced_only_with_overwrite(tmp_path):
    src = make_image_folder(tmp_path / "images", {"a": 3, "b": 3}, size=(4, 4))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="already exists: pass --overwrite"):
        _write(src, out)
    _write(src, out, overwrite=True)
    first = read_info(out)
    _write(src, out, overwrite=True, seed=1)
    assert read_info(out).seed == 1 and first.seed == 0
    assert verify_shards(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]


@pytest.mark.parametrize("content", ["empty", "with a file"])
def test_folder_appearing_at_the_output_while_sharding_is_never_replaced(tmp_path, monkeypatch, content):
    import toolkit.data.shards as shards_mod

    src = make_image_folder(tmp_path / "images", {"a": 3, "b": 3}, size=(4, 4))
    out = tmp_path / "out"
    write_split = shards_mod._write_split_shards

    def someone_else_creates_out(*args, **kwargs):
        out.mkdir()
        if content == "with a file":
            (out / "theirs.txt").write_text("theirs")
        return write_split(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "_write_split_shards", someone_else_creates_out)
    with pytest.raises(DataError, match="appeared while the shards were being written") as e:
        _write(src, out)
    _one_line(e)
    assert sorted(p.name for p in out.iterdir()) == ([] if content == "empty" else ["theirs.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"], "temporary folder left behind"


def test_overwrite_checks_the_output_again_right_before_replacing_it(tmp_path, monkeypatch):
    import shutil

    import toolkit.data.shards as shards_mod

    src = make_image_folder(tmp_path / "images", {"a": 3, "b": 3}, size=(4, 4))
    out = tmp_path / "out"
    _write(src, out)
    write_split = shards_mod._write_split_shards

    def someone_else_replaces_out(*args, **kwargs):
        shutil.rmtree(out)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return write_split(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "_write_split_shards", someone_else_replaces_out)
    with pytest.raises(DataError, match="is not a shard folder.*refusing to replace it"):
        _write(src, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]


# ----------------------------------------------------------------------------- 3. problems


def _unreadable(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"broken_{i}.png").write_text("not a png")


def test_classes_and_splits_unfit_for_training_are_reported_when_sharding(tmp_path):
    src = make_image_folder(tmp_path / "images", {"a": 8, "b": 8, "solo": 1}, size=(4, 4))
    _unreadable(src / "broken", 3)  # 3 images: round(0.15 * 3) = 0 go to val, all unreadable
    (src / "todo").mkdir()
    (src / "todo" / "README.txt").write_text("no images yet")
    out = tmp_path / "shards"
    with pytest.warns(UserWarning) as record:
        info = write_shards(src, out, workers=1, progress=False)
    notes = info.warnings
    assert [str(w.message) for w in record if str(w.message) in notes] == notes
    assert json.loads((out / "_info.json").read_text())["warnings"] == notes
    assert len(notes) == 3, notes
    assert notes[0] == "1 class folder(s) without images are not classes: todo"
    assert "without any training image" in notes[1] and notes[1].endswith(": broken")
    assert "without a validation image" in notes[2] and notes[2].endswith(": solo")
    lines = shard_report_lines(info, out)
    assert [line for line in lines if line.startswith("warning: ")] == [f"warning: {n}" for n in notes]

    with pytest.raises(DataError, match=r"1 class\(es\) without training images: broken$") as e:
        check_trainable(read_info(out), folder=out)
    assert "solo" not in _one_line(e), "a class without val images is a warning, not a refusal"


def test_an_empty_val_split_is_reported_and_refused_for_training(tmp_path):
    src = make_image_folder(tmp_path / "images", {"a": 3, "b": 3}, size=(4, 4))
    out = tmp_path / "shards"
    with pytest.warns(UserWarning, match="the val split is empty"):
        info = write_shards(src, out, val_fraction=0.1, workers=1, progress=False)
    assert info.splits["val"].num_samples == 0
    assert json.loads((out / "_info.json").read_text())["warnings"] == info.warnings and len(info.warnings) == 1, info.warnings
    with pytest.raises(DataError, match="the val split is empty"):
        check_trainable(info, folder=out)


def _info(train: dict[str, int], val: dict[str, int]) -> dict:
    classes = sorted(set(train) | set(val))

    def split(counts):
        return {"num_samples": sum(counts.values()), "filenames": [], "class_counts": {c: counts.get(c, 0) for c in classes}}

    return {"classes": classes, "splits": {"train": split(train), "val": split(val)}}


@pytest.mark.parametrize(
    "info, refusal",
    [
        (_info({"a": 5, "b": 5}, {"a": 1, "b": 1}), None),
        (_info({"a": 5, "b": 1}, {"a": 1}), None),  # b has no val image: allowed
        (_info({"a": 5}, {"a": 1, "b": 1}), r"1 class\(es\) without training images: b$"),
        (_info({"a": 0, "b": 0, "c": 4}, {"c": 1}), r"2 class\(es\) without training images: a, b$"),
        (_info({}, {"a": 2}), "the train split is empty"),
        (_info({"a": 5}, {}), r"the val split is empty \(validation needs"),
        ({"classes": ["a"], "splits": {"train": {"num_samples": 4, "filenames": []}}}, "the val split is empty"),
    ],
    ids=["fine", "class-without-val", "class-without-train", "two-classes-without-train", "no-train", "no-val", "val-missing"],
)
def test_check_trainable_refuses_what_training_cannot_use(info, refusal, tmp_path):
    info = ShardInfo.from_json(info, "test")  # what read_info hands the launch scripts
    if refusal is None:
        check_trainable(info, folder=tmp_path)
        return
    with pytest.raises(DataError, match=refusal) as e:
        check_trainable(info, folder=tmp_path)
    assert _one_line(e).startswith(f"{tmp_path}: cannot train on these shards: ")


def test_shard_report_lines_say_what_was_written_skipped_ignored_and_wrong(tmp_path):
    src = make_image_folder(tmp_path / "images", {"a": 8, "b": 8, "solo": 1}, size=(4, 4))
    _unreadable(src / "a" / "bad", 12)
    (src / "notes.txt").write_text("top level")
    (src / "a" / "notes.txt").write_text("x")
    (src / "a" / ".DS_Store").write_text("x")
    (src / "b" / "labels.csv").write_text("x")
    out = tmp_path / "shards"
    info = _write(src, out, samples_per_shard=4)
    lines = shard_report_lines(info, out, seconds=1.25)
    tr, va = info.splits["train"], info.splits["val"]
    assert lines[0] == (
        f"wrote {out}: 3 classes, train {tr.num_samples} images in {len(tr.filenames)} shards, "
        f"val {va.num_samples} in {len(va.filenames)} shards (1.2 s)"
    )
    assert lines[1] == f"skipped 12 unreadable images (reasons in {out / 'skipped.csv'}):"
    assert all(line.startswith("  a/bad/broken_") for line in lines[2:12])
    assert lines[12] == "  ... and 2 more"
    assert lines[13] == (
        f"ignored 4 files (listed in {out / 'ignored.csv'}): not an image extension: 2, hidden: 1, not in a class folder: 1"
    )
    assert lines[14:] == ["warning: " + n for n in info.warnings] and "solo" in lines[-1]
    assert shard_report_lines(read_info(out), out)[0] == lines[0].rsplit(" (", 1)[0]


# ----------------------------------------------------------------------------- 4. bad decoders


def crashing_encoder(job):
    """Runs in the decoder processes: crash.png kills its process, hang.png never returns."""
    name = os.path.basename(job[0])
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "hang.png":
        time.sleep(1000)
    return _encode_one(job)


def always_crashing_encoder(job):
    os.kill(os.getpid(), signal.SIGKILL)


def _child_pids() -> set[int]:
    """Processes (zombies included) whose parent is this test process."""
    me = str(os.getpid())
    children = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            children.add(int(pid))
    return children


@pytest.mark.parametrize("workers, culprits", [(1, ["a/crash.png"]), (2, ["a/crash.png", "b/hang.png"])])
def test_an_image_that_crashes_or_hangs_its_decoder_costs_that_image_only(tmp_path, workers, culprits):
    src = make_image_folder(tmp_path / "images", {"a": 9, "b": 9}, size=(4, 4))
    for rel in culprits:  # valid images: only the decoder misbehaves on them
        (src / rel).write_bytes((src / "a" / "img_000.png").read_bytes())
    before = _child_pids()
    t0 = time.monotonic()
    info = _write(src, tmp_path / "shards", workers=workers, image_timeout_s=2, _encode=crashing_encoder)
    assert time.monotonic() - t0 < 15
    assert _child_pids() == before, "a decoder process outlived write_shards"

    skipped = pd.read_csv(tmp_path / "shards" / "skipped.csv")
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert sorted(reasons) == culprits
    assert reasons["a/crash.png"] == "decoder crashed (signal 9, SIGKILL)"
    if "b/hang.png" in reasons:
        assert reasons["b/hang.png"] == "decoder timed out after 2 s"
    assert info.splits["train"].num_samples + info.splits["val"].num_samples == 18
    manifest = pd.read_csv(tmp_path / "shards" / "manifest.csv")
    assert sorted(manifest.loc[manifest["status"] == "skipped", "path"]) == culprits


def test_decoders_that_always_die_stop_the_run_with_one_line(tmp_path):
    from toolkit.data.shards import _DecoderPool

    src = make_image_folder(tmp_path / "images", {"a": 30, "b": 30}, size=(4, 4))
    before = _child_pids()
    limit = _DecoderPool.MAX_FAILURES_BEFORE_ANY_ANSWER
    with pytest.raises(DataError, match=rf"failed {limit} times before decoding any image \(last: decoder crashed") as e:
        _write(src, tmp_path / "shards", workers=2, _encode=always_crashing_encoder)
    _one_line(e)
    assert _child_pids() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# ----------------------------------------------------------------------------- 5. _info.json content


def _bad(info: dict, change: str) -> None:
    train = info["splits"]["train"]
    if change == "path in a name":
        train["filenames"][0] = "../../etc/train-000000.tar"
    elif change == "command in a name":
        train["filenames"][0] = "x; rm -rf ~; .tar"
    elif change == "short number":
        train["filenames"][0] = "train-1.tar"
    elif change == "negative count":
        train["num_samples"] = -1
    elif change == "count as text":
        train["num_samples"] = "12"
    elif change == "negative length":
        train["shard_lengths"][0] = -3
    elif change == "bad digest":
        train["sha256"] = ["zz"]
    elif change == "class not a string":
        info["classes"] = [0, 1]
    elif change == "negative class count":
        train["class_counts"] = {"c0": -1}
    elif change == "splits a list":
        info["splits"] = [train]
    elif change == "bad split name":
        info["splits"]["x y"] = info["splits"].pop("train")
    elif change == "negative image_size":
        info["preprocess"] = {"image_size": -3, "grayscale": True}


BAD_INFO = {
    "path in a name": "splits.train.filenames[0] = '../../etc/train-000000.tar'",
    "command in a name": "splits.train.filenames[0] = 'x; rm -rf ~; .tar'",
    "short number": "splits.train.filenames[0] = 'train-1.tar'",
    "negative count": "splits.train.num_samples = -1",
    "count as text": "splits.train.num_samples = '12'",
    "negative length": "splits.train.shard_lengths[0] = -3",
    "bad digest": "splits.train.sha256[0] = 'zz'",
    "class not a string": "classes = [0, 1]",
    "negative class count": "splits.train.class_counts = {'c0': -1}",
    "splits a list": "splits = [",
    "bad split name": "split name = 'x y'",
    "negative image_size": "preprocess.image_size = -3",
}


@pytest.mark.parametrize("change", list(BAD_INFO))
def test_read_info_refuses_a_malformed_info_naming_the_entry(tmp_path, change):
    folder = tmp_path / "shards"
    craft_shards(folder, {"train": [3, 2], "val": [2]}, num_classes=2)
    info = json.loads((folder / "_info.json").read_text())
    _bad(info, change)
    (folder / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="bad ") as e:
        read_info(folder)
    assert BAD_INFO[change] in _one_line(e)


# ----------------------------------------------------------------------------- 6. argument ranges


BAD_ARGS = [
    ({"seed": -1}, "seed must be an int >= 0, got -1"),
    ({"seed": 1.5}, "seed must be an int >= 0"),
    ({"image_size": -3}, "image_size must be an int >= 1 (0 or None keeps the original size), got -3"),
    ({"image_size": 2.5}, "image_size must be an int >= 1"),
    ({"samples_per_shard": 0}, "samples_per_shard must be >= 1, got 0"),
    ({"val_fraction": 0.0}, "val_fraction must be in (0, 1), got 0.0"),
    ({"val_fraction": float("nan")}, "val_fraction must be in (0, 1)"),
    ({"workers": 0}, "workers must be an int >= 1"),
    ({"workers": -2}, "workers must be an int >= 1"),
    ({"image_timeout_s": 0}, "image_timeout_s must be a number of seconds > 0, got 0"),
    ({"image_timeout_s": -1.0}, "image_timeout_s must be a number of seconds > 0"),
]


@pytest.mark.parametrize("kw, message", BAD_ARGS, ids=[f"{next(iter(k))}={next(iter(k.values()))}" for k, _ in BAD_ARGS])
def test_bad_arguments_are_refused_in_one_line_before_any_work(tmp_path, kw, message):
    # The image folder does not exist: an argument checked after listing would fail on that instead.
    out = tmp_path / "parent" / "shards"
    with pytest.raises(DataError) as e:
        write_shards(tmp_path / "no-images", out, progress=False, **kw)
    assert message in _one_line(e)
    assert list(tmp_path.iterdir()) == []


def test_a_cluster_of_crashing_images_is_not_mistaken_for_a_broken_environment(tmp_path):
    """Eight crashing images first in line (each costs a try and a retry) are eight skipped images."""
    src = make_image_folder(tmp_path / "images", {"a": 10, "b": 10}, size=(4, 4))
    for i in range(8):
        (src / "a" / f"crash{i}.png").write_bytes((src / "a" / "img_000.png").read_bytes())
    info = _write(src, tmp_path / "shards", workers=1, image_timeout_s=5, _encode=crashing_encoder)
    assert info.skipped == 8 and {p for p, _ in info.skipped_files} == {f"a/crash{i}.png" for i in range(8)}
    assert info.splits["train"].num_samples + info.splits["val"].num_samples == 20
