"""Datasets' layouts on disk: which files of a dataset are its images and which its labels.

    samples = list_samples(cfg.data.source, need_labels=True)   # [(image path, label path)], sorted
    has_labels(cfg.data.val)                                    # whether the split has labels to score
    images, others = scan_images(folder)                        # the images of an --images folder

The benchmark types (gta, synthia, cityscapes, acdc, darkzurich) have fixed folders and suffixes;
'folder' datasets name theirs in the config (folder_samples). Only paths are listed here, no file
is opened: mic_data reads them. Errors are DataErrors naming the folder and the expected layout.

Imports the standard library, mic_config (the dataset section's schema) and mic_runtime only;
mic_data (which re-exports the names its callers use) and convert_labels import this.
"""
import dataclasses
import os

from mic_config import DatasetConfig, validated
from mic_runtime import DataError, is_temp_file


TRAIN_ID_SUFFIX = '_labelTrainIds.png'  # what convert_labels.py writes: <label name minus its suffix> + this


# per dataset type: image folder, label folder (relative to root; {split} filled in), image suffix,
# label suffix, recursive search, and the raw label suffix that convert_labels.py turns into train ids
_LAYOUTS = {
    'gta': ('images', 'labels', '.png', '_labelTrainIds.png', False, '.png'),
    'synthia': ('RGB', 'GT/LABELS', '.png', '_labelTrainIds.png', False, '.png'),
    'cityscapes': ('leftImg8bit/{split}', 'gtFine/{split}', '_leftImg8bit.png', '_gtFine_labelTrainIds.png',
                   True, '_gtFine_labelIds.png'),
    'acdc': ('rgb_anon/{split}', 'gt/{split}', '_rgb_anon.png', '_gt_labelTrainIds.png', True, None),
    'darkzurich': ('rgb_anon/{split}', 'gt/{split}', '_rgb_anon.png', '_gt_labelTrainIds.png', True, None),
}
_LAYOUT_HELP = {
    'gta': '{root}/images/*.png and {root}/labels/*.png as extracted from the GTA download, then '
           '`python convert_labels.py gta {root}` for labels/*_labelTrainIds.png',
    'synthia': '{root}/RGB/*.png and {root}/GT/LABELS/*.png as extracted from SYNTHIA-RAND-CITYSCAPES, then '
               '`python convert_labels.py synthia {root}` for GT/LABELS/*_labelTrainIds.png',
    'cityscapes': '{root}/leftImg8bit/{split}/<city>/*_leftImg8bit.png and {root}/gtFine/{split}/<city>/'
                  '*_gtFine_labelIds.png from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, then '
                  '`python convert_labels.py cityscapes {root}` for *_gtFine_labelTrainIds.png',
    'acdc': '{root}/rgb_anon/{split}/**/*_rgb_anon.png and {root}/gt/{split}/**/*_gt_labelTrainIds.png '
            '(rgb_anon_trainvaltest.zip and gt_trainval.zip, condition folders moved under the split)',
    'darkzurich': '{root}/rgb_anon/{split}/night/<sequence>/*_rgb_anon.png and {root}/gt/{split}/night/'
                  '<sequence>/*_gt_labelTrainIds.png (Dark_Zurich_train_anon.zip, Dark_Zurich_val_anon.zip)',
    'folder': 'image files ending with img_suffix under {root} (or {root}/img_dir), and labels beside them or '
              'under {root}/label_dir at the same relative path (the image name with img_suffix replaced by '
              'label_suffix)',
}


def dataset_config(ds_cfg):
    """A dataset section (mapping, possibly partial) completed with the DatasetConfig defaults
    (a section of a config from mic_config.load_config is taken as it is)."""
    if validated(ds_cfg, DatasetConfig):
        return ds_cfg
    cfg = {**dataclasses.asdict(DatasetConfig()), **dict(ds_cfg)}
    unknown = set(cfg) - {f.name for f in dataclasses.fields(DatasetConfig)}
    if unknown:
        raise DataError(f'unknown dataset config keys {sorted(unknown)}')
    if cfg['type'] not in _LAYOUT_HELP:
        raise DataError(f'unknown dataset type {cfg["type"]!r}; choose one of {", ".join(_LAYOUT_HELP)}')
    return cfg


def has_labels(ds_cfg):
    """Whether a dataset section has labels to evaluate against: a folder dataset with a label_suffix,
    any other type except its test split."""
    cfg = dataset_config(ds_cfg)
    if cfg['type'] == 'folder':
        return cfg['label_suffix'] is not None
    return cfg['split'] != 'test'


def _layout_help(kind, root, split):
    return _LAYOUT_HELP[kind].format(root=root.rstrip('/'), split=split)


def scan_files(folder, suffix, recursive):
    """Sorted paths of the files under `folder` whose names end with `suffix` (temp files skipped)."""
    if recursive:
        out = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            out.extend(os.path.join(dirpath, n) for n in filenames if n.endswith(suffix) and not is_temp_file(n))
        return sorted(out)
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.endswith(suffix) and not is_temp_file(n) and os.path.isfile(os.path.join(folder, n)))


def list_samples(ds_cfg, split=None, need_labels=None):
    """[(image path, label path or None)] of a dataset, sorted.

    ds_cfg: mapping with the keys of mic_config.DatasetConfig (type, root, split, img_suffix, label_suffix).
    split: overrides ds_cfg['split'] (gta and synthia have a single split and ignore it).
    need_labels: when True, a missing label raises DataError naming the first image without one;
        when False, the label path is None where no label exists. Default: True except for split 'test'.
    Folder datasets: see folder_samples.
    """
    cfg = dataset_config(ds_cfg)
    kind, root = cfg['type'], cfg['root']
    split = split or cfg['split']
    if need_labels is None:
        need_labels = split != 'test'
    layout = _layout_help(kind, root, split)
    if not os.path.isdir(root):
        raise DataError(f'dataset root {root} ({kind}) does not exist; expected {layout}')
    if kind == 'folder':
        return folder_samples(cfg, need_labels)
    img_sub, lbl_sub, img_suffix, lbl_suffix, recursive, raw_suffix = _LAYOUTS[kind]
    img_dir = os.path.join(root, img_sub.format(split=split))
    lbl_dir = os.path.join(root, lbl_sub.format(split=split))
    if not os.path.isdir(img_dir):
        raise DataError(f'{kind} image folder {img_dir} does not exist; expected {layout}')
    images = scan_files(img_dir, img_suffix, recursive)
    if lbl_suffix.endswith(img_suffix):
        images = [p for p in images if not p.endswith(lbl_suffix)]  # labels sit beside the images
    if not images:
        raise DataError(f'no images ending with {img_suffix!r} under {img_dir}; expected {layout}')

    def label_of(img_path):
        return os.path.join(lbl_dir, os.path.relpath(img_path, img_dir)[:-len(img_suffix)] + lbl_suffix)

    if not os.path.isdir(lbl_dir):
        if need_labels:
            raise DataError(f'{kind} label folder {lbl_dir} does not exist; expected {layout}')
        return [(p, None) for p in images]
    existing = set(scan_files(lbl_dir, lbl_suffix, recursive))
    samples = [(p, label_of(p)) for p in images]
    if not need_labels:
        return [(p, lbl if lbl in existing else None) for p, lbl in samples]
    for p, lbl in samples:
        if lbl not in existing:
            raw = lbl[:-len(lbl_suffix)] + raw_suffix if raw_suffix else None
            if raw and os.path.isfile(raw):
                raise DataError(f'{kind} labels in {lbl_dir} are not converted to train ids ({raw} has no '
                                f'{lbl}): run `python convert_labels.py {kind} {root}`')
            raise DataError(f'image {p} has no label: expected {lbl} (layout: {layout})')
    return samples


def _folder_dirs(cfg):
    """(image folder, label folder) of a folder dataset (the label folder is the image folder when
    the labels lie beside the images)."""
    img_dir = os.path.join(cfg['root'], cfg['img_dir']) if cfg.get('img_dir') else cfg['root']
    lbl_dir = os.path.join(cfg['root'], cfg['label_dir']) if cfg.get('label_dir') else img_dir
    return os.path.normpath(img_dir), os.path.normpath(lbl_dir)


def folder_convert_command(cfg, id_map='MAP.yaml'):
    """The convert_labels.py command of a folder dataset, with its folders and suffixes as configured."""
    cmd = f'python convert_labels.py folder {cfg["root"]}'
    if cfg.get('img_dir'):
        cmd += f' --img-dir {cfg["img_dir"]}'
    if cfg.get('label_dir'):
        cmd += f' --label-dir {cfg["label_dir"]}'
    if cfg['img_suffix'] != '.png':
        cmd += f' --img-suffix {cfg["img_suffix"]}'
    raw = cfg['label_suffix'] if cfg['label_suffix'] and cfg['label_suffix'] != TRAIN_ID_SUFFIX else 'SUFFIX'
    return cmd + f' --label-suffix {raw} --id-map {id_map}'


def _folder_images(cfg, img_dir, lbl_dir):
    """The images of a folder dataset: files ending with img_suffix, without the labels where those
    lie among them (beside the images, or in a label folder inside the image folder)."""
    img_suffix, lbl_suffix = cfg['img_suffix'], cfg['label_suffix']
    if lbl_suffix is not None and lbl_dir == img_dir and lbl_suffix == img_suffix:
        raise DataError(f'folder dataset {cfg["root"]}: images and labels lie in one folder ({img_dir}) with one '
                        f'suffix {img_suffix!r}, so they cannot be told apart: give the labels their own folder '
                        f'(label_dir) or suffix (e.g. label_suffix: _mask.png)')
    images = [p for p in scan_files(img_dir, img_suffix, True) if not p.endswith(TRAIN_ID_SUFFIX)]
    if lbl_suffix is not None and lbl_dir == img_dir:
        images = [p for p in images if not p.endswith(lbl_suffix)]
    elif lbl_dir != img_dir and _inside(lbl_dir, img_dir):
        images = [p for p in images if not _inside(p, lbl_dir)]
    if not images:
        raise DataError(f'no images ending with {img_suffix!r} under {img_dir}; expected '
                        f'{_layout_help("folder", cfg["root"], cfg["split"])}')
    return images


def folder_samples(cfg, need_labels):
    """[(image, label or None)] of a folder dataset (list_samples).

    A label is the image's path relative to the image folder, under the label folder, with
    img_suffix replaced by label_suffix. label_suffix may name the labels as they are (train ids)
    or the raw labels given to convert_labels.py --label-suffix: where convert_labels.py has written
    <name>_labelTrainIds.png beside them (TRAIN_ID_SUFFIX), those are the labels.
    """
    img_dir, lbl_dir = _folder_dirs(cfg)
    if cfg['label_suffix'] is None and need_labels:
        raise DataError(f'folder dataset {cfg["root"]} has no labels: set label_suffix in its config '
                        f'(label = image name with {cfg["img_suffix"]!r} replaced by label_suffix)')
    if not os.path.isdir(img_dir):
        raise DataError(f'folder image folder {img_dir} does not exist; expected '
                        f'{_layout_help("folder", cfg["root"], cfg["split"])}')
    images = _folder_images(cfg, img_dir, lbl_dir)
    if cfg['label_suffix'] is None:
        return [(p, None) for p in images]
    if not os.path.isdir(lbl_dir):
        if need_labels:
            raise DataError(f'folder label folder {lbl_dir} does not exist; expected '
                            f'{_layout_help("folder", cfg["root"], cfg["split"])}')
        return [(p, None) for p in images]
    suffix = cfg['label_suffix']
    files = scan_files(lbl_dir, '', True)
    raw = {p for p in files if p.endswith(suffix) and (suffix.endswith(TRAIN_ID_SUFFIX) or not p.endswith(TRAIN_ID_SUFFIX))}
    converted = {p for p in files if p.endswith(TRAIN_ID_SUFFIX)} if not suffix.endswith(TRAIN_ID_SUFFIX) else set()
    stems = [os.path.join(lbl_dir, os.path.relpath(p, img_dir)[:-len(cfg['img_suffix'])]) for p in images]
    if any(s + TRAIN_ID_SUFFIX in converted for s in stems):  # converted by convert_labels.py: read those
        labels = [s + TRAIN_ID_SUFFIX if s + TRAIN_ID_SUFFIX in converted else None for s in stems]
        unconverted = [s + suffix for s, lbl in zip(stems, labels) if lbl is None and s + suffix in raw]
        if unconverted:
            raise DataError(f'{len(unconverted)} label(s) under {lbl_dir} are not converted to train ids, e.g. '
                            f'{unconverted[0]} (no {TRAIN_ID_SUFFIX} beside it, while other labels have one): run '
                            f'`{folder_convert_command(cfg)}` again')
        expected, known = [s + TRAIN_ID_SUFFIX for s in stems], converted
    else:
        labels = [s + suffix if s + suffix in raw else None for s in stems]
        expected, known = [s + suffix for s in stems], raw
    if not need_labels:
        return list(zip(images, labels))
    _check_folder_pairs(cfg, images, expected, known, lbl_dir)
    return list(zip(images, expected))


def _check_folder_pairs(cfg, images, expected, known, lbl_dir):
    """DataError naming the first image without a label, or the first label without an image."""
    img_dir = _folder_dirs(cfg)[0]
    counts = f'{len(images)} images, {len(known)} labels'
    for p, lbl in zip(images, expected):
        if lbl not in known:
            raise DataError(f'image {p} has no label: expected {lbl} ({counts} ending with '
                            f'{cfg["label_suffix"]!r} '
                            f'under {lbl_dir}). Labels of raw ids or colours '
                            f'are converted by `{folder_convert_command(cfg)}`, which writes the '
                            f'*{TRAIN_ID_SUFFIX} files that training reads (label_suffix may name either)')
    orphans = sorted(known - set(expected))
    if orphans:
        suffix = TRAIN_ID_SUFFIX if orphans[0].endswith(TRAIN_ID_SUFFIX) and not \
            cfg['label_suffix'].endswith(TRAIN_ID_SUFFIX) else cfg['label_suffix']
        raise DataError(f'{len(orphans)} label(s) under {lbl_dir} have no image ({counts}), e.g. {orphans[0]}: '
                        f'expected its image at {_image_of(orphans[0], lbl_dir, img_dir, suffix, cfg["img_suffix"])}; '
                        f'remove the label or add the image (check img_suffix, img_dir and label_dir)')


def _inside(path, folder):
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


def _image_of(label_path, lbl_dir, img_dir, lbl_suffix, img_suffix):
    rel = os.path.relpath(label_path, lbl_dir)
    return os.path.join(img_dir, rel[:-len(lbl_suffix)] + img_suffix)


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')  # what --images reads


def scan_images(folder):
    """(images, others): sorted paths of the IMAGE_EXTENSIONS files under `folder` (recursively)
    and of the other files there, which are not read (temporary files of atomic_write are neither)."""
    if not os.path.isdir(folder):
        raise DataError(f'image folder {folder} does not exist')
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        for n in filenames:
            if not is_temp_file(n):
                (images if n.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(dirpath, n))
    if not images:
        held = f' (it holds {len(others)} other file(s), e.g. {others[0]})' if others else ''
        raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {folder}{held}')
    return sorted(images), sorted(others)


def list_images(folder):
    """Sorted paths of all IMAGE_EXTENSIONS files under `folder` (recursively)."""
    return scan_images(folder)[0]
