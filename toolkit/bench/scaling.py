"""``toolkit bench scaling``: one training process vs two (gloo, CPU), step time split by phase.

Runs :mod:`toolkit.bench._scaling_worker` once as a plain process and once as two CPU
processes on gloo, the way the README starts them::

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --main_process_port <free> ...

Both train the demo's network (ZFNet at 32×32) on the demo data (scikit-learn's digits,
sharded into ``$TOOLKIT_CACHE/bench`` or a temporary folder; ``--data synthetic`` uses random
uint8 batches instead) with the same *per-process* batch (the digits config: 10 classes × 16),
so two processes train on twice the images per step. Batches are read before the clock
starts; the clock covers only training steps. The cores are split evenly between the
processes (torch threads = cores / processes), so both runs use the whole machine.

The table gives the mean ms per step of each phase (mean over ranks): forward, waiting for
the slowest rank (barrier), the all-gathers of embeddings and labels, semi-hard mining of the
rank's own anchors against the global batch, backward (which, with two processes, holds the
gathered embeddings' gradient all-reduce and DDP's gradient all-reduce), optimizer; then the wall time per step and the images/s. Launches alternate 1 2 2 1 ...;
each side reports its best launch.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.bench import cores, data_root, log, require_ints, write_json
from toolkit.errors import ConfigError

WORKER = Path(__file__).with_name("_scaling_worker.py")
PHASES = ("forward", "wait", "gather", "mining", "backward", "optimizer")
LABELS = {
    "forward": "forward (to_model_input + model)",
    "wait": "wait for slowest rank (barrier)",
    "gather": "gather (all-gather embeddings + labels)",
    "mining": "mining (semi-hard loss, own anchors vs global batch)",
    "backward": "backward (+ embedding-grad and DDP grad all-reduces)",
    "optimizer": "optimizer + scheduler",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, worker_args: list[str], out: Path, *, threads: int, timeout: float,
           worker: Path = WORKER, what: str = "scaling") -> dict:
    """Run ``worker`` with ``processes`` processes (one plain process, or gloo ranks started as
    the README starts them); return the JSON rank 0 writes to ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    if processes == 1:
        cmd = [sys.executable, str(worker)]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [
            str(accelerate) if accelerate.exists() else "accelerate", "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
            "--main_process_port", str(_free_port()), str(worker),
        ]
    cmd += [*worker_args, "--threads", str(threads), "--out", str(out)]
    if out.exists():
        out.unlink()
    log = out.with_suffix(".log")
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the ranks
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks share this session
            proc.wait()
            raise RuntimeError(f"toolkit bench {what}: {processes} process(es) ran over {timeout:.0f} s") from None
    if rc != 0 or not out.is_file():
        lines = log.read_text(errors="replace").splitlines()
        # the rank's own error (a traceback's last line, a C++ terminate) comes before the
        # launcher's summary, which would otherwise fill the tail
        errors = [ln for ln in lines if any(w in ln for w in ("Error", "terminate called", "what():"))]
        tail = "\n".join([*errors[-5:], *lines[-15:]])
        raise RuntimeError(f"toolkit bench {what}: {processes} process(es) failed (exit {rc}):\n{tail}")
    return json.loads(out.read_text())


def format_table(one: dict, two: dict) -> str:
    rows = [
        "| ms per step (mean over ranks) | 1 process | 2 processes |",
        "| --- | ---: | ---: |",
    ]
    for p in PHASES:
        rows.append(f"| {LABELS[p]} | {one['ms'][p]:.1f} | {two['ms'][p]:.1f} |")
    compute = [r["ms"]["forward"] + r["ms"]["backward"] for r in (one, two)]
    rows.append(f"| compute = forward + backward | {compute[0]:.1f} | {compute[1]:.1f} |")
    rows.append(f"| **step (wall)** | **{one['step_ms']:.1f}** | **{two['step_ms']:.1f}** |")
    rows.append(f"| images per step (global batch) | {one['global_batch']} | {two['global_batch']} |")
    rows.append(f"| torch threads per process | {one['ranks'][0]['threads']} | {two['ranks'][0]['threads']} |")
    rows.append(f"| **images/s** | **{one['images_per_s']:,.1f}** | **{two['images_per_s']:,.1f}** |")
    return "\n".join(rows)


def main(
    *,
    data: str = "digits",
    batch_size: int = 160,
    K: int = 16,
    input_size: int = 32,
    warmup: int = 3,
    steps: int = 10,
    repeats: int = 2,
    processes: int = 2,
    timeout: float = 600.0,
    seed: int = 0,
    out: str = "",
) -> dict:
    """Images/s and ms per step phase, one process vs ``processes`` gloo CPU processes.

    Args:
        data: digits (the demo's shards) or synthetic (random uint8 P×K batches).
        batch_size: images per step *per process* (P×K; digits has 10 classes).
        K: images per class in a batch.
        input_size: network input side (32 = the demo).
        warmup: untimed steps per launch.
        steps: timed steps per launch.
        repeats: launches per side, alternating 1 2 2 1; each side's best is reported.
        processes: processes of the multi-process side (2 = the README's CPU command).
        timeout: seconds allowed per launch.
        seed: data and weights seed.
        out: optional JSON output file (written atomically).
    """
    if data not in ("digits", "synthetic"):
        raise ConfigError(f"toolkit bench scaling: --data must be digits or synthetic, got {data!r}")
    require_ints("scaling", (("batch_size", batch_size, 2), ("K", K, 2), ("input_size", input_size, 1),
                             ("warmup", warmup, 0), ("steps", steps, 1), ("repeats", repeats, 1),
                             ("processes", processes, 2)))

    n_cores = cores()
    with data_root() as (root, _), tempfile.TemporaryDirectory(prefix="toolkit-scaling-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        worker_args = ["--data", data, "--batch_size", str(batch_size), "--K", str(K), "--input_size",
                       str(input_size), "--warmup", str(warmup), "--steps", str(steps), "--seed", str(seed)]
        if data == "digits":
            t0 = time.perf_counter()
            from toolkit.bench.loader import digits_shards

            shards = digits_shards(root, seed=seed)
            log(f"digits shards ready in {time.perf_counter() - t0:.1f} s ({shards})")
            worker_args += ["--shards", str(shards)]
        runs: dict[int, list[dict]] = {1: [], processes: []}
        order = []
        for r in range(repeats):
            order += [1, processes] if r % 2 == 0 else [processes, 1]
        for n in order:
            threads = max(1, n_cores // n)
            t0 = time.perf_counter()
            res = launch(n, worker_args, work / f"p{n}.json", threads=threads, timeout=timeout)
            runs[n].append(res)
            log(f"  {n} process(es) x {threads} thread(s): {res['images_per_s']:,.1f} images/s, "
                 f"{res['step_ms']:.1f} ms/step (launch {time.perf_counter() - t0:.0f} s)")

    one = max(runs[1], key=lambda r: r["images_per_s"])
    many = max(runs[processes], key=lambda r: r["images_per_s"])
    ratio = many["images_per_s"] / one["images_per_s"]
    print("## toolkit bench scaling\n")
    print(
        f"ZFNet at {input_size}×{input_size}, {data} data, {one['global_batch']} images per process per step "
        f"(P×K, K={K}), semi-hard mining of each rank's anchors over the global batch, Adam, fp32, CPU; {n_cores} cores split evenly "
        f"between the processes; {processes} processes = `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
        f"--num_processes {processes}` (gloo, DDP). {warmup} warm-up + {steps} timed steps per launch, best of "
        f"{repeats} launch(es) per side, alternating. Phase times are means over steps and ranks; a barrier "
        "before the gather keeps waiting for a slower rank out of the gather's time.\n"
    )
    print(format_table(one, many).replace("2 processes", f"{processes} processes"))
    print(
        f"\nimages/s, {processes} processes vs 1: {ratio:.2f}× (same {n_cores} cores; each process mines its own "
        f"anchors against the {processes}× larger global batch)"
    )
    report = {"benchmark": "scaling", "cores": n_cores, "data": data, "batch_size_per_process": one["global_batch"],
              "one": one, "many": many, "processes": processes, "ratio": ratio, "runs": runs}
    if out:
        write_json(out, report)
    return report
