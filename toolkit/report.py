"""The kNN-vs-head report of a classifier run: numbers side by side, plus plots.

Writes into the classifier run folder::

    report.json   knn_accuracy, head_accuracy (same split), per-class accuracy of both,
                  confusion matrices, the most confused class pairs, where everything came from
    report.md     the same, readable, with the plots inline
    plots/curves_embed.png     embedding stage: train triplet loss and val kNN accuracy vs step
    plots/curves_classify.png  classifier: train vs val NLL and accuracy per epoch
    plots/confusion.png        row-normalised confusion matrices, kNN and head
    plots/projection.png       2-D PCA (or t-SNE) of the val embeddings, coloured by class
    plots/worst_queries.png    open set (shards with a test split of held-out classes): the
                               queries retrieved worst, each with its top 5, matches framed

With a test split of held-out classes the report also holds the open-set table: retrieval
among the unseen classes (Recall@k, MAP@R, R-precision, ROC AUC, FNMR at FMR) for raw
pixels and for the embedder side by side, and open-set recognition (known vs unseen).

Plots use matplotlib's object API (``Figure`` + Agg canvas): no pyplot, no global backend
switch, safe in a training process. With a W&B tracker the PNGs are logged as images and the open-set table as a table too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from toolkit.files import atomic_write_json, atomic_write_text
from toolkit.artifacts import HEAD_FILE, METRICS_FILE, PLOTS_DIR, REPORT_JSON, REPORT_MD, open_run
from toolkit.data.shards import read_info
from toolkit.evaluation import SplitResult, images_by_key, raw_pixel_embeddings, run_split, split_metrics, split_retrieval
from toolkit.tracking import read_metrics

__all__ = ["confusion_matrix", "confused_pairs", "load_report", "project_2d", "write_report"]

TITLES = {"knn": "kNN", "head": "classifier head"}


# --------------------------------------------------------------------------- numbers


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confused_pairs(matrices: dict[str, np.ndarray], classes: list[str], *, top: int = 10) -> list[dict]:
    """Off-diagonal (true, predicted) pairs, most frequent first (summed over methods).

    Returns ``[{"true", "predicted", <method>: count, ...}]``, at most ``top`` pairs.
    """
    total = sum(m for m in matrices.values()).astype(np.int64)
    np.fill_diagonal(total, 0)
    order = np.argsort(-total, axis=None, kind="stable")[:top]
    pairs = []
    for flat in order:
        t, p = divmod(int(flat), len(classes))
        if total[t, p] == 0:
            break
        pairs.append({"true": classes[t], "predicted": classes[p], **{name: int(m[t, p]) for name, m in matrices.items()}})
    return pairs


def project_2d(emb: torch.Tensor, method: Literal["pca", "tsne"] = "pca", *, seed: int = 0) -> np.ndarray:
    """(N, D) embeddings -> (N, 2). PCA: exact, from the D×D covariance; t-SNE: scikit-learn."""
    x = emb.double()
    if method == "tsne" and len(x) > 3:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.numpy())
    x = x - x.mean(0, keepdim=True)  # (N, D) centred
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, vecs = torch.linalg.eigh(x.T @ x)  # eigenvalues ascending; (D, D)
    return (x @ vecs[:, -2:].flip(1)).numpy()  # (N, 2): first, second principal component


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = sorted((r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and x in r)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_embed_curves(rows: list[dict], path: Path) -> Path:
    """Embedding stage: train triplet loss and val kNN accuracy (the only val signal) vs step."""
    fig = _figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(*_series(rows, "train/loss"), label="train triplet loss", color="tab:blue")
    ax1.set(xlabel="step", ylabel="loss", title="embedding stage: loss")
    ax2.plot(*_series(rows, "val/knn_accuracy"), "o-", label="val kNN accuracy", color="tab:orange")
    if any("val/precision_at_1" in r for r in rows):
        ax2.plot(*_series(rows, "val/precision_at_1"), "s--", label="val precision@1", color="tab:green", alpha=0.7)
    ax2.set(xlabel="step", ylabel="accuracy", title="embedding stage: validation", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    return _save(fig, path)


def plot_classify_curves(rows: list[dict], path: Path, *, knn_accuracy: float | None = None) -> Path:
    """Classifier: train vs val NLL and accuracy per epoch (train measured with dropout on)."""
    epochs = [r for r in rows if "val/accuracy" in r]
    fig = _figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for ax, what in ((ax1, "loss"), (ax2, "accuracy")):
        ax.plot(*_series(epochs, f"train/{what}", "epoch"), "o-", label=f"train {what}", color="tab:blue")
        ax.plot(*_series(epochs, f"val/{what}", "epoch"), "o-", label=f"val {what}", color="tab:orange")
        ax.set(xlabel="epoch", ylabel=what, title=f"classifier head: {what}")
        ax.grid(alpha=0.3)
    if knn_accuracy is not None:
        ax2.axhline(knn_accuracy, ls="--", color="gray", label=f"val kNN accuracy {knn_accuracy:.3f}")
    ax2.set_ylim(0, 1.02)
    ax1.legend(loc="best")
    ax2.legend(loc="best")
    return _save(fig, path)


def plot_confusion(matrices: dict[str, np.ndarray], classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrices side by side (counts written in when few classes)."""
    c = len(classes)
    side = min(12.0, max(4.0, 0.25 * c + 3))
    fig = _figure(side * len(matrices), side)
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    for ax, (name, m) in zip(axes, matrices.items()):
        rows = m.sum(1, keepdims=True)
        norm = np.divide(m, rows, out=np.zeros_like(m, dtype=float), where=rows > 0)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        acc = np.trace(m) / max(1, m.sum())
        ax.set(title=f"{TITLES.get(name, name)}: accuracy {acc:.3f}", xlabel="predicted", ylabel="true")
        if c <= 40:
            ax.set_xticks(range(c), classes, rotation=90, fontsize=7 if c > 15 else 9)
            ax.set_yticks(range(c), classes, fontsize=7 if c > 15 else 9)
        if c <= 12:
            for t in range(c):
                for p in range(c):
                    if m[t, p]:
                        ax.text(p, t, str(m[t, p]), ha="center", va="center", fontsize=8, color="white" if norm[t, p] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_projection(xy: np.ndarray, labels, classes: list[str], path: Path, *, title: str) -> Path:
    """Scatter of the 2-D projection, one colour per class (legend up to 20 classes)."""
    from matplotlib import colormaps

    labels = np.asarray(labels)
    c = len(classes)
    cmap = colormaps["tab10" if c <= 10 else "tab20" if c <= 20 else "gist_ncar"]
    fig = _figure(7, 6)
    ax = fig.subplots()
    for i, name in enumerate(classes):
        pts = xy[labels == i]
        if len(pts):
            colour = cmap(i if c <= 20 else i / max(1, c - 1))
            ax.scatter(pts[:, 0], pts[:, 1], s=10, color=colour, label=name, alpha=0.8, linewidths=0)
    ax.set(title=title, xticks=[], yticks=[])
    if c <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    return _save(fig, path)


def plot_worst_queries(rows: list[dict], images: dict, path: Path, *, title: str) -> Path:
    """One row per query: the query, then its nearest gallery images framed green (same
    class) or red. ``rows``: [{"key", "label", "ap", "neighbours": [{"key", "label", "distance"}]}]."""
    cols = 1 + max((len(r["neighbours"]) for r in rows), default=0)
    fig = _figure(1.4 * cols, 1.5 * max(1, len(rows)) + 0.4)
    axes = np.array(fig.subplots(max(1, len(rows)), cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    for i, row in enumerate(rows):
        cells = [(row["key"], f"query {row['label']}\nAP@R {row['ap']:.2f}", "black")]
        cells += [(n["key"], f"{n['label']} d={n['distance']:.3f}", "tab:green" if n["label"] == row["label"] else "tab:red")
                  for n in row["neighbours"]]
        for j, (key, text, colour) in enumerate(cells):
            ax = axes[i, j]
            img = images.get(key)
            if img is not None:
                arr = img.permute(1, 2, 0).numpy()
                ax.imshow(arr[:, :, 0] if arr.shape[2] == 1 else arr, cmap="gray", vmin=0, vmax=255)
            ax.set_title(text, fontsize=7, color=colour if j else "black")
            for side in ax.spines.values():
                side.set_visible(j > 0)
                side.set_color(colour)
                side.set_linewidth(3)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------- open set


OPEN_SET_COLUMNS = ("recall_at_1", "recall_at_5", "recall_at_10", "map_at_r", "r_precision", "roc_auc", "fnmr_at_fmr_0.01")


def open_set_section(run, shards: str, *, split: str = "test", k: int | None = None, device=None, batch_size: int = 512,
                     num_workers: int = 0, worst: int = 8, top: int = 5) -> tuple[dict, list[dict], dict]:
    """The open-set part of a report on ``split`` (held-out classes) of ``shards``.

    Returns ``(section, worst_rows, images)``: ``section`` = {"split", "num_images",
    "classes", "rows": {"raw pixels": metrics, "embedder": metrics}, "open_set": recognition
    metrics or None}; the ``worst`` queries by AP@R with their ``top`` neighbours, and the
    stored images those rows show.
    """
    res = run_split(run, shards, split, "none", k=k, device=device, batch_size=batch_size, num_workers=num_workers)
    names = res.label_names
    pix_keys, pix, pix_y = raw_pixel_embeddings(shards, split, batch_size=batch_size, num_workers=num_workers)
    if pix_keys != res.keys:
        raise RuntimeError("raw pixels and embeddings read different samples")
    raw = split_retrieval(pix, pix_y, res.is_query, res.is_gallery)
    section = {
        "split": split, "num_images": len(res.keys), "classes": sorted({names[i] for i in res.labels.tolist()}),
        "rows": {"raw pixels": dict(raw.metrics), "embedder": dict(res.retrieval.metrics)}, "open_set": res.open_set,
        "notes": list(res.notes),
    }
    r = res.retrieval
    q_idx, g_idx = np.flatnonzero(res.is_query), np.flatnonzero(res.is_gallery)
    candidates = [i for i in np.argsort(np.nan_to_num(r.ap, nan=np.inf), kind="stable") if r.has_match[i]][:worst]
    rows = []
    for qi in candidates:
        sample = q_idx[qi]
        nbrs = [(int(g), float(d)) for g, d in zip(r.topk[qi][:top], r.topk_dist[qi][:top]) if g >= 0]
        rows.append({
            "key": res.keys[sample], "label": names[int(res.labels[sample])], "ap": float(r.ap[qi]),
            "neighbours": [{"key": res.keys[g_idx[g]], "label": names[int(res.labels[g_idx[g]])], "distance": d} for g, d in nbrs],
        })
    wanted = {row["key"] for row in rows} | {n["key"] for row in rows for n in row["neighbours"]}
    return section, rows, images_by_key(shards, split, wanted, batch_size=batch_size)


OPEN_SET_HEADS = {"recall_at_1": "R@1", "recall_at_5": "R@5", "recall_at_10": "R@10", "map_at_r": "MAP@R",
                  "r_precision": "R-prec.", "roc_auc": "ROC AUC", "fnmr_at_fmr_0.01": "FNMR@FMR=1e-2"}


def open_set_table_lines(section: dict) -> list[str]:
    """The open-set table (markdown): raw pixels vs the embedder on the unseen classes, then
    the recognition line. What the report and ``toolkit demo --holdout_classes`` print."""
    lines = [
        f"| unseen classes ({', '.join(section['classes'][:12])}{' ...' if len(section['classes']) > 12 else ''}; "
        f"{section['num_images']} images) | " + " | ".join(OPEN_SET_HEADS[c] for c in OPEN_SET_COLUMNS) + " |",
        "| --- |" + " ---: |" * len(OPEN_SET_COLUMNS),
    ]
    for name, m in section["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in OPEN_SET_COLUMNS) + " |")
    o = section.get("open_set")
    if o:
        lines += [
            "",
            f"Open-set recognition ({o['num_known']} known val images, {o['num_unknown']} unseen; \"unknown\" beyond "
            f"distance {o['threshold']:.4f}): accuracy {_fmt(o['open_set_accuracy'])}, known correct "
            f"{_fmt(o['known_accuracy'])}, known rejected {_fmt(o['known_rejected'])}, unseen rejected "
            f"{_fmt(o['unknown_rejected'])}, AUROC known vs unseen {_fmt(o['open_set_auroc'])}.",
        ]
    return lines


def _open_set_markdown(section: dict) -> list[str]:
    lines = [
        f"## Open set: {len(section['classes'])} classes never trained on",
        "",
        f"Split `{section['split']}`: each query against the rest of the gallery (its own image left out).",
        "",
        *open_set_table_lines(section),
    ]
    lines += [f"- {n}" for n in section.get("notes", [])]
    return lines + [""]


# --------------------------------------------------------------------------- report


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def _markdown(rep: dict) -> str:
    lines = [
        f"# Classifier report: `{rep['run_dir']}`",
        "",
        f"- embedder: `{rep['embedder']}` (step {rep['embedder_step']}, embedding-stage best val kNN accuracy "
        f"{_fmt(rep['embed_stage_knn_accuracy'])})",
        f"- evaluated on: split `{rep['split']}` of `{rep['shards']}`, {rep['num_samples']} images, {rep['num_classes']} classes",
        f"- kNN reference: {rep['knn_reference']}",
        "",
        "| method | accuracy |",
        "| --- | --- |",
        f"| kNN (k = {rep['knn_k']}) | {_fmt(rep['knn_accuracy'])} |",
        f"| classifier head | {_fmt(rep['head_accuracy'])} (NLL {_fmt(rep['head_loss'])}) |",
        "",
        "## Per class",
        "",
        "| class | images | kNN | head |",
        "| --- | --- | --- | --- |",
    ]
    for row in rep["per_class"]:
        lines.append(f"| {row['class']} | {row['images']} | {_fmt(row['knn_accuracy'])} | {_fmt(row['head_accuracy'])} |")
    lines += ["", "## Most confused pairs", ""]
    if rep["confused_pairs"]:
        lines += ["| true | predicted as | kNN | head |", "| --- | --- | --- | --- |"]
        lines += [f"| {p['true']} | {p['predicted']} | {p['knn']} | {p['head']} |" for p in rep["confused_pairs"]]
    else:
        lines.append("None: every validation image is classified correctly by both.")
    if rep.get("open_set_section"):
        lines += [""] + _open_set_markdown(rep["open_set_section"])
    lines += ["", "## Plots", ""]
    for name, rel in rep["plots"].items():
        lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    for note in rep["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    run_dir: str | Path,
    *,
    shards: str | Path | None = None,
    split: str = "val",
    k: int | None = None,
    tracker=None,
    device=None,
    batch_size: int = 512,
    num_workers: int = 0,
    projection: Literal["pca", "tsne"] = "pca",
) -> dict:
    """Write report.json, report.md and plots/*.png into the classifier run ``run_dir``; return the report dict."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    if run.head is None:
        raise ValueError(f"{run_dir}: not a classifier run (no {HEAD_FILE})")
    res: SplitResult = run_split(run, shards, split, "both", k=k, device=device, batch_size=batch_size, num_workers=num_workers)
    m = split_metrics(res)
    classes, y = res.classes, res.labels.numpy()
    matrices = {
        "knn": confusion_matrix(res.knn_pred.numpy(), y, len(classes)),
        "head": confusion_matrix(res.head_pred.numpy(), y, len(classes)),
    }
    counts = np.bincount(y, minlength=len(classes))
    notes: list[str] = []

    plots_dir = run_dir / PLOTS_DIR
    plots: dict[str, str] = {}
    embed_rows = read_metrics(run.embedder_path.parent)
    if embed_rows:
        plots["curves_embed"] = plot_embed_curves(embed_rows, plots_dir / "curves_embed.png")
    else:
        notes.append(f"no {METRICS_FILE} next to {run.embedder_path}: embedding-stage curves skipped")
    head_rows = read_metrics(run_dir)
    if any("val/accuracy" in r for r in head_rows):
        plots["curves_classify"] = plot_classify_curves(head_rows, plots_dir / "curves_classify.png", knn_accuracy=m["knn_accuracy"])
    else:
        notes.append(f"no per-epoch records in {run_dir / METRICS_FILE}: classifier curves skipped")
    plots["confusion"] = plot_confusion(matrices, classes, plots_dir / "confusion.png")
    xy = project_2d(res.embeddings, projection)
    title = f"{split} embeddings, {projection.upper()} (colour = class)"
    plots["projection"] = plot_projection(xy, y, classes, plots_dir / "projection.png", title=title)

    section = None
    if "test" in read_info(res.shards).splits:
        section, worst_rows, images = open_set_section(run, res.shards, k=k, device=device, batch_size=batch_size,
                                                       num_workers=num_workers)
        if worst_rows:
            plots["worst_queries"] = plot_worst_queries(
                worst_rows, images, plots_dir / "worst_queries.png",
                title=f"unseen classes: the {len(worst_rows)} queries retrieved worst (green = same class)")

    emb_metrics = run.embedder.metrics
    rep = {
        "run_dir": str(run_dir),
        "embedder": str(run.embedder_path),
        "embedder_step": run.embedder.step,
        "embed_stage_knn_accuracy": emb_metrics.get("val/knn_accuracy"),
        "shards": res.shards,
        "split": split,
        "num_samples": len(res.keys),
        "num_classes": len(classes),
        "knn_k": res.k,
        "knn_reference": res.knn_reference,
        "knn_accuracy": m["knn_accuracy"],
        "head_accuracy": m["head_accuracy"],
        "head_loss": m["head_loss"],
        "head_best_epoch": run.head.epoch,
        "per_class": [
            {"class": name, "images": int(counts[i]), "knn_accuracy": m["knn_per_class"][name], "head_accuracy": m["head_per_class"][name]}
            for i, name in enumerate(classes)
        ],
        "confused_pairs": confused_pairs(matrices, classes),
        "confusion": {name: mat.tolist() for name, mat in matrices.items()},
        "plots": {name: str(p.relative_to(run_dir)) for name, p in plots.items()},
        "notes": notes,
        "open_set_section": section,
    }
    atomic_write_json(run_dir / REPORT_JSON, rep)
    atomic_write_text(run_dir / REPORT_MD, _markdown(rep))
    if tracker is not None:
        for name, p in plots.items():
            tracker.log_image(f"report/{name}", p)
        tracker.summary({"report/knn_accuracy": rep["knn_accuracy"], "report/head_accuracy": rep["head_accuracy"]})
        if section is not None:
            tracker.log_table("report/open_set", ["embeddings", *OPEN_SET_COLUMNS],
                              [[name, *(m.get(c) for c in OPEN_SET_COLUMNS)] for name, m in section["rows"].items()])
    return rep


def load_report(run_dir: str | Path) -> dict:
    """The report.json of a classifier run."""
    return json.loads((Path(run_dir) / REPORT_JSON).read_text())
