"""Convert GTA / Synthia / Cityscapes labels to train ids and write the rare-class-sampling statistics.

    python convert_labels.py gta data/gta [--nproc 8]
        labels/*.png (palette PNGs, index = Cityscapes label id) -> labels/*_labelTrainIds.png
    python convert_labels.py synthia data/synthia [--nproc 8]
        GT/LABELS/*.png (16-bit RGB, class id in R) -> GT/LABELS/*_labelTrainIds.png
    python convert_labels.py cityscapes data/cityscapes [--nproc 8]
        gtFine/{train,val}/<city>/*_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png

Each writes, in the dataset root, the statistics that rare class sampling reads, in the format of
the original MIC/DAFormer tools (so folders converted by either work with both):
    sample_class_stats.json       [{"<train id>": pixels, ..., "file": label path}, ...]
    sample_class_stats_dict.json  {label path: {"<train id>": pixels}}
    samples_with_class.json       {"<train id>": [[label path, pixels], ...]}
(Cityscapes: train split only.) Label ids outside the table become 255 (ignored) and are counted.
Re-runs skip outputs that are newer than their input and valid (--force converts everything again),
but always recount the statistics over all files. Every file is written to a temporary name and
renamed, so an interrupted run leaves no half-written output; run it again to finish.

From Python (mic_train.py does this for the demo data):
    summary = convert_dataset('gta', 'data/demo/gta', nproc=2)
"""
import argparse
import multiprocessing
import os
import re
import zlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from mic_config import exit_error
from mic_data import (CS_ID_TO_TRAIN_ID, IGNORE_INDEX, SYNTHIA_ID_TO_TRAIN_ID, DataError, id_lut, save_json,
                      save_png)

NUM_CLASSES = 19
TRAIN_ID_SUFFIX = '_labelTrainIds.png'

# --------------------------------------------------------------------------
# A PNG decoder for the 16-bit Synthia labels (Pillow keeps only their high bytes)
# --------------------------------------------------------------------------

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


def _unfilter_wavefront(filt, types, done, out):
    """Decode the pending rows (Average, Paeth, and Up below a pending row) into `out`, in place.

    Pending rows form chains of consecutive rows; each chain is preceded by a finished row (or the
    zeros above the image). Row r at position s of its chain is skewed right by s: its pixel c is
    computed at step t = c + s, after (r, c-1) and (r-1, c) at step t-1 and (r-1, c-1) at t-2. One step
    computes one pixel of every pending row, so width + longest chain steps decode the image.
    """
    height, width, nl = filt.shape
    slots, kinds, skew = [], [], []  # per slot: image row (-1: zeros), filter (0: finished), skew
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
    slots, kinds, skew = np.array(slots), np.array(kinds), np.array(skew)
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


# --------------------------------------------------------------------------
# Converting one file
# --------------------------------------------------------------------------

# id -> train id lookup tables; Synthia ids are 16-bit (also read correctly from 8-bit files)
LUTS = {'gta': id_lut(CS_ID_TO_TRAIN_ID), 'cityscapes': id_lut(CS_ID_TO_TRAIN_ID),
        'synthia': id_lut(SYNTHIA_ID_TO_TRAIN_ID, size=65536)}


def _read_ids(kind, path):
    """The raw label ids of one file: uint8 (GTA / Cityscapes) or uint16 (Synthia) [H,W]."""
    if kind == 'synthia':
        return read_png(path, channels=[0])[..., 0]
    try:
        with Image.open(path) as img:
            mode, ids = img.mode, np.array(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f'cannot read label {path}: {e}; re-extract it from the download') from None
    if mode not in ('P', 'L'):
        raise DataError(f'label {path} has mode {mode!r}; {kind} labels must be 8-bit PNGs whose pixel '
                        f'values (palette indices for mode P) are Cityscapes label ids')
    return ids


def _valid_output(kind, src, dst):
    """An existing output newer than its input, of the same size, holding only train ids (or 255)."""
    try:
        if os.path.getmtime(dst) < os.path.getmtime(src):
            return None
        if kind == 'synthia':
            size = read_png_size(src)
        else:
            with Image.open(src) as img:
                size = img.size[::-1]
        with Image.open(dst) as img:
            if img.mode != 'L' or img.size[::-1] != tuple(size):
                return None
            label = np.asarray(img)  # decodes; a truncated file raises here
    except (OSError, SyntaxError, ValueError, DataError):
        return None
    counts = np.bincount(label.ravel(), minlength=256)
    return counts if not counts[NUM_CLASSES:IGNORE_INDEX].any() else None


def convert_file(kind, src, dst, force=False):
    """Convert one label file (unless a valid output exists) -> (pixel counts [256], converted: bool)."""
    counts = None if force else _valid_output(kind, src, dst)
    if counts is not None:
        return counts, False
    ids = _read_ids(kind, src)
    label = LUTS[kind][ids]  # (H, W) uint8 train ids
    save_png(dst, label, mode='L')
    return np.bincount(label.ravel(), minlength=256), True


def _convert_task(task):
    kind, src, dst, force = task
    counts, converted = convert_file(kind, src, dst, force)
    return counts[:NUM_CLASSES].tolist(), int(counts[IGNORE_INDEX]), converted


# --------------------------------------------------------------------------
# Converting a dataset
# --------------------------------------------------------------------------

_LAYOUT = {
    'gta': '{root}/images/*.png and {root}/labels/*.png as extracted from the GTA download '
           '(labels: 8-bit palette PNGs of Cityscapes label ids)',
    'synthia': '{root}/RGB/*.png and {root}/GT/LABELS/*.png as extracted from SYNTHIA-RAND-CITYSCAPES '
               '(labels: 16-bit RGB PNGs, class id in R)',
    'cityscapes': '{root}/leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png and '
                  '{root}/gtFine/{{train,val}}/<city>/*_gtFine_labelIds.png from leftImg8bit_trainvaltest.zip '
                  'and gtFine_trainvaltest.zip',
}
_TEMP = re.compile(r'^\..+\.png\.[0-9a-f]{8}\.tmp$')  # leftovers of mic_data.atomic_write


def _folder(path, what, kind, root):
    if not os.path.isdir(path):
        raise DataError(f'{root} has no {what} folder; expected {_LAYOUT[kind].format(root=root.rstrip("/"))}')
    return path


def _remove_temp_files(folder):
    for name in os.listdir(folder):
        if _TEMP.match(name):
            os.remove(os.path.join(folder, name))


def list_label_files(kind, root):
    """[(input, output, counted in the statistics)] of a dataset, sorted."""
    if not os.path.isdir(root):
        raise DataError(f'dataset root {root} does not exist; expected {_LAYOUT[kind].format(root=root.rstrip("/"))}')
    files = []
    if kind in ('gta', 'synthia'):
        folder = _folder(os.path.join(root, 'labels' if kind == 'gta' else os.path.join('GT', 'LABELS')),
                         'labels/' if kind == 'gta' else 'GT/LABELS/', kind, root)
        _remove_temp_files(folder)
        for name in sorted(os.listdir(folder)):
            if name.endswith('.png') and not name.endswith(TRAIN_ID_SUFFIX) and not name.startswith('.'):
                files.append((os.path.join(folder, name), os.path.join(folder, name[:-4] + TRAIN_ID_SUFFIX), True))
    elif kind == 'cityscapes':
        gt = _folder(os.path.join(root, 'gtFine'), 'gtFine/', kind, root)
        _folder(os.path.join(gt, 'train'), 'gtFine/train/', kind, root)
        for split in ('train', 'val'):
            if not os.path.isdir(os.path.join(gt, split)):
                continue
            for dirpath, dirnames, names in os.walk(os.path.join(gt, split)):
                dirnames.sort()
                _remove_temp_files(dirpath)
                for name in sorted(names):
                    if name.endswith('_gtFine_labelIds.png'):
                        out = name[:-len('_labelIds.png')] + TRAIN_ID_SUFFIX
                        files.append((os.path.join(dirpath, name), os.path.join(dirpath, out), split == 'train'))
    else:
        raise DataError(f'unknown dataset kind {kind!r}; choose gta, synthia or cityscapes')
    if not files:
        what = {'gta': 'labels/*.png', 'synthia': 'GT/LABELS/*.png', 'cityscapes': 'gtFine/*/*/*_gtFine_labelIds.png'}
        raise DataError(f'no label files {what[kind]} in {root}; '
                        f'expected {_LAYOUT[kind].format(root=root.rstrip("/"))}')
    return sorted(files)


def write_class_stats(root, stats):
    """Write the three RCS statistics files; stats = [(label path, counts per train id)] in file order."""
    sample_class_stats, per_file, with_class = [], {}, {}
    for path, counts in stats:
        present = {str(c): int(n) for c, n in enumerate(counts) if n > 0}  # JSON keys are strings
        sample_class_stats.append({**present, 'file': path})
        per_file[path] = present
        for c, n in present.items():
            with_class.setdefault(c, []).append([path, n])  # keys in order of first appearance
    save_json(os.path.join(root, 'sample_class_stats.json'), sample_class_stats)
    save_json(os.path.join(root, 'sample_class_stats_dict.json'), per_file)
    save_json(os.path.join(root, 'samples_with_class.json'), with_class)


def convert_dataset(kind, root, nproc=1, progress=True, force=False):
    """Convert a dataset folder in place and write its RCS statistics to `root`.

    Returns a summary dict: files, converted, skipped (valid outputs kept), unmapped_pixels (pixels
    whose id is outside the table, now 255), stats_files (files counted in the statistics), and
    class_pixels (total pixels per train id over those files).
    """
    files = list_label_files(kind, root)
    tasks = [(kind, src, dst, force) for src, dst, _ in files]
    bar = dict(total=len(tasks), desc=f'{kind} labels', unit='file', disable=not progress)
    if nproc > 1:
        chunk = max(1, min(16, len(tasks) // (4 * nproc)))
        with multiprocessing.get_context('spawn').Pool(nproc) as pool:
            results = list(tqdm(pool.imap(_convert_task, tasks, chunksize=chunk), **bar))
    else:
        results = [_convert_task(t) for t in tqdm(tasks, **bar)]
    stats = []
    for (_, dst, counted), (counts, _, _) in zip(files, results):
        if counted:
            # the original tools name files by os.path.join(root as given, ...); so do we
            stats.append((dst, counts))
    write_class_stats(root, stats)
    converted = sum(r[2] for r in results)
    return {'kind': kind, 'root': root, 'files': len(files), 'converted': converted,
            'skipped': len(files) - converted, 'unmapped_pixels': sum(r[1] for r in results),
            'stats_files': len(stats),
            'class_pixels': np.sum([c for _, c in stats], axis=0, dtype=np.int64).tolist() if stats else [0] * 19}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert GTA / Synthia / Cityscapes labels to train ids (in place) and write the rare class '
                    'sampling statistics (sample_class_stats.json, sample_class_stats_dict.json, '
                    'samples_with_class.json) to the dataset root.',
        epilog='examples: python convert_labels.py gta data/gta --nproc 8 | '
               'python convert_labels.py cityscapes data/cityscapes')
    parser.add_argument('kind', choices=('gta', 'synthia', 'cityscapes'), help='dataset format')
    parser.add_argument('root', help='dataset folder, e.g. data/gta')
    parser.add_argument('--nproc', type=int, default=1, help='worker processes (default 1)')
    parser.add_argument('--force', action='store_true', help='convert again even where a valid output exists')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    try:
        s = convert_dataset(args.kind, args.root, nproc=args.nproc, progress=not args.quiet, force=args.force)
    except DataError as e:
        exit_error(e)
    total = sum(s['class_pixels'])
    print(f'{s["files"]} label files: {s["converted"]} converted, {s["skipped"]} already up to date; '
          f'{s["unmapped_pixels"]} pixels had ids outside the table and are ignored (255)')
    print(f'statistics over {s["stats_files"]} files ({total} labelled pixels) written to '
          f'{os.path.join(args.root, "sample_class_stats.json")}, sample_class_stats_dict.json, '
          f'samples_with_class.json')


if __name__ == '__main__':
    main()
