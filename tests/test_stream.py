"""Streaming loader, one process: P×K batches, exact epoch length, determinism, eval coverage;
the batchers on their own, over in-memory samples."""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
import torch

from conftest import craft_shards, make_image_folder, read_tar_samples, write_tar
from toolkit.errors import DataError
from toolkit.data.shards import read_info, write_shards
from toolkit.data.batching import eval_batches, pk_batches, pk_shape, random_batches
from toolkit.data.reader import assign_shards
from toolkit.data.stream import ShardStream, make_loader

SIZES = {"a": 16, "b": 12, "c": 14, "d": 10, "e": 18, "f": 12}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 classes, 82 images of 8×8 grey; ~7 train shards and 2 val shards of <= 10 samples."""
    root = tmp_path_factory.mktemp("stream")
    src = make_image_folder(root / "img", SIZES, size=(9, 7))
    out = root / "shards"
    write_shards(src, out, image_size=8, samples_per_shard=10, workers=1, progress=False)
    return out


def truth(folder, split):
    """{key: class index} of a split, read from the tar files themselves."""
    info = read_info(folder)
    keys = {}
    for name in info.splits[split].filenames:
        for key, sample in read_tar_samples(folder / name).items():
            keys[key] = int(sample["cls"])
    return keys


def collect(loader):
    return [(list(k), x, y) for k, x, y in loader]


def check_pk(batches, P, K, labels_of):
    for keys, images, labels in batches:
        assert images.dtype == torch.uint8
        assert images.shape[0] == len(keys) == labels.shape[0] == P * K
        counts = Counter(labels.tolist())
        assert len(counts) == P, f"batch has {len(counts)} classes, expected {P}"
        assert set(counts.values()) == {K}, f"images per class {dict(counts)}, expected {K} each"
        for key, label in zip(keys, labels.tolist()):
            assert labels_of[key] == label, f"{key}: label {label}, shard says {labels_of[key]}"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pk_batches_and_exact_epoch_length(shards, num_workers):
    labels = truth(shards, "train")
    stream = ShardStream(shards, split="train", mode="train", batch_size=12, P=3, K=4, seed=1)
    assert (stream.P, stream.K) == (3, 4)
    assert stream.steps_per_epoch() == len(labels) // 12
    for epoch in (0, 1):
        batches = collect(make_loader(stream, num_workers=num_workers, epoch=epoch))
        assert len(batches) == stream.steps_per_epoch()
        check_pk(batches, 3, 4, labels)
        assert batches[0][1].shape[1:] == (1, 8, 8)


def test_auto_p_fills_the_batch(shards):
    labels = truth(shards, "train")
    stream = ShardStream(shards, mode="train", batch_size=20, K=4)  # P=0: as many classes as fit
    assert (stream.P, stream.K) == (5, 4)
    batches = collect(make_loader(stream, num_workers=0))
    assert len(batches) == stream.steps_per_epoch() == len(labels) // 20
    check_pk(batches, 5, 4, labels)


def _keys(stream, epoch, num_workers):
    return [tuple(k) for k, _, _ in make_loader(stream, num_workers=num_workers, epoch=epoch)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_and_epoch_repeat_other_epochs_differ(shards, num_workers):
    s = ShardStream(shards, mode="train", batch_size=8, P=2, K=4, seed=7)
    e0 = _keys(s, 0, num_workers)
    again = _keys(ShardStream(shards, mode="train", batch_size=8, P=2, K=4, seed=7), 0, num_workers)
    e1 = _keys(s, 1, num_workers)
    other_seed = _keys(ShardStream(shards, mode="train", batch_size=8, P=2, K=4, seed=8), 0, num_workers)
    assert e0 == again
    assert e0 != e1
    assert e0 != other_seed


def test_random_batching_is_one_shuffled_pass(shards):
    labels = truth(shards, "train")
    s = ShardStream(shards, mode="train", batching="random", batch_size=10, seed=3)
    batches = collect(make_loader(s, num_workers=0))
    assert len(batches) == len(labels) // 10 == s.steps_per_epoch()
    keys = [k for b in batches for k in b[0]]
    assert len(keys) == len(set(keys)), "a sample repeated within one epoch of random batches"
    assert all(b[1].shape[0] == 10 for b in batches)
    assert all(labels[k] == y for b in batches for k, y in zip(b[0], b[2].tolist()))
    assert keys != sorted(keys)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_covers_split_exactly_once(shards, split, num_workers):
    labels = truth(shards, split)
    info = read_info(shards)
    assert len(info.splits[split].filenames) >= 2, "fixture should have several shards"
    s = ShardStream(shards, split=split, mode="eval", batch_size=4)
    seen = [(k, y) for keys, _, ys in make_loader(s, num_workers=num_workers) for k, y in zip(keys, ys.tolist())]
    assert len(seen) == len(labels) == info.splits[split].num_samples
    assert dict(seen) == labels


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (3, 1), (4, 2)])
def test_eval_split_across_ranks_covers_once(shards, world_size, num_workers):
    """Ranks simulated in one process (rank is just a parameter): union = split, no overlap."""
    labels = truth(shards, "val")  # 2 shards: fewer than world_size × workers slots
    per_rank = []
    for rank in range(world_size):
        s = ShardStream(shards, split="val", mode="eval", batch_size=3, rank=rank, world_size=world_size)
        per_rank.append([(k, y) for ks, _, ys in make_loader(s, num_workers=num_workers) for k, y in zip(ks, ys.tolist())])
    allseen = [kv for r in per_rank for kv in r]
    assert len(allseen) == len(labels)
    assert dict(allseen) == labels


def _cover(shard_sizes, num_slots):
    got = Counter()
    for slot in range(num_slots):
        positions, stride, offset = assign_shards(len(shard_sizes), num_slots, slot)
        assert positions, f"slot {slot} of {num_slots} reads nothing ({len(shard_sizes)} shards)"
        assert 0 <= offset < stride
        for p in positions:
            for i in range(shard_sizes[p]):
                if i % stride == offset:
                    got[(p, i)] += 1
    return got


def test_assign_shards_covers_every_sample_exactly_once():
    rng = random.Random(0)
    for num_shards, num_slots in itertools.product(range(1, 14), range(1, 14)):
        sizes = [rng.randint(0, 9) for _ in range(num_shards)]
        got = _cover(sizes, num_slots)
        want = {(p, i) for p, n in enumerate(sizes) for i in range(n)}
        assert set(got) == want, (num_shards, num_slots)
        assert set(got.values()) <= {1}, (num_shards, num_slots)


def test_assign_shards_balances_shards_and_sharers():
    for num_shards, num_slots in itertools.product(range(1, 14), range(1, 14)):
        loads = [len(assign_shards(num_shards, num_slots, s)[0]) for s in range(num_slots)]
        assert max(loads) - min(loads) <= 1
        if num_shards < num_slots:
            strides = [assign_shards(num_shards, num_slots, s)[1] for s in range(num_slots)]
            assert max(strides) - min(strides) <= 1


def test_pk_shape_resolution_and_errors():
    assert pk_shape(batch_size=64, K=4, num_classes=62) == (16, 4)
    assert pk_shape(batch_size=256, K=4, num_classes=62) == (62, 4)
    assert pk_shape(batch_size=64, K=4, P=5, num_classes=62) == (5, 4)
    with pytest.raises(DataError, match="K must be"):
        pk_shape(batch_size=64, K=1, num_classes=10)
    with pytest.raises(DataError, match="only 10"):
        pk_shape(batch_size=64, K=2, P=11, num_classes=10)
    with pytest.raises(DataError, match="larger than batch_size"):
        pk_shape(batch_size=8, K=4, P=3, num_classes=10)
    with pytest.raises(DataError, match="at least 2 classes"):
        pk_shape(batch_size=4, K=4, num_classes=10)


def test_missing_split_and_empty_split_are_clear_errors(tmp_path, shards):
    with pytest.raises(DataError, match="no split 'test'"):
        ShardStream(shards, split="test")
    craft_shards(tmp_path / "e", {"train": [4], "val": []}, num_classes=2)
    with pytest.raises(DataError, match="empty"):
        ShardStream(tmp_path / "e", split="val", mode="eval")


def test_unreachable_pk_raises_instead_of_spinning(tmp_path):
    folder = tmp_path / "one-class"
    craft_shards(folder, {"train": [6, 6]}, num_classes=1)
    info = json.loads((folder / "_info.json").read_text())
    info["classes"] = ["c0", "c1"]  # claims two classes, every sample is c0
    (folder / "_info.json").write_text(json.dumps(info))
    s = ShardStream(folder, mode="train", batch_size=4, P=2, K=2)
    with pytest.raises(DataError, match="cannot form"):
        collect(make_loader(s, num_workers=0))


def test_corrupt_sample_skipped_with_warning_or_raised_when_strict(tmp_path):
    folder = tmp_path / "bad"
    keys = craft_shards(folder, {"val": [5]}, num_classes=2)["val"]
    path = folder / "val-000000.tar"
    members = read_tar_samples(path)
    members[keys[2][0]]["png"] = b"not a png"
    write_tar(path, members)
    with pytest.warns(UserWarning, match="skipping unreadable"):
        seen = [k for ks, _, _ in make_loader(ShardStream(folder, split="val", mode="eval"), num_workers=0) for k in ks]
    assert sorted(seen) == sorted(k for k, _ in keys if k != keys[2][0])
    with pytest.raises(DataError, match="corrupt"):
        collect(make_loader(ShardStream(folder, split="val", mode="eval", strict=True), num_workers=0))


UNEVEN = [50, 3, 17, 1]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uneven") / "shards"
    craft_shards(folder, {"train": UNEVEN, "val": [6, 2, 1]}, num_classes=4)
    return folder


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (1, 2), (4, 1)])
def test_uneven_shards_every_rank_yields_steps_per_epoch(uneven, world_size, num_workers):
    """Ranks simulated in one process: each rank's loader stops at exactly steps_per_epoch."""
    labels = truth(uneven, "train")
    counts = []
    for rank in range(world_size):
        s = ShardStream(uneven, mode="train", batch_size=4, P=2, K=2, rank=rank, world_size=world_size)
        batches = collect(make_loader(s, num_workers=num_workers))
        check_pk(batches, 2, 2, labels)
        counts.append(len(batches))
    assert counts == [sum(UNEVEN) // (world_size * 4)] * world_size


def test_tiny_shards_do_not_make_pk_loader_give_up(tmp_path):
    """Shards of 40, 1, 1, 1 samples, 4 classes, 2 ranks × 2 workers, P=2 × K=2.

    Every class is reachable by every loader slot (each pass re-deals the 4 shards to the 4
    slots), so each rank must deliver its steps_per_epoch batches. The loader gives up after
    three consecutive passes without a batch; a slot dealt 1-sample shards three passes in a
    row raises "cannot form P×K batches: only 1 classes ... reachable" although the next
    pass would deal it the 40-sample shard -- the whole DDP run then dies.
    """
    folder = tmp_path / "tiny"
    craft_shards(folder, {"train": [40, 1, 1, 1]}, num_classes=4)
    labels = truth(folder, "train")
    outcome = {}
    for rank in range(2):
        s = ShardStream(folder, mode="train", batch_size=4, P=2, K=2, rank=rank, world_size=2, seed=0)
        try:
            batches = collect(make_loader(s, num_workers=2))
            check_pk(batches, 2, 2, labels)
            outcome[rank] = len(batches)
        except Exception as exc:  # the DataLoader re-raises the worker's DataError
            outcome[rank] = str(exc).strip().splitlines()[-1][:120]
    assert outcome == {0: 5, 1: 5}


def test_labels_outside_the_class_list_are_skipped_and_counted_over_workers(tmp_path):
    """A `.cls` no class of _info.json has would train on a class that does not exist: skipped,
    counted (summed over loader workers, each a separate process), or stopped with strict."""
    folder = tmp_path / "bad-labels"
    keys = craft_shards(folder, {"val": [6, 6], "train": [8, 8]}, num_classes=2)
    bad = set()
    for split, shard_index, sample in (("val", 0, 1), ("val", 1, 7), ("train", 0, 2), ("train", 1, 9)):
        path = folder / f"{split}-00000{shard_index}.tar"
        members = read_tar_samples(path)
        key = sorted(members)[sample % 6]
        members[key]["cls"] = b"7" if shard_index == 0 else b"-1"
        write_tar(path, members)
        bad.add(key)
    with pytest.warns(UserWarning, match="outside the shard folder's 2 classes"):  # in this process
        assert len([k for ks, _, _ in make_loader(ShardStream(folder, split="val", mode="eval"), num_workers=0) for k in ks]) == 10
    stream = ShardStream(folder, split="val", mode="eval", batch_size=4)
    seen = {k for ks, _, _ in make_loader(stream, num_workers=2) for k in ks}  # workers warn on their own stderr
    assert seen == {k for k, _ in keys["val"]} - bad
    assert stream.skip_counts() == {"unreadable": 0, "bad_label": 2, "short_shard": 0}  # one per worker process
    train = ShardStream(folder, split="train", mode="train", batch_size=4, P=2, K=2)
    batches = collect(make_loader(train, num_workers=2))
    assert all(0 <= int(y) < 2 for _, _, labels in batches for y in labels)
    assert not bad & {k for ks, _, _ in batches for k in ks}
    assert train.skip_counts()["bad_label"] >= 2
    with pytest.raises(DataError, match="outside the shard folder's 2 classes.*strict_data is on"):
        collect(make_loader(ShardStream(folder, split="val", mode="eval", strict=True), num_workers=0))


def _plain_samples(labels, prefix):
    return [(f"{prefix}{i}", torch.full((1, 2, 2), i, dtype=torch.uint8), c) for i, c in enumerate(labels)]


def test_pk_batches_over_plain_samples_keep_class_buffers_across_passes():
    """One image per class per pass: K=2 is only reached by carrying buffers over passes."""
    passes = lambda i: _plain_samples([0, 1, 2], prefix=f"p{i}-")  # noqa: E731
    batches = list(itertools.islice(pk_batches(passes, P=2, K=2, rng=random.Random(0), give_up_after=3, source="s"), 3))
    for keys, images, labels in batches:
        assert images.shape == (4, 1, 2, 2) and images.dtype == torch.uint8 and len(keys) == 4
        assert sorted(Counter(labels.tolist()).values()) == [2, 2]
    called = []

    def one_class(i):
        called.append(i)
        return _plain_samples([0, 0, 0], prefix=f"p{i}-")

    with pytest.raises(DataError, match=r"cannot form P×K=2×2 batches: only 1 classes with 2 images reachable by s \("):
        next(pk_batches(one_class, P=2, K=2, rng=random.Random(0), give_up_after=3, source="s"))
    assert called == [0, 1, 2]


def test_random_and_eval_batches_over_plain_samples():
    passes = lambda i: _plain_samples([0, 1, 0], prefix=f"p{i}-")  # noqa: E731
    batches = list(itertools.islice(random_batches(passes, batch_size=4, give_up_after=2, source="s", split="train"), 3))
    assert [k for keys, _, _ in batches for k in keys] == [f"p{i}-{j}" for i in range(4) for j in range(3)]  # leftovers carried over
    with pytest.raises(DataError, match="^s reaches no samples of 'train'$"):
        next(random_batches(lambda i: [], batch_size=4, give_up_after=2, source="s", split="train"))
    sizes = [len(keys) for keys, _, _ in eval_batches(_plain_samples([1, 0, 1, 1, 0], prefix="e"), 2)]
    assert sizes == [2, 2, 1]
