"""Image folder -> manifest -> stratified split."""
from __future__ import annotations

import warnings

import pytest

from conftest import DEFAULT_SIZES, make_image_folder
from toolkit.data.folder import list_image_folder, stratified_split
from toolkit.errors import DataError


def test_manifest_lists_every_image_with_sorted_class_index(image_folder):
    (image_folder / "beta" / "notes.txt").write_text("not an image")
    (image_folder / "gamma" / "sub").mkdir()
    make_image_folder(image_folder / "gamma" / "sub", {"deep": 2})  # gamma/sub/deep/img_*.png
    (image_folder / ".hidden").mkdir()
    (image_folder / ".hidden" / "x.png").write_bytes(b"")

    df, ignored = list_image_folder(image_folder)

    classes = sorted(DEFAULT_SIZES)
    assert sorted(df["label"].unique()) == classes
    counts = df["label"].value_counts().to_dict()
    assert counts == {**DEFAULT_SIZES, "gamma": DEFAULT_SIZES["gamma"] + 2}
    for label, index in zip(df["label"], df["index"]):
        assert index == classes.index(label)
    assert df["path"].is_unique
    assert all(not p.startswith("/") and "\\" not in p for p in df["path"])
    assert all((image_folder / p).is_file() for p in df["path"])
    assert ignored == [(".hidden/x.png", "hidden"), ("beta/notes.txt", "not an image extension")]


def test_missing_or_empty_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError) as e:
        list_image_folder(tmp_path / "nope")
    assert "nope" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="no class sub-folders"):
        list_image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        list_image_folder(tmp_path / "empty")


def _manifest(sizes):
    import pandas as pd

    rows = [(f"{c}/{i}.png", c, k) for k, c in enumerate(sorted(sizes)) for i in range(sizes[c])]
    return pd.DataFrame(rows, columns=["path", "label", "index"])


SPLIT_SIZES = {"a": 100, "b": 37, "c": 10, "d": 3, "e": 2, "f": 7, "g": 30, "h": 1}


def test_split_counts_per_class_within_one_of_fraction():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = stratified_split(_manifest(SPLIT_SIZES), val_fraction=0.15, seed=3)
    assert set(df["split"]) == {"train", "val"}
    for label, n in SPLIT_SIZES.items():
        part = df[df["label"] == label]
        n_val = int((part["split"] == "val").sum())
        assert abs(n_val - round(0.15 * n)) <= 1, (label, n, n_val)
        assert (part["split"] == "train").sum() >= 1, f"class {label} lost all its training images"
    # nothing added, nothing dropped, original columns untouched
    assert len(df) == sum(SPLIT_SIZES.values())
    assert df[["path", "label", "index"]].equals(_manifest(SPLIT_SIZES))


def test_split_is_deterministic_per_seed_and_changes_with_seed():
    m = _manifest(SPLIT_SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = stratified_split(m, seed=0)["split"].tolist()
        b = stratified_split(m, seed=0)["split"].tolist()
        c = stratified_split(m, seed=1)["split"].tolist()
    assert a == b
    assert a != c


def test_single_image_class_stays_in_train_with_warning():
    with pytest.warns(UserWarning, match=r"single image.*: h$"):
        df = stratified_split(_manifest(SPLIT_SIZES), seed=0)
    assert df.loc[df["label"] == "h", "split"].tolist() == ["train"]


def test_no_warning_when_every_class_can_be_split():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stratified_split(_manifest({"a": 5, "b": 2}), seed=0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction_rejected(bad):
    with pytest.raises(DataError):
        stratified_split(_manifest({"a": 5}), val_fraction=bad)


def _all_entries(root):
    """Every non-folder entry and every symlinked folder under root, not following links."""
    import os

    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            found.add(name if rel == "." else f"{rel}/{name}")
    return found


def test_every_file_is_in_the_manifest_or_ignored_with_its_reason(tmp_path):
    import os

    root = make_image_folder(tmp_path / "images", {"a": 3, "b": 2}, size=(4, 4))
    outside = make_image_folder(tmp_path / "outside", {"more": 2, "deeper": 1}, size=(4, 4))
    (root / "README.md").write_text("about")  # top level: in no class
    (root / "stray.png").write_bytes((root / "a" / "img_000.png").read_bytes())
    (root / "a" / "notes.txt").write_text("n")
    (root / "a" / ".DS_Store").write_bytes(b"x")
    make_image_folder(root / "a" / ".thumbs", {"t": 1}, size=(4, 4))
    (root / ".cache").mkdir()
    (root / ".cache" / "c.png").write_bytes(b"x")
    os.symlink(tmp_path / "nowhere.png", root / "a" / "gone.png")
    os.mkfifo(root / "b" / "pipe.png")  # reading it would block the decoder forever
    os.symlink(outside / "more", root / "a" / "more")  # a class assembled from a link
    os.symlink(outside / "deeper", root / "b" / "deeper")
    os.symlink("..", root / "a" / "loop")
    os.symlink(root / "b", root / "alias")  # a second way to b: its images are listed once

    df, ignored = list_image_folder(root)

    assert df["label"].value_counts().to_dict() == {"a": 3 + 2, "b": 2 + 1}
    assert {"a/more/img_000.png", "a/more/img_001.jpg", "b/deeper/img_000.png"} <= set(df["path"])
    assert df["path"].is_unique
    assert all((root / p).is_file() for p in df["path"])
    reasons = dict(ignored)
    assert len(reasons) == len(ignored), "a path is reported twice"
    assert reasons == {
        ".cache/c.png": "hidden",
        "README.md": "not in a class folder",
        "stray.png": "not in a class folder",
        "a/.DS_Store": "hidden",
        "a/.thumbs/t/img_000.png": "hidden",
        "a/gone.png": "broken symlink",
        "a/loop": "symlink loop (points to a folder above it)",
        "a/notes.txt": "not an image extension",
        "alias": "folder already listed through another path",
        "b/pipe.png": "not a regular file",
    }
    missing = _all_entries(root) - set(df["path"]) - set(reasons) - {"a/more", "b/deeper"}
    assert not missing, f"files neither in the manifest nor ignored: {missing}"


def test_symlink_loops_end_and_nothing_is_listed_twice(tmp_path):
    import os

    root = make_image_folder(tmp_path / "images", {"a": 2, "b": 2}, size=(4, 4))
    os.symlink(root / "b", root / "a" / "to_b")  # b reached from a: listed in b only
    os.symlink(root / "a", root / "b" / "to_a")  # a <-> b: a loop through two links
    os.symlink(".", root / "a" / "self")
    df, ignored = list_image_folder(root)
    assert sorted(df["path"]) == ["a/img_000.png", "a/img_001.jpg", "b/img_000.png", "b/img_001.jpg"]
    assert dict(ignored) == {
        "a/self": "symlink loop (points to a folder above it)",
        "a/to_b": "folder already listed through another path",
        "b/to_a": "folder already listed through another path",
    }


def test_class_folder_reached_through_a_link_is_a_class(tmp_path):
    import os

    root = make_image_folder(tmp_path / "images", {"a": 2}, size=(4, 4))
    real = make_image_folder(tmp_path / "elsewhere", {"z": 3}, size=(4, 4))
    os.symlink(real / "z", root / "z")
    df, ignored = list_image_folder(root)
    assert df.groupby("label")["index"].first().to_dict() == {"a": 0, "z": 1}
    assert (df["label"] == "z").sum() == 3 and ignored == []
