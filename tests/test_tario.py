"""The fast tar reader and PNG decoder of the shard reader, against Python's tarfile and PIL.

Every archive here is written by ``tarfile`` itself, in each of its formats, so the reader
is checked against the reference implementation rather than against our own writer.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.data.reader import decode_png
from toolkit.data.tario import MAX_MEMBER_BYTES, iter_tar, tar_samples
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


# --- headers that lie: every one is a TarError naming the shard and the header's offset ---------


def _fix_checksum(data: bytearray, at: int) -> None:
    header = data[at : at + 512]
    data[at + 148 : at + 156] = b"%06o\0 " % (256 + sum(header[:148]) + sum(header[156:]))


def _offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset of its first header, offset of its data), as tarfile sees them."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


SHARD = "s3://bucket/train-000007.tar"
SMALL = {"a.png": b"A" * 700, "a.cls": b"1", "b.png": b"B" * 100, "b.cls": b"2"}


def _lying_size(field: bytes) -> tuple[bytes, int]:
    """A GNU archive whose 'a.cls' header carries ``field`` as its size (checksum made right)."""
    data = bytearray(_tar(tarfile.GNU_FORMAT, SMALL, extras=False))
    at = _offsets(bytes(data))["a.cls"][0]
    data[at + 124 : at + 136] = field
    _fix_checksum(data, at)
    return bytes(data), at


@pytest.mark.parametrize("field, message", [
    (b"\xff" + (2**88 - 512).to_bytes(11, "big"), r"negative size -512"),  # GNU base-256, sign bit set
    (b"\xff" * 12, r"negative size -1"),
    (b"-0000001000\0", r"size field b'-0000001000\\x00' is not a number"),
    (b"+0000001000\0", r"size field .* is not a number"),  # tarfile takes it; we take only octal digits
    (b"0000000008\0\0", r"size field .* is not a number"),
    (b"12 34\0\0\0\0\0\0\0", r"size field .* is not a number"),
])
def test_negative_and_garbage_sizes_are_errors(field, message):
    data, at = _lying_size(field)
    with pytest.raises(TarError, match=rf"invalid tar header \({message}\) at byte {at} in {re.escape(SHARD)}$"):
        list(iter_tar(io.BytesIO(data), url=SHARD))


@pytest.mark.parametrize("how", ["bytesio", "file", "pipe", "gzip"])
@pytest.mark.parametrize("field", [b"\x80" + (2**80).to_bytes(11, "big"), b"77777777777\0", b"00000303240\0"],
                         ids=["base256", "octal", "100000"])
def test_a_size_past_the_end_of_the_file_is_an_error_not_a_short_read(tmp_path, how, field):
    data, at = _lying_size(field)
    size = {0x80: 2**80, ord("7"): 8**11 - 1}.get(field[0], 100000)
    if how == "gzip":
        data = gzip.compress(data)
    path = tmp_path / "lying.tar"
    path.write_bytes(data)

    class Pipe:  # read() only, short reads: the size cannot be known up front
        def __init__(self, b):
            self.f = io.BytesIO(b)

        def read(self, n=-1):
            return self.f.read(n if n < 0 else min(n, 4096))

    with open(path, "rb") as f:
        stream = {"bytesio": io.BytesIO(data), "file": f, "pipe": Pipe(data), "gzip": io.BytesIO(data)}[how]
        # the rest of the shard would be swallowed into a.cls: every byte up to the end is there
        got = len(_tar(tarfile.GNU_FORMAT, SMALL, extras=False)) - at - 512
        if size > MAX_MEMBER_BYTES and how in ("pipe", "gzip"):  # no length to check against: the limit refuses it
            message = rf"member 'a.cls' at byte {at} claims {size} bytes.*, over the limit of {MAX_MEMBER_BYTES} bytes"
        else:  # a file's length, or a size under the limit read up to the end
            message = rf"truncated tar: member 'a.cls' at byte {at} has {got} of {size} bytes"
        with pytest.raises(TarError, match=message):
            list(iter_tar(stream))


def test_errors_name_the_shard_from_url_or_the_file_name(tmp_path):
    data, at = _lying_size(b"\xff" * 12)
    path = tmp_path / "named-000003.tar"
    path.write_bytes(data)
    with open(path, "rb") as f, pytest.raises(TarError, match=rf"at byte {at} in {re.escape(str(path))}$"):
        list(iter_tar(f))
    with open(path, "rb") as f, pytest.raises(TarError, match=rf"at byte {at} in {re.escape(SHARD)}$"):
        list(iter_tar(f, url=SHARD))


def _with_pax(records: dict[str, str], name: str = "p.png", payload: bytes = b"12345") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.pax_headers = len(payload), records
        tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("q.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"7"))
    return buf.getvalue()


@pytest.mark.parametrize("value", ["-5", "abc", "", "+5", " 5", "1_0", "٣"])
def test_pax_sizes_that_are_not_plain_decimals_are_errors(value):
    data = _with_pax({"size": value})
    with pytest.raises(TarError, match=r"invalid tar header \(pax size record .* is not a non-negative decimal number\) "
                                       r"at byte 0 in x.tar|not a tar archive at byte 0 \(pax size record"):
        list(iter_tar(io.BytesIO(data), url="x.tar"))


def test_pax_size_and_path_records_are_honoured_as_tarfile_does():
    data = _with_pax({"size": "5", "path": "renamed/p.png/"}, payload=b"12345")
    assert list(iter_tar(io.BytesIO(data))) == [("renamed/p.png", b"12345"), ("q.cls", b"7")] == _reference(data)


@pytest.mark.parametrize("damage", ["plus_65521", "sum_moved_by_65521", "signed_counting_the_field"])
def test_checksums_that_a_fast_modular_check_would_pass_are_errors(damage):
    data = bytearray(_tar(tarfile.GNU_FORMAT, SMALL, extras=False))
    at = _offsets(bytes(data))["b.png"][0]
    header = data[at : at + 512]
    true = 256 + sum(header[:148]) + sum(header[156:])
    if damage == "plus_65521":  # the stored sum is off by the modulus of adler32's low half
        data[at + 148 : at + 156] = b"%06o\0 " % (true + 65521)
    elif damage == "sum_moved_by_65521":  # damage that moves the byte sum by exactly 65521
        data[at + 345 : at + 500] = b"\xff" * 155  # 155 NULs (prefix field) -> 0xff: +39525
        data[at + 157 : at + 257] = b"\xff" * 100  # linkname: +25500
        data[at + 265 : at + 267] = b"\xf8\xf8"  # uname's trailing NULs: +496; 39525 + 25500 + 496 = 65521
        assert 256 + sum(data[at : at + 148]) + sum(data[at + 156 : at + 512]) == true + 65521
    else:  # a "signed" sum that also counts the high bytes of the checksum field itself
        fields = [b"\x80" + (true - 256 * h).to_bytes(7, "big") for h in range(1, 8)]
        data[at + 148 : at + 156] = next(f for h, f in enumerate(fields, 1) if sum(b > 127 for b in f) == h)
    with pytest.raises(TarError, match=rf"invalid tar header \(bad checksum\) at byte {at}"):
        list(iter_tar(io.BytesIO(bytes(data))))
    assert [n for n, _ in _reference(bytes(data))] == ["a.png", "a.cls"]  # tarfile: a shorter shard, no error


def test_a_base256_checksum_is_accepted_like_tarfile_does():
    data = bytearray(_tar(tarfile.GNU_FORMAT, {"x.png": b"x"}, extras=False))
    data[148:156] = b" " * 8
    data[148:156] = b"\x80" + (sum(data[:512])).to_bytes(7, "big")
    assert list(iter_tar(io.BytesIO(bytes(data)))) == [("x.png", b"x")] == _reference(bytes(data))


@pytest.mark.parametrize("field, lo, hi", [("mode", 100, 108), ("uid", 108, 116), ("mtime", 136, 148),
                                           ("devmajor", 329, 337)])
def test_other_numeric_fields_must_be_numbers_too(field, lo, hi):
    # tarfile stops at such a header without a word: a silently shorter shard
    data = bytearray(_tar(tarfile.GNU_FORMAT, SMALL, extras=False))
    at = _offsets(bytes(data))["b.png"][0]
    data[at + lo : at + hi] = b"12x45\0\0\0"[: hi - lo].ljust(hi - lo, b"\0")
    _fix_checksum(data, at)
    assert [n for n, _ in _reference(bytes(data))] == ["a.png", "a.cls"]
    with pytest.raises(TarError, match=rf"invalid tar header \({field} field .* is not a number\) at byte {at}"):
        list(iter_tar(io.BytesIO(bytes(data))))


def test_padding_cut_short_is_an_error():
    data = _tar(tarfile.GNU_FORMAT, {"a.png": b"A" * 700}, extras=False)
    data = data[: 512 + 700 + 10]  # the data is all there, its padding to 1024 is not
    with pytest.raises(TarError, match=r"member 'a.png' at byte 0 has its 700 bytes but only 10 of 324 padding bytes"):
        list(iter_tar(io.BytesIO(data)))
    with pytest.raises(tarfile.ReadError):  # tarfile raises too (after yielding it)
        _reference(data)


@pytest.mark.parametrize("fmt, what", [(tarfile.GNU_FORMAT, "GNU long name"), (tarfile.PAX_FORMAT, "pax extended")])
def test_metadata_that_no_member_follows_is_an_error(fmt, what):
    data = _tar(fmt, {"ok.cls": b"1", LONG: b"long"}, extras=False)
    meta = _offsets(data)[LONG][0]
    for cut in (data[: meta + 1024], data[: meta + 1024] + b"\0" * 1024):  # at the end of the data / at the end marker
        with pytest.raises(TarError, match=rf"truncated tar: {what} header at byte {meta} is not followed by a member"):
            list(iter_tar(io.BytesIO(cut)))
        with pytest.raises(tarfile.ReadError):
            _reference(cut)


def test_the_earliest_long_name_wins_as_in_tarfile():
    first = _tar(tarfile.GNU_FORMAT, {"x" * 120 + ".png": b"1"}, extras=False)
    second = _tar(tarfile.GNU_FORMAT, {"y" * 120 + ".png": b"1"}, extras=False)
    data = first[:1024] + second  # L(x...), L(y...), header: tarfile names it x...
    assert list(iter_tar(io.BytesIO(data))) == _reference(data) == [("x" * 120 + ".png", b"1")]


def test_sparse_members_and_global_pax_names_are_refused():
    data = bytearray(_tar(tarfile.GNU_FORMAT, SMALL, extras=False))
    at = _offsets(bytes(data))["a.cls"][0]
    data[at + 156] = ord("S")
    _fix_checksum(data, at)
    with pytest.raises(TarError, match=rf"unsupported GNU sparse member\) at byte {at}"):
        list(iter_tar(io.BytesIO(bytes(data))))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "all.png"}) as tar:
        tar.addfile(tarfile.TarInfo("a.cls"), io.BytesIO(b""))
    assert [n for n, _ in _reference(buf.getvalue())] == ["all.png"]  # tarfile renames every member
    with pytest.raises(TarError, match=r"pax global header sets 'path'"):
        list(iter_tar(io.BytesIO(buf.getvalue())))


def test_global_pax_comments_as_git_archive_writes_are_fine():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "0123abcd"}) as tar:
        for name, data in SMALL.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(iter_tar(io.BytesIO(buf.getvalue()))) == list(SMALL.items()) == _reference(buf.getvalue())


def test_a_first_member_named_like_a_bzip2_magic_is_a_plain_tar():
    data = _tar(tarfile.USTAR_FORMAT, {"BZh91.png": b"1", "BZh91.cls": b"2"}, extras=False)
    assert list(iter_tar(io.BytesIO(data))) == [("BZh91.png", b"1"), ("BZh91.cls", b"2")] == _reference(data)


@pytest.mark.parametrize("codec", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_damaged_compressed_data_is_a_tar_error(codec):
    packed = codec(_tar(tarfile.GNU_FORMAT, SMALL, extras=False))
    # (a stream cut only in its trailer is read whole: the end-of-archive blocks come first)
    for damaged in (packed[: len(packed) // 2], packed[:12] + bytes(64) + packed[76:]):
        with pytest.raises(TarError, match=r"(damaged (gzip|bzip2|xz) data after byte \d+ of the tar stream in x.tar"
                                           r"|not a tar archive at byte 0|invalid tar header|truncated tar)"):
            list(iter_tar(io.BytesIO(damaged), url="x.tar"))


# --- streams are closed --------------------------------------------------------------------


class _Tracked(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.closed_by_reader = False

    def close(self):
        self.closed_by_reader = True
        super().close()


def test_the_pipeline_stage_closes_every_stream_read_damaged_or_abandoned():
    from toolkit.data.tario import tar_expander

    good = _tar(tarfile.USTAR_FORMAT, {"k1.png": b"1", "k1.cls": b"0"}, extras=False)
    streams = [_Tracked(good), _Tracked(good[:1100]), _Tracked(good)]
    errors = []
    out = list(tar_expander(iter({"url": f"u{i}", "stream": s} for i, s in enumerate(streams)),
                            lambda e: errors.append(e) or True))
    assert [s.closed_by_reader for s in streams] == [True, True, True]
    assert len(errors) == 1 and len([o for o in out if o]) == 5
    # abandoned in the middle of a shard (a loader cut mid-epoch): closed when the generator is
    abandoned = _Tracked(good)
    stage = tar_expander(iter([{"url": "u", "stream": abandoned}]), lambda e: True)
    next(stage)
    stage.close()
    assert abandoned.closed_by_reader
    # iter_tar itself leaves a caller's stream open: it is the caller's (gallery.py uses `with open`)
    mine = _Tracked(good)
    list(iter_tar(mine))
    assert not mine.closed_by_reader


def test_reading_shard_files_leaves_no_unclosed_file(tmp_path):
    import gc
    import warnings

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"s{i}.tar")
        paths[-1].write_bytes(_tar(tarfile.USTAR_FORMAT, {f"k{i}.png": b"1", f"k{i}.cls": b"0"}, extras=False))
    paths[1].write_bytes(paths[1].read_bytes()[:1100])  # a damaged one: cut in the second header
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = tar_samples(iter([{"url": str(p)} for p in paths]), handler=lambda e: True)
        assert len([s for s in samples if "png" in s]) == 3
        del samples
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# --- limits: a size that cannot be checked against the file is checked against a stated limit ---


_BOMB_CHILD = r"""
import json, re, resource, sys, time
sys.path.insert(0, sys.argv[2])
from toolkit.data.tario import iter_tar
from toolkit.errors import TarError

def peak_kib():  # this process's peak RSS: VmHWM (ru_maxrss keeps the forking parent's peak across exec)
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s*(\d+) kB", f.read()).group(1))
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

before = peak_kib()
started = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    try:
        list(iter_tar(f, url="s3://bucket/bomb-000001.tar.gz"))
        message = None
    except TarError as exn:
        message = str(exn)
print(json.dumps({"message": message, "seconds": time.perf_counter() - started,
                  "peak_kib": peak_kib() - before}))
"""


def test_a_gzip_member_claiming_a_terabyte_is_refused_before_anything_is_read(tmp_path):
    """A real bomb: a header claiming 2**40 bytes followed by 128 MiB of compressed zeros (~0.6 MB).
    Read in a fresh process, so that its peak RSS is its own: it must not grow by the data."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    data, at = _lying_size(b"\x80" + (2**40).to_bytes(11, "big"))
    path = tmp_path / "bomb.tar.gz"
    with gzip.GzipFile(path, "wb", compresslevel=1) as gz:
        gz.write(data[: at + 512])  # the headers up to and with the lying one
        zeros = bytes(1 << 20)
        for _ in range(128):
            gz.write(zeros)
    assert path.stat().st_size < 2 << 20
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(path), repo], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["message"] == (f"member 'a.cls' at byte {at} claims 1099511627776 bytes (1 TiB), over the limit of "
                              f"268435456 bytes (256 MiB) per member (MAX_MEMBER_BYTES) in s3://bucket/bomb-000001.tar.gz")
    assert got["seconds"] < 1.0
    assert got["peak_kib"] < 16 << 10, got  # (reading the 128 MiB would add >= 128 MiB)


def test_the_member_limit_holds_for_members_and_metadata_of_every_stream(monkeypatch):
    import toolkit.data.tario as tario

    data = _tar(tarfile.GNU_FORMAT, {"a.png": b"A" * 1000, "a.cls": b"1", LONG: b"x"}, extras=False)
    monkeypatch.setattr(tario, "MAX_MEMBER_BYTES", 1000)  # exactly a.png: read
    assert list(iter_tar(io.BytesIO(data)))[:2] == [("a.png", b"A" * 1000), ("a.cls", b"1")]
    monkeypatch.setattr(tario, "MAX_MEMBER_BYTES", 999)
    for stream in (io.BytesIO(data), io.BytesIO(gzip.compress(data))):
        with pytest.raises(TarError, match=r"^member 'a.png' at byte 0 claims 1000 bytes, over the limit of 999 bytes "
                                           r"per member \(MAX_MEMBER_BYTES\) in x.tar$"):
            list(iter_tar(stream, url="x.tar"))
    # skipped (unselected) members too: a member that size is damage, read or not
    with pytest.raises(TarError, match="claims 1000 bytes"):
        list(iter_tar(io.BytesIO(data), select=lambda name: name.endswith(".cls")))
    monkeypatch.setattr(tario, "MAX_MEMBER_BYTES", 100)  # the GNU long name's own data (171 bytes) is over it
    at = _offsets(data)[LONG][0]
    with pytest.raises(TarError, match=rf"^GNU long name header at byte 0 claims {len(LONG) + 1} bytes, over the limit"):
        list(iter_tar(io.BytesIO(data[at:])))  # (a.png and a.cls cut off)


@pytest.mark.parametrize("codec", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_a_decompression_bomb_is_refused_at_the_decompressed_limit(monkeypatch, codec):
    import toolkit.data.tario as tario

    members = {f"x{i}.png": bytes(256 << 10) for i in range(12)}  # 3 MiB of zeros: a few kB compressed
    packed = codec(_tar(tarfile.USTAR_FORMAT, members, extras=False))
    assert len(packed) < 64 << 10
    monkeypatch.setattr(tario, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    got = []
    name = {gzip.compress: "gzip", bz2.compress: "bzip2", lzma.compress: "xz"}[codec]
    each = 512 + (256 << 10)
    with pytest.raises(TarError, match=rf"^{name} shard expands past the limit of 1048576 bytes \(1 MiB\) of tar data "
                                       rf"\(MAX_DECOMPRESSED_BYTES\): member 'x3.png' at byte {3 * each} would end at "
                                       rf"byte {4 * each} in bomb.tar \(a decompression bomb\?\)$"):
        for item in iter_tar(io.BytesIO(packed), url="bomb.tar"):
            got.append(item)
    assert [n for n, _ in got] == ["x0.png", "x1.png", "x2.png"]  # all that fits under the limit, then one line
    # the same shard uncompressed has its length known: the decompressed limit does not apply
    assert len(list(iter_tar(io.BytesIO(_tar(tarfile.USTAR_FORMAT, members, extras=False))))) == 12


def test_a_small_gzip_shard_reads_through_the_pipeline_stage(tmp_path):
    members = {"k1.png": b"1" * 3000, "k1.cls": b"0", "k2.png": b"2" * 10, "k2.cls": b"1"}
    path = tmp_path / "small-000000.tar.gz"
    path.write_bytes(gzip.compress(_tar(tarfile.PAX_FORMAT, members, extras=False)))
    errors = []
    samples = list(tar_samples(iter([{"url": str(path)}]), handler=lambda e: errors.append(e) or True))
    assert not errors
    assert [(s["__key__"], s["png"], s["cls"]) for s in samples] == [("k1", b"1" * 3000, b"0"), ("k2", b"2" * 10, b"1")]
