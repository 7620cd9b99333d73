"""Class-disjoint (open-set) splits: held-out classes go whole into a test split with query/gallery roles."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_image_folder, read_tar_samples, write_shards_quietly
from toolkit.cli import main as cli_main
from toolkit.data.folder import class_disjoint_split, list_image_folder, parse_holdout, stratified_split
from toolkit.data.shards import (
    ShardInfo, check_trainable, read_info, shard_report_lines, verify_shards, write_shards,
)
from toolkit.data.stream import ShardStream, make_loader
from toolkit.errors import DataError

SIZES = {"a": 12, "b": 9, "c": 10, "d": 8, "8": 7, "9": 6}
CLASSES = sorted(SIZES)  # ['8', '9', 'a', 'b', 'c', 'd']


_write = write_shards_quietly


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("holdout") / "img", SIZES, size=(6, 6))


@pytest.fixture(scope="module")
def held(folder, tmp_path_factory) -> tuple[Path, ShardInfo]:
    """The folder sharded with the integer-named classes 8 and 9 held out (leave-one-out roles)."""
    out = tmp_path_factory.mktemp("held") / "shards"
    return out, _write(folder, out, holdout_classes="8,9", samples_per_shard=5, seed=1)


# ----------------------------------------------------------------------------- parsing


def test_parse_fraction_count_and_names():
    assert len(parse_holdout(0.2, CLASSES)) == 1  # round(1.2)
    assert len(parse_holdout("0.5", CLASSES)) == 3
    assert len(parse_holdout(0.01, CLASSES)) == 1  # at least one
    assert len(parse_holdout("2", CLASSES)) == 2 and len(parse_holdout(2, CLASSES)) == 2
    assert parse_holdout("8,9", CLASSES) == ["8", "9"]
    assert parse_holdout("d, a", CLASSES) == ["a", "d"]  # sorted, spaces ignored
    assert parse_holdout("9,", CLASSES) == ["9"]  # a trailing comma: a name, not a count
    assert parse_holdout(["b", "a"], CLASSES) == ["a", "b"]
    assert parse_holdout(("c",), CLASSES) == ["c"]
    assert parse_holdout("b", CLASSES) == ["b"]  # a non-numeric word is a name
    assert parse_holdout(None, CLASSES) == [] and parse_holdout("", CLASSES) == [] and parse_holdout("  ", CLASSES) == []


def test_selection_is_seeded_and_independent_of_listing_order():
    picks = {seed: parse_holdout(2, CLASSES, seed=seed) for seed in range(12)}
    assert all(parse_holdout(2, list(reversed(CLASSES)), seed=s) == p for s, p in picks.items())
    assert all(parse_holdout("2", CLASSES, seed=s) == p for s, p in picks.items())
    assert len({tuple(p) for p in picks.values()}) > 1, "the seed does not change the selection"
    for p in picks.values():
        assert p == sorted(p) and len(set(p)) == 2 and set(p) <= set(CLASSES)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("x,y", r"unknown class\(es\): x, y"),
        (["a", "zz"], r"unknown class\(es\): zz"),
        ("6", "would hold out 6 of the 6 classes"),
        ("5", "holds out 5 of the 6 classes, leaving 1 known"),
        ("0.99", "would hold out 6 of the 6"),
        ("8,9,a,b,c", "leaving 1 known"),
        ("1.5", r"fraction of the classes must be in \(0, 1\)"),
        ("nan", r"must be in \(0, 1\)"),
        (1.0, r"must be in \(0, 1\)"),
        ("0", "must be >= 1"),
        (0, "must be >= 1"),
        (-2, "must be >= 1"),
        (",", "no class name given"),
        ([], "non-empty list of class names"),
        ([1, 2], "class names"),
        (True, "expected a fraction"),
        ({"a": 1}, "expected a fraction"),
    ],
)
def test_parse_errors_are_one_line(spec, match):
    with pytest.raises(DataError, match=match) as err:
        parse_holdout(spec, CLASSES)
    assert "\n" not in str(err.value)


def test_class_disjoint_split_keeps_the_known_classes_split(folder):
    manifest, _ = list_image_folder(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = stratified_split(manifest, seed=3)
        split, classes, holdout = class_disjoint_split(manifest, ["8", "9"], seed=3)
    assert classes == ["a", "b", "c", "d"] and holdout == ["8", "9"]
    known = ~manifest["label"].isin(holdout)
    assert split.loc[known, "split"].tolist() == plain.loc[known, "split"].tolist()
    assert (split.loc[~known, "split"] == "test").all()
    assert [(classes + holdout)[i] for i in split["index"]] == split["label"].tolist()


# ----------------------------------------------------------------------------- writing


def test_test_split_holds_exactly_the_held_out_classes(held, folder):
    out, info = held
    assert info.classes == ["a", "b", "c", "d"] and info.num_classes == 4
    assert info.holdout_classes == ["8", "9"]
    assert info.all_classes == ["a", "b", "c", "d", "8", "9"]
    assert set(info.splits) == {"train", "val", "test"}
    assert info.splits["test"].filenames == ["test-000000.tar", "test-000001.tar", "test-000002.tar"]
    assert info.splits["test"].num_samples == 13 and info.splits["test"].class_counts == {"8": 7, "9": 6}
    assert set(info.splits["train"].class_counts) == set(info.splits["val"].class_counts) == set(info.classes)
    raw = json.loads((out / "_info.json").read_text())
    assert raw["classes"] == info.classes and raw["holdout_classes"] == ["8", "9"]
    assert raw["holdout"] == {"spec": "8,9", "query_fraction": 0.0}
    assert raw["splits"]["test"]["num_queries"] == raw["splits"]["test"]["num_gallery"] == 13
    assert read_info(out) == info and verify_shards(out) == []

    manifest = pd.read_csv(out / "manifest.csv", dtype={"label": str})
    assert list(manifest.columns) == ["path", "label", "index", "split", "key", "status", "is_query", "is_gallery"]
    held_rows = manifest["label"].isin(["8", "9"])
    assert (manifest.loc[held_rows, "split"] == "test").all()
    assert set(manifest.loc[~held_rows, "split"]) == {"train", "val"}
    assert [info.all_classes[i] for i in manifest["index"]] == manifest["label"].tolist()
    assert manifest.loc[~held_rows, ["is_query", "is_gallery"]].isna().all().all()
    for split, s in info.splits.items():
        for name in s.filenames:
            for key, sample in read_tar_samples(out / name).items():
                label = json.loads(sample["json"])["label"]
                assert (split == "test") == (label in ("8", "9")), f"{key} of class {label} in {split}"
                assert info.all_classes[int(sample["cls"])] == label


def test_held_out_labels_read_back_through_the_stream(held):
    out, info = held
    stream = ShardStream(out, split="test", mode="eval", batch_size=4)
    got = {}
    for keys, images, labels in make_loader(stream, num_workers=2):
        got.update(zip(keys, (info.all_classes[int(y)] for y in labels)))
    manifest = pd.read_csv(out / "manifest.csv", dtype={"label": str})
    test = manifest[manifest["split"] == "test"]
    assert got == dict(zip(test["key"], test["label"]))
    assert stream.skip_counts() == {"unreadable": 0, "bad_label": 0, "short_shard": 0}
    is_query, is_gallery = info.splits["test"].roles(list(got))
    assert is_query.all() and is_gallery.all() and is_query.dtype == bool  # leave-one-out


def test_held_out_classes_do_not_block_training_and_report_the_test_split(held):
    out, info = held
    check_trainable(info, folder=out)  # no complaint about 8 and 9 (no train images by design)
    assert not info.warnings
    lines = shard_report_lines(read_info(out), out)
    assert lines[0].startswith(f"wrote {out}: 4 classes (+2 held out), train ")
    assert lines[1] == "test 13 images of 2 held-out classes (8, 9) in 3 shards: 13 queries, 13 gallery (leave-one-out)"


def test_query_fraction_assigns_seeded_disjoint_roles(folder, tmp_path):
    a = _write(folder, tmp_path / "a", holdout_classes=2, query_fraction=0.3, seed=4)
    b = _write(folder, tmp_path / "b", holdout_classes=2, query_fraction=0.3, seed=4)
    assert a.holdout_classes == b.holdout_classes == parse_holdout(2, CLASSES, seed=4)
    ta, tb = a.splits["test"], b.splits["test"]
    assert (ta.not_query, ta.not_gallery) == (tb.not_query, tb.not_gallery)
    manifest = pd.read_csv(tmp_path / "a" / "manifest.csv", dtype={"label": str})
    test = manifest[manifest["split"] == "test"]
    is_query, is_gallery = ta.roles(test["key"].tolist())
    assert (is_query == test["is_query"].astype(bool).to_numpy()).all()
    assert (is_gallery == test["is_gallery"].astype(bool).to_numpy()).all()
    assert not (is_query & is_gallery).any() and (is_query | is_gallery).all()
    for label in a.holdout_classes:
        n = SIZES[label]
        mask = (test["label"] == label).to_numpy()
        assert is_query[mask].sum() == min(max(round(0.3 * n), 1), n - 1)
    assert ta.num_queries == is_query.sum() and ta.num_gallery == is_gallery.sum()
    assert a.holdout == {"spec": 2, "query_fraction": 0.3}
    assert "(query_fraction 0.3)" in shard_report_lines(a, tmp_path / "a")[1]
    with pytest.raises(DataError, match="give holdout_classes too"):
        _write(folder, tmp_path / "c", query_fraction=0.3)
    with pytest.raises(DataError, match=r"query_fraction must be in \[0, 1\)"):
        _write(folder, tmp_path / "c", holdout_classes=2, query_fraction=1.0)


def test_unreadable_and_single_images_of_held_out_classes(tmp_path):
    src = make_image_folder(tmp_path / "img", {"a": 6, "b": 6, "c": 5, "solo": 1, "gone": 2}, size=(6, 6))
    for p in (src / "gone").iterdir():
        p.write_bytes(b"not an image")
    (src / "c" / "bad.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = write_shards(src, tmp_path / "s", holdout_classes="c,solo,gone", query_fraction=0.5, workers=1, progress=False)
    said = [str(w.message) for w in caught]
    assert any(re.search("single readable image.*: solo$", m) for m in said), said
    assert any(re.search("without any readable image.*: gone$", m) for m in said), said
    assert set(said) == set(info.warnings)
    test = info.splits["test"]
    assert test.class_counts == {"c": 5, "gone": 0, "solo": 1} and test.num_samples == 6
    manifest = pd.read_csv(tmp_path / "s" / "manifest.csv")
    skipped = manifest[manifest["status"] == "skipped"]
    assert len(skipped) == 3 and skipped[["is_query", "is_gallery"]].isna().all().all()
    written = set(manifest.loc[(manifest["split"] == "test") & (manifest["status"] == "ok"), "key"])
    assert set(test.not_query) | set(test.not_gallery) == written  # roles cover only written samples
    solo = manifest.loc[manifest["label"] == "solo", "key"].item()
    assert solo in test.not_query  # a lone image is gallery only
    assert test.num_queries == round(0.5 * 5)


def test_without_holdout_nothing_changes(folder, tmp_path):
    info = _write(folder, tmp_path / "plain", seed=2)
    raw = json.loads((tmp_path / "plain" / "_info.json").read_text())
    assert set(raw["splits"]) == {"train", "val"}
    assert "holdout_classes" not in raw and "holdout" not in raw
    assert not any(k in sp for sp in raw["splits"].values() for k in ("not_query", "not_gallery", "num_queries"))
    assert info.holdout_classes == [] and info.all_classes == info.classes == CLASSES
    manifest = pd.read_csv(tmp_path / "plain" / "manifest.csv")
    assert list(manifest.columns) == ["path", "label", "index", "split", "key", "status"]
    assert sorted(p.name for p in (tmp_path / "plain").glob("test-*")) == []
    # The known classes' train/val split does not depend on holding other classes out.
    out = tmp_path / "held"
    _write(folder, out, seed=2, holdout_classes=["8", "9"])
    other = pd.read_csv(out / "manifest.csv", dtype={"label": str})
    known = ~other["label"].isin(["8", "9"])
    assert other.loc[known, "split"].tolist() == manifest.loc[known, "split"].tolist()
    assert len(shard_report_lines(info, tmp_path / "plain")) == 1


# ----------------------------------------------------------------------------- _info.json checks


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda i: i.update(holdout_classes="8,9"), "bad holdout_classes"),
        (lambda i: i.update(holdout_classes=["8", 9]), "bad holdout_classes"),
        (lambda i: i.update(holdout_classes=["8", "8"]), "distinct class names"),
        (lambda i: i.update(holdout_classes=["8", "a"]), "a is in both"),
        (lambda i: i.update(holdout=[1]), "bad holdout "),
        (lambda i: i["holdout"].update(query_fraction=2), "bad holdout.query_fraction"),
        (lambda i: i["splits"]["test"].update(not_query="s00000001"), "bad splits.test.not_query"),
        (lambda i: i["splits"]["test"].update(not_query=["../etc/passwd"]), r"bad splits.test.not_query\[0\]"),
        (lambda i: i["splits"]["test"].update(not_query=["s1"]), r"not_query\[0\] = 's1'"),
        (lambda i: i["splits"]["test"].update(not_gallery=["s00000001", "s00000001"]), "distinct sample keys"),
        (lambda i: i["splits"]["test"].update(not_query=["s00000001"], not_gallery=["s00000001"]), "in both"),
        (lambda i: i["splits"]["test"].update(num_queries=2), "bad splits.test.num_queries"),
    ],
)
def test_tampered_info_json_is_a_one_line_error(held, tmp_path, edit, match):
    out, _ = held
    info = json.loads((out / "_info.json").read_text())
    edit(info)
    with pytest.raises(DataError, match=match) as err:
        ShardInfo.from_json(info, "tampered/_info.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("tampered/_info.json: bad ")


# ----------------------------------------------------------------------------- command line


def test_cli_shard_holds_out_classes_and_errors_in_one_line(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main(["shard", str(folder), str(out), "--holdout_classes", "9,", "--query_fraction", "0.5", "--workers", "1"])
    printed = capsys.readouterr().out
    assert re.search(r"^test 6 images of 1 held-out classes \(9\) in 1 shards: 3 queries, 3 gallery \(query_fraction 0.5\)$",
                     printed, re.M), printed
    assert read_info(out).holdout_classes == ["9"]
    for spec, message in (("zebra,9", "unknown class(es): zebra"), ("7", "would hold out 7 of the 6"), ("2.5", "(0, 1)")):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["shard", str(folder), str(tmp_path / "no"), "--holdout_classes", spec, "--workers", "1"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "no").exists()
