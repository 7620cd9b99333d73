"""Shard writer: round trip, skip report, atomic output, _info.json, verification."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import DEFAULT_SIZES, make_image_folder, read_tar_samples
from toolkit.errors import DataError
from toolkit.data.shards import ShardInfo, preprocess_image, read_info, verify_shards, write_shards


def _write(src, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-image class warning
        return write_shards(src, out, **kw)


def _all_samples(out: Path, info: dict) -> dict[str, list[tuple[str, dict]]]:
    """key -> [(split, sample), ...] over every shard listed in _info.json."""
    seen: dict[str, list] = {}
    for split, s in info.splits.items():
        for name in s.filenames:
            for key, sample in read_tar_samples(out / name).items():
                seen.setdefault(key, []).append((split, sample))
    return seen


def _corrupt_folder(root: Path) -> dict[str, str]:
    """Add broken files to an image folder; returns {relative path: what it is}."""
    good = root / "alpha" / "img_000.png"
    data = good.read_bytes()
    (root / "alpha" / "truncated.png").write_bytes(data[: len(data) // 2])
    jpg = (root / "beta" / "img_001.jpg").read_bytes()
    (root / "beta" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "gamma" / "empty.png").write_bytes(b"")
    (root / "gamma" / "text.png").write_text("this is not a png at all\n")
    (root / "eps" / "notes.txt").write_text("labelling notes")
    return {
        "alpha/truncated.png": "truncated",
        "beta/truncated.jpg": "truncated",
        "gamma/empty.png": "empty",
        "gamma/text.png": "text",
    }


@pytest.mark.parametrize(
    "image_size, grayscale, formats",
    [(8, True, ("png", "jpg")), (None, False, ("png", "jpg", "bmp"))],
    ids=["gray8-png-jpg", "rgb-native-png-jpg-bmp"],
)
def test_round_trip_keeps_every_image_once_with_right_label(tmp_path, image_size, grayscale, formats):
    src = make_image_folder(tmp_path / "img", formats=formats)
    out = tmp_path / "shards"
    info = _write(src, out, image_size=image_size, grayscale=grayscale, samples_per_shard=6, seed=5)

    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == sum(DEFAULT_SIZES.values())
    assert (manifest["status"] == "ok").all()
    seen = _all_samples(out, info)
    classes = sorted(DEFAULT_SIZES)
    assert info.classes == classes
    assert set(seen) == set(manifest["key"]), "keys in the shards differ from the manifest"
    for row in manifest.itertuples():
        hits = seen[row.key]
        assert len(hits) == 1, f"{row.path} appears {len(hits)} times"
        split, sample = hits[0]
        assert split == row.split
        assert set(sample) == {"png", "cls", "json"}
        assert int(sample["cls"]) == classes.index(row.label) == row.index
        meta = json.loads(sample["json"])
        assert meta == {"path": row.path, "label": row.label}
        with Image.open(src / row.path) as im:
            expected = np.asarray(preprocess_image(im, image_size=image_size, grayscale=grayscale))
        with Image.open(io.BytesIO(sample["png"])) as im:
            assert im.format == "PNG"
            got = np.asarray(im)
        assert got.shape == expected.shape
        if image_size:
            assert got.shape == (image_size, image_size)
        else:
            assert got.shape == (20, 24, 3)
        np.testing.assert_array_equal(got, expected)
    # per-class counts in _info.json agree with the manifest
    for split in ("train", "val"):
        want = manifest[manifest["split"] == split]["label"].value_counts().to_dict()
        got = {k: v for k, v in info.splits[split].class_counts.items() if v}
        assert got == want


def test_split_in_shards_follows_the_seed(tmp_path):
    src = make_image_folder(tmp_path / "img", {"a": 20, "b": 14, "c": 7, "solo": 1}, size=(6, 6))
    with pytest.warns(UserWarning, match="solo"):
        write_shards(src, tmp_path / "s0", seed=0, workers=1, progress=False)
    _write(src, tmp_path / "s0b", seed=0)
    _write(src, tmp_path / "s1", seed=1)
    m0, m0b, m1 = (pd.read_csv(tmp_path / n / "manifest.csv") for n in ("s0", "s0b", "s1"))
    assert m0["split"].tolist() == m0b["split"].tolist()
    assert m0["split"].tolist() != m1["split"].tolist()
    for m in (m0, m1):
        for label, n in {"a": 20, "b": 14, "c": 7}.items():
            n_val = int(((m["label"] == label) & (m["split"] == "val")).sum())
            assert abs(n_val - round(0.15 * n)) <= 1
        assert m.loc[m["label"] == "solo", "split"].tolist() == ["train"]
    # same seed, same input -> byte-identical shards
    i0, i0b = read_info(tmp_path / "s0"), read_info(tmp_path / "s0b")
    assert i0.splits["train"].sha256 == i0b.splits["train"].sha256


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_images_are_reported_and_skipped(tmp_path, workers):
    src = make_image_folder(tmp_path / "img", size=(16, 12))
    bad = _corrupt_folder(src)
    out = tmp_path / "shards"
    info = _write(src, out, workers=workers, samples_per_shard=7)

    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["path", "reason"]
    assert sorted(skipped["path"]) == sorted(bad)
    assert skipped["reason"].notna().all() and (skipped["reason"].str.len() > 0).all()
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert "empty" in reasons["gamma/empty.png"].lower() or "0 bytes" in reasons["gamma/empty.png"]
    assert info.skipped == len(bad)

    ignored = pd.read_csv(out / "ignored.csv")
    assert ignored["path"].tolist() == ["eps/notes.txt"]
    assert info.ignored == {"not an image extension": 1}

    manifest = pd.read_csv(out / "manifest.csv")
    assert set(manifest.loc[manifest["status"] == "skipped", "path"]) == set(bad)
    ok = manifest[manifest["status"] == "ok"]
    assert len(ok) == sum(DEFAULT_SIZES.values()), "a valid image was dropped"
    seen = _all_samples(out, info)
    assert set(seen) == set(ok["key"])
    bad_keys = set(manifest.loc[manifest["status"] == "skipped", "key"])
    assert not bad_keys & set(seen)
    total = info.splits["train"].num_samples + info.splits["val"].num_samples
    assert total == len(ok)


def test_output_never_overwritten_without_flag_and_no_temp_left(tmp_path):
    src = make_image_folder(tmp_path / "img", {"a": 6, "b": 6}, size=(6, 6))
    parent = tmp_path / "out_parent"
    out = parent / "shards"
    _write(src, out)
    first = read_info(out)
    (out / "marker.txt").write_text("user file")

    with pytest.raises(DataError, match="exists"):
        _write(src, out)
    assert (out / "marker.txt").is_file(), "existing output was touched without overwrite"
    assert read_info(out) == first

    src2 = make_image_folder(tmp_path / "img2", {"a": 6, "b": 6, "c": 6}, size=(6, 6))
    # A file the toolkit did not write is never deleted, not even with overwrite.
    with pytest.raises(DataError, match=r"did not write \(marker.txt\)"):
        _write(src2, out, overwrite=True)
    assert (out / "marker.txt").read_text() == "user file"
    assert read_info(out) == first

    (out / "marker.txt").unlink()
    _write(src2, out, overwrite=True)
    assert read_info(out).classes == ["a", "b", "c"]
    assert verify_shards(out) == []
    assert sorted(p.name for p in parent.iterdir()) == ["shards"], "temporary folders left behind"


def test_failed_run_leaves_nothing_behind(tmp_path):
    out = tmp_path / "parent" / "shards"
    with pytest.raises(DataError):
        _write(tmp_path / "does-not-exist", out)
    assert not out.exists()
    assert not (tmp_path / "parent").exists() or list((tmp_path / "parent").iterdir()) == []


def test_info_json_describes_the_shards(tmp_path):
    src = make_image_folder(tmp_path / "img", {"a": 20, "b": 13, "c": 9}, size=(10, 10))
    out = tmp_path / "shards"
    returned = _write(src, out, samples_per_shard=5, image_size=12, grayscale=True, seed=2)
    info = read_info(out)
    assert ShardInfo.from_json(json.loads((out / "_info.json").read_text()), "raw") == info
    assert returned == info
    assert info.classes == ["a", "b", "c"]
    assert info.num_classes == 3
    assert info.image_size == 12 and info.grayscale is True
    assert set(info.splits) == {"train", "val"}
    total = 0
    on_disk = sorted(p.name for p in out.glob("*.tar"))
    listed = []
    for split, s in info.splits.items():
        assert len(s.filenames) == len(s.shard_lengths) == len(s.sha256)
        assert sum(s.shard_lengths) == s.num_samples
        assert all(1 <= n <= 5 for n in s.shard_lengths)
        for name, n, digest in zip(s.filenames, s.shard_lengths, s.sha256):
            assert name.startswith(split + "-") and name.endswith(".tar")
            assert len(read_tar_samples(out / name)) == n
            assert len(digest) == 64 and int(digest, 16) >= 0
        listed += s.filenames
        total += s.num_samples
    assert total == 42
    assert sorted(listed) == on_disk
    assert info.splits["val"].num_samples == round(0.15 * 20) + round(0.15 * 13) + round(0.15 * 9)


def test_verify_shards_detects_modified_and_missing_shards(tmp_path):
    src = make_image_folder(tmp_path / "img", {"a": 12, "b": 12}, size=(6, 6))
    out = tmp_path / "shards"
    info = _write(src, out, samples_per_shard=5)
    assert verify_shards(out) == []
    names = info.splits["train"].filenames
    victim = out / names[1]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify_shards(out) == [names[1]]
    (out / names[0]).unlink()
    assert sorted(verify_shards(out)) == sorted(names[:2])


def test_read_info_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_info(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="_info.json"):
        read_info(tmp_path / "empty")
    (tmp_path / "empty" / "_info.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        read_info(tmp_path / "empty")


def test_preprocess_handles_alpha_sixteen_bit_and_keeps_size_when_asked():
    rgba = Image.new("RGBA", (5, 3), (0, 0, 0, 0))  # fully transparent -> white background
    out = preprocess_image(rgba, image_size=None, grayscale=True)
    assert out.mode == "L" and out.size == (5, 3)
    assert np.asarray(out).min() == 255
    deep = Image.fromarray(np.array([[0, 65535], [32768, 1000]], dtype=np.uint16))
    out = np.asarray(preprocess_image(deep, image_size=None, grayscale=True))
    assert out[0, 1] == 255 and out[0, 0] == 0 and 120 < out[1, 0] < 135
    rgb = Image.new("RGB", (30, 10), (10, 200, 30))
    out = preprocess_image(rgb, image_size=7, grayscale=False)
    assert out.mode == "RGB" and out.size == (7, 7)


def test_crash_while_writing_keeps_old_output_and_removes_temp(tmp_path, monkeypatch):
    import toolkit.data.shards as shards_mod

    src = make_image_folder(tmp_path / "img", {"a": 6, "b": 6}, size=(6, 6))
    parent = tmp_path / "parent"
    out = parent / "shards"
    _write(src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards_mod, "_write_split_shards", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(src, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in parent.iterdir()) == ["shards"]


def test_class_index_matches_info_classes_when_a_class_folder_has_no_images(tmp_path):
    # A class folder holding only a README (or nothing) must not shift the class indices:
    # every sample's .cls must index its own class name in _info.json["classes"].
    src = make_image_folder(tmp_path / "img", {"a": 5, "c": 5, "d": 4}, size=(6, 6))
    (src / "b").mkdir()
    (src / "b" / "README.txt").write_text("to do")
    out = tmp_path / "shards"
    info = _write(src, out)
    assert len(info.classes) == info.num_classes
    for key, hits in _all_samples(out, info).items():
        _, sample = hits[0]
        label, cls = json.loads(sample["json"])["label"], int(sample["cls"])
        assert 0 <= cls < info.num_classes, f"{key}: class index {cls} out of range {info.classes}"
        assert info.classes[cls] == label, f"{key}: .cls {cls} -> {info.classes[cls]!r}, json says {label!r}"


def test_ignored_csv_gives_the_reason_for_every_file_left_out(tmp_path):
    import os

    src = make_image_folder(tmp_path / "img", {"a": 4, "b": 4}, size=(6, 6))
    (src / "README.md").write_text("top level")
    (src / "a" / "notes.txt").write_text("n")
    (src / "b" / ".DS_Store").write_text("x")
    os.symlink(tmp_path / "nowhere.png", src / "b" / "gone.png")
    out = tmp_path / "shards"
    info = _write(src, out)
    ignored = pd.read_csv(out / "ignored.csv")
    assert list(ignored.columns) == ["path", "reason"]
    expected = [
        ("README.md", "not in a class folder"),
        ("a/notes.txt", "not an image extension"),
        ("b/.DS_Store", "hidden"),
        ("b/gone.png", "broken symlink"),
    ]
    assert list(ignored.itertuples(index=False, name=None)) == expected
    assert info.ignored == {"not in a class folder": 1, "not an image extension": 1, "hidden": 1, "broken symlink": 1}
    assert json.loads((out / "_info.json").read_text())["ignored_non_images"] == 1  # the older key, still written
