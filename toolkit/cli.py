"""``toolkit`` command line (fire). Run ``toolkit --help`` or ``toolkit COMMAND --help``.

Commands:
  shard     image folder -> WebDataset shards (+ manifest, skipped/ignored lists, _info.json)
  demo      the whole job on scikit-learn's handwritten digits: shard, embed, classify, report
  evaluate  accuracy (kNN, head) and open-set retrieval metrics of a trained run on a shard split
  predict   label + confidence for image files ("unknown" beyond the calibrated distance: --unknown)
  export    embeddings of a split as a table + .npy arrays
  index     embed a gallery (shards or an image folder) into a saved faiss index
  index-add add images to an index without re-embedding the others
  search    nearest gallery images of query images (+ a PNG grid)
  sweep     W&B sweeps over the launch scripts (or --local / --dry_run offline)
  bench     benchmarks that print both sides of a comparison in one run

Training runs through ``accelerate launch launch/embed.py`` (and ``launch/classify.py``; see
the README) so the same command works on CPU, one GPU, many GPUs and many machines.
``python -m toolkit`` is the same command line.
"""
from __future__ import annotations

import inspect
import sys
import time
import typing
from pathlib import Path

from toolkit.errors import ConfigError, DataError


def shard(
    src: str,
    out: str,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    image_size: int = 32,
    grayscale: bool = True,
    samples_per_shard: int = 1000,
    workers: int = 0,
    image_timeout_s: float = 60.0,
    overwrite: bool = False,
    holdout_classes: str = "",
    query_fraction: float = 0.0,
    group_by_class: str = "auto",
):
    """Write an image folder (one sub-folder per class) as WebDataset shards.

    Lists SRC into a pandas manifest (relative path, class name, class index with classes
    sorted, split), splits it stratified per class, preprocesses every image in worker
    processes and writes OUT/train-000000.tar ..., OUT/val-000000.tar ..., OUT/_info.json,
    OUT/manifest.csv and OUT/skipped.csv (unreadable images with the reason). Output goes to
    a temporary folder first and is moved into place only when complete.

    Open-set (class-disjoint) evaluation: --holdout_classes puts whole classes, never seen in
    training, into a third split, OUT/test-000000.tar ...; the other (known) classes are split
    train/val exactly as without it. _info.json then lists the known classes under "classes"
    (the model's classes, indices 0..C-1) and the held-out ones under "holdout_classes"
    (indices C.. after them); the manifest gets is_query / is_gallery columns for the test
    images (empty for train/val).

    Args:
        src: image folder, SRC/<class>/<image>; files without an image extension are ignored (and listed in OUT/ignored.csv).
        out: output folder for the shards; must not exist unless --overwrite.
        val_fraction: share of each class put in the validation split (round(f*n) images; a class with a single image stays in train, with a warning).
        seed: seed of the split and of the shuffle inside the shards.
        image_size: images are resized to SIZE x SIZE at shard time (the seed uses 32); 0 keeps the original size.
        grayscale: convert to one grey channel (the seed does); --nograyscale keeps RGB.
        samples_per_shard: samples per tar file.
        workers: preprocessing processes (0 = one per CPU core, at most 8); an image that crashes or hangs its process is skipped and listed, it never stops the run.
        image_timeout_s: seconds one image may take to decode and preprocess before it is skipped (listed in skipped.csv).
        overwrite: replace OUT if it is a shard folder written by `toolkit shard` (or empty); the old one is removed only after the new one is complete. Anything else at OUT, and an OUT inside SRC or holding it, is refused.
        holdout_classes: classes to hold out whole into the test split (default: none). A fraction in (0, 1) such as 0.2 holds out max(1, round(0.2*C)) of the C classes; an integer such as 2 holds out that many; either way they are picked at random with --seed (same seed, same classes). A comma list such as 8,9 or cat,dog names them (a single class whose name is a number needs a trailing comma: 9,). At least 2 classes must stay known.
        query_fraction: roles of the test images when retrieving them against each other. 0 (default): every test image is both a query and a gallery image (leave-one-out). A fraction in (0, 1) such as 0.2: per held-out class, round(0.2*n) images (at least 1, at most n-1; picked with --seed) are queries only and the rest are gallery only. Needs --holdout_classes.
        group_by_class: true|false|auto (default auto). true keeps each class whole in one train shard (shards are then dealt whole to loader workers, so P×K batches fill from whole classes: for many classes of a few images each, such as 20,000 classes of 3-6 images); false mixes every class into every shard; auto groups when the train split has at least 1,000 classes with a median below 64 images.
    """
    from toolkit.data.shards import write_shards

    grouping = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False, "auto": "auto"}.get(
        str(group_by_class).strip().lower())
    if grouping is None:
        raise ConfigError(f"toolkit shard: --group_by_class takes true, false or auto, got {group_by_class!r}")
    t0 = time.time()
    info = write_shards(
        src,
        out,
        val_fraction=val_fraction,
        seed=seed,
        image_size=image_size or None,
        grayscale=grayscale,
        samples_per_shard=samples_per_shard,
        workers=workers or None,
        image_timeout_s=image_timeout_s,
        overwrite=overwrite,
        holdout_classes=holdout_classes or None,
        query_fraction=query_fraction,
        group_by_class=grouping,
    )
    _print_shard_summary(info, out, time.time() - t0)


def _print_shard_summary(info: dict, out: str | Path, seconds: float) -> None:
    from toolkit.data.shards import shard_report_lines

    print("\n".join(shard_report_lines(info, out, seconds=seconds)))


def shipped_config(*parts: str) -> Path:
    """A config file shipped with the package: ``toolkit/configs`` (a link to the checkout's ``configs/``)."""
    path = Path(__file__).resolve().parent.joinpath("configs", *parts)
    if not path.is_file():
        raise DataError(f"shipped config {'/'.join(parts)} not found in {path.parent}: reinstall the toolkit")
    return path


def demo(*, shards: str = "", runs: str = "runs", overwrite: bool = False, tracker: str = "wandb", epochs: int = 0,
         holdout_classes: str = ""):
    """Run the whole job on scikit-learn's handwritten digits (1,797 real 8x8 images, no download).

    Writes the digits as an image folder in the cache (~/.cache/toolkit/digits or
    $TOOLKIT_CACHE), shards it into SHARDS (32x32 grey, 15 % stratified validation) and
    trains the ZFNet embedder (configs/embed/digits.yaml, kNN validation as it goes), then a
    classifier head on the frozen embedder (configs/classify/digits.yaml), and ends with kNN
    vs head accuracy on the validation split and the paths of the report and plots. W&B logs
    offline unless you are logged in.

    With --holdout_classes 2 (a count, a fraction or a list such as 8,9) those digit classes
    are held out of training: the embedder learns the others, and the demo ends with the
    open-set table too: retrieval among the unseen digits, raw pixels vs the embedder, and
    recognition of known vs unseen digits.

    Args:
        shards: shard folder to write (re-used if complete, unless --overwrite); default shards/digits, or shards/digits-open with --holdout_classes.
        runs: parent folder of the run folders (runs/digits-embed, ...; runs/digits-open-* with --holdout_classes).
        overwrite: rebuild the shards and start the runs afresh.
        tracker: wandb (offline unless logged in) or none.
        epochs: train both stages for this many epochs (0 = the configs' 20 and 8; 1 is a quick check that everything runs).
        holdout_classes: digit classes to keep out of training, for the open-set table (see `toolkit shard --help`).
    """
    from toolkit.datasets import default_data_dir, write_digits_folder
    from toolkit.data.shards import read_info, write_shards

    t0 = time.time()
    if epochs < 0:
        raise ConfigError(f"toolkit demo: --epochs must be >= 0, got {epochs}")
    open_set = bool(holdout_classes)
    shards = shards or ("shards/digits-open" if open_set else "shards/digits")
    folder = write_digits_folder(default_data_dir())
    print(f"[1/3] digits image folder: {folder}")
    if overwrite or not _demo_shards_reusable(shards, holdout_classes):
        info = write_shards(folder, shards, image_size=32, overwrite=True, holdout_classes=holdout_classes or None)
        _print_shard_summary(info, shards, time.time() - t0)
    else:
        print(f"re-using shards in {shards} (pass --overwrite to rebuild)")
    info = read_info(shards)
    prefix = "digits-open" if open_set else "digits"
    embed_dir, classify_dir = Path(runs) / f"{prefix}-embed", Path(runs) / f"{prefix}-classify"
    print(f"[2/3] training the embedder -> {embed_dir}")
    common = [f"tracker={tracker}", "overwrite=true", *([f"epochs={epochs}", "val_every=1"] if epochs else [])]
    from toolkit.recipes import classify as classify_recipe, embed as embed_recipe

    rc = embed_recipe.main(
        ["--config", str(shipped_config("embed", "digits.yaml")), f"shards={shards}", f"run_dir={embed_dir}", *common],
    )
    if rc:
        sys.exit(rc)
    print(f"[3/3] training the classifier head on the frozen embedder -> {classify_dir}")
    rc = classify_recipe.main(
        ["--config", str(shipped_config("classify", "digits.yaml")), f"embedder={embed_dir}", f"shards={shards}",
         f"run_dir={classify_dir}", *(c for c in common if c != "val_every=1")],
    )
    if rc:
        sys.exit(rc)
    from toolkit.artifacts import REPORT_MD
    from toolkit.report import load_report, open_set_table_lines

    report = load_report(classify_dir)
    known = f", {len(info.classes)} classes trained on" if open_set else ""
    print()
    print(f"| validation split ({report['num_samples']} images{known}) | accuracy |")
    print("|---|---:|")
    print(f"| kNN (k = {report['knn_k']}) on the embeddings | {report['knn_accuracy']:.4f} |")
    print(f"| classifier head on the frozen embedder | {report['head_accuracy']:.4f} |")
    if report.get("open_set_section"):
        print()
        print("\n".join(open_set_table_lines(report["open_set_section"])))
    print()
    print(f"report: {classify_dir / REPORT_MD}")
    for name, path in sorted(report["plots"].items()):
        print(f"plot {name}: {classify_dir / path}")
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min")


def _demo_shards_reusable(shards: str, holdout_classes: str) -> bool:
    """A complete shard folder written with the same held-out classes request."""
    from toolkit.data.shards import read_info

    try:
        info = read_info(shards)
    except DataError:
        return False
    return str(info.holdout.get("spec") or "") == holdout_classes


def bench(what: str = "loader", **options):
    """Benchmarks that print both sides, side by side in one run, and their ratio.

    WHAT is one of:
      loader  shard stream vs the seed's reading (pandas manifest + per-item PIL open,
              grayscale, resize from the original folder), same batch size and workers.
              Options: --size camera|small|both, --batch_size 64, --workers 2, --images N,
              --per_class N, --repeats 2, --seed 0, --out FILE.json; then samples/s per
              worker process and the workers a GPU needs (--per_worker false skips it,
              --gpu_rates 2000,10000)
      mining  semi-hard loss forward+backward time and peak memory: toolkit, the same
              objective vectorised, pytorch-metric-learning (dev extra); then the per-rank
              cost with W ranks (own anchors) vs every rank mining the whole global batch.
              Options: --sizes 256,1024,2048,4096 (0: skip), --per_rank 2048,4096,8192,16384
              (0: skip), --worlds 1,2,8,64, --repeats 3, --timeout 120,
              --device auto|cpu|cuda, --out FILE.json
      step    toolkit embed step (Accelerate + gather + mining + optimizer) vs a plain
              PyTorch loop, same model/batch/precision. `toolkit bench step --help`-style
              options are the keyword arguments of toolkit/bench/step.py main().
      knn     kNN (k = 13): faiss-screened exact, the toolkit's torch kNN, scikit-learn, raw
              faiss (and --approx hnsw,ivf), time and agreement. --sizes 10000,100000,1000000
      openset retrieval on 12 held-out classes of the character folder: raw pixels vs a
              5-minute embedder on 2 CPU processes. Options: --holdout 12, --minutes 5,
              --processes 2, --per_class 120, --font_root DIR, --out FILE.json
      accuracy  recipes on the hard character set (raw pixels, seed.yaml, fast.yaml before
              and after its search), 5 minutes each on 2 CPU processes: kNN val accuracy and
              unseen-class Recall@1. Options: --rows raw,seed,before,fast, --minutes 5,
              --processes 2, --per_class 120, --holdout 12, --shards shards/hard,
              --font_root DIR, --data_only (only build the set's shards), --out FILE.json
      fonts   the hard set's fonts: how many are usable; --install runs apt-get for them.
      scaling one process vs two (gloo): compute, gather and mining time per step.
      validate  validation gathered on rank 0 vs sharded across gloo processes: wall time,
              the busiest rank's peak memory, same metrics. Options: --references 1000000,
              --queries 150000, --classes 1000, --processes 2, --out FILE.json
      classes P×K streaming over 62 classes vs 20,000 classes of 3-6 images, shards mixed vs
              grouped by class, the bounded batcher vs the one before: samples/s, peak buffered
              samples vs the bound, repeats in batches, views per image, passes per epoch.
              Options: --classes 20000, --low 3, --high 6, --batch_size 64, --K 4,
              --data 62,many, --topologies 1x0,2x2, --max_seconds 30, --out FILE.json
      gpu     seed network at 220x220 on a GPU: dtype x channels_last x torch.compile,
              images/s, share of the bf16 peak, loader workers. Options: --dtypes bf16,fp32,
              --channels_last true|false|both, --compile ..., --compile_mode, --budget_s,
              --device; prints a JSON line saying it skipped on machines without CUDA.
    Unknown benchmarks or options are refused before any work (the error lists the options).
    """
    from toolkit.bench import run_bench

    run_bench(what, **options)


def evaluate(run: str, *, shards: str = "", split: str = "val", method: str = "", k: int = 0, threshold: float = -1.0,
             device: str = "", workers: int = 2, json: bool = False):
    """Score a trained run on a shard split: closed-set accuracy and open-set retrieval.

    RUN is an embedding run folder (or its best_embedder.pt) or a classifier run folder (or
    its best_head.pt). Printed:
      * closed set, when the split's classes are the model's: kNN (k = 13) accuracy and, for
        a classifier run, the head's;
      * retrieval inside the split, any classes (a test split of held-out classes, another
        data set): each query against the gallery (the roles `toolkit shard` recorded; by
        default every image, leave-one-out): Recall@1/5/10, precision@k, MAP@R, R-precision,
        and from all query-gallery pairs FNMR at FMR 1e-2 and 1e-3 and ROC AUC;
      * on a test split of held-out classes: open-set recognition (known val images vs the
        unseen ones, "unknown" beyond the embedder's calibrated distance).
    --json prints every metric (per-class accuracy included).

    Args:
        run: run folder or model file.
        shards: shard folder to evaluate (default: the one the embedder was trained on).
        split: val, train or test (held-out classes, from `toolkit shard --holdout_classes`).
        method: knn, head or both (default: both for a classifier run, knn for an embedding run; none on other classes).
        k: neighbours for kNN (default: the embedder's knn_k, 13).
        threshold: "unknown" distance for open-set recognition (default: the one calibrated and saved with the embedder).
        device: cpu, cuda, cuda:1 ... (default: cuda when available).
        workers: data-loader worker processes.
        json: print the metrics as JSON.
    """
    import json as _json

    from toolkit.evaluation import evaluate as evaluate_run

    m = evaluate_run(run, shards or None, split, method or None, k=k or None, threshold=None if threshold < 0 else threshold,
                     device=device or None, num_workers=workers)
    if json:
        print(_json.dumps(m, indent=2))
        return
    print("\n".join(evaluation_lines(m)))


def evaluation_lines(m: dict) -> list[str]:
    """What `toolkit evaluate` prints for the metrics dict of :func:`toolkit.evaluation.evaluate`."""
    which = "" if m.get("closed_set", True) else f" (classes the model never saw: {', '.join(m.get('classes', [])[:10])})"
    lines = [f"{m['split']} split of {m['shards']}: {m['num_samples']} images, {m['num_classes']} classes{which}"]
    if "knn_accuracy" in m:
        lines.append(f"  kNN (k={m['knn_k']}) accuracy {m['knn_accuracy']:.4f}  [{m['knn_reference']}]")
    if "head_accuracy" in m:
        lines.append(f"  head accuracy      {m['head_accuracy']:.4f}  (NLL {m['head_loss']:.4f})")
    r = m.get("retrieval")
    if r:
        lines.append(f"  retrieval: {r['num_queries']} queries vs {r['num_gallery']} gallery images"
                     + (f" ({r['queries_without_match']} queries without a match left out)" if r.get("queries_without_match") else ""))
        lines.append("    " + "  ".join(f"R@{k} {r[f'recall_at_{k}']:.4f}" for k in (1, 5, 10) if f"recall_at_{k}" in r)
                     + f"  MAP@R {r['map_at_r']:.4f}  R-precision {r['r_precision']:.4f}")
        if "roc_auc" in r:
            fnmr = "  ".join(f"FNMR@FMR={f} {r[f'fnmr_at_fmr_{f}']:.4f}" for f in ("0.01", "0.001") if f"fnmr_at_fmr_{f}" in r)
            lines.append(f"    verification ({r.get('verification_pairs', 0)} pairs): ROC AUC {r['roc_auc']:.4f}  {fnmr}")
    o = m.get("open_set")
    if o:
        lines.append(f"  open set ({o['num_known']} known val images, {o['num_unknown']} unseen; unknown beyond distance {o['threshold']:.4f}):")
        lines.append(f"    accuracy {o['open_set_accuracy']:.4f}  known correct {o['known_accuracy']:.4f}  "
                     f"known rejected {o['known_rejected']:.4f}  unseen rejected {o['unknown_rejected']:.4f}  AUROC {o['open_set_auroc']:.4f}")
    lines += [f"  note: {n}" for n in m.get("notes", [])]
    return lines


def predict(run: str, *images: str, method: str = "knn", k: int = 0, shards: str = "", unknown: bool = False,
            threshold: float = -1.0, device: str = "", json: bool = False):
    """Classify image files with a trained run: one line per image, PATH<TAB>LABEL<TAB>CONFIDENCE.

    Images get the shard-time preprocessing of the run's shards, then the model. kNN: majority
    of the k = 13 nearest training embeddings saved with the embedder, confidence = vote share;
    head: the classifier run's head, confidence = softmax probability. A missing or unreadable
    file gets PATH<TAB>error: REASON, the other files are still answered, and the exit status is 1.

    Args:
        run: embedding or classifier run folder (or model file); --method head needs a classifier run.
        images: image files.
        method: knn or head.
        k: neighbours for kNN (default: the embedder's knn_k, 13).
        shards: shard folder whose preprocessing to use (default: recorded in the run).
        unknown: answer "unknown" for an image farther from every training embedding than the distance calibrated with the embedder (on val, at its unknown_fmr); adds a DISTANCE column.
        threshold: the "unknown" distance to use instead of the calibrated one (implies --unknown).
        device: cpu, cuda, ... (default: cuda when available).
        json: print a JSON list of {path, label, confidence} / {path, error}.
    """
    import json as _json

    from toolkit.inference import predict as predict_images

    if not images:
        raise ConfigError("toolkit predict: give at least one IMAGE file")
    answers = predict_images(run, list(images), method=method, k=k or None, shards=shards or None,
                             unknown=unknown or threshold >= 0, threshold=None if threshold < 0 else threshold,
                             device=device or None)
    if json:
        print(_json.dumps(answers, indent=2))
    else:
        for a in answers:
            if "error" in a:
                print(f"{a['path']}\terror: {a['error']}")
            else:
                extra = f"\t{a['distance']:.4f}" if "distance" in a else ""
                print(f"{a['path']}\t{a['label']}\t{a['confidence']:.4f}{extra}")
    if any("error" in a for a in answers):
        sys.exit(1)


def export(run: str, *, out: str, shards: str = "", split: str = "val", device: str = "", workers: int = 2):
    """Write the embeddings of a shard split: a table (CSV, or parquet when pyarrow is installed) plus .npy arrays.

    OUT.csv / OUT.parquet holds key, label, class, path (from the shards' manifest), e000 ...;
    next to it OUT.keys.npy, OUT.labels.npy and OUT.embeddings.npy (N, D float32, unit rows),
    rows in the same (key) order.

    Args:
        run: embedding or classifier run folder (or model file).
        out: output file; a .csv or .parquet suffix picks the format, none picks parquet if pyarrow is installed, else CSV.
        shards: shard folder (default: the one the embedder was trained on); its classes must be the model's.
        split: val or train.
        device: cpu, cuda, ... (default: cuda when available).
        workers: data-loader worker processes.
    """
    from toolkit.inference import export as export_split, export_paths

    n = export_split(run, shards or None, out, split, device=device or None, num_workers=workers)
    files = export_paths(out)
    print(f"exported {n} {split} embeddings: {files['table']} (+ {files['embeddings'].name}, {files['keys'].name}, {files['labels'].name})")


def export_model(run: str, *, out: str, format: str = "onnx", shards: str = "", overwrite: bool = False, step: int = 0):
    """Write a trained embedder (and its head) for serving: ONNX, TorchScript or safetensors, with model.json.

    The ONNX and TorchScript graphs take uint8 images (N, C, H, W) at the shard-time size and
    return L2-normalised embeddings (N, D): the input transform (x/255, (x-0.5)/0.5, resize to
    the input size) is inside the graph. A classifier run also gets head.* (embeddings ->
    log-probabilities). model.json records inputs, outputs, the shard-time preprocessing a
    service must apply to image files, the classes, and each file's sha256. safetensors writes
    the weights only (rebuild with toolkit.models.build_embedder, as model.json says).

    Args:
        run: embedding or classifier run folder (or model file).
        out: output folder (written beside it, moved into place when complete).
        format: onnx (needs the onnx package: pip install "toolkit[export]"), torchscript or safetensors.
        shards: shard folder whose preprocessing to record (default: the one the embedder was trained on).
        overwrite: replace OUT if `toolkit export-model` wrote it (anything else at OUT is refused).
        step: export the weights of training checkpoint RUN/checkpoints/step-N instead of the best embedder (0).
    """
    from toolkit.export_model import export_model as write_export

    meta = write_export(run, out, format=format, overwrite=overwrite, shards=shards or None, step=step)
    files = ", ".join(f["file"] for f in meta["files"].values())
    print(f"exported {meta['format']}: {out}/{{{files}, model.json}}")


def index(run: str, gallery: str, *, out: str, split: str = "all", kind: str = "flat", nlist: int = 0, nprobe: int = 16,
          hnsw_m: int = 32, ef_search: int = 128, shards: str = "", device: str = "", workers: int = 0,
          overwrite: bool = False):
    """Embed a gallery with a trained run and save a faiss index for `toolkit search`.

    GALLERY is a shard folder (its splits, labels and original paths) or a plain image folder
    (GALLERY/<class>/<image>, or images directly in it: no label), preprocessed exactly as
    the run's shards were. OUT is a folder: index.faiss (faiss's own format), vectors.npy
    (the embeddings: images can be added later without re-embedding the others),
    items.csv (position, key, path, label) and meta.json (embedder path + sha256,
    preprocessing, index kind). Unreadable images are skipped and listed.
    Add images later with `toolkit index-add OUT IMAGE_OR_FOLDER...`.

    Args:
        run: embedding or classifier run folder (or model file) whose embedder to use.
        gallery: shard folder or image folder.
        out: index folder to write (must not exist unless --overwrite).
        split: shard galleries: all (every split), or a name or comma list (train,val,test).
        kind: flat (exact, the default), ivf (clustered, approximate; for large galleries) or hnsw (graph, approximate).
        nlist: ivf cells (0 = about 4 sqrt(N)).
        nprobe: ivf cells searched per query.
        hnsw_m: hnsw links per node.
        ef_search: hnsw candidate list length when searching.
        shards: image galleries: shard folder whose preprocessing to use (default: the run's).
        device: embedding device: cpu, cuda, ... (default: cuda when available).
        workers: data-loader worker processes (shard galleries).
        overwrite: replace OUT if it is an index folder written by `toolkit index` (or empty); nothing else is replaced.
    """
    from toolkit.gallery import build_index, format_index_info
    from toolkit.search import IndexSpec

    spec = IndexSpec(kind=kind, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
    info = build_index(run, gallery, out, split=split, spec=spec, shards=shards or None, device=device or None,
                       num_workers=workers, overwrite=overwrite)
    print("\n".join(format_index_info(info)))


def index_add(index: str, *images: str, run: str = "", device: str = ""):
    """Add images to an index folder written by `toolkit index`; only the new images are embedded.

    Each IMAGE is an image file (no label) or an image folder (FOLDER/<class>/<image>, label =
    class folder). The embedder recorded in the index is used (its sha256 must match; --run
    names it if it moved). Images already in the index, missing and unreadable files are
    listed and not added. The index folder is rewritten atomically.

    Args:
        index: index folder.
        images: image files or image folders.
        run: the embedder to use instead of the recorded one (a run folder or model file).
        device: cpu, cuda, ... (default: cuda when available).
    """
    from toolkit.gallery import add_to_index

    if not images:
        raise ConfigError("toolkit index-add: give at least one IMAGE file or folder")
    skipped: list = []
    added = 0
    files = [p for p in images if not Path(p).is_dir()]
    for folder in (p for p in images if Path(p).is_dir()):
        added += add_to_index(index, folder, run=run or None, device=device or None, skipped=skipped)
    if files:
        added += add_to_index(index, files, run=run or None, device=device or None, skipped=skipped)
    print(f"added {added} images to {index}")
    for path, reason in skipped:
        print(f"  not added: {path}: {reason}")


def search(index: str, *images: str, k: int = 5, grid: str = "", run: str = "", device: str = "", json: bool = False):
    """The K nearest gallery images of each query image in an index folder (`toolkit index`).

    Prints, per query, its path then one line per neighbour: RANK<TAB>DISTANCE<TAB>LABEL<TAB>PATH
    (Euclidean distance between the embeddings, nearest first). --grid writes a PNG: one row per
    query, the query then its neighbours, framed green when the neighbour's label is the
    query's class folder name, red otherwise. A missing or unreadable query file gets
    `error: REASON`, the others are still answered, and the exit status is 1.

    Args:
        index: index folder.
        images: query image files.
        k: neighbours per query.
        grid: PNG file to write the grid of queries and neighbours to.
        run: the embedder to use instead of the one the index records.
        device: cpu, cuda, ... (default: cuda when available).
        json: print a JSON list of {path, neighbours: [{path, label, key, distance}]} / {path, error}.
    """
    import json as _json

    from toolkit.gallery import format_search, load_index, search_images, write_search_grid

    if not images:
        raise ConfigError("toolkit search: give at least one IMAGE file")
    gi = load_index(index)
    results = search_images(gi, list(images), k=k, run=run or None, device=device or None)
    print(_json.dumps(results, indent=2) if json else "\n".join(format_search(results)))
    if grid:
        print(f"grid: {write_search_grid(results, grid, index_dir=gi)}", file=sys.stderr if json else sys.stdout)
    if any("error" in r for r in results):
        sys.exit(1)


def sweep(
    file: str,
    *,
    count: int = 10,
    project: str = "metric-toolkit",
    entity: str = "",
    dry_run: bool = False,
    local: int = 0,
    seed: int = 0,
    runs: str = "runs/sweep-local",
):
    """Create a W&B sweep from FILE (configs/sweeps/*.yaml) and run trials with the W&B agent.

    Each trial is the sweep's command, e.g. `accelerate launch launch/embed.py --config ...
    --lr=0.003 --margin=0.2 ...`: the same entry point as any run, on as many processes as the
    accelerate config says. Sweeps need a W&B server (run `wandb login`); offline, use
    --dry_run to print the commands or --local N to run N trials here (the first N points of a
    grid sweep, random samples otherwise) and print them ranked by the sweep's metric.

    Args:
        file: sweep file in W&B's format; checked first (metric logged by the validator, parameters are config keys).
        count: trials this agent runs.
        project: W&B project.
        entity: W&B entity (user or team); empty = your default.
        dry_run: print a sampled trial's parameters and the exact command the agent would run, then stop.
        local: run this many trials offline (grid: its first N points; otherwise random search), no W&B server needed.
        seed: seed of the local sampling.
        runs: parent folder of the local trials' run folders (trial-000, trial-001, ...).
    """
    from toolkit.sweep import (
        create_and_run, expand_command, grid_parameters, load_sweep, results_table, run_local, sample_parameters,
    )

    spec = load_sweep(file)
    if dry_run:
        params = grid_parameters(spec)[0] if spec["method"] == "grid" else sample_parameters(spec, seed=seed)
        print("parameters:", params)
        print("command:", " ".join(expand_command(spec, params)))
        return
    if local:
        results = run_local(spec, trials=local, seed=seed, run_root=runs)
        failed = [r for r in results if r["returncode"]]
        print(f"\n{len(results) - len(failed)}/{len(results)} trials finished; runs in {runs}/\n")
        print("\n".join(results_table(results, spec)))
        if failed:
            sys.exit(1)
        return
    sweep_id = create_and_run(spec, count=count, project=project, entity=entity or None)
    print(f"sweep {sweep_id} done ({count} trials)")


COMMANDS = {
    "shard": shard, "demo": demo, "evaluate": evaluate, "predict": predict, "export": export,
    "export-model": export_model, "index": index, "index-add": index_add, "search": search, "sweep": sweep, "bench": bench,
}


def _flag_value(flag: str, value: str) -> bool:
    """``--flag=VALUE`` of a bool option: true/false (1/0, yes/no, on/off), else a one-line error."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{flag} takes true or false, got {value!r}")


def _prepare_argv(argv: list[str]) -> list[str]:
    """Check ``argv`` against the command's signature and return what fire should parse.

    Two things fire gets wrong on its own. It runs the function *before* complaining about a
    flag it does not know, so unknown ``--flags`` and extra positionals are refused here, before
    any work. And it turns every argument into a Python value (``2024`` an int, ``True`` a bool,
    ``a,b`` a tuple, ``[x]`` a list), so a folder called ``2024`` would arrive as a number:
    every argument of a parameter typed ``str`` (paths, names) is handed to fire as a quoted
    string literal, which fire reads back as exactly the string that was typed.
    """
    if not argv or argv[0] not in COMMANDS:
        return argv
    fn = COMMANDS[argv[0]]
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return argv  # the command validates its own options (e.g. bench)
    is_str = {name: hint is str for name, hint in typing.get_type_hints(fn).items()}
    known = set(params)
    positional = [k for k, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    options = ", ".join("--" + k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    varargs = next((k for k, p in params.items() if p.kind is inspect.Parameter.VAR_POSITIONAL), None)

    def takes_value(name: str) -> bool:
        return not isinstance(params[name].default, bool)

    def literal(name: str | None, value: str) -> str:
        return repr(value) if name is not None and is_str.get(name) else value

    out, filled, i, rest = [argv[0]], set(), 0, argv[1:]

    def fill(name: str) -> None:
        if name in filled:
            raise ConfigError(f"toolkit {argv[0]}: {name.upper()} given twice")
        filled.add(name)

    while i < len(rest):
        tok = rest[i]
        if tok in ("--", "-h", "--help"):
            return out + rest[i:]  # fire shows help / separates its own flags
        if tok.startswith("-"):
            flag, eq, value = tok.partition("=")
            body = flag.lstrip("-").replace("-", "_")
            negated = tok.startswith("--") and body.startswith("no") and body[2:] in known
            if tok.startswith("--"):
                name = body[2:] if negated else body
            else:  # fire's short flag: the unique parameter starting with that letter
                matches = [k for k in params if k.startswith(body)] if len(body) == 1 else []
                name = matches[0] if len(matches) == 1 else None
            if name not in known:
                raise ConfigError(f"toolkit {argv[0]}: unknown option {flag} (known: {options})")
            if name in positional:
                fill(name)
            if not takes_value(name):
                # A bare bool flag is written out: fire would take a following word as its value
                # (`--json a.png b.png` would answer b.png only).
                out.append(f"--{name}={_flag_value(flag, value) if eq else not negated}")
            elif eq:
                out.append(f"--{name}={literal(name, value)}")
            elif i + 1 < len(rest):
                out += [f"--{name}", literal(name, rest[i + 1])]  # `--flag value`
                i += 1
            else:
                out.append(tok)
        else:
            free = [p for p in positional if p not in filled]
            if free:
                fill(free[0])
                out.append(literal(free[0], tok))
            elif varargs is not None:
                out.append(literal(varargs, tok))
            else:
                raise ConfigError(f"toolkit {argv[0]}: unexpected argument {tok!r} (takes {len(positional)}: {' '.join(p.upper() for p in positional)})")
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS and ("--help" in argv or "-h" in argv) and "--" not in argv:
            argv = [argv[0], "--", "--help"]  # fire's own help syntax (else **options would swallow it)
        fire.Fire(COMMANDS, command=_prepare_argv(argv), name="toolkit")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
