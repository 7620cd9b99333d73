"""``toolkit bench``: run the way users run it (a subprocess of the installed script)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.bench import BENCHMARKS, check_options, get_bench
from toolkit.errors import ConfigError

TOOLKIT = str(Path(sys.executable).with_name("toolkit"))


def run(*args, env_extra=None, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([TOOLKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_loader_bench_prints_both_sides_and_writes_json(tmp_path):
    out = tmp_path / "loader.json"
    # Tiny: 4 camera originals per class (16 at 1200×900), 4 chars per class (248), 4 batches of 8.
    r = run(
        "bench", "loader", "--per_class", 4, "--batch_size", 8, "--images", 32, "--workers", 1,
        "--repeats", 1, "--out", out,
        env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("| data"))
    assert "toolkit samples/s" in header and "seed samples/s" in header and "ratio" in header
    assert "nproc" in r.stdout and "torch" in r.stdout
    for kind in ("camera", "small"):
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {kind} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        toolkit_rate, seed_rate = (float(c.replace(",", "")) for c in cells[2:4])
        assert toolkit_rate > 0 and seed_rate > 0
        ratio = re.match(r"(\d+(?:\.\d+)?)×", cells[4])
        assert ratio, row
        assert re.search(r"target ≥\d+(\.\d+)?× [✓✗]", cells[4]), row

    report = json.loads(out.read_text())
    assert report["machine"]["nproc"] >= 1 and report["settings"]["startup_included"] is True
    assert [res["data"] for res in report["results"]] == ["camera", "small"]
    for res in report["results"]:
        a, b = res["toolkit"]["samples_per_s"], res["seed"]["samples_per_s"]
        assert a > 0 and b > 0
        assert res["ratio"] == pytest.approx(a / b)
        assert res["samples"] == 32 and all(run_["samples"] == 32 for run_ in res["toolkit"]["runs"] + res["seed"]["runs"])
    assert report["results"][0]["originals"]["width"] == 1200
    # Data were built under $TOOLKIT_CACHE/bench (re-used by later runs), not left elsewhere.
    assert (tmp_path / "cache" / "bench").is_dir()


def test_unknown_benchmark_is_a_one_line_error():
    r = run("bench", "nope")
    assert r.returncode != 0
    err = _lines(r.stderr)
    assert len(err) == 1, r.stderr
    assert "nope" in err[0] and "loader" in err[0]


def test_unknown_option_is_named_before_any_work(tmp_path):
    r = run("bench", "loader", "--bogus", 1, env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0
    err = _lines(r.stderr)
    assert len(err) == 1, r.stderr
    assert "--bogus" in err[0]
    assert not (tmp_path / "cache").exists(), "the benchmark did work before rejecting the option"


def test_registry_and_option_check():
    assert "loader" in BENCHMARKS
    fn = get_bench("loader")
    check_options("loader", fn, {"size": "small", "workers": 0})
    with pytest.raises(ConfigError, match="--worker"):
        check_options("loader", fn, {"worker": 1})
    with pytest.raises(ConfigError, match=r"known: .*loader"):
        get_bench("step-nope")
