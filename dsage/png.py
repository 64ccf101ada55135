"""PNG images as rows of bytes, read and written with zlib and struct alone.

Enough of the format for rendered images: 8-bit greyscale, RGB, grey with
alpha and RGBA (16-bit samples too), not interlaced; every filter type is
read, and rows are written unfiltered (filter 0).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = ["Image", "PNGError", "decode", "encode", "read", "write"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: samples per pixel of each colour type
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


class PNGError(ValueError):
    """A PNG that is malformed, or uses what this module does not read."""


@dataclass
class Image:
    """Pixels as rows of bytes (``bytes_per_pixel`` bytes each, no filter byte)."""

    width: int
    height: int
    color_type: int
    bit_depth: int
    rows: list[bytes]

    @property
    def bytes_per_pixel(self) -> int:
        return _CHANNELS[self.color_type] * self.bit_depth // 8


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(_SIGNATURE):
        raise PNGError("not a PNG (no signature)")
    out, pos = [], len(_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length] or b"\0\0\0\0")
        if len(body) != length or zlib.crc32(kind + body) != crc:
            raise PNGError(f"chunk {kind!r} is truncated or damaged")
        out.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            return out
    raise PNGError("no IEND chunk: the file is truncated")


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(kind: int, row: bytearray, prior: bytes, bpp: int) -> None:
    n = len(row)
    if kind == 0:
        return
    if kind == 1:
        for i in range(bpp, n):
            row[i] = (row[i] + row[i - bpp]) & 0xFF
    elif kind == 2:
        for i in range(n):
            row[i] = (row[i] + prior[i]) & 0xFF
    elif kind == 3:
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + prior[i]) >> 1)) & 0xFF
    elif kind == 4:
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            upleft = prior[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + _paeth(left, prior[i], upleft)) & 0xFF
    else:
        raise PNGError(f"unknown filter type {kind}")


def decode(data: bytes) -> Image:
    """The pixels of a PNG file's bytes."""
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise PNGError("the first chunk is not a valid IHDR")
    width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if ctype not in _CHANNELS or depth not in (8, 16) or comp or filt:
        raise PNGError(f"colour type {ctype} at {depth} bits is not read here "
                       f"(8- or 16-bit grey, RGB, grey+alpha or RGBA)")
    if interlace:
        raise PNGError("interlaced PNGs are not read here")
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    bpp = _CHANNELS[ctype] * depth // 8
    stride = width * bpp
    if len(raw) != height * (stride + 1):
        raise PNGError(f"image data is {len(raw)} bytes, expected {height * (stride + 1)}")
    rows: list[bytes] = []
    prior = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = bytearray(raw[start + 1:start + 1 + stride])
        _unfilter(raw[start], row, prior, bpp)
        prior = bytes(row)
        rows.append(prior)
    return Image(width, height, ctype, depth, rows)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode(image: Image) -> bytes:
    """A PNG file's bytes for ``image`` (rows unfiltered, zlib level 9)."""
    stride = image.width * image.bytes_per_pixel
    if len(image.rows) != image.height or any(len(r) != stride for r in image.rows):
        raise PNGError(f"expected {image.height} rows of {stride} bytes")
    header = struct.pack(">IIBBBBB", image.width, image.height, image.bit_depth,
                         image.color_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\0" + r for r in image.rows), 9)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def read(path: str) -> Image:
    with open(path, "rb") as f:
        return decode(f.read())


def write(path: str, image: Image) -> None:
    with open(path, "wb") as f:
        f.write(encode(image))
