"""A fast tar reader as a WebDataset pipeline stage (drop-in for ``tar_file_expander``).

Why. WebDataset reads shards with Python's ``tarfile``, which builds a full ``TarInfo``
(a dozen parsed fields) for every member: 40-65 µs each, data included, on the 2-core reference
machine. A toolkit sample has three members (``.png``, ``.cls``, ``.json``), so on small
images tar parsing cost more than decoding the image. This reader parses only what a
sample stream needs (name, size, type, checksum) straight from the 512-byte headers:
about 8 µs per member. Everything else stays WebDataset's: ``url_opener`` opens local
paths, URLs and ``pipe:`` commands, and ``group_by_keys`` assembles samples.

Formats: POSIX ustar (with the ``prefix`` field), GNU (``././@LongLink`` long names,
base-256 sizes) and pax (``path`` and ``size`` records) headers; gzip/bzip2/xz-compressed
tars are detected by their magic bytes, as ``tarfile``'s ``r|*`` mode does. Only regular
files are yielded; metadata entries named ``__...__`` are skipped, as WebDataset does.

Damage is an error, never a silently shorter shard or a wrong member: every header is
checked as strictly as ``tarfile`` checks it or more (the checksum exactly, as unsigned and
as signed bytes; every numeric field; sizes that are negative, not numbers, or run past the
end of the file; malformed pax records), and a header or member cut short, metadata (long
name, pax) that no member follows, or a file that is not a tar raise :class:`TarError`
naming the byte offset of the bad header and the shard (``tarfile`` stops without a word
at a bad header past the first one). Offsets are in the uncompressed tar stream. The rule,
checked by a differential fuzz test: whatever this reader yields, ``tarfile`` (as WebDataset
uses it) yields too, in the same order, and where ``tarfile`` raises, this reader raises.
Sparse members (which ``tarfile`` would rebuild) are refused rather than skipped.

Limits. A member's data is read into memory by the size its header claims; for a regular
file a size past the end of the file is refused before reading, but a compressed shard or
a pipe has no length to check it against. So:

* :data:`MAX_MEMBER_BYTES` (256 MiB), every shard: a member (read or skipped), or metadata
  (long name, pax), claiming more is refused with a TarError naming the shard, the offset,
  the size and the limit, before anything is read or allocated. Shards hold preprocessed
  images (``toolkit shard`` may keep originals): an 8-bit 8192×8192 RGB PNG is at most
  ~192 MiB, so the limit is above any real member, and it bounds what a loader worker holds
  at once (a member being assembled takes at most twice its size).
* :data:`MAX_DECOMPRESSED_BYTES` (64 GiB), gzip/bzip2/xz shards: the tar bytes the shard may
  expand to. A header whose member would end past it is refused, with one TarError line,
  before its data are decompressed, so a decompression bomb costs at most that much
  inflating (a few minutes of one core, no memory: members are yielded one at a time)
  instead of running on without end. An absolute limit rather than a ratio: a shard of
  blank 32×32 images compresses 120:1 with gzip and 430:1 with bzip2 (headers and padding
  are mostly zeros), while deflate itself tops out near 1030:1, so no ratio separates bombs
  from real shards; and nothing in a real shard comes near 64 GiB. (An uncompressed pipe
  has no total limit: it costs no memory, and its bytes are what its command sends.)

Both are module constants, read when a shard is opened (tests patch them small).

Stalls. A ``pipe:`` or ``http(s)://`` shard (a webdataset ``gopen.Pipe``) is read straight
from the command's stdout with ``poll`` before each read: when no byte arrives for
``read_timeout_s`` seconds (:data:`DEFAULT_READ_TIMEOUT_S`, 300; 0: wait forever) the
command and its children are killed and :class:`StalledRead` is raised: one line naming
the source, the shard and the bytes received. It is a :class:`~toolkit.errors.DataError`,
never a TarError: a stalled source is an outage, not damaged data, so the tar stage does not
hand it to the skip handler, and :class:`~toolkit.data.reader.SkipLog` re-raises it in
strict and non-strict mode alike: the rank stops. A pipe's command that exits with an error
is reported as webdataset's Pipe reports it (an ``IOError`` naming its exit status). Local
files are read as before, with no timeout and no extra cost.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import select as _select
import signal
import stat
import subprocess
import sys
import zlib
from typing import IO, Any, Callable, Iterable, Iterator

from toolkit.errors import DataError, TarError

MAX_MEMBER_BYTES = 256 << 20  # a member (or metadata) claiming more is refused before reading: see the module docstring
MAX_DECOMPRESSED_BYTES = 64 << 30  # tar bytes a compressed shard may expand to (decompression bombs)
DEFAULT_READ_TIMEOUT_S = 300.0  # a pipe:/http shard sending no byte for this long is a StalledRead; 0: no timeout

BLOCK = 512
_PIPE_READ = 1 << 16  # bytes asked of a pipe per read: a pipe holds 64 KiB by default
_CHUNK = 1 << 20  # reads above this size are made in chunks: a lying size never allocates more than is there
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # hard/sym link, devices, directory, fifo: tarfile skips no data
_META = {b"L": "GNU long name", b"K": "GNU long link", b"x": "pax extended", b"X": "Solaris extended",
         b"g": "pax global"}  # headers that describe the next member instead of being one
# The common header, as tarfile, GNU tar and WebDataset write it: mode, uid, gid as 7 octal
# digits, size and mtime as 11, each ended by NUL or space; the checksum as 6 digits and NUL;
# devmajor/devminor as octal zeros or all NUL. Anything else takes the exact, slower path.
_COMMON = re.compile(
    rb"(?s)[0-7]{7}[\0 ][0-7]{7}[\0 ][0-7]{7}[\0 ][0-7]{11}[\0 ][0-7]{11}[\0 ][0-7]{6}\0"
    rb".{173}(?:[0-7]{7}\0[0-7]{7}\0|\0{16})"
)
_OCTAL = re.compile(rb" *[0-7]* *")  # an octal field's text up to its first NUL (tarfile also takes other forms)
_DECIMAL = re.compile(rb"[0-9]+")
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's own pattern: where it finds a record, so must we
_HDRCHARSET = re.compile(rb"\d+ hdrcharset=([^\n]+)\n")
_ASCII = bytes(range(128))
_NUMERIC = ((100, 108, "mode"), (108, 116, "uid"), (116, 124, "gid"), (136, 148, "mtime"),
            (329, 337, "devmajor"), (337, 345, "devminor"))
_COMPRESSED = (  # tarfile's r|* detection (_StreamProxy.getcomptype), name, opener
    (lambda h: h.startswith(b"\x1f\x8b\x08"), "gzip", lambda f: gzip.GzipFile(fileobj=f)),
    (lambda h: h[:3] == b"BZh" and h[4:10] == b"1AY&SY", "bzip2", bz2.BZ2File),
    (lambda h: h.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")), "xz", lzma.LZMAFile),
)
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class StalledRead(DataError):
    """A shard's source (a ``pipe:`` command, an http server) sent nothing for ``read_timeout_s``.

    An outage, not damaged data: never skipped (see the module docstring).
    """


class _Reader:
    """``read(n)`` returning exactly n bytes or fewer only at the end of the stream.

    ``end``: the stream's length when it is known up front (a regular file, a BytesIO), so
    a size past the end of the file is refused before anything is read. Errors of a
    decompressor become TarError naming the offset.
    """

    def __init__(self, stream: IO[bytes], where: str, end: int | None = None, codec: str | None = None):
        self.stream, self.where, self.end, self.codec = stream, where, end, codec
        self.offset = 0
        self.errors = _DECOMPRESS_ERRORS if codec else ()
        self.cap = MAX_DECOMPRESSED_BYTES if codec else None  # the most tar bytes a compressed stream may expand to

    def read(self, n: int) -> bytes:
        try:
            data = self.stream.read(n)
            if len(data) == n:  # the usual case, one call
                self.offset += n
                return data
            while len(data) < n:  # pipes and sockets may return short reads
                more = self.stream.read(n - len(data))
                if not more:
                    break
                data += more
        except StalledRead:  # a DataError (a ValueError): an outage, not damaged compressed data
            raise
        except self.errors as exn:
            raise TarError(f"damaged {self.codec} data after byte {self.offset} of the tar stream{self.where}: "
                           f"{type(exn).__name__}: {exn}") from exn
        self.offset += len(data)
        return data

    def read_big(self, n: int) -> bytes:
        """``read(n)`` for any n: in chunks, so memory never exceeds what the stream holds."""
        if n <= _CHUNK:
            return self.read(n)
        parts, got = [], 0
        while got < n:
            chunk = self.read(min(n - got, _CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Discards n bytes; returns how many were there."""
        got = 0
        while got < n:
            chunk = self.read(min(n - got, _CHUNK))
            if not chunk:
                break
            got += len(chunk)
        return got

    def close(self) -> None:
        if self.codec:  # our decompressor; the caller's stream stays the caller's to close
            try:
                self.stream.close()
            except Exception:  # noqa: BLE001 - closing a damaged decompressor must not hide the real error
                pass


def _number(field: bytes) -> int | None:
    """A numeric header field as tarfile reads it (octal text or GNU base-256), None if invalid.

    Stricter than tarfile: the octal text may only be padded with spaces (tarfile also takes
    signs, ``0o`` and ``_``), so whatever passes here, tarfile reads as the same number.
    """
    if field[0] in (0x80, 0xFF):  # GNU base-256 for values octal cannot hold; 0xff: negative
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0]
    if _OCTAL.fullmatch(text) is None:
        return None
    text = text.strip(b" ")
    return int(text, 8) if text else 0


def _header_error(reason: str, start: int, where: str) -> TarError:
    if start == 0:
        return TarError(f"not a tar archive at byte 0 ({reason}){where}")
    return TarError(f"invalid tar header ({reason}) at byte {start}{where}")


def _checksums(header: bytes) -> tuple[int, int]:
    """The header's checksum summed as unsigned and as signed bytes, its own field read as spaces."""
    field = header[148:156]
    # Exact byte sums in C: each half sums to at most 256 * 255 < 65521, so adler32's low half
    # (1 + byte sum mod 65521) is 1 + the exact sum of the half.
    unsigned = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2 - sum(field) + 8 * 0x20
    high = len(header.translate(None, _ASCII)) - len(field.translate(None, _ASCII))  # bytes > 127 outside the field
    return unsigned, unsigned - 256 * high


def _check_slowly(header: bytes, start: int, where: str) -> int:
    """The exact checks of a header off the common path; returns its size or raises TarError.

    The checksum is the sum of the header's bytes with its own 8-byte field read as spaces;
    like tarfile we take it summed as unsigned or as signed bytes (some old tars).
    """
    stored = _number(header[148:156])
    if stored is None or stored not in _checksums(header):
        raise _header_error("bad checksum", start, where)
    for lo, hi, what in _NUMERIC:
        if _number(header[lo:hi]) is None:
            raise _header_error(f"{what} field {header[lo:hi]!r} is not a number", start, where)
    size = _number(header[124:136])
    if size is None:
        raise _header_error(f"size field {header[124:136]!r} is not a number", start, where)
    if size < 0:
        raise _header_error(f"negative size {size}", start, where)
    return size


def _pax_records(buf: bytes, size: int, start: int, where: str) -> dict[str, bytes]:
    """The '<length> <key>=<value>\\n' records of a pax header's data (``buf``: the padded blocks).

    They must tile the first ``size`` bytes exactly; tarfile reads on into the padding as
    long as its pattern matches there, so text there that looks like a record is an error.
    """
    records: dict[str, bytes] = {}
    pos = 0
    while pos < size:
        m = _PAX_RECORD.match(buf, pos, size)
        length = int(m.group(1)) if m else 0
        end = pos + length
        if not m or end > size or m.end() >= end or buf[end - 1] != 0x0A:
            raise _header_error(f"malformed pax record at byte {pos} of its data", start, where)
        records[m.group(2).decode("utf-8", "surrogateescape")] = buf[m.end() : end - 1]
        pos = end
    if _PAX_RECORD.match(buf, size):
        raise _header_error("pax record text in the padding after its data", start, where)
    charset = _HDRCHARSET.search(buf) if b"hdrcharset=" in buf else None
    if charset is not None:  # tarfile decodes this one strictly (anywhere in the blocks) and fails
        try:
            charset.group(1).decode("utf-8")
        except UnicodeDecodeError:
            raise _header_error("pax hdrcharset is not UTF-8", start, where) from None
    for key in records:
        if key.startswith("GNU.sparse."):
            raise _header_error("unsupported GNU sparse member", start, where)
    return records


def _pax_size(value: bytes, start: int, where: str) -> int:
    if _DECIMAL.fullmatch(value) is None:
        raise _header_error(f"pax size record {value[:20]!r} is not a non-negative decimal number", start, where)
    return int(value)


def _stream_length(stream: Any) -> int | None:
    """Bytes left in a regular file or a BytesIO, or None when that is not known cheaply."""
    try:
        if isinstance(stream, io.BytesIO):
            with stream.getbuffer() as view:
                return len(view) - stream.tell()
        if isinstance(stream, (io.BufferedReader, io.FileIO)) and isinstance(getattr(stream, "raw", stream), io.FileIO):
            st = os.fstat(stream.fileno())
            if stat.S_ISREG(st.st_mode):
                return st.st_size - stream.tell()
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _open_maybe_compressed(stream: IO[bytes], where: str) -> _Reader:
    """Wraps gzip/bzip2/xz streams in their decompressor; plain tar passes through."""
    length = _stream_length(stream)
    head = stream.peek(10)[:10] if hasattr(stream, "peek") else b""
    if len(head) < 10 and length is not None:  # a file or BytesIO (without peek): read the magic, step back
        pos = stream.tell()
        head = stream.read(10)
        stream.seek(pos)
    elif len(head) < 10:  # a pipe or the like: read the magic and stitch it back in front
        head = b""
        while len(head) < 10:
            more = stream.read(10 - len(head))
            if not more:
                break
            head += more
        stream = _Prefixed(head, stream)
    for matches, codec, opener in _COMPRESSED:
        if matches(head):
            return _Reader(opener(stream), where, codec=codec)
    return _Reader(stream, where, end=length)


class _Prefixed:
    def __init__(self, prefix: bytes, stream: IO[bytes]):
        self.prefix, self.stream = prefix, stream

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            head, self.prefix = (self.prefix[:n], self.prefix[n:]) if n >= 0 else (self.prefix, b"")
            return head + (self.stream.read(n - len(head)) if n < 0 or len(head) < n else b"")
        return self.stream.read(n)


def _shard_label(stream: Any, url: str | None) -> str:
    name = url if url is not None else getattr(stream, "name", None)
    return f" in {name}" if isinstance(name, str) and name else ""


def iter_tar(stream: IO[bytes], select: Callable[[str], bool] | None = None, *,
             url: str | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in a tar stream, in archive order.

    Members rejected by ``select(name)`` are skipped without being held in memory. ``url``
    names the shard in error messages (default: the stream's ``name``, if it has one). The
    stream is not closed: it is the caller's.
    """
    where = _shard_label(stream, url)
    f = _open_maybe_compressed(stream, where)
    max_member = MAX_MEMBER_BYTES
    try:
        meta_at, meta_kind = -1, b""  # the first header of metadata waiting for its member
        name_over: str | None = None  # a long name or pax path; the earliest one wins, as in tarfile
        pax_size: int | None = None
        while True:
            start = f.offset
            header = f.read(BLOCK)
            if len(header) != BLOCK or (header[0] == 0 and header.count(0) == BLOCK):
                if meta_at >= 0 and len(header) in (0, BLOCK):
                    raise TarError(f"truncated tar: {_META[meta_kind]} header at byte {meta_at} is not followed "
                                   f"by a member{where}")
                if len(header) == BLOCK:
                    return  # end-of-archive marker
                if not header:
                    if start == 0:
                        raise TarError(f"empty file, not a tar archive (no header at byte 0){where}")
                    return  # end of stream without the end-of-archive blocks: what tarfile accepts too
                raise TarError(f"truncated tar: header at byte {start} has {len(header)} of {BLOCK} bytes{where}")
            if _COMMON.match(header, 100) is not None:  # the numeric fields are valid octal
                if header.isascii():
                    # All bytes < 128: the byte sum is < 65521, so adler32's low half (1 + sum mod
                    # 65521, in C) is the exact sum, and the signed sum equals the unsigned one.
                    if int(header[148:154], 8) != ((zlib.adler32(header) & 0xFFFF)
                                                   - (zlib.adler32(header[148:156]) & 0xFFFF) + 256):
                        raise _header_error("bad checksum", start, where)
                else:  # e.g. a UTF-8 name: exact sums of the two halves (each < 65521), as in _checksums
                    stored = int(header[148:154], 8)
                    if stored != (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - (
                            zlib.adler32(header[148:156]) & 0xFFFF) + 255 and stored not in _checksums(header):
                        raise _header_error("bad checksum", start, where)
                size = int(header[124:135], 8)
            else:
                size = _check_slowly(header, start, where)
            kind = header[156:157]
            if kind in _META:  # metadata for the next member, not a member
                padded = size + (-size) % BLOCK
                if f.end is not None and start + BLOCK + padded > f.end:
                    raise _truncated(f"{_META[kind]} header", start, max(0, f.end - start - BLOCK), size, padded, where)
                if size > max_member or (f.cap is not None and start + BLOCK + padded > f.cap):
                    raise _over_limit(f"{_META[kind]} header", start, size, padded, f, max_member, where)
                data = f.read_big(padded)
                if len(data) < padded:
                    raise _truncated(f"{_META[kind]} header", start, len(data), size, padded, where)
                if kind == b"L":
                    if name_over is None:  # tarfile: the name up to the first NUL of the padded blocks
                        name_over = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind != b"K":  # K: a long link target, nothing we read
                    records = _pax_records(data, size, start, where)
                    if kind == b"g":
                        # tarfile applies global records to every later member; refuse the ones that matter
                        for key in ("path", "size"):
                            if key in records:
                                raise _header_error(f"pax global header sets {key!r}", start, where)
                    else:
                        if name_over is None and "path" in records:
                            name_over = records["path"].decode("utf-8", "surrogateescape").rstrip("/")
                        if pax_size is None and "size" in records:
                            pax_size = _pax_size(records["size"], start, where)
                if meta_at < 0:
                    meta_at, meta_kind = start, kind
                continue
            if kind == b"S":
                raise _header_error("unsupported GNU sparse member", start, where)
            raw = header[:100].split(b"\0", 1)[0]
            regular = kind in _REGULAR
            if kind in _NO_DATA or (kind == b"\0" and raw.endswith(b"/")):  # (the latter: a V7 directory)
                padded = size = 0
                regular = False
            else:
                if pax_size is not None:
                    size = pax_size
                padded = size + (-size) % BLOCK
            if name_over is not None:
                name = name_over
            else:
                name = raw.decode("utf-8", "surrogateescape")
                if header[345]:  # the ustar prefix field, applied as tarfile does
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            meta_at, name_over, pax_size = -1, None, None
            if f.end is not None and start + BLOCK + padded > f.end:  # a size past the end: refused before reading
                raise _truncated(f"member {name!r}", start, max(0, f.end - start - BLOCK), size, padded, where)
            if size > max_member or (f.cap is not None and start + BLOCK + padded > f.cap):  # nor past a limit
                raise _over_limit(f"member {name!r}", start, size, padded, f, max_member, where)
            wanted = (
                regular
                and not name.endswith("/")
                and not (name.startswith("__") and (_SKIP_META.match(name) or ("/" not in name and name.endswith("__"))))
                and (select is None or select(name))
            )
            if wanted:
                data = f.read(padded) if padded <= _CHUNK else f.read_big(padded)
                if len(data) != padded:
                    raise _truncated(f"member {name!r}", start, len(data), size, padded, where)
                yield name, data[:size] if padded != size else data
            elif padded:
                got = f.skip(padded)
                if got != padded:
                    raise _truncated(f"member {name!r}", start, got, size, padded, where)
    finally:
        f.close()


def _truncated(what: str, start: int, got: int, size: int, padded: int, where: str) -> TarError:
    """A member (or metadata) whose data or padding runs past the end of the stream."""
    if got < size:
        return TarError(f"truncated tar: {what} at byte {start} has {got} of {size} bytes{where}")
    return TarError(f"truncated tar: {what} at byte {start} has its {size} bytes but only "
                    f"{got - size} of {padded - size} padding bytes{where}")


def _bytes(n: int) -> str:
    """``268435456 bytes (256 MiB)``: exact, and readable."""
    for shift, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if 1 << shift <= n < 1 << (shift + 10):
            return f"{n} bytes ({n / (1 << shift):.4g} {unit})"
    return f"{n} bytes"


def _over_limit(what: str, start: int, size: int, padded: int, f: _Reader, max_member: int, where: str) -> TarError:
    """A member (or metadata) larger than MAX_MEMBER_BYTES, or one that would take a compressed
    shard past MAX_DECOMPRESSED_BYTES: refused before its data are read."""
    if size > max_member:
        return TarError(f"{what} at byte {start} claims {_bytes(size)}, over the limit of {_bytes(max_member)} "
                        f"per member (MAX_MEMBER_BYTES){where}")
    return TarError(f"{f.codec} shard expands past the limit of {_bytes(f.cap or 0)} of tar data "
                    f"(MAX_DECOMPRESSED_BYTES): {what} at byte {start} would end at byte {start + BLOCK + padded}"
                    f"{where} (a decompression bomb?)")


# A shard's file name inside a path, URL, "pipe:aws s3 cp s3://b/train-000001.tar -" or file repr
# (also the reader's: SkipLog names shards with it).
SHARD_NAME = re.compile(r"([^/\s'\"<>=]+\.tar)(?![\w.])")


class _TimedPipe:
    """A webdataset ``gopen.Pipe`` read straight from its stdout's file descriptor, waiting at
    most ``timeout`` seconds for each byte (``poll``), with its own buffer.

    Replaces the Pipe's ``read`` (a buffered read, then a poll of the command's status): the
    Pipe's own buffer is never used (nothing has read it: ``url_opener`` only opens it). At
    the end of the data the command's exit status is checked as the Pipe checks it. On a
    stall the command and its children are killed and :class:`StalledRead` raised.
    """

    def __init__(self, pipe: Any, timeout: float, url: str):
        self.pipe, self.timeout, self.url = pipe, float(timeout), url
        self.fd = pipe.stream.fileno()
        self.poller = _select.poll()  # (not select(): it refuses descriptors past 1023, common in a trainer)
        self.poller.register(self.fd, _select.POLLIN | _select.POLLPRI)
        self.wait_ms = min(max(1, round(self.timeout * 1000)), 2**31 - 1)  # (poll takes a C int)
        self.buf, self.pos = b"", 0
        self.received = 0  # bytes the source has sent
        self.eof = False

    def _more(self) -> bytes:
        """The next bytes from the source, b"" at its end."""
        if self.eof:
            return b""
        if not self.poller.poll(self.wait_ms):  # (also returns at the end of the data: POLLHUP)
            self._stalled()
        chunk = os.read(self.fd, _PIPE_READ)
        if chunk:
            self.received += len(chunk)
            return chunk
        self.eof = True
        try:  # the write end is closed: the command has ended or is ending
            self.pipe.proc.wait(min(self.timeout, 5.0))
        except subprocess.TimeoutExpired:
            return b""  # still running with its stdout closed: close() deals with it
        self.pipe.wait_for_child()  # as gopen.Pipe.read: IOError for an exit status it does not ignore
        return b""

    def read(self, n: int = -1) -> bytes:
        buf, pos = self.buf, self.pos
        if 0 <= n <= len(buf) - pos:  # the usual case: served from the buffer
            self.pos = pos + n
            return buf[pos : pos + n]
        parts, got = [buf[pos:]], len(buf) - pos
        self.buf, self.pos = b"", 0
        while n < 0 or got < n:
            chunk = self._more()
            if not chunk:
                break
            if 0 <= n < got + len(chunk):  # keep the rest for the next read
                self.buf, self.pos = chunk, n - got
                parts.append(chunk[: n - got])
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def peek(self, n: int = 1) -> bytes:
        """At least n bytes (fewer only at the end of the data), without consuming them."""
        while len(self.buf) - self.pos < n:
            chunk = self._more()
            if not chunk:
                break
            self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return self.buf[self.pos :]

    def _stalled(self) -> None:
        _kill_command(self.pipe.proc)
        m = SHARD_NAME.search(self.url)
        shard = f"{m.group(1)}, " if m and m.group(1) != self.url else ""
        raise StalledRead(f"no data for {self.timeout:g} s from {self.url} ({shard}after byte {self.received}): "
                          f"the shard's source stalled")

    def close(self) -> None:
        """Closes the command's stdout and waits for it (a command still writing gets SIGPIPE); one
        that does not end within the timeout (5 s at most) is killed with its children."""
        pipe = self.pipe
        if pipe.stream.closed:
            return
        pipe.stream.close()
        try:
            pipe.status = pipe.proc.wait(min(self.timeout, 5.0))
        except subprocess.TimeoutExpired:
            _kill_command(pipe.proc)


def _kill_command(proc: subprocess.Popen) -> None:
    """Kills a ``pipe:``/curl command and every process it started (the shell's children hold
    the pipe too), and reaps it. Stopped first, so that no one forks or reaps in between."""
    if proc.returncode is not None:  # reaped already: its pid may be another process's by now
        return
    try:
        import psutil
    except ImportError:  # (a dependency of accelerate): the command alone
        psutil = None
    family: list = []
    if psutil is not None:
        try:
            top = psutil.Process(proc.pid)
            top.send_signal(signal.SIGSTOP)
            family = top.children(recursive=True)
            for p in family:
                p.send_signal(signal.SIGSTOP)
            family = top.children(recursive=True)  # any forked before it stopped
        except psutil.Error:  # it has exited (or is a zombie) already
            pass
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        pass


def with_read_timeout(stream: Any, url: str, timeout: float) -> Any:
    """``stream`` read with a stall timeout when it is a gopen Pipe reading a command's stdout."""
    proc, out = getattr(stream, "proc", None), getattr(stream, "stream", None)
    if not timeout or proc is None or out is None or getattr(proc, "stdout", None) is not out:
        return stream  # a local file, stdin, BytesIO: nothing to wait for
    if not hasattr(_select, "poll"):  # (not on Windows, where pipe: commands are rare): no timeout
        return stream
    return _TimedPipe(stream, timeout, url)


def close_quietly(stream: Any) -> None:
    """Closes a shard's stream once it is read, cut or abandoned (not stdin: url '-')."""
    if stream is None or stream is getattr(sys.stdin, "buffer", None):
        return
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - e.g. a pipe: command killed by SIGPIPE when closed early;
        pass  # webdataset's own Pipe.__del__ swallows the same, and the data were checked already


def tar_expander(
    data: Iterable[dict[str, Any]],
    handler: Callable[[Exception], bool],
    select_files: Callable[[str], bool] | None = None,
    *,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> Iterator[dict[str, Any]]:
    """WebDataset stage: opened shards (``url_opener`` output) -> ``{fname, data, __url__}``.

    Same contract as ``webdataset.tariterators.tar_file_expander``: an empty dict marks the
    end of each shard (so ``group_by_keys`` never merges samples across shards), and an
    error is passed to ``handler`` with the shard's URL appended to its args. Unlike it, each
    shard's stream is closed as soon as the shard is done, damaged or abandoned (webdataset
    leaves that to the garbage collector: "unclosed file" ResourceWarnings). A ``pipe:`` or
    http shard is read with a stall timeout of ``read_timeout_s`` seconds (0: none), and a
    :class:`StalledRead` is raised, never passed to the handler.
    """
    for source in data:
        url = source["url"]
        stream = None
        try:
            try:
                stream = with_read_timeout(source["stream"], url, read_timeout_s)
                for fname, payload in iter_tar(stream, select_files, url=url):
                    yield {"fname": fname, "data": payload, "__url__": url}
            finally:
                close_quietly(stream if stream is not None else source.get("stream"))
            yield {}
        except StalledRead:  # an outage, not damage: stops the reader (its message names the url)
            raise
        except Exception as exn:  # noqa: BLE001 - the handler decides
            exn.args = exn.args + (url,)
            if not handler(exn):
                break
            yield {}  # a sample cut by the damage must not merge with the next shard's first


def tar_samples(urls: Iterable[dict[str, Any]], *, handler: Callable[[Exception], bool],
                select_files: Callable[[str], bool] | None = None,
                read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """``wds.tarfile_to_samples`` with the fast reader: urls -> grouped samples.

    ``read_timeout_s``: the stall timeout of ``pipe:`` and http shards (see :func:`tar_expander`).
    """
    from webdataset.tariterators import group_by_keys, url_opener

    streams = url_opener(urls, handler=handler)
    return group_by_keys(tar_expander(streams, handler, select_files, read_timeout_s=read_timeout_s), handler=handler)
