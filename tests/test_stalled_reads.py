"""A `pipe:` (or http) shard whose source stops sending stops the reader with one line, not forever.

The shards are served by a real `pipe:` template, as in test_remote_shards.py: a small shell
script stands in for ``aws s3 cp s3://bucket/shards/{} -`` and, for .tar files, sends the first
part of the shard and then hangs in a ``sleep`` it started in the background (a grandchild of
the loader, holding the pipe open) -- what a stuck download looks like from the reader.
"""
from __future__ import annotations

import gzip
import re
import time
import warnings
from pathlib import Path

import psutil
import pytest

from conftest import craft_shards
from toolkit.data.reader import SkipLog, StalledRead
from toolkit.data.stream import ShardStream, make_loader
from toolkit.data.tario import with_read_timeout, tar_samples
from toolkit.errors import ConfigError, DataError, TarError

STALL_AFTER = 20000  # bytes of the shard sent before the source hangs


def _serve(tmp_path: Path, shards: Path, tar_body: str) -> str:
    """A `pipe:` template whose command sends _info.json whole and runs ``tar_body`` for a .tar
    (``$f``: the shard's path; ``$pids``: where it notes the pids of what it started)."""
    script = tmp_path / "serve.sh"
    script.write_text(
        'f="%s/$1"; pids="%s"\n'
        'case "$1" in\n'
        "  *.tar) echo $$ >> \"$pids\"; %s ;;\n"
        '  *) exec cat "$f" ;;\n'
        "esac\n" % (shards, tmp_path / "pids", tar_body)
    )
    return f"pipe:sh {script} {{}}"


STALLING = f'head -c {STALL_AFTER} "$f"; sleep 1000 & echo $! >> "$pids"; wait'


def _pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _gone(pid: int, wait_s: float = 3.0) -> bool:
    """The process has died (a zombie: dead, waiting to be reaped), within ``wait_s``: SIGKILL
    is delivered asynchronously, and a loaded machine may take a moment to end a process."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _shards(tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    craft_shards(shards, {"train": [60], "val": [60]}, num_classes=3)  # ~180 kB per shard
    assert (shards / "val-000000.tar").stat().st_size > 3 * STALL_AFTER
    return shards


MESSAGE = (r"^no data for {t} s from pipe:sh \S+serve.sh {name} \({name}, after byte %d\): "
           r"the shard's source stalled$" % STALL_AFTER)


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
def test_a_stalled_pipe_shard_stops_the_loader_with_one_line(tmp_path, strict):
    shards = _shards(tmp_path)
    timeout = 2 if not strict else 1
    stream = ShardStream(_serve(tmp_path, shards, STALLING), split="val", mode="eval", batch_size=4,
                         strict=strict, read_timeout_s=timeout)
    batches = 0
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(StalledRead) as info:
        warnings.simplefilter("always")
        for _ in make_loader(stream, num_workers=0):
            batches += 1
    elapsed = time.monotonic() - started
    assert timeout <= elapsed < timeout + 4, elapsed
    assert re.match(MESSAGE.format(t=timeout, name=re.escape("val-000000.tar")), str(info.value)), str(info.value)
    assert isinstance(info.value, DataError) and not isinstance(info.value, TarError)
    assert batches > 0  # what arrived before the stall was read
    # an outage, not damage: neither skipped nor counted nor warned about, nor turned into "corrupt shard data"
    assert stream.skip_counts() == {"unreadable": 0, "bad_label": 0, "short_shard": 0}
    assert not [w for w in caught if "skipping" in str(w.message)]
    shell, sleeper = _pids(tmp_path)
    assert _gone(shell) and _gone(sleeper), "the stalled command or its child was left running"


def test_a_stall_in_a_loader_worker_reaches_the_training_loop_as_one_line():
    """A worker's error comes back re-raised by torch as ``type(error)(text with its traceback)``:
    still a StalledRead (a DataError), and the training loop's one line is the stall's message.
    (A real worker stalls the same way, but torch takes 5 s to shut down a worker that raised,
    whatever the error, too slow for this file.)"""
    from torch._utils import ExceptionWrapper

    from toolkit.engine.failures import one_line

    line = "no data for 300 s from pipe:aws s3 cp s3://b/train-000001.tar - (train-000001.tar, after byte 7): " \
           "the shard's source stalled"
    try:
        raise StalledRead(line)
    except StalledRead:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(StalledRead) as info:
        wrapped.reraise()
    assert isinstance(info.value, DataError) and one_line(info.value) == line


def test_a_normal_pipe_shard_reads_completely_with_the_timeout_on(tmp_path):
    shards = _shards(tmp_path)
    remote = _serve(tmp_path, shards, 'cat "$f"')
    before = {c.pid for c in psutil.Process().children(recursive=True)}  # e.g. a W&B service of an earlier test
    keys = [k for ks, _, _ in make_loader(ShardStream(remote, split="val", mode="eval", batch_size=7,
                                                      read_timeout_s=2, strict=True), num_workers=0) for k in ks]
    local = [k for ks, _, _ in make_loader(ShardStream(shards, split="val", mode="eval", batch_size=7), num_workers=0)
             for k in ks]
    assert keys == local and len(keys) == 60
    assert _pids(tmp_path) and all(_gone(p) for p in _pids(tmp_path))
    assert not [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.status() != psutil.STATUS_ZOMBIE]


def test_a_slow_source_that_keeps_sending_is_not_a_stall(tmp_path):
    shards = _shards(tmp_path)
    # three pieces 0.3 s apart: longer than the timeout in all, never that long without a byte
    slow = ('head -c 30000 "$f"; sleep 0.3; tail -c +30001 "$f" | head -c 30000; sleep 0.3; '
            'tail -c +60001 "$f"')
    remote = _serve(tmp_path, shards, slow)
    keys = [k for ks, _, _ in make_loader(ShardStream(remote, split="val", mode="eval", batch_size=7,
                                                      read_timeout_s=0.5, strict=True), num_workers=0) for k in ks]
    assert len(keys) == 60


def test_a_stalled_gzip_pipe_is_a_stall_not_damaged_gzip_data(tmp_path):
    shards = _shards(tmp_path)
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "val-000000.tar").write_bytes(gzip.compress((shards / "val-000000.tar").read_bytes(), compresslevel=1))
    remote = _serve(tmp_path, packed, STALLING)
    errors = []
    url = remote.replace("{}", "val-000000.tar")
    with pytest.raises(StalledRead, match=r"no data for 0.5 s from .*\(val-000000.tar, after byte \d+\)"):
        for _ in tar_samples(iter([{"url": url}]), handler=lambda e: errors.append(e) or True, read_timeout_s=0.5):
            pass
    assert not errors
    assert all(_gone(p) for p in _pids(tmp_path))


def test_a_shard_abandoned_while_its_source_hangs_is_closed_without_waiting_for_it(tmp_path):
    shards = _shards(tmp_path)
    url = _serve(tmp_path, shards, STALLING).replace("{}", "val-000000.tar")
    samples = tar_samples(iter([{"url": url}]), handler=lambda e: True, read_timeout_s=0.5)
    next(samples)  # a loader cut mid-shard...
    deadline = time.monotonic() + 5
    while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:  # ...while its source hangs
        time.sleep(0.01)
    started = time.monotonic()
    samples.close()
    assert time.monotonic() - started < 2.5  # (webdataset's Pipe.close would wait up to 7200 s)
    assert len(_pids(tmp_path)) == 2 and all(_gone(p) for p in _pids(tmp_path))


def test_a_failing_command_is_reported_to_the_handler_as_before(tmp_path):
    errors = []
    got = list(tar_samples(iter([{"url": f"pipe:cat {tmp_path}/missing-000000.tar"}]),
                           handler=lambda e: errors.append(e) or True, read_timeout_s=2))
    assert got == [] and len(errors) == 1
    assert isinstance(errors[0], OSError) and "exit 1" in str(errors[0]), errors


def test_skip_log_re_raises_a_stall_in_strict_and_lenient_mode():
    for strict in (False, True):
        stall = StalledRead("no data for 1 s from pipe:x (x.tar, after byte 0): the shard's source stalled")
        with pytest.raises(StalledRead) as info:
            SkipLog(strict=strict).skip(stall, "pipe:x")
        assert info.value is stall


def test_timeout_zero_reads_the_pipe_as_webdataset_does_and_bad_values_are_refused(tmp_path):
    from webdataset.gopen import gopen

    pipe = gopen("pipe:true")
    try:
        assert with_read_timeout(pipe, "pipe:true", 0) is pipe
        assert with_read_timeout(pipe, "pipe:true", 5) is not pipe
        local = open(__file__, "rb")
        with local:
            assert with_read_timeout(local, __file__, 5) is local  # local files: no timeout, no cost
    finally:
        pipe.close()
    for bad in (-1, float("nan"), float("inf"), "300", True):
        with pytest.raises(ConfigError, match="read_timeout_s must be a number of seconds >= 0"):
            ShardStream(tmp_path, read_timeout_s=bad)


def _serve_info(tmp_path: Path, info_body: str, name: str = "serve_info.sh") -> str:
    """A `pipe:` template whose command runs ``info_body`` for _info.json (``$pids``: where it
    notes the pids of what it started)."""
    script = tmp_path / name
    script.write_text('pids="%s"\necho $$ >> "$pids"\n%s\n' % (tmp_path / "pids", info_body))
    return f"pipe:sh {script} {{}}"


def test_a_stalled_info_json_is_one_line_and_its_command_is_killed(tmp_path):
    """read_info of a `pipe:` folder whose _info.json source hangs: StalledRead after the
    configured read timeout (it waited forever before), the command and its child killed."""
    from toolkit.data.shards import read_info

    template = _serve_info(tmp_path, 'printf "{\\"classes\\": "; sleep 1000 & echo $! >> "$pids"; wait')
    started = time.monotonic()
    with pytest.raises(StalledRead) as info:
        read_info(template, read_timeout_s=1)
    assert 1 <= time.monotonic() - started < 5
    assert str(info.value).startswith("no data for 1 s from pipe:sh ") and "_info.json" in str(info.value)
    assert "\n" not in str(info.value)
    shell, sleeper = _pids(tmp_path)
    assert _gone(shell) and _gone(sleeper), "the stalled command or its child was left running"
    # a source that never ends is refused at the size limit, not read into memory
    with pytest.raises(DataError, match=r"more than 64 MiB: not an _info.json"):
        read_info(_serve_info(tmp_path, "exec yes", name="endless.sh"), read_timeout_s=5)
    # and through the training stream, the config's read_timeout_s applies to it too
    with pytest.raises(StalledRead):
        ShardStream(template, split="val", mode="eval", batch_size=4, read_timeout_s=1)
