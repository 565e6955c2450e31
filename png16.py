"""An exact decoder for 8- and 16-bit PNGs, and PNG sizes from the header alone.

Pillow keeps only the high byte of 16-bit colour PNGs, which loses Synthia's class ids (16-bit RGB
labels, class id in the red channel); this decoder returns the samples as they are stored.

    ids = read_png('GT/LABELS/0000000.png', channels=[0])[..., 0]   # [H, W] uint16
    height, width = read_png_size('labels/x.png')                     # reads 33 bytes

Imports numpy, zlib and mic_runtime (for DataError) only.
"""
import zlib

import numpy as np

from mic_runtime import DataError

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel (3: palette index)


def _png_chunks(data, path):
    """Yield (type, body) of each chunk, checking lengths and CRCs."""
    if data[:8] != PNG_SIGNATURE:
        raise DataError(f'{path} is not a PNG file (bad signature)')
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], 'big')
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) < length or len(crc) < 4:
            raise DataError(f'{path} is truncated (chunk {kind!r} cut off); re-extract it from the download')
        if zlib.crc32(kind + body) != int.from_bytes(crc, 'big'):
            raise DataError(f'{path} is corrupt (CRC mismatch in chunk {kind!r}); re-extract it from the download')
        yield kind, body
        if kind == b'IEND':
            return
        pos += 12 + length
    raise DataError(f'{path} is truncated (no IEND chunk); re-extract it from the download')


def _png_header(body, path):
    width, height = int.from_bytes(body[0:4], 'big'), int.from_bytes(body[4:8], 'big')
    depth, colour, compression, filtering, interlace = body[8:13]
    if colour not in PNG_CHANNELS or compression != 0 or filtering != 0:
        raise DataError(f'{path}: unsupported PNG (colour type {colour}, compression {compression}, '
                        f'filter {filtering})')
    if depth not in ((8,) if colour == 3 else (8, 16)):
        raise DataError(f'{path}: unsupported PNG bit depth {depth} for colour type {colour} (need 8 or 16)')
    if interlace:
        raise DataError(f'{path} is an interlaced (Adam7) PNG, which this decoder does not read; re-save it '
                        f'without interlacing, e.g. `convert {path} -interlace none {path}` (ImageMagick)')
    return width, height, depth, PNG_CHANNELS[colour]


def read_png_size(path):
    """(height, width) from a PNG's header, without decoding it."""
    with open(path, 'rb') as f:
        data = f.read(33)
    if data[:8] != PNG_SIGNATURE or data[12:16] != b'IHDR':
        raise DataError(f'{path} is not a PNG file')
    return int.from_bytes(data[20:24], 'big'), int.from_bytes(data[16:20], 'big')


def read_png(path, channels=None):
    """Decode a non-interlaced 8- or 16-bit PNG exactly -> [H,W,C] uint8 or uint16 (palette: indices).

    channels: the channel indices to decode (e.g. [0] for Synthia's class ids); the others are skipped.
    """
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'cannot read {path}: {e}') from None
    header, idat = None, []
    for kind, body in _png_chunks(data, path):
        if kind == b'IHDR':
            header = _png_header(body, path)
        elif kind == b'IDAT':
            idat.append(body)
    if header is None or not idat:
        raise DataError(f'{path} has no IHDR or no IDAT chunk; re-extract it from the download')
    width, height, depth, nch = header
    nbytes = depth // 8
    try:
        raw = zlib.decompress(b''.join(idat))
    except zlib.error as e:
        raise DataError(f'{path}: corrupt image data ({e}); re-extract it from the download') from None
    if len(raw) != height * (1 + width * nch * nbytes):
        raise DataError(f'{path}: image data has {len(raw)} bytes, expected {height * (1 + width * nch * nbytes)}')
    channels = list(range(nch)) if channels is None else list(channels)
    lanes = [c * nbytes + b for c in channels for b in range(nbytes)]  # the bytes of the wanted samples
    try:
        px = unfilter(raw, height, width, nch * nbytes, lanes)  # (H, W, len(lanes)) uint8
    except ValueError as e:
        raise DataError(f'{path}: {e}') from None
    if nbytes == 1:
        return px
    return (px[..., 0::2].astype(np.uint16) << 8) | px[..., 1::2]  # big-endian samples


def unfilter(raw, height, width, bpp, lanes=None):
    """Undo the PNG row filters. raw: height rows of 1 filter byte + width * bpp bytes.

    Returns uint8 [height, width, len(lanes)]: the reconstructed byte lanes (default all bpp). Each
    byte depends only on the same lane of its left, upper and upper-left neighbours, so lanes can be
    decoded independently. Rows filtered with None / Sub / Up (below a finished row) are decoded one
    row at a time, vectorised along the row; the rest (Average, Paeth) in _unfilter_wavefront.
    """
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * bpp)
    types = rows[:, 0]
    if types.max(initial=0) > 4:
        raise ValueError(f'invalid PNG row filter type {types.max()} (the file is corrupt)')
    filt = rows[:, 1:].reshape(height, width, bpp)
    if lanes is not None:
        filt = filt[:, :, lanes]
    out = np.empty(filt.shape, np.uint8)
    done = np.zeros(height, bool)
    for r in range(height):
        t = types[r]
        if t == 0:  # None
            out[r] = filt[r]
        elif t == 1:  # Sub: running sum along the row, modulo 256 (uint8 wraps)
            np.cumsum(filt[r], axis=0, dtype=np.uint8, out=out[r])
        elif t == 2 and (r == 0 or done[r - 1]):  # Up below a finished row
            np.add(filt[r], out[r - 1] if r else 0, out=out[r], casting='unsafe')
        else:
            continue
        done[r] = True
    if not done.all():
        _unfilter_wavefront(filt, types, done, out)
    return out


def _chains(types, done):
    """The slots of the wavefront: per slot its image row (-1: the zeros above the image), its filter
    (0: a finished row) and its skew; each chain of pending rows starts with the finished row above it."""
    slots, kinds, skew = [], [], []
    s = 0
    for r in np.flatnonzero(~done):
        if r == 0 or done[r - 1]:  # a chain starts: its finished row above comes first
            slots.append(r - 1)
            kinds.append(0)
            skew.append(-1)
            s = 0
        slots.append(r)
        kinds.append(int(types[r]))
        skew.append(s)
        s += 1
    return np.array(slots), np.array(kinds), np.array(skew)


def _unfilter_wavefront(filt, types, done, out):
    """Decode the pending rows (Average, Paeth, and Up below a pending row) into `out`, in place.

    Pending rows form chains of consecutive rows; each chain is preceded by a finished row (or the
    zeros above the image). Row r at position s of its chain is skewed right by s: its pixel c is
    computed at step t = c + s, after (r, c-1) and (r-1, c) at step t-1 and (r-1, c-1) at t-2. One step
    computes one pixel of every pending row, so width + longest chain steps decode the image.
    """
    height, width, nl = filt.shape
    slots, kinds, skew = _chains(types, done)
    n, steps = len(slots), width + skew.max() + 2
    known = np.where(slots[:, None, None] >= 0, out[np.maximum(slots, 0)], 0)  # (n, width, nl)
    values = np.where((kinds == 0)[:, None, None], known, filt[np.maximum(slots, 0)])
    # skewed layout, flattened over (slot, lane): pixel c of slot i lives at [c + skew_i + 2, i * nl + lane]
    fy = np.zeros((steps, n, nl), np.int16)
    t_of = np.arange(width)[None, :] + skew[:, None] + 2  # (n, width)
    fy[t_of, np.arange(n)[:, None]] = values
    y = np.where((kinds == 0)[None, :, None], fy, 0).reshape(steps, n * nl)
    fy = fy.reshape(steps, n * nl)
    lane_kind = np.repeat(kinds, nl)[nl:]  # the filter of each (slot, lane) from slot 1 on
    masks = {k: lane_kind == k for k in (0, 2, 3, 4) if (lane_kind == k).any()}
    # buffers reused by every step (this loop is the decoder's hot spot)
    m = len(lane_kind)
    pred, pa, pb, pc = (np.zeros(m, np.int16) for _ in range(4))
    take_a, take_b = np.empty(m, bool), np.empty(m, bool)
    for t in range(2, steps):
        a, b, c = y[t - 1, nl:], y[t - 1, :-nl], y[t - 2, :-nl]  # left, up, up-left
        if 4 in masks:  # Paeth: of a, b, c the one closest to p = a + b - c (ties: a, then b)
            np.subtract(b, c, out=pa)  # p - a
            np.subtract(a, c, out=pb)  # p - b
            np.add(pa, pb, out=pc)  # p - c
            for dist in (pa, pb, pc):
                np.abs(dist, out=dist)
            np.less_equal(pb, pc, out=take_b)
            np.copyto(pred, c)
            np.copyto(pred, b, where=take_b)
            np.less_equal(pa, pb, out=take_a)
            np.less_equal(pa, pc, out=take_b)
            take_a &= take_b
            np.copyto(pred, a, where=take_a)
        if 3 in masks:  # Average
            np.copyto(pred, (a + b) >> 1, where=masks[3])
        if 2 in masks:  # Up
            np.copyto(pred, b, where=masks[2])
        if 0 in masks:  # finished rows keep their values
            np.copyto(pred, 0, where=masks[0])
        row = y[t, nl:]
        np.add(fy[t, nl:], pred, out=row)
        row &= 255
    y = y.reshape(steps, n, nl)
    pending = kinds > 0
    out[slots[pending]] = y[t_of[pending], np.flatnonzero(pending)[:, None]]
