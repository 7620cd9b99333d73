"""P×K streaming over many classes of a few images each (Stanford Online Products' shape).

What a user notices: the batcher's memory stays under its stated bound whatever the class
mix (20,000 classes of 3 images, a 100:1 imbalance); no image twice in a batch unless its
class has fewer than K images; every image seen about once per epoch; nothing dropped without
being counted; shards grouped by class keep each class in one shard and one loader slot.
"""
from __future__ import annotations

import itertools
import json
import random
import warnings
from collections import Counter, defaultdict

import pytest
import torch

from conftest import make_image_folder, read_tar_samples, write_shards_quietly
from toolkit.bench.classes import class_sizes, write_synthetic_shards
from toolkit.data.batching import PKStats, pk_batches, pk_bound
from toolkit.data.reader import SkipLog, SlotReader, shuffle_runs
from toolkit.data.shards import choose_layout, plan_shards, read_info
from toolkit.data.stream import ShardStream, make_loader
from toolkit.errors import DataError

IMG = torch.zeros((1, 1, 1), dtype=torch.uint8)


def stream_of(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the many-small-classes warning: tested on its own
        return ShardStream(folder, split="train", mode="train", **kw)


def epoch(folder, *, ranks=1, workers=0, **kw):
    """One epoch of every rank (simulated one after the other): (batches, per-rank pk_stats, a stream)."""
    batches, stats = [], []
    for rank in range(ranks):
        s = stream_of(folder, rank=rank, world_size=ranks, **kw)
        batches += [(list(k), y.tolist()) for k, _, y in make_loader(s, num_workers=workers)]
        stats.append(s.pk_stats())
    return batches, stats, s


def balanced(stats: dict) -> bool:
    """Nothing dropped without being counted: every image taken in is accounted for."""
    return stats["received"] == stats["emitted"] + stats["deferred"] + stats["duplicates"] + stats["buffered"]


def check_batches(batches, *, P, K, sizes):
    """Exactly P classes × K images; an image twice only when its class has fewer than K."""
    for keys, labels in batches:
        assert len(keys) == P * K and set(Counter(labels).values()) == {K} and len(set(labels)) == P
        for key, n in Counter(keys).items():
            if n > 1:
                assert sizes[labels[keys.index(key)]] < K, f"{key} {n} times in a batch, its class has {K}+ images"


def views(batches, num_samples):
    seen = Counter(k for keys, _ in batches for k in keys)
    return [seen.get(f"s{i:08d}", 0) for i in range(num_samples)]


@pytest.fixture(scope="module")
def twenty_thousand(tmp_path_factory):
    """20,000 classes of 3 images (60,000 4×4 samples), in both layouts."""
    root = tmp_path_factory.mktemp("20k")
    sizes = [3] * 20000
    return sizes, {layout: write_synthetic_shards(root / layout, sizes, layout=layout, side=4) for layout in ("mixed", "by_class")}


def test_memory_bound_holds_for_20000_classes_of_3_images(twenty_thousand):
    sizes, folders = twenty_thousand
    s = stream_of(folders["by_class"], batch_size=60, K=3)
    assert s.pk_bound == pk_bound(20, 3, 1000) == 32 * 20 * 3
    batches = [(list(k), y.tolist()) for k, _, y in make_loader(s, num_workers=0)]
    stats = s.pk_stats()
    assert len(batches) == s.steps_per_epoch() == 60000 // 60
    check_batches(batches, P=20, K=3, sizes=sizes)
    assert views(batches, 60000) == [1] * 60000, "laid out by class: each image exactly once in the epoch"
    assert stats["bound"] == s.pk_bound and stats["peak_buffered"] <= 2 * 60, "the batcher holds about one batch"
    assert balanced(stats) and stats["deferred"] == 0 and stats["passes"] == 1

    # The same classes mixed over every shard: still bounded, and a clear error instead of a
    # long stall (no 20 classes complete within the bound), naming the fix.
    s = stream_of(folders["mixed"], batch_size=60, K=3)
    with pytest.raises(DataError, match=r"within the 1920-sample buffer bound.*--group_by_class"):
        list(make_loader(s, num_workers=0))
    stats = s.pk_stats()
    assert stats["peak_buffered"] <= s.pk_bound and stats["deferred_room"] > 0.75 * 60000 and balanced(stats)


def test_mixed_shards_of_many_small_classes_warn_to_regroup(twenty_thousand):
    _, folders = twenty_thousand
    with pytest.warns(UserWarning, match="20000 classes of a few images.*--group_by_class"):
        ShardStream(folders["mixed"], mode="train", batch_size=64, K=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShardStream(folders["by_class"], mode="train", batch_size=64, K=2)


def test_few_large_classes_grouped_by_class_warn_to_mix(tmp_path):
    """The other way round: 20 classes of 300 grouped by class starve P×K = 16×4 (the shuffle pool holds 3 classes)."""
    folder = write_synthetic_shards(tmp_path / "big", [300] * 20, layout="by_class", side=4)
    with pytest.warns(UserWarning, match=r"pool holds about 3 classes, too few for batches of P=16.*--group_by_class false"):
        ShardStream(folder, mode="train", batch_size=64, K=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShardStream(folder, mode="eval", batch_size=64)  # reading it in order is fine


@pytest.mark.parametrize("layout", ["mixed", "by_class"])
def test_memory_bound_holds_under_a_100_to_1_imbalance(tmp_path, layout):
    sizes = [2000] + [20] * 19  # one class 100 times the others
    folder = write_synthetic_shards(tmp_path / layout, sizes, layout=layout, side=4, samples_per_shard=500)
    batches, stats, s = epoch(folder, ranks=2, workers=2, batch_size=16, K=4, P=4)
    check_batches(batches, P=4, K=4, sizes=sizes)
    assert len(batches) == 2 * s.steps_per_epoch()
    for st in stats:
        assert st["peak_buffered"] <= st["bound"] == s.pk_bound == 1000
        assert balanced(st)
    # The big class cannot be 88 % of balanced batches: its surplus is deferred, and counted.
    assert sum(st["deferred_full"] + st["deferred_room"] + st["deferred_leftover"] for st in stats) > 1000


def test_memory_bound_holds_in_memory_for_any_mix():
    """The batcher alone, over streams a bound must survive: 100:1, 20,000 singletons and pairs, one class."""
    rng = random.Random(0)
    mixes = {
        "imbalance": [3000] + [30] * 30,
        "tiny": [1] * 10000 + [2] * 10000,
        "wide": [3] * 20000,
    }
    for name, sizes in mixes.items():
        items = [(f"{c}-{i}", IMG, c) for c, n in enumerate(sizes) for i in range(n)]
        rng.shuffle(items)
        st = PKStats()
        gen = pk_batches(lambda p: items, P=8, K=2, rng=random.Random(1), give_up_after=2, source=name,
                         bound=500, class_sizes=sizes, stats=st)
        try:
            for _ in itertools.islice(gen, 200):
                assert st.buffered <= 500
        except DataError:
            pass  # too spread out to complete 8 classes in 500 samples: said, not hung
        assert st.peak_buffered <= st.bound == 500, name
        assert st.received == st.emitted + st.deferred + st.duplicates + st.buffered, name


@pytest.fixture(scope="module")
def sop_like(tmp_path_factory):
    """3,000 classes of 3-6 images (13,500 samples), grouped by class."""
    sizes = class_sizes(3000, 3, 6, seed=1)
    return sizes, write_synthetic_shards(tmp_path_factory.mktemp("sop") / "s", sizes, layout="by_class", side=4)


def test_no_image_twice_in_a_batch_unless_its_class_is_smaller_than_k(sop_like):
    sizes, folder = sop_like
    batches, stats, _ = epoch(folder, ranks=2, workers=2, batch_size=64, K=4)
    check_batches(batches, P=16, K=4, sizes=sizes)
    repeated = {labels[keys.index(k)] for keys, labels in batches for k, n in Counter(keys).items() if n > 1}
    assert repeated and all(sizes[c] == 3 for c in repeated)  # only the 3-image classes, padded to 4
    assert all(balanced(st) for st in stats) and sum(st["padded"] for st in stats) > 0


def test_every_image_seen_about_once_per_epoch(sop_like, tmp_path):
    sizes, folder = sop_like
    batches, stats, s = epoch(folder, ranks=1, workers=2, batch_size=64, K=4)
    counts = views(batches, s.num_samples)
    once, never = counts.count(1) / len(counts), counts.count(0) / len(counts)
    # K = 4 over classes of 5 or 6 images: 1 or 2 of them wait for a later pass (deferred).
    assert once >= 0.65 and never <= 0.2 and max(counts) <= 4, (once, never, max(counts))
    assert sum(st["received"] for st in stats) <= 1.25 * s.num_samples  # about one read of the data

    # Classes whose size is a multiple of K: every image exactly once, bar the pass boundary.
    even = [4, 8] * 1000
    folder = write_synthetic_shards(tmp_path / "even", even, layout="by_class", side=4)
    batches, stats, s = epoch(folder, ranks=2, workers=2, batch_size=64, K=4)
    counts = views(batches, s.num_samples)
    assert counts.count(1) / len(counts) >= 0.95 and max(counts) <= 2
    assert sum(st["deferred"] for st in stats) <= 0.02 * s.num_samples


def test_one_pass_accounts_for_every_image():
    """Over one pass of class runs: each class gives whole groups of K, the rest is deferred, counted."""
    K, sizes = 4, class_sizes(500, 1, 9, seed=3)
    items = [(f"{c}-{i}", IMG, c) for c, n in enumerate(sizes) for i in range(n)]
    rng = random.Random(0)
    order = list(range(len(sizes)))
    rng.shuffle(order)
    rank = {c: r for r, c in enumerate(order)}
    grouped = sorted(items, key=lambda it: rank[it[2]])  # whole classes, in random order
    in_pieces = list(shuffle_runs(grouped, bufsize=100, initial=10, rng=rng, chunk=K))  # as the reader hands them over
    for stream in (grouped, in_pieces):
        st = PKStats()
        gen = pk_batches(lambda p: stream if p == 0 else [], P=8, K=K, rng=random.Random(0), give_up_after=1,
                         source="one pass", class_sizes=sizes, class_runs=True, stats=st)
        with pytest.raises(DataError):
            for _ in gen:
                pass
        usable = sum(n - n % K if n >= K else (n if n >= 2 else 0) for n in sizes)
        assert st.emitted + st.buffered == usable
        assert st.deferred_leftover == len(items) - usable and st.deferred_full == st.deferred_room == 0
        assert 0 < st.padded <= sum(K - n for n in sizes if 2 <= n < K)  # short classes still buffered are padded later
        assert st.received == len(items) == st.emitted + st.deferred + st.buffered


def test_duplicates_are_merged_and_counted():
    """Mixed passes repeating the same keys: an image waiting is not added twice (so no repeat in a batch)."""
    items = [(f"k{c}-{i}", IMG, c) for c in range(6) for i in range(3)]
    st = PKStats()
    gen = pk_batches(lambda p: items, P=2, K=4, rng=random.Random(0), give_up_after=2, source="dup", stats=st)
    with pytest.raises(DataError):
        for keys, _, _ in gen:
            pass
    assert st.batches == 0 and st.duplicates > 0 and st.received == st.deferred + st.duplicates + st.buffered + st.emitted


# --------------------------------------------------------------------------- layout


def test_plan_shards_by_class_keeps_each_class_in_one_shard():
    labels = [c for c, n in enumerate(class_sizes(300, 1, 12, seed=2) + [2500]) for _ in range(n)]
    plan = plan_shards(labels, layout="by_class", samples_per_shard=100, rng=random.Random(0))
    assert sorted(p for shard in plan for p in shard) == list(range(len(labels)))
    mixed = plan_shards(labels, layout="mixed", samples_per_shard=100, rng=random.Random(0))
    assert len(plan) == len(mixed), "as many shards as mixed: ranks x workers share them alike"
    home = defaultdict(set)
    for n, shard in enumerate(plan):
        runs = [c for c, _ in itertools.groupby(labels[p] for p in shard)]
        assert len(runs) == len(set(runs)), "a class is contiguous inside its shard"
        for c in runs:
            home[c].add(n)
    big = labels[-1]
    assert all(len(shards) == 1 for c, shards in home.items() if c != big)
    assert 25 <= len(home[big]) <= 26  # a class larger than a shard: pieces of 100, placed like classes
    # Each cut within half a piece of its multiple of N / n: a shard within one piece (100) of N / n.
    mean = len(labels) / len(plan)
    assert all(abs(len(shard) - mean) <= 100 for shard in plan), sorted(map(len, plan))
    order = list(range(len(labels)))
    random.Random(0).shuffle(order)
    assert [p for shard in mixed for p in shard] == order  # the mixed layout is the plain shuffle it was
    small = [c for c in range(50) for _ in range(4)]  # 200 samples of 4-image classes, shards of 64
    sizes = sorted(map(len, plan_shards(small, layout="by_class", samples_per_shard=64, rng=random.Random(1))))
    assert len(sizes) == 4 and max(sizes) - min(sizes) <= 4, sizes  # 50 per shard, cut between classes of 4
    assert plan_shards([], layout="by_class", samples_per_shard=10, rng=random.Random(0)) == []


def test_auto_layout_groups_only_many_small_classes():
    assert choose_layout("auto", [5] * 1000) == "by_class"
    assert choose_layout("auto", [63] * 20000) == "by_class"
    assert choose_layout("auto", [5] * 999) == "mixed"
    assert choose_layout("auto", [64] * 20000) == "mixed"
    assert choose_layout("auto", [1450] * 62) == "mixed"
    assert choose_layout(True, [1450] * 62) == "by_class" and choose_layout(False, [3] * 20000) == "mixed"


def test_write_shards_group_by_class(tmp_path):
    sizes = {f"k{i:02d}": 3 + i % 4 for i in range(12)}
    src = make_image_folder(tmp_path / "img", sizes, size=(6, 6), formats=("png",))
    info = write_shards_quietly(src, tmp_path / "grouped", image_size=4, samples_per_shard=10, group_by_class=True)
    assert info.splits["train"].layout == "by_class" and info.splits["val"].layout == "mixed"
    owners = defaultdict(set)
    for name in info.splits["train"].filenames:
        for sample in read_tar_samples(tmp_path / "grouped" / name).values():
            owners[int(sample["cls"])].add(name)
    assert len(owners) == 12 and all(len(v) == 1 for v in owners.values())
    assert json.loads((tmp_path / "grouped" / "_info.json").read_text())["splits"]["train"]["layout"] == "by_class"
    assert read_info(tmp_path / "grouped").splits["train"].layout == "by_class"
    auto = write_shards_quietly(src, tmp_path / "auto", image_size=4, samples_per_shard=10)
    assert auto.splits["train"].layout == "mixed"  # 12 classes: auto keeps them mixed
    with pytest.raises(DataError, match="group_by_class must be"):
        write_shards_quietly(src, tmp_path / "bad", group_by_class="sometimes")


def test_shard_command_group_by_class_option(tmp_path, capsys):
    from toolkit.cli import main

    src = make_image_folder(tmp_path / "img", {"a": 4, "b": 5, "c": 6}, size=(6, 6), formats=("png",))
    main(["shard", str(src), str(tmp_path / "out"), "--workers", "1", "--group_by_class", "true"])
    assert "grouped by class" in capsys.readouterr().out
    assert read_info(tmp_path / "out").splits["train"].layout == "by_class"
    with pytest.raises(SystemExit):
        main(["shard", str(src), str(tmp_path / "out2"), "--group_by_class", "maybe"])
    assert "--group_by_class takes true, false or auto" in capsys.readouterr().err


def test_a_shared_by_class_shard_is_dealt_by_class(tmp_path):
    """One shard, four slots: each slot keeps whole classes; together they read everything once."""
    sizes = class_sizes(200, 2, 7, seed=4)
    folder = write_synthetic_shards(tmp_path / "one", sizes, layout="by_class", side=4, samples_per_shard=10**6)
    s = stream_of(folder, batch_size=8, K=2)
    owner, seen = {}, []
    for slot in range(4):
        reader = SlotReader(urls=s.urls, shard_lengths=s.shard_lengths, num_classes=len(sizes), skips=SkipLog(strict=True),
                            slot=slot, num_slots=4, shuffle=True, shuffle_buffer=50, by_class=True, chunk=2)
        for key, _, c in reader.read_pass(0):
            assert owner.setdefault(c, slot) == slot, f"class {c} read by slots {owner[c]} and {slot}"
            seen.append(key)
    assert sorted(seen) == [f"s{i:08d}" for i in range(sum(sizes))]
    assert len(set(owner.values())) == 4


def test_shuffle_runs_keeps_classes_together_in_pieces_and_bounds_its_pool():
    sizes = class_sizes(400, 1, 30, seed=5)
    items = [(f"{c}-{i}", IMG, c) for c, n in enumerate(sizes) for i in range(n)]
    taken = [0]

    def source():
        for it in items:
            taken[0] += 1
            yield it

    def stretches(out):
        per_class = defaultdict(list)
        for c, g in itertools.groupby(it[2] for it in out):
            per_class[c].append(len(list(g)))
        return per_class

    for chunk in (0, 4):
        taken[0] = 0
        out, lag = [], 0
        for it in shuffle_runs(source(), bufsize=60, initial=6, rng=random.Random(0), chunk=chunk):
            out.append(it)
            lag = max(lag, taken[0] - len(out))
        assert sorted(out) == sorted(items) and out != items
        assert lag <= 60 + max(sizes) + 1, "the pool holds at most bufsize samples plus one run"
        per_class = stretches(out)
        assert all(sum(v) == sizes[c] for c, v in per_class.items())
        if chunk == 0:  # whole classes, one after the other
            assert all(len(v) == 1 for v in per_class.values())
        else:  # pieces of 4 from several classes at a time
            big = [c for c, n in enumerate(sizes) if n > 8]
            assert sum(len(per_class[c]) > 1 for c in big) >= 0.8 * len(big)
            assert all(n % 4 == 0 for c, v in per_class.items() for n in v[:-1])  # only the last stretch holds the rest


def test_bench_classes_prints_the_table(capsys):
    from toolkit.bench.classes import main

    report = main(classes=1200, data="62,many", topologies="1x0", max_seconds=60)
    out = capsys.readouterr().out
    assert "| classes | layout | batcher |" in out and len(report["rows"]) == 6
    rows = {(r["data"], r["layout"], r["batcher"]): r for r in report["rows"]}
    new = rows["many", "by_class", "new"]
    assert new["complete_epoch"] and new["repeats_in_batches"] == 0 and new["peak_buffered"] <= new["bound"]
    assert rows["many", "mixed", "old"]["peak_buffered"] > new["bound"] and rows["many", "mixed", "old"]["bound"] == 0
