"""Files written whole or not at all, and torch files loaded without running code.

* :func:`atomic_write` and its text/JSON/torch forms: write a temp file beside the target,
  fsync, ``os.replace``: a crash leaves the old file or the new one, never half of either.
* :func:`new_temp_folder` + :func:`rename_onto_new`: build a folder beside its target and
  move it into place only when complete, never onto something that appeared meanwhile.
* :class:`OwnedFolder` + :func:`check_replaceable` / :func:`move_into_place`: replace an
  output folder (a shard folder, an index folder) only if this toolkit wrote it;
  :func:`check_apart`: never write an output that is, contains or lies inside its source.
* :func:`safe_load`: ``torch.load(weights_only=True)`` (a pickle with code in it is
  refused) with one error type, :class:`~toolkit.errors.CheckpointError`, for any damage.

Checkpoints, tracking files, reports, benchmark JSON, shard folders and data sets all write
through here.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from toolkit.errors import CheckpointError, DataError

__all__ = [
    "OwnedFolder",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_apart",
    "check_replaceable",
    "move_into_place",
    "new_temp_folder",
    "rename_onto_new",
    "safe_load",
    "sha256_file",
    "why_not_ours",
]


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync it, then ``os.replace``.

    The temp file lives in the same directory so the rename never crosses a filesystem
    (``os.replace`` is only atomic within one). A crash before the rename leaves the old
    ``path`` untouched; the temp file is removed on any exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions of any new file
        # (umask), so teammates and the host user outside a container can read runs.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-save must not leave litter behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a power cut; not supported everywhere (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written file at ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode(encoding)))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Replace ``path`` with ``obj`` as JSON atomically (trailing newline, stable key order)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- safe loading


# torch.save writes a zip whose members are stored, not compressed: a checkpoint expands to
# about its own size. One that would expand to more than EXPANSION_LIMIT times its size plus
# EXPANSION_SLACK bytes is refused before torch reads it (a zip bomb would fill the memory).
EXPANSION_LIMIT = 4
EXPANSION_SLACK = 64 << 20


def check_expansion(path: str | os.PathLike) -> None:
    """Refuse a zip checkpoint whose members add up to more than the stated limit (one line)."""
    import zipfile

    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format is a plain pickle stream: nothing expands
        with zipfile.ZipFile(path) as z:
            total = sum(max(0, i.file_size) for i in z.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load names the damage
    size = path.stat().st_size
    limit = EXPANSION_LIMIT * size + EXPANSION_SLACK
    if total > limit:
        raise CheckpointError(
            f"{path}: its members expand to {total:,} bytes, more than the limit of {limit:,} "
            f"({EXPANSION_LIMIT} x its {size:,} bytes + {EXPANSION_SLACK >> 20} MiB): refused unread"
        )


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error type for every failure.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt, or
    holds objects the weights-only unpickler refuses (arbitrary classes, functions).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    check_expansion(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        text = str(e)
        # torch's message is a long paragraph; keep the part that says what went wrong.
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        detail = " ".join(detail.split())[:300] or type(e).__name__
        if "Unsupported global" in text:
            reason = "holds objects that weights_only loading refuses (save only tensors, dicts, lists, numbers, str, None)"
        else:
            reason = "unreadable (truncated or corrupt; was the save interrupted?)"
        raise CheckpointError(f"{path}: {reason}: {detail}") from e


# --------------------------------------------------------------------------- folders


def new_temp_folder(out: str | os.PathLike) -> Path:
    """An empty hidden folder beside ``out`` (same file system, so the final rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def rename_onto_new(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """``os.rename(tmp, out)`` that raises FileExistsError if anything is at ``out``.

    ``os.rename`` silently replaces an *empty* folder, so ``out`` is first created with
    ``os.mkdir``, which fails if anything appeared there; the rename then lands on this empty
    folder of ours, and fails (FileExistsError too) if someone put files in it in between.
    """
    os.mkdir(out)  # FileExistsError: something is there
    try:
        os.rename(tmp, out)
    except OSError as exc:
        try:
            os.rmdir(out)
        except OSError:
            pass  # someone else's files are in it now: theirs to keep
        raise FileExistsError(f"{out} changed while it was being replaced ({exc.strerror})") from None


# --------------------------------------------------------------------------- output folders we own
#
# An output folder (``toolkit shard``'s shard folder, ``toolkit index``'s index folder) is
# written to a temporary sibling (:func:`new_temp_folder`) and renamed into place when complete
# (:func:`move_into_place`). The rules, the same for every such folder:
#
# * ``overwrite`` replaces only an empty folder or a folder holding nothing but regular files
#   (no links, no sub-folders) with the names its writer writes, recognised by a marker file
#   the writer wrote (``_info.json``, ``meta.json``). Anything else is refused, in one line,
#   and left exactly as it is: a symbolic link, a file, an unreadable folder, a folder without
#   the marker, a folder with one foreign file in it.
# * The old folder is moved aside to a hidden sibling, checked again where it now lies (no one
#   else writes there, so what is checked is what is removed), put back on any failure, and
#   removed (our files, then the folder if that empties it) only once the new one is in place.
# * Whatever appeared at the output meanwhile is never replaced (:func:`rename_onto_new`).
# * An output that is, contains or lies inside the source folder is refused
#   (:func:`check_apart`): replacing it would delete the source, writing inside it would mix
#   the two.


def _default_brief(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclass(frozen=True)
class OwnedFolder:
    """What differs between the output folders this toolkit replaces: their names and words.

    The rules are the same for all (see "output folders we own" above); each writer (shards,
    gallery) defines one of these next to the files it writes.
    """

    what: str  # the folder's kind in messages, with its article: "a shard folder"
    writer: str  # who writes it: "`toolkit shard`"
    marker: str  # the file that says the writer wrote the folder: "_info.json"
    is_marker: Callable[[Path], bool]  # ``marker``'s content is the writer's (it parses, it has its keys)
    owns: Callable[[str], bool]  # the writer writes a file of this name (and only a regular file counts)
    writing: str  # for "<out> appeared while ...": "the shards were being written"
    previous: str  # for "... was kept in <old>": "the previous output"
    overwrite_hint: str = "--overwrite"  # for "already exists: pass ... to replace it"
    brief: Callable[[Sequence[str]], str] = _default_brief  # foreign names, shortened to one line

    def is_ours(self, path: Path) -> bool:
        """A file the writer writes: one of its names, a regular file, not a link."""
        return self.owns(path.name) and path.is_file() and not path.is_symlink()


def json_kind_is(kind: str) -> Callable[[Path], bool]:
    """An :attr:`OwnedFolder.is_marker` for writers whose marker is a JSON object with ``"kind": kind``."""
    def is_marker(path: Path) -> bool:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("kind") == kind

    return is_marker


def why_not_ours(folder: str | os.PathLike, kind: OwnedFolder) -> str | None:
    """Why ``folder`` is not ours to replace, or None: empty, or a ``kind`` folder holding only our files."""
    folder = Path(folder)
    if folder.is_symlink():
        return "is a symbolic link (give the folder it points to)"
    if not folder.is_dir():
        return "is not a folder"
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not names:
        return None
    if not kind.is_marker(folder / kind.marker):
        return f"is not {kind.what} (no {kind.marker} written by {kind.writer})"
    foreign = [n for n in names if not kind.is_ours(folder / n)]
    if foreign:
        return f"holds files {kind.writer} did not write ({kind.brief(foreign)})"
    return None


def check_replaceable(out: str | os.PathLike, kind: OwnedFolder, *, overwrite: bool,
                      shown: str | os.PathLike | None = None) -> None:
    """Refuse (:class:`DataError`, one line) to write ``out`` unless nothing is there or, with
    ``overwrite``, it is ours to replace (:func:`why_not_ours`). ``shown`` names ``out`` in the
    message (when checking a moved-aside copy). Call it before the work too: fail early."""
    if not os.path.lexists(out):
        return
    why = why_not_ours(out, kind)
    if why:
        raise DataError(f"{shown or out} exists and {why}: refusing to replace it")
    if not overwrite:
        raise DataError(f"{shown or out} already exists: pass {kind.overwrite_hint} to replace it")


def check_apart(src: str | os.PathLike, out: str | os.PathLike, *, what_src: str, advice: str,
                say_which: bool = True) -> None:
    """Refuse an output that is, contains or lies inside the source folder (real paths, symlinks
    resolved): replacing it would delete the source, writing inside it would mix the two.

    The message: ``<out> is inside the <what_src> <src>: <advice>`` (``is the``, ``contains
    the``); with ``say_which=False``, ``<out> is, contains or lies inside the <what_src> ...``.
    """
    s, o = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if o == s:
        where = "is the"
    elif o in s.parents:
        where = "contains the"
    elif s in o.parents:
        where = "is inside the"
    else:
        return
    if not say_which:
        where = "is, contains or lies inside the"
    raise DataError(f"{out} {where} {what_src} {src}: {advice}")


def move_into_place(tmp: str | os.PathLike, out: str | os.PathLike, kind: OwnedFolder, *, overwrite: bool,
                    check_old: Callable[[Path], None] | None = None) -> None:
    """Rename the finished folder ``tmp`` to ``out``, never replacing what is not ours.

    With ``overwrite`` the old output is moved aside, checked again where it now lies (and by
    ``check_old(moved_aside_path)``, which raises to refuse: e.g. "still the one that was
    read"), put back if it is not ours or on any failure, and removed only once the new one is
    in place. Whatever appeared at ``out`` meanwhile is never replaced: :class:`DataError`.
    """
    tmp, out = Path(tmp), Path(out)
    old = _move_aside(out, kind, check_old) if overwrite and os.path.lexists(out) else None
    try:
        try:
            rename_onto_new(tmp, out)
        except FileExistsError:
            raise DataError(f"{out} appeared while {kind.writing}: not replaced") from None
    except BaseException:
        if old is not None:
            _put_back(old, out, kind)
        raise
    if old is not None:
        _remove_ours(old, kind)


def _move_aside(out: Path, kind: OwnedFolder, check_old: Callable[[Path], None] | None) -> Path | None:
    """Rename the replaceable ``out`` to a hidden sibling; None if it vanished meanwhile."""
    check_replaceable(out, kind, overwrite=True)
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(out, old)
    except FileNotFoundError:
        return None
    try:
        check_replaceable(old, kind, overwrite=True, shown=out)
        if check_old is not None:
            check_old(old)
    except BaseException:
        _put_back(old, out, kind)
        raise
    return old


def _put_back(old: Path, out: Path, kind: OwnedFolder) -> None:
    try:
        os.rename(old, out)
    except OSError:
        raise DataError(f"{out} changed while {kind.writing}: its previous content is in {old}") from None


def _remove_ours(folder: Path, kind: OwnedFolder) -> None:
    """Delete the files the writer wrote in ``folder``, then the folder if that empties it."""
    try:
        for path in folder.iterdir():
            if kind.is_ours(path):
                path.unlink()
        folder.rmdir()
    except OSError as exc:
        # stacklevel 4: the caller of the function that called move_into_place (write_shards, ...)
        warnings.warn(f"{kind.previous} was kept in {folder}: {exc.strerror}", stacklevel=4)


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

