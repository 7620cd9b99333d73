"""Semi-hard mining cost: the toolkit's O(B²) loss vs pytorch-metric-learning and a plain
vectorised semi-hard loss, same embeddings; and the per-rank cost with W ranks.

**Against other code** (``--sizes``). For each global batch size B (128-d unit vectors, P×K
labels with K = 4), times forward + backward and measures peak memory (each in a fresh
subprocess: peak RSS growth on CPU, ``torch.cuda.max_memory_allocated`` on GPU) of

* the toolkit: ``toolkit.losses.triplet_loss(strategy="semihard")``, one term per
  anchor-positive pair with its semi-hard negative (FaceNet / TF-Addons), O(B²) time;
* "vectorised": the *same objective* written the plain way, one (pairs, B) masked matrix
  (``vectorised_semihard``; TF-Addons' ``triplet_semihard_loss`` tiles a (B², B) one):
  O(B²·K) time and memory; its loss is checked against the toolkit's;
* pytorch-metric-learning's ``TripletMarginMiner(type_of_triplets="semihard")`` +
  ``TripletMarginLoss`` (margin 0.2): a *different* objective. PML's "semihard" keeps every
  triplet (a, p, n) with d(a, p) < d(a, n) < d(a, p) + margin and averages over all of them,
  so it enumerates all B·K·B triplets (a B×B×B mask while that has fewer than 2³¹ elements,
  a per-anchor Python loop beyond): O(B³).

**Per rank** (``--per_rank``). With W ranks of B/W images each, ``anchors="own"`` has each
rank mine only its own B/W anchors against the gathered global batch: one process runs
rank 0's share (``own_anchor_loss`` over rows 0..B/W, forward + backward) for W = 1, 2, 8,
64, side by side with today's every-rank-mines-all (``triplet_loss`` on the whole B, the
same on every rank). Collectives are not in the clock (``toolkit bench scaling`` times them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

DEFAULT_SIZES = (256, 1024, 2048, 4096)
DEFAULT_PER_RANK = (2048, 4096, 8192, 16384)
DEFAULT_WORLDS = (1, 2, 8, 64)

# Short calls repeat until this much time is spent (timeit's autorange idea): a millisecond
# call timed 3 times is mostly noise, and the best of many is the stable estimate.
_MIN_TIMED_S = 0.3
_MAX_CALLS = 200


def _batch(b: int, *, dim: int = 128, k: int = 4, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1).to(device)
    labels = torch.arange(b // k).repeat_interleave(k)[:b]
    labels = labels[torch.randperm(b, generator=g)].to(device)
    return emb, labels


def _toolkit_fn():
    from toolkit.losses import triplet_loss

    return lambda e, y: triplet_loss(e, y, margin=0.2, strategy="semihard")[0]


def vectorised_semihard(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """The toolkit's semi-hard objective written plainly: one (pairs, B) masked matrix.

    For every anchor-positive pair (a, p) whose anchor has a negative: n = the closest
    negative strictly farther than p, else the farthest negative; mean of relu(d_ap - d_an + m).
    """
    from toolkit.losses import pairwise_distances

    d = pairwise_distances(emb)  # (B, B)
    same = labels[:, None] == labels[None, :]
    neg = ~same
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    a, p = (same & ~eye & neg.any(dim=1)[:, None]).nonzero(as_tuple=True)  # (N,) each
    d_ap = d[a, p]  # (N,)
    d_an = d[a]  # (N, B)
    neg_a = neg[a]  # (N, B)
    outside = neg_a & (d_an.detach() > d_ap.detach()[:, None])  # (N, B)
    inf = torch.full_like(d_an, float("inf"))
    semi = torch.where(outside, d_an, inf).min(dim=1).values
    farthest = torch.where(neg_a, d_an, -inf).max(dim=1).values
    chosen = torch.where(outside.any(dim=1), semi, farthest)
    return torch.nn.functional.relu(d_ap - chosen + margin).mean()


def _vectorised_fn():
    return lambda e, y: vectorised_semihard(e, y, 0.2)


def _pml_fn():
    from pytorch_metric_learning import losses, miners
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    loss = losses.TripletMarginLoss(margin=0.2)
    return lambda e, y: loss(e, y, miner(e, y))


def _measure(side: str, b: int, repeats: int, device: str, min_time: float = _MIN_TIMED_S) -> dict:
    """Runs in a fresh process so peak memory belongs to this side alone: the growth of the peak
    RSS over the RSS just before the timed calls (CUDA: of the allocated memory)."""
    from toolkit.bench import peak_rss_growth, start_peak_rss

    fn = {"toolkit": _toolkit_fn, "vectorised": _vectorised_fn, "pml": _pml_fn}[side]()
    emb, labels = _batch(b, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        start = start_peak_rss()
    seconds = _best_seconds(lambda e: fn(e, labels), emb, repeats, device, min_time)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_growth(start)
    loss = float(fn(emb, labels))
    return {"side": side, "batch": b, "seconds": seconds, "peak_bytes": max(0, peak), "loss": loss}


def _run_child(side: str, b: int, repeats: int, device: str, timeout: float, min_time: float) -> dict:
    code = (
        "import json,sys; from toolkit.bench.mining import _measure; "
        f"print(json.dumps(_measure({side!r}, {b}, {repeats}, {device!r}, {float(min_time)!r})))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired:
        return {"side": side, "batch": b, "seconds": None, "peak_bytes": None, "error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return {"side": side, "batch": b, "seconds": None, "peak_bytes": None, "error": last[:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_mb(x):
    return "—" if x is None else f"{x / 2**20:.1f}"


def _fmt_per_b2(seconds, b):
    return "—" if seconds is None else f"{seconds * 1e9 / b**2:.1f}"


def _fmt_s(x):
    return "—" if x is None else f"{x * 1000:.1f}"


def _int_list(value) -> list[int]:
    # fire turns "--sizes 256,1024" into a tuple, "--sizes 256" into an int
    if isinstance(value, (tuple, list)):
        return [int(x) for x in value]
    return [int(x) for x in str(value).split(",") if x.strip()]


def _best_seconds(fn, emb: torch.Tensor, repeats: int, device: str, min_time: float = _MIN_TIMED_S) -> float:
    """Best of at least ``repeats`` timed forward + backward calls of ``fn(emb)`` (more for short
    calls, until ``min_time`` seconds are spent), after one warm-up."""
    times: list[float] = []
    while len(times) < repeats + 1 or (sum(times[1:]) < min_time and len(times) < _MAX_CALLS):
        e = emb.clone().requires_grad_(True)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(e).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def per_rank_table(global_batches: list[int], worlds: list[int], repeats: int, device: str,
                   min_time: float = _MIN_TIMED_S) -> tuple[list[str], list[dict]]:
    """Every-rank-mines-all vs rank 0's own-anchor share for each W, ms per step."""
    from toolkit.losses import own_anchor_loss, triplet_loss

    rows = []
    for g in global_batches:
        emb, labels = _batch(g, device=device)
        everyone = _best_seconds(lambda e: triplet_loss(e, labels, margin=0.2, strategy="semihard")[0], emb, repeats, device,
                                 min_time)
        own = {w: _best_seconds(lambda e, b=g // w: own_anchor_loss(e, labels, slice(0, b), margin=0.2)[0], emb, repeats, device,
                                min_time)
               for w in worlds}
        rows.append({"global_batch": g, "all_ms": everyone * 1000, "own_ms": {w: t * 1000 for w, t in own.items()},
                     "ratio_at_max_w": everyone / own[worlds[-1]]})
    lines = ["| global batch | every rank mines all, ms | " + " | ".join(f"own anchors W={w}, ms" for w in worlds)
             + f" | W={worlds[-1]}: all / own |",
             "|---:|---:|" + "---:|" * len(worlds) + "---:|"]
    for r in rows:
        lines.append(f"| {r['global_batch']:,} | {r['all_ms']:.1f} | "
                     + " | ".join(f"{r['own_ms'][w]:.1f}" for w in worlds) + f" | {r['ratio_at_max_w']:.1f}× |")
    return lines, rows


# loss[+miner] specs of the objectives table: the built-in and a few pytorch-metric-learning ones
DEFAULT_OBJECTIVES = ("triplet", "pml:TripletMarginLoss+pml:TripletMarginMiner", "pml:MultiSimilarityLoss+pml:MultiSimilarityMiner",
                      "pml:ProxyAnchorLoss", "pml:SupConLoss")
DEFAULT_OBJECTIVE_SIZES = (256, 1024)


def objectives_table(specs: list[str], batch_sizes: list[int], repeats: int, device: str,
                     min_time: float = _MIN_TIMED_S) -> tuple[list[str], list[dict]]:
    """ms per forward + backward of each training objective (toolkit/objectives.py, one process)."""
    from toolkit.objectives import build_objective

    rows = []
    for spec in specs:
        loss, _, miner = spec.partition("+")
        row = {"objective": spec, "ms": {}}
        for b in batch_sizes:
            emb, labels = _batch(b, device=device)
            torch.manual_seed(0)
            objective = build_objective(loss=loss, miner=miner, num_classes=b // 4, embedding_dim=emb.shape[1]).to(device)
            row["ms"][b] = 1000 * _best_seconds(lambda e: objective(e, labels)[0], emb, repeats, device, min_time)
        rows.append(row)
    base = rows[0]["ms"] if rows and rows[0]["objective"] == "triplet" else None
    lines = ["| objective (loss=…, +miner=…) | " + " | ".join(f"B={b:,}, ms" for b in batch_sizes)
             + ("" if base is None else " | " + " | ".join(f"B={b:,}: / triplet" for b in batch_sizes)) + " |",
             "|:--|" + "---:|" * (len(batch_sizes) * (1 if base is None else 2))]
    for r in rows:
        ratios = "" if base is None else " | " + " | ".join(f"{r['ms'][b] / base[b]:.1f}×" for b in batch_sizes)
        lines.append(f"| {r['objective']} | " + " | ".join(f"{r['ms'][b]:.1f}" for b in batch_sizes) + ratios + " |")
    return lines, rows


def main(
    *,
    sizes: str = ",".join(map(str, DEFAULT_SIZES)),
    per_rank: str = ",".join(map(str, DEFAULT_PER_RANK)),
    worlds: str = ",".join(map(str, DEFAULT_WORLDS)),
    objectives: str = ",".join(DEFAULT_OBJECTIVES),
    objective_sizes: str = ",".join(map(str, DEFAULT_OBJECTIVE_SIZES)),
    repeats: int = 3,
    min_time: float = _MIN_TIMED_S,
    timeout: float = 120.0,
    device: str = "auto",
    out: str = "",
) -> dict:
    """Time and memory of semi-hard mining: toolkit vs a vectorised loss vs PML; cost per rank.

    Args:
        sizes: comma-separated global batch sizes for the comparison with other code
            (e.g. 256,1024,2048,4096); 0 skips that table.
        per_rank: global batch sizes for the per-rank view (e.g. 2048,4096,8192,16384); 0 skips it.
        worlds: numbers of ranks W of the per-rank view (each must divide every per_rank size).
        objectives: comma-separated training objectives to time, ``loss`` or ``loss+miner`` as the
            run config spells them (triplet, pml:MultiSimilarityLoss+pml:MultiSimilarityMiner, ...).
        objective_sizes: global batch sizes of the objectives table; 0 skips it.
        repeats: timed repetitions per side (best is reported).
        min_time: seconds of timed calls per cell at least: short calls repeat past ``repeats``
            until then (0: exactly ``repeats``).
        timeout: seconds allowed per side and size (PML at large B is slow).
        device: auto (cuda if present), cpu or cuda.
        out: optional JSON output file.
    """
    from toolkit.bench import require_ints
    from toolkit.errors import ConfigError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_sizes = [b for b in _int_list(sizes) if b]
    rank_sizes = [b for b in _int_list(per_rank) if b]
    world_sizes = sorted(set(_int_list(worlds)))
    require_ints("mining", [("repeats", repeats, 1), *(("sizes", b, 8) for b in batch_sizes),
                            *(("per_rank", b, 8) for b in rank_sizes), *(("worlds", w, 1) for w in world_sizes)])
    objective_batches = [b for b in _int_list(objective_sizes) if b]
    specs = [x.strip() for x in (objectives if isinstance(objectives, str) else ",".join(objectives)).split(",") if x.strip()]
    require_ints("mining", [("objective_sizes", b, 8) for b in objective_batches])
    if not isinstance(min_time, (int, float)) or isinstance(min_time, bool) or not 0 <= min_time <= 60:
        raise ConfigError(f"toolkit bench mining: --min_time must be seconds between 0 and 60, got {min_time!r}")
    if objective_batches:
        from toolkit.objectives import objective_problem

        for spec in specs:
            loss, _, miner = spec.partition("+")
            problem = objective_problem(loss=loss, loss_kwargs={}, miner=miner, miner_kwargs={}, embedding_dim=128)
            if problem:
                raise ConfigError(f"toolkit bench mining: --objectives {spec}: {problem}")
    bad = [(g, w) for g in rank_sizes for w in world_sizes if g % w or g // w < 2]
    if bad:
        raise ConfigError(f"toolkit bench mining: every --per_rank size needs ≥ 2 images per rank and must be "
                          f"divisible by every --worlds value; {bad[0][0]} and W = {bad[0][1]} are not")
    result = {"device": device, "rows": [], "per_rank": [], "objectives": []}
    if batch_sizes:
        lines = comparison_table(batch_sizes, repeats, device, timeout, result["rows"], min_time)
        print("\n".join(lines))
    if rank_sizes:
        lines, result["per_rank"] = per_rank_table(rank_sizes, world_sizes, repeats, device, min_time)
        print(
            f"\nper-rank mining, forward+backward, 128-d, K=4, margin 0.2, device {device}: rank 0's share with W ranks "
            "(anchors=\"own\", the default) vs every rank mining the whole global batch (anchors=\"all\")\n"
        )
        print("\n".join(lines))
        if max(world_sizes) >= 64:
            print("\ntarget at W = 64: per-rank mining ≥ 30× below every-rank-mines-all")
    if objective_batches and specs:
        lines, result["objectives"] = objectives_table(specs, objective_batches, repeats, device, min_time)
        print(f"\ntraining objectives, forward+backward on one process, 128-d, K=4, device {device} (with W ranks the "
              "built-in triplet loss costs each rank 1/W of this, a pml: loss the whole)\n")
        print("\n".join(lines))
    if out:
        from toolkit.files import atomic_write_json

        atomic_write_json(out, result)
    return result


def comparison_table(batch_sizes: list[int], repeats: int, device: str, timeout: float, rows: list,
                     min_time: float = _MIN_TIMED_S) -> list[str]:
    for b in batch_sizes:
        ours = _run_child("toolkit", b, repeats, device, timeout, min_time)
        vec = _run_child("vectorised", b, repeats, device, timeout, min_time)
        pml = _run_child("pml", b, repeats, device, timeout, min_time)
        speed = pml["seconds"] / ours["seconds"] if ours["seconds"] and pml["seconds"] else None
        vec_speed = vec["seconds"] / ours["seconds"] if ours["seconds"] and vec["seconds"] else None
        # RSS growth under ~1 MiB is at the resolution of the measure: no ratio rather than a silly one
        mem = pml["peak_bytes"] / ours["peak_bytes"] if (ours["peak_bytes"] or 0) >= 2**20 and pml["peak_bytes"] else None
        same = abs(vec["loss"] - ours["loss"]) if vec.get("loss") is not None and ours.get("loss") is not None else None
        rows.append({"batch": b, "toolkit": ours, "vectorised": vec, "pml": pml, "speedup": speed,
                     "vectorised_speedup": vec_speed, "memory_ratio": mem, "vectorised_loss_diff": same})
    lines = [
        f"semi-hard mining, forward+backward, 128-d, K=4, margin 0.2, device {device}",
        "",
        "| global batch | toolkit ms | toolkit ns/B² | vectorised ms (same objective) | toolkit vs vectorised | "
        "same loss | PML ms (every triplet in the margin) | toolkit vs PML | toolkit peak MB | vectorised peak MB | "
        "PML peak MB | PML / toolkit memory |",
        "|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = "—" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        vs = "—" if r["vectorised_speedup"] is None else f"{r['vectorised_speedup']:.1f}×"
        mr = "—" if r["memory_ratio"] is None else f"{r['memory_ratio']:.1f}×"
        same = "—" if r["vectorised_loss_diff"] is None else ("✓" if r["vectorised_loss_diff"] < 1e-5 else f"✗ {r['vectorised_loss_diff']:.1e}")
        note = " ".join(x.get("error", "") for x in (r["toolkit"], r["vectorised"], r["pml"]) if x.get("error"))
        lines.append(
            f"| {r['batch']} | {_fmt_s(r['toolkit']['seconds'])} | {_fmt_per_b2(r['toolkit']['seconds'], r['batch'])} | "
            f"{_fmt_s(r['vectorised']['seconds'])} | {vs} | {same} | {_fmt_s(r['pml']['seconds'])} | {sp} | "
            f"{_fmt_mb(r['toolkit']['peak_bytes'])} | {_fmt_mb(r['vectorised']['peak_bytes'])} | "
            f"{_fmt_mb(r['pml']['peak_bytes'])} | {mr} |" + (f" {note}" if note else "")
        )
    lines.append("")
    lines.append("targets at 2048: ≥ 10× faster, ≥ 20× less peak memory (vs PML)")
    return lines
