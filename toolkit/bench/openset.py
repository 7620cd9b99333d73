"""``toolkit bench openset``: retrieval on classes never trained on, raw pixels vs a trained embedder.

The 62-class character folder (:func:`toolkit.datasets.write_chars_folder`, from the fonts
the machine has, or those under ``--font_root``) is sharded at the recipe's input size with ``--holdout_classes N`` (default
12: their images form the ``test`` split, seeded); the embedder is trained on the other
classes with ``configs/embed/fast.yaml`` (``--minutes`` its time budget) on ``--processes``
CPU processes, started as the README starts them (``accelerate launch --config_file
configs/accelerate/cpu2.yaml launch/embed.py ...``). Then, side by side on the same samples:

* open set, inside the test split (every image a query against the others, leave-one-out):
  Recall@1/5/10, MAP@R, R-precision, ROC AUC and FNMR at FMR = 1e-2 of all pairs;
* closed set (for reference): kNN (k = 13) accuracy of the val split against train.

for raw pixels (each image's normalised pixels as one unit vector) and for the embedder.
"""
from __future__ import annotations

from pathlib import Path

from toolkit.bench import ROOT, data_root, launch_embed, log, raw_pixel_metrics, require_ints, shards_fresh, write_json
from toolkit.errors import ConfigError


def _shards(root: Path, per_class: int, holdout: int, seed: int, size: int, font_root: str) -> Path:
    from toolkit.data.shards import write_shards
    from toolkit.datasets import discover_fonts, write_chars_folder

    fonts = discover_fonts(font_root) if font_root else None  # None: every usable font on the machine
    if fonts == []:
        raise ConfigError(f"toolkit bench openset: no font drawing 0-9, A-Z, a-z under {font_root}")
    folder = write_chars_folder(root / f"chars-{per_class}", per_class=per_class, seed=seed, fonts=fonts, progress=True)
    shards = root / f"chars-{per_class}-holdout-{holdout}-seed-{seed}-{size}px"
    if not shards_fresh(shards, folder, size=size, seed=seed, holdout=holdout):
        log(f"sharding {folder} -> {shards} ({holdout} classes held out, {size}x{size})")
        write_shards(folder, shards, image_size=size, seed=seed, holdout_classes=holdout, overwrite=True)
    return shards


def main(*, holdout: int = 12, per_class: int = 120, minutes: float = 5.0, processes: int = 2, seed: int = 0,
         font_root: str = "", out: str = "") -> dict:
    require_ints("openset", [("holdout", holdout, 1), ("per_class", per_class, 4), ("processes", processes, 1),
                             ("seed", seed, 0)])
    if not minutes > 0:
        raise ConfigError(f"toolkit bench openset: --minutes must be > 0, got {minutes}")
    with data_root() as (root, _):
        return _run(root, holdout=holdout, per_class=per_class, minutes=minutes, processes=processes, seed=seed,
                    font_root=font_root, out=out)


def _run(root: Path, *, holdout: int, per_class: int, minutes: float, processes: int, seed: int, font_root: str,
         out: str) -> dict:
    from toolkit.config import EmbedConfig, load_config
    from toolkit.data.shards import read_info
    from toolkit.evaluation import evaluate
    from toolkit.report import OPEN_SET_COLUMNS, OPEN_SET_HEADS

    config = ROOT / "configs" / "embed" / "fast.yaml"
    shards = _shards(root, per_class, holdout, seed, load_config(EmbedConfig, config).input_size, font_root)  # stored as the recipe reads them
    info = read_info(shards)
    rows = {}
    closed_set, raw = raw_pixel_metrics(shards, shards)
    raw["knn_accuracy"] = closed_set["knn_accuracy"]
    rows["raw pixels"] = raw

    run_dir = root / f"openset-run-{holdout}"
    took = launch_embed("openset", config, [f"shards={shards}", f"max_minutes={minutes}"], run_dir=run_dir,
                        processes=processes)
    test = evaluate(run_dir, str(shards), "test", num_workers=0)
    val = evaluate(run_dir, str(shards), "val", "knn", num_workers=0)
    trained = dict(test["retrieval"])
    trained["knn_accuracy"] = val["knn_accuracy"]
    name = f"fast.yaml, {took:.1f} min (cap {minutes:g}), {processes} CPU processes"
    rows[name] = trained

    heads = [OPEN_SET_HEADS[c] for c in OPEN_SET_COLUMNS]
    print(f"\nopen set: {len(info.holdout_classes)} held-out classes ({', '.join(info.holdout_classes)}), "
          f"{test['num_samples']} test images, leave-one-out; closed set: {len(info.classes)} classes, "
          f"val {info.splits['val'].num_samples} vs train {info.splits['train'].num_samples}; training took {took:.1f} min wall\n")
    print("| embeddings | " + " | ".join(heads) + " | closed-set kNN(13) val acc |")
    print("| --- |" + " ---: |" * (len(heads) + 1))
    for label, m in rows.items():
        print(f"| {label} | " + " | ".join(f"{m[c]:.4f}" for c in OPEN_SET_COLUMNS) + f" | {m['knn_accuracy']:.4f} |")
    gain = rows[name]["recall_at_1"] - raw["recall_at_1"]
    print(f"\nunseen-class Recall@1: embedder - raw pixels = {gain:+.4f} (target >= +0.15)")
    if test.get("open_set"):
        o = test["open_set"]
        print(f"open-set recognition (unknown beyond {o['threshold']:.4f}): accuracy {o['open_set_accuracy']:.4f}, "
              f"known rejected {o['known_rejected']:.4f}, unseen rejected {o['unknown_rejected']:.4f}, AUROC {o['open_set_auroc']:.4f}")
    report = {"shards": str(shards), "holdout_classes": info.holdout_classes, "minutes": minutes, "processes": processes,
              "rows": rows, "open_set": test.get("open_set"), "recall_at_1_gain": gain}
    if out:
        write_json(out, report)
    return report
