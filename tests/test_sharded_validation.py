"""Validation sharded across ranks gives the numbers of validation on rank 0.

``sharded_val_metrics`` keeps the train references where they were embedded and sends only
each query's candidates to rank 0; the val metrics (kNN accuracy, ranking metrics) and the
"unknown" distance must be the same numbers as assembling everything on rank 0.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import launch_two_cpu

SCRIPT = Path(__file__).parent / "dist_scripts" / "sharded_val.py"


def _script():
    spec = importlib.util.spec_from_file_location("sharded_val", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        both_nan = isinstance(a[name], float) and math.isnan(a[name]) and math.isnan(b[name])
        assert both_nan or a[name] == b[name], (name, a[name], b[name])


def test_one_process_sharded_validation_equals_the_assembled_one():
    from toolkit.evaluation import calibrated_unknown, evaluate_embeddings, sharded_val_metrics

    train, val = _script().data()
    metrics, unknown, counts = sharded_val_metrics(train, val, k=13, unknown_fmr=0.05)
    assert counts == {"train": 157, "val": 41}
    order = lambda part: _script().share(part, 0, 1)  # noqa: E731  (one rank holds everything)
    from toolkit.evaluation import _sorted_share

    ref = evaluate_embeddings(_sorted_share(order(train)), _sorted_share(order(val)), k=13)
    _same(metrics, ref)
    _same(unknown, calibrated_unknown(_sorted_share(train), _sorted_share(val), fmr=0.05))
    assert 0.3 < metrics["knn_accuracy"] < 1.0 and metrics["map_at_r"] > 0.1  # a data set with errors to get right


@pytest.mark.slow
def test_two_processes_sharded_validation_gives_the_same_numbers_as_rank_zero(tmp_path):
    out = tmp_path / "result.pt"
    r = launch_two_cpu(SCRIPT, out, timeout=120, what="sharded validation")
    assert r.returncode == 0, r.stdout[-3000:]
    result = torch.load(out)
    assert result["world"] == 2 and result["share_sizes"][0] > 1.5 * result["share_sizes"][1]
    metrics, unknown, counts = result["sharded"]
    assert counts == {"train": 157, "val": 41}
    reference, ref_unknown = result["reference"]
    _same(metrics, reference)
    _same(unknown, ref_unknown)
    assert 0.3 < metrics["knn_accuracy"] < 1.0
    # one rank holding every reference, the other none: still the same numbers
    lopsided, lopsided_unknown, _ = result["lopsided"]
    _same(lopsided, reference)
    _same(lopsided_unknown, ref_unknown)


def test_queries_in_many_blocks_give_the_same_metrics(monkeypatch):
    """Rank 0 merges the candidates a block of queries at a time (bounded memory); the rates
    are then combined over blocks: the same numbers to float rounding, the same kNN answers."""
    import toolkit.evaluation as evaluation

    train, val = _script().data()
    whole, unknown, _ = evaluation.sharded_val_metrics(train, val, k=13, unknown_fmr=0.05)
    monkeypatch.setattr(evaluation, "CANDIDATES", 7 * (13 + 40))  # blocks of a few queries
    blocked, unknown_b, _ = evaluation.sharded_val_metrics(train, val, k=13, unknown_fmr=0.05)
    assert blocked["knn_accuracy"] == whole["knn_accuracy"] and unknown_b == unknown
    for name, value in whole.items():
        assert blocked[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_no_val_query_gives_nan_metrics_and_no_unknown_distance_instead_of_an_error():
    from toolkit.evaluation import sharded_val_metrics

    train, val = _script().data()
    empty = (val[0][:0], val[1][:0], val[2][:0])
    metrics, unknown, counts = sharded_val_metrics(train, empty, k=13, unknown_fmr=0.05)
    assert math.isnan(metrics["knn_accuracy"]) and math.isnan(metrics["map_at_r"])
    assert unknown is None and counts == {"train": 157, "val": 0}


def test_a_share_is_ordered_by_key_as_the_assembled_split_is_even_for_non_ascii_keys():
    """Train keys travel as UTF-8 bytes: their byte order must be the string order gather_to_main
    sorts by (code points), or the merge's tie-break by position would differ from it."""
    from toolkit.evaluation import _sorted_share, gather_to_main

    keys = ["zebra/1", "Ärger/2", "apple/3", "éclair/4", "日本/5", "apple/10", "Zoo/6", "ß/7"]
    emb = torch.arange(len(keys), dtype=torch.float32)[:, None].repeat(1, 3)
    labels = torch.arange(len(keys))
    got_keys, got_emb, got_labels = _sorted_share((keys, emb, labels))
    want_keys, want_emb, want_labels = gather_to_main(keys, emb, labels)  # one process: the assembled split
    assert [k.decode() for k in got_keys] == want_keys == sorted(keys)
    assert torch.equal(got_emb, want_emb) and torch.equal(got_labels, want_labels)
    again = _sorted_share((want_keys, want_emb, want_labels))  # already in key order: not copied
    assert again[1] is want_emb
