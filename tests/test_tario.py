"""The fast tar reader and PNG decoder of the shard reader, against Python's tarfile and PIL.

Every archive here is written by ``tarfile`` itself, in each of its formats, so the reader
is checked against the reference implementation rather than against our own writer.
"""
from __future__ import annotations

import gzip
import io
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.data.reader import decode_png
from toolkit.data.tario import iter_tar, tar_samples
from toolkit.errors import TarError

LONG = "deep/" * 30 + "sample.with.dots.png"  # > 100 characters: needs a long-name header
MEMBERS = {
    "a.png": b"\x89PNG fake" * 3,
    "a.cls": b"7",
    "a.json": b'{"path": "x"}',
    "b.png": bytes(range(256)) * 2,  # exactly 512 bytes: no padding
    "b.cls": b"",  # an empty member
    "dir/c.png": b"c" * 1000,
    "ünïcødé/ß.png": b"u" * 3,
    LONG: b"long",
}


def _tar(fmt: int, members: dict[str, bytes] = MEMBERS, *, extras: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extras:
            d = tarfile.TarInfo("dir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("link.png")
            link.type, link.linkname = tarfile.SYMTYPE, "a.png"
            tar.addfile(link)
            tar.addfile(tarfile.TarInfo("__meta__"), io.BytesIO(b""))  # WebDataset skips these
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and not m.name.startswith("__")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
def test_reads_what_tarfile_reads_in_every_format(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else {k: v for k, v in MEMBERS.items() if "ü" not in k}
    data = _tar(fmt, members)
    got = list(iter_tar(io.BytesIO(data)))
    assert got == _reference(data)
    assert dict(got) == members  # directories, links and __meta__ are not members


def test_compressed_tar_and_select_and_a_stream_without_peek():
    data = gzip.compress(_tar(tarfile.GNU_FORMAT))

    class ReadOnly:  # a pipe-like stream: read() only, short reads
        def __init__(self, b):
            self.f, self.rng = io.BytesIO(b), random.Random(0)

        def read(self, n=-1):
            return self.f.read(n if n < 0 else self.rng.randint(1, max(1, n)))

    got = list(iter_tar(ReadOnly(data), select=lambda name: name.endswith(".png")))
    assert got == [(k, v) for k, v in MEMBERS.items() if k.endswith(".png")]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty", "empty file"),
        ("not_tar", "not a tar archive at byte 0"),
        ("bad_checksum", r"invalid tar header \(bad checksum\) at byte 2048"),
        ("cut_in_member", r"truncated tar: member 'dir/c.png' at byte \d+ has \d+ of 1000 bytes"),
        ("cut_in_header", r"truncated tar: header at byte \d+ has 100 of 512 bytes"),
    ],
)
def test_damage_is_an_error_naming_where(damage, message):
    data = bytearray(_tar(tarfile.GNU_FORMAT, extras=False))
    offsets = {}
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        for m in tar.getmembers():
            offsets[m.name] = (m.offset, m.offset_data)
    if damage == "empty":
        data = b""
    elif damage == "not_tar":
        data = bytes(random.Random(1).randrange(256) for _ in range(2048))
    elif damage == "bad_checksum":
        data[2048 + 10] ^= 0xFF  # inside the name of the third header (a.json)
        assert offsets["a.json"][0] == 2048
        # tarfile reads this archive as a two-member one, without any error:
        assert [n for n, _ in _reference(bytes(data))] == ["a.png", "a.cls"]
    elif damage == "cut_in_member":
        data = data[: offsets["dir/c.png"][1] + 300]
    elif damage == "cut_in_header":
        data = data[: offsets["dir/c.png"][0] + 100]
    with pytest.raises(TarError, match=message):
        list(iter_tar(io.BytesIO(bytes(data))))


def test_pipeline_stage_groups_samples_and_reports_damage_with_the_url(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(_tar(tarfile.USTAR_FORMAT, {"k1.png": b"1", "k1.cls": b"0", "k2.png": b"2", "k2.cls": b"1"}, extras=False))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good.read_bytes()[:1100])  # k1.png complete, then cut inside k1.cls's header
    errors = []

    def handler(exn):
        errors.append(exn)
        return True

    samples = list(tar_samples(iter([{"url": str(bad)}, {"url": str(good)}]), handler=handler))
    assert [(s["__key__"], s["png"], s["cls"]) for s in samples if s["__url__"] == str(good)] == [
        ("k1", b"1", b"0"), ("k2", b"2", b"1")]
    assert len(errors) == 1 and str(bad) in errors[0].args and isinstance(errors[0], TarError)
    # the sample cut by the damage is yielded incomplete (and then reported by the decoder), never merged
    assert all(s["__url__"] == str(bad) for s in samples[:-2])


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "LA", "RGBA"])
def test_decode_png_matches_pil_for_every_mode(mode):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    expected = np.array(Image.open(io.BytesIO(buf.getvalue())))
    expected = expected[:, :, None] if expected.ndim == 2 else expected
    got = decode_png(buf.getvalue())
    assert got.shape == (expected.shape[2], 7, 5)
    assert got.dtype == torch.uint8
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def test_decode_png_of_damaged_data_raises():
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    with pytest.raises(Exception):
        decode_png(buf.getvalue()[:40])  # the IHDR says 8-bit grey, the data are missing
    with pytest.raises(Exception):
        decode_png(b"\x89PNG\r\n\x1a\n but not really")


def test_signed_checksums_of_old_tar_programs_are_accepted():
    # Some old tars summed the header as signed bytes; tarfile accepts both, and so must we.
    data = bytearray(_tar(tarfile.GNU_FORMAT, {"ünï.png": b"x"}, extras=False))
    header = data[:512]
    assert any(b > 127 for b in header[:100])  # the UTF-8 name has high bytes
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)
    data[148:156] = b"%06o\0 " % signed
    assert list(iter_tar(io.BytesIO(bytes(data)))) == [("ünï.png", b"x")] == _reference(bytes(data))
