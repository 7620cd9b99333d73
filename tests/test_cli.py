"""The ``toolkit`` command line, run the way users run it (a subprocess of the installed script)."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_image_folder
from toolkit.cli import shard

TOOLKIT = str(Path(sys.executable).with_name("toolkit"))
SHARD_OPTIONS = [
    name for name, p in inspect.signature(shard).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
]


def run(*args, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([TOOLKIT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_help_lists_commands_and_every_shard_option():
    assert set(SHARD_OPTIONS) >= {"val_fraction", "seed", "image_size", "grayscale", "samples_per_shard", "workers", "overwrite"}
    top = run("--help")
    assert top.returncode == 0, top.stderr
    # fire prints help on stdout or stderr depending on the terminal: accept either
    assert "shard" in top.stdout + top.stderr
    sub = run("shard", "--help")
    assert sub.returncode == 0, sub.stderr
    text = sub.stdout + sub.stderr
    for opt in SHARD_OPTIONS:
        assert f"--{opt}" in text, f"--{opt} missing from `toolkit shard --help`"
    assert "SRC" in text and "OUT" in text and "Traceback" not in text


@pytest.mark.parametrize("bad", [["--bogus", "1"], ["--bogus=1"], ["--bogus"]])
def test_unknown_flag_rejected_before_any_work(tmp_path, bad):
    src = make_image_folder(tmp_path / "img", {"a": 3, "b": 3}, size=(6, 6))
    out = tmp_path / "out"
    r = run("shard", src, out, *bad)
    assert r.returncode != 0
    err = _lines(r.stderr)
    assert len(err) == 1, r.stderr
    assert "--bogus" in err[0]
    assert not out.exists(), "the command did work before rejecting the flag"
    assert list(tmp_path.iterdir()) == [tmp_path / "img"]


def test_missing_src_is_a_one_line_error(tmp_path):
    r = run("shard", tmp_path / "no-such-folder", tmp_path / "out")
    assert r.returncode != 0
    err = _lines(r.stderr)
    assert len(err) == 1 and "no-such-folder" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_shard_command_writes_shards_and_reports_skipped(tmp_path):
    src = make_image_folder(tmp_path / "img", {"a": 8, "b": 6, "c": 5}, size=(12, 10))
    (src / "a" / "empty.png").write_bytes(b"")
    (src / "b" / "text.png").write_text("hello")
    (src / "c" / "notes.txt").write_text("hi")
    good = (src / "a" / "img_000.png").read_bytes()
    (src / "c" / "cut.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    r = run("shard", src, out, "--image_size", 8, "--samples-per-shard", 4, "--workers", 1, "--seed", 3)
    assert r.returncode == 0, r.stderr
    assert "skipped 3" in r.stdout
    assert "ignored 1" in r.stdout
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(skipped["path"]) == ["a/empty.png", "b/text.png", "c/cut.png"]
    from toolkit.data.shards import read_info, verify_shards

    info = read_info(out)
    assert info.splits["train"].num_samples + info.splits["val"].num_samples == 19
    assert info.image_size == 8 and info.seed == 3
    assert max(info.splits["train"].shard_lengths) == 4
    assert verify_shards(out) == []

    again = run("shard", src, out, "--workers", 1)
    assert again.returncode != 0 and "exists" in again.stderr
    assert len(_lines(again.stderr)) == 1


@pytest.mark.parametrize("extra", [["unexpected"], ["-z", "1"]], ids=["extra-positional", "unknown-short-flag"])
def test_leftover_arguments_rejected_before_any_work(tmp_path, extra):
    # fire runs the command first and complains about arguments it could not consume
    # afterwards; the CLI's pre-check must stop these too, before writing anything.
    src = make_image_folder(tmp_path / "img", {"a": 3, "b": 3}, size=(6, 6))
    out = tmp_path / "out"
    r = run("shard", src, out, "--workers", 1, *extra)
    assert r.returncode != 0
    assert not out.exists(), f"`toolkit shard SRC OUT {' '.join(extra)}` wrote {out} before failing"


def test_paths_on_the_command_line_stay_strings(tmp_path, monkeypatch, capsys):
    """fire turns `2024` into an int, `True` into a bool, `a,b` into a tuple: paths must arrive as typed."""
    from toolkit.cli import main

    monkeypatch.chdir(tmp_path)
    names = ["2024", "True", "a,b", "[x]", "1e3", "None", "it's"]
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main(["shard", name, "out"])
        assert exc.value.code == 2 and _lines(capsys.readouterr().err) == [f"error: image folder not found: {name}"]
        with pytest.raises(SystemExit):
            main(["evaluate", f"{name}-run", "--shards", name])
        assert _lines(capsys.readouterr().err) == [f"error: run not found: {name}-run"]
    # a folder with such a name is sharded like any other, also by the installed command
    make_image_folder(tmp_path / "2024", {"a": 3, "b": 3}, size=(6, 6))
    r = run("shard", "2024", "2024-out", "--workers", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "2024-out" / "_info.json").is_file()


def test_bool_flags_never_swallow_the_next_argument_and_positionals_are_given_once(tmp_path, monkeypatch, capsys):
    """fire reads `--json a.png b.png` as json='a.png': every image must still be answered."""
    import toolkit.inference
    from toolkit.cli import main

    seen = {}
    monkeypatch.setattr(toolkit.inference, "predict", lambda run, images, **kw: seen.update(run=run, images=images) or
                        [{"path": p, "label": "x", "confidence": 1.0} for p in images])
    main(["predict", "run", "--json", "a.png", "b.png"])
    assert seen == {"run": "run", "images": ["a.png", "b.png"]} and '"path": "a.png"' in capsys.readouterr().out
    main(["predict", "run", "--json=false", "c.png"])
    assert seen["images"] == ["c.png"] and capsys.readouterr().out.startswith("c.png\tx\t")
    for argv, message in ((["evaluate", "a", "--run", "b"], "RUN given twice"), (["predict", "r", "--json=maybe"], "takes true or false")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
