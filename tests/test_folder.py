"""Image folder -> manifest -> stratified split."""
from __future__ import annotations

import warnings

import pytest

from conftest import DEFAULT_SIZES, make_image_folder
from toolkit.data.folder import DataError, list_image_folder, stratified_split


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
    assert ignored == ["beta/notes.txt"]


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
