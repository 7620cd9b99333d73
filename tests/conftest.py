"""Shared test helpers: tiny image folders, hand-made shard folders, a free TCP port.

Everything is written under pytest's ``tmp_path``; images are a few dozen pixels so a whole
folder is written in milliseconds.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# class name -> number of images; uneven on purpose, one class with a single image.
DEFAULT_SIZES = {"alpha": 20, "beta": 7, "gamma": 13, "delta": 1, "eps": 10}


def make_image_folder(
    root: str | Path,
    sizes: dict[str, int] | None = None,
    *,
    size: tuple[int, int] = (24, 20),
    formats: tuple[str, ...] = ("png", "jpg"),
    mode: str = "RGB",
    seed: int = 0,
) -> Path:
    """Write ``root/<class>/img_<i>.<fmt>`` for each class; formats alternate per image.

    Pixels are random (seeded), with a per-class brightness offset, so every image differs.
    ``size`` is PIL's (width, height). Returns ``root``.
    """
    root = Path(root)
    sizes = DEFAULT_SIZES if sizes is None else sizes
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(sorted(sizes.items())):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            arr = (rng.integers(0, 200, size=shape) + 10 * c).clip(0, 255).astype(np.uint8)
            fmt = formats[i % len(formats)]
            Image.fromarray(arr, mode=mode).save(d / f"img_{i:03d}.{fmt}")
    return root


def write_shards_quietly(src, out, **kw):
    """``write_shards`` with one worker, no progress bar and its warnings silenced (tests assert on the result)."""
    import warnings

    from toolkit.data.shards import write_shards

    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_shards(src, out, **kw)


def png_bytes(value: int, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def craft_shards(
    folder: str | Path,
    split_sizes: dict[str, list[int]],
    *,
    num_classes: int = 4,
    image_side: int = 4,
) -> dict[str, list[tuple[str, int]]]:
    """Write a shard folder by hand with *exactly* the given shard sizes per split.

    Labels are balanced over the split (round-robin), then shuffled with a fixed seed, as
    ``write_shards`` shuffles at write time; a small shard may hold a single class. Writes a
    minimal but complete ``_info.json``. Returns ``{split: [(key, label), ...]}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = [f"c{i}" for i in range(num_classes)]
    info = {"classes": classes, "num_classes": num_classes, "splits": {}}
    truth: dict[str, list[tuple[str, int]]] = {}
    counter = 0
    for split, lengths in split_sizes.items():
        names, truth[split], j = [], [], 0
        split_labels = [i % num_classes for i in range(sum(lengths))]
        random.Random(f"craft-{split}").shuffle(split_labels)
        for n, length in enumerate(lengths):
            name = f"{split}-{n:06d}.tar"
            with tarfile.open(folder / name, "w") as tar:
                for _ in range(length):
                    key, label = f"s{counter:08d}", split_labels[j]
                    counter += 1
                    j += 1
                    files = {
                        "png": png_bytes(counter, image_side),
                        "cls": str(label).encode(),
                        "json": json.dumps({"path": f"{classes[label]}/{key}.png", "label": classes[label]}).encode(),
                    }
                    for ext, data in files.items():
                        ti = tarfile.TarInfo(f"{key}.{ext}")
                        ti.size = len(data)
                        tar.addfile(ti, io.BytesIO(data))
                    truth[split].append((key, label))
            names.append(name)
        info["splits"][split] = {
            "name": split,
            "num_samples": sum(lengths),
            "filenames": names,
            "shard_lengths": list(lengths),
            "sha256": [],
        }
    (folder / "_info.json").write_text(json.dumps(info))
    return truth


def write_tar(path: str | Path, members: dict[str, dict[str, bytes]]) -> None:
    """Inverse of :func:`read_tar_samples`: {key: {ext: bytes}} -> a tar of ``key.ext`` members."""
    with tarfile.open(path, "w") as tar:
        for key, files in members.items():
            for ext, data in files.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def read_tar_samples(path: str | Path) -> dict[str, dict[str, bytes]]:
    """Group a tar's members by key (text before the first dot): {key: {ext: bytes}}."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def free_port() -> int:
    """A TCP port that was free a moment ago (for torch.distributed rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """The default uneven 5-class folder (one class with a single image)."""
    return make_image_folder(tmp_path / "images")


ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def launch_two_cpu(script: str | Path, *args, timeout: float, what: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 SCRIPT ARGS`` on CPU (gloo), as the README
    starts two CPU processes; stdout and stderr merged. A hang past ``timeout`` kills the launcher
    and its ranks (own process group) and fails the test, naming ``what`` hung."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(script), *map(str, args),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{what} hung (> {timeout} s):\n{output[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def one_font() -> Path:
    """One font file that draws all 62 characters (DejaVu Sans where a fresh machine has it)."""
    from toolkit.datasets import FONT_ROOT, discover_fonts

    for root in (FONT_ROOT / "truetype" / "dejavu", FONT_ROOT):
        found = discover_fonts(root) if root.is_dir() else []
        if found:
            return found[0]
    pytest.fail(f"no font drawing 0-9, A-Z, a-z under {FONT_ROOT}: install fonts-dejavu-core")
