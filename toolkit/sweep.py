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

import math
import os
import random
from pathlib import Path
from typing import Any

import yaml

from toolkit.config import ClassifyConfig, ConfigError, EmbedConfig, _field_types

# What each stage's validator logs (metric names a sweep may optimise).
STAGES = {
    "embed": (EmbedConfig, ("val/knn_accuracy", "val/best_knn_accuracy", "val/precision_at_1", "val/map_at_r")),
    "classify": (ClassifyConfig, ("val/accuracy", "val/best_accuracy", "val/loss")),
}


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
    if "${args}" not in spec["command"]:
        raise ConfigError(f"{p}: command must contain ${{args}} (the agent's --name=value flags)")
    stage = stage_of(spec)
    cfg_cls, metrics = STAGES[stage]
    if spec["metric"].get("name") not in metrics:
        raise ConfigError(f"{p}: metric {spec['metric'].get('name')!r} is not logged by the {stage} validator ({', '.join(metrics)})")
    keys = _field_types(cfg_cls)
    unknown = [k for k in spec["parameters"] if k not in keys]
    if unknown:
        raise ConfigError(f"{p}: parameters that are not {cfg_cls.__name__} keys: {', '.join(unknown)}")
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


def run_local(spec: dict, *, trials: int, seed: int = 0, run_root: str = "runs/sweep-local") -> list[dict]:
    """Random search without a W&B server: run the agent's exact command per trial."""
    import os
    import subprocess

    results = []
    for i in range(trials):
        params = sample_parameters(spec, seed=seed + i)
        params["run_dir"] = f"{run_root}/trial-{i:03d}"
        argv = expand_command(spec, params)
        print(f"[trial {i + 1}/{trials}] {' '.join(argv)}", flush=True)
        rc = subprocess.run(argv, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}).returncode
        results.append({"trial": i, "params": params, "returncode": rc})
    return results


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
