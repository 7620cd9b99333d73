"""toolkit.files: replacing an output folder only if this toolkit wrote it (shards and index folders)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import toolkit.files as files
from toolkit.data.shards import SHARD_FOLDER
from toolkit.errors import DataError
from toolkit.files import OwnedFolder, check_apart, check_replaceable, move_into_place, new_temp_folder, why_not_ours
from toolkit.gallery import INDEX_FOLDER

TOY = OwnedFolder(
    what="a toy folder",
    writer="`toy`",
    marker="marker.json",
    is_marker=lambda p: p.is_file() and json.loads(p.read_text()) == {"toy": 1},
    owns=lambda name: name in {"marker.json", "data.bin"},
    writing="the toy was being written",
    previous="the previous toy",
)


def _toy(folder: Path, content: bytes = b"old") -> Path:
    folder.mkdir()
    (folder / "marker.json").write_text(json.dumps({"toy": 1}))
    (folder / "data.bin").write_bytes(content)
    return folder


def _new(out: Path) -> Path:
    tmp = new_temp_folder(out)
    (tmp / "marker.json").write_text(json.dumps({"toy": 1}))
    (tmp / "data.bin").write_bytes(b"new")
    return tmp


def _siblings(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_empty_or_ours_is_replaceable(tmp_path):
    (tmp_path / "empty").mkdir()
    assert why_not_ours(tmp_path / "empty", TOY) is None
    assert why_not_ours(_toy(tmp_path / "out"), TOY) is None
    check_replaceable(tmp_path / "absent", TOY, overwrite=False)
    check_replaceable(tmp_path / "out", TOY, overwrite=True)
    with pytest.raises(DataError, match=r"^\S+out already exists: pass --overwrite to replace it$"):
        check_replaceable(tmp_path / "out", TOY, overwrite=False)


def test_a_foreign_file_is_refused_and_kept(tmp_path):
    out = _toy(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    why = r"exists and holds files `toy` did not write \(notes.txt\): refusing to replace it"
    with pytest.raises(DataError, match=why):
        check_replaceable(out, TOY, overwrite=True)
    tmp = _new(out)
    with pytest.raises(DataError, match="did not write"):
        move_into_place(tmp, out, TOY, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "data.bin").read_bytes() == b"old"
    assert tmp.is_dir()  # the caller removes its temp folder
    # a sub-folder or a link with one of our names is not ours either
    (out / "notes.txt").unlink()
    (out / "data.bin").unlink()
    (out / "data.bin").mkdir()
    assert "did not write (data.bin)" in why_not_ours(out, TOY)
    (out / "data.bin").rmdir()
    (out / "data.bin").symlink_to(tmp / "data.bin")
    assert "did not write (data.bin)" in why_not_ours(out, TOY)


def test_no_marker_a_file_and_a_symlink_are_refused(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.bin").write_bytes(b"x")
    assert why_not_ours(plain, TOY) == "is not a toy folder (no marker.json written by `toy`)"
    (tmp_path / "file").write_text("x")
    assert why_not_ours(tmp_path / "file", TOY) == "is not a folder"
    link = tmp_path / "link"
    link.symlink_to(_toy(tmp_path / "real"), target_is_directory=True)
    assert why_not_ours(link, TOY) == "is a symbolic link (give the folder it points to)"
    with pytest.raises(DataError, match="link exists and is a symbolic link"):
        move_into_place(_new(link), link, TOY, overwrite=True)
    assert link.is_symlink() and (tmp_path / "real" / "data.bin").read_bytes() == b"old"


def test_replace_moves_the_old_folder_aside_and_removes_it(tmp_path):
    out = _toy(tmp_path / "out")
    move_into_place(_new(out), out, TOY, overwrite=True)
    assert (out / "data.bin").read_bytes() == b"new"
    assert _siblings(tmp_path) == ["out"]  # neither the temp folder nor the old one is left


def test_without_overwrite_an_existing_folder_is_not_replaced(tmp_path):
    out = _toy(tmp_path / "out")
    tmp = _new(out)
    with pytest.raises(DataError, match="out appeared while the toy was being written: not replaced"):
        move_into_place(tmp, out, TOY, overwrite=False)
    assert (out / "data.bin").read_bytes() == b"old"


@pytest.mark.parametrize("error", [FileExistsError("someone else"), OSError(28, "No space left on device")])
def test_the_old_folder_is_put_back_when_the_rename_fails(tmp_path, monkeypatch, error):
    out = _toy(tmp_path / "out")
    tmp = _new(out)

    def fail(src, dst):
        assert not os.path.lexists(dst)  # the old folder is aside now
        raise error

    monkeypatch.setattr(files, "rename_onto_new", fail)
    expected = DataError if isinstance(error, FileExistsError) else OSError
    with pytest.raises(expected) as e:
        move_into_place(tmp, out, TOY, overwrite=True)
    if expected is DataError:
        assert str(e.value) == f"{out} appeared while the toy was being written: not replaced"
    assert (out / "data.bin").read_bytes() == b"old"
    assert _siblings(tmp_path) == sorted(["out", tmp.name])  # no moved-aside copy left behind


def test_check_old_can_refuse_and_the_old_folder_is_put_back(tmp_path):
    out = _toy(tmp_path / "out")
    tmp = _new(out)
    seen = []

    def check_old(old: Path) -> None:
        seen.append(old)
        raise DataError("changed meanwhile")

    with pytest.raises(DataError, match="changed meanwhile"):
        move_into_place(tmp, out, TOY, overwrite=True, check_old=check_old)
    assert seen and seen[0].parent == tmp_path and seen[0].name.startswith(".out.old-")
    assert (out / "data.bin").read_bytes() == b"old" and _siblings(tmp_path) == sorted(["out", tmp.name])


def test_check_apart(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    check_apart(src, tmp_path / "out", what_src="image folder", advice="write it elsewhere")
    for out, where in [(src, "is the"), (tmp_path, "contains the"), (src / "a" / "out", "is inside the")]:
        with pytest.raises(DataError) as e:
            check_apart(src, out, what_src="image folder", advice="write it elsewhere")
        assert str(e.value) == f"{out} {where} image folder {src}: write it elsewhere"
        with pytest.raises(DataError) as e:
            check_apart(src, out, what_src="gallery", advice="go", say_which=False)
        assert str(e.value) == f"{out} is, contains or lies inside the gallery {src}: go"
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(DataError, match="is the image folder"):  # real paths are compared
        check_apart(src, link, what_src="image folder", advice="go")


@pytest.mark.parametrize(
    "kind, marker, content, hint, not_ours, foreign",
    [
        (SHARD_FOLDER, "_info.json", {"format_version": 1, "splits": {}}, "--overwrite",
         "is not a shard folder (no _info.json written by `toolkit shard`)",
         "holds files `toolkit shard` did not write (f0, f1, f2, f3, f4 ...)"),
        (INDEX_FOLDER, "meta.json", {"kind": "toolkit-gallery-index"}, "overwrite (--overwrite)",
         "is not an index folder (no meta.json written by `toolkit index`)",
         "holds files `toolkit index` did not write (f0, f1, f2, f3, f4, ... (6 in all))"),
    ],
)
def test_the_two_callers_words(tmp_path, kind, marker, content, hint, not_ours, foreign):
    """The messages of `toolkit shard` and `toolkit index`, exactly as they were before they shared the code."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("x")
    assert why_not_ours(out, kind) == not_ours
    (out / "x.txt").unlink()
    with pytest.raises(DataError) as e:
        check_replaceable(out, kind, overwrite=False, shown=tmp_path / "shown")
    assert str(e.value) == f"{tmp_path / 'shown'} already exists: pass {hint} to replace it"
    assert kind.marker == marker
    (out / marker).write_text(json.dumps(content))
    assert why_not_ours(out, kind) is None
    for i in range(6):
        (out / f"f{i}").write_text("x")
    assert why_not_ours(out, kind) == foreign
