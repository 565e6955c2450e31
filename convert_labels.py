"""Convert labels to train ids and write the rare-class-sampling statistics: GTA / Synthia / Cityscapes,
and your own data (any classes, label ids or RGB colours) in the folder layout.

    python convert_labels.py gta data/gta [--nproc 8]
        labels/*.png (palette PNGs, index = Cityscapes label id) -> labels/*_labelTrainIds.png
    python convert_labels.py synthia data/synthia [--nproc 8]
        GT/LABELS/*.png (16-bit RGB, class id in R) -> GT/LABELS/*_labelTrainIds.png
    python convert_labels.py cityscapes data/cityscapes [--nproc 8]
        gtFine/{train,val}/<city>/*_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png
    python convert_labels.py folder data/mine/source --img-dir images --label-dir labels --label-suffix .png \
            --id-map map.yaml [--img-suffix .jpg] [--nproc 8]
        labels/<name>.png (raw ids or RGB colours, mapped by map.yaml) -> labels/<name>_labelTrainIds.png,
        for the images images/<name>.jpg (same relative path; without --img-dir/--label-dir the
        images and labels lie side by side under the root, told apart by their suffixes). With
        --num-classes K instead of --id-map the labels hold train ids 0..K-1 already (and
        --ignore-index, default 255, for unlabelled pixels): they are checked and counted.

map.yaml, the mapping file of the folder layout (every value found in the labels must be listed):
    format: rgb              # rgb: colour-coded labels; id (default): one value per pixel, 8 or 16 bits
    classes:                 # train id: the raw value of that class, or a list of values
      0: [255, 255, 255]     # impervious surfaces (rgb: [r, g, b] or '#ffffff'; id: 7 or [7, 8])
      1: [0, 0, 255]         # building
    ignore: [[255, 0, 0]]    # values of unlabelled pixels, written as 255
Train ids run from 0 to K-1 without gaps; name the K classes in the training config (data.classes).

Each writes, in the dataset root, the statistics that rare class sampling reads, in the format of
the original MIC/DAFormer tools (so folders converted by either work with both):
    sample_class_stats.json       [{"<train id>": pixels, ..., "file": label path}, ...]
    sample_class_stats_dict.json  {label path: {"<train id>": pixels}}
    samples_with_class.json       {"<train id>": [[label path, pixels], ...]}
(Cityscapes: train split only.) Label ids outside the table become 255 (ignored) and are counted;
in the folder layout they are an error instead, naming the files and the values found, and the
images and labels must pair up one to one, each label of its image's size.
Re-runs skip outputs that are newer than their input (and the mapping file) and valid (--force
converts everything again), but always recount the statistics over all files. Every file is written
to a temporary name and renamed, so an interrupted run leaves no half-written output; run it again
to finish. The statistics are written only when every file converted.

From Python (mic_train.py does this for the demo data):
    summary = convert_dataset('gta', 'data/demo/gta', nproc=2)
    summary = convert_folder('data/mine/source', '.png', id_map='map.yaml', img_dir='images', label_dir='labels')
"""
import argparse
import dataclasses
import multiprocessing
import os
import re

import numpy as np
from PIL import Image

from mic_data import CS_ID_TO_TRAIN_ID, IGNORE_INDEX, SYNTHIA_ID_TO_TRAIN_ID, id_lut, save_png
from mic_layouts import TRAIN_ID_SUFFIX, scan_files
from mic_report import progress_bar
from mic_runtime import DataError, exit_error, is_temp_file, save_json
from png16 import read_png, read_png_size

NUM_CLASSES = 19

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
_TEMP = re.compile(r'^\..+\.png\.[0-9a-f]{8}\.tmp$')  # leftovers of mic_runtime.atomic_write


def _not_a_folder(path):
    """Why `path` (not a folder) cannot be a dataset root."""
    return 'is a file, not a folder: pass the folder that holds the dataset' if os.path.exists(path) else 'does not exist'


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
        raise DataError(f'dataset root {root} {_not_a_folder(root)}; expected '
                        f'{_LAYOUT[kind].format(root=root.rstrip("/"))}')
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
            results = list(progress_bar(pool.imap(_convert_task, tasks, chunksize=chunk), **bar))
    else:
        results = [_convert_task(t) for t in progress_bar(tasks, **bar)]
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


# --------------------------------------------------------------------------
# Your own data: the folder layout, raw ids or RGB colours mapped by a mapping file
# --------------------------------------------------------------------------

FOLDER_FORMATS = ('id', 'rgb')


@dataclasses.dataclass(frozen=True)
class IdMap:
    """A mapping file, parsed: raw value -> train id (IGNORE_INDEX for ignored values).

    Raw values are ints: the id itself (format id), or r << 16 | g << 8 | b (format rgb).
    path None: the identity on 0..num_classes-1 with ignore_value (labels of train ids already).
    """
    path: object
    format: str
    values: dict
    num_classes: int

    def describe(self, value):
        if self.format == 'rgb':
            return f'({value >> 16}, {(value >> 8) & 255}, {value & 255})'
        return str(value)


def _map_error(path, key, text):
    return DataError(f'mapping file {path}: {key}: {text}')


def _map_value(path, key, value, fmt):
    """The raw values (ints) of one entry of the mapping file."""
    if fmt == 'rgb':
        if isinstance(value, str):
            m = re.fullmatch(r'#?([0-9a-fA-F]{6})', value.strip())
            if m:
                return [int(m.group(1), 16)]
        elif isinstance(value, (list, tuple)) and value:
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                if len(value) == 3 and all(0 <= v <= 255 for v in value):
                    return [value[0] << 16 | value[1] << 8 | value[2]]
            elif all(isinstance(v, (list, tuple, str)) for v in value):
                return [c for i, v in enumerate(value) for c in _map_value(path, f'{key}[{i}]', v, fmt)]
        raise _map_error(path, key, f'expected an RGB colour [r, g, b] (0..255) or \'#rrggbb\', or a list of them, '
                                    f'got {value!r}')
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return [value]
    hint = ' (colour-coded labels need format: rgb)' if isinstance(value, (list, tuple)) and len(value) == 3 else ''
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                          and 0 <= v <= 65535 for v in value):
        if len(set(value)) < len(value):
            raise _map_error(path, key, f'a label id is listed twice in {value!r}{hint}')
        return list(value)
    raise _map_error(path, key, f'expected a label id 0..65535 or a list of them, got {value!r}{hint}')


def read_id_map(path):
    """Parse and check a mapping file (see the module docstring) -> IdMap. DataError names the file and the key."""
    import yaml
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise DataError(f'mapping file {path} does not exist') from None
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f'cannot read the mapping file {path}: {e}') from None
    if not isinstance(doc, dict):
        raise DataError(f'mapping file {path} must hold a mapping with the keys format, classes and ignore '
                        f'(see python convert_labels.py --help)')
    unknown = sorted(set(doc) - {'format', 'classes', 'ignore'})
    if unknown:
        raise _map_error(path, unknown[0], 'unknown key; the keys are format, classes, ignore')
    fmt = doc.get('format', 'id')
    if fmt not in FOLDER_FORMATS:
        raise _map_error(path, 'format', f'expected id or rgb, got {fmt!r}')
    classes = doc.get('classes')
    if not isinstance(classes, dict) or not classes:
        raise _map_error(path, 'classes', 'expected a mapping train id -> raw value(s), e.g. {0: [255, 255, 255]}')
    ids = []
    for k in classes:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < IGNORE_INDEX:
            raise _map_error(path, f'classes.{k}', f'the keys are train ids 0..{IGNORE_INDEX - 1}, got {k!r}')
        ids.append(k)
    K = max(ids) + 1
    gaps = sorted(set(range(K)) - set(ids))
    if gaps:
        raise _map_error(path, 'classes', f'train ids run from 0 to {K - 1} without gaps; {gaps[0]} is missing')
    values, source = {}, {}
    entries = [(f'classes.{k}', classes[k], k) for k in sorted(ids)]
    if doc.get('ignore') is not None:
        ignore = doc['ignore']
        if fmt == 'rgb' and isinstance(ignore, (list, tuple)) and ignore and all(isinstance(v, int) for v in ignore):
            ignore = [ignore]  # one colour
        if fmt == 'id' and isinstance(ignore, int):
            ignore = [ignore]
        entries.append(('ignore', ignore, IGNORE_INDEX))
    for key, value, train_id in entries:
        for v in _map_value(path, key, value, fmt):
            if v in values:
                shown = IdMap(path, fmt, {}, K).describe(v)
                raise _map_error(path, key, f'value {shown} is listed under {source[v]} already')
            values[v], source[v] = train_id, key
    return IdMap(path, fmt, values, K)


def identity_map(num_classes, ignore_index=IGNORE_INDEX):
    """The IdMap of labels that hold train ids 0..num_classes-1 already (ignore_index: unlabelled)."""
    if not 1 <= num_classes < IGNORE_INDEX + 1:
        raise DataError(f'--num-classes must be in 1..{IGNORE_INDEX}, got {num_classes}')
    if not num_classes <= ignore_index <= 65535:
        raise DataError(f'--ignore-index {ignore_index} must be >= --num-classes {num_classes} (train ids '
                        f'0..{num_classes - 1} are classes)')
    return IdMap(None, 'id', {**{c: c for c in range(num_classes)}, ignore_index: IGNORE_INDEX}, num_classes)


def _read_raw(path, fmt, map_path):
    """The raw values of a label file: int array [H,W] (format id: the ids; rgb: r << 16 | g << 8 | b)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if fmt == 'rgb':
                if mode in ('P', 'PA', 'RGBA', 'LA') or mode.startswith('RGB'):
                    arr = np.asarray(img.convert('RGB')).astype(np.int32)
                    return arr[..., 0] << 16 | arr[..., 1] << 8 | arr[..., 2]
            elif mode in ('L', 'P', '1') or mode.startswith('I'):
                return np.asarray(img).astype(np.int64)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f'cannot read label {path}: {e}') from None
    if fmt == 'rgb':
        raise DataError(f'label {path} has mode {mode!r}, not a colour image, but {map_path} has format: rgb; '
                        f'for single-channel label ids set format: id')
    if not mode.startswith('RGB'):
        raise DataError(f'label {path} has mode {mode!r}: labels are PNGs of label ids (8 or 16 bits, or palette '
                        f'indices) or of RGB colours')
    where = f'{map_path} has format: id' if map_path else '--num-classes expects train ids'
    raise DataError(f'label {path} has mode {mode!r} (a colour image), but {where}; for colour-coded labels '
                    f'write a mapping file with format: rgb and pass it as --id-map')


def map_label(raw, id_map):
    """Raw values [H,W] -> (train ids uint8 [H,W], unknown: {raw value: pixels}); unknown pixels -> 255."""
    uniq, inverse = np.unique(raw, return_inverse=True)
    lut = np.array([id_map.values.get(int(v), -1) for v in uniq], np.int32)
    unknown = {}
    if (lut < 0).any():
        counts = np.bincount(inverse.ravel(), minlength=len(uniq))
        unknown = {int(uniq[i]): int(counts[i]) for i in np.flatnonzero(lut < 0)}
        lut = np.where(lut < 0, IGNORE_INDEX, lut)
    return lut.astype(np.uint8)[inverse].reshape(raw.shape), unknown


def _image_size(path):
    try:
        with Image.open(path) as img:
            return img.size  # (w, h), from the header
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f'cannot read image {path}: {e}') from None


def _valid_folder_output(src, dst, id_map):
    """Pixel counts [256] of an existing output newer than its input and the mapping file, of the
    input's size, holding only train ids (or 255); else None."""
    try:
        newest = max(os.path.getmtime(src), os.path.getmtime(id_map.path) if id_map.path else 0)
        if os.path.getmtime(dst) < newest:
            return None
        with Image.open(src) as img:
            size = img.size
        with Image.open(dst) as img:
            if img.mode != 'L' or img.size != size:
                return None
            label = np.asarray(img)
    except (OSError, SyntaxError, ValueError):
        return None
    counts = np.bincount(label.ravel(), minlength=256)
    return counts if not counts[id_map.num_classes:IGNORE_INDEX].any() else None


def convert_folder_file(img, src, dst, id_map, force=False):
    """Check and convert one label of the folder layout -> (counts [256], converted: bool).
    DataError for a label whose size differs from its image's or that holds values not in id_map."""
    label_size, img_size = _image_size(src), _image_size(img)
    if label_size != img_size:
        raise DataError(f'label {src} is {label_size[0]}x{label_size[1]} but its image {img} is '
                        f'{img_size[0]}x{img_size[1]}; a label must have its image\'s size')
    counts = None if force or src == dst else _valid_folder_output(src, dst, id_map)
    if counts is not None:
        return counts, False
    label, unknown = map_label(_read_raw(src, id_map.format, id_map.path), id_map)
    if unknown:
        raise UnmappedValues(src, unknown)
    if src != dst:
        save_png(dst, label, mode='L')
    return np.bincount(label.ravel(), minlength=256), src != dst


class UnmappedValues(DataError):
    """A label holds values the mapping does not list: {value: pixels} of one file."""

    def __init__(self, path, unknown):
        super().__init__(f'label {path} holds values not in the mapping: {unknown}')
        self.path, self.unknown = path, unknown


def _convert_folder_task(task):
    img, src, dst, id_map, force = task
    try:
        counts, converted = convert_folder_file(img, src, dst, id_map, force)
    except UnmappedValues as e:
        return {'unknown': e.unknown}
    except DataError as e:
        return {'error': str(e)}
    return {'counts': counts.tolist(), 'converted': converted}


def list_folder_labels(root, label_suffix, img_suffix='.png', img_dir=None, label_dir=None):
    """[(image, raw label, train-id output)] of a dataset in the folder layout, sorted by image.

    Labels lie at the image's path relative to ROOT/img_dir, under ROOT/label_dir (default: beside
    the images), with img_suffix replaced by label_suffix; outputs beside the labels with
    label_suffix replaced by _labelTrainIds.png. DataError for a missing folder, images without a
    label and labels without an image (naming the first ones and the counts).
    """
    if not os.path.isdir(root):
        raise DataError(f'dataset root {root} {_not_a_folder(root)}')
    img_root = os.path.join(root, img_dir) if img_dir else root
    lbl_root = os.path.join(root, label_dir) if label_dir else img_root
    for folder, what in ((img_root, '--img-dir'), (lbl_root, '--label-dir')):
        if not os.path.isdir(folder):
            raise DataError(f'folder {folder} ({what}) does not exist')
    if lbl_root == img_root and label_suffix == img_suffix:
        raise DataError(f'labels beside the images need another suffix than the images ({img_suffix!r}): '
                        f'give --label-suffix (e.g. _mask.png), or put the labels in their own folder (--label-dir)')
    labels = [p for p in scan_files(lbl_root, label_suffix, True)
              if label_suffix == TRAIN_ID_SUFFIX or not p.endswith(TRAIN_ID_SUFFIX)]
    lbl_inside = lbl_root != img_root and os.path.commonpath(
        [os.path.abspath(lbl_root), os.path.abspath(img_root)]) == os.path.abspath(img_root)
    images = [p for p in scan_files(img_root, img_suffix, True)
              if not (lbl_root == img_root and p.endswith(label_suffix)) and not p.endswith(TRAIN_ID_SUFFIX)
              and not (lbl_inside and os.path.commonpath([os.path.abspath(p), os.path.abspath(lbl_root)])
                       == os.path.abspath(lbl_root))]
    if not images:
        raise DataError(f'no images ending with {img_suffix!r} under {img_root} (set --img-suffix and --img-dir)')
    if not labels:
        raise DataError(f'no labels ending with {label_suffix!r} under {lbl_root} (set --label-suffix and --label-dir)')
    by_stem = {os.path.relpath(p, lbl_root)[:-len(label_suffix)]: p for p in labels}
    stems = {os.path.relpath(p, img_root)[:-len(img_suffix)]: p for p in images}
    missing = [stems[s] for s in sorted(stems) if s not in by_stem]
    orphans = [by_stem[s] for s in sorted(by_stem) if s not in stems]
    counts = f'{len(images)} images ending with {img_suffix!r} under {img_root}, {len(labels)} labels ending with ' \
             f'{label_suffix!r} under {lbl_root}'
    if missing:
        stem = os.path.relpath(missing[0], img_root)[:-len(img_suffix)]
        raise DataError(f'{len(missing)} image(s) have no label ({counts}), e.g. {missing[0]}: expected '
                        f'{os.path.join(lbl_root, stem + label_suffix)}')
    if orphans:
        stem = os.path.relpath(orphans[0], lbl_root)[:-len(label_suffix)]
        raise DataError(f'{len(orphans)} label(s) have no image ({counts}), e.g. {orphans[0]}: expected '
                        f'{os.path.join(img_root, stem + img_suffix)}')
    return [(stems[s], by_stem[s], by_stem[s][:-len(label_suffix)] + TRAIN_ID_SUFFIX) for s in sorted(stems)]


def _unmapped_message(id_map, unknown, files):
    """One line: the values missing from the mapping, with their pixels and files."""
    where = f'the mapping file {id_map.path}' if id_map.path else \
        f'the train ids 0..{id_map.num_classes - 1} (--num-classes {id_map.num_classes}) and the ignore value'
    parts = []
    for v, (pixels, paths) in sorted(unknown.items(), key=lambda kv: -kv[1][0])[:12]:
        parts.append(f'{id_map.describe(v)} ({pixels} pixels in {len(paths)} file(s), e.g. {paths[0]})')
    more = f', and {len(unknown) - 12} more values' if len(unknown) > 12 else ''
    fix = 'add each to a class under classes: or to ignore:' if id_map.path else \
        'convert them with a mapping file (--id-map)'
    return (f'{len(files)} label file(s) hold values not in {where}: {"; ".join(parts)}{more}. {fix}; '
            f'no statistics were written (the files converted so far are complete; a re-run converts the rest)')


def convert_folder(root, label_suffix, img_suffix='.png', img_dir=None, label_dir=None, id_map=None,
                   num_classes=None, ignore_index=IGNORE_INDEX, nproc=1, progress=True, force=False):
    """Convert a dataset in the folder layout (your own data) and write its RCS statistics to `root`.

    id_map: a mapping file (or IdMap), raw values -> train ids; or num_classes (and ignore_index)
    for labels that hold train ids already. Every label is checked (size = its image's, every value
    mapped) before the statistics are written; DataError lists the files and values otherwise.
    Returns a summary dict: files, converted, skipped, ignored_pixels, stats_files, num_classes and
    class_pixels (pixels per train id).
    """
    if isinstance(id_map, IdMap):
        mapping = id_map
    elif id_map is not None:
        mapping = read_id_map(id_map)
    elif num_classes is not None:
        mapping = identity_map(num_classes, ignore_index)
    else:
        raise DataError('folder: give a mapping file (--id-map) or the number of classes (--num-classes)')
    if mapping.path is not None and label_suffix == TRAIN_ID_SUFFIX:
        raise DataError(f'--label-suffix {TRAIN_ID_SUFFIX} names the outputs: the raw labels need another suffix, '
                        f'or use --num-classes for labels that hold train ids already')
    in_place = mapping.path is None and label_suffix == TRAIN_ID_SUFFIX  # train ids already: check and count
    if in_place and ignore_index != IGNORE_INDEX:
        raise DataError(f'--ignore-index {ignore_index} with --label-suffix {TRAIN_ID_SUFFIX}: the outputs would '
                        f'overwrite the labels; give the labels another suffix')
    files = list_folder_labels(root, label_suffix, img_suffix, img_dir, label_dir)
    for folder in sorted({os.path.dirname(dst) for _, _, dst in files}):
        for name in os.listdir(folder):
            if is_temp_file(name) and name.endswith('.tmp') and TRAIN_ID_SUFFIX in name:
                os.remove(os.path.join(folder, name))
    tasks = [(img, src, src if in_place else dst, mapping, force) for img, src, dst in files]
    bar = dict(total=len(tasks), desc='folder labels', unit='file', disable=not progress)
    if nproc > 1:
        chunk = max(1, min(16, len(tasks) // (4 * nproc)))
        with multiprocessing.get_context('spawn').Pool(nproc) as pool:
            results = list(progress_bar(pool.imap(_convert_folder_task, tasks, chunksize=chunk), **bar))
    else:
        results = [_convert_folder_task(t) for t in progress_bar(tasks, **bar)]
    unknown, unknown_files = {}, []
    for (_, src, _, _, _), r in zip(tasks, results):
        for v, n in r.get('unknown', {}).items():
            pixels, paths = unknown.get(v, (0, []))
            unknown[v] = (pixels + n, paths + [src])
        if 'unknown' in r:
            unknown_files.append(src)
    errors = [r['error'] for r in results if 'error' in r]
    if errors:
        more = f' ({len(errors) - 1} more file(s) failed too; a re-run lists them)' if len(errors) > 1 else ''
        raise DataError(errors[0] + more)
    if unknown:
        raise DataError(_unmapped_message(mapping, unknown, unknown_files))
    K = mapping.num_classes
    stats = [(dst, r['counts'][:K]) for (_, _, dst, _, _), r in zip(tasks, results)]
    write_class_stats(root, stats)
    converted = sum(r['converted'] for r in results)
    return {'kind': 'folder', 'root': root, 'files': len(files), 'converted': converted,
            'skipped': len(files) - converted, 'ignored_pixels': sum(r['counts'][IGNORE_INDEX] for r in results),
            'stats_files': len(stats), 'num_classes': K,
            'class_pixels': np.sum([c for _, c in stats], axis=0, dtype=np.int64).tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert labels to train ids (in place) and write the rare class sampling statistics '
                    '(sample_class_stats.json, sample_class_stats_dict.json, samples_with_class.json) to the '
                    'dataset root: GTA / Synthia / Cityscapes, or your own data in the folder layout (any classes, '
                    'label ids or RGB colours, mapped by a mapping file; see the module docstring).',
        epilog='examples: python convert_labels.py gta data/gta --nproc 8 | '
               'python convert_labels.py cityscapes data/cityscapes | '
               'python convert_labels.py folder data/mine/source --img-dir images --label-dir labels '
               '--label-suffix .png --id-map map.yaml')
    parser.add_argument('kind', choices=('gta', 'synthia', 'cityscapes', 'folder'), help='dataset format')
    parser.add_argument('root', help='dataset folder, e.g. data/gta')
    parser.add_argument('--nproc', type=int, default=1, help='worker processes (default 1)')
    parser.add_argument('--force', action='store_true', help='convert again even where a valid output exists')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    folder = parser.add_argument_group('folder layout (your own data)')
    folder.add_argument('--label-suffix', help='raw label = image path with --img-suffix replaced by this, '
                        'e.g. .png or _mask.png')
    folder.add_argument('--img-suffix', default='.png', help='image file suffix (default .png)')
    folder.add_argument('--img-dir', default=None, help='images under ROOT/IMG_DIR (default: anywhere under ROOT)')
    folder.add_argument('--label-dir', default=None,
                        help='labels under ROOT/LABEL_DIR at the image\'s relative path (default: beside the images)')
    folder.add_argument('--id-map', default=None, metavar='MAP.yaml',
                        help='mapping file: raw label values (ids or RGB colours) -> train ids')
    folder.add_argument('--num-classes', type=int, default=None, metavar='K',
                        help='without --id-map: the labels hold train ids 0..K-1 already')
    folder.add_argument('--ignore-index', type=int, default=IGNORE_INDEX, metavar='V',
                        help='with --num-classes: the value of unlabelled pixels (default 255)')
    args = parser.parse_args(argv)
    folder_args = ('label_suffix', 'img_dir', 'label_dir', 'id_map', 'num_classes')
    if args.kind != 'folder':
        given = [a for a in folder_args if getattr(args, a) is not None]
        if given or args.img_suffix != '.png' or args.ignore_index != IGNORE_INDEX:
            parser.error(f'--{(given or ["img_suffix"])[0].replace("_", "-")} belongs to the folder layout; '
                         f'{args.kind} labels have a fixed layout')
    else:
        if args.label_suffix is None:
            parser.error('folder: --label-suffix is required (raw label = image path with --img-suffix replaced '
                         'by it, e.g. --label-suffix .png with --label-dir labels)')
        if (args.id_map is None) == (args.num_classes is None):
            parser.error('folder: give --id-map MAP.yaml (raw ids or colours -> train ids) or --num-classes K '
                         '(the labels hold train ids already), one of them')
    try:
        if args.kind == 'folder':
            s = convert_folder(args.root, args.label_suffix, img_suffix=args.img_suffix, img_dir=args.img_dir,
                               label_dir=args.label_dir, id_map=args.id_map, num_classes=args.num_classes,
                               ignore_index=args.ignore_index, nproc=args.nproc, progress=not args.quiet,
                               force=args.force)
        else:
            s = convert_dataset(args.kind, args.root, nproc=args.nproc, progress=not args.quiet, force=args.force)
    except DataError as e:
        exit_error(e)
    print_summary(args.kind, args.root, s)


def print_summary(kind, root, s):
    """The closing lines of a conversion: what was converted or skipped, and where the statistics are
    (s: the summary convert_folder / convert_dataset return)."""
    total = sum(s['class_pixels'])
    if kind == 'folder':
        print(f'{s["files"]} label files: {s["converted"]} converted, {s["skipped"]} already up to date; '
              f'{s["ignored_pixels"]} unlabelled pixels (255); {s["num_classes"]} classes (train ids 0..'
              f'{s["num_classes"] - 1}): name them in the config, data.classes')
    else:
        print(f'{s["files"]} label files: {s["converted"]} converted, {s["skipped"]} already up to date; '
              f'{s["unmapped_pixels"]} pixels had ids outside the table and are ignored (255)')
    print(f'statistics over {s["stats_files"]} files ({total} labelled pixels) written to '
          f'{os.path.join(root, "sample_class_stats.json")}, sample_class_stats_dict.json, '
          f'samples_with_class.json')


if __name__ == '__main__':
    main()
