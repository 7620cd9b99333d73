"""Nearest-neighbour search with faiss: the one place a search index is built, searched or (de)serialised.

Every neighbour search of the toolkit that is not a kNN *vote* with scikit-learn's tie rules
(:mod:`toolkit.knn`, which uses this module to screen candidates) goes through here:
retrieval metrics, ``toolkit index`` / ``toolkit search``, the "unknown" threshold.

Kinds of index (all Euclidean: on unit embeddings the ranking equals cosine similarity's):

* ``flat``: exact (``IndexFlatL2``), the default; what every metric uses.
* ``ivf``: ``IndexIVFFlat`` with ``nlist`` cells (0: about 4·√N), ``nprobe`` searched;
  approximate, for large galleries. Needs training: on the vectors first added (seeded).
* ``hnsw``: ``IndexHNSWFlat`` with ``hnsw_m`` links per node and ``ef_search``; approximate,
  no training, fast queries, slower to build.

Distances come back as *squared* Euclidean distances (faiss's own), ids as positions in the
order vectors were added (-1 where fewer than k exist). A GPU copy of the index is used when
faiss was built with GPU support (``faiss-gpu``) and ``device`` is a CUDA device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from toolkit.errors import DataError

KINDS = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError:  # a dependency; a broken install gets one line
        raise DataError("faiss is not installed: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def as_float32(x) -> np.ndarray:
    """(N, D) C-contiguous float32 numpy array from a tensor or array (what faiss takes)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"search: expected an (N, D) array, got shape {x.shape}")
    return x


@dataclass(frozen=True)
class IndexSpec:
    """How to build an index (recorded with a saved one)."""

    kind: str = "flat"
    nlist: int = 0  # ivf: cells (0 = about 4 sqrt(N) at training time)
    nprobe: int = 16  # ivf: cells searched per query
    hnsw_m: int = 32  # hnsw: links per node
    ef_search: int = 128  # hnsw: candidate list length at query time
    seed: int = 0  # ivf: k-means seed

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_search", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name in ("nlist", "seed") else 1):
                raise DataError(f"index {name} must be an int >= {0 if name in ('nlist', 'seed') else 1}, got {value!r}")


def build_index(vectors, spec: IndexSpec | None = None, *, device=None):
    """A faiss index holding ``vectors`` (N, D) in this order (ids 0 .. N-1)."""
    faiss = _faiss()
    spec = spec or IndexSpec()
    x = as_float32(vectors)
    n, dim = x.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m)
        index.hnsw.efSearch = spec.ef_search
    else:
        if n == 0:
            raise DataError("an ivf index needs vectors to train on")
        nlist = spec.nlist or max(1, int(4 * math.sqrt(n)))
        nlist = min(nlist, n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        index.cp.seed = spec.seed
        index.train(x)
        index.nprobe = min(spec.nprobe, nlist)
    if n:
        index.add(x)
    return _to_device(index, device)


def _to_device(index, device):
    faiss = _faiss()
    if device is None or str(device).split(":")[0] != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return index
    gpu = int(str(device).split(":")[1]) if ":" in str(device) else 0
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)


def to_cpu(index):
    faiss = _faiss()
    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__ else index


def add(index, vectors) -> None:
    """Append ``vectors`` (their ids continue from ``index.ntotal``)."""
    x = as_float32(vectors)
    if x.shape[1] != index.d:
        raise DataError(f"cannot add {x.shape[1]}-d vectors to a {index.d}-d index")
    if len(x):
        index.add(x)


def _queries(queries, dim: int, k, what: str) -> tuple[np.ndarray, int]:
    """(float32 queries, k) checked against ``dim``-d references (``what``, for the message)."""
    q = as_float32(queries)
    if q.shape[1] != dim:
        raise DataError(f"cannot search {what} with {q.shape[1]}-d queries")
    k = int(k)
    if k < 1:
        raise ValueError(f"search: k must be >= 1, got {k}")
    return q, k


def search(index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of each query: (squared distances (Q, k) float32, ids (Q, k) int64), nearest first."""
    q, k = _queries(queries, index.d, k, f"a {index.d}-d index")
    if len(q) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    dist, ids = index.search(q, k)
    return dist, ids.astype(np.int64, copy=False)


def search_centre(mean) -> np.ndarray:
    """The point :func:`nearest` moves both sides by: ``mean`` (float64) on a 2⁻²⁰ grid.

    On the grid, the same centre comes out of any summation order (a mean summed on one
    machine, or from ranks' partial sums), so searches of reference shards give the float32
    distances a search of the whole reference gives.
    """
    return np.round(np.asarray(mean, dtype=np.float64) * 2.0**20) / 2.0**20


def nearest(reference, queries, k: int, spec: IndexSpec | None = None, *, device=None,
            centre=None) -> tuple[np.ndarray, np.ndarray]:
    """One-off search of ``queries`` among ``reference`` (exact by default): see :func:`search`.

    Both sides are first moved by the reference's mean (computed in float64; ``centre``:
    another point, e.g. the mean of a reference split between ranks, see
    :func:`search_centre`): distances do not change, but float32 keeps their digits when every
    embedding sits in one tight cluster (early in training, unit rows within ~1e-4 of each
    other: ``||q||² + ||t||² − 2q·t`` on the raw rows would cancel to round-off and rank at random).
    """
    if spec is None or spec.kind == "flat":
        return ExactReference(reference, centre=centre, device=device).search(queries, k)
    ref, qry = _as_array(reference), _as_array(queries)
    if ref.ndim == 2 and len(ref):
        c = search_centre(ref.mean(axis=0, dtype=np.float64) if centre is None else centre).reshape(1, -1)
        ref, qry = _centred(ref, c), _centred(qry, c)
    return search(build_index(ref, spec, device=device), qry, k)


class ExactReference:
    """A reference set moved by its centre once and searched exactly any number of times.

    What :func:`nearest` does per call, kept: the float32 ``reference - centre`` (centre: the
    reference's float64 mean, or the one given, on :func:`search_centre`'s grid). On the CPU it
    is searched in place by ``faiss.knn`` (the brute-force search ``IndexFlatL2`` runs, the
    same distances and ids bit for bit) with no index copy of the vectors; on a CUDA
    ``device`` through a GPU flat index. A validation searching a share of a million rows block
    after block pays one centred copy, not a copy and an index per search.
    """

    def __init__(self, reference, *, centre=None, device=None, _centred_rows: np.ndarray | None = None):
        if _centred_rows is not None:  # subset(): already moved by ``centre``
            self.vectors, self.centre = _centred_rows, centre
        else:
            ref = _as_array(reference)
            if ref.ndim != 2:
                raise ValueError(f"search: expected an (N, D) array, got shape {ref.shape}")
            self.centre = None
            if len(ref):
                self.centre = search_centre(ref.mean(axis=0, dtype=np.float64) if centre is None else centre).reshape(1, -1)
                ref = _centred(ref, self.centre)
            self.vectors = as_float32(ref)
        self.device = device
        self._norm_max = None
        gpu = device is not None and str(device).split(":")[0] == "cuda" and hasattr(_faiss(), "StandardGpuResources")
        self._index = build_index(self.vectors, device=device) if gpu or not len(self.vectors) else None

    def __len__(self) -> int:
        return len(self.vectors)

    def subset(self, rows) -> "ExactReference":
        """The references ``rows`` (a mask or indices), moved by the same centre (no re-centring)."""
        return ExactReference(None, centre=self.centre, device=self.device,
                              _centred_rows=np.ascontiguousarray(self.vectors[rows]))

    def moved(self, queries) -> np.ndarray:
        """``queries`` as :meth:`search` compares them: moved by the same centre (float32)."""
        q = _as_array(queries)
        return _centred(q, self.centre) if q.ndim == 2 and self.centre is not None else q

    @property
    def norm_max(self) -> float:
        """The largest norm of the moved references (what bounds the float32 rounding of a search)."""
        if self._norm_max is None:  # in blocks of rows: no (N, D) temporary
            v, rows = self.vectors, 1 << 15
            sq = [np.einsum("ij,ij->i", v[s : s + rows], v[s : s + rows], dtype=np.float64).max() for s in range(0, len(v), rows)]
            self._norm_max = float(np.sqrt(max(sq))) if sq else 0.0
        return self._norm_max

    def search(self, queries, k: int, *, moved: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """As :func:`search`: the ``k`` nearest references of each query (squared distances, ids).
        ``moved``: the queries are already :meth:`moved`."""
        q = _as_array(queries) if moved else self.moved(queries)
        if self._index is not None:
            return search(self._index, q, k)
        return exact_search(self.vectors, q, k)


def exact_search(vectors, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` of a flat index of ``vectors`` without building one: ``faiss.knn`` reads
    the (N, D) float32 array in place (the same results as ``IndexFlatL2``, bit for bit)."""
    x = as_float32(vectors)
    q, k = _queries(queries, x.shape[1], k, f"{x.shape[1]}-d references")
    if len(q) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    if len(x) == 0:
        return search(build_index(x), q, k)
    dist, ids = _faiss().knn(q, x, k)
    return dist, ids.astype(np.int64, copy=False)


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a tensor: float32 and float64 as they are, half precision widened
        x = x.detach()
        return (x if x.is_floating_point() and x.element_size() >= 4 else x.float()).cpu().numpy()
    return np.asarray(x)


def _centred(x: np.ndarray, c: np.ndarray, rows: int = 1 << 15) -> np.ndarray:
    """float32 ``x - c``, the difference taken in float64 a block of rows at a time (no
    float64 copy of the whole of ``x``: a search of N rows then costs 8·N·D bytes, not 24)."""
    out = np.empty(x.shape, dtype=np.float32)
    for s in range(0, len(x), rows):
        out[s : s + rows] = x[s : s + rows].astype(np.float64) - c
    return out


def serialize(index) -> bytes:
    """The index as bytes (faiss's own format), to save."""
    return _faiss().serialize_index(to_cpu(index)).tobytes()


def deserialize(data: bytes, *, dim: int, ntotal: int, where) -> object:
    """An index from :func:`serialize`'s bytes, checked against what was recorded beside it."""
    faiss = _faiss()
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with a C++ trace
        raise DataError(f"{where}: not a readable faiss index ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if index.d != dim or index.ntotal != ntotal:
        raise DataError(f"{where}: the index holds {index.ntotal} vectors of dimension {index.d}, expected {ntotal} of {dim}")
    return index


__all__ = ["KINDS", "IndexSpec", "add", "as_float32", "build_index", "deserialize", "nearest", "search", "serialize", "to_cpu"]
