"""``toolkit bench``: run the way users run it (a subprocess of the installed script)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_font
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


def test_knn_bench_prints_every_method_and_writes_json(tmp_path):
    out = tmp_path / "knn.json"
    # Tiny: N = 300 and 700 (c = 34 < N: the screened path), queries capped at 60.
    r = run("bench", "knn", "--sizes", "300,700", "--max_queries", 60, "--repeats", 2, "--approx", "hnsw,ivf",
            "--dim", 16, "--classes", 5, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("| train N"))
    assert all(col in header for col in ("method", "exact", "seconds", "agreement", "mismatches"))
    methods = ["faiss-screened", "torch", "sklearn", "faiss flat raw", "faiss hnsw", "faiss ivf"]
    for n, q in (("300", "45"), ("700", "60")):  # 15 % of 300; 15 % of 700 capped at 60
        rows = [line for line in r.stdout.splitlines() if line.startswith(f"| {n} | {q} |")]
        assert [row.split("|")[3].strip() for row in rows] == methods, r.stdout
        for row in rows[:3]:  # the exact ones agree with scikit-learn on every query
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[3] == "yes" and cells[6] == "1.000000" and cells[7] == "0", row
    assert 'backend="auto" runs:' in r.stdout

    report = json.loads(out.read_text())
    assert report["benchmark"] == "knn" and report["max_queries"] == 60
    assert [(row["n_train"], row["n_queries"]) for row in report["rows"]] == [(300, 45), (700, 60)]
    for row in report["rows"]:
        assert list(row["methods"]) == methods
        assert row["fastest_exact"] in ("faiss-screened", "torch", "sklearn")
        assert row["auto"] in ("faiss", "torch", "sklearn")
        for name, m in row["methods"].items():
            assert m["exact"] == (name in ("faiss-screened", "torch", "sklearn"))
            assert m["s"] > 0 and len(m["runs"]) == (1 if name in ("faiss hnsw", "faiss ivf") else 2)
            assert 0 <= m["agreement"] <= 1
        assert row["methods"]["sklearn"]["vs_sklearn"] == pytest.approx(1.0)
        assert row["methods"]["faiss hnsw"]["build_s"] > 0


def test_knn_bench_rejects_an_unknown_index_in_one_line():
    r = run("bench", "knn", "--sizes", 100, "--approx", "lsh")
    assert r.returncode != 0
    err = _lines(r.stderr)
    assert len(err) == 1 and "--approx" in err[0] and "hnsw" in err[0], r.stderr


@pytest.mark.parametrize("bad, named", [(["--minutes", "0"], "--minutes"), (["--holdout", "0"], "--holdout")])
def test_openset_bench_refuses_bad_options_before_any_work(tmp_path, bad, named):
    r = run("bench", "openset", *bad, env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2
    err = _lines(r.stderr)
    assert len(err) == 1 and named in err[0], r.stderr
    assert not (tmp_path / "cache").exists(), "no folder rendered or sharded"


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


def _font_tree(root: Path, families: int) -> Path:
    """``families`` family folders of two links each to one usable font (a stand-in for installed fonts)."""
    font = one_font()
    for i in range(families):
        (root / f"family-{i:03d}").mkdir(parents=True)
        for face in ("Regular.ttf", "Bold.otf", "Italic.ttf"):
            (root / f"family-{i:03d}" / face).symlink_to(font)
    return root


def test_fonts_bench_counts_usable_fonts_per_family_and_says_how_to_install(tmp_path):
    r = run("bench", "fonts", "--font_root", _font_tree(tmp_path / "fonts", 3))
    assert r.returncode == 0, r.stderr
    assert "6 usable fonts from 3 families" in r.stdout  # 2 of each family's 3 faces
    assert "toolkit bench fonts --install" in r.stdout and "apt-get install" in r.stdout
    (tmp_path / "empty").mkdir()
    r = run("bench", "fonts", "--install", env_extra={"PATH": str(tmp_path / "empty")})  # no apt-get on this PATH
    assert r.returncode == 2 and len(_lines(r.stderr)) == 1 and "needs apt-get" in r.stderr, r.stderr


@pytest.mark.parametrize("bad, named", [(["--minutes", "0"], "--minutes"), (["--rows", "raw,nope"], "--rows"),
                                        (["--holdout", "61"], "--holdout")])
def test_accuracy_bench_refuses_bad_options_before_any_work(tmp_path, bad, named):
    r = run("bench", "accuracy", *bad, "--shards", tmp_path / "hard", env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2
    err = _lines(r.stderr)
    assert len(err) == 1 and named in err[0], r.stderr
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("hard*")), "nothing rendered or sharded"


def test_openset_bench_with_a_font_folder_without_fonts_is_one_line(tmp_path):
    (tmp_path / "no-fonts").mkdir()
    r = run("bench", "openset", "--font_root", tmp_path / "no-fonts", env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2
    err = _lines(r.stderr)
    assert len(err) == 1 and "no font drawing 0-9, A-Z, a-z" in err[0], r.stderr


def test_accuracy_bench_without_enough_fonts_says_how_to_get_them(tmp_path):
    r = run("bench", "accuracy", "--font_root", _font_tree(tmp_path / "fonts", 3), "--shards", tmp_path / "hard",
            env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2
    err = _lines(r.stderr)
    assert len(err) == 1 and "needs >= 100 usable fonts, found 6" in err[0] and "bench fonts --install" in err[0], r.stderr


def test_accuracy_bench_data_only_builds_the_hard_shards_once(tmp_path):
    env = {"TOOLKIT_CACHE": str(tmp_path / "cache")}
    args = ("bench", "accuracy", "--data_only", "--per_class", 10, "--font_root", _font_tree(tmp_path / "fonts", 50),
            "--shards", tmp_path / "hard")
    r = run(*args, env_extra=env)
    assert r.returncode == 0, r.stderr[-2000:]
    from toolkit.data.shards import read_info

    for size in (32, 64):  # the stored sizes of the recipes compared
        closed, open_ = read_info(tmp_path / f"hard-{size}"), read_info(tmp_path / f"hard-{size}-open")
        assert closed.num_classes == 62 and closed.holdout_classes == [] and closed.image_size == size
        assert len(open_.holdout_classes) == 12 and open_.splits["test"].num_samples == 120
        assert closed.splits["train"].num_samples + closed.splits["val"].num_samples == 620
    assert "100 fonts" in r.stderr  # 50 families x 2 faces
    stamp = (tmp_path / "hard-64" / "_info.json").stat().st_mtime_ns
    r = run(*args, env_extra=env)
    assert r.returncode == 0 and "sharding" not in r.stderr, r.stderr  # reused: same folder, same settings
    assert (tmp_path / "hard-64" / "_info.json").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- the GPU path, on CPU


def test_gpu_bench_without_cuda_is_one_skipped_line_and_checks_options_first(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA path")
    r = run("bench", "gpu", "--dtypes", "bf16,fp32", "--compile", "false", "--channels_last", "true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(_lines(r.stdout)) == 1 and json.loads(r.stdout)["skipped"] is True
    r = run("bench", "gpu", "--dtypes", "fp16")
    assert r.returncode == 2 and len(_lines(r.stderr)) == 1 and "--dtypes" in r.stderr, r.stderr
    gpu = get_bench("gpu")
    for bad, named in (({"compile": "maybe"}, "--compile"), ({"channels_last": "2"}, "--channels_last"),
                       ({"budget_s": -1}, "--budget_s"), ({"device": "tpu"}, "--device"), ({"loader": "x"}, "--loader")):
        with pytest.raises(ConfigError, match=named):
            gpu(**bad)


def test_gpu_bench_matrix_and_peaks():
    from toolkit.bench.gpu import _choices, _dtypes, configurations, peak_for

    rows = configurations(_dtypes("bf16,fp32"), _choices("channels_last", "both"), _choices("compile", "both"))
    assert len(rows) == 8 and [r["compiled"] for r in rows] == [False] * 4 + [True] * 4  # eager first
    assert configurations(_dtypes(("bf16",)), _choices("channels_last", True), _choices("compile", "false")) == [
        {"dtype": "bf16", "channels_last": True, "compiled": False}]
    assert peak_for("NVIDIA H200")["bf16"] == 989.0 and peak_for("NVIDIA H200 NVL")["bf16"] == 835.0
    assert peak_for("Some Unknown GPU") is None


def test_gpu_bench_dry_run_on_cpu_covers_the_cuda_code_path(tmp_path):
    """`--device cpu` runs what a GPU runs (matrix, FLOPs, loader to the device, table, JSON)."""
    out = tmp_path / "gpu.json"
    r = run("bench", "gpu", "--device", "cpu", "--input_size", 32, "--batch_size", 8, "--warmup", 0, "--steps", 1,
            "--dtypes", "fp32", "--compile", "false", "--loader_batches", 4, "--workers", 2, "--out", out,
            env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["skipped"] is False and json.loads(out.read_text()) == report
    assert [(x["dtype"], x["channels_last"], x["compiled"]) for x in report["train"]] == [
        ("fp32", False, False), ("fp32", True, False)]
    for row in report["train"]:
        assert row["images_per_s"] > 0 and row["achieved_tflops"] > 0 and row["share_of_bf16_peak"] == "unknown"
    loader = report["loader"]
    assert [x["workers"] for x in loader["rows"]] == [1, 2] and loader["workers_for_best_train"] >= 1
    assert "| dtype | channels_last | torch.compile | images/s per GPU |" in r.stderr


def test_loader_bench_per_worker_view_sizes_the_loader_for_a_gpu(tmp_path):
    from toolkit.bench.loader import sizing_row, worker_counts, workers_needed

    assert worker_counts(1) == [1] and worker_counts(3) == [1, 2, 3]
    assert worker_counts(16) == [1, 2, 3, 4, 8, 16] and worker_counts(12) == [1, 2, 3, 4, 8, 12]
    assert workers_needed(2000, 900) == 3 and workers_needed(100, 900) == 1
    rows = [{"workers": w} for w in (1, 2, 4, 8, 16)]
    assert sizing_row(rows, 16)["workers"] == 8 and sizing_row(rows, 2)["workers"] == 1

    out = tmp_path / "loader.json"
    r = run("bench", "loader", "--size", "small", "--per_class", 4, "--batch_size", 8, "--images", 32, "--workers", 2,
            "--repeats", 1, "--gpu_rates", "2000,10000", "--out", out, env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| loader workers | samples/s | samples/s per worker | vs 1 worker | start-up s |" in r.stdout
    for w in (1, 2):
        cells = [c.strip() for c in next(x for x in r.stdout.splitlines() if x.startswith(f"| {w} |")).strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[2].replace(",", "")) > 0, cells
    view = json.loads(out.read_text())["per_worker"]
    assert [row["workers"] for row in view["rows"]] == [1, 2]
    for n in ("2000", "10000"):
        need = view["workers_needed"][n]
        assert need == workers_needed(float(n), view["samples_per_s_per_worker"])
        assert f"a GPU at {int(n):,} images/s needs {need} loader worker(s)" in r.stdout
    # resharded so that each worker reads whole shards of its own
    from toolkit.data.shards import read_info

    resharded = [p for p in (tmp_path / "cache" / "bench").glob("*-x*") if (p / "_info.json").is_file()]
    assert resharded and len(read_info(resharded[0]).splits["train"].filenames) >= 2
    r = run("bench", "loader", "--gpu_rates", "fast", env_extra={"TOOLKIT_CACHE": str(tmp_path / "cache2")})
    assert r.returncode == 2 and "--gpu_rates" in r.stderr and not (tmp_path / "cache2").exists()
