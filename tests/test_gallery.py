"""toolkit index / search, library side: building, loading (untrusted), adding, searching, the grid."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from classify_helpers import make_separable_folder, shard, shared_embed_run
from toolkit import gallery
from toolkit.data.shards import read_info
from toolkit.errors import DataError
from toolkit.gallery import (
    add_to_index, build_index, format_index_info, format_search, load_index, search_images, write_search_grid,
)
from toolkit.search import IndexSpec


def original_paths(shards) -> dict[str, str]:
    """{shard key: original image path} of every sample of a shard folder."""
    info = read_info(shards)
    manifest = pd.read_csv(shards / "manifest.csv")
    return {k: f"{info.source}/{p}" for k, p in zip(manifest["key"], manifest["path"])}


def one_line_error(fn, match: str) -> str:
    with pytest.raises(DataError, match=match) as exc:
        fn()
    text = str(exc.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared_embed_run(tmp_path_factory)


@pytest.fixture(scope="module")
def small_index(base, tmp_path_factory):
    """The val split of the shared shards, indexed once (24 images); tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("gallery") / "val-index"
    build_index(base["embed"], base["shards"], out, split="val", device="cpu", progress=False)
    return out


def copy_of(index_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(index_dir, dst)
    return dst


class CountingModel(torch.nn.Module):
    """Wraps the embedder and counts the images it embeds."""

    def __init__(self, model, counter):
        super().__init__()
        self.model, self.counter = model, counter

    def forward(self, x):
        self.counter.append(x.shape[0])
        return self.model(x)


def count_embedded(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = gallery.build_frozen_embedder
    monkeypatch.setattr(gallery, "build_frozen_embedder", lambda saved, dev=None: CountingModel(real(saved, dev), calls))
    return calls


# --------------------------------------------------------------------------- shard galleries


def test_shard_gallery_index_layout_and_self_search(base, tmp_path):
    out = tmp_path / "index"
    info = build_index(base["embed"], base["shards"], out, device="cpu", progress=False)
    assert info.count == 96 and info.dim == 32 and info.gallery_type == "shards" and info.skipped == []
    assert info.labels == {"down": 24, "left": 24, "right": 24, "up": 24}
    assert sorted(p.name for p in out.iterdir()) == ["index.faiss", "items.csv", "meta.json", "vectors.npy"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    lines = format_index_info(info)
    assert "indexed 96 images" in lines[0] and "flat, 32-d" in lines[0]

    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 96 and meta["dim"] == 32 and meta["spec"]["kind"] == "flat"
    assert meta["embedder"]["path"] == str(base["embed"].resolve() / "best_embedder.pt")
    assert meta["preprocess"] == {"image_size": 16, "grayscale": True, "format": "png"}
    assert meta["gallery"]["type"] == "shards" and meta["gallery"]["split"] == "train,val"
    items = pd.read_csv(out / "items.csv", dtype=str, keep_default_na=False)
    assert list(items.columns) == ["position", "key", "path", "label"]
    paths = original_paths(base["shards"])
    assert items["path"].tolist() == [paths[k] for k in items["key"]]  # paths from manifest.csv, by key
    vectors = np.load(out / "vectors.npy")
    assert vectors.dtype == np.float32 and vectors.shape == (96, 32)

    # an indexed image finds itself first, at distance ~0; neighbours nearest first
    key = items["key"][10]
    [answer] = search_images(out, [paths[key]], k=4, device="cpu")
    first = answer["neighbours"][0]
    assert first["key"] == key and first["path"] == paths[key] and first["distance"] < 1e-3
    assert first["label"] == items["label"][10]
    distances = [n["distance"] for n in answer["neighbours"]]
    assert distances == sorted(distances) and len(distances) == 4
    lines = format_search([answer])
    assert lines[0] == paths[key] and lines[1].startswith("  1\t0.0") and lines[1].endswith(paths[key])

    # the GalleryIndex answers embeddings directly, the same way
    gi = load_index(out)
    [hits] = gi.search(vectors[10:11], k=2)
    assert hits[0]["position"] == 10 and hits[0]["distance"] < 1e-4


def test_one_split_and_approximate_kinds(base, small_index, tmp_path):
    gi = load_index(small_index)
    assert gi.count == 24 and gi.meta["gallery"]["split"] == "val"
    for spec in (IndexSpec(kind="hnsw", hnsw_m=8), IndexSpec(kind="ivf", nlist=2, nprobe=2)):
        out = tmp_path / spec.kind
        build_index(base["embed"], base["shards"], out, split="val", spec=spec, device="cpu", progress=False)
        loaded = load_index(out)
        assert type(loaded.index).__name__ == {"hnsw": "IndexHNSWFlat", "ivf": "IndexIVFFlat"}[spec.kind]
        [hits] = loaded.search(loaded.vectors[3:4], k=1)
        assert hits[0]["position"] == 3
    one_line_error(lambda: build_index(base["embed"], base["shards"], tmp_path / "x", split="test", progress=False),
                   "no split 'test'")


def test_shard_pictures_are_read_from_the_tars_when_originals_are_gone(base, tmp_path):
    images = make_separable_folder(tmp_path / "images", per_class=3, seed=5)
    shards = shard(images, tmp_path / "shards", val_fraction=0.34)
    shutil.rmtree(images)
    out = tmp_path / "index"
    build_index(base["embed"], shards, out, device="cpu", progress=False)
    gi = load_index(out)
    keys = {it["key"] for it in gi.items}
    pictures = gallery._shard_pictures(gi, keys, 32)
    assert set(pictures) == keys and all(p.shape == (16, 16) for p in pictures.values())


# --------------------------------------------------------------------------- image folders, adding


def test_image_folder_gallery_skips_unreadable_and_add_embeds_only_new_images(base, tmp_path, monkeypatch):
    src = make_separable_folder(tmp_path / "gallery", per_class=4, seed=1)
    (src / "up" / "broken.png").write_text("not an image")
    shutil.copy(src / "left" / "img_000.png", src / "loose.png")  # directly in the folder: no label
    out = tmp_path / "index"
    info = build_index(base["embed"], src, out, device="cpu", progress=False)
    assert info.gallery_type == "images" and info.count == 17
    assert info.labels == {"": 1, "down": 4, "left": 4, "right": 4, "up": 4}
    assert [p for p, _ in info.skipped] == [str(src / "up" / "broken.png")]
    assert "not a readable image" in info.skipped[0][1]
    assert "1 not indexed" in "\n".join(format_index_info(info))
    items = pd.read_csv(out / "items.csv", dtype=str, keep_default_na=False)
    assert "up/broken.png" not in set(items["key"]) and items["label"][items["key"] == "loose.png"].tolist() == [""]

    query = str(src / "right" / "img_002.png")
    [answer] = search_images(out, [query], k=3, device="cpu")
    assert answer["neighbours"][0]["path"] == query and answer["neighbours"][0]["distance"] < 1e-3

    old_vectors = (out / "vectors.npy").read_bytes()
    old_items = (out / "items.csv").read_text()
    new = make_separable_folder(tmp_path / "new", per_class=1, seed=7)
    new_files = sorted(str(p) for p in new.rglob("*.png"))
    calls = count_embedded(monkeypatch)
    skipped: list = []
    added = add_to_index(out, [*new_files, query, str(tmp_path / "missing.png")], labels=None, device="cpu", skipped=skipped)
    assert added == 4 and sum(calls) == 4  # only the new images went through the embedder
    assert skipped == [(query, "already in the index"), (str(tmp_path / "missing.png"), "no such file")]
    gi = load_index(out)
    assert gi.count == 21 and [it["path"] for it in gi.items[17:]] == new_files
    old = np.load(io.BytesIO(old_vectors))
    assert old.tobytes() == gi.vectors[:17].tobytes()  # old vectors byte for byte
    assert (out / "items.csv").read_text().startswith(old_items)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # the new image is found, first, at distance ~0
    [answer] = search_images(out, [new_files[2]], k=2, device="cpu")
    assert answer["neighbours"][0]["path"] == new_files[2] and answer["neighbours"][0]["distance"] < 1e-3

    # a folder adds with class labels; ivf / hnsw indexes take additions too
    for spec in (IndexSpec(kind="ivf", nlist=2), IndexSpec(kind="hnsw", hnsw_m=8)):
        d = tmp_path / f"index-{spec.kind}"
        build_index(base["embed"], src, d, spec=spec, device="cpu", progress=False)
        assert add_to_index(d, new, device="cpu", skipped=[]) == 4
        gi = load_index(d)
        assert gi.count == 21 and {it["label"] for it in gi.items[17:]} == {"down", "left", "right", "up"}
        [answer] = search_images(gi, [new_files[0]], k=1, device="cpu")
        assert answer["neighbours"][0]["path"] == new_files[0]


def test_changed_embedder_is_refused_unless_run_is_given(base, tmp_path):
    emb = tmp_path / "run" / "model.pt"
    emb.parent.mkdir()
    shutil.copy(base["embed"] / "best_embedder.pt", emb)
    out = tmp_path / "index"
    build_index(emb, base["shards"], out, split="val", device="cpu", progress=False)
    new = make_separable_folder(tmp_path / "new", per_class=1, seed=3)
    files = sorted(str(p) for p in new.rglob("*.png"))
    with open(emb, "ab") as f:  # same weights, different bytes: the sha256 no longer matches
        f.write(b"\0")
    one_line_error(lambda: add_to_index(out, files[:1], device="cpu"), "changed since the index was built")
    one_line_error(lambda: search_images(out, files[:1], device="cpu"), "changed since the index was built")
    # run= overrides for this call; a different file is not recorded as the index's embedder
    assert add_to_index(out, files[:1], run=emb, device="cpu") == 1
    one_line_error(lambda: search_images(out, files[:1], device="cpu"), "changed since the index was built")
    emb.unlink()
    one_line_error(lambda: search_images(out, files[:1], device="cpu"), "is gone")
    assert search_images(out, files[:1], run=base["embed"], device="cpu")[0]["neighbours"][0]["path"] == files[0]
    # the same embedder found elsewhere (same sha256) is recorded where it is now
    assert add_to_index(out, files[1:2], run=base["embed"], device="cpu") == 1
    assert load_index(out).meta["embedder"]["path"] == str((base["embed"] / "best_embedder.pt").resolve())
    assert search_images(out, files[1:2], device="cpu")[0]["neighbours"][0]["path"] == files[1]


# --------------------------------------------------------------------------- untrusted index folders


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__")
            meta[outer][inner] = value
        else:
            meta[key] = value
    (folder / "meta.json").write_text(json.dumps(meta))


def test_tampered_index_folders_give_one_line_errors(small_index, tmp_path):
    cases = {
        "not valid JSON": lambda d: (d / "meta.json").write_text("{"),
        "'kind' is not": lambda d: _edit_meta(d, kind="something"),
        "'dim' must be an int": lambda d: _edit_meta(d, dim="32"),
        "'count' must be an int": lambda d: _edit_meta(d, count=True),
        "'spec' must be an object": lambda d: _edit_meta(d, spec={"kind": "flat", "evil": 1}),
        "bad 'spec'": lambda d: _edit_meta(d, spec__kind="lsh"),
        "bad preprocessing record": lambda d: _edit_meta(d, preprocess={"image_size": 10**9}),
        "64 hex digits": lambda d: _edit_meta(d, embedder__sha256="abc"),
        "23 rows, but meta.json records 24": lambda d: (d / "items.csv").write_text(
            "\n".join((d / "items.csv").read_text().splitlines()[:-1]) + "\n"),
        "columns must be": lambda d: (d / "items.csv").write_text("a,b\n1,2\n"),
        "holds 23 vectors": lambda d: np.save(d / "vectors.npy", np.load(d / "vectors.npy")[:-1]),
        "not a readable .npy": lambda d: np.save(d / "vectors.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "expected a float32": lambda d: np.save(d / "vectors.npy", np.load(d / "vectors.npy").astype(np.float64)),
        "not a readable faiss index": lambda d: (d / "index.faiss").write_bytes(b"garbage"),
        "missing index.faiss": lambda d: (d / "index.faiss").unlink(),
    }
    for i, (match, damage) in enumerate(cases.items()):
        d = tmp_path / f"case{i}"
        shutil.copytree(small_index, d)
        damage(d)
        one_line_error(lambda: load_index(d), match)
    # a count consistent everywhere but the index: faiss's ntotal is checked too
    d = tmp_path / "ntotal"
    shutil.copytree(small_index, d)
    _edit_meta(d, count=23)
    np.save(d / "vectors.npy", np.load(d / "vectors.npy")[:-1])
    (d / "items.csv").write_text("\n".join((d / "items.csv").read_text().splitlines()[:-1]) + "\n")
    one_line_error(lambda: load_index(d), "the index holds 24 vectors")
    # a recorded embedder that is not a plain local path is never opened
    for location in ("pipe:cat /etc/passwd", "https://example.com/model.pt"):
        d = tmp_path / f"remote{len(location)}"
        shutil.copytree(small_index, d)
        _edit_meta(d, embedder__path=location)
        load_index(d)  # the folder itself is fine
        one_line_error(lambda: search_images(d, ["x.png"], device="cpu"), "not a local path")


def test_overwrite_replaces_only_index_folders(base, small_index, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    build = lambda out, **kw: build_index(base["embed"], base["shards"], out, split="val", device="cpu", progress=False, **kw)
    one_line_error(lambda: build(foreign, overwrite=True), "is not an index folder")
    assert (foreign / "notes.txt").read_text() == "mine"

    out = copy_of(small_index, tmp_path)
    one_line_error(lambda: build(out), "already exists")
    (out / "extra.txt").write_text("mine")
    one_line_error(lambda: build(out, overwrite=True), "did not write")
    (out / "extra.txt").unlink()
    before = (out / "meta.json").read_text()
    build(out, overwrite=True)
    assert (out / "meta.json").read_text() != before and load_index(out).count == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "foreign"]  # nothing left aside

    # the index must not be written into its own image gallery
    src = make_separable_folder(tmp_path / "src", per_class=1)
    one_line_error(lambda: build_index(base["embed"], src, src / "index", progress=False), "inside the gallery")


# --------------------------------------------------------------------------- search answers and the grid


def test_search_reports_bad_files_and_draws_a_grid(base, small_index, tmp_path):
    gi = load_index(small_index)
    by_label = {}
    for it in gi.items:
        by_label.setdefault(it["label"], it["path"])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    queries = [by_label["up"], str(tmp_path / "missing.png"), str(text), by_label["left"]]
    results = search_images(small_index, queries, k=3, device="cpu")
    assert [r["path"] for r in results] == queries
    assert results[1]["error"] == "no such file" and "not a readable image" in results[2]["error"]
    assert len(results[0]["neighbours"]) == 3 and results[0]["neighbours"][0]["label"] == "up"
    lines = format_search(results)
    assert lines[lines.index(queries[1]) + 1] == "  error: no such file"

    png = tmp_path / "grid.png"
    assert write_search_grid(results, png, index_dir=small_index) == png
    with Image.open(png) as im:
        assert im.size == (4 * 150, 4 * 175)  # (1 + k) cells of 1.5 in, one row per query, 100 dpi
        pixels = np.array(im.convert("RGB")).reshape(-1, 3)
    green = (pixels == (0, 128, 0)).all(1).sum()
    assert green > 100  # the query's class (its parent folder) frames its own-class neighbours green
    # labels given explicitly: every neighbour of a query labelled "none" is red
    write_search_grid(results, png, index_dir=gi, query_labels=["none"] * 4)
    with Image.open(png) as im:
        pixels = np.array(im.convert("RGB")).reshape(-1, 3)
    assert (pixels == (0, 128, 0)).all(1).sum() == 0 and (pixels == (255, 0, 0)).all(1).sum() > 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_command_line_index_search_and_add(base, tmp_path, capsys):
    """`toolkit index`, `toolkit search --grid` and `toolkit index-add`, as a user types them
    (the command line's own parsing and printing, in this process)."""
    from toolkit.cli import main

    def run(*args) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    out = tmp_path / "gallery"
    code, stdout, stderr = run("index", base["embed"], base["shards"], "--out", out, "--split", "train")
    assert code == 0, stderr
    assert f"into {out}" in stdout and "[flat, 32-d]" in stdout
    query = sorted((base["images"] / "up").glob("*.png"))[0]
    code, stdout, stderr = run("search", out, query, "--k", "3", "--grid", tmp_path / "hits.png")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == str(query) and lines[1].split("\t")[2] == "up"
    with Image.open(tmp_path / "hits.png") as im:
        assert im.size[0] > 200
    new = tmp_path / "new.png"
    shutil.copy(sorted((base["images"] / "left").glob("*.png"))[0], new)
    code, stdout, stderr = run("index-add", out, new, tmp_path / "missing.png")
    assert code == 0, stderr
    assert f"added 1 images to {out}" in stdout and "missing.png" in stdout
    code, stdout, _ = run("search", out, new, tmp_path / "missing.png", "--k", "1", "--json")
    assert code == 1, "a missing query file is an error line and exit 1, the others are answered"
    answers = json.loads(stdout)
    assert answers[0]["neighbours"][0]["path"] == str(new.resolve()) and "error" in answers[1]
    code, _, stderr = run("index", base["embed"], base["shards"], "--out", tmp_path / "g2", "--kind", "annoy")
    assert code == 2 and stderr.startswith("error: index kind must be one of")
