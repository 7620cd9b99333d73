"""Image-folder generators: digits (scikit-learn), rendered characters, camera-size originals."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from conftest import one_font
from toolkit import datasets
from toolkit.datasets import (
    CHAR_CLASSES,
    char_class_name,
    default_data_dir,
    write_camera_folder,
    write_chars_folder,
    write_digits_folder,
)


def pngs(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.png"))


def class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="module")
def chars40(tmp_path_factory) -> Path:
    return write_chars_folder(tmp_path_factory.mktemp("chars") / "c40", per_class=40, size=32)


# --- digits ---------------------------------------------------------------------------------


def test_digits_folder_holds_all_1797_images_with_scaled_original_pixels(digits_dir):
    assert class_dirs(digits_dir) == [str(d) for d in range(10)]
    files = pngs(digits_dir)
    assert len(files) == 1797
    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    seen = set()
    for f in files:
        index = int(f.stem.split("-")[1])
        assert f.name == f"digit-{index:05d}.png"
        seen.add(index)
        with Image.open(f) as im:
            assert im.mode == "L" and im.size == (8, 8)
            np.testing.assert_array_equal(np.asarray(im), expected[index])
        assert int(f.parent.name) == digits.target[index]
    assert seen == set(range(1797))
    assert json.loads((digits_dir / ".complete").read_text())["count"] == 1797


def test_digits_second_call_reuses_folder_and_overwrite_rewrites_it(digits_dir):
    probe = digits_dir / "3" / "digit-00003.png"
    before = probe.stat()
    assert write_digits_folder(digits_dir) == digits_dir
    after = probe.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert write_digits_folder(digits_dir, overwrite=True) == digits_dir
    rewritten = probe.stat()
    assert rewritten.st_ino != before.st_ino  # a fresh file, swapped in atomically
    assert len(pngs(digits_dir)) == 1797
    # No temporary or old copies are left next to the target.
    assert [p.name for p in digits_dir.parent.iterdir()] == [digits_dir.name]


def test_digits_default_dir_honours_toolkit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "digits"
    monkeypatch.delenv("TOOLKIT_CACHE")
    assert default_data_dir() == Path.home() / ".cache" / "toolkit" / "digits"


def test_generator_refuses_to_replace_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_digits_folder(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


# --- characters -----------------------------------------------------------------------------


def test_chars_folder_has_62_case_safe_classes_of_requested_size(tmp_path):
    out = write_chars_folder(tmp_path / "c", per_class=3, size=40, fonts=[one_font()])  # a regular weight: std > 10
    names = class_dirs(out)
    assert len(names) == 62
    assert len({n.lower() for n in names}) == 62  # distinct on case-insensitive file systems
    assert set(names) == {char_class_name(c) for c in CHAR_CLASSES}
    assert {"0", "9", "upper_A", "lower_a", "upper_Z", "lower_z"} <= set(names)
    for name in names:
        files = sorted((out / name).glob("*.png"))
        assert len(files) == 3
        for f in files:
            with Image.open(f) as im:
                assert im.mode == "L" and im.size == (40, 40)
                arr = np.asarray(im)
                assert arr.std() > 10  # a glyph is drawn, not a blank or flat image


def test_chars_are_deterministic_per_seed(tmp_path):
    a = write_chars_folder(tmp_path / "a", per_class=2, size=32, seed=7)
    b = write_chars_folder(tmp_path / "b", per_class=2, size=32, seed=7)
    c = write_chars_folder(tmp_path / "c", per_class=2, size=32, seed=8)
    rel = [f.relative_to(a) for f in pngs(a)]
    assert len(rel) == 124 and rel == [f.relative_to(b) for f in pngs(b)]
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in rel)
    differing = sum((a / r).read_bytes() != (c / r).read_bytes() for r in rel)
    assert differing == len(rel)


def test_chars_regenerates_when_parameters_change(tmp_path):
    out = write_chars_folder(tmp_path / "c", per_class=1, size=16)
    assert len(pngs(out)) == 62
    write_chars_folder(tmp_path / "c", per_class=2, size=16)
    assert len(pngs(out)) == 124


def test_chars_without_fonts_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FONT_ROOT", tmp_path / "no-fonts")
    with pytest.raises(FileNotFoundError, match=r"no fonts \(\*\.ttf, \*\.otf\)"):
        write_chars_folder(tmp_path / "c", per_class=1, size=16)
    with pytest.raises(FileNotFoundError):
        write_chars_folder(tmp_path / "c", per_class=1, size=16, fonts=[tmp_path / "nope.ttf"])
    assert not (tmp_path / "c").exists()


def _families(tmp_path, faces: dict[str, int]) -> Path:
    """A font tree of copies of one usable font: ``faces`` = {family folder: faces in it}."""
    font = one_font()
    root = tmp_path / "fonts"
    for family, n in faces.items():
        (root / family).mkdir(parents=True)
        for i in range(n):  # FreeType reads the format from the bytes, so a .ttf copied to .otf loads
            (root / family / f"{family}-{i}{'.otf' if i % 2 else '.ttf'}").write_bytes(font.read_bytes())
    (root / "notes.txt").write_text("not a font")
    (root / "broken.ttf").write_bytes(b"not a font either")
    return root


def test_discover_fonts_takes_otf_too_and_caps_faces_per_family(tmp_path):
    root = _families(tmp_path, {"big": 7, "small": 1})
    found = datasets.discover_fonts(root)
    assert len(found) == 8 and {p.suffix for p in found} == {".ttf", ".otf"}  # broken.ttf and notes.txt left out
    capped = datasets.discover_fonts(root, per_family=2)
    assert [p.parent.name for p in capped] == ["big", "big", "small"]
    assert capped[0].name == "big-0.ttf" and capped[1].name != "big-1.otf"  # spread over the family, not its first two


def test_discover_fonts_leaves_out_fonts_whose_lower_case_is_their_capitals(tmp_path, monkeypatch):
    root = _families(tmp_path, {"caps": 1})
    assert len(datasets.discover_fonts(root)) == 1
    real = datasets._glyph_bytes
    monkeypatch.setattr(datasets, "_glyph_bytes", lambda font, ch: real(font, ch.upper()))  # an all-caps font
    assert datasets.discover_fonts(root) == []  # 'a' and 'A' would be one image under two labels


def test_chars_task_is_learnable_but_not_trivial_for_raw_pixel_knn(chars40):
    files = pngs(chars40)
    assert len(files) == 62 * 40
    X = np.stack([np.asarray(Image.open(f), dtype=np.float32).ravel() / 255 for f in files])
    y = np.array([f.parent.name for f in files])
    X_tr, X_va, y_tr, y_va = train_test_split(X, y, test_size=0.15, stratify=y, random_state=0)
    scores = {k: KNeighborsClassifier(k).fit(X_tr, y_tr).score(X_va, y_va) for k in (1, 5, 13)}
    # Chance is 1/62 ≈ 0.016; measured ≈ 0.34 / 0.25 / 0.22 at 40 per class.
    assert all(s > 0.1 for s in scores.values()), scores
    assert all(s < 0.7 for s in scores.values()), scores


# --- camera-size originals ------------------------------------------------------------------


def test_camera_folder_images_have_requested_size(tmp_path):
    out = write_camera_folder(tmp_path / "cam", num_classes=3, per_class=2, width=320, height=240)
    assert class_dirs(out) == ["class_00", "class_01", "class_02"]
    files = pngs(out)
    assert len(files) == 6
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size == (320, 240)
    # Classes differ visibly: class 0 and class 1 images are not the same picture.
    a = np.asarray(Image.open(out / "class_00" / "cam-00000.png"), dtype=np.int16)
    b = np.asarray(Image.open(out / "class_01" / "cam-00000.png"), dtype=np.int16)
    assert np.abs(a - b).mean() > 10


def test_camera_default_size_is_1200_by_900(tmp_path):
    out = write_camera_folder(tmp_path / "cam", num_classes=1, per_class=1)
    (f,) = pngs(out)
    with Image.open(f) as im:
        assert im.size == (1200, 900) and im.mode == "RGB"
    assert os.path.getsize(f) > 100_000  # noisy, like a real photo: not trivially compressible
