"""The classes of a task: the Cityscapes tables of the benchmarks, the data.classes config value
checked and resolved into a class table, colours and label-id mappings.

    from mic_classes import class_table
    table = class_table(cfg.data, cfg.model.num_classes)  # names, palette, ignore_index, things
    rgb = table.colorize(pred)                            # [H,W] train ids -> [H,W,3] colours

data.classes is a preset name ('cityscapes', the default), a list of names, or a mapping of the keys
of ClassesConfig. mic_config type-checks it with the rest of the config and calls normalise_classes
for what a type cannot say (unique names, one colour per class, ...); mic_data re-exports the tables.

Imports numpy and the standard library only, so that the config schema can import it without torch
(DataError comes from mic_runtime, which imports torch: it is imported where it is raised).
"""
import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import List, Optional, Union

import numpy as np

# --------------------------------------------------------------------------
# The Cityscapes classes of the benchmarks (GTA, Synthia, Cityscapes, ACDC, Dark Zurich)
# --------------------------------------------------------------------------

# The default of data.classes. Train id i = names[i]; 'things' are the classes of the ImageNet
# feature distance (DAFormer), the default of uda.fd_classes.
CITYSCAPES_CLASSES = {
    'names': ['road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
              'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
              'motorcycle', 'bicycle'],
    'palette': [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
                [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
                [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
                [0, 80, 100], [0, 0, 230], [119, 11, 32]],
    'ignore_index': 255,
    'things': ['traffic light', 'traffic sign', 'person', 'rider', 'car', 'truck', 'bus', 'train',
               'motorcycle', 'bicycle'],
}
CLASS_PRESETS = {'cityscapes': CITYSCAPES_CLASSES}  # data.classes: <name>
MAX_CLASSES = 255  # labels are uint8 and 255 marks unlabelled pixels inside the code

CLASSES = tuple(CITYSCAPES_CLASSES['names'])  # train ids 0..18: road, sidewalk, ..., bicycle
PALETTE = tuple(tuple(c) for c in CITYSCAPES_CLASSES['palette'])  # Cityscapes colours of the train ids
IGNORE_INDEX = 255  # unlabelled pixels, inside the code (data.classes.ignore_index is read as this)
SYNTHIA_CLASSES = tuple(c for c in range(19) if c not in (9, 14, 16))  # Synthia has no terrain, truck, train
SYNTHIA_CLASS_NAMES = tuple(CLASSES[c] for c in SYNTHIA_CLASSES)  # mIoU16: these classes of any class table

# Cityscapes label id -> train id (GTA labels use the same ids); every other id is ignored (255)
CS_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                     24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# train id -> Cityscapes label id, for test-set exports (ignore -> 0 'unlabeled')
TRAIN_ID_TO_CS_ID = {**{t: i for i, t in CS_ID_TO_TRAIN_ID.items()}, IGNORE_INDEX: 0}
# Synthia (RAND-CITYSCAPES, first channel of GT/LABELS) id -> train id
SYNTHIA_ID_TO_TRAIN_ID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
                          10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
# Cityscapes label-id colours (cityscapesScripts), for the palette of GTA-style label PNGs
CS_ID_COLOURS = {0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0), 3: (0, 0, 0), 4: (0, 0, 0), 5: (111, 74, 0),
                 6: (81, 0, 81), 9: (250, 170, 160), 10: (230, 150, 140), 14: (180, 165, 180),
                 15: (150, 100, 100), 16: (150, 120, 90), 18: (153, 153, 153), 29: (0, 0, 90),
                 30: (0, 0, 110), **{i: PALETTE[t] for i, t in CS_ID_TO_TRAIN_ID.items()}}


def id_lut(mapping, size=256):
    """A lookup table [size] uint8: lut[id] = train id, IGNORE_INDEX for ids not in `mapping`."""
    lut = np.full(size, IGNORE_INDEX, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def colorize(label, palette=None):
    """Train-id map [H,W] -> RGB [H,W,3] uint8: colour palette[i] for train id i (default: the
    Cityscapes PALETTE); ignore and ids beyond the palette black."""
    palette = PALETTE if palette is None else palette
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(palette)] = palette
    return lut[np.asarray(label, dtype=np.uint8)]


def generated_palette(n):
    """n distinct colours [r, g, b]: the PASCAL VOC palette from index 1 on (its index 0, black, is
    the colour of unlabelled pixels): (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), ..."""
    out = []
    for i in range(1, n + 1):
        rgb, c = [0, 0, 0], i
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << bit
            c >>= 3
        out.append(rgb)
    return out


# --------------------------------------------------------------------------
# data.classes: the schema of its mapping form, and the checks a type cannot express
# --------------------------------------------------------------------------

class ClassesError(ValueError):
    """A data.classes value that no task can have; mic_config raises it as a ConfigError, class_table
    as a DataError. The message names the config key."""


@dataclass
class ClassesConfig:  # data.classes, when not a preset name: the classes of your own task
    # one name per class: train id i (the value in the label PNGs) is names[i]
    names: List[str] = field(default_factory=list)
    palette: Optional[List[List[int]]] = None  # [r, g, b] per class for colour predictions; null: generated
    ignore_index: int = 255  # the label value of unlabelled pixels (not a train id; read as 255)
    # 'thing' classes (names or train ids): the classes the ImageNet feature distance applies to (the
    # default of uda.fd_classes); DAFormer's insight is to keep the encoder's ImageNet features of objects
    things: List[Union[str, int]] = field(default_factory=list)

    @staticmethod
    def expand(value):
        """The mapping form of a data.classes value: a preset name or a list of names expanded."""
        if isinstance(value, str) and value in CLASS_PRESETS:
            return copy.deepcopy(CLASS_PRESETS[value])
        if isinstance(value, (list, tuple)):
            return {'names': list(value)}
        return value

    @staticmethod
    def merge_base(current, update):
        """What a mapping `update` of data.classes merges into: new names start a new class table (the
        defaults of the other keys); other keys (--opt data.classes.things=[car]) update the current one."""
        return dataclasses.asdict(ClassesConfig()) if 'names' in update else ClassesConfig.expand(current)


def _error(key, text):
    return ClassesError(f'config key {key!r}: {text}')


def _check_names(names, key):
    if not names:
        raise _error(f'{key}.names', 'needs at least one class name (train id i = names[i])')
    if len(names) > MAX_CLASSES:
        raise _error(f'{key}.names', f'{len(names)} classes; at most {MAX_CLASSES} fit in 8-bit labels '
                                     f'(255 marks unlabelled pixels)')
    seen = {}
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise _error(f'{key}.names[{i}]', f'a class name must be non-empty text, got {n!r}')
        if n in seen:
            raise _error(f'{key}.names', f'{n!r} is listed twice (train ids {seen[n]} and {i}); class '
                                         f'names must be unique (they name the IoU of each class)')
        seen[n] = i


def _check_palette(palette, names, key):
    if len(palette) != len(names):
        raise _error(f'{key}.palette', f'{len(palette)} colours for {len(names)} classes ({key}.names); give '
                                       f'one [r, g, b] per class, or null for generated colours')
    for i, c in enumerate(palette):
        if len(c) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in c):
            raise _error(f'{key}.palette[{i}]', f'expected [r, g, b] with values 0..255 (the colour '
                                                f'of {names[i]!r}), got {c!r}')


def _thing_names(things, names, key):
    """The things (names or train ids) as names, each checked against `names`."""
    out = []
    for i, t in enumerate(things):
        if isinstance(t, int) and not isinstance(t, bool):
            if not 0 <= t < len(names):
                raise _error(f'{key}.things[{i}]', f'{t} is not a train id of {key}.names (0..{len(names) - 1})')
            t = names[t]
        elif t not in names:
            close = difflib.get_close_matches(str(t), names, n=1)
            raise _error(f'{key}.things[{i}]', f'{t!r} is not one of {key}.names'
                                               + (f' (did you mean {close[0]!r}?)' if close else ''))
        if t in out:
            raise _error(f'{key}.things', f'{t!r} is listed twice')
        out.append(t)
    return out


def normalise_classes(value, key='data.classes'):
    """A data.classes value (preset name, list of names or mapping; None: the default) checked and in
    its resolved form: the preset name, or {names, palette, ignore_index, things} with the things as
    names. Raises ClassesError naming the key for duplicate names, a palette of the wrong length, ..."""
    if value is None or isinstance(value, str):
        name = 'cityscapes' if value is None else value
        if name not in CLASS_PRESETS:
            raise _error(key, f'unknown class preset {name!r}; choose {", ".join(CLASS_PRESETS)}, or give '
                              f'the names: {{names: [...], things: [...]}}')
        return name
    value = ClassesConfig.expand(value)
    fields = [f.name for f in dataclasses.fields(ClassesConfig)]
    if not isinstance(value, dict) or set(value) - set(fields):
        raise _error(key, f'expected a preset name, a list of names or a mapping of {", ".join(fields)}; '
                          f'got {value!r}')
    value = {**dataclasses.asdict(ClassesConfig()), **value}
    names, palette, ignore = list(value['names']), value['palette'], value['ignore_index']
    _check_names(names, key)
    if palette is not None:
        _check_palette(palette, names, key)
        palette = [list(c) for c in palette]
    if not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise _error(f'{key}.ignore_index', f'expected a label value in 0..255, got {ignore}')
    if ignore < len(names):
        raise _error(f'{key}.ignore_index', f'{ignore} is the train id of class {names[ignore]!r}; '
                                            f'unlabelled pixels need a value >= {len(names)} (usually 255)')
    things = _thing_names(value['things'], names, key)
    return {'names': names, 'palette': palette, 'ignore_index': ignore, 'things': things}


def resolve_classes(classes=None, num_classes=None):
    """The class table of a task: {'names', 'palette' (an [r, g, b] per class), 'ignore_index', 'things'
    (train ids)}, tuples throughout.

    classes: a data.classes value, or a whole data section (absent key: the Cityscapes preset).
    num_classes: model.num_classes when known. Without data.classes a number other than the preset's
    gives classes named '0'..'K-1' (configs written before data.classes), the Cityscapes colours first.
    """
    if isinstance(classes, dict) and 'names' not in classes:  # a data section
        classes = classes.get('classes')
    value = normalise_classes(classes)
    if isinstance(value, str):
        value = CLASS_PRESETS[value]
        if num_classes is not None and num_classes != len(value['names']):
            palette = value['palette'] + generated_palette(max(num_classes, 0))[len(value['palette']):]
            value = {'names': [str(c) for c in range(num_classes)], 'palette': palette[:num_classes],
                     'ignore_index': 255, 'things': []}
    names = tuple(value['names'])
    palette = value['palette'] if value['palette'] is not None else generated_palette(len(names))
    return {'names': names, 'palette': tuple(tuple(c) for c in palette), 'ignore_index': value['ignore_index'],
            'things': tuple(names.index(t) for t in value['things'])}


def follow_classes(cfg):
    """A config (plain dicts) with data.classes resolved and what follows from it where null, in place:
    model.num_classes (the number of names) and uda.fd_classes (the things). ClassesError for a bad
    data.classes, or when model.num_classes disagrees with its names."""
    data, model, uda = cfg['data'], cfg['model'], cfg['uda']
    classes = data['classes'] = normalise_classes(data.get('classes'))
    named = len(CLASS_PRESETS[classes]['names'] if isinstance(classes, str) else classes['names'])
    if model['num_classes'] is None:
        model['num_classes'] = named
    elif not isinstance(classes, str) and model['num_classes'] != named:
        raise ClassesError(f"config keys 'model.num_classes' ({model['num_classes']}) and 'data.classes' ({named} "
                           f'names) disagree: leave model.num_classes out (it follows data.classes) or make them agree')
    if uda['fd_classes'] is None:
        uda['fd_classes'] = list(resolve_classes(classes, model['num_classes'])['things'])
    return cfg


# --------------------------------------------------------------------------
# The class table the data, training and evaluation code use
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassTable:
    """The classes of a task (data.classes): train id i is names[i], drawn in palette[i].

    ignore_index: the value of unlabelled pixels in the label files (read as IGNORE_INDEX = 255);
    things: the train ids of the 'thing' classes (the default of uda.fd_classes).
    """
    names: tuple
    palette: tuple
    ignore_index: int = IGNORE_INDEX
    things: tuple = ()

    @property
    def num_classes(self):
        return len(self.names)

    def colorize(self, label):
        return colorize(label, self.palette)

    def check_label(self, label, path):
        """A label as read ([H,W] uint8) -> the same with ignore_index as IGNORE_INDEX. DataError naming
        the file and the values when a pixel holds neither a train id 0..K-1 nor ignore_index."""
        K, ignore = self.num_classes, self.ignore_index
        counts = np.bincount(np.asarray(label).ravel(), minlength=256)
        counts[:K] = 0
        counts[ignore] = 0
        if counts.any():
            from mic_runtime import DataError
            bad = np.flatnonzero(counts)
            found = ', '.join(f'{v} ({counts[v]} pixels)' for v in bad[:8]) + (', ...' if len(bad) > 8 else '')
            raise DataError(f'label {path} holds values outside the train ids 0..{K - 1} of the {K} classes '
                            f'(data.classes) and {ignore} (unlabelled): {found}; convert raw labels to train ids '
                            f'first (python convert_labels.py), or correct data.classes')
        if ignore != IGNORE_INDEX:
            label = np.where(label == ignore, np.uint8(IGNORE_INDEX), label)
        return label


def class_table(classes=None, num_classes=None):
    """The ClassTable of a data section (cfg.data) or a data.classes value (None: Cityscapes).
    num_classes: model.num_classes when known (see resolve_classes)."""
    if isinstance(classes, ClassTable):
        return classes
    try:
        return ClassTable(**resolve_classes(classes, num_classes))
    except ClassesError as e:
        from mic_runtime import DataError
        raise DataError(str(e)) from None
