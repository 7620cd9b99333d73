"""Generators of small, reproducible *image folders* (one sub-folder per class, PNG files).

Three data sets, all produced locally without any download:

* :func:`write_digits_folder` — scikit-learn's bundled handwritten digits (1,797 real 8×8
  images, 10 classes), written as grayscale PNGs.
* :func:`write_chars_folder` — a 62-class character set (``0-9``, ``A-Z``, ``a-z``) rendered
  from the machine's fonts (TrueType or OpenType) with random affine jitter, blur and pixel noise.  Hard
  enough that raw-pixel kNN is far from perfect, learnable enough that an embedder helps.
* :func:`write_camera_folder` — synthetic "camera-size" RGB originals (default 1200×900), for
  benchmarking the cost of decoding and resizing large originals.

Every generator builds its folder in a hidden temporary sibling directory and renames it into
place, so an interrupted run never leaves a half-written folder behind.  A finished folder
carries a ``.complete`` marker (JSON: generator parameters and image count); calling a
generator again with the same parameters returns the existing folder untouched, unless
``overwrite=True``.  A folder with a marker from *different* parameters is regenerated; an
existing non-empty folder without a marker is never touched (:class:`FileExistsError`) unless
``overwrite=True``.

Class folder names are valid on case-insensitive file systems (``upper_A`` / ``lower_a``).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from toolkit.files import new_temp_folder, rename_onto_new
from toolkit.progress import progress as progress_bar

__all__ = [
    "CHAR_CLASSES",
    "MARKER_NAME",
    "char_class_name",
    "default_cache_dir",
    "default_data_dir",
    "FONT_SUFFIXES",
    "discover_fonts",
    "write_camera_folder",
    "write_chars_folder",
    "write_digits_folder",
]

MARKER_NAME = ".complete"
"""Name of the marker file written last into a finished folder."""

CHAR_CLASSES: str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
"""The 62 characters of :func:`write_chars_folder`, in label order."""

FONT_ROOT = Path("/usr/share/fonts")

# Augmentation ranges of the character set, tuned so that raw-pixel kNN(13) on a 15 %
# stratified split at 32 px with 120 images per class scores about 0.40 (chance: 0.016);
# with ±10 % translation it was 0.54, with ±20 % 0.30.  See tests/test_datasets.py.
_ROTATION_DEG = 15.0  # ± degrees
_SCALE = (0.8, 1.1)  # relative to the nominal glyph size
_TRANSLATE = 0.15  # ± fraction of the image size (0.10 made raw-pixel kNN too easy: 0.54)
_SHEAR_DEG = 10.0  # ± degrees
_BLUR_RADIUS = (0.0, 1.2)  # Gaussian blur radius in pixels (at 64 px; scaled with size)
_NOISE_SIGMA = (0.0, 20.0)  # Gaussian pixel noise, 0..255 scale
_FONT_FRACTION = 0.75  # nominal font size as a fraction of the image size


# --------------------------------------------------------------------------------------------
# Paths and the atomic-folder machinery
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The toolkit's cache folder: ``$TOOLKIT_CACHE`` if set, else ``~/.cache/toolkit``."""
    env = os.environ.get("TOOLKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "toolkit"


def default_data_dir() -> Path:
    """Where :func:`write_digits_folder` writes by default: ``<cache>/digits``."""
    return default_cache_dir() / "digits"


def _count_pngs(folder: Path) -> int:
    return sum(
        1
        for sub in folder.iterdir()
        if sub.is_dir() and not sub.name.startswith(".")
        for f in sub.iterdir()
        if f.suffix == ".png"
    )


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, params: dict) -> bool:
    """True if ``folder`` holds a finished build of exactly ``params``."""
    marker = _read_marker(folder)
    if not marker or marker.get("params") != params:
        return False
    try:
        return _count_pngs(folder) == marker.get("count")
    except OSError:
        return False


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _build_atomically(
    out_dir: str | os.PathLike,
    params: dict,
    overwrite: bool,
    build: Callable[[Path], int],
) -> Path:
    """Run ``build(tmp_dir) -> n_images`` in a temporary sibling and rename it to ``out_dir``.

    Returns ``out_dir`` (absolute).  Safe against interruption (the target either keeps its
    old content or gets the complete new one) and against a concurrent identical build
    (whichever finishes second finds a complete folder and discards its own copy).
    """
    out = Path(out_dir).expanduser().absolute()
    params = json.loads(json.dumps(params))  # normalise (tuples -> lists) for comparison
    if not overwrite:
        if _is_complete(out, params):
            return out
        if out.exists():
            if not out.is_dir():
                raise FileExistsError(f"{out} exists and is not a directory")
            if _read_marker(out) is None and any(out.iterdir()):
                raise FileExistsError(
                    f"{out} exists, is not empty and was not written by this generator; "
                    "pass overwrite=True to replace it"
                )
    tmp = new_temp_folder(out)
    try:
        count = build(tmp)
        (tmp / MARKER_NAME).write_text(
            json.dumps({"count": count, "params": params}, indent=2, sort_keys=True) + "\n"
        )
        for _attempt in range(5):
            old = None
            if out.exists():
                if not overwrite and _is_complete(out, params):
                    # A concurrent build of the same thing finished first: keep it.
                    return out
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(out, old)
                except FileNotFoundError:
                    old = None  # someone else moved it away meanwhile
            try:
                rename_onto_new(tmp, out)
            except OSError:  # something appeared at `out` in between: loop and decide again
                if old is not None:
                    if not out.exists():
                        os.rename(old, out)  # put the previous content back
                    else:
                        _remove_empty(old)  # it was a concurrent build's empty placeholder (rename_onto_new's)
                continue
            if old is not None:
                _remove_tree(old)
            return out
        raise OSError(f"could not move the finished folder into place at {out}")
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: someone's content, left where it is


def _progress(iterable: Iterable, *, total: int, desc: str, progress: bool | None):
    """A bar over the images; ``progress=None`` shows it only on an interactive terminal, False never."""
    return progress_bar(iterable, total=total, desc=desc, enabled=progress, unit="img")


# --------------------------------------------------------------------------------------------
# 1. Handwritten digits (scikit-learn)
# --------------------------------------------------------------------------------------------


def write_digits_folder(
    out_dir: str | os.PathLike | None = None, *, overwrite: bool = False
) -> Path:
    """Write scikit-learn's handwritten digits as an image folder and return its path.

    The 1,797 real 8×8 images of :func:`sklearn.datasets.load_digits` (values 0..16) become
    grayscale (``'L'``) 8×8 PNGs with values ``round(v * 255 / 16)``, stored as
    ``out_dir/<digit>/digit-<index>.png`` where ``<digit>`` is ``"0"``..``"9"`` and
    ``<index>`` is the 5-digit position in the original array (stable across runs).  Images
    are kept at 8×8; resizing is the shard step's job.

    Args:
        out_dir: target folder; ``None`` means :func:`default_data_dir`.
        overwrite: rebuild even if a complete folder is already there.

    Returns:
        The absolute path of the folder.
    """
    from sklearn.datasets import load_digits

    def build(tmp: Path) -> int:
        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        for label in range(10):
            (tmp / str(label)).mkdir()
        for index, (image, label) in enumerate(zip(images, digits.target)):
            Image.fromarray(image, mode="L").save(tmp / str(int(label)) / f"digit-{index:05d}.png")
        return len(images)

    target = default_data_dir() if out_dir is None else out_dir
    return _build_atomically(target, {"kind": "digits", "version": 1}, overwrite, build)


# --------------------------------------------------------------------------------------------
# 2. Rendered characters
# --------------------------------------------------------------------------------------------


def char_class_name(ch: str) -> str:
    """Folder name of a character class: ``"7"``, ``"upper_A"`` or ``"lower_a"``."""
    if ch.isdigit():
        return ch
    if ch.isupper():
        return f"upper_{ch}"
    if ch.islower():
        return f"lower_{ch}"
    raise ValueError(f"not a character class: {ch!r}")


FONT_SUFFIXES = (".ttf", ".otf")
"""Font files :func:`discover_fonts` considers (TrueType and OpenType/CFF; FreeType draws both)."""


def discover_fonts(root: str | os.PathLike | None = None, *, per_family: int = 0) -> list[Path]:
    """Font files under ``root`` (recursively, sorted) that draw all 62 classes distinctly.

    ``root=None`` means :data:`FONT_ROOT` (``/usr/share/fonts``). A font is left out when it
    fails to load, lacks a glyph for any of :data:`CHAR_CLASSES`, or draws a lower-case
    letter exactly as its capital (all-caps display fonts: ``a`` and ``A`` would be one
    image under two labels). ``per_family`` > 0 keeps at most that many faces per folder
    (a package's family: Regular, Bold, Italic...), spread evenly over the sorted names, so
    a family of 38 faces does not outweigh a handwriting font of one.
    """
    root = Path(FONT_ROOT if root is None else root)
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES) if root.is_dir() else []
    usable = [p for p in candidates if _font_covers_classes(p)]
    if per_family <= 0:
        return usable
    families: dict[Path, list[Path]] = {}
    for p in usable:
        families.setdefault(p.parent, []).append(p)
    kept = []
    for faces in families.values():
        step = len(faces) / min(per_family, len(faces))
        kept += [faces[int(i * step)] for i in range(min(per_family, len(faces)))]
    return sorted(kept)


def _glyph_bytes(font: ImageFont.FreeTypeFont, ch: str) -> bytes:
    img = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(img).text((32, 32), ch, fill=255, font=font, anchor="mm")
    return img.tobytes()


def _font_covers_classes(path: Path) -> bool:
    try:
        font = ImageFont.truetype(str(path), 32)
        notdef = _glyph_bytes(font, "\U0010fffd")  # private-use code point: the .notdef box
        glyphs = {}
        for ch in CHAR_CLASSES:
            glyph = glyphs[ch] = _glyph_bytes(font, ch)
            if glyph == notdef or not any(glyph):
                return False
    except OSError:
        return False
    return not any(glyphs[ch] == glyphs[ch.lower()] for ch in CHAR_CLASSES if ch.isupper())


_FONT_CACHE: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    key = (path, size)
    if key not in _FONT_CACHE:
        _FONT_CACHE[key] = ImageFont.truetype(path, size)
    return _FONT_CACHE[key]


def _affine_inverse(size: int, rng: np.random.Generator) -> tuple[float, ...]:
    """Random forward affine about the centre; returns PIL's inverse (output→input) coefs."""
    angle = math.radians(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG))
    scale = rng.uniform(*_SCALE)
    shear = math.radians(rng.uniform(-_SHEAR_DEG, _SHEAR_DEG))
    tx, ty = rng.uniform(-_TRANSLATE, _TRANSLATE, size=2) * size
    c = size / 2.0
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shr = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    lin = rot @ shr * scale  # forward linear part: x' = lin (x - c) + c + t
    inv = np.linalg.inv(lin)
    offset = np.array([c, c]) - inv @ np.array([c + tx, c + ty])
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def _render_char(ch: str, fonts: Sequence[str], size: int, seed: int, label: int, index: int) -> np.ndarray:
    """One jittered character image (uint8, size×size, white glyph on black)."""
    rng = np.random.default_rng([seed, label, index])
    font = _font(fonts[int(rng.integers(len(fonts)))], max(4, round(size * _FONT_FRACTION)))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).text((size / 2.0, size / 2.0), ch, fill=255, font=font, anchor="mm")
    img = canvas.transform((size, size), Image.Transform.AFFINE, _affine_inverse(size, rng),
                           resample=Image.Resampling.BICUBIC, fillcolor=0)
    radius = rng.uniform(*_BLUR_RADIUS) * size / 64.0
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    sigma = rng.uniform(*_NOISE_SIGMA)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, sigma, size=(size, size)).astype(np.float32)
    return np.rint(arr).clip(0, 255).astype(np.uint8)


def write_chars_folder(
    out_dir: str | os.PathLike,
    *,
    per_class: int = 120,
    size: int = 64,
    seed: int = 0,
    fonts: Sequence[str | os.PathLike] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Render a 62-class character image folder (``0-9``, ``A-Z``, ``a-z``) and return it.

    Each image is grayscale ``size×size``: a white glyph on a black background, drawn with a
    font picked at random from ``fonts``, then randomly rotated (±15°), scaled (0.8–1.1),
    translated (±15 % of the size) and sheared (±10°), blurred (Gaussian, radius 0–1.2 px at
    64 px, proportionally at other sizes) and given Gaussian pixel noise (sigma 0–20).  The
    output is byte-for-byte deterministic for a given ``seed`` (each image draws from its own
    random stream seeded by ``(seed, class, index)``).

    Layout: ``out_dir/<class>/char-<index>.png`` with classes ``0``..``9``, ``upper_A``..
    ``upper_Z``, ``lower_a``..``lower_z`` (distinct on case-insensitive file systems).

    Args:
        out_dir: target folder.
        per_class: images per class.
        size: image side in pixels.
        seed: random seed.
        fonts: font files to draw from; ``None`` discovers every ``*.ttf`` / ``*.otf`` under
            ``/usr/share/fonts`` that draws all 62 characters (:func:`discover_fonts`).
        overwrite: rebuild even if a complete folder with these parameters exists.
        progress: show a progress bar (``None``: only on an interactive terminal).

    Returns:
        The absolute path of the folder.

    Raises:
        FileNotFoundError: no usable font was found or given.
    """
    if per_class < 1 or size < 8:
        raise ValueError(f"need per_class >= 1 and size >= 8, got {per_class=} {size=}")
    if fonts is None:
        font_paths = [str(p) for p in discover_fonts()]
        if not font_paths:
            raise FileNotFoundError(
                f"no fonts (*.ttf, *.otf) drawing 0-9, A-Z, a-z found under {FONT_ROOT}; "
                "install some (e.g. `apt-get install fonts-dejavu-core`) or pass fonts=[...]"
            )
    else:
        font_paths = [str(Path(p).expanduser().absolute()) for p in fonts]
        missing = [p for p in font_paths if not Path(p).is_file()]
        if not font_paths or missing:
            raise FileNotFoundError(f"font files not found: {missing or 'none given'}")
    params = {
        "kind": "chars",
        "version": 1,
        "per_class": int(per_class),
        "size": int(size),
        "seed": int(seed),
        "fonts": [Path(p).name for p in font_paths],
    }

    def build(tmp: Path) -> int:
        jobs = [(label, ch, i) for label, ch in enumerate(CHAR_CLASSES) for i in range(per_class)]
        for ch in CHAR_CLASSES:
            (tmp / char_class_name(ch)).mkdir()
        for label, ch, i in _progress(jobs, total=len(jobs), desc="chars", progress=progress):
            arr = _render_char(ch, font_paths, size, seed, label, i)
            Image.fromarray(arr, mode="L").save(tmp / char_class_name(ch) / f"char-{i:05d}.png")
        return len(jobs)

    return _build_atomically(out_dir, params, overwrite, build)


# --------------------------------------------------------------------------------------------
# 3. Synthetic camera-size originals
# --------------------------------------------------------------------------------------------

_SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross")


def _class_style(label: int) -> tuple[str, tuple[float, float, float]]:
    """Shape kind and base HSV colour of a class (distinct for the first 6 classes)."""
    shape = _SHAPES[label % len(_SHAPES)]
    hue = (label * 0.618033988749895) % 1.0
    return shape, (hue, 0.8, 0.9)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        n, radii = 3, [r]
    elif kind == "star":
        n, radii = 10, [r, r * 0.45]
    else:  # cross: 12-gon outline of a plus sign
        w = r * 0.35
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]
    return [
        (cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
         cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _render_camera(label: int, index: int, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, label, index])
    shape, (hue, sat, val) = _class_style(label)
    # Smooth background: a random two-colour linear gradient.
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)
    t = (xs[None, :] * math.cos(theta) + ys[:, None] * math.sin(theta)) + 0.5
    bg = c0 + (c1 - c0) * t.clip(0, 1)[..., None]
    img = Image.fromarray(bg.astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    for _ in range(int(rng.integers(3, 7))):
        h = (hue + rng.normal(0, 0.03)) % 1.0
        rgb = colorsys.hsv_to_rgb(h, float(np.clip(sat + rng.normal(0, 0.1), 0, 1)),
                                  float(np.clip(val + rng.normal(0, 0.1), 0, 1)))
        fill = tuple(int(255 * v) for v in rgb)
        r = rng.uniform(0.08, 0.25) * side
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        angle = rng.uniform(0, 2 * math.pi)
        if shape == "ellipse":
            ry = r * rng.uniform(0.6, 1.0)
            draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=fill)
        elif shape == "rectangle":
            draw.rectangle((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=fill)
        elif shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.25)))
        else:
            draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    # Sensor-like noise; keep it modest so the PNGs stay a realistic few MB.
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.integers(-6, 7, size=arr.shape, dtype=np.int16)
    return Image.fromarray((arr + noise).clip(0, 255).astype(np.uint8), mode="RGB")


def write_camera_folder(
    out_dir: str | os.PathLike,
    *,
    num_classes: int = 4,
    per_class: int = 25,
    width: int = 1200,
    height: int = 900,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write synthetic camera-size RGB originals as an image folder and return its path.

    Each image is a ``width×height`` RGB PNG: a random colour gradient with 3–6 filled
    shapes whose *kind* (ellipse, rectangle, triangle, star, ring, cross — cycling) and *hue*
    are set by the class, plus per-pixel sensor noise.  Meant for benchmarking the loading
    and resizing of large originals, not for learning.  Layout:
    ``out_dir/class_<k>/cam-<index>.png``.  Deterministic for a given ``seed``.

    Args:
        out_dir: target folder.
        num_classes: number of classes (class folders ``class_00``, ``class_01``, ...).
        per_class: images per class.
        width, height: image size in pixels.
        seed: random seed.
        overwrite: rebuild even if a complete folder with these parameters exists.
        progress: show a progress bar (``None``: only on an interactive terminal).

    Returns:
        The absolute path of the folder.
    """
    if num_classes < 1 or per_class < 1 or width < 16 or height < 16:
        raise ValueError(f"bad sizes: {num_classes=} {per_class=} {width=} {height=}")
    params = {
        "kind": "camera",
        "version": 1,
        "num_classes": int(num_classes),
        "per_class": int(per_class),
        "width": int(width),
        "height": int(height),
        "seed": int(seed),
    }

    def build(tmp: Path) -> int:
        names = [f"class_{k:02d}" for k in range(num_classes)]
        for name in names:
            (tmp / name).mkdir()
        jobs = [(k, i) for k in range(num_classes) for i in range(per_class)]
        for k, i in _progress(jobs, total=len(jobs), desc="camera", progress=progress):
            img = _render_camera(k, i, width, height, seed)
            img.save(tmp / names[k] / f"cam-{i:05d}.png", compress_level=1)
        return len(jobs)

    return _build_atomically(out_dir, params, overwrite, build)
