"""What an image file's bytes claim, counted before Pillow reads them.

Pillow reads the segments of a JPEG, the chunks of a PNG and the blocks of a GIF one at a time
in Python, and libjpeg makes one pass over the whole image per scan of a progressive JPEG. A
few MB of tiny segments therefore cost seconds and hundreds of MB before a pixel is decoded
(measured: 500,000 empty PNG chunks 4.6 s, 1.2 million GIF comment blocks 3.4 s and +500 MB,
a TIFF of 1,000,000 one-row strips 22 s and +400 MB, a progressive JPEG of thousands of scans
past ``responseTimeout``). :func:`check_structure`
counts them on the bytes, with C-speed scans where the data is large, and stops just past the
limit, so its cost is bounded whatever the body holds. Ordinary files are far inside the
limits: encoders write 2-4 JPEG scans (about 10 progressive), PNG data in 8-64 KB chunks, and a
GIF holds a few extension blocks before its first image.
"""

from __future__ import annotations

import re

from ts_handlers.errors import PayloadTooLarge

# Scans in one JPEG (each is a pass over the whole image when it is progressive).
MAX_JPEG_SCANS = 64
# And scans x pixels, in units of the model's max_image_pixels: a full-size image may have 16
# scans, a quarter-size one the 64 above. Measured on this 2-core AMD EPYC (Zen 3): a
# 4096 x 4096 progressive JPEG decodes in 0.29 s with 10 scans and 1.98 s with 64.
SCAN_PIXELS_PER_MAX_IMAGE = 16
# Segments of a JPEG, chunks of a PNG, blocks (sub-blocks included) of a GIF before its first
# image, and entries of a TIFF's first directory: each is a step of Pillow's Python reader.
MAX_SEGMENTS = 4096
# Strips or tiles of a TIFF's first image: Pillow makes and decodes one tile entry for each in
# Python (1,000,000 one-row strips, 4 MB: 22 s and +400 MB). One-row strips of a 16384-row
# image still fit, and encoders write strips of 8-64 KB.
MAX_TIFF_STRIPS = 16384
# TIFF tags that list one entry per strip or tile: StripOffsets, StripByteCounts,
# TileOffsets, TileByteCounts.
_TIFF_STRIP_TAGS = (273, 279, 324, 325)

# The next marker after a scan's entropy-coded data: 0xFF, then neither a stuffed 0x00 nor a
# restart marker (RST0-RST7) nor another 0xFF (fill).
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_HINT = "send the image re-encoded by an ordinary encoder"


def check_structure(data: bytes) -> int:
    """413 for a JPEG, PNG, GIF or TIFF with more segments (scans, strips) than the limits;
    other bytes pass unread. Malformed structure ends the count early: Pillow then says what is
    wrong. Returns the JPEG's scans (0 for other formats), for :func:`check_scan_work`."""
    scans = 0
    if data[:3] == b"\xff\xd8\xff":
        segments, scans = jpeg_counts(data)
        if scans > MAX_JPEG_SCANS:
            raise PayloadTooLarge(
                f"the JPEG has more than {MAX_JPEG_SCANS} scans (image_bytes.MAX_JPEG_SCANS); "
                "send it baseline or with an ordinary progressive script"
            )
        kind = "segments"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        segments, kind = png_chunks(data), "chunks"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        segments, kind = gif_blocks(data), "blocks before its first image"
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        segments, strips = tiff_counts(data)
        kind = "entries in its first directory"
        if strips > MAX_TIFF_STRIPS:
            raise PayloadTooLarge(
                f"the TIFF has {strips} strips or tiles, more than {MAX_TIFF_STRIPS} "
                f"(image_bytes.MAX_TIFF_STRIPS); {_HINT}"
            )
    else:
        return 0
    if segments > MAX_SEGMENTS:
        raise PayloadTooLarge(
            f"the image has more than {MAX_SEGMENTS} {kind} (image_bytes.MAX_SEGMENTS); {_HINT}"
        )
    return scans


def check_scan_work(scans: int, width: int, height: int, max_pixels: int) -> None:
    """413 when a JPEG's scans x pixels pass :data:`SCAN_PIXELS_PER_MAX_IMAGE` full-size
    images: the decode cost of a progressive JPEG, known from its header and scan count."""
    budget = SCAN_PIXELS_PER_MAX_IMAGE * max_pixels
    if scans > 1 and scans * width * height > budget:
        raise PayloadTooLarge(
            f"the JPEG is {width}x{height} in {scans} scans, and each scan is a pass over the "
            f"image: at most {budget} scan-pixels are decoded ({SCAN_PIXELS_PER_MAX_IMAGE} x "
            "max_image_pixels, image_bytes.SCAN_PIXELS_PER_MAX_IMAGE); send it baseline or "
            "smaller"
        )


def jpeg_counts(data: bytes) -> tuple[int, int]:
    """(segments, scans) of a JPEG, counting stops past :data:`MAX_SEGMENTS` or
    :data:`MAX_JPEG_SCANS`; it ends at EOI, so the further images of an MPO are not counted."""
    segments = scans = 0
    position, size = 2, len(data)  # after SOI
    while position + 3 < size and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        position += 2
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            continue
        segments += 1
        position += int.from_bytes(data[position : position + 2])
        if marker == 0xDA:  # SOS: skip the scan's entropy-coded data
            scans += 1
            found = _JPEG_NEXT_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
        if segments > MAX_SEGMENTS or scans > MAX_JPEG_SCANS:
            break
    return segments, scans


def png_chunks(data: bytes) -> int:
    """Chunks of a PNG up to IEND, counting stops past :data:`MAX_SEGMENTS`."""
    chunks, position, size = 0, 8, len(data)
    while position + 8 <= size and chunks <= MAX_SEGMENTS:
        chunks += 1
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + int.from_bytes(data[position : position + 4])
    return chunks


def gif_blocks(data: bytes) -> int:
    """Blocks and sub-blocks of a GIF before its first image descriptor, counting stops past
    :data:`MAX_SEGMENTS` (the image data after it is read by Pillow's C decoder)."""
    if len(data) < 13:
        return 0
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks, size = 0, len(data)
    while position < size and blocks <= MAX_SEGMENTS:
        introducer = data[position]
        if introducer != 0x21:  # an image descriptor, the trailer, or garbage: stop
            break
        position += 2  # introducer and label
        blocks += 1
        while position < size and blocks <= MAX_SEGMENTS:  # sub-blocks up to a 0 length
            length = data[position]
            position += 1 + length
            blocks += 1
            if length == 0:
                break
    return blocks


def tiff_counts(data: bytes) -> tuple[int, int]:
    """(entries, strips) of a TIFF's first directory (classic or BigTIFF): its tag entries
    (Pillow reads each in Python: 65,000 of them, 780 KB, took 1.8 s), and the most strips or
    tiles a strip or tile tag declares, read from the directory alone; 0 for what cannot be
    read (Pillow then decides)."""
    order = "little" if data[:2] == b"II" else "big"
    big = int.from_bytes(data[2:4], order) == 43
    offset_size, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)
    start = 8 if big else 4
    directory = int.from_bytes(data[start : start + offset_size], order)
    first = directory + count_size
    if directory < start + offset_size or first > len(data):
        return 0, 0
    # Only the entries the bytes hold: Pillow stops at the end of a shorter directory.
    entries = min(int.from_bytes(data[directory:first], order), (len(data) - first) // entry_size)
    most = 0
    for index in range(min(entries, MAX_SEGMENTS + 1)):
        entry = first + index * entry_size
        tag = int.from_bytes(data[entry : entry + 2], order)
        if tag in _TIFF_STRIP_TAGS:
            count = int.from_bytes(data[entry + 4 : entry + 4 + offset_size], order)
            most = max(most, count)
    return entries, most
