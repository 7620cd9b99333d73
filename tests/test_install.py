"""The package works installed (not editable) and away from the checkout: `python -m toolkit`, `toolkit demo --holdout_classes 2`."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_the_checkouts():
    """toolkit/configs links to configs/ (one copy of each file), so the installed package ships them."""
    assert (ROOT / "toolkit" / "configs").resolve() == (ROOT / "configs").resolve()


@pytest.mark.slow
def test_installed_package_runs_the_demo_from_another_directory(tmp_path):
    # A wheel of the checkout, installed without dependencies into a fresh venv whose
    # dependencies come from this environment (a .pth line): the toolkit itself is the
    # installed copy, never the checkout.
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    Path(site, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("toolkit-*.whl"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    where = subprocess.run([str(py), "-c", "import toolkit; print(toolkit.__file__)"], cwd=work, env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr
    helped = subprocess.run([str(py), "-m", "toolkit", "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "demo" in helped.stdout + helped.stderr, helped.stderr
    # The open-set variant: everything the closed-set demo does, plus the held-out classes.
    demo = subprocess.run([str(venv / "bin" / "toolkit"), "demo", "--epochs", "1", "--tracker", "none", "--holdout_classes", "2"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "| classifier head on the frozen embedder |" in demo.stdout
    assert "| unseen classes (" in demo.stdout and "| raw pixels |" in demo.stdout and "| embedder |" in demo.stdout
    assert (work / "runs" / "digits-open-classify" / "report.md").is_file()
    assert (work / "runs" / "digits-open-classify" / "plots" / "worst_queries.png").is_file()
