"""A searchable gallery: embed a set of images once, save an index folder, find the nearest ones.

``toolkit index`` (:func:`build_index`, :func:`add_to_index`) and ``toolkit search``
(:func:`search_images`, :func:`format_search`, :func:`write_search_grid`) use this module.

A *gallery* is either

* a shard folder (it has ``_info.json``): the given split(s) are embedded as evaluation does
  (:func:`toolkit.evaluation.embed_split`); an item's key is its shard key, its label the
  class name (``all_classes`` of the shard info when it has one, else ``classes``), its path
  the original image (the shard folder's ``manifest.csv``, joined to the recorded source);
* or a plain image folder: ``SRC/<class>/<image>`` (listed by
  :func:`toolkit.data.folder.list_image_folder`; the label is the class folder) and/or images
  directly in ``SRC`` (label empty). Images get the preprocessing the embedder's shards had
  (:func:`toolkit.inference.preprocess_params`), exactly as ``toolkit predict`` prepares
  them. An unreadable file is skipped and reported (:attr:`IndexInfo.skipped`), never
  dropped without a word.

The index folder (``OUT``)::

    OUT/index.faiss   the faiss index (toolkit.search.serialize: faiss's own format)
    OUT/vectors.npy   float32 (N, D): the embeddings, row i = position i, so images can be
                      added and the index rebuilt without embedding anything again
    OUT/items.csv     position, key, path, label (one row per vector, in position order)
    OUT/meta.json     kind, format_version, embedder {path (absolute), sha256},
                      preprocess {image_size, grayscale, format}, input_size, dim, count,
                      spec (the IndexSpec fields), gallery {type, location, split},
                      created, updated (UTC, ISO 8601)

It is written to a hidden temporary sibling and renamed into place when complete (also by
:func:`add_to_index`, which rewrites the whole folder): a half-written index is never left at
``OUT``. ``overwrite`` replaces only an empty folder or a folder holding nothing but these
four files with our ``meta.json``.

Every file of an index folder is untrusted input when it is loaded (:func:`load_index`):
``meta.json`` is type-checked, row counts and dimensions must agree across the four files,
``vectors.npy`` is read without pickles, and the recorded embedder is used only when it is a
plain local path whose sha256 still matches.

Images for the search grid: the query and gallery files are read from their paths; a shard
gallery item whose original file is gone is read from the shard tars by key (its
preprocessed PNG), when the recorded shard folder is a local path.
"""
from __future__ import annotations

import io
import json
import os
import re
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from toolkit import search as faiss_search
from toolkit.artifacts import Run, build_frozen_embedder, checked_preprocess, default_device, in_channels, open_run
from toolkit.data.folder import IMAGE_EXTENSIONS, list_image_folder
from toolkit.data.location import is_local_location, is_remote
from toolkit.data.shards import INFO_NAME, read_info
from toolkit.errors import DataError, one_line
from toolkit.evaluation import embed_split
from toolkit.files import (
    OwnedFolder, atomic_write, atomic_write_json, atomic_write_text, check_apart, check_replaceable, json_kind_is,
    move_into_place,
    new_temp_folder, sha256_file,
)
from toolkit.inference import embed_files, preprocess_params

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILES",
    "GalleryIndex",
    "IndexInfo",
    "add_to_index",
    "build_index",
    "format_index_info",
    "format_search",
    "load_index",
    "search_images",
    "write_search_grid",
]

KIND = "toolkit-gallery-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
ITEMS_FILE = "items.csv"
META_FILE = "meta.json"
INDEX_FILES = frozenset({INDEX_FILE, VECTORS_FILE, ITEMS_FILE, META_FILE})
ITEM_COLUMNS = ["position", "key", "path", "label"]
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FAISS_CLASS = {"flat": "IndexFlatL2", "ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}


# --------------------------------------------------------------------------- results


@dataclass
class IndexInfo:
    """What :func:`build_index` wrote (and what it could not read)."""

    path: Path  # the index folder
    count: int  # vectors in the index
    dim: int
    spec: faiss_search.IndexSpec
    embedder: str  # absolute path of the embedder file
    gallery: str  # the shard or image folder
    gallery_type: str  # "shards" or "images"
    split: str | None  # shard galleries: the split(s) embedded
    labels: dict[str, int] = field(default_factory=dict)  # {label: items}; "" = no label
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or what, reason): not indexed
    seconds: float = 0.0


def format_index_info(info: IndexInfo, *, max_skipped: int = 10) -> list[str]:
    """Lines for the terminal after :func:`build_index`."""
    what = f"{info.split} split(s) of shard folder" if info.gallery_type == "shards" else "image folder"
    named = {k: v for k, v in info.labels.items() if k}
    labels = f"{len(named)} labels" + (f" + {info.labels['']} unlabelled" if info.labels.get("") else "")
    lines = [
        f"indexed {info.count} images of {what} {info.gallery} ({labels}) into {info.path} "
        f"[{info.spec.kind}, {info.dim}-d] in {info.seconds:.1f} s",
        f"  embedder: {info.embedder}",
    ]
    if info.skipped:
        lines.append(f"  warning: {len(info.skipped)} not indexed (unreadable):")
        lines += [f"    {p}: {r}" for p, r in info.skipped[:max_skipped]]
        if len(info.skipped) > max_skipped:
            lines.append(f"    ... and {len(info.skipped) - max_skipped} more")
    return lines


# --------------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _brief(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_channels(run: Run, pre: dict, where) -> None:
    want = 1 if pre.get("grayscale", True) else 3
    have = in_channels(run.embedder.model)
    if want != have:
        raise DataError(
            f"{where}: images are {'grayscale' if want == 1 else 'RGB'} but the embedder {run.embedder_path} "
            f"takes {have}-channel input"
        )


# --------------------------------------------------------------------------- embedding files


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _top_level_images(root: Path) -> list[str]:
    """Image files directly in ``root`` (visible, by extension, following links), sorted."""
    names = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not _is_image_name(entry.name):
            continue
        try:
            if entry.is_file():
                names.append(entry.name)
        except OSError:
            continue
    return names


def _list_folder(root: Path) -> list[tuple[str, str]]:
    """(relative POSIX path, label) of the images of ``root``: class folders, then loose images (label "")."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    loose = _top_level_images(root)
    rows: list[tuple[str, str]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "class folders without images": an image gallery may have none
            manifest, _ = list_image_folder(root)
        rows = list(zip(manifest["path"].tolist(), manifest["label"].tolist()))
    except DataError:
        if not loose:
            raise DataError(f"{root}: no images (expected {root}/<class>/<image> or images directly in it)") from None
    return rows + [(name, "") for name in loose]


def _embed_shards(run: Run, model, shards: str, split, *, device, batch_size: int, num_workers: int):
    """Embed split(s) of a shard folder -> (items [(key, path, label)], float32 (N, D), skipped, split text)."""
    import pandas as pd

    info = read_info(shards)
    if split in (None, "all"):
        names = [n for n, sp in info.splits.items() if sp.num_samples > 0]
    else:
        names = [s.strip() for s in (split.split(",") if isinstance(split, str) else split) if s.strip()]
        for n in names:
            info.split(n, folder=shards)  # one line naming the splits there are
    if not names or not sum(info.splits[n].num_samples for n in names):
        raise DataError(f"{shards}: nothing to index (the splits {', '.join(names) or '(none)'} are empty)")
    classes = list(info.all_classes)
    pre = checked_preprocess(info.preprocess, shards)
    _check_channels(run, pre, shards)
    paths_by_key: dict[str, str] = {}
    manifest = Path(shards) / "manifest.csv"
    if not is_remote(shards) and manifest.is_file():
        try:
            table = pd.read_csv(manifest, usecols=["key", "path"], dtype=str, keep_default_na=False)
        except Exception as exc:  # noqa: BLE001 - a damaged side file costs the paths, not the index
            warnings.warn(f"{manifest}: unreadable ({one_line(exc)}); items get no paths", stacklevel=3)
        else:
            base = info.source or ""
            paths_by_key = {k: (os.path.join(base, p) if base and p else p) for k, p in zip(table["key"], table["path"])}
    keys: list[str] = []
    embs, labels = [], []
    skipped: list[tuple[str, str]] = []
    for name in names:
        expected = info.splits[name].num_samples
        if not expected:
            continue
        k, e, y = embed_split(model, shards=str(shards), split=name, rank=0, world_size=1, device=device,
                              input_size=run.embedder.config["input_size"], batch_size=batch_size, num_workers=num_workers)
        keys += k
        embs.append(e.numpy().astype(np.float32))
        labels += y.tolist()
        if len(k) < expected:
            skipped.append((f"{shards} ({name} split)", f"{expected - len(k)} of {expected} samples unreadable (see the warnings above)"))
    if not keys:
        raise DataError(f"{shards}: no sample of {', '.join(names)} could be read")
    if len(set(keys)) != len(keys):
        raise DataError(f"{shards}: the same sample key appears in more than one split")
    bad = sorted({y for y in labels if not 0 <= y < len(classes)})
    if bad:
        raise DataError(f"{shards}: class indices {bad[:5]} are beyond the {len(classes)} classes of {INFO_NAME}")
    vectors = np.concatenate(embs)
    order = np.argsort(np.asarray(keys), kind="stable")
    items = [(keys[i], paths_by_key.get(keys[i], ""), classes[labels[i]]) for i in order]
    return items, np.ascontiguousarray(vectors[order]), skipped, ",".join(names), pre


# --------------------------------------------------------------------------- writing an index folder



# What overwrite may replace: an empty folder or one holding nothing but the four files as
# regular files, with our meta.json (the rules: toolkit.files, "output folders").
INDEX_FOLDER = OwnedFolder(
    what="an index folder",
    writer="`toolkit index`",
    marker=META_FILE,
    is_marker=json_kind_is(KIND),
    owns=lambda name: name in INDEX_FILES,
    writing="the index was being written",
    previous="the previous index",
    overwrite_hint="overwrite (--overwrite)",
    brief=_brief,
)


def _still_the_one_read(out: Path, expect_meta: bytes | None):
    """``check_old`` for :func:`toolkit.files.move_into_place`: the index moved aside still has the
    ``meta.json`` that was read (``expect_meta``; None: no check), else nothing is replaced."""
    if expect_meta is None:
        return None

    def check(old: Path) -> None:
        if (old / META_FILE).read_bytes() != expect_meta:
            raise DataError(f"{out} was changed by someone else meanwhile: nothing added (run it again)")

    return check


def _write_folder(out: Path, *, meta: dict, items: list[tuple[str, str, str]], vectors: np.ndarray, index,
                  replace: bool, expect_meta: bytes | None = None) -> None:
    """Write the four files into a temporary sibling of ``out``, then move it into place."""
    import pandas as pd

    tmp = new_temp_folder(out)
    try:
        table = pd.DataFrame(items, columns=ITEM_COLUMNS[1:])
        table.insert(0, "position", np.arange(len(items), dtype=np.int64))
        atomic_write_text(tmp / ITEMS_FILE, table.to_csv(index=False))
        atomic_write(tmp / VECTORS_FILE, lambda f: np.save(f, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False))
        data = faiss_search.serialize(index)
        atomic_write(tmp / INDEX_FILE, lambda f: f.write(data))
        atomic_write_json(tmp / META_FILE, meta)
        # The old index is moved aside, checked again where it now lies (and, with expect_meta,
        # still the one that was read), removed only once the new one is in place, put back on any failure.
        move_into_place(tmp, out, INDEX_FOLDER, overwrite=replace, check_old=_still_the_one_read(out, expect_meta))
    except BaseException:
        for path in tmp.iterdir() if tmp.is_dir() else ():
            path.unlink()
        if tmp.is_dir():
            tmp.rmdir()
        raise


# --------------------------------------------------------------------------- build


def build_index(
    run,
    gallery: str | Path,
    out: str | Path,
    *,
    split: str | Sequence[str] = "all",
    spec: faiss_search.IndexSpec | None = None,
    shards: str | Path | None = None,
    device=None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> IndexInfo:
    """Embed ``gallery`` (shard folder or image folder) with ``run``'s embedder; save an index folder ``out``.

    ``split``: shard galleries only: ``"all"`` (every non-empty split), a name, a
    comma-separated list or a list of names. ``shards``: image galleries only: the shard
    folder whose preprocessing to use (default: the one the run was trained on).
    ``overwrite`` replaces only an index folder this module wrote (or an empty folder).
    """
    t0 = time.monotonic()
    spec = spec or faiss_search.IndexSpec()
    if not isinstance(spec, faiss_search.IndexSpec):
        raise DataError(f"spec must be an IndexSpec, got {type(spec).__name__}")
    out = Path(out)
    check_replaceable(out, INDEX_FOLDER, overwrite=overwrite)  # fail before the embedding, not after
    run = open_run(run)
    dev = default_device(device)
    model = build_frozen_embedder(run.embedder, dev)
    input_size = run.embedder.config["input_size"]
    is_shards = is_remote(gallery) or (Path(gallery) / INFO_NAME).is_file()
    if not is_remote(gallery):
        check_apart(Path(gallery), out, what_src="gallery", advice="write the index somewhere else", say_which=False)
    if is_shards:
        location = str(gallery) if is_remote(gallery) else os.path.abspath(gallery)
        items, vectors, skipped, split_text, pre = _embed_shards(
            run, model, location, split, device=dev, batch_size=batch_size, num_workers=num_workers)
        gallery_meta = {"type": "shards", "location": location, "split": split_text}
    else:
        root = Path(gallery)
        rows = _list_folder(root)
        pre = preprocess_params(run, shards)
        _check_channels(run, pre, root)
        paths = [os.path.abspath(root / rel) for rel, _ in rows]
        done, vectors, bad = embed_files(model, paths, pre, input_size=input_size, device=dev, batch_size=batch_size,
                                          progress=progress, desc=f"index {root.name}")
        items = [(rows[i][0], paths[i], rows[i][1]) for i in done]
        skipped = [(paths[i], reason) for i, reason in bad]
        split_text = None
        gallery_meta = {"type": "images", "location": os.path.abspath(root), "split": None}
        if not items:
            raise DataError(f"{root}: none of its {len(rows)} images could be read (first: {skipped[0][0]}: {skipped[0][1]})")
    index = faiss_search.build_index(vectors, spec)
    created = _now()
    meta = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "embedder": {"path": str(Path(run.embedder_path).resolve()), "sha256": sha256_file(Path(run.embedder_path))},
        "preprocess": {"image_size": pre.get("image_size"), "grayscale": bool(pre.get("grayscale", True)), "format": "png"},
        "input_size": int(input_size),
        "dim": int(vectors.shape[1]),
        "count": len(items),
        "spec": asdict(spec),
        "gallery": gallery_meta,
        "created": created,
        "updated": created,
    }
    _write_folder(out, meta=meta, items=items, vectors=vectors, index=index, replace=overwrite)
    return IndexInfo(
        path=out, count=len(items), dim=int(vectors.shape[1]), spec=spec, embedder=meta["embedder"]["path"],
        gallery=gallery_meta["location"], gallery_type=gallery_meta["type"], split=split_text,
        labels=dict(sorted(Counter(label for _, _, label in items).items())), skipped=skipped,
        seconds=time.monotonic() - t0,
    )


# --------------------------------------------------------------------------- load


@dataclass
class GalleryIndex:
    """A loaded, checked index folder. ``items[i]`` describes vector ``i``."""

    path: Path
    meta: dict
    items: list[dict]  # {"position", "key", "path", "label"} per vector, in position order
    vectors: np.ndarray  # float32 (N, D)
    index: Any  # the faiss index (CPU)
    spec: faiss_search.IndexSpec
    meta_bytes: bytes = field(default=b"", repr=False)  # meta.json as read (add_to_index checks it is unchanged)

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def labels(self) -> set[str]:
        """The non-empty labels of the gallery."""
        return {it["label"] for it in self.items if it["label"]}

    def search_arrays(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances (Q, k) float32, positions (Q, k) int64; -1 where fewer than k exist)."""
        d2, ids = faiss_search.search(self.index, queries, k)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def search(self, queries, k: int = 5) -> list[list[dict]]:
        """The ``k`` nearest items of each query embedding (Q, D), nearest first:
        ``[{"position", "key", "path", "label", "distance"} ...]`` per query."""
        dist, ids = self.search_arrays(queries, k)
        return [
            [{**self.items[int(j)], "distance": float(d)} for d, j in zip(drow, jrow) if j >= 0]
            for drow, jrow in zip(dist, ids)
        ]


def _bad(where, what: str) -> DataError:
    return DataError(f"{where}: {what} (not an index written by `toolkit index`, or damaged)")


def _is_int(x: Any, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _check_meta(meta: Any, where: Path) -> dict:
    """``meta`` if every entry the code relies on has the right type, else a one-line DataError."""
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise _bad(where, f"'kind' is not {KIND!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{where}: index format version {str(meta.get('format_version'))[:20]!r} is not {FORMAT_VERSION} (rebuild the index with this toolkit)")
    emb = meta.get("embedder")
    if not (isinstance(emb, dict) and isinstance(emb.get("path"), str) and isinstance(emb.get("sha256"), str)
            and _SHA256.fullmatch(emb["sha256"])):
        raise _bad(where, "'embedder' must be {path: str, sha256: 64 hex digits}")
    checked_preprocess(meta.get("preprocess"), where)
    for key, lo in (("dim", 1), ("count", 0), ("input_size", 1)):
        if not _is_int(meta.get(key), lo):
            raise _bad(where, f"{key!r} must be an int >= {lo}, got {str(meta.get(key))[:40]!r}")
    spec = meta.get("spec")
    names = {f.name for f in fields(faiss_search.IndexSpec)}
    if not isinstance(spec, dict) or set(spec) - names or "kind" not in spec:
        raise _bad(where, f"'spec' must be an object with keys among {', '.join(sorted(names))}")
    gallery = meta.get("gallery")
    if gallery is not None and not (isinstance(gallery, dict) and gallery.get("type") in ("shards", "images")
                                    and isinstance(gallery.get("location"), str)):
        raise _bad(where, "'gallery' must be {type: shards|images, location: str}")
    for key in ("created", "updated"):
        if key in meta and not isinstance(meta[key], str):
            raise _bad(where, f"{key!r} must be a string")
    return meta


def _read_items(path: Path, count: int) -> list[dict]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is one line
        raise _bad(path, f"unreadable CSV ({one_line(exc, 120)})") from None
    if list(table.columns) != ITEM_COLUMNS:
        raise _bad(path, f"columns must be {', '.join(ITEM_COLUMNS)}, got {_brief([str(c) for c in table.columns])}")
    if len(table) != count:
        raise DataError(f"{path}: {len(table)} rows, but meta.json records {count} vectors (damaged index: rebuild it)")
    if table["position"].tolist() != [str(i) for i in range(count)]:
        raise _bad(path, "positions must be 0, 1, 2 ... in order")
    return [{"position": i, "key": k, "path": p, "label": lab}
            for i, (k, p, lab) in enumerate(zip(table["key"], table["path"], table["label"]))]


def _read_vectors(path: Path, *, count: int, dim: int) -> np.ndarray:
    try:
        vectors = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - ValueError for pickles, others for damage
        raise _bad(path, f"not a readable .npy array ({one_line(exc, 120)})") from None
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.ndim != 2:
        raise _bad(path, f"expected a float32 (N, D) array, got {getattr(vectors, 'dtype', type(vectors).__name__)} of shape {getattr(vectors, 'shape', '?')}")
    if vectors.shape != (count, dim):
        raise DataError(f"{path}: holds {vectors.shape[0]} vectors of dimension {vectors.shape[1]}, but meta.json records {count} of {dim} (damaged index: rebuild it)")
    if not np.isfinite(vectors).all():
        raise _bad(path, "holds NaN or infinite values")
    return np.ascontiguousarray(vectors)


def load_index(index_dir: str | Path) -> GalleryIndex:
    """Load and check an index folder (see the module docstring); a one-line DataError names what is wrong."""
    folder = Path(index_dir)
    if not folder.is_dir():
        raise DataError(f"index folder not found: {folder}")
    missing = [n for n in sorted(INDEX_FILES) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: not an index folder (missing {', '.join(missing)}; build one with `toolkit index`)")
    meta_path = folder / META_FILE
    meta_bytes = meta_path.read_bytes()
    try:
        meta = json.loads(meta_bytes)
    except ValueError as exc:
        raise _bad(meta_path, f"not valid JSON ({one_line(exc, 120)})") from None
    meta = _check_meta(meta, meta_path)
    try:
        spec = faiss_search.IndexSpec(**meta["spec"])
    except (DataError, TypeError) as exc:
        raise _bad(meta_path, f"bad 'spec' ({exc})") from None
    count, dim = meta["count"], meta["dim"]
    items = _read_items(folder / ITEMS_FILE, count)
    vectors = _read_vectors(folder / VECTORS_FILE, count=count, dim=dim)
    index = faiss_search.deserialize((folder / INDEX_FILE).read_bytes(), dim=dim, ntotal=count, where=folder / INDEX_FILE)
    if type(index).__name__ != _FAISS_CLASS[spec.kind]:
        raise _bad(folder / INDEX_FILE, f"holds a {type(index).__name__}, but meta.json says {spec.kind} ({_FAISS_CLASS[spec.kind]})")
    if spec.kind == "ivf":
        index.nprobe = min(spec.nprobe, index.nlist)
    elif spec.kind == "hnsw":
        index.hnsw.efSearch = spec.ef_search
    return GalleryIndex(path=folder, meta=meta, items=items, vectors=vectors, index=index, spec=spec, meta_bytes=meta_bytes)


def _recorded_run(gi: GalleryIndex, run) -> Run:
    """The embedder to embed new images with: ``run`` if given, else the one meta.json records (checked)."""
    where = gi.path / META_FILE
    if run is not None:
        opened = open_run(run)
    else:
        path = gi.meta["embedder"]["path"]
        if not is_local_location(path):
            raise DataError(f"{where} names the embedder {path[:120]!r}, which is not a local path: pass run=<the embedder> yourself")
        if not Path(path).is_file():
            raise DataError(f"{where}: the embedder it was built with is gone: {path} (pass run=<the embedder>)")
        if sha256_file(Path(path)) != gi.meta["embedder"]["sha256"]:
            raise DataError(f"{path} changed since the index was built (sha256 differs): rebuild the index, or pass run=<embedder> to use it anyway")
        opened = open_run(path)
    dim = int(opened.embedder.config["embedding_dim"])
    if dim != gi.dim:
        raise DataError(f"{opened.embedder_path} embeds into {dim} dimensions, the index {gi.path} holds {gi.dim}-d vectors")
    _check_channels(opened, gi.meta["preprocess"], gi.path)
    return opened


# --------------------------------------------------------------------------- add


def _as_image_list(images_or_folder) -> tuple[list[tuple[str, str, str]], str | None]:
    """[(key, absolute path, label)] for a folder (like build_index's) or a list of image files."""
    if isinstance(images_or_folder, (str, os.PathLike)) and Path(images_or_folder).is_dir():
        root = Path(images_or_folder)
        if (root / INFO_NAME).is_file():
            raise DataError(f"{root} is a shard folder: adding shard galleries is not supported (build a new index of it)")
        return [(rel, os.path.abspath(root / rel), label) for rel, label in _list_folder(root)], str(root)
    if isinstance(images_or_folder, (str, os.PathLike)):
        images_or_folder = [images_or_folder]
    out = []
    for p in images_or_folder:
        ap = os.path.abspath(p)
        out.append((ap, ap, ""))
    return out, None


def add_to_index(
    index_dir: str | Path,
    images_or_folder,
    *,
    run=None,
    labels: Sequence[str] | Mapping[str, str] | None = None,
    device=None,
    batch_size: int = 256,
    progress: bool = False,
    skipped: list | None = None,
) -> int:
    """Embed new images and append them to an index folder; return how many were added.

    ``images_or_folder``: an image folder (as :func:`build_index` lists it; key = path
    relative to it, label = class folder) or image files (key = absolute path, label
    ``labels[i]`` / ``labels[path]`` when given, else empty). Only these are embedded, with
    the embedder meta.json records (its sha256 must still match; ``run`` overrides it).
    Files already in the index (same absolute path) and unreadable files are not added:
    each is appended to ``skipped`` as ``(path, reason)`` when a list is given, else one
    warning says how many. The folder is rewritten atomically (vectors of the old images are
    kept byte for byte; ivf adds to the trained index, without retraining).
    """
    gi = load_index(index_dir)
    wanted, _ = _as_image_list(images_or_folder)
    if labels is not None:
        if isinstance(labels, Mapping):
            wanted = [(k, p, str(labels.get(p, labels.get(k, lab)))) for k, p, lab in wanted]
        else:
            labels = list(labels)
            if len(labels) != len(wanted):
                raise DataError(f"{len(labels)} labels given for {len(wanted)} images")
            wanted = [(k, p, str(lab)) for (k, p, _), lab in zip(wanted, labels)]
    known = {it["path"] for it in gi.items if it["path"]}
    dropped: list[tuple[str, str]] = []
    fresh, seen = [], set()
    for k, p, lab in wanted:
        if p in known or p in seen:
            dropped.append((p, "already in the index"))
        else:
            fresh.append((k, p, lab))
            seen.add(p)
    added = 0
    if fresh:
        opened = _recorded_run(gi, run)
        dev = default_device(device)
        model = build_frozen_embedder(opened.embedder, dev)
        done, new_vectors, bad = embed_files(
            model, [p for _, p, _ in fresh], gi.meta["preprocess"], input_size=int(opened.embedder.config["input_size"]),
            device=dev, batch_size=batch_size, progress=progress, desc=f"add to {gi.path.name}")
        dropped += [(fresh[i][1], reason) for i, reason in bad]
        if done:
            new_items = [fresh[i] for i in done]
            items = [(it["key"], it["path"], it["label"]) for it in gi.items] + new_items
            vectors = np.concatenate([gi.vectors, new_vectors.astype(np.float32)])
            index = gi.index
            faiss_search.add(index, new_vectors)  # flat, hnsw and (trained) ivf alike
            meta = dict(gi.meta, count=len(items), updated=_now())
            if run is not None and sha256_file(Path(opened.embedder_path)) == gi.meta["embedder"]["sha256"]:
                # the same embedder file, moved: record where it is now (a different one is an
                # override for this call only; the index stays the recorded embedder's)
                meta["embedder"] = {"path": str(Path(opened.embedder_path).resolve()), "sha256": gi.meta["embedder"]["sha256"]}
            _write_folder(gi.path, meta=meta, items=items, vectors=vectors, index=index, replace=True, expect_meta=gi.meta_bytes)
            added = len(new_items)
    if skipped is not None:
        skipped.extend(dropped)
    elif dropped:
        warnings.warn(f"{len(dropped)} image(s) not added: " + "; ".join(f"{p}: {r}" for p, r in dropped[:5])
                      + (f"; ... ({len(dropped)} in all)" if len(dropped) > 5 else ""), stacklevel=2)
    return added


# --------------------------------------------------------------------------- search


def search_images(
    index_dir: str | Path | GalleryIndex,
    images: Sequence[str | Path],
    *,
    k: int = 5,
    run=None,
    device=None,
    batch_size: int = 256,
) -> list[dict]:
    """The ``k`` nearest gallery items of each image file, in input order.

    ``{"path", "neighbours": [{"path", "label", "key", "distance"} ...]}`` (Euclidean
    distance, nearest first), or ``{"path", "error"}`` for a missing or unreadable file
    (the others are still answered). Queries get the gallery's preprocessing and the
    embedder meta.json records (sha256 checked; ``run`` overrides).
    """
    k = int(k)
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    gi = index_dir if isinstance(index_dir, GalleryIndex) else load_index(index_dir)
    opened = _recorded_run(gi, run)
    dev = default_device(device)
    model = build_frozen_embedder(opened.embedder, dev)
    paths = [str(p) for p in images]
    done, emb, bad = embed_files(model, paths, gi.meta["preprocess"], input_size=int(opened.embedder.config["input_size"]),
                                  device=dev, batch_size=batch_size)
    out: list[dict] = [{"path": p} for p in paths]
    for i, reason in bad:
        out[i]["error"] = reason
    for i, neighbours in zip(done, gi.search(emb, k) if done else []):
        out[i]["neighbours"] = [{"path": n["path"], "label": n["label"], "key": n["key"], "distance": n["distance"]}
                                for n in neighbours]
    return out


def format_search(results: Iterable[dict]) -> list[str]:
    """Terminal lines: the query path, then ``  RANK<TAB>DISTANCE<TAB>LABEL<TAB>PATH`` per neighbour
    (``-`` for an empty label, the key when an item has no path), or ``  error: REASON``."""
    lines = []
    for r in results:
        lines.append(str(r["path"]))
        if "error" in r:
            lines.append(f"  error: {r['error']}")
            continue
        for rank, n in enumerate(r.get("neighbours", []), 1):
            lines.append(f"  {rank}\t{n['distance']:.4f}\t{n['label'] or '-'}\t{n['path'] or n['key']}")
    return lines


# --------------------------------------------------------------------------- the grid


def _display(path: str, thumb: int):
    """A file as a small uint8 array for imshow (grey (H, W) or RGB (H, W, 3)), or None if unreadable."""
    from PIL import Image, ImageOps

    try:
        if not path or not os.path.isfile(path):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                grey = im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
                im = im.convert("L" if grey else "RGB")
                im.thumbnail((thumb, thumb))
                return np.array(im)
    except Exception:  # noqa: BLE001 - an unreadable picture is shown as a blank, not an error
        return None


def _shard_pictures(gi: GalleryIndex, keys: set[str], thumb: int) -> dict[str, np.ndarray]:
    """{key: picture} read from the recorded (local) shard folder's tars, for items whose file is gone."""
    from PIL import Image

    from toolkit.data.tario import iter_tar

    gallery = gi.meta.get("gallery") or {}
    location = gallery.get("location")
    if not keys or gallery.get("type") != "shards" or not is_local_location(location) or not Path(location).is_dir():
        return {}
    try:
        info = read_info(location)
    except DataError:
        return {}
    found: dict[str, np.ndarray] = {}
    wanted = set(keys)

    def select(name: str) -> bool:
        stem, _, ext = name.partition(".")
        return ext == "png" and stem in wanted

    for split in info.splits.values():
        for name in split.filenames:
            if not wanted:
                return found
            try:
                with open(Path(location) / name, "rb") as f:
                    for member, data in iter_tar(f, select):
                        key = member.partition(".")[0]
                        with Image.open(io.BytesIO(data)) as im:
                            im = im.convert("L" if im.mode == "L" else "RGB")
                            im.thumbnail((thumb, thumb))
                            found[key] = np.array(im)
                        wanted.discard(key)
            except Exception:  # noqa: BLE001 - a damaged shard costs pictures, not the grid
                continue
    return found


def _query_label(r: dict, i: int, query_labels, labels: set[str]) -> str | None:
    if query_labels is not None:
        if isinstance(query_labels, Mapping):
            lab = query_labels.get(r["path"])
        else:
            lab = query_labels[i] if i < len(query_labels) else None
        return str(lab) if lab is not None and str(lab) else None
    parent = Path(r["path"]).parent.name
    return parent if parent in labels else None


def write_search_grid(
    results: Sequence[dict],
    png: str | Path,
    *,
    index_dir: str | Path | GalleryIndex,
    query_labels: Sequence[str | None] | Mapping[str, str] | None = None,
    thumb: int = 96,
    cell_inches: float = 1.5,
    dpi: int = 100,
) -> Path:
    """A PNG grid of :func:`search_images`'s ``results``: one row per query, the query then its neighbours.

    Each neighbour is titled with its label and distance and framed green when its label is
    the query's, red otherwise (grey when the query's label is unknown). The query's label is
    ``query_labels`` (a list in results order, or {path: label}) when given, else the name of
    the query's parent folder if that is a label of the gallery. Unreadable pictures are left
    blank. Written atomically; returns the path. Size: (1 + k) × rows cells of ``cell_inches``.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    gi = index_dir if isinstance(index_dir, GalleryIndex) else load_index(index_dir)
    results = list(results)
    if not results:
        raise DataError("no search results to draw")
    k = max([len(r.get("neighbours", [])) for r in results] + [1])
    cols, rows = 1 + k, len(results)
    pictures = {}
    missing_keys = set()
    for r in results:
        for n in r.get("neighbours", []):
            pic = _display(n["path"], thumb)
            if pic is None:
                missing_keys.add(n["key"])
            pictures[(n["path"], n["key"])] = pic
    from_shards = _shard_pictures(gi, missing_keys, thumb)
    labels = gi.labels

    fig = Figure(figsize=(cols * cell_inches, rows * (cell_inches + 0.25)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, r in enumerate(results):
        qlab = _query_label(r, i, query_labels, labels)
        ax = axes[i][0]
        _draw(ax, _display(r["path"], thumb), colour="black", width=2)
        title = Path(r["path"]).name[:18]
        ax.set_title(f"query: {title}" + (f"\n[{qlab}]" if qlab else "\n"), fontsize=7)
        if "error" in r:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        neighbours = r.get("neighbours", [])
        for j in range(k):
            ax = axes[i][1 + j]
            if j >= len(neighbours):
                ax.axis("off")
                continue
            n = neighbours[j]
            pic = pictures.get((n["path"], n["key"]))
            if pic is None:
                pic = from_shards.get(n["key"])
            colour = "grey" if qlab is None else ("green" if n["label"] == qlab else "red")
            _draw(ax, pic, colour=colour, width=4)
            ax.set_title(f"{(n['label'] or '-')[:16]}\n{n['distance']:.3f}", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    return atomic_write(png, lambda f: f.write(data))


def _draw(ax, pic, *, colour: str, width: float) -> None:
    if pic is None:
        ax.imshow(np.full((8, 8), 255, np.uint8), cmap="gray", vmin=0, vmax=255)
    elif pic.ndim == 2:
        ax.imshow(pic, cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(pic)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)
