"""Open-set retrieval and verification metrics: queries against a gallery, and the "unknown" distance.

* :func:`query_gallery`: every query ranks the gallery (exact faiss search through
  :mod:`toolkit.search`, Euclidean); ranking metrics (Recall@k = CMC@k, Precision@k, MAP@R,
  R-precision) and verification metrics over all query × gallery pairs (ROC AUC, FNMR at a
  fixed FMR and its distance threshold).
* :func:`calibrate_unknown`: the distance beyond which a nearest-neighbour answer is "unknown",
  calibrated on validation queries against the reference set at a target false-match rate.
* :func:`open_set_recognition`: kNN recognition with that threshold on known and unseen classes.

Conventions, as pytorch-metric-learning's ``AccuracyCalculator`` has them:

* A query's relevant items are the gallery items of its class, itself left out (when
  ``query_in_gallery`` says where it is); their number is its R. A query with R = 0 (its class
  has no other gallery item: a one-image class in leave-one-out, or a class absent from the
  gallery) is counted in ``queries_without_match`` and left out of every ranking metric (PML's
  "lone" queries). If no query has a match, the ranking metrics are nan.
* MAP@R and R-precision look at the first min(R, ``r_cap``) neighbours: with R <= ``r_cap``
  they are Musgrave et al.'s; above it they equal PML's with ``k = r_cap`` (MAP@R still
  divides by R, so it is a lower bound of the uncapped value; R-precision is the precision
  of the first ``r_cap``). ``queries_over_r_cap`` says how many queries that concerns.
* Precision@k divides by k even where the gallery holds fewer than k other items.
* When the query itself is not among its own nearest k + 1 (exact duplicates tie with it),
  the last neighbour is dropped instead, as PML does.

Distances are Euclidean (not squared). Ranking distances are faiss's float32 ones (square
root, clamped at 0); the pair metrics recompute distances blockwise in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from toolkit import search
from toolkit.errors import DataError
from toolkit.knn import knn_vote

KS = (1, 5, 10)
FMRS = (1e-2, 1e-3)
R_CAP = 1000  # MAP@R / R-precision look at most this many neighbours (like PML's k)

# Pair metrics: exact (all pair distances kept and sorted) up to this many pairs; above it a
# streaming histogram of HIST_BINS bins over [0, HIST_RANGE] (unit vectors: distances in [0, 2]).
EXACT_PAIR_LIMIT = 2 * 10**7
HIST_BINS = 2**20
HIST_RANGE = 2.0
BLOCK_ELEMENTS = 2**22  # query rows × gallery size per block of pair distances (~32 MB of float64)


@dataclass
class RetrievalResult:
    """What :func:`query_gallery` returns."""

    metrics: dict  # name -> float | int (JSON-ready)
    topk: np.ndarray  # (Q, kmax) int64 gallery positions, nearest first, self excluded, -1 padding
    topk_dist: np.ndarray  # (Q, kmax) float32 Euclidean distances (inf where padded)
    ap: np.ndarray  # (Q,) float64 average precision at R per query (nan without a match)
    has_match: np.ndarray  # (Q,) bool: the gallery holds another item of the query's class


# ----------------------------------------------------------------------------- inputs


def _emb(x, what: str) -> np.ndarray:
    try:
        return search.as_float32(x)
    except ValueError:
        raise ValueError(f"retrieval: {what} must be an (N, D) array, got shape {tuple(np.shape(x))}") from None


def _labels(y, n: int, what: str) -> np.ndarray:
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"retrieval: expected {n} {what} labels, got shape {y.shape}")
    if n and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"retrieval: {what} labels must be integers, got {y.dtype}")
    return y.astype(np.int64)


def _check_dims(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if len(a) and len(b) and a.shape[1] != b.shape[1]:
        raise ValueError(f"retrieval: {what} have dimensions {a.shape[1]} and {b.shape[1]}")


def _fmr_name(f: float) -> str:
    return f"{f:g}"


def _nan_metrics(ks, fmrs, verification: bool) -> dict:
    m: dict = {}
    for k in ks:
        m[f"recall_at_{k}"] = math.nan
    for k in ks:
        m[f"precision_at_{k}"] = math.nan
    m["map_at_r"] = math.nan
    m["r_precision"] = math.nan
    if verification:
        for f in fmrs:
            m[f"fnmr_at_fmr_{_fmr_name(f)}"] = math.nan
            m[f"threshold_at_fmr_{_fmr_name(f)}"] = math.nan
        m["roc_auc"] = math.nan
    return m


# ----------------------------------------------------------------------------- pair metrics


def _pair_blocks(q: np.ndarray, ql: np.ndarray, g: np.ndarray, gl: np.ndarray, qig: np.ndarray):
    """Yield (distances (b, G) float64, genuine (b, G) bool, valid (b, G) bool or None) per query block.

    ``valid`` is False at the self pair; None when the block holds no self pair.
    """
    g64 = g.astype(np.float64)
    gn = (g64 * g64).sum(1)
    rows = max(1, BLOCK_ELEMENTS // max(1, len(g)))
    for s in range(0, len(q), rows):
        qb = q[s : s + rows].astype(np.float64)
        d = (qb * qb).sum(1)[:, None] + gn[None, :] - 2.0 * (qb @ g64.T)
        np.maximum(d, 0.0, out=d)
        np.sqrt(d, out=d)
        genuine = ql[s : s + rows, None] == gl[None, :]
        self_pos = qig[s : s + rows]
        valid = None
        if (self_pos >= 0).any():
            valid = np.ones(d.shape, dtype=bool)
            r = np.flatnonzero(self_pos >= 0)
            valid[r, self_pos[r]] = False
        yield d, genuine, valid


def _allowed_impostors(f: float, n_imp: int) -> int:
    """The largest m with m / n_imp <= f (the impostor pairs a threshold may accept)."""
    m = int(math.floor(f * n_imp))
    while m + 1 <= n_imp and (m + 1) / n_imp <= f:
        m += 1
    while m > 0 and m / n_imp > f:
        m -= 1
    return m


def _exact_pairs(gen: np.ndarray, imp: np.ndarray, fmrs) -> dict:
    """Pair metrics from all genuine and impostor distances (sorted in place)."""
    gen.sort()
    imp.sort()
    n_gen, n_imp = len(gen), len(imp)
    out: dict = {}
    for f in fmrs:
        name = _fmr_name(f)
        if n_imp == 0:
            out[f"fnmr_at_fmr_{name}"] = out[f"threshold_at_fmr_{name}"] = math.nan
            continue
        u = imp[_allowed_impostors(f, n_imp)]  # the first impostor distance that must be rejected
        below = []  # the largest observed distances < u
        i = int(np.searchsorted(imp, u, side="left"))
        if i:
            below.append(float(imp[i - 1]))
        j = int(np.searchsorted(gen, u, side="left"))
        if j:
            below.append(float(gen[j - 1]))
        t = max(below) if below else float(np.nextafter(u, -np.inf))
        out[f"threshold_at_fmr_{name}"] = t
        accepted = int(np.searchsorted(gen, t, side="right"))
        out[f"fnmr_at_fmr_{name}"] = (n_gen - accepted) / n_gen if n_gen else math.nan
    if n_gen and n_imp:
        # Mann-Whitney: P(d_genuine < d_impostor) + P(equal) / 2 = ROC AUC of score -distance
        lo = np.searchsorted(imp, gen, side="left")
        hi = np.searchsorted(imp, gen, side="right")
        greater = int((n_imp - hi).sum())
        ties = int((hi - lo).sum())
        out["roc_auc"] = (greater + 0.5 * ties) / (n_gen * n_imp)
    else:
        out["roc_auc"] = math.nan
    return out


def _histogram_pairs(gen_h: np.ndarray, imp_h: np.ndarray, width: float, fmrs) -> dict:
    """Pair metrics from distance histograms (bin j holds distances in [j·w, (j+1)·w))."""
    n_gen, n_imp = int(gen_h.sum()), int(imp_h.sum())
    cum_imp = np.cumsum(imp_h)
    cum_gen = np.cumsum(gen_h)
    out: dict = {}
    for f in fmrs:
        name = _fmr_name(f)
        if n_imp == 0:
            out[f"fnmr_at_fmr_{name}"] = out[f"threshold_at_fmr_{name}"] = math.nan
            continue
        m = _allowed_impostors(f, n_imp)
        j = int(np.searchsorted(cum_imp, m, side="right")) - 1  # last bin whose cumulative count <= m
        t = (j + 1) * width  # accept everything in bins 0..j
        accepted = int(cum_gen[j]) if j >= 0 else 0
        out[f"threshold_at_fmr_{name}"] = float(t)
        out[f"fnmr_at_fmr_{name}"] = (n_gen - accepted) / n_gen if n_gen else math.nan
    if n_gen and n_imp:
        imp_above = n_imp - cum_imp  # impostors in bins > j
        g = gen_h.astype(np.float64)
        out["roc_auc"] = float((g * imp_above).sum() + 0.5 * (g * imp_h).sum()) / (float(n_gen) * n_imp)
    else:
        out["roc_auc"] = math.nan
    return out


def _pair_metrics(q, ql, g, gl, qig, fmrs, limit: int, n_gen: int) -> tuple[dict, int]:
    """Pair metrics over all query × gallery pairs but the self pairs; ``n_gen``: genuine pairs."""
    n_pairs = len(q) * len(g) - int((qig >= 0).sum())
    if n_pairs <= limit:  # exact: every distance kept (float64), filled block by block, sorted in place
        gen = np.empty(n_gen)
        imp = np.empty(n_pairs - n_gen)
        ig = ii = 0
        for d, genuine, valid in _pair_blocks(q, ql, g, gl, qig):
            impostor = ~genuine
            if valid is not None:
                genuine &= valid
                impostor &= valid
            x, y = d[genuine], d[impostor]
            gen[ig : ig + len(x)] = x
            imp[ii : ii + len(y)] = y
            ig, ii = ig + len(x), ii + len(y)
        assert ig == n_gen and ii == n_pairs - n_gen
        return _exact_pairs(gen, imp, fmrs), n_pairs
    norms = float(np.linalg.norm(q, axis=1).max() + np.linalg.norm(g, axis=1).max())
    top = HIST_RANGE if norms <= HIST_RANGE * (1 + 1e-5) else norms * (1 + 1e-6)  # unit rows: [0, 2]
    width = top / HIST_BINS
    gen_h = np.zeros(HIST_BINS, dtype=np.int64)
    imp_h = np.zeros(HIST_BINS, dtype=np.int64)
    for d, genuine, valid in _pair_blocks(q, ql, g, gl, qig):
        b = np.minimum((d * (1.0 / width)).astype(np.int64), HIST_BINS - 1)
        impostor = ~genuine
        if valid is not None:
            genuine &= valid
            impostor &= valid
        gen_h += np.bincount(b[genuine], minlength=HIST_BINS)
        imp_h += np.bincount(b[impostor], minlength=HIST_BINS)
    return _histogram_pairs(gen_h, imp_h, width, fmrs), n_pairs


# ----------------------------------------------------------------------------- query vs gallery


def _same_class_counts(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """(Q,) int64: how many gallery items share each query's label."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    if not len(classes):
        return np.zeros(len(query_labels), dtype=np.int64)
    pos = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
    return np.where(classes[pos] == query_labels, counts[pos], 0).astype(np.int64)


def ranking_depth(r: np.ndarray, ks=KS, r_cap: int = R_CAP) -> int:
    """Neighbours per query the ranking metrics need: max(max k, min(r_cap, max R)).

    ``r``: (Q,) each query's number of same-class gallery items (R).
    """
    max_r = int(np.max(r)) if len(r) else 0
    return max(max(int(k) for k in ks), min(int(r_cap), max_r))


def query_gallery(query_emb, query_labels, gallery_emb, gallery_labels, *, query_in_gallery=None,
                  ks=KS, fmrs=FMRS, r_cap: int = R_CAP, kmax_extra: int = 0, verification: bool = True,
                  exact_pair_limit: int | None = None, neighbours=None) -> RetrievalResult:
    """Ranking and verification metrics of queries (Q, D) against a gallery (G, D), Euclidean.

    Args:
        query_emb, gallery_emb: (Q, D), (G, D) float embeddings (tensors or numpy).
        query_labels, gallery_labels: (Q,), (G,) integer labels.
        query_in_gallery: optional (Q,) ints, the gallery position of each query itself (-1:
            not in the gallery). That item is left out of the query's ranking and its pairs
            (leave-one-out). None: nothing is left out.
        ks: the k of ``recall_at_{k}`` (CMC@k: a same-class item in the first k) and
            ``precision_at_{k}`` (share of same-class items in the first k).
        fmrs: false-match rates of ``fnmr_at_fmr_{f}`` / ``threshold_at_fmr_{f}`` (``f:g``).
        r_cap: MAP@R and R-precision look at most this many neighbours (see the module notes).
        kmax_extra: neighbours returned in ``topk`` beyond those the metrics need.
        verification: False skips the pair metrics (their keys are then absent).
        exact_pair_limit: pairs up to which the pair metrics are exact (default
            ``EXACT_PAIR_LIMIT``).
        neighbours: optional ``(d2, ids)`` (Q, >= ranking_depth(...)) squared distances and
            gallery positions of each query's nearest gallery items, ascending, as
            :func:`toolkit.search.nearest` returns them (e.g. merged from gallery shards held
            by several ranks); the search is then skipped, and ``gallery_emb`` may be None
            when ``verification`` is False. No query may be in the gallery then.

    Ranking: one exact faiss search (:func:`toolkit.search.nearest`) of the
    kmax = max(max(ks), min(r_cap, max R)) + kmax_extra nearest (one more when a query is
    in the gallery, then its own entry is dropped).

    Verification, over all query × gallery pairs (self pairs left out; genuine = same label,
    score = -distance): ``roc_auc``; FMR(t) = share of impostor pairs at distance <= t, the
    threshold is the largest observed pair distance with FMR(t) <= f (pairs at distance <= t
    are accepted) and FNMR = share of genuine pairs farther than it. Up to
    ``exact_pair_limit`` pairs this is exact (all distances kept, float64, sorted: memory
    ~8 bytes a pair); above it, distances stream blockwise into a histogram of ``HIST_BINS``
    bins over [0, 2] (wider if the rows are not unit vectors), memory O(bins + block × G):
    the threshold is then a bin edge (resolution 2 / 2^20 ≈ 1.9e-6 on unit vectors) and
    pairs in one bin count as ties for the AUC.

    Metrics: ``recall_at_{k}``, ``precision_at_{k}``, ``map_at_r``, ``r_precision`` (over
    queries with a match), ``fnmr_at_fmr_{f}``, ``threshold_at_fmr_{f}``, ``roc_auc``,
    ``num_queries``, ``num_gallery``, ``queries_without_match``, ``queries_over_r_cap``,
    ``verification_pairs``. Empty queries or gallery: rates nan, counts 0.
    """
    ks = tuple(int(k) for k in ks)
    fmrs = tuple(float(f) for f in fmrs)
    if not ks or min(ks) < 1:
        raise ValueError(f"retrieval: every k must be >= 1, got {ks}")
    if any(not 0.0 < f < 1.0 for f in fmrs):
        raise ValueError(f"retrieval: every fmr must be in (0, 1), got {fmrs}")
    if int(r_cap) < 1 or int(kmax_extra) < 0:
        raise ValueError(f"retrieval: r_cap must be >= 1 and kmax_extra >= 0, got {r_cap} and {kmax_extra}")
    r_cap, kmax_extra = int(r_cap), int(kmax_extra)
    limit = EXACT_PAIR_LIMIT if exact_pair_limit is None else int(exact_pair_limit)

    q = _emb(query_emb, "query embeddings")
    if gallery_emb is None:
        if neighbours is None or verification:
            raise ValueError("retrieval: gallery embeddings are needed without neighbours or with verification")
        ng = len(gallery_labels)
        g = None
    else:
        g = _emb(gallery_emb, "gallery embeddings")
        _check_dims(q, g, "queries and gallery")
        ng = len(g)
    nq = len(q)
    if not (np.isfinite(q).all() and (g is None or np.isfinite(g).all())):
        raise ValueError("retrieval: the embeddings hold nan or inf")
    ql = _labels(query_labels, nq, "query")
    gl = _labels(gallery_labels, ng, "gallery")
    if neighbours is not None and query_in_gallery is not None:
        raise ValueError("retrieval: precomputed neighbours cannot leave queries out of the gallery")
    if query_in_gallery is None:
        qig = np.full(nq, -1, dtype=np.int64)
    else:
        if hasattr(query_in_gallery, "detach"):
            query_in_gallery = query_in_gallery.detach().cpu().numpy()
        qig = np.asarray(query_in_gallery).astype(np.int64)
        if qig.shape != (nq,):
            raise ValueError(f"retrieval: query_in_gallery must have shape ({nq},), got {qig.shape}")
        if nq and (qig.min() < -1 or qig.max() >= ng):
            raise ValueError(f"retrieval: query_in_gallery holds positions outside [-1, {ng})")
        inside = qig >= 0
        if (gl[qig[inside]] != ql[inside]).any():
            raise ValueError("retrieval: query_in_gallery points at gallery items of another label")

    r = _same_class_counts(ql, gl) - (qig >= 0)  # R: the query's same-class gallery items, itself left out
    has_match = r > 0
    kmax = ranking_depth(r, ks, r_cap) + kmax_extra

    metrics: dict = _nan_metrics(ks, fmrs, verification)
    counts_m = {"num_queries": nq, "num_gallery": ng, "queries_without_match": int((~has_match).sum()),
                "queries_over_r_cap": int((r > r_cap).sum())}
    topk = np.full((nq, kmax), -1, dtype=np.int64)
    topk_dist = np.full((nq, kmax), np.inf, dtype=np.float32)
    ap = np.full(nq, np.nan)
    if nq == 0 or ng == 0:
        metrics.update(counts_m)
        if verification:
            metrics["verification_pairs"] = 0
        return RetrievalResult(metrics, topk, topk_dist, ap, has_match)

    # ---- ranking
    any_self = bool((qig >= 0).any())
    k_search = min(ng, kmax + any_self)
    if neighbours is None:
        d2, ids = search.nearest(g, q, k_search)
    else:
        d2, ids = (np.asarray(a)[:, :k_search] for a in neighbours)
        if d2.shape != (nq, k_search) or ids.shape != (nq, k_search):
            raise ValueError(f"retrieval: neighbours must be ({nq}, >= {k_search}), got {d2.shape} and {ids.shape}")
    if any_self:
        drop = ids == qig[:, None]
        missing = ~drop.any(1)
        drop[missing, -1] = True  # self not among the k + 1 (duplicates): drop the last, as PML does
        if (drop.sum(1) > 1).any():  # a position listed twice cannot happen with a flat index
            raise RuntimeError("retrieval: the search returned a gallery position twice")
        keep = ~drop
        ids = ids[keep].reshape(nq, k_search - 1)
        d2 = d2[keep].reshape(nq, k_search - 1)
    width = ids.shape[1]
    topk[:, :width] = ids
    topk_dist[:, :width] = np.sqrt(np.maximum(d2, 0.0))

    valid = topk >= 0
    match = valid & (gl[np.where(valid, topk, 0)] == ql[:, None])  # (Q, kmax)
    hm = has_match
    if hm.any():
        mm = match[hm]
        for k in ks:
            metrics[f"recall_at_{k}"] = float(mm[:, :k].any(1).mean())
            metrics[f"precision_at_{k}"] = float((mm[:, :k].sum(1) / k).mean())
        rq = r[hm]
        lq = np.minimum(rq, r_cap)  # neighbours MAP@R / R-precision look at
        ap_hm = np.empty(len(rq))
        rp_hm = np.empty(len(rq))
        step = max(1, BLOCK_ELEMENTS // max(1, int(lq.max())))
        for s in range(0, len(rq), step):  # query blocks: temporaries O(block × min(max R, r_cap))
            lb, rb = lq[s : s + step], rq[s : s + step]
            lmax = int(lb.max())
            rel = mm[s : s + step, :lmax] & (np.arange(lmax)[None, :] < lb[:, None])
            prec = np.cumsum(rel, axis=1) / np.arange(1, lmax + 1)[None, :]
            ap_hm[s : s + step] = (prec * rel).sum(1) / rb
            rp_hm[s : s + step] = rel.sum(1) / lb
        ap[hm] = ap_hm
        metrics["map_at_r"] = float(ap_hm.mean())
        metrics["r_precision"] = float(rp_hm.mean())
    metrics.update(counts_m)

    # ---- verification
    if verification:
        pair_m, n_pairs = _pair_metrics(q, ql, g, gl, qig, fmrs, limit, int(r.sum()))
        metrics.update(pair_m)
        metrics["verification_pairs"] = int(n_pairs)
    return RetrievalResult(metrics, topk, topk_dist, ap, has_match)


# ----------------------------------------------------------------------------- the "unknown" distance


def _largest_below(u: float, *observed: np.ndarray) -> float:
    """The largest observed value < u (the next float below u when there is none)."""
    best = -math.inf
    for x in observed:
        x = x[np.isfinite(x) & (x < u)]
        if len(x):
            best = max(best, float(x.max()))
    return best if best > -math.inf else float(np.nextafter(u, -np.inf))


def nearest_own_and_other(ref, ref_y: np.ndarray, val: np.ndarray, val_y: np.ndarray, first_k: int = 32,
                          centre=None, found: tuple[np.ndarray, np.ndarray] | None = None):
    """(d_own, d_other) (n,) Euclidean: each val row's nearest reference of its class (inf if
    the class has none) and of another class. One search of ``first_k``; the rows it leaves
    open are searched again (another class: within own-class count + 1; own class: its own
    rows). ``ref``: the references (N, D), or a :class:`toolkit.search.ExactReference` of them
    already centred (then ``centre`` is its own). ``centre``: the searches' centre
    (:func:`toolkit.search.nearest`; default the mean of ``ref``), the whole reference's mean
    when ``ref`` is one rank's share of it. ``found``: (squared distances, ids) of an exact
    search of every ``val`` row already made (the validator's ranking search), used as the
    first search: with more columns than any class has references, no row is searched again."""
    ref = ref if isinstance(ref, search.ExactReference) else search.ExactReference(ref, centre=centre)
    n = len(ref)
    if n == 0:
        return np.full(len(val), np.inf), np.full(len(val), np.inf)
    classes, counts = np.unique(ref_y, return_counts=True)
    pos = np.minimum(np.searchsorted(classes, val_y), len(classes) - 1)
    own_count = np.where(classes[pos] == val_y, counts[pos], 0)
    d_own = np.full(len(val), np.inf)
    d_other = np.full(len(val), np.inf)

    def first_hits(rows, d2, ids):
        lab = ref_y[np.maximum(ids, 0)]
        ok = ids >= 0
        dist = np.sqrt(np.maximum(d2, 0.0)).astype(np.float64)
        for want_same, out in ((True, d_own), (False, d_other)):
            hit = ok & ((lab == val_y[rows, None]) == want_same)
            found = hit.any(1)
            j = hit.argmax(1)
            sel = rows[found]
            out[sel] = np.minimum(out[sel], dist[found, j[found]])

    rows = np.arange(len(val))
    if found is not None:
        d2, ids = found
        k = d2.shape[1]
    else:
        k = min(n, first_k)
        d2, ids = ref.search(val, k)
    first_hits(rows, d2, ids)
    if k < n:
        # another class: at most own_count references come before it
        open_other = np.flatnonzero(~np.isfinite(d_other))
        if len(open_other):
            k2 = min(n, int(own_count[open_other].max()) + 1)
            d2, ids = ref.search(val[open_other], k2)
            first_hits(open_other, d2, ids)
        open_own = np.flatnonzero(~np.isfinite(d_own) & (own_count > 0))
        for c in np.unique(val_y[open_own]):
            rows_c = open_own[val_y[open_own] == c]
            d2, _ = ref.subset(ref_y == c).search(val[rows_c], 1)
            d_own[rows_c] = np.sqrt(np.maximum(d2[:, 0], 0.0))
    return d_own, d_other


def calibrate_unknown(ref_emb, ref_labels, val_emb, val_labels, *, fmr: float = 0.01) -> dict:
    """The "unknown" distance of nearest-neighbour recognition at false-match rate ``fmr``.

    For each val query: ``d_other`` = distance to its nearest reference of another class (what
    its nearest neighbour would be were its class unknown to the model), ``d_own`` = to its
    nearest reference of its own class. The threshold ``distance`` is the largest observed
    distance t with (share of val queries with d_other <= t) <= fmr: a query of an unseen class
    is accepted with probability ~fmr. A query whose nearest reference is farther than t
    answers "unknown".

    Returns ``{"distance": t, "fmr": fmr, "num_queries": n, "known_accept_rate": share of val
    queries whose nearest reference (any class) is within t, "unknown_accept_rate": the
    share with d_other <= t (<= fmr)}``. Val queries of classes absent from the reference
    have only a d_other (they count as unknown-like and as known queries farther than their
    nearest reference).
    """
    fmr = float(fmr)
    if not 0.0 < fmr < 1.0:
        raise ValueError(f"unknown threshold: fmr must be in (0, 1), got {fmr}")
    ref = _emb(ref_emb, "reference embeddings")
    val = _emb(val_emb, "validation embeddings")
    _check_dims(ref, val, "reference and validation embeddings")
    ref_y = _labels(ref_labels, len(ref), "reference")
    val_y = _labels(val_labels, len(val), "validation")
    if len(np.unique(ref_y)) < 2:
        raise DataError(f"unknown threshold: the reference needs at least 2 classes, got {len(np.unique(ref_y))}")
    if len(val) == 0:
        raise DataError("unknown threshold: no validation queries to calibrate on")
    return calibrate_from_distances(*nearest_own_and_other(ref, ref_y, val, val_y), fmr=fmr)


def calibrate_from_distances(d_own: np.ndarray, d_other: np.ndarray, *, fmr: float = 0.01) -> dict:
    """:func:`calibrate_unknown` from each val query's (d_own, d_other) distances, (n,) each.

    Those are minima over the references, so references split between ranks give them as
    the elementwise minimum of each share's :func:`nearest_own_and_other`.
    """
    fmr = float(fmr)
    if not 0.0 < fmr < 1.0:
        raise ValueError(f"unknown threshold: fmr must be in (0, 1), got {fmr}")
    d_own, d_other = np.asarray(d_own, dtype=np.float64), np.asarray(d_other, dtype=np.float64)
    if len(d_other) == 0:
        raise DataError("unknown threshold: no validation queries to calibrate on")
    s = np.sort(d_other)
    u = float(s[_allowed_impostors(fmr, len(s))])  # the first d_other that must be rejected
    t = _largest_below(u, d_other, d_own)
    nearest = np.minimum(d_own, d_other)
    return {"distance": float(t), "fmr": fmr, "num_queries": int(len(d_other)),
            "known_accept_rate": float((nearest <= t).mean()),
            "unknown_accept_rate": float((d_other <= t).mean())}


def open_set_recognition(ref_emb, ref_labels, known_emb, known_labels, unknown_emb, *, threshold: float,
                         k: int = 13) -> dict:
    """kNN recognition with an "unknown" answer, on known and unseen-class queries.

    A query's answer is the kNN vote of its ``k`` nearest references (:func:`toolkit.knn.knn_vote`),
    or "unknown" when its nearest reference is farther than ``threshold`` (Euclidean).
    Known queries (labels among the reference's) are right when accepted with the right
    label; unknown queries (classes absent from the reference) when rejected.

    Returns ``open_set_accuracy`` (right answers / all queries), ``known_accuracy`` (known
    queries accepted with the right label), ``closed_set_accuracy`` (known queries whose vote
    is right, rejection ignored), ``known_rejected``, ``unknown_rejected`` (shares rejected),
    ``open_set_auroc`` (ROC AUC of telling known from unknown by -nearest-reference distance),
    ``num_known``, ``num_unknown``. Shares over an empty group are nan.
    """
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("open-set recognition: threshold is nan")
    ref = _emb(ref_emb, "reference embeddings")
    known = _emb(known_emb, "known embeddings") if len(known_emb) else np.zeros((0, ref.shape[1]), np.float32)
    unknown = _emb(unknown_emb, "unknown embeddings") if len(unknown_emb) else np.zeros((0, ref.shape[1]), np.float32)
    _check_dims(ref, known, "reference and known embeddings")
    _check_dims(ref, unknown, "reference and unknown embeddings")
    ref_y = _labels(ref_labels, len(ref), "reference")
    known_y = _labels(known_labels, len(known), "known")
    if len(ref) == 0:
        raise DataError("open-set recognition: the reference set is empty")
    nk, nu = len(known), len(unknown)

    def nearest_dist(x):
        if len(x) == 0:
            return np.zeros(0)
        d2, _ = search.nearest(ref, x, 1)
        return np.sqrt(np.maximum(d2[:, 0].astype(np.float64), 0.0))

    dk, du = nearest_dist(known), nearest_dist(unknown)
    if nk:
        pred, _ = knn_vote(torch.from_numpy(ref), torch.from_numpy(ref_y), torch.from_numpy(known), k=int(k))
        right = pred.numpy() == known_y
    else:
        right = np.zeros(0, dtype=bool)
    k_acc = dk <= threshold
    u_rej = du > threshold

    def share(x):
        return float(x.mean()) if len(x) else math.nan

    if nk and nu:
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(np.r_[np.ones(nk), np.zeros(nu)], -np.r_[dk, du]))
    else:
        auroc = math.nan
    correct = int((right & k_acc).sum()) + int(u_rej.sum())
    return {"open_set_accuracy": correct / (nk + nu) if nk + nu else math.nan,
            "known_accuracy": share(right & k_acc),
            "closed_set_accuracy": share(right),
            "known_rejected": share(~k_acc),
            "unknown_rejected": share(u_rej),
            "open_set_auroc": auroc,
            "num_known": int(nk), "num_unknown": int(nu)}


__all__ = ["EXACT_PAIR_LIMIT", "FMRS", "HIST_BINS", "KS", "R_CAP", "RetrievalResult", "calibrate_unknown",
           "open_set_recognition", "query_gallery"]
