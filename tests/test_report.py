"""The kNN-vs-head report: the numbers, the files, the plots, and what goes to the tracker."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from classify_helpers import CLASSES, shared_classify_run
from toolkit.report import confused_pairs, confusion_matrix, project_2d, write_report

PLOTS = ("curves_embed", "curves_classify", "confusion", "projection")


def test_confusion_matrix_and_most_confused_pairs():
    y = [0, 0, 0, 1, 1, 2, 2, 2]
    a = [0, 1, 1, 1, 0, 2, 2, 0]
    b = [0, 1, 0, 1, 1, 2, 1, 2]
    ma, mb = confusion_matrix(a, y, 3), confusion_matrix(b, y, 3)
    assert ma.tolist() == [[1, 2, 0], [1, 1, 0], [1, 0, 2]]
    assert ma.sum() == len(y) and np.trace(mb) == 6
    pairs = confused_pairs({"knn": ma, "head": mb}, ["a", "b", "c"], top=2)
    assert pairs[0] == {"true": "a", "predicted": "b", "knn": 2, "head": 1}
    assert len(pairs) == 2 and pairs[1]["knn"] + pairs[1]["head"] == 1
    assert confused_pairs({"knn": np.eye(3, dtype=int)}, ["a", "b", "c"]) == []


def test_pca_projection_matches_scikit_learn():
    from sklearn.decomposition import PCA

    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 9)  # distinct variances
    ours, ref = project_2d(x), PCA(n_components=2).fit_transform(x.numpy().astype(np.float64))
    for j in range(2):  # components are defined up to sign
        assert np.allclose(np.abs(ours[:, j]), np.abs(ref[:, j]), atol=1e-6)


def test_report_files(tmp_path_factory):
    run_dir = shared_classify_run(tmp_path_factory)  # launch/classify.py writes the report at the end
    rep = json.loads((run_dir / "report.json").read_text())
    assert 0.95 <= rep["knn_accuracy"] <= 1 and 0.95 <= rep["head_accuracy"] <= 1
    assert rep["knn_k"] == 13 and rep["split"] == "val" and rep["num_samples"] == 24
    assert [r["class"] for r in rep["per_class"]] == list(CLASSES) and sum(r["images"] for r in rep["per_class"]) == 24
    assert all({"knn_accuracy", "head_accuracy"} <= r.keys() for r in rep["per_class"])
    assert np.array(rep["confusion"]["head"]).sum() == 24
    md = (run_dir / "report.md").read_text()
    assert "kNN (k = 13)" in md and "classifier head" in md
    assert set(rep["plots"]) == set(PLOTS)
    for name, rel in rep["plots"].items():
        assert f"]({rel})" in md
        with Image.open(run_dir / rel) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 300 and im.height >= 200, name
            assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 5, f"{name} looks blank"


class RecordingTracker:
    def __init__(self):
        self.images, self.summaries = [], []

    def log_image(self, key, png_path, step=None):
        self.images.append((key, png_path))

    def summary(self, values):
        self.summaries.append(values)


def test_report_sends_plots_to_the_tracker(tmp_path, tmp_path_factory):
    run_dir = tmp_path / "cls"
    shutil.copytree(shared_classify_run(tmp_path_factory), run_dir)  # best_head.pt names its embedder by absolute path
    (run_dir / "report.json").unlink()
    tracker = RecordingTracker()
    rep = write_report(run_dir, tracker=tracker, projection="tsne")
    assert sorted(k for k, _ in tracker.images) == sorted(f"report/{p}" for p in PLOTS)
    assert all(p.is_file() for _, p in tracker.images)
    assert tracker.summaries[-1] == {"report/knn_accuracy": rep["knn_accuracy"], "report/head_accuracy": rep["head_accuracy"]}
    assert json.loads((run_dir / "report.json").read_text())["head_accuracy"] == pytest.approx(rep["head_accuracy"])
