"""The sparse formats of tar: where a sparse member's data regions lie.

GNU old sparse (type ``S``: four regions in the header, more in extension blocks)
and PAX GNU sparse 0.0 (repeated ``GNU.sparse.offset``/``numbytes`` records), 0.1
(``GNU.sparse.map``) and 1.0 (the map leads the member's data).  Each reads what it
needs through its :class:`~lamina.archive.reader.TarReader` and leaves on the entry
its real size and its regions, checked against the data the member stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lamina.archive.entry import BLOCK, Entry
from lamina.archive.fields import MAX_META, decode, num

if TYPE_CHECKING:
    from lamina.archive.reader import TarReader

MAX_SPARSE_ENTRIES = 1 << 16


def read_gnu_sparse(reader: TarReader, entry: Entry, header: bytes, offset: int) -> None:
    """An old GNU sparse member (``S``): its map from the header and extension blocks."""
    regions = _sparse_block(header[386:482], 4, offset)
    extended = header[482]
    while extended:
        block = reader._read_exact(BLOCK, "sparse header", entry.name)
        regions += _sparse_block(block[:504], 21, offset)
        extended = block[504]
        if len(regions) > MAX_SPARSE_ENTRIES:
            raise reader._error("too many sparse regions", entry.name)
    entry.size = num(header[483:495], "realsize", offset)
    _set_sparse(reader, entry, regions)


def _sparse_block(raw: bytes, count: int, offset: int) -> list[tuple[int, int]]:
    regions = []
    for i in range(count):
        field_ = raw[i * 24 : i * 24 + 24]
        if not field_.strip(b"\0"):
            break
        regions.append((num(field_[:12], "sparse offset", offset),
                        num(field_[12:], "sparse length", offset)))
    return regions


def read_pax_sparse(
    reader: TarReader, entry: Entry, pax: dict[str, bytes], pax_sparse: list[int], offset: int
) -> None:
    """A PAX GNU sparse member (0.0, 0.1 or 1.0): its real name, size and map."""
    if "GNU.sparse.name" in pax:
        entry.name = decode(pax["GNU.sparse.name"])
    real = pax.get("GNU.sparse.realsize", pax.get("GNU.sparse.size"))
    if real is None:
        raise reader._error("sparse file without a real size", entry.name)
    numbers: list[int]
    if pax.get("GNU.sparse.major") == b"1":
        numbers = _sparse_map_1_0(reader, entry)
    elif "GNU.sparse.map" in pax:
        text = pax["GNU.sparse.map"]
        numbers = [reader._pax_int(v, "GNU.sparse.map", offset) for v in text.split(b",")] if (
            text) else []
    else:
        numbers = pax_sparse
    if len(numbers) % 2 or len(numbers) > 2 * MAX_SPARSE_ENTRIES:
        raise reader._error("bad sparse map", entry.name)
    entry.size = reader._pax_int(real, "GNU.sparse.realsize", offset)
    _set_sparse(reader, entry, list(zip(numbers[::2], numbers[1::2], strict=True)))


def _sparse_map_1_0(reader: TarReader, entry: Entry) -> list[int]:
    # The map leads the member's data: decimal numbers, one per line, padded to a block.
    text = b""
    numbers: list[int] = []
    count: int | None = None
    used = 0
    while count is None or len(numbers) < 2 * count:
        if b"\n" not in text:
            if used >= entry.data_size or used > MAX_META:
                raise reader._error("bad sparse map", entry.name)
            text += reader._read_exact(BLOCK, "sparse map", entry.name)
            used += BLOCK
            continue
        line, _, text = text.partition(b"\n")
        try:
            number = int(line)
        except ValueError:
            raise reader._error("bad sparse map", entry.name) from None
        if count is None:
            if number < 0 or number > MAX_SPARSE_ENTRIES:
                raise reader._error("bad sparse map", entry.name)
            count = number
        else:
            numbers.append(number)
    entry.data_size -= used
    return numbers


def _set_sparse(reader: TarReader, entry: Entry, regions: list[tuple[int, int]]) -> None:
    end = 0
    stored = 0
    for off, length in regions:
        if off < end or length < 0 or off + length > entry.size:
            raise reader._error("bad sparse map", entry.name)
        end = off + length
        stored += length
    if stored != entry.data_size:
        raise reader._error("sparse map does not match the stored data", entry.name)
    entry.sparse = regions
