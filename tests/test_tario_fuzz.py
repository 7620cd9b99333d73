"""Differential fuzz test: the fast tar reader against Python's ``tarfile`` on damaged archives.

A few small valid archives (written by ``tarfile``: regular members, GNU long names, UTF-8
names in the header itself, pax
extended and global headers, a pax ``size`` record, a ustar ``prefix`` name, an empty file,
links and directories, zero padding to the record size or none at all) are mutated
thousands of times, seeded: bits flipped and fields overwritten in headers (with the
checksum fixed afterwards, so the damage reaches past the checksum check), size fields set
to random octal / base-256 / negative / malformed values, checksums that are off by the
modulus of a fast check or summed as signed bytes, type bytes changed, pax records edited,
metadata headers inserted, blocks duplicated, deleted or swapped, archives truncated.

For each mutant, the reference is what WebDataset's ``tar_file_iterator`` gets from
``tarfile.open(mode="r|*")``: regular members that are not ``__meta__`` entries. The fast
reader must

* never yield a member that tarfile does not yield for the same bytes: its members are
  always a prefix of tarfile's (same names, same data, same order);
* raise where tarfile raises (it may stop earlier: it also refuses damage tarfile reads
  past, such as a bad header after the first one, where tarfile just stops), and when it
  finishes without an error, yield exactly what tarfile yields;
* raise nothing but ``TarError``, with a message naming the shard and a byte offset;
* never hang: each parse runs under a 2 s alarm and may yield at most one member per block.

Known, deliberate difference: a regular-file header whose name ends in "/" is skipped
(GNU tar reads it as a directory; WebDataset's ``group_by_keys`` drops it too), so the
reference skips it as well.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import re
import signal
import tarfile
import time
import zlib

import pytest

from toolkit.data.tario import iter_tar
from toolkit.errors import TarError

SEED = 0x7A410
N_PLAIN = 10000  # mutants of plain tars
N_COMPRESSED = 600  # mutants of compressed tars (half: compressed mutants, half: mutated compressed bytes)
SHARD = "fuzz/mutant-000001.tar"
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


# --------------------------------------------------------------------------------------------
# the corpus


def _add(tar, name, data=b"", kind=tarfile.REGTYPE, pax=None, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, 1_700_000_000
    if pax:
        info.pax_headers = pax
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _archive(fmt, build, *, pax_headers=None, trim=True, zero_blocks=2):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers) as tar:
        build(tar)
    data = buf.getvalue()
    if trim:  # drop the zero padding to the 10240-byte record: mutations hit headers more often
        data = data[: _walk(data)[1] + BLOCK * zero_blocks]
    return data


BLOCK = 512
LONG = "very/" * 25 + "long.name.png"


def _corpus() -> dict[str, bytes]:
    rng = random.Random(1)
    blob = bytes(rng.randrange(256) for _ in range(700))

    def gnu(tar):
        _add(tar, "a.png", blob)
        _add(tar, "a.cls", b"3")
        _add(tar, "d", kind=tarfile.DIRTYPE)
        _add(tar, "d/link.png", kind=tarfile.SYMTYPE, linkname="../a.png")
        _add(tar, LONG, b"long")  # a GNU ././@LongLink header first
        _add(tar, "empty.json", b"")
        _add(tar, "ünï/ß.png", b"utf-8 bytes in the header itself")
        _add(tar, "__meta__", b"skipped")
        _add(tar, "b.png", bytes(range(256)) * 2)  # exactly one block, no padding

    def pax(tar):
        _add(tar, "ünïcødé.png", b"u" * 30)  # a pax header with the path
        _add(tar, "c.png", b"c" * 5, pax={"size": "5", "comment": "a size record"})
        _add(tar, LONG.replace("long", "pax"), b"p" * 600)
        _add(tar, "c.cls", b"1")

    def ustar(tar):
        _add(tar, "p" * 80 + "/" + "q" * 40 + ".png", b"prefixed")  # name split into the prefix field
        _add(tar, "e.cls", b"9")
        _add(tar, "hard.cls", kind=tarfile.LNKTYPE, linkname="e.cls")

    def tiny(tar):
        _add(tar, "z.png", b"zz")
        _add(tar, "z.cls", b"0")

    return {
        "gnu": _archive(tarfile.GNU_FORMAT, gnu, trim=False),  # zero padding up to the 10240-byte record
        "pax": _archive(tarfile.PAX_FORMAT, pax, pax_headers={"comment": "a global header"}),
        "ustar": _archive(tarfile.USTAR_FORMAT, ustar, zero_blocks=1),
        "tiny": _archive(tarfile.GNU_FORMAT, tiny, zero_blocks=0),  # ends without end-of-archive blocks
    }


def _walk(data: bytes) -> tuple[list[tuple[int, int, bytes]], int]:
    """(header offset, size, type) of every header of a valid archive, and where its end marker is."""
    headers, pos = [], 0
    while pos + BLOCK <= len(data):
        h = data[pos : pos + BLOCK]
        if h.count(0) == BLOCK:
            break
        size = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
        kind = h[156:157]
        headers.append((pos, size, kind))
        pos += BLOCK + (0 if kind in _NO_DATA else -(-size // BLOCK) * BLOCK)
    return headers, pos


# --------------------------------------------------------------------------------------------
# mutations


def _fix_checksum(data: bytearray, at: int, rng: random.Random) -> None:
    h = data[at : at + BLOCK]
    if len(h) < BLOCK:
        return
    unsigned = 256 + sum(h[:148]) + sum(h[156:])
    signed = 256 + sum(b - 256 if b > 127 else b for b in h[:148] + h[156:])
    r = rng.random()
    value = signed if r < 0.1 else unsigned
    if r > 0.97:
        value += rng.choice((65521, -65521, 256, 1))  # off in ways a modular or sloppy check misses
    data[at + 148 : at + 156] = (b"%06o\0 " % value) if value >= 0 else b"-%05o\0 " % -value


def _size_value(rng: random.Random, total: int) -> bytes:
    n = rng.choice((rng.randrange(0, 2048), rng.randrange(0, total + 1024), rng.randrange(0, 1 << 40)))
    forms = [
        lambda: b"%011o\0" % (n % 8**11),
        lambda: b"%o" % (n % 8**11),
        lambda: (b"%012o" % (n % 8**12))[-12:],  # 12 digits, no terminator
        lambda: b" %o " % (n % 8**10),
        lambda: b"\x80" + n.to_bytes(11, "big"),  # GNU base-256
        lambda: b"\x80" + rng.randbytes(11),
        lambda: b"\xff" + (2**88 - n - 1).to_bytes(11, "big"),  # base-256, negative
        lambda: b"-%o\0" % n,
        lambda: b"+%o\0" % n,
        lambda: b"0o%o\0" % (n % 8**9),
        lambda: b"1_7\0",
        lambda: b"%d\0" % n,  # decimal digits: 8 and 9 are not octal
        lambda: b"\0" * 12,
        lambda: b" " * 12,
        lambda: rng.randbytes(12),
        lambda: b"%011o\0" % (n % 8**11) + b"junk",
    ]
    value = rng.choice(forms)()
    return (value + b"\0" * 12)[:12]


_INTERESTING = [b"\0", b" ", b"0", b"7", b"8", b"-", b"+", b"/", b"\x80", b"\xff", b"x", b"=", b"\n", b"_"]
_FIELDS = [(0, 100), (100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (156, 157),
           (157, 257), (257, 265), (329, 337), (337, 345), (345, 500)]
_KINDS = b"0\x0012345677LKxXgSAVDMN"


def _header_offsets(data: bytearray, base: list[int]) -> list[int]:
    return [o for o in base if o + BLOCK <= len(data)] or [0]


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + len(str(len(body)))
    n = len(body) + len(str(n))
    return b"%d" % n + body


def _meta_header(kind: bytes, payload: bytes, rng: random.Random, *, size: int | None = None) -> bytes:
    h = bytearray(BLOCK)
    name = {b"L": b"././@LongLink", b"K": b"././@LongLink"}.get(kind, b"./PaxHeaders/x")
    h[: len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136] = b"%011o\0" % (len(payload) if size is None else size)
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar  \0"
    _fix_checksum(h, 0, random.Random(0))
    return bytes(h) + payload + b"\0" * (-len(payload) % BLOCK)


def _random_meta(rng: random.Random) -> bytes:
    kind = rng.choice((b"L", b"K", b"x", b"X", b"g"))
    if kind in (b"L", b"K"):
        payload = rng.choice((b"new/name.png\0", b"n" * rng.randrange(1, 700), b"dir/", b"", b"a.png"))
    else:
        recs = []
        for _ in range(rng.randrange(1, 4)):
            key = rng.choice((b"path", b"size", b"comment", b"mtime", b"GNU.sparse.size", b"hdrcharset", b"linkpath"))
            value = rng.choice((b"x.png", b"d/", b"12", b"-5", b"abc", b"", b"0", b"\xff\xfe", b"BINARY", b"1e3", b" 7"))
            recs.append(_pax_record(key, value))
        payload = b"".join(recs)
    size = None if rng.random() < 0.8 else rng.randrange(0, len(payload) + 600)
    return _meta_header(kind, payload, rng, size=size)


def _mutate(original: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    data = bytearray(original)
    headers, _ = _walk(original)
    base = [o for o, _, _ in headers]
    log = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        op = rng.choices(
            ["flip", "field", "size", "checksum", "type", "pax", "meta", "truncate", "block", "byte"],
            weights=[10, 14, 18, 6, 8, 8, 8, 8, 8, 4],
        )[0]
        at = rng.choice(_header_offsets(data, base))
        if at + BLOCK > len(data) and op in ("flip", "field", "size", "checksum", "type"):
            continue  # no whole header left to damage
        if op == "flip":
            for _ in range(rng.randrange(1, 5)):
                i = at + rng.randrange(BLOCK)
                if i < len(data):
                    data[i] ^= 1 << rng.randrange(8)
            if rng.random() < 0.5:
                _fix_checksum(data, at, rng)
        elif op == "field":
            lo, hi = rng.choice(_FIELDS)
            n = hi - lo
            choice = rng.random()
            if choice < 0.4:
                value = rng.choice(_INTERESTING) * n
            elif choice < 0.7:
                value = rng.randbytes(n)
            else:  # one interesting byte at one place
                value = bytes(data[at + lo : at + hi])
                i = rng.randrange(n)
                value = value[:i] + rng.choice(_INTERESTING) + value[i + 1 :]
            data[at + lo : at + hi] = value[:n]
            if rng.random() < 0.85:
                _fix_checksum(data, at, rng)
        elif op == "size":
            data[at + 124 : at + 136] = _size_value(rng, len(data))
            if rng.random() < 0.9:
                _fix_checksum(data, at, rng)
        elif op == "checksum":
            _fix_checksum(data, at, rng)
            value = int(bytes(data[at + 148 : at + 154]), 8) if data[at + 148 : at + 154].isdigit() else 0
            data[at + 148 : at + 156] = rng.choice((
                b"%06o\0 " % ((value + 65521) % 8**6), b"%06o\0 " % abs(value - 65521), b" %06o\0" % value,
                b"%07o\0" % value, b"%07o " % value, b"\x80" + (value).to_bytes(7, "big"), b"%06o  " % value,
                b"0%o\0x " % value,
            ))[:8]
        elif op == "type":
            data[at + 156] = rng.choice(_KINDS) if rng.random() < 0.9 else rng.randrange(256)
            if rng.random() < 0.9:
                _fix_checksum(data, at, rng)
        elif op == "pax":
            paxes = [(o, s) for o, s, k in headers if k in (b"x", b"g") and o + BLOCK + s <= len(data)]
            if not paxes:
                continue
            o, s = rng.choice(paxes)
            payload = bytes(data[o + BLOCK : o + BLOCK + s])
            edit = rng.random()
            if edit < 0.5:
                key, value = rng.choice(((b"size", b"-5"), (b"size", b"abc"), (b"size", b"99999"), (b"size", b"0"),
                                         (b"size", b"+5"), (b"size", b"5 "), (b"path", b"dir/"), (b"path", b"__x__"),
                                         (b"GNU.sparse.map", b"0,1"), (b"hdrcharset", b"\xff"), (b"path", b""),
                                         (b"size", b"1_0"), (b"size", b"\xd9\xa3")))
                payload = _pax_record(key, value) + payload if rng.random() < 0.5 else payload + _pax_record(key, value)
            elif edit < 0.8 and payload:  # damage a length or a separator
                i = rng.randrange(len(payload))
                payload = payload[:i] + rng.choice(_INTERESTING + [b"9", b"1"]) + payload[i + 1 :]
            else:
                payload = payload[: rng.randrange(len(payload) + 1)]
            new = bytearray(_meta_header(bytes(data[o + 156 : o + 157]), payload, rng))
            end = o + BLOCK + -(-s // BLOCK) * BLOCK
            data[o:end] = new
        elif op == "meta":
            data[at:at] = _random_meta(rng)
        elif op == "truncate":
            cut = rng.choice((rng.randrange(len(data) + 1), at + rng.randrange(2 * BLOCK), at + BLOCK))
            del data[cut:]
        elif op == "block":
            nblocks = len(data) // BLOCK
            if nblocks < 2:
                continue
            i, j = rng.randrange(nblocks) * BLOCK, rng.randrange(nblocks) * BLOCK
            block = bytes(data[i : i + BLOCK])
            how = rng.random()
            if how < 0.5:
                data[j:j] = block  # duplicate
            elif how < 0.75:
                del data[i : i + BLOCK]
            else:
                data[i : i + BLOCK], data[j : j + BLOCK] = data[j : j + BLOCK], block
        elif op == "byte":
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        log.append(f"{op}@{at}")
    return bytes(data), log


# --------------------------------------------------------------------------------------------
# the two readers


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


class _Spinning(Exception):
    """tarfile skips a lying size past the end of the stream one empty read at a time."""


class _EndGuard(io.BytesIO):
    """BytesIO that stops tarfile where it would spin: given a size of 2**40 in a 10 kB stream,
    ``_Stream.seek`` calls ``read`` ~10**8 times at the end of the data. That is a stop of the
    reference (it never yields again), so it counts as tarfile raising there."""

    empty_reads = 0

    def read(self, n=-1):
        data = super().read(n)
        if not data:
            self.empty_reads += 1
            if self.empty_reads > 1000:
                raise _Spinning("tarfile would skip past the end of the data for a very long time")
        return data


def _reference(data: bytes):
    """What webdataset's tar_file_iterator gets from tarfile: (members, exception or None)."""
    members = []
    try:
        with tarfile.open(fileobj=_EndGuard(data), mode="r|*") as tar:
            for info in tar:
                name = info.name
                if not info.isreg() or name.endswith("/"):
                    continue
                if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
                    continue
                members.append((name, tar.extractfile(info).read()))
    except Exception as exn:  # noqa: BLE001 - any failure of tarfile is a stop
        return members, exn
    return members, None


def _ours(data: bytes, log, max_members: int):
    members = []
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        for item in iter_tar(io.BytesIO(data), url=SHARD):
            members.append(item)
            assert len(members) <= max_members, ("more members than blocks", log)
    except TarError as exn:
        message = str(exn)
        assert SHARD in message and re.search(r"byte \d+", message), (message, log)
        return members, exn
    except _Hang:
        pytest.fail(f"the reader hung on a mutant ({log})")
    except Exception as exn:  # noqa: BLE001
        raise AssertionError(f"{type(exn).__name__} instead of TarError on a mutant ({log}): {exn}") from exn
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return members, None


def _decompressible(data: bytes) -> bytes:
    """All a decompressor gives out before it finds the damage, drained 512 bytes at a time (the
    most any reader can get: bz2 and xz check a block, gzip the whole stream, only at its end);
    a stream without a compression magic (tarfile's r|* test) as it is."""
    if data.startswith(b"\x1f\x8b\x08"):  # the deflate data after the gzip header, unchecked by any CRC
        try:
            flags, pos = data[3], 10
            if flags & 4:
                pos += 2 + data[pos] + 256 * data[pos + 1]
            for flag in (8, 16):
                if flags & flag:
                    pos = data.index(b"\0", pos) + 1
            pos += 2 if flags & 2 else 0
        except (IndexError, ValueError):
            return b""
        data, d = data[pos:], zlib.decompressobj(-zlib.MAX_WBITS)
    elif data[:3] == b"BZh" and data[4:10] == b"1AY&SY":
        d = bz2.BZ2Decompressor()
    elif data.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        d = lzma.LZMADecompressor()
    else:
        return data
    out = []
    try:
        if isinstance(d, type(zlib.decompressobj())):
            rest = data
            while not d.eof:
                out.append(d.decompress(rest, BLOCK))
                rest = d.unconsumed_tail
                if not out[-1] and not rest:
                    break
        else:
            out.append(d.decompress(data, max_length=BLOCK))
            while not d.eof:  # (needs_input may say True while output is still held back)
                out.append(d.decompress(b"", max_length=BLOCK))
                if not out[-1]:
                    break
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError):
        pass
    return b"".join(out)


def _check(data: bytes, log, *, reference_data: bytes | None = None, max_members: int | None = None) -> str:
    ours, our_error = _ours(data, log, len(data) // BLOCK + 1 if max_members is None else max_members)
    ref, ref_error = _reference(data if reference_data is None else reference_data)
    where = f"mutations {log}; ours: {len(ours)} members, {our_error!r}; tarfile: {len(ref)} members, {ref_error!r}"
    assert ours == ref[: len(ours)], "the fast reader yielded a member tarfile does not: " + where
    if our_error is None:
        assert ref_error is None, "tarfile raises where the fast reader does not: " + where
        assert ours == ref, "the fast reader stopped early without an error: " + where
    return "error" if our_error else "ok"


@pytest.fixture
def alarm():
    old = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_the_corpus_reads_the_same():
    for name, data in _corpus().items():
        ours = list(iter_tar(io.BytesIO(data)))
        ref, error = _reference(data)
        assert error is None and ours == ref and len(ours) >= 2, name


def test_mutated_archives_never_fool_the_reader(alarm, record_property, capsys):
    corpus = list(_corpus().items())
    rng = random.Random(SEED)
    outcomes = {"ok": 0, "error": 0}
    started = time.perf_counter()
    for i in range(N_PLAIN):
        name, original = corpus[i % len(corpus)]
        mutant, log = _mutate(original, rng)
        outcomes[_check(mutant, [name, i, *log])] += 1
    plain_s = time.perf_counter() - started
    record_property("mutations", N_PLAIN)
    with capsys.disabled():
        print(f"\n[tario fuzz] {N_PLAIN} plain mutants in {plain_s:.1f} s: {outcomes['ok']} read, "
              f"{outcomes['error']} refused with TarError")
    # the mutations must reach past the first checks, or the test proves little
    assert outcomes["ok"] > N_PLAIN // 20 and outcomes["error"] > N_PLAIN // 4


def test_mutated_compressed_archives_raise_only_tar_errors(alarm, capsys):
    corpus = list(_corpus().items())
    rng = random.Random(SEED + 1)
    codecs = (gzip.compress, bz2.compress, lzma.compress)
    started = time.perf_counter()
    for i in range(N_COMPRESSED):
        name, original = corpus[i % len(corpus)]
        compress = codecs[i % len(codecs)]
        if i % 2 == 0:  # a damaged tar, compressed intact: the full comparison holds
            mutant, log = _mutate(original, rng)
            _check(compress(mutant), [name, i, compress.__module__, *log], max_members=len(mutant) // BLOCK + 1)
            continue
        # damaged compressed bytes: tarfile decompresses in 10 kB chunks and loses the output of
        # the chunk where the decompressor fails; gzip/bz2/lzma's readers (ours) give out a
        # block's data before its check at the block's end fails. Neither sees past the damage,
        # so the reference is tarfile on all the bytes a decompressor gives out before it fails.
        data = bytearray(compress(original))
        log = [name, i, compress.__module__]
        for _ in range(rng.randrange(1, 4)):
            if rng.random() < 0.3:
                cut = rng.randrange(len(data) + 1)
                del data[cut:]
                log.append(f"cut@{cut}")
            elif data:
                j = rng.randrange(len(data))
                data[j] ^= 1 << rng.randrange(8)
                log.append(f"flip@{j}")
        _check(bytes(data), log, reference_data=_decompressible(bytes(data)), max_members=len(original) * 4)
    with capsys.disabled():
        print(f"[tario fuzz] {N_COMPRESSED} compressed mutants in {time.perf_counter() - started:.1f} s")
