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

Damage is an error, never a silently shorter shard: a header with a bad checksum, a
header or a member cut short, or a file that is not a tar raise :class:`TarError` naming
the byte offset (``tarfile`` stops without a word at a bad header past the first one).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from typing import IO, Any, Callable, Iterable, Iterator
from toolkit.errors import TarError

BLOCK = 512
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_COMPRESSED = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


class _Reader:
    """``read(n)`` returning exactly n bytes or fewer only at the end of the stream."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) == n:  # the usual case, one call
            self.offset += n
            return data
        while len(data) < n:  # pipes and sockets may return short reads
            more = self.stream.read(n - len(data))
            if not more:
                break
            data += more
        self.offset += len(data)
        return data

    def skip(self, n: int) -> int:
        """Discards n bytes; returns how many were there."""
        got = 0
        while got < n:
            chunk = self.read(min(n - got, 1 << 20))
            if not chunk:
                break
            got += len(chunk)
        return got


def _number(field: bytes, what: str, offset: int) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for values octal cannot hold
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"invalid tar header at byte {offset}: {what} field {text[:20]!r} is not a number") from None


def _check_header(header: bytes, start: int) -> None:
    """Raises TarError unless the header's checksum is right.

    The checksum is the sum of the header's bytes with its own 8-byte field read as spaces.
    A Python ``sum`` over 512 bytes costs ~4 µs, half of what the rest of a member costs,
    so the sum is first checked modulo 65521 via ``zlib.adler32`` (whose low half is
    1 + the byte sum mod 65521, in C): a damaged header passes that only if its byte sum
    moved by a multiple of 65521. Headers that fail it get the exact check, including the
    signed-byte checksums some old tar programs wrote.
    """
    try:
        stored = _number(header[148:156], "checksum", start)
    except TarError:
        stored = None
    field = sum(header[148:156])
    if stored is not None and (zlib.adler32(header) & 0xFFFF) == (1 + stored + field - 8 * 0x20) % 65521:
        return
    unsigned = sum(header) - field + 8 * 0x20
    if stored != unsigned and stored != unsigned - 256 * sum(1 for b in header if b > 127):
        what = "not a tar archive" if start == 0 else "invalid tar header (bad checksum)"
        raise TarError(f"{what} at byte {start}")


def _pax_records(data: bytes) -> dict[str, str]:
    """'<length> <key>=<value>\\n' records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _open_maybe_compressed(stream: IO[bytes]) -> _Reader:
    """Wraps gzip/bzip2/xz streams in their decompressor; plain tar passes through."""
    head = stream.peek(6)[:6] if hasattr(stream, "peek") else b""
    if not head:  # not peekable: read the magic and stitch it back in front
        head = stream.read(6)
        stream = _Prefixed(head, stream)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return _Reader(opener(stream))
    return _Reader(stream)


class _Prefixed:
    def __init__(self, prefix: bytes, stream: IO[bytes]):
        self.prefix, self.stream = prefix, stream

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            head, self.prefix = (self.prefix[:n], self.prefix[n:]) if n >= 0 else (self.prefix, b"")
            return head + (self.stream.read(n - len(head)) if n < 0 or len(head) < n else b"")
        return self.stream.read(n)


def iter_tar(stream: IO[bytes], select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in a tar stream, in archive order.

    Members rejected by ``select(name)`` are skipped without being held in memory.
    """
    f = _open_maybe_compressed(stream)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        start = f.offset
        header = f.read(BLOCK)
        if not header:
            if start == 0:
                raise TarError("empty file, not a tar archive")
            return  # end of stream without the end-of-archive blocks: what tarfile accepts too
        if len(header) < BLOCK:
            raise TarError(f"truncated tar: header at byte {start} has {len(header)} of {BLOCK} bytes")
        if header[0] == 0 and header.count(0) == BLOCK:
            return  # end-of-archive marker
        _check_header(header, start)
        kind = header[156:157]
        size = _number(header[124:136], "size", start)
        if "size" in pax:
            size = int(pax["size"])
        padded = size + (-size) % BLOCK
        if kind in (b"L", b"x", b"g", b"K"):  # metadata for the next member, not a member
            data = f.read(padded)[:size]
            if len(data) < size:
                raise TarError(f"truncated tar: member at byte {start} cut short")
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data)
            continue  # 'g' (global pax) and 'K' (long link target) change nothing we read
        if pax.get("path") is not None:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0" and header[345]:  # POSIX prefix field
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        wanted = (
            kind in _REGULAR
            and not name.endswith("/")
            and not (name.startswith("__") and _SKIP_META.match(name))
            and (select is None or select(name))
        )
        if wanted:
            data = f.read(padded)
            if len(data) < size:
                raise TarError(f"truncated tar: member {name!r} at byte {start} has {len(data)} of {size} bytes")
            yield name, data[:size] if padded != size else data
        elif f.skip(padded) < size:
            raise TarError(f"truncated tar: member {name!r} at byte {start} cut short")


def tar_expander(
    data: Iterable[dict[str, Any]],
    handler: Callable[[Exception], bool],
    select_files: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """WebDataset stage: opened shards (``url_opener`` output) -> ``{fname, data, __url__}``.

    Same contract as ``webdataset.tariterators.tar_file_expander``: an empty dict marks the
    end of each shard (so ``group_by_keys`` never merges samples across shards), and an
    error is passed to ``handler`` with the shard's URL appended to its args.
    """
    for source in data:
        url = source["url"]
        try:
            for fname, payload in iter_tar(source["stream"], select_files):
                yield {"fname": fname, "data": payload, "__url__": url}
            yield {}
        except Exception as exn:  # noqa: BLE001 - the handler decides
            exn.args = exn.args + (url,)
            if not handler(exn):
                break
            yield {}  # a sample cut by the damage must not merge with the next shard's first


def tar_samples(urls: Iterable[dict[str, Any]], *, handler: Callable[[Exception], bool],
                select_files: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """``wds.tarfile_to_samples`` with the fast reader: urls -> grouped samples."""
    from webdataset.tariterators import group_by_keys, url_opener

    streams = url_opener(urls, handler=handler)
    return group_by_keys(tar_expander(streams, handler, select_files), handler=handler)
