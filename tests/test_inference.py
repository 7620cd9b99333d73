"""Using a trained run: evaluate, predict (kNN and head), export; and the errors users meet."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from classify_helpers import make_separable_folder, shard, shared_classify_run, shared_embed_run
from toolkit.errors import DataError
from toolkit.data.shards import read_info
from toolkit.evaluation import evaluate, run_split
from toolkit.knn import knn_vote
from toolkit.inference import export, export_paths, predict


def val_images(base) -> dict[str, str]:
    """{shard key: original image path} of the validation split."""
    info = read_info(base["shards"])
    manifest = pd.read_csv(base["shards"] / "manifest.csv")
    val = manifest[manifest["split"] == "val"]
    return {k: f"{info.source}/{p}" for k, p in zip(val["key"], val["path"])}


def test_knn_vote_matches_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)  # (N, D)
    ref_y = torch.randint(0, 5, (300,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(100, 16, generator=g), dim=1)  # (Q, D)
    for k in (1, 13):
        pred, share = knn_vote(ref, ref_y, q, k=k, block=7)
        expected = KNeighborsClassifier(n_neighbors=k).fit(ref.numpy(), ref_y.numpy()).predict(q.numpy())
        assert (pred.numpy() == expected).all()
        assert ((share * k).round() >= 1).all() and (share <= 1).all()
    # k larger than the reference set: every reference votes
    pred, share = knn_vote(ref[:3], torch.tensor([2, 2, 1]), q[:4], k=13)
    assert pred.tolist() == [2, 2, 2, 2] and torch.allclose(share, torch.full((4,), 2 / 3))


def test_predict_agrees_with_evaluate_on_validation_images(tmp_path_factory):
    base = shared_embed_run(tmp_path_factory)
    run_dir = shared_classify_run(tmp_path_factory)
    paths = val_images(base)
    res = run_split(run_dir, split="val")  # kNN and head, per sample, sorted by key
    metrics = evaluate(run_dir)
    assert metrics["num_samples"] == len(paths) == 24
    assert metrics["knn_accuracy"] == pytest.approx(float((res.knn_pred == res.labels).float().mean()))
    assert metrics["head_accuracy"] == pytest.approx(float((res.head_pred == res.labels).float().mean()))
    assert metrics["knn_accuracy"] >= 0.95 and metrics["head_accuracy"] >= 0.95

    images = [paths[k] for k in res.keys]
    for method, pred in (("knn", res.knn_pred), ("head", res.head_pred)):
        answers = predict(run_dir, images, method=method)
        assert [a["path"] for a in answers] == images
        assert [a["label"] for a in answers] == [res.classes[i] for i in pred.tolist()], method
        if method == "knn":  # vote share, the same numbers evaluate computed
            assert [a["confidence"] for a in answers] == pytest.approx(res.knn_share.tolist())
        else:  # softmax probability of the top class
            assert [a["confidence"] for a in answers] == pytest.approx(res.head_logp.exp().max(1).values.tolist(), abs=1e-5)

    # an embedding run answers kNN only; evaluate then reports kNN only
    knn_only = evaluate(base["embed"])
    assert knn_only["knn_accuracy"] == metrics["knn_accuracy"] and "head_accuracy" not in knn_only
    with pytest.raises(DataError, match="without a classifier head"):
        predict(base["embed"], images[:1], method="head")


def test_predict_reports_bad_files_and_answers_the_rest(tmp_path, tmp_path_factory):
    base = shared_embed_run(tmp_path_factory)
    good = next(iter(val_images(base).values()))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    answers = predict(base["embed"], [missing, good, text, empty, good])
    assert [a["path"] for a in answers] == [str(p) for p in (missing, good, text, empty, good)]
    assert answers[0]["error"] == "no such file" and "label" not in answers[0]
    assert "not a readable image" in answers[2]["error"] and "not a readable image" in answers[3]["error"]
    for a in (answers[1], answers[4]):
        assert "error" not in a and a["label"] in read_info(base["shards"]).classes and 0 < a["confidence"] <= 1
    assert answers[1] == {**answers[4], "path": answers[1]["path"]}


def test_evaluate_on_other_classes_is_retrieval_only_and_names_the_difference(tmp_path, tmp_path_factory):
    base = shared_embed_run(tmp_path_factory)
    other = shard(make_separable_folder(tmp_path / "img", per_class=4, classes=("down", "left", "right", "sideways", "zag")), tmp_path / "other")
    m = evaluate(base["embed"], other)  # any classes: open-set retrieval inside the split, no closed-set accuracy
    assert m["closed_set"] is False and "knn_accuracy" not in m
    assert m["retrieval"]["num_queries"] == m["num_samples"] == 5
    with pytest.raises(DataError) as err:
        evaluate(base["embed"], other, method="knn")
    msg = str(err.value)
    assert "missing from the model: sideways, zag" in msg
    assert "the model has classes the shards lack: up" in msg


def test_export_round_trip(tmp_path, tmp_path_factory):
    base = shared_embed_run(tmp_path_factory)
    out = tmp_path / "exp" / "val.csv"
    n = export(base["embed"], base["shards"], out, split="val")
    info = read_info(base["shards"])
    assert n == info.splits["val"].num_samples == 24

    files = export_paths(out)
    keys = np.load(files["keys"])  # no allow_pickle needed: plain unicode array
    labels = np.load(files["labels"])
    emb = np.load(files["embeddings"])
    assert keys.shape == (n,) and labels.shape == (n,) and emb.shape == (n, 32) and emb.dtype == np.float32
    assert list(keys) == sorted(keys) and len(set(keys)) == n
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    table = pd.read_csv(files["table"])
    assert len(table) == n and list(table["key"]) == list(keys) and (table["label"].to_numpy() == labels).all()
    assert (table["class"] == [info.classes[i] for i in labels]).all()
    assert np.allclose(table[[c for c in table.columns if c.startswith("e")]].to_numpy(), emb, atol=1e-6)
    # original paths come from the shards' manifest; labels agree with the class folder
    assert all(p.split("/")[0] == c for p, c in zip(table["path"], table["class"]))
    # the same rows evaluate scores
    res = run_split(base["embed"], base["shards"], "val", "none")
    assert list(keys) == res.keys and np.allclose(emb, res.embeddings.numpy())


# --------------------------------------------------------------------------- untrusted model files

@pytest.mark.parametrize("location", ["pipe:touch {marker}", "pipe:touch {marker}/{{}}", "http://127.0.0.1:9/{{}}"])
def test_a_model_file_cannot_make_evaluate_or_predict_run_a_command(tmp_path, tmp_path_factory, location):
    """weights_only loading vouches for types, not content: a shard location inside a model file
    is used only when it is a local path, so `toolkit evaluate/predict RUN` never runs what the file says."""
    import subprocess
    import sys
    from pathlib import Path

    base = shared_embed_run(tmp_path_factory)
    payload = torch.load(base["embed"] / "best_embedder.pt", weights_only=True)
    marker = tmp_path / "pwned"
    payload["config"]["shards"] = location.format(marker=marker)
    payload.pop("preprocess", None)
    bad = tmp_path / "run"
    bad.mkdir()
    torch.save(payload, bad / "best_embedder.pt")
    with pytest.raises(DataError, match="not a local folder"):
        evaluate(bad)
    image = next(iter(val_images(base).values()))
    with pytest.raises(DataError, match="not a local folder"):
        predict(bad, [image])
    with pytest.raises(DataError, match="not a local folder"):
        export(bad, None, tmp_path / "e.csv")
    if location == "pipe:touch {marker}":  # once, the way users run it
        toolkit = str(Path(sys.executable).with_name("toolkit"))
        r = subprocess.run([toolkit, "evaluate", str(bad)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "never from a file" in r.stderr, r.stderr
    assert not marker.exists(), "a command written into a model file was run"
    # the user can still name the shards themselves
    assert evaluate(bad, base["shards"])["num_samples"] == 24


def test_malformed_model_files_are_one_line_errors(tmp_path, tmp_path_factory):
    base = shared_embed_run(tmp_path_factory)
    good = torch.load(base["embed"] / "best_embedder.pt", weights_only=True)
    cases = {
        "not a dict": [1, 2, 3],
        "no config": {"model": good["model"]},
        "classes not a list": {**good, "classes": "abc"},
        "class names not strings": {**good, "classes": [1, 2, 3, 4]},
        "no weights": {**{k: v for k, v in good.items() if k != "model"}},
        "head without embedder path": {"kind": "head", "config": {}, "classes": ["a"], "head": {}, "embedder": 7},
    }
    head = torch.load(shared_classify_run(tmp_path_factory) / "best_head.pt", weights_only=True)
    cases["absurd preprocessing"] = {**head, "preprocess": {"image_size": 10**9, "grayscale": True}}
    image = next(iter(val_images(base).values()))
    for name, payload in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(payload, path)
        with pytest.raises(DataError) as err:
            predict(path, [image])
        assert "\n" not in str(err.value) and str(path) in str(err.value), name
