"""The shipped config files, and how `python launch/embed.py` treats a bad command line.

Every configs/embed/*.yaml must load into EmbedConfig as is (a typo in a shipped config is
found here, not an hour into a GPU job); every configs/accelerate/*.yaml must be a config
`accelerate launch --config_file` accepts. A bad key or value on the launch command line
must stop the launch with exit status 2 and one line naming the key, before a run folder
exists.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit.config import EmbedConfig, load_config
from toolkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EMBED_CONFIGS = sorted((REPO / "configs" / "embed").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
LAUNCH = REPO / "launch" / "embed.py"


def test_shipped_configs_exist():
    names = {p.name for p in EMBED_CONFIGS}
    assert {"seed.yaml", "fast.yaml", "digits.yaml"} <= names, names  # the README names these
    assert {"cpu.yaml", "multi_gpu.yaml", "multi_node.yaml"} <= {p.name for p in ACCELERATE_CONFIGS}


def _readme_launch_commands() -> list[list[str]]:
    """The arguments after ``launch/embed.py`` of every such command in the README's shell blocks."""
    import re
    import shlex

    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True) if "launch/embed.py" in line else []
            if "launch/embed.py" in words:
                found.append(words[words.index("launch/embed.py") + 1:])
    return found


def test_every_launch_command_in_the_readme_is_a_valid_config(monkeypatch):
    from toolkit.config import config_from_argv

    monkeypatch.chdir(REPO)  # the commands name configs/embed/... from the checkout
    commands = _readme_launch_commands()
    assert len(commands) >= 15 and any("loss=pml:ProxyAnchorLoss" in c for c in commands)
    for args in commands:
        try:
            assert isinstance(config_from_argv(EmbedConfig, args), EmbedConfig), args
        except ConfigError as exc:  # tracker=mlflow without the optional package: the one line naming the extra
            extra = next((a.split("=", 1)[1] for a in args if a.startswith("tracker=")), None)
            assert extra and importlib.util.find_spec(extra) is None, (args, exc)
            assert str(exc) == f'tracker={extra} needs the {extra} package: pip install "toolkit[{extra}]" (or pip install {extra})'


def test_launch_help_lists_every_key_with_its_default_and_meaning(tmp_path, monkeypatch, capsys):
    import dataclasses

    r = _launch_in_process(tmp_path, monkeypatch, capsys, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: accelerate launch launch/embed.py"), r.stdout[:300]
    listed = {line.split("=")[0].strip() for line in r.stdout.splitlines() if line.startswith("  ")}
    assert listed == {f.name for f in dataclasses.fields(EmbedConfig)}
    assert "  loss='triplet'  # triplet (built-in" in r.stdout and "  knn_k=13" in r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("path", EMBED_CONFIGS, ids=lambda p: p.name)
def test_embed_config_loads(path):
    cfg = load_config(EmbedConfig, path)
    assert isinstance(cfg, EmbedConfig)
    # every key in the file is applied (no silently ignored key)
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        assert getattr(cfg, key) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, key) == value, key


def test_seed_config_is_the_seed_recipe():
    cfg = load_config(EmbedConfig, REPO / "configs" / "embed" / "seed.yaml")
    assert (cfg.input_size, cfg.arch, cfg.embedding_dim) == (220, "zfnet", 128)
    assert (cfg.margin, cfg.mining, cfg.knn_k) == (0.2, "semihard", 13)


def test_fast_config_is_the_seed_network_at_native_resolution_on_a_time_budget():
    cfg = load_config(EmbedConfig, REPO / "configs" / "embed" / "fast.yaml")
    assert cfg.input_size == 64 and cfg.arch == "zfnet" and cfg.embedding_dim == 128
    assert (cfg.margin, cfg.mining, cfg.knn_k) == (0.2, "semihard", 13)
    assert cfg.max_minutes == 5 and cfg.schedule == "cosine"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and "distributed_type" in raw, f"{path.name}: no distributed_type"
    # what `accelerate launch --config_file` itself does with the file
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type in set(DistributedType)
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    if cfg.num_machines > 1:
        assert cfg.num_processes % cfg.num_machines == 0, "num_processes is the total over all machines"


def _launch(tmp_path, *args, timeout=120):
    """`python launch/embed.py ARGS` in a subprocess, exactly as a user types it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(LAUNCH), *map(str, args)],
        capture_output=True, text=True, cwd=tmp_path, timeout=timeout, env=env,
    )


def _launch_in_process(tmp_path, monkeypatch, capsys, *args):
    """The same ``main(argv)`` called in this process: each Python start costs ~10 s on a busy
    2-core machine, so only two cases pay for a real subprocess."""
    spec = importlib.util.spec_from_file_location("launch_embed_under_test", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    code = module.main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


BAD_OVERRIDES = [
    # (arguments, words the one error line must contain, run as a real subprocess?)
    pytest.param(["bogus_key=1"], ("bogus_key",), True, id="unknown"),
    pytest.param(["lr=fast"], ("lr",), True, id="bad-float"),
    pytest.param(["--lrr=0.1"], ("lrr", "'lr'"), False, id="unknown-dashdash-suggests"),
    pytest.param(["batching=shuffled"], ("batching",), False, id="bad-choice"),
    pytest.param(["epochs=2.5"], ("epochs",), False, id="bad-int"),  # never silently truncated
    pytest.param(["K=1"], ("K",), False, id="out-of-range"),
    pytest.param(["--margin", "-0.1"], ("margin",), False, id="negative-margin"),
]


@pytest.mark.parametrize("bad, named, subprocess_run", BAD_OVERRIDES)
def test_bad_override_exits_2_with_one_line_before_any_work(tmp_path, monkeypatch, capsys, bad, named, subprocess_run):
    run_dir = tmp_path / "run"
    args = ["--config", REPO / "configs" / "embed" / "digits.yaml", f"run_dir={run_dir}", *bad]
    r = _launch(tmp_path, *args) if subprocess_run else _launch_in_process(tmp_path, monkeypatch, capsys, *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for word in named:
        assert word in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert not run_dir.exists(), "a run folder was created before the config was validated"
    assert list(tmp_path.iterdir()) == [], "the launch wrote files before failing"


def test_missing_shards_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = ["--config", REPO / "configs" / "embed" / "digits.yaml", f"shards={tmp_path / 'nope'}", f"run_dir={run_dir}"]
    r = _launch_in_process(tmp_path, monkeypatch, capsys, *args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope" in lines[0], r.stderr
    assert not run_dir.exists()
