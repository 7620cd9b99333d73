"""W&B sweeps over the same ``accelerate launch`` entry points (no second code path).

A sweep file (``configs/sweeps/*.yaml``) is W&B's own format. Its ``command`` starts
``accelerate launch launch/<stage>.py --config ... ${args}``; the W&B agent expands ``${args}``
to ``--name=value`` for each sampled parameter, which the launch scripts accept for every
config key, so every rank reads the same hyper-parameters from its command line and only
rank 0 talks to W&B.

Sweeps need a W&B server: the agent asks it for the next parameters. Offline, this module
can still validate a sweep file, print the exact command the agent would run, and run
trials locally with parameters sampled here (``toolkit sweep FILE --local N``).
"""
from __future__ import annotations

import itertools
import math
import os
import random
import typing
from pathlib import Path
from typing import Any

import yaml

from toolkit.config import ClassifyConfig, EmbedConfig, SelectBy, _field_types
from toolkit.errors import ConfigError
from toolkit.data.location import from_file_message, is_local_location

# What each stage's validator logs (metric names a sweep may optimise).
STAGES = {
    "embed": (EmbedConfig, ("val/best_knn_accuracy", *typing.get_args(SelectBy))),  # test/...: with held-out classes
    "classify": (ClassifyConfig, ("val/accuracy", "val/best_accuracy", "val/loss")),
}


# The only programs a sweep may run, and the `accelerate launch` options it may pass. A sweep
# file is data: its command is checked token by token, so it can choose hyper-parameters and
# the launcher's process layout, never what runs (no `bash -c`, no `accelerate launch
# --no_python ...`, no other script).
SCRIPTS = {f"launch/{stage}.py" for stage in STAGES}
LAUNCH_OPTIONS_WITH_VALUE = {
    "--config_file", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
    "--main_process_port", "--mixed_precision", "--dynamo_backend", "--num_cpu_threads_per_process", "--gpu_ids",
}
LAUNCH_FLAGS = {"--multi_gpu", "--cpu"}


def check_command(spec: dict, source) -> None:
    """Refuse a sweep command that would run anything but ``launch/embed.py`` / ``launch/classify.py``.

    Accepted shape (W&B's macros included)::

        [${env}] (accelerate launch [OPTIONS] | ${interpreter} | python | python3) (SCRIPT | ${program})
            [--config FILE] [key=value | --key=value ...] ${args}
    """
    cmd = [str(c) for c in spec["command"]]
    program = spec.get("program")
    if program is not None and str(program) not in SCRIPTS:
        raise ConfigError(f"{source}: program must be one of {', '.join(sorted(SCRIPTS))}, got {program!r}")

    def refuse(i: int, why: str):
        raise ConfigError(f"{source}: command token {i + 1} ({cmd[i] if i < len(cmd) else 'end'!r}): {why}")

    i = 1 if cmd[:1] == ["${env}"] else 0
    if cmd[i : i + 2] == ["accelerate", "launch"]:
        i += 2
        while i < len(cmd) and cmd[i].startswith("--"):
            option = cmd[i].split("=", 1)[0]
            if option in LAUNCH_FLAGS or (option in LAUNCH_OPTIONS_WITH_VALUE and "=" in cmd[i]):
                i += 1
            elif option in LAUNCH_OPTIONS_WITH_VALUE and i + 1 < len(cmd):
                i += 2
            else:
                refuse(i, f"not an accelerate launch option a sweep may use ({', '.join(sorted(LAUNCH_OPTIONS_WITH_VALUE | LAUNCH_FLAGS))})")
    elif i < len(cmd) and cmd[i] in ("${interpreter}", "python", "python3"):
        i += 1
    else:
        refuse(i, "a sweep command runs `accelerate launch` or `${interpreter}`")
    if i >= len(cmd) or not (cmd[i] in SCRIPTS or (cmd[i] == "${program}" and program is not None)):
        refuse(i, f"expected the launch script ({', '.join(sorted(SCRIPTS))} or ${{program}})")
    script = program if cmd[i] == "${program}" else cmd[i]
    locations = getattr(STAGES[Path(str(script)).stem][0], "LOCATIONS", ())
    for j in range(i + 1, len(cmd)):
        tok = cmd[j]
        if tok == "${args}" or (cmd[j - 1] == "--config" and not tok.startswith("${")):
            continue
        if tok == "--config":
            continue
        if "=" in tok and not tok.startswith("${"):
            key, value = tok.lstrip("-").split("=", 1)
            if key.replace("-", "_") in locations and not is_local_location(value):
                refuse(j, "a shard location written into a sweep file must be a local folder (never a pipe: command or URL)")
            continue
        refuse(j, "after the script only --config FILE, key=value overrides and ${args} may follow")


def stage_of(spec: dict) -> str:
    """'embed' or 'classify', from the launch script named in the command (or program)."""
    text = " ".join(map(str, spec.get("command", []))) + " " + str(spec.get("program", ""))
    found = [s for s in STAGES if f"launch/{s}.py" in text]
    if len(found) != 1:
        raise ConfigError("sweep command must run exactly one of launch/embed.py or launch/classify.py")
    return found[0]


def load_sweep(path: str | Path) -> dict:
    """Load and check a sweep file: metric logged by the validator, parameters are config keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    spec = yaml.safe_load(p.read_text())
    if not isinstance(spec, dict):
        raise ConfigError(f"{p}: not a mapping")
    for key in ("method", "metric", "parameters", "command"):
        if key not in spec:
            raise ConfigError(f"{p}: missing {key!r}")
    if not isinstance(spec["command"], list) or "${args}" not in spec["command"]:
        raise ConfigError(f"{p}: command must be a list containing ${{args}} (the agent's --name=value flags)")
    check_command(spec, p)
    stage = stage_of(spec)
    cfg_cls, metrics = STAGES[stage]
    if spec["metric"].get("name") not in metrics:
        raise ConfigError(f"{p}: metric {spec['metric'].get('name')!r} is not logged by the {stage} validator ({', '.join(metrics)})")
    keys = _field_types(cfg_cls)
    unknown = [k for k in spec["parameters"] if k not in keys]
    if unknown:
        raise ConfigError(f"{p}: parameters that are not {cfg_cls.__name__} keys: {', '.join(unknown)}")
    for name in getattr(cfg_cls, "LOCATIONS", ()):  # the agent puts these on the command line
        param = spec["parameters"].get(name) or {}
        for value in [param.get("value"), *(param.get("values") or [])]:
            if value is not None and not is_local_location(value):
                raise ConfigError(from_file_message(value, f"{p} (parameter {name})"))
    return spec


def sample_parameters(spec: dict, *, seed: int = 0) -> dict[str, Any]:
    """Random-search sample of a sweep's parameters (W&B's distributions, common subset)."""
    rng = random.Random(seed)
    out = {}
    for name, p in spec["parameters"].items():
        if "value" in p:
            out[name] = p["value"]
        elif "values" in p:
            out[name] = rng.choice(p["values"])
        else:
            dist = p.get("distribution", "uniform" if isinstance(p.get("min"), float) else "int_uniform")
            lo, hi = p["min"], p["max"]
            if dist == "log_uniform_values":
                out[name] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            elif dist == "uniform":
                out[name] = rng.uniform(lo, hi)
            elif dist == "int_uniform":
                out[name] = rng.randint(int(lo), int(hi))
            else:
                raise ConfigError(f"parameter {name}: distribution {dist!r} not supported for local sampling")
    return out


def expand_command(spec: dict, params: dict[str, Any]) -> list[str]:
    """The argv the W&B agent would run for ``params``, using W&B's own expansion helpers."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(spec["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    # Same substitutions as wandb_agent.Agent._command_run on POSIX.
    sweep_vars.update(interpreter=["python"], program=[spec.get("program", "")], env=["/usr/bin/env"])
    argv: list[str] = []
    for c in map(str, command):
        if c.startswith("${") and c.endswith("}"):
            argv += sweep_vars.get(c[2:-1]) or []
        else:
            argv.append(c)
    return argv


def trial_run_dir(run_dir: str) -> str:
    """A W&B agent trial's own folder, ``run_dir/sweep-<sweep id>/<run id>``; ``run_dir`` otherwise.

    The agent starts every trial with the same command and sets ``WANDB_SWEEP_ID`` and
    ``WANDB_RUN_ID`` (shared by all ranks of the launch), so trials never meet in one folder.
    Launch scripts apply it before checking the folder.
    """
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return str(Path(run_dir) / f"sweep-{sweep}" / run) if sweep and run else run_dir


def grid_parameters(spec: dict) -> list[dict[str, Any]]:
    """Every combination of a grid sweep's ``values``, in W&B's order: parameters sorted by name,
    the last one varying fastest, each one's values in the file's order."""
    names = sorted(spec["parameters"])
    choices = []
    for name in names:
        p = spec["parameters"][name]
        if "value" not in p and "values" not in p:
            raise ConfigError(f"parameter {name}: a grid sweep takes value or values, not a distribution")
        choices.append([p["value"]] if "value" in p else list(p["values"]))
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def sweep_metric(spec: dict) -> tuple[str, str]:
    """(metric name, goal: "maximize" or "minimize") of a sweep file."""
    return spec["metric"]["name"], spec["metric"].get("goal", "maximize")


def trial_result(run_dir: str | Path, metric: str, goal: str = "maximize") -> float | None:
    """The best value of ``metric`` a finished trial logged (``metrics.jsonl``), or None."""
    from toolkit.tracking import read_metrics

    values = [float(r[metric]) for r in read_metrics(run_dir) if isinstance(r.get(metric), (int, float))]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return min(finite) if goal == "minimize" else max(finite)


def run_local(spec: dict, *, trials: int, seed: int = 0, run_root: str = "runs/sweep-local") -> list[dict]:
    """Trials without a W&B server, each the agent's exact command: the first ``trials`` points of
    a ``grid`` sweep, random samples otherwise. Returns one record per trial, with its metric."""
    import os
    import subprocess

    metric, goal = sweep_metric(spec)
    if spec["method"] == "grid":
        points = grid_parameters(spec)
        if trials > len(points):
            print(f"the grid has {len(points)} points: running all of them, not {trials}", flush=True)
        points = points[:trials]
    else:
        points = [sample_parameters(spec, seed=seed + i) for i in range(trials)]
    results = []
    for i, params in enumerate(points):
        params = dict(params, run_dir=f"{run_root}/trial-{i:03d}")
        argv = expand_command(spec, params)
        print(f"[trial {i + 1}/{len(points)}] {' '.join(argv)}", flush=True)
        rc = subprocess.run(argv, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}).returncode
        value = trial_result(params["run_dir"], metric, goal) if rc == 0 else None  # a failed trial ranks last
        results.append({"trial": i, "params": params, "returncode": rc, metric: value})
    return results


def results_table(results: list[dict], spec: dict) -> list[str]:
    """Markdown lines ranking the trials by the sweep's metric (best first; failed trials last),
    with the parameters that differ between them (all of them for a single trial)."""
    metric, goal = sweep_metric(spec)
    names = [k for k in results[0]["params"] if k != "run_dir"] if results else []
    varying = [k for k in names if len({repr(r["params"][k]) for r in results}) > 1]
    names = varying if len(results) > 1 else names
    sign = 1.0 if goal == "minimize" else -1.0
    ranked = sorted(results, key=lambda r: (r[metric] is None, sign * (r[metric] or 0.0)))
    lines = [f"| rank | {metric} | " + " | ".join(names) + " | run |", "| ---: | ---: |" + " --- |" * (len(names) + 1)]
    for n, r in enumerate(ranked, 1):
        value = f"{r[metric]:.4f}" if r[metric] is not None else f"failed (exit {r['returncode']})"
        lines.append(f"| {n} | {value} | " + " | ".join(str(r["params"][k]) for k in names) + f" | {r['params']['run_dir']} |")
    return lines


def create_and_run(spec: dict, *, count: int, project: str, entity: str | None = None) -> str:
    """Create the sweep on the W&B server and run ``count`` trials with ``wandb agent``."""
    import subprocess
    import sys

    from toolkit.tracking import wandb_mode

    if wandb_mode() != "online":
        raise ConfigError(
            "W&B sweeps need a W&B server (the agent asks it for each trial's parameters): run "
            "`wandb login` first, or use --local N for N random-search trials offline, or --dry_run"
        )
    import wandb

    sweep_id = wandb.sweep(spec, project=project, entity=entity)
    path = "/".join(x for x in (entity, project, sweep_id) if x)
    agent = [sys.executable, "-m", "wandb", "agent", "--count", str(count), path]
    subprocess.run(agent, check=True)
    return sweep_id
