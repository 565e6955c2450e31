"""The configuration schema: every default of every stage, in one place.

The defaults are the paper's MIC(HRDA) GTA->Cityscapes setting (experiment 80 of the reference,
seed 2 = the released checkpoint). A YAML file in configs/ lists only what it changes; `--opt
a.b=value` overrides anything after it:

    from mic_config import load_config
    cfg = load_config('configs/gta2cs.yaml', ['model.backbone.type=mit_b0'])
    cfg.model.backbone.type, cfg['train']['max_iters']

    python mic_config.py configs/demo.yaml --opt train.max_iters=10   # prints the resolved config

Holds the schema (one dataclass per section, one commented field per key, its allowed range beside
its default), the type and range checks, the checks of keys that must fit together, and loading,
merging and dumping. Unknown keys, wrong types, non-finite numbers, values outside their range and
keys that do not fit together (an HRDA detail crop larger than the training crop, ...) raise
ConfigError naming the key, the value and what is allowed. The resolved config is a tree of plain
dicts (JSON-serialisable, stored in every checkpoint) that also allows attribute access.

Classes are data: data.classes names the classes of the task (default: the 19 Cityscapes classes
of the benchmarks); model.num_classes and uda.fd_classes follow from it unless given. Its table and
checks are in mic_classes. Keys added after the first release (data.classes, the folder keys
img_dir and label_dir, train.deterministic and train.tensorboard) are left out of stored configs
while they hold their defaults, so that the stored configs of the existing experiments are byte
for byte what they were; loading fills them in.

Imports the standard library, mic_classes (numpy) and, where used, yaml; no torch, so that
mic_model can use the schema. The names of mic_model's tables are repeated here (BACKBONE_TYPES,
...) and held to them by tests/test_config.py.
"""
import argparse
import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import List, Literal, NamedTuple, Optional, Union

from mic_classes import CLASS_PRESETS, ClassesConfig, ClassesError, normalise_classes, resolve_classes


class Range(NamedTuple):
    """Allowed numbers lo <= v <= hi (open ends: lo < v, v < hi; None: unbounded); with `n`, a list of
    that many such numbers. None values (optional keys) and non-numbers ('same') pass."""
    lo: Optional[float]
    hi: Optional[float]
    lo_open: bool
    hi_open: bool
    n: Optional[int]

    def holds(self, v):
        return ((self.lo is None or v > self.lo or (v == self.lo and not self.lo_open))
                and (self.hi is None or v < self.hi or (v == self.hi and not self.hi_open)))

    def text(self):
        lo = f'{"(" if self.lo_open else "["}{self.lo:g}' if self.lo is not None else None
        hi = f'{self.hi:g}{")" if self.hi_open else "]"}' if self.hi is not None else None
        if lo and hi:
            return f'in {lo}, {hi}'
        if lo:
            return f'{">" if self.lo_open else ">="} {self.lo:g}'
        return f'{"<" if self.hi_open else "<="} {self.hi:g}'


def num(default, ge=None, gt=None, le=None, lt=None, n=None):
    """A field of numbers allowed only in a range: ge <= v <= le (gt, lt: strict); with n, a list of n
    of them. A list default is copied per instance (dataclasses need a factory for mutable ones)."""
    meta = {'range': Range(ge if gt is None else gt, le if lt is None else lt, gt is not None, lt is not None, n)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def unit(default, **kw):
    """A share, probability or momentum: a number in [0, 1]."""
    return num(default, ge=0, le=1, **kw)


def _list(*values):
    return field(default_factory=lambda: list(values))


def _section(cls, **values):
    return field(default_factory=lambda: cls(**values))


def _added(default=None):
    """A key added after the first release: stored() leaves it out while it holds its default, so
    that the stored configs of earlier runs (run folders, checkpoints) stay as they were."""
    return field(default=default, metadata={'added': True})


# --------------------------------------------------------------------------
# model: mic_model.build_model(cfg.model)
# --------------------------------------------------------------------------

# The names of mic_model.BACKBONES and mic_model.HEADS, the output stride of each head's model
# (backbone.feature_strides[head.logits_stage]) and MiT's smallest input: repeated here because
# mic_model imports this file (build_model resolves its section); tests/test_config.py holds them to it.
BACKBONE_TYPES = ('mit_b0', 'mit_b1', 'mit_b2', 'mit_b3', 'mit_b4', 'mit_b5', 'resnet50_v1c', 'resnet101_v1c')
HEAD_TYPES = ('daformer', 'segformer', 'deeplabv2')
HEAD_OUTPUT_STRIDES = {'daformer': 4, 'segformer': 4, 'deeplabv2': 8}  # MiT + DAFormer/SegFormer, ResNet + DLV2
MIT_MIN_SIZE = 32  # mic_model.MiT: stage 1 reduces keys/values 8x8 from a map at stride 4


@dataclass
class BackboneConfig:
    # MiT variant, or ResNet-V1c with dilated stages 3-4 (output stride 8; DeepLabV2's encoder in Table 1)
    type: Literal[BACKBONE_TYPES] = 'mit_b5'
    drop_path_rate: float = unit(0.1)  # MiT only: stochastic depth, rising linearly over all blocks to this value


@dataclass
class DecodeHeadConfig:
    # DAFormer context-aware fusion, SegFormer's MLP head, or DeepLabV2's dilated-conv classifier (Table 1)
    type: Literal[HEAD_TYPES] = 'daformer'
    embed_dims: int = num(256, ge=1)  # daformer/segformer: width of the token embeddings and fusion (SegFormer-B5: 768)
    dropout: float = unit(0.1)  # daformer/segformer: Dropout2d before the classifier (DeepLabV2 has none)
    # deeplabv2: dilations of the 3x3 classifier convs, summed. (6, 12) is the original's 'dlv2red' (Table 1,
    # as AdaptSegNet and later UDA work); DeepLabV2's paper and the original's 'dlv2' use [6, 12, 18, 24]
    dilations: List[int] = _list(6, 12)


@dataclass
class HRDAConfig:
    scales: List[float] = num([0.5, 1.0], gt=0)  # [context scale, detail scale]; sorted ascending, detail must be 1
    # detail crop (h, w) in training, and the window of the detail sliding inference
    hr_crop_size: List[int] = num([512, 512], ge=1, n=2)
    # detail crop corner divisible by this (DAFormer: output stride 4 x context downscale 2). The original keeps 8
    # for DeepLabV2 (output stride 8) too: the box then maps onto the context logits with truncation, as there
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


@dataclass
class ModelConfig:
    # HRDA multi-resolution, or DAFormer's plain single-scale segmentor
    type: Literal['hrda', 'encoder_decoder'] = 'hrda'
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


# --------------------------------------------------------------------------
# data: mic_data (sizes are (h, w) pairs in pixels, scales (long side, short side))
# --------------------------------------------------------------------------

@dataclass
class DatasetConfig:
    type: Literal['gta', 'synthia', 'cityscapes', 'acdc', 'darkzurich', 'folder'] = 'gta'  # on-disk layout (README)
    root: str = 'data/gta'  # dataset folder
    split: str = 'train'  # train / val / test (ignored by gta and synthia, which have one split)
    img_scale: List[int] = num([2560, 1440], ge=1, n=2)  # resize keeping the ratio to fit (long side, short side)
    # target only: [top, bottom, left, right] pixels of the resized image whose pseudo-labels get weight 0
    crop_pseudo_margins: Optional[List[int]] = num(None, ge=0, n=4)
    img_suffix: str = '.png'  # folder only: image file suffix
    label_suffix: Optional[str] = None  # folder only: label = image path with img_suffix -> this; null: none
    img_dir: Optional[str] = _added()  # folder only: images under root/img_dir (null: anywhere under root)
    label_dir: Optional[str] = _added()  # folder only: labels under root/label_dir at the image's relative
    #   path (null: beside the images)


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
    # the classes: a preset name (cityscapes: the 19 classes of the benchmarks), a list of names, or
    # {names, palette, ignore_index, things} (mic_classes.ClassesConfig). model.num_classes and
    # uda.fd_classes follow from it. Read it with mic_data.class_table(cfg.data)
    classes: Union[Literal[tuple(CLASS_PRESETS)], List[str], ClassesConfig] = _added('cityscapes')
    source: DatasetConfig = _section(DatasetConfig)  # labelled source domain
    target: DatasetConfig = _section(  # unlabelled target domain (its labels are never read in training)
        DatasetConfig, type='cityscapes', root='data/cityscapes', split='train', img_scale=[2048, 1024],
        crop_pseudo_margins=[30, 240, 30, 30])
    val: DatasetConfig = _section(  # evaluation split
        DatasetConfig, type='cityscapes', root='data/cityscapes', split='val', img_scale=[2048, 1024])
    crop_size: List[int] = num([1024, 1024], ge=1, n=2)  # training crop (h, w) of source and target
    # source crops: re-draw (up to 10 times) while one class covers >= this share (>= 1: no re-draws)
    cat_max_ratio: float = num(0.75, gt=0)
    sync_crop_size: Optional[List[int]] = num(None, ge=1, n=2)  # crop source and target again at one shared box
    rcs: RCSConfig = _section(RCSConfig)
    demo: DemoConfig = _section(DemoConfig)
    batch_size: int = num(2, ge=1)  # source and target images per GPU and iteration
    num_workers: int = num(4, ge=0)  # data-loader worker processes per GPU


# --------------------------------------------------------------------------
# uda: the self-training method (mic_train)
# --------------------------------------------------------------------------

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


UDA_MODES = ('dacs', 'source_only', 'advseg', 'minent')  # the keys of mic_train.METHODS


@dataclass
class UDAConfig:
    # DACS self-training (+ DAFormer/HRDA), source-only training, AdvSeg or MinEnt; MIC goes on top of each
    mode: Literal[UDA_MODES] = 'dacs'
    alpha: float = unit(0.999)  # EMA teacher momentum (alpha_t = min(1 - 1/(t+1), alpha))
    pseudo_threshold: float = unit(0.968)  # pseudo-label weight = share of target pixels with confidence >= this
    pseudo_weight_ignore_top: int = num(0, ge=0)  # DAFormer's legacy margins: zero the pseudo weight of top rows
    pseudo_weight_ignore_bottom: int = num(0, ge=0)  # ... and bottom rows
    fd_lambda: float = num(0.005, ge=0)  # ImageNet feature distance weight (0 = off)
    # train ids of the classes the distance applies to; null: the things of data.classes (Cityscapes:
    # 6, 7, 11, ..., 18). A list here takes precedence over data.classes.things
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
    mask_ratio: float = unit(0.7)  # share of masked patches
    advseg: AdvSegConfig = _section(AdvSegConfig)  # used when mode == 'advseg'
    minent: MinEntConfig = _section(MinEntConfig)  # used when mode == 'minent'


# --------------------------------------------------------------------------
# optim and train (mic_train)
# --------------------------------------------------------------------------

@dataclass
class OptimConfig:
    type: Literal['adamw', 'sgd'] = 'adamw'  # the segmentor's optimizer (Table 1's AdvSeg/MinEnt runs: sgd)
    lr: float = num(6e-5, gt=0)  # learning rate of the encoder
    head_lr_mult: float = num(10.0, ge=0)  # decoder learning rate = lr * this
    betas: List[float] = num([0.9, 0.999], ge=0, lt=1, n=2)  # adamw only
    momentum: float = unit(0.9)  # sgd only
    weight_decay: float = num(0.01, ge=0)  # 0 for the encoder's norm layers
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


# --------------------------------------------------------------------------
# Config trees: plain dicts with attribute access
# --------------------------------------------------------------------------

class ConfigError(ValueError):
    pass


class AttrDict(dict):
    """A dict whose keys can also be read as attributes: cfg.model.backbone.type."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def to_attrdict(value, schema=None):
    """AttrDicts of a (plain) tree. schema: the dataclass the tree was checked against; each section
    gets its class as the attribute _schema (kept by copy.deepcopy and pickle, not a key), so that
    validated() knows it needs no second check."""
    if isinstance(value, dict):
        hints = _hints(schema) if schema is not None else {}
        out = AttrDict({k: to_attrdict(v, hints.get(k) if dataclasses.is_dataclass(hints.get(k)) else None)
                        for k, v in value.items()})
        if schema is not None:
            object.__setattr__(out, '_schema', schema)
        return out
    if isinstance(value, list):
        return [to_attrdict(v) for v in value]
    return value


def validated(value, schema):
    """True when `value` came out of load_config / merge / resolve_section as a `schema` section:
    build_model and the datasets then take it as it is instead of checking it again."""
    return isinstance(value, AttrDict) and value.__dict__.get('_schema') is schema


def to_plain(value):
    """Plain dicts and lists (for YAML/JSON dumps and checkpoints)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------
# Types: every value of an update checked against its field's type hint
# --------------------------------------------------------------------------

_hints = typing.get_type_hints
_YAML11_EXPONENT = re.compile(r'[-+]?\d+(\.\d*)?[eE][-+]?\d+')  # PyYAML reads 1e-4 (no dot) as a string


def _type_name(tp):
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return 'a mapping'
    if typing.get_origin(tp) is Literal:
        return ' | '.join(repr(a) for a in args)
    if typing.get_origin(tp) is Union:
        return ' | '.join('null' if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f'list of {_type_name(args[0])}'
    return tp.__name__


def _check_union(value, tp, key):
    """The alternative of the value's own kind (a mapping, a list) decides, so that its error names
    the inner key ('data.classes.nmes', 'data.sync_crop_size[1]'); a scalar takes the first that fits."""
    args = typing.get_args(tp)
    kind = dataclasses.is_dataclass if isinstance(value, dict) else \
        (lambda a: typing.get_origin(a) is list) if isinstance(value, (list, tuple)) else None
    for arg in args:
        if kind is not None and kind(arg):
            return _check(value, arg, key)
    for arg in args:
        try:
            return _check(value, arg, key)
        except ConfigError:
            pass
    raise ConfigError(f'config key {key!r}: expected {_type_name(tp)}, got {value!r}')


def _check(value, tp, key):
    """Return `value` converted to the schema type `tp`, or raise naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return _check_union(value, tp, key)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _merge_section(tp, {}, value, key)
    if origin is list and isinstance(value, (list, tuple)):
        return [_check(v, args[0], f'{key}[{i}]') for i, v in enumerate(value)]
    if origin is Literal and value in args and type(value) in {type(a) for a in args}:
        return value
    if tp is float and (type(value) in (int, float) or (isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value))):
        if not math.isfinite(float(value)):  # .inf, .nan, 1e999: no schedule or weight means anything then
            raise ConfigError(f'config key {key!r}: expected a finite number, got {value!r}')
        return float(value)
    if tp in (bool, int, str, type(None)) and type(value) is tp:  # exact: a bool is no int here
        return value
    raise ConfigError(f'config key {key!r}: expected {_type_name(tp)}, got {value!r}')


def _merge_section(cls, base, update, prefix):
    """Check `update` (a dict) against dataclass `cls` and merge it into `base`."""
    if not isinstance(update, dict):
        raise ConfigError(f'config key {prefix!r}: expected a mapping, got {update!r}')
    fields, hints = {f.name: f for f in dataclasses.fields(cls)}, _hints(cls)
    out = dict(base)
    for name, value in update.items():
        key = f'{prefix}.{name}' if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=2)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise ConfigError(f'unknown config key {key!r}{hint}; valid keys here: {", ".join(fields)}')
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[name] = _merge_section(tp, out.get(name, {}), value, key)
        elif isinstance(value, dict) and ClassesConfig in typing.get_args(tp):
            # data.classes given as a mapping updates the current table (--opt data.classes.things=[car]),
            # or starts a new one when it holds names
            current = ClassesConfig.merge_base(out.get(name, fields[name].default), value)
            out[name] = _merge_section(ClassesConfig, current, value, key)
        else:
            out[name] = _check(value, tp, key)
    return out


# --------------------------------------------------------------------------
# Ranges and relations: checked on the result of all updates (keys that must fit together may
# change one override at a time)
# --------------------------------------------------------------------------

def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_ranges(tree, cls, prefix):
    """Raise ConfigError for the first value of `tree` (a section of schema `cls`) outside the range
    of its field (num(), unit())."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key, value, rng = f'{prefix}.{f.name}' if prefix else f.name, tree.get(f.name), f.metadata.get('range')
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            _check_ranges(value, hints[f.name], key)
        elif rng is None or value is None:
            continue
        elif isinstance(value, list):
            if rng.n is not None and len(value) != rng.n:
                raise ConfigError(f'config key {key!r}: expected {rng.n} values, each {rng.text()}, got {value!r}')
            for i, v in enumerate(value):
                if _is_number(v) and not rng.holds(v):
                    raise ConfigError(f"config key '{key}[{i}]': expected a value {rng.text()}, got {v!r}")
        elif _is_number(value) and not rng.holds(value):
            raise ConfigError(f'config key {key!r}: expected a value {rng.text()}, got {value!r}')


def _check_relations(cfg):
    """Keys of a whole config that must fit together."""
    _check_model(cfg['model'], cfg['data'])
    _check_classes(cfg)


def _check_model(model, data=None):
    """Constraints between keys that the model needs (data: the `data` section, when known)."""
    test = model['test']
    if test['mode'] == 'slide' and any(s > c for s, c in zip(test['stride'], test['crop_size'])):
        raise ConfigError(f'config key \'model.test.stride\': {test["stride"]} is larger than '
                          f'model.test.crop_size {test["crop_size"]}: the sliding windows would leave gaps')
    train_input = None  # the size of the training images the model sees, and the key that sets it
    if data is not None:
        crop, sync = data['crop_size'], data['sync_crop_size']
        if sync is not None and any(s > c for s, c in zip(sync, crop)):
            raise ConfigError(f"config key 'data.sync_crop_size': {sync} must fit in data.crop_size {crop}")
        train_input = (sync, 'data.sync_crop_size') if sync is not None else (crop, 'data.crop_size')
    min_input = MIT_MIN_SIZE if model['backbone']['type'].startswith('mit_') else 1
    if model['type'] == 'hrda':
        return _check_hrda(model, train_input, min_input)
    for size, key in ((test['crop_size'] if test['mode'] == 'slide' else None, 'model.test.crop_size'),
                      train_input or (None, None)):
        if size is not None and min(size) < min_input:
            raise ConfigError(f'config key {key!r}: {size} is too small: the MiT encoder needs at least '
                              f'{MIT_MIN_SIZE}x{MIT_MIN_SIZE} pixels')


def _check_hrda(model, train_input, min_input):
    """HRDA's scales, detail crop and input sizes against the encoder and head (mic_model.HRDAEncoderDecoder)."""
    hrda, test = model['hrda'], model['test']
    scales = sorted(hrda['scales'])
    if len(scales) != 2 or scales[1] != 1.0 or not 0 < scales[0] < 1 or (4 / scales[0]) % 1:
        raise ConfigError(f"config key 'model.hrda.scales': expected [context scale, 1.0] with 4 / context "
                          f'scale an integer (e.g. [0.5, 1.0]), got {hrda["scales"]}')
    context, out_stride = scales[0], HEAD_OUTPUT_STRIDES[model['decode_head']['type']]
    if hrda['feature_scale'] != context:  # the feature distance compares the encoder features of the context view
        raise ConfigError(f"config key 'model.hrda.feature_scale': {hrda['feature_scale']:g} must equal the context "
                          f'scale {context:g} of model.hrda.scales')
    divisor = round(out_stride / context)  # the context logits' stride in input pixels
    # The detail crop's corner must fall on the output grid. (On the context grid too, ideally: the
    # original keeps crop_coord_divisible 8 also for DeepLabV2, whose context stride is 16, and
    # truncates the box there; we do the same, so that is allowed.)
    if hrda['crop_coord_divisible'] % out_stride:
        raise ConfigError(f"config key 'model.hrda.crop_coord_divisible': {hrda['crop_coord_divisible']} must be "
                          f'a multiple of the output stride {out_stride}, or the detail crop misaligns with the '
                          f'fused logits')
    # the detail crop's logits must fall on the context grid, and its overlapping windows (stride
    # crop / 2) on the output grid
    need = math.lcm(divisor, 2 * out_stride if hrda['hr_slide_overlapping'] else out_stride)
    hr = hrda['hr_crop_size']
    if min(hr) < min_input:
        raise ConfigError(f"config key 'model.hrda.hr_crop_size': {hr} is too small: the detail crop goes through "
                          f'the MiT encoder, which needs at least {MIT_MIN_SIZE}x{MIT_MIN_SIZE} pixels')
    if any(v % need for v in hr):
        raise ConfigError(f"config key 'model.hrda.hr_crop_size': {hr} must be divisible by {need} (HRDA with "
                          f'context scale {context:g} and output stride {out_stride}), e.g. '
                          f'{[max(need, v // need * need) for v in hr]}')
    if hrda['hr_loss_weight'] + hrda['lr_loss_weight'] > 1:
        raise ConfigError(f"config keys 'model.hrda.hr_loss_weight' + 'model.hrda.lr_loss_weight' = "
                          f'{hrda["hr_loss_weight"]} + {hrda["lr_loss_weight"]} exceed 1 (the fused loss gets '
                          f'1 - their sum)')
    min_size = math.ceil(min_input / context)  # the context view goes through the encoder too
    if test['mode'] == 'slide' and min(test['crop_size']) < min_size:
        raise ConfigError(f"config key 'model.test.crop_size': {test['crop_size']} is too small for HRDA: the "
                          f'context view ({context:g}x) needs windows of at least {min_size}x{min_size} pixels')
    if train_input:
        size, key = train_input
        if any(h > s for h, s in zip(hr, size)):
            raise ConfigError(f"config key 'model.hrda.hr_crop_size': {hr} is larger than the training crop "
                              f'{key} {size}: the detail crop is cut out of it')
        if min(size) < min_size or any(v % divisor for v in size):
            raise ConfigError(f'config key {key!r}: {size} must be divisible by {divisor} and at least '
                              f'{min_size}x{min_size} pixels for HRDA with context scale {context:g}')


def _check_classes(cfg):
    """The keys that depend on the classes: uda.fd_classes must be train ids of them."""
    K, uda = cfg['model']['num_classes'], cfg['uda']
    for i, c in enumerate(uda['fd_classes']):
        if c >= K:
            raise ConfigError(f"config key 'uda.fd_classes[{i}]': {c} is not a train id of the {K} classes "
                              f'(data.classes: 0..{K - 1}); list the thing classes in data.classes.things and '
                              f'leave uda.fd_classes out, or give train ids below {K}')
    if uda['fd_lambda'] > 0 and not uda['fd_classes']:
        raise ConfigError("config key 'uda.fd_lambda': the ImageNet feature distance needs thing classes, and "
                          'data.classes names none: list them in data.classes.things (e.g. [car, person]), or '
                          'set uda.fd_lambda: 0 to train without the feature distance')


def check_values(cfg, section=None):
    """Raise ConfigError, naming the key, for a value outside its range or keys that do not fit
    together. cfg: a whole config (section None) or one section ('model', 'data', ...)."""
    _check_ranges(cfg, _hints(Config)[section] if section else Config, section or '')
    if section is None:
        _check_relations(cfg)
    elif section == 'model':
        _check_model(cfg)


# --------------------------------------------------------------------------
# Resolving: data.classes and the keys that follow from it
# --------------------------------------------------------------------------

def _complete(cfg):
    """Resolve a merged whole config (a plain dict, in place): data.classes in its resolved form,
    model.num_classes and uda.fd_classes derived from it where null. Raises ConfigError when
    model.num_classes disagrees with data.classes."""
    data, model, uda = cfg['data'], cfg['model'], cfg['uda']
    try:
        classes = data['classes'] = normalise_classes(data.get('classes'))
        named = len(CLASS_PRESETS[classes]['names'] if isinstance(classes, str) else classes['names'])
        if model['num_classes'] is None:
            model['num_classes'] = named
        elif not isinstance(classes, str) and model['num_classes'] != named:
            raise ConfigError(f"config keys 'model.num_classes' ({model['num_classes']}) and 'data.classes' ({named} "
                              f'names) disagree: leave model.num_classes out (it follows data.classes) or make '
                              f'them agree')
        if uda['fd_classes'] is None:
            uda['fd_classes'] = list(resolve_classes(classes, model['num_classes'])['things'])
    except ClassesError as e:
        raise ConfigError(str(e)) from None
    return cfg


# --------------------------------------------------------------------------
# Loading, merging, storing
# --------------------------------------------------------------------------

def _schema_defaults():
    """The schema's defaults before resolution: keys that follow from data.classes are null."""
    return dataclasses.asdict(Config())


def _resolve(cfg, updates):
    """Merge `updates` (dicts, in order) into the plain config `cfg`, resolve and check the result."""
    for update in updates:
        cfg = _merge_section(Config, cfg, update, '')
    _complete(cfg)
    check_values(cfg)  # once all updates are in: keys that must fit together may change one by one
    return to_attrdict(cfg, Config)


def defaults(section=None):
    """The default config as a plain dict (or one section of it: 'model', 'data', ...), resolved."""
    tree = _complete(_schema_defaults())
    return tree if section is None else tree[section]


def resolve_section(name, values):
    """Fill a partial section dict (e.g. a released model config) with defaults and validate it.
    A section of a config that load_config already validated is returned as it is."""
    cls = _hints(Config)[name]
    if validated(values, cls):
        return values
    tree = _merge_section(Config, _schema_defaults(), {name: to_plain(values or {})}, '')
    section = _complete(tree)[name]  # what follows from data.classes follows from the default classes
    check_values(section, name)
    return to_attrdict(section, cls)


def merge(cfg, *updates):
    """Validate (nested, partial) updates and merge them, in order, into a full config dict; the
    ranges and relations of the values are checked on the result. An update of data.classes makes
    model.num_classes and uda.fd_classes follow the new classes, unless the updates give them."""
    out, updates = to_plain(cfg), [to_plain(u) for u in updates]
    if any(isinstance(u.get('data'), dict) and 'classes' in u['data'] for u in updates):
        out['model']['num_classes'] = out['uda']['fd_classes'] = None
    return _resolve(out, updates)


def load_config(path=None, overrides=()):
    """The validated config: defaults, then the YAML file at `path`, then `overrides`.

    overrides: strings 'key.sub=value' (YAML values) applied in order.
    Returns an AttrDict tree: cfg['model'] == cfg.model is what build_model takes.
    """
    def updates():  # one at a time, so that errors come in the order of the command line
        if path is not None:
            update = read_yaml(path, f'config file {path}', ' (the shipped ones are in configs/)')
            if not isinstance(update, dict):
                raise ConfigError(f'config file {path} must hold a mapping of sections, got {type(update).__name__}')
            yield update
        for text in overrides:
            key, value = parse_override(text)
            for part in reversed(key.split('.')):
                value = {part: value}
            yield value
    return _resolve(_schema_defaults(), updates())


def stored(cfg):
    """The config as it is written to run folders and checkpoints: plain dicts, without the keys
    added after the first release while they hold their default (_added), so that the stored
    configs of earlier runs stay comparable. In memory every key is present."""
    def drop(tree, cls):
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get('added') and f.name in tree and tree[f.name] == f.default:
                del tree[f.name]
            elif dataclasses.is_dataclass(hints[f.name]) and isinstance(tree.get(f.name), dict):
                drop(tree[f.name], hints[f.name])
        return tree
    return drop(to_plain(cfg), Config)


def dump_yaml(cfg):
    import yaml
    return yaml.safe_dump(stored(cfg), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------
# Reading YAML: config files, overrides, the experiment table
# --------------------------------------------------------------------------

def _yaml_loader():
    """yaml.SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last silently:
    two `train:` sections would drop the first)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == 'tag:yaml.org,2002:merge':  # '<<: *base' may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable):
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)
    return Loader


class DuplicateKeyError(Exception):
    def __init__(self, key, first_line, line):
        super().__init__(f'key {key!r} is given twice in one mapping (lines {first_line} and {line}); '
                         f'the second would silently replace the first: merge them into one')


def parse_override(text):
    """'a.b.c=value' -> ('a.b.c', value) with the value read as YAML (null, 3, 1e-4, [1, 2], text)."""
    import yaml  # imported here so that mic_model (torch only) can use the schema without it
    if '=' not in text:
        raise ConfigError(f'override {text!r} must look like key.sub=value')
    key, raw = text.split('=', 1)
    try:
        value = yaml.load(raw, Loader=_yaml_loader()) if raw.strip() else ''
    except (yaml.YAMLError, DuplicateKeyError) as e:
        raise ConfigError(f'override {text!r}: the value is not valid YAML ({e})') from None
    return key.strip(), value


def read_yaml(path, what, missing_hint=''):
    """The YAML document at `path` ({} when empty); ConfigError '<what> does not exist<hint>', '<what>
    is a folder ...', '<what> is not UTF-8 text ...', '<what> is not valid YAML: ...' otherwise."""
    import yaml
    try:
        with open(path, 'rb') as f:
            data = f.read()
        if b'\0' in data:  # UTF-16 or binary: NUL bytes are valid UTF-8, but never in a YAML file
            raise UnicodeDecodeError('utf-8', data, data.index(b'\0'), data.index(b'\0') + 1, 'NUL byte')
        return yaml.load(data.decode('utf-8'), Loader=_yaml_loader()) or {}
    except FileNotFoundError:
        raise ConfigError(f'{what} does not exist{missing_hint}') from None
    except IsADirectoryError:
        raise ConfigError(f'{what} is a folder, not a YAML file') from None
    except OSError as e:
        raise ConfigError(f'{what} cannot be read: {e.strerror or e}') from None
    except UnicodeDecodeError as e:
        raise ConfigError(f'{what} is not UTF-8 text (byte {e.start}: a binary file, or another encoding such '
                          f'as UTF-16); save it as UTF-8 YAML') from None
    except DuplicateKeyError as e:
        raise ConfigError(f'{what}: {e}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'{what} is not valid YAML: {e}') from None


def main(argv=None):
    from mic_runtime import exit_error
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
