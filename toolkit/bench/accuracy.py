"""``toolkit bench accuracy``: recipes side by side on the hard character set, same budget.

The hard set: 62 classes (0-9, A-Z, a-z), ``--per_class`` images each, drawn at 64×64 from
the ~150 fonts ``toolkit bench fonts --install`` puts on the machine (a third handwriting,
brush and marker styles; two faces per family), with random rotation, scale, shift, shear,
blur and pixel noise (:func:`toolkit.datasets.write_chars_folder`), sharded twice per stored
size (32×32 and 64×64):

* ``{--shards}-{size}`` (default ``shards/hard-64``): all 62 classes, stratified 85/15 train/val;
* ``{--shards}-{size}-open``: ``--holdout`` classes (default 12) held out whole as a test split,

at the stored size each recipe was made for (32 or 64).

Each recipe trains on ``--processes`` CPU processes, started as the README starts them
(``accelerate launch --config_file configs/accelerate/cpu2.yaml launch/embed.py --config
...``), ``--minutes`` its hard stop, once per shard folder. One table, one row per recipe:

* raw pixels: each image's normalised pixels as the embedding (no training);
* the seed's pipeline: ``seed.yaml`` (shuffled batches, lr 1e-3, 30 epochs), at the stored
  32×32 instead of upsampled to 220 so that it gets the same 5 minutes a fair number of steps;
* fast.yaml before the recipe search (32×32, 12 epochs of P×K batches, lr 2e-3, no
  augmentation: 1.3 of its 5 minutes on 2 cores);
* fast.yaml as shipped: the recipe the search chose (``configs/sweeps/recipe*.yaml``): 64×64,
  on-device augmentation, the cosine following the 5-minute clock.

Columns: closed-set kNN(13) val accuracy and MAP@R (val queries vs train), and, on the
classes never trained on, Recall@1 and MAP@R (leave-one-out inside the test split).
``--data_only`` builds the folders and shards (for ``toolkit sweep configs/sweeps/recipe.yaml``)
and stops.
"""
from __future__ import annotations

from pathlib import Path

from toolkit.bench import ROOT, data_root, launch_embed, log, raw_pixel_metrics, require_ints, shards_fresh, write_json
from toolkit.errors import ConfigError

CONFIGS = ROOT / "configs" / "embed"

# name -> (label, config file, stored image size, overrides). "before" restores fast.yaml's
# values from before the search, key by key, so the row stays reproducible from the shipped file.
RECIPES: dict[str, tuple[str, str, int, tuple[str, ...]]] = {
    "seed": ("seed.yaml: shuffled batches, its settings, at 32 px", "seed.yaml", 32,
             ("batching=random", "input_size=32", "num_workers=1")),
    "before": ("fast.yaml before the search: 32 px, 12 epochs, no augmentation", "fast.yaml", 32,
               ("input_size=32", "augment=false", "epochs=12")),
    "fast": ("fast.yaml: 64 px, augmented, cosine over the 5 minutes", "fast.yaml", 64, ()),
}
RAW_SIZE = 32  # raw pixels at 32x32 (0.26 kNN) beat them at 64x64 (0.22)
ROWS = ("raw", *RECIPES)
COLUMNS = (("knn_accuracy", "kNN(13) val acc"), ("map_at_r", "val MAP@R"),
           ("unseen_recall_at_1", "unseen R@1"), ("unseen_map_at_r", "unseen MAP@R"))


def hard_shards(shards: str, *, root: Path, sizes, per_class: int, holdout: int, seed: int, font_root: str = "") -> dict:
    """The hard folder (cached) and its shard folders per stored size: {size: (closed, open)},
    ``{shards}-{size}`` and ``{shards}-{size}-open``, rebuilt only when they do not match."""
    from toolkit.bench.fonts import require_hard_fonts
    from toolkit.data.shards import write_shards
    from toolkit.datasets import write_chars_folder

    fonts = require_hard_fonts(root=font_root)
    folder = write_chars_folder(root / f"hard-chars-{per_class}-seed-{seed}", per_class=per_class, seed=seed,
                                fonts=fonts, progress=True)
    log(f"hard set: {folder} ({len(fonts)} fonts, {62 * per_class} images)")
    out = {}
    for size in sorted(set(sizes)):
        closed, open_ = Path(f"{shards}-{size}"), Path(f"{shards}-{size}-open")
        for path, held in ((closed, 0), (open_, holdout)):
            if not shards_fresh(path, folder, size=size, seed=seed, holdout=held):
                log(f"sharding {folder} -> {path} ({size}x{size}" + (f", {held} classes held out)" if held else ")"))
                write_shards(folder, path, image_size=size, seed=seed, holdout_classes=held or None, overwrite=True,
                             progress=False)
        out[size] = (closed, open_)
    return out


def _raw_row(closed: Path, open_: Path) -> dict:
    closed_set, unseen = raw_pixel_metrics(closed, open_, verification=False)
    return {**closed_set, "unseen_recall_at_1": unseen["recall_at_1"], "unseen_map_at_r": unseen["map_at_r"]}


def _trained_row(name: str, shards: dict, *, minutes: float, processes: int, runs: Path) -> dict:
    import json

    from toolkit.artifacts import SUMMARY_FILE
    from toolkit.evaluation import evaluate

    _, config, size, overrides = RECIPES[name]
    closed, open_ = shards[size]
    row: dict = {}
    for folder, tag in ((closed, "closed"), (open_, "open")):
        run_dir = runs / f"{name}-{tag}"
        took = launch_embed("accuracy", CONFIGS / config, [*overrides, f"shards={folder}", f"max_minutes={minutes}"],
                            run_dir=run_dir, processes=processes)
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        if tag == "closed":
            val = evaluate(run_dir, str(folder), "val", "knn", num_workers=0)
            row.update(knn_accuracy=val["knn_accuracy"], map_at_r=val["retrieval"]["map_at_r"], minutes=took,
                       train_minutes=summary.get("minutes"), steps=summary.get("steps"), epochs=summary.get("epochs"))
        else:
            test = evaluate(run_dir, str(folder), "test", num_workers=0)["retrieval"]
            row.update(unseen_recall_at_1=test["recall_at_1"], unseen_map_at_r=test["map_at_r"], open_minutes=took)
    return row


def _rows(rows) -> list[str]:
    names = [r.strip() for r in (rows.split(",") if isinstance(rows, str) else rows) if str(r).strip()]
    bad = [r for r in names if r not in ROWS]
    if bad or not names:
        raise ConfigError(f"toolkit bench accuracy: --rows takes a comma-separated subset of {','.join(ROWS)}, got {rows!r}")
    return names


def table_lines(results: dict, *, minutes: float, processes: int) -> list[str]:
    """The README table: one row per recipe, the budget in the header."""
    heads = [h for _, h in COLUMNS]
    lines = [f"| embeddings ({processes} CPU processes, {minutes:g}-minute cap) | " + " | ".join(heads)
             + " | training (min, steps) |", "| --- |" + " ---: |" * (len(heads) + 1)]
    for name, row in results.items():
        label = "raw pixels" if name == "raw" else RECIPES[name][0]
        took = "-" if name == "raw" else f"{row['train_minutes']:.1f}, {row['steps']}"
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.4f}" for c, _ in COLUMNS) + f" | {took} |")
    return lines


def main(*, rows: str = ",".join(ROWS), minutes: float = 5.0, processes: int = 2, per_class: int = 120,
         holdout: int = 12, seed: int = 0, shards: str = "shards/hard", font_root: str = "", data_only: bool = False,
         out: str = "") -> dict:
    require_ints("accuracy", [("processes", processes, 1), ("per_class", per_class, 10), ("holdout", holdout, 2),
                              ("seed", seed, 0)])
    if not minutes > 0:
        raise ConfigError(f"toolkit bench accuracy: --minutes must be > 0, got {minutes}")
    if holdout > 60:
        raise ConfigError(f"toolkit bench accuracy: --holdout must leave at least 2 of the 62 classes, got {holdout}")
    names = _rows(rows)
    sizes = [RAW_SIZE if n == "raw" else RECIPES[n][2] for n in names] if not data_only else \
        [RAW_SIZE, *(r[2] for r in RECIPES.values())]
    with data_root() as (root, _):
        return _run(names, shards=shards, root=root, sizes=sizes, per_class=per_class, holdout=holdout, seed=seed,
                    font_root=font_root, data_only=data_only, minutes=minutes, processes=processes, out=out)


def _run(names, *, shards, root, sizes, per_class, holdout, seed, font_root, data_only, minutes, processes, out) -> dict:
    built = hard_shards(shards, root=root, sizes=sizes, per_class=per_class, holdout=holdout, seed=seed,
                        font_root=font_root)
    if data_only:
        for size, (closed, open_) in built.items():
            print(f"hard set shards at {size}x{size}: {closed} (62 classes) and {open_} ({holdout} held out)")
        return {str(size): [str(c), str(o)] for size, (c, o) in built.items()}
    results = {}
    for name in names:
        log(f"--- {name}")
        results[name] = _raw_row(*built[RAW_SIZE]) if name == "raw" else _trained_row(
            name, built, minutes=minutes, processes=processes, runs=root / "accuracy-runs")
    print(f"\nhard character set: 62 classes x {per_class} images, 85/15 train/val; unseen: {holdout} classes held out "
          f"({', '.join(str(o) for _, o in built.values())}); each recipe trained twice (all classes; without the "
          "held-out ones)\n")
    print("\n".join(table_lines(results, minutes=minutes, processes=processes)))
    report = {"shards": {str(k): [str(c), str(o)] for k, (c, o) in built.items()}, "minutes": minutes,
              "processes": processes, "rows": results}
    if out:
        write_json(out, report)
    return report
