"""The configuration schema: every default of every stage in one place, and the checks of a config.

The defaults are the paper's MIC(HRDA) GTA->Cityscapes setting (experiment 80 of the reference, seed 2 =
the released checkpoint). A YAML file in configs/ lists only what it changes; `--opt a.b=value` overrides:

    cfg = load_config('configs/gta2cs.yaml', ['model.backbone.type=mit_b0'])  # cfg.model is cfg['model']
    python mic_config.py configs/demo.yaml --opt train.max_iters=10   # prints the resolved config

One dataclass per section, a comment and the allowed range (num, unit) beside each default. Unknown keys,
wrong types, non-finite numbers, values out of range and keys that do not fit together raise ConfigError
naming the key. Resolved configs are plain dicts with attribute access; model.num_classes, uda.fd_classes
follow data.classes (mic_classes). Keys added after the first release (_added, num(added=True)) stay out of
stored configs at their defaults. Imports stdlib, yaml, mic_classes (numpy), mic_yaml: no torch.
"""
import argparse
import contextlib
import dataclasses
import difflib
import math
import operator
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

import yaml

from mic_classes import CLASS_PRESETS, ClassesConfig, ClassesError, follow_classes
from mic_yaml import ConfigError, parse_override, read_yaml  # noqa: F401  (public here too)

_hints = typing.get_type_hints  # a dataclass's field types


def num(default, n=None, added=False, **bounds):
    """A field of numbers allowed only within `bounds` (ge, gt, le, lt: >=, >, <=, < a number); with n, a
    list of n of them. Its metadata 'range' = (holds(v), the range as text, n) is read by _check_ranges;
    added: a key added after the first release (see _added)."""
    signs = {'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'}
    text = ' '.join(f'{signs[op]} {b:g}' for op, b in bounds.items())  # one bound: '>= 1'
    if len(bounds) == 2:  # an interval: 'in [0, 1)' (ge/gt sort before le/lt)
        (lo_op, lo), (hi_op, hi) = sorted(bounds.items())
        text = f'in {"[" if lo_op == "ge" else "("}{lo:g}, {hi:g}{"]" if hi_op == "le" else ")"}'
    holds = lambda v: all(getattr(operator, op)(v, b) for op, b in bounds.items())  # noqa: E731
    meta = {**({'range': (holds, text, n)} if bounds else {}), **({'added': True} if added else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def unit(default, **kw):
    return num(default, ge=0, le=1, **kw)  # a share, a probability, a momentum


def _section(cls, **values):
    return field(default_factory=lambda: cls(**{k: list(v) if isinstance(v, list) else v for k, v in values.items()}))


def _added(default=None, n=None, **bounds):  # a key added after the first release: stored() omits it at its default
    return num(default, n, added=True, **bounds)


# --- model: mic_model.build_model(cfg.model) ------------------------------------------------------
# mic_model's BACKBONES, HEADS, output strides and MiT's smallest input, repeated (mic_model imports this file)
BACKBONE_TYPES = ('mit_b0', 'mit_b1', 'mit_b2', 'mit_b3', 'mit_b4', 'mit_b5', 'resnet50_v1c', 'resnet101_v1c',
                  *(f'dinov2_vit{v}14{r}' for r in ('', '_reg') for v in 'sblg'))
HEAD_TYPES = ('daformer', 'segformer', 'deeplabv2', 'vfm_uda')
HEAD_OUTPUT_STRIDES = {'daformer': 4, 'segformer': 4, 'deeplabv2': 8, 'vfm_uda': 4}
MIT_MIN_SIZE = 32  # mic_model.MiT: stage 1 reduces keys/values 8x8 from a map at stride 4
UDA_MODES = ('dacs', 'source_only', 'advseg', 'minent')  # the keys of mic_uda.METHODS


@dataclass
class BackboneConfig:
    type: Literal[BACKBONE_TYPES] = 'mit_b5'  # MiT, or ResNet-V1c with dilated stages 3-4 (DeepLabV2's, Table 1)
    drop_path_rate: float = unit(0.1)  # MiT only: stochastic depth, rising linearly over all blocks to this value


@dataclass
class DecodeHeadConfig:
    type: Literal[HEAD_TYPES] = 'daformer'  # DAFormer's fusion, SegFormer's MLP, DeepLabV2's dilated convs (Table 1)
    embed_dims: int = num(256, ge=1)  # daformer/segformer: width of the token embeddings and fusion (SegFormer-B5: 768)
    dropout: float = unit(0.1)  # daformer/segformer: Dropout2d before the classifier (DeepLabV2 has none)
    # deeplabv2: dilations of the 3x3 classifier convs, summed. (6, 12) is the original's 'dlv2red' (Table 1,
    # as AdaptSegNet and later UDA work); DeepLabV2's paper and the original's 'dlv2' use [6, 12, 18, 24]
    dilations: List[int] = num([6, 12])


@dataclass
class HRDAConfig:
    scales: List[float] = num([0.5, 1.0], gt=0)  # [context scale, detail scale]; sorted ascending, detail must be 1
    hr_crop_size: List[int] = num([512, 512], ge=1, n=2)  # detail crop (h, w) in training; window in inference
    # detail crop corner divisible by this (output stride 4 x context downscale 2; the original: 8 for DeepLabV2 too)
    crop_coord_divisible: int = num(8, ge=1)
    hr_loss_weight: float = unit(0.1)  # weight of the detail-only loss; the fused loss gets 1 - hr - lr
    lr_loss_weight: float = unit(0.0)  # weight of a context-only loss (the paper: 0 when the detail crop < input)
    attention_classwise: bool = True  # one scale attention map per class (False: a single map)
    fixed_attention: Optional[float] = unit(None)  # replace the learned attention by this constant (ablation)
    hr_slide_inference: bool = True  # detail branch at inference: sliding windows over the full-resolution input
    hr_slide_overlapping: bool = True  # windows with stride = crop / 2 (False: stride = crop)
    feature_scale: float = num(0.5, gt=0, le=1)  # input scale whose features the ImageNet feature distance uses


@dataclass
class TestConfig:
    mode: Literal['slide', 'whole'] = 'slide'  # test-time inference on windows or on the whole image
    crop_size: List[int] = num([1024, 1024], ge=1, n=2)  # sliding window (h, w)
    stride: List[int] = num([512, 512], ge=1, n=2)  # sliding stride (h, w)
    # test-time augmentation (mic_eval): class probabilities averaged over these input scales (relative to the
    # test scale) and, with flip, their mirror images; [1.0] and no flip = one pass, as the paper evaluates
    flip: bool = _added(False)
    scales: List[float] = _added([1.0], gt=0)


@dataclass
class ModelConfig:
    type: Literal['hrda', 'encoder_decoder'] = 'hrda'  # HRDA multi-resolution, or DAFormer's single-scale one
    backbone: BackboneConfig = _section(BackboneConfig)
    decode_head: DecodeHeadConfig = _section(DecodeHeadConfig)
    hrda: HRDAConfig = _section(HRDAConfig)  # used when type == 'hrda'
    test: TestConfig = _section(TestConfig)
    # null: the number of data.classes (19 for Cityscapes); given, it must agree. Labels are uint8, 255 = ignore
    num_classes: Optional[int] = num(None, ge=1, le=255)
    # ImageNet weights of the encoder; null: scratch. SegFormer's pretrained/mit_b5.pth (mit_bN.pth for the others);
    # ResNet-V1c: OpenMMLab's pretrained/resnet101_v1c-e67eebb6.pth or pretrained/resnet50_v1c-2cccc1ad.pth
    pretrained: Optional[str] = 'pretrained/mit_b5.pth'
    activation_checkpointing: bool = False  # recompute encoder blocks in backward: less memory, more compute
    in_channels: int = _added(3, ge=1, le=64)  # image bands the encoder takes; follows data.channels


# --- data: mic_data (sizes are (h, w) pairs in pixels, scales (long side, short side)) ------------
@dataclass
class DatasetConfig:
    type: Literal['gta', 'synthia', 'cityscapes', 'acdc', 'darkzurich', 'folder'] = 'gta'  # on-disk layout (README)
    root: str = 'data/gta'  # dataset folder
    split: str = 'train'  # train / val / test (ignored by gta and synthia, which have one split)
    img_scale: List[int] = num([2560, 1440], ge=1, n=2)  # resize keeping the ratio to fit (long side, short side)
    crop_pseudo_margins: Optional[List[int]] = num(None, ge=0, n=4)  # target: [top, bottom, left, right] pixels of
    #   the resized image whose pseudo-labels get weight 0
    img_suffix: str = '.png'  # folder only: image file suffix
    label_suffix: Optional[str] = None  # folder only: label = image path with img_suffix -> this; null: none
    img_dir: Optional[str] = _added()  # folder only: images under root/img_dir (null: anywhere under root)
    label_dir: Optional[str] = _added()  # folder only: labels under root/label_dir, same relative path (null: beside)


@dataclass
class RCSConfig:
    enabled: bool = True  # rare class sampling of the source images
    temperature: float = num(0.01, gt=0)  # T in p_c = softmax((1 - f_c) / T)
    min_pixels: int = num(3000, ge=0)  # a file is a candidate for class c if it holds more than this many pixels of c
    # re-crop (up to 10 times) until the crop holds > min_pixels * this pixels of c (HRDA 2.0, DAFormer 0.5)
    min_crop_ratio: float = num(2.0, ge=0)


@dataclass
class DemoConfig:
    enabled: bool = False  # generate the synthetic demo benchmark into `root` when it is missing
    root: str = 'data/demo'  # holds gta/ (source) and cityscapes/ (target) in the real formats
    seed: int = num(0, ge=0)  # the demo data are a pure function of this seed and the sizes below
    num_source: int = num(300, ge=1)  # source (GTA-format) images
    num_target: int = num(150, ge=1)  # target (Cityscapes-format) train images
    num_val: int = num(50, ge=1)  # target val images (with labels)
    width: int = num(512, ge=32)  # image size in pixels
    height: int = num(256, ge=32)
    gap: float = num(1.0, ge=0)  # strength of the domain gap: 0 = the target looks like the source, 1 = the shipped gap


@dataclass
class DataConfig:
    # the classes: a preset name (cityscapes: the 19 classes), a list of names, or {names, palette, ignore_index,
    # things} (mic_classes.ClassesConfig); model.num_classes, uda.fd_classes follow (mic_data.class_table)
    classes: Union[Literal[tuple(CLASS_PRESETS)], List[str], ClassesConfig] = _added('cityscapes')
    source: DatasetConfig = _section(DatasetConfig)  # labelled source domain
    target: DatasetConfig = _section(  # unlabelled target domain (its labels are never read in training)
        DatasetConfig, type='cityscapes', root='data/cityscapes', split='train', img_scale=[2048, 1024],
        crop_pseudo_margins=[30, 240, 30, 30])
    val: DatasetConfig = _section(  # evaluation split
        DatasetConfig, type='cityscapes', root='data/cityscapes', split='val', img_scale=[2048, 1024])
    crop_size: List[int] = num([1024, 1024], ge=1, n=2)  # training crop (h, w) of source and target
    cat_max_ratio: float = num(0.75, gt=0)  # re-draw a source crop (<= 10 times) while a class covers >= this
    sync_crop_size: Optional[List[int]] = num(None, ge=1, n=2)  # crop source and target again at one shared box
    rcs: RCSConfig = _section(RCSConfig)
    demo: DemoConfig = _section(DemoConfig)
    batch_size: int = num(2, ge=1)  # source and target images per GPU and iteration
    num_workers: int = num(4, ge=0)  # data-loader worker processes per GPU (at most the usable CPU cores start)
    # image bands: 3 = RGB; 4 = e.g. RGB + near infrared (RGBA PNG/TIFF); any number as .npy [H,W,C]
    channels: int = _added(3, ge=1, le=64)
    # per-band normalisation (x - mean) / std of 0..255 values; null: ImageNet's RGB statistics (3 bands only)
    mean: Optional[List[float]] = _added(None)
    std: Optional[List[float]] = _added(None, gt=0)


# --- uda: the self-training method (mic_train) ----------------------------------------------------
@dataclass
class AdvSegConfig:  # uda.mode=advseg: output-space adversarial training (AdaptSegNet), Table 1
    loss: Literal['ls', 'vanilla'] = 'ls'  # discriminator loss: least squares (MSE) or binary cross-entropy
    lambda_adv: float = num(0.001, ge=0)  # weight of the adversarial loss of the segmentor on target predictions
    lr: float = num(1e-4, gt=0)  # discriminator Adam learning rate (betas 0.9, 0.99) ...
    power: float = num(0.9, ge=0)  # ... decayed polynomially with this power ...
    min_lr: float = num(0.0, ge=0)  # ... to this at train.max_iters


@dataclass
class MinEntConfig:  # uda.mode=minent: entropy minimisation on the target (ADVENT's MinEnt), Table 1
    lambda_ent: float = num(0.001, ge=0)  # weight of the mean normalised entropy of the target predictions


@dataclass
class UDAConfig:
    mode: Literal[UDA_MODES] = 'dacs'  # DACS self-training (DAFormer/HRDA), source only, AdvSeg, MinEnt; + MIC
    alpha: float = unit(0.999)  # EMA teacher momentum (alpha_t = min(1 - 1/(t+1), alpha))
    pseudo_threshold: float = unit(0.968)  # pseudo-label weight = share of target pixels with confidence >= this
    pseudo_weight_ignore_top: int = num(0, ge=0)  # DAFormer's legacy margins: zero the pseudo weight of top rows
    pseudo_weight_ignore_bottom: int = num(0, ge=0)  # ... and bottom rows
    fd_lambda: float = num(0.005, ge=0)  # ImageNet feature distance weight (0 = off)
    # train ids the distance applies to; null: the things of data.classes (Cityscapes: 6, 7, 11, ..., 18)
    fd_classes: Optional[List[int]] = num(None, ge=0, le=254)
    fd_min_ratio: float = unit(0.75)  # label downscaling: keep a block's majority class only above this share
    color_jitter_strength: float = unit(0.2)  # brightness, contrast, saturation and hue range
    color_jitter_probability: float = unit(0.2)  # jitter is applied when u > this (so with probability 0.8)
    blur: bool = True  # Gaussian blur with probability 0.5 on mixed images
    mask_mode: Optional[Literal['separate', 'separatesrc', 'separatetrg', 'separateaug',
                                'separatesrcaug', 'separatetrgaug']] = 'separatetrgaug'  # MIC images; null = no MIC
    mask_alpha: Union[Literal['same'], float] = unit('same')  # MIC teacher momentum; a number = a separate teacher
    mask_pseudo_threshold: Union[Literal['same'], float, None] = unit('same')  # MIC pseudo threshold; null = weight 1
    mask_lambda: float = num(1.0, ge=0)  # MIC loss weight
    mask_block_size: int = num(64, ge=1)  # patch size of the random mask
    mask_ratio: float = unit(0.7)  # share of masked patches (blocks or tokens)
    # pixel: MIC's blocks zeroed in the image; token: ViT patch tokens -> mask_token w.p. mask_ratio (DINOv2)
    mask_type: Literal['pixel', 'token'] = _added('pixel')
    advseg: AdvSegConfig = _section(AdvSegConfig)  # used when mode == 'advseg'
    minent: MinEntConfig = _section(MinEntConfig)  # used when mode == 'minent'


# --- optim and train (mic_train) ------------------------------------------------------------------
@dataclass
class OptimConfig:
    type: Literal['adamw', 'sgd'] = 'adamw'  # the segmentor's optimizer (Table 1's AdvSeg/MinEnt runs: sgd)
    lr: float = num(6e-5, gt=0)  # learning rate of the encoder
    head_lr_mult: float = num(10.0, ge=0)  # decoder learning rate = lr * this
    encoder_lr_mult: float = num(1.0, ge=0, added=True)  # encoder lr = lr * this (VFM-UDA: lr of the head, 0.1)
    layer_decay: float = num(1.0, gt=0, le=1, added=True)  # ViT: x this ** (blocks above), 1 = off (mic_train)
    betas: List[float] = num([0.9, 0.999], ge=0, lt=1, n=2)  # adamw only
    momentum: float = unit(0.9)  # sgd only
    weight_decay: float = num(0.01, ge=0)  # 0 for the encoder's no_weight_decay_keys (norms; DINOv2: + biases, tokens)
    warmup_iters: int = num(1500, ge=0)  # linear warm-up ...
    warmup_ratio: float = unit(1e-6)  # ... starting at lr * this
    power: float = num(1.0, ge=0)  # then polynomial decay to min_lr at train.max_iters
    min_lr: float = num(0.0, ge=0)


@dataclass
class TrainConfig:
    max_iters: int = num(40000, ge=1)
    seed: int = num(2, ge=0)  # rank r uses seed + r (numpy seeds are >= 0); the paper: mean over seeds 0, 1, 2
    work_dir: str = 'work_dirs/gta2cs'  # run folder: config, logs, checkpoints, debug images, predictions
    log_interval: int = num(50, ge=1)  # iterations between log lines
    eval_interval: int = num(4000, ge=0)  # iterations between evaluations on data.val (0 = only at the end)
    ckpt_interval: int = num(4000, ge=0)  # iterations between checkpoints (latest.pth); always at the end
    # also latest.pth when this many minutes passed since the last one (0 = off): bounds the work that a kill
    # without warning (node failure, SIGKILL) costs, whatever the hardware's speed (docs/cluster.md)
    ckpt_minutes: float = field(default=0.0, metadata={**num(0.0, ge=0).metadata, 'added': True})
    debug_img_interval: int = num(1000, ge=0)  # iterations between debug image grids (0 = never)
    amp: Literal['none', 'bf16', 'fp16'] = 'none'  # autocast precision (the paper: fp32)
    compile: bool = False  # torch.compile the student's encoder
    deterministic: bool = _added(False)  # deterministic algorithms, no cuDNN autotuning (slower; to compare runs)
    tensorboard: bool = _added(False)  # also TensorBoard logs in work_dir/tensorboard (pip install tensorboard)
    device: Optional[str] = None  # null = cuda if available, else cpu


@dataclass
class Config:
    model: ModelConfig = _section(ModelConfig)
    data: DataConfig = _section(DataConfig)
    uda: UDAConfig = _section(UDAConfig)
    optim: OptimConfig = _section(OptimConfig)
    train: TrainConfig = _section(TrainConfig)


# --- config trees: plain dicts with attribute access ----------------------------------------------
def _bad(key, text):
    return ConfigError(f'config key {key!r}: {text}')


class AttrDict(dict):
    """A dict whose keys can also be read as attributes: cfg.model.backbone.type."""
    __setattr__ = dict.__setitem__

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def to_attrdict(value, schema=None):
    """AttrDicts of a plain tree; each section of `schema` keeps its class as attribute _schema (validated)."""
    if isinstance(value, dict):
        hints = _hints(schema) if schema else {}
        out = AttrDict({k: to_attrdict(v, hints[k] if dataclasses.is_dataclass(hints.get(k)) else None)
                        for k, v in value.items()})
        object.__setattr__(out, '_schema', schema)
        return out
    return [to_attrdict(v) for v in value] if isinstance(value, list) else value


def validated(value, schema):
    """Whether `value` is a `schema` section from load_config / merge / resolve_section (no 2nd check)."""
    return isinstance(value, AttrDict) and value.__dict__.get('_schema') is schema


def to_plain(value):
    """Plain dicts and lists (for YAML/JSON dumps and checkpoints)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return [to_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


# --- types: each value of an update against its field's type hint ---------------------------------
_YAML11_EXPONENT = re.compile(r'[-+]?\d+(\.\d*)?[eE][-+]?\d+')  # PyYAML reads 1e-4 (no dot) as a string


def _type_name(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Literal, Union):
        return ' | '.join(repr(a) if origin is Literal else 'null' if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f'list of {_type_name(args[0])}'
    return 'a mapping' if dataclasses.is_dataclass(tp) else 'a finite number' if tp is float else tp.__name__


def _container_for(value, tp):  # a mapping for a section, a list for a list type
    return (isinstance(value, dict) and dataclasses.is_dataclass(tp)) or \
        (isinstance(value, (list, tuple)) and typing.get_origin(tp) is list)


def _check(value, tp, key, current=None):
    """`value` as the schema type `tp`, or ConfigError naming `key`; a section's mapping updates `current`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        own = [a for a in args if _container_for(value, a)]
        if own:  # a mapping or a list: its own alternative decides, its errors name the inner key (x.nmes, x[1])
            return _check(value, own[0], key, current)
        for arg in args:  # a scalar: the first alternative that fits
            with contextlib.suppress(ConfigError):
                return _check(value, arg, key)
    elif _container_for(value, tp):
        if origin is list:
            return [_check(v, args[0], f'{key}[{i}]') for i, v in enumerate(value)]
        if tp is ClassesConfig:  # data.classes: a mapping with names is a new table, else it updates the current one
            current = ClassesConfig.merge_base(current, value)
        return _merge_section(tp, current if isinstance(current, dict) else {}, value, key)
    elif origin is Literal and value in args and type(value) in {type(a) for a in args}:
        return value
    elif tp is float and (type(value) in (int, float) or _YAML11_EXPONENT.fullmatch(str(value))):
        if math.isfinite(float(value)):  # .inf, .nan, 1e999 fit no key
            return float(value)
    elif type(value) is tp:  # bool, int, str, None: exactly (a bool is no int here)
        return value
    raise _bad(key, f'expected {_type_name(tp)}, got {value!r}')


def _merge_section(cls, base, update, prefix):
    """Check `update` (a dict) against dataclass `cls` and merge it into `base`."""
    if not isinstance(update, dict):
        raise _bad(prefix, f'expected a mapping, got {update!r}')
    fields, hints, out = {f.name: f for f in dataclasses.fields(cls)}, _hints(cls), dict(base)
    for name, value in update.items():
        key = f'{prefix}.{name}' if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=2)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise ConfigError(f'unknown config key {key!r}{hint}; valid keys here: {", ".join(fields)}')
        out[name] = _check(value, hints[name], key, out.get(name, fields[name].default))
    return out


# --- ranges and relations: checked on the result of all updates -----------------------------------
def _check_ranges(tree, cls, prefix):
    """ConfigError for the first value of `tree` (a `cls` section) outside its field's range (None, 'same' pass)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key, value = f'{prefix}.{f.name}' if prefix else f.name, tree.get(f.name)
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            _check_ranges(value, hints[f.name], key)
        if 'range' not in f.metadata or value is None:
            continue
        holds, text, n = f.metadata['range']
        if isinstance(value, list) and n is not None and len(value) != n:
            raise _bad(key, f'expected {n} values, each {text}, got {value!r}')
        for i, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not holds(v):
                raise _bad(key + ('' if i is None else f'[{i}]'), f'expected a value {text}, got {v!r}')


def _check_relations(cfg):
    """Keys of a whole config that must fit together."""
    _check_model(cfg['model'], cfg['data'])
    K, uda = cfg['model']['num_classes'], cfg['uda']
    for i, c in enumerate(uda['fd_classes']):
        if c >= K:
            raise _bad(f'uda.fd_classes[{i}]', f'{c} is not a train id of the {K} classes (data.classes: '
                       f'0..{K - 1}); list the thing classes in data.classes.things and leave uda.fd_classes out, '
                       f'or give train ids below {K}')
    if uda['fd_lambda'] > 0 and not uda['fd_classes']:
        raise _bad('uda.fd_lambda', 'the ImageNet feature distance needs thing classes, and data.classes names '
                   'none: list them in data.classes.things (e.g. [car, person]), or set uda.fd_lambda: 0 to train '
                   'without the feature distance')
    if uda['fd_lambda'] > 0 and not cfg['model']['pretrained']:
        raise ConfigError('uda.fd_lambda > 0 compares features with the ImageNet encoder, which needs '
                          'model.pretrained; set uda.fd_lambda=0 to train without the feature distance')
    if uda['mask_type'] == 'token' and not cfg['model']['backbone']['type'].startswith('dinov2_'):
        raise _bad('uda.mask_type', f'token masking replaces patch tokens by a ViT\'s mask token; '
                   f'{cfg["model"]["backbone"]["type"]} has none: use pixel (MIC\'s blocks) or a dinov2_* encoder')
    if uda['mode'] in ('advseg', 'minent') and cfg['model']['type'] == 'hrda':
        raise ConfigError(f'uda.mode={uda["mode"]} is implemented for single-scale models (as Table 1 runs it): '
                          'set model.type=encoder_decoder')


def _check_model(model, data=None):
    """Constraints between keys that the model needs (data: the `data` section, when known)."""
    test = model['test']
    if test['mode'] == 'slide' and any(s > c for s, c in zip(test['stride'], test['crop_size'])):
        raise _bad('model.test.stride', f'{test["stride"]} is larger than model.test.crop_size '
                   f'{test["crop_size"]}: the sliding windows would leave gaps')
    train_input = None  # the size of the training images the model sees, and the key that sets it
    if data is not None:
        crop, sync = data['crop_size'], data['sync_crop_size']
        if sync is not None and any(s > c for s, c in zip(sync, crop)):
            raise _bad('data.sync_crop_size', f'{sync} must fit in data.crop_size {crop}')
        train_input = (sync, 'data.sync_crop_size') if sync is not None else (crop, 'data.crop_size')
    min_input = MIT_MIN_SIZE if model['backbone']['type'].startswith('mit_') else 1
    if model['type'] == 'hrda':
        return _check_hrda(model, train_input, min_input)
    for size, key in ((test['crop_size'] if test['mode'] == 'slide' else None, 'model.test.crop_size'),
                      train_input or (None, None)):
        if size is not None and min(size) < min_input:
            raise _bad(key, f'{size} is too small: the MiT encoder needs at least {MIT_MIN_SIZE}x{MIT_MIN_SIZE} pixels')


def _check_hrda(model, train_input, min_input):
    """HRDA's scales, detail crop and input sizes against the encoder and head (HRDAEncoderDecoder)."""
    hrda, test = model['hrda'], model['test']
    scales, hr = sorted(hrda['scales']), hrda['hr_crop_size']
    if len(scales) != 2 or scales[1] != 1.0 or not 0 < scales[0] < 1 or (4 / scales[0]) % 1:
        raise _bad('model.hrda.scales', 'expected [context scale, 1.0] with 4 / context scale an integer '
                   f'(e.g. [0.5, 1.0]), got {hrda["scales"]}')
    context, out_stride = scales[0], HEAD_OUTPUT_STRIDES[model['decode_head']['type']]
    if hrda['feature_scale'] != context:  # the feature distance compares the encoder features of the context view
        raise _bad('model.hrda.feature_scale', f'{hrda["feature_scale"]:g} must equal the context scale '
                   f'{context:g} of model.hrda.scales')
    divisor = round(out_stride / context)  # the context logits' stride in input pixels
    # the detail crop's corner on the output grid (the original allows 8 with DeepLabV2's context stride 16)
    if hrda['crop_coord_divisible'] % out_stride:
        raise _bad('model.hrda.crop_coord_divisible', f'{hrda["crop_coord_divisible"]} must be a multiple of the '
                   f'output stride {out_stride}, or the detail crop misaligns with the fused logits')
    # the detail crop's logits fall on the context grid, its overlapping windows (stride crop / 2) on the output grid
    need = math.lcm(divisor, 2 * out_stride if hrda['hr_slide_overlapping'] else out_stride)
    if min(hr) < min_input:
        raise _bad('model.hrda.hr_crop_size', f'{hr} is too small: the detail crop goes through the MiT encoder, '
                   f'which needs at least {MIT_MIN_SIZE}x{MIT_MIN_SIZE} pixels')
    if any(v % need for v in hr):
        raise _bad('model.hrda.hr_crop_size', f'{hr} must be divisible by {need} (HRDA with context scale '
                   f'{context:g} and output stride {out_stride}), e.g. {[max(need, v // need * need) for v in hr]}')
    if hrda['hr_loss_weight'] + hrda['lr_loss_weight'] > 1:
        raise ConfigError(f"config keys 'model.hrda.hr_loss_weight' + 'model.hrda.lr_loss_weight' = "
                          f'{hrda["hr_loss_weight"]} + {hrda["lr_loss_weight"]} exceed 1 (the fused loss gets '
                          f'1 - their sum)')
    min_size = math.ceil(min_input / context)  # the context view goes through the encoder too
    if test['mode'] == 'slide' and min(test['crop_size']) < min_size:
        raise _bad('model.test.crop_size', f'{test["crop_size"]} is too small for HRDA: the context view '
                   f'({context:g}x) needs windows of at least {min_size}x{min_size} pixels')
    size, key = train_input or (None, None)
    if size and any(h > s for h, s in zip(hr, size)):
        raise _bad('model.hrda.hr_crop_size', f'{hr} is larger than the training crop {key} {size}: the detail '
                   f'crop is cut out of it')
    if size and (min(size) < min_size or any(v % divisor for v in size)):
        raise _bad(key, f'{size} must be divisible by {divisor} and at least {min_size}x{min_size} pixels for '
                   f'HRDA with context scale {context:g}')


# --- resolving, loading, storing ------------------------------------------------------------------
def _complete(cfg, bands=True):
    """A merged plain config with data.classes resolved, and what follows from it where null (in place);
    bands=False: model.in_channels stands on its own (a model section resolved without its data)."""
    try:
        follow_classes(cfg)
    except ClassesError as e:
        raise ConfigError(str(e)) from None
    return _complete_bands(cfg) if bands else cfg


def _complete_bands(cfg):
    """model.in_channels follows data.channels; data.mean / data.std give one value per band (in place)."""
    data, model = cfg['data'], cfg['model']
    if model['in_channels'] == 3:
        model['in_channels'] = data['channels']
    elif model['in_channels'] != data['channels']:
        raise _bad('model.in_channels', f"{model['in_channels']} disagrees with data.channels {data['channels']}: "
                   f'leave model.in_channels out (it follows data.channels)')
    n = data['channels']
    for key in ('mean', 'std'):
        if data[key] is None and n != 3:
            raise _bad(f'data.{key}', f'{n} bands (data.channels) need one {key} per band, of 0..255 values: '
                       f'ImageNet\'s RGB ones, then those of your extra bands (python mic_data.py check CFG '
                       f'prints them); only RGB has a default')
        if data[key] is not None and len(data[key]) != n:
            raise _bad(f'data.{key}', f'{len(data[key])} values for {n} bands (data.channels)')
    return cfg


def _resolve(cfg, updates):
    """`cfg` with `updates` merged in order, resolved and checked (keys may fit together only at the end)."""
    for update in updates:
        cfg = _merge_section(Config, cfg, update, '')
    _check_ranges(_complete(cfg), Config, '')
    _check_relations(cfg)
    return to_attrdict(cfg, Config)


def defaults(section=None):
    """The default config as a plain dict (or one section of it: 'model', 'data', ...), resolved."""
    tree = _complete(dataclasses.asdict(Config()))
    return tree if section is None else tree[section]


def resolve_section(name, values):
    """A partial section (e.g. a released model config) filled with defaults and validated, or as it is."""
    cls = _hints(Config)[name]
    if validated(values, cls):
        return values
    tree = _merge_section(Config, dataclasses.asdict(Config()), {name: to_plain(values or {})}, '')
    section = _complete(tree, bands=name != 'model')[name]
    _check_ranges(section, cls, name)
    if name == 'model':
        _check_model(section)
    return to_attrdict(section, cls)


def merge(cfg, *updates):
    """A full config with (nested, partial) updates merged in order (and what follows new data.classes)."""
    out, updates = to_plain(cfg), [to_plain(u) for u in updates]
    if any(isinstance(u.get('data'), dict) and 'classes' in u['data'] for u in updates):
        out['model']['num_classes'] = out['uda']['fd_classes'] = None
    if any(isinstance(u.get('data'), dict) and 'channels' in u['data'] for u in updates):
        out['model']['in_channels'] = 3  # the default: follows the new data.channels
    return _resolve(out, updates)


def load_config(path=None, overrides=()):
    """The validated config: defaults, then the YAML file at `path`, then `overrides` (strings
    'key.sub=value' with YAML values, in order). An AttrDict tree: cfg['model'] is cfg.model."""
    def updates():  # one at a time: errors come in the order of the command line
        if path is not None:
            update = read_yaml(path, f'config file {path}', ' (the shipped ones are in configs/)')
            if not isinstance(update, dict):
                raise ConfigError(f'config file {path} must hold a mapping of sections, got {type(update).__name__}')
            yield update
        for key, value in map(parse_override, overrides):
            for part in reversed(key.split('.')):
                value = {part: value}
            yield value
    return _resolve(dataclasses.asdict(Config()), updates())  # keys that follow data.classes are null


def stored(cfg):
    """The config written to run folders and checkpoints: plain, without _added keys at their default."""
    def drop(tree, cls):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if f.metadata.get('added') and f.name in tree and tree[f.name] == default:
                del tree[f.name]
            elif isinstance(tree.get(f.name), dict) and dataclasses.is_dataclass(_hints(cls)[f.name]):
                drop(tree[f.name], _hints(cls)[f.name])
        return tree
    return drop(to_plain(cfg), Config)


def dump_yaml(cfg):
    return yaml.safe_dump(stored(cfg), sort_keys=False, default_flow_style=None)


def main(argv=None):
    from mic_runtime import exit_error  # imports torch: only for the command line
    parser = argparse.ArgumentParser(description='Print the resolved config of a YAML file plus overrides.')
    parser.add_argument('cfg', nargs='?', help='YAML config (default: the built-in defaults)')
    parser.add_argument('--opt', nargs='+', default=[], metavar='KEY=VALUE', help='overrides, e.g. train.max_iters=100')
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(dump_yaml(load_config(args.cfg, args.opt)))
    except ConfigError as e:
        exit_error(e)


if __name__ == '__main__':
    main()
