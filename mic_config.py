"""The configuration schema: every default of every stage, in one place.

The defaults are the paper's MIC(HRDA) GTA->Cityscapes setting (experiment 80
of the reference, seed 2 = the released checkpoint). A YAML file in configs/
lists only what it changes; `--opt a.b=value` overrides anything after it:

    from mic_config import load_config
    cfg = load_config('configs/gta2cs.yaml', ['model.backbone.type=mit_b0'])
    cfg.model.backbone.type, cfg['train']['max_iters']

    python mic_config.py configs/demo.yaml --opt train.max_iters=10   # prints the resolved config

Unknown keys, values of the wrong type, values outside their range (_RANGES: a
negative max_iters, a probability above 1, ...) and keys that do not fit together
(an HRDA detail crop larger than the training crop, ...) raise ConfigError naming
the key, the value and what is allowed.
The resolved config is a tree of plain dicts (JSON-serialisable, stored in
every checkpoint) that also allows attribute access.

Classes are data: data.classes names the classes of the task (default: the 19 Cityscapes classes
of the benchmarks), with their colours, the label value of unlabelled pixels and the 'thing'
classes; model.num_classes and uda.fd_classes follow from it unless given (resolve_classes()
gives the table). Keys added after the first release (data.classes, the folder keys img_dir and
label_dir) are left out of the resolved config while they hold their defaults, so the resolved
configs of the existing experiments are byte for byte what they were.
"""
import argparse
import copy
import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union


def _list(*values):
    """A list default (dataclasses need a factory for mutable defaults)."""
    return field(default_factory=lambda: list(values))


def _section(cls):
    return field(default_factory=cls)


# --------------------------------------------------------------------------
# model: mic_model.build_model(cfg.model)
# --------------------------------------------------------------------------

# The names of mic_model.BACKBONES and mic_model.HEADS (a test keeps them in step; no torch here).
BACKBONE_TYPES = ('mit_b0', 'mit_b1', 'mit_b2', 'mit_b3', 'mit_b4', 'mit_b5', 'resnet50_v1c', 'resnet101_v1c')
HEAD_TYPES = ('daformer', 'segformer', 'deeplabv2')


@dataclass
class BackboneConfig:
    # MiT variant, or ResNet-V1c with dilated stages 3-4 (output stride 8; DeepLabV2's encoder in Table 1)
    type: Literal[BACKBONE_TYPES] = 'mit_b5'
    drop_path_rate: float = 0.1  # MiT only: stochastic depth, rising linearly over all blocks to this value


@dataclass
class DecodeHeadConfig:
    # DAFormer context-aware fusion, SegFormer's MLP head, or DeepLabV2's dilated-conv classifier (Table 1)
    type: Literal[HEAD_TYPES] = 'daformer'
    embed_dims: int = 256  # daformer/segformer: width of the token embeddings and the fusion (SegFormer-B5: 768)
    dropout: float = 0.1  # daformer/segformer: Dropout2d before the classifier (DeepLabV2 has none)
    # deeplabv2: dilations of the 3x3 classifier convs, summed. (6, 12) is the original's 'dlv2red' (Table 1,
    # as AdaptSegNet and later UDA work); DeepLabV2's paper and the original's 'dlv2' use [6, 12, 18, 24]
    dilations: List[int] = _list(6, 12)


@dataclass
class HRDAConfig:
    scales: List[float] = _list(0.5, 1.0)  # [context scale, detail scale]; sorted ascending, detail must be 1
    # detail crop (h, w) in training, and the window of the detail sliding inference
    hr_crop_size: List[int] = _list(512, 512)
    # detail crop corner divisible by this (DAFormer: output stride 4 x context downscale 2). The original keeps 8
    # for DeepLabV2 (output stride 8) too: the box then maps onto the context logits with truncation, as there
    crop_coord_divisible: int = 8
    hr_loss_weight: float = 0.1  # weight of the detail-only loss; the fused loss gets 1 - hr - lr
    lr_loss_weight: float = 0.0  # weight of a context-only loss (the paper: 0 when the detail crop < input)
    attention_classwise: bool = True  # one scale attention map per class (False: a single map)
    fixed_attention: Optional[float] = None  # replace the learned attention by this constant (ablation)
    hr_slide_inference: bool = True  # detail branch at inference: sliding windows over the full-resolution input
    hr_slide_overlapping: bool = True  # windows with stride = crop / 2 (False: stride = crop)
    feature_scale: float = 0.5  # input scale whose features the ImageNet feature distance uses


@dataclass
class TestConfig:
    mode: Literal['slide', 'whole'] = 'slide'  # test-time inference on windows or on the whole image
    crop_size: List[int] = _list(1024, 1024)  # sliding window (h, w)
    stride: List[int] = _list(512, 512)  # sliding stride (h, w)


@dataclass
class ModelConfig:
    # HRDA multi-resolution, or DAFormer's plain single-scale segmentor
    type: Literal['hrda', 'encoder_decoder'] = 'hrda'
    backbone: BackboneConfig = _section(BackboneConfig)
    decode_head: DecodeHeadConfig = _section(DecodeHeadConfig)
    hrda: HRDAConfig = _section(HRDAConfig)  # used when type == 'hrda'
    test: TestConfig = _section(TestConfig)
    num_classes: Optional[int] = None  # null: the number of data.classes (19 for Cityscapes); given, it must agree
    # ImageNet weights of the encoder; null: scratch. SegFormer's pretrained/mit_b5.pth (mit_bN.pth for the others);
    # ResNet-V1c: OpenMMLab's pretrained/resnet101_v1c-e67eebb6.pth or pretrained/resnet50_v1c-2cccc1ad.pth
    pretrained: Optional[str] = 'pretrained/mit_b5.pth'
    activation_checkpointing: bool = False  # recompute encoder blocks in backward: less memory, more compute


# --------------------------------------------------------------------------
# data: mic_data
# --------------------------------------------------------------------------

DATASET_TYPES = Literal['gta', 'synthia', 'cityscapes', 'acdc', 'darkzurich', 'folder']

# The class table of the Cityscapes benchmarks (GTA, Synthia, Cityscapes, ACDC, Dark Zurich): the
# default of data.classes. Train id i = names[i]; 'things' are the classes of the ImageNet feature
# distance (DAFormer), its default uda.fd_classes.
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


def _optional(default=None):
    """A key that the resolved config leaves out while it holds its default. Keys added after the
    first release are of this kind, so that the resolved configs of the existing experiments (the
    config.yaml of their run folders, the config stored in their checkpoints) stay as they were."""
    return field(default=default, metadata={'omit_default': True})


@dataclass
class ClassesConfig:  # data.classes, when not a preset name: the classes of your own task
    names: List[str] = _list()  # one name per class: train id i (the value in the label PNGs) is names[i]
    palette: Optional[List[List[int]]] = None  # [r, g, b] per class for colour predictions; null: generated
    ignore_index: int = 255  # the label value of unlabelled pixels (not a train id; read as 255)
    # 'thing' classes (names or train ids): the classes the ImageNet feature distance applies to (the
    # default of uda.fd_classes); DAFormer's insight is to keep the encoder's ImageNet features of objects
    things: List[Union[str, int]] = _list()

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


@dataclass
class DatasetConfig:
    type: DATASET_TYPES = 'gta'  # on-disk layout (see mic_data.py and the README)
    root: str = 'data/gta'  # dataset folder
    split: str = 'train'  # train / val / test (ignored by gta and synthia, which have one split)
    img_scale: List[int] = _list(2560, 1440)  # resize keeping the ratio to fit (long side, short side)
    # target only: [top, bottom, left, right] pixels of the resized image whose pseudo-labels get weight 0
    crop_pseudo_margins: Optional[List[int]] = None
    img_suffix: str = '.png'  # folder only: image file suffix
    label_suffix: Optional[str] = None  # folder only: label = image path with img_suffix -> this; null: none
    img_dir: Optional[str] = _optional()  # folder only: images under root/img_dir (null: anywhere under root)
    label_dir: Optional[str] = _optional()  # folder only: labels under root/label_dir at the image's relative
    #   path (null: beside the images)


@dataclass
class RCSConfig:
    enabled: bool = True  # rare class sampling of the source images
    temperature: float = 0.01  # T in p_c = softmax((1 - f_c) / T)
    min_pixels: int = 3000  # a file is a candidate for class c if it holds more than this many pixels of c
    # re-crop (up to 10 times) until the crop holds > min_pixels * this pixels of c (HRDA 2.0, DAFormer 0.5)
    min_crop_ratio: float = 2.0


@dataclass
class DemoConfig:
    enabled: bool = False  # generate the synthetic demo benchmark into `root` when it is missing
    root: str = 'data/demo'  # holds gta/ (source) and cityscapes/ (target) in the real formats
    seed: int = 0  # the demo data are a pure function of this seed and the sizes below
    num_source: int = 300  # source (GTA-format) images
    num_target: int = 150  # target (Cityscapes-format) train images
    num_val: int = 50  # target val images (with labels)
    width: int = 512  # image size in pixels
    height: int = 256
    gap: float = 1.0  # strength of the domain gap: 0 = the target looks like the source, 1 = the shipped gap


@dataclass
class DataConfig:
    # the classes: a preset name (cityscapes: the 19 classes of the benchmarks), a list of names, or
    # {names, palette, ignore_index, things} (ClassesConfig). model.num_classes and uda.fd_classes
    # follow from it. Left out of the resolved config while it is 'cityscapes'; read it with
    # mic_config.resolve_classes(cfg.data) or mic_data.class_table(cfg.data)
    classes: Union[Literal[tuple(CLASS_PRESETS)], List[str], ClassesConfig] = _optional('cityscapes')
    source: DatasetConfig = _section(DatasetConfig)  # labelled source domain
    target: DatasetConfig = field(default_factory=lambda: DatasetConfig(
        type='cityscapes', root='data/cityscapes', split='train', img_scale=[2048, 1024],
        crop_pseudo_margins=[30, 240, 30, 30]))  # unlabelled target domain (its labels are never read in training)
    val: DatasetConfig = field(default_factory=lambda: DatasetConfig(
        type='cityscapes', root='data/cityscapes', split='val', img_scale=[2048, 1024]))  # evaluation split
    crop_size: List[int] = _list(1024, 1024)  # training crop (h, w) of source and target
    cat_max_ratio: float = 0.75  # source crops: re-draw (up to 10 times) while one class covers >= this share
    sync_crop_size: Optional[List[int]] = None  # crop source and target again at one shared box of this size
    rcs: RCSConfig = _section(RCSConfig)
    demo: DemoConfig = _section(DemoConfig)
    batch_size: int = 2  # source and target images per GPU and iteration
    num_workers: int = 4  # data-loader worker processes per GPU


# --------------------------------------------------------------------------
# uda: the self-training method (mic_train)
# --------------------------------------------------------------------------

@dataclass
class AdvSegConfig:  # uda.mode=advseg: output-space adversarial training (AdaptSegNet), Table 1
    loss: Literal['ls', 'vanilla'] = 'ls'  # discriminator loss: least squares (MSE) or binary cross-entropy
    lambda_adv: float = 0.001  # weight of the adversarial loss of the segmentor on target predictions
    lr: float = 1e-4  # discriminator Adam learning rate (betas 0.9, 0.99) ...
    power: float = 0.9  # ... decayed polynomially with this power ...
    min_lr: float = 0.0  # ... to this at train.max_iters


@dataclass
class MinEntConfig:  # uda.mode=minent: entropy minimisation on the target (ADVENT's MinEnt), Table 1
    lambda_ent: float = 0.001  # weight of the mean normalised entropy of the target predictions


UDA_MODES = ('dacs', 'source_only', 'advseg', 'minent')  # the keys of mic_train.METHODS


@dataclass
class UDAConfig:
    # DACS self-training (+ DAFormer/HRDA), source-only training, AdvSeg or MinEnt; MIC goes on top of each
    mode: Literal[UDA_MODES] = 'dacs'
    alpha: float = 0.999  # EMA teacher momentum (alpha_t = min(1 - 1/(t+1), alpha))
    pseudo_threshold: float = 0.968  # pseudo-label weight = share of target pixels with confidence >= this
    pseudo_weight_ignore_top: int = 0  # DAFormer's legacy margins: zero the pseudo weight of the crop's top rows
    pseudo_weight_ignore_bottom: int = 0  # ... and bottom rows
    fd_lambda: float = 0.005  # ImageNet feature distance weight (0 = off)
    # train ids of the classes the distance applies to; null: the things of data.classes (Cityscapes:
    # 6, 7, 11, ..., 18). A list here takes precedence over data.classes.things
    fd_classes: Optional[List[int]] = None
    fd_min_ratio: float = 0.75  # label downscaling: keep a block's majority class only above this share
    color_jitter_strength: float = 0.2  # brightness, contrast, saturation and hue range
    color_jitter_probability: float = 0.2  # jitter is applied when u > this (so with probability 0.8)
    blur: bool = True  # Gaussian blur with probability 0.5 on mixed images
    mask_mode: Optional[Literal['separate', 'separatesrc', 'separatetrg', 'separateaug',
                                'separatesrcaug', 'separatetrgaug']] = 'separatetrgaug'  # MIC images; null = no MIC
    mask_alpha: Union[Literal['same'], float] = 'same'  # MIC teacher momentum; a number = a separate MIC teacher
    mask_pseudo_threshold: Union[Literal['same'], float, None] = 'same'  # MIC pseudo threshold; null = weight 1
    mask_lambda: float = 1.0  # MIC loss weight
    mask_block_size: int = 64  # patch size of the random mask
    mask_ratio: float = 0.7  # share of masked patches
    advseg: AdvSegConfig = _section(AdvSegConfig)  # used when mode == 'advseg'
    minent: MinEntConfig = _section(MinEntConfig)  # used when mode == 'minent'


# --------------------------------------------------------------------------
# optim and train (mic_train)
# --------------------------------------------------------------------------

@dataclass
class OptimConfig:
    type: Literal['adamw', 'sgd'] = 'adamw'  # the segmentor's optimizer (Table 1's AdvSeg/MinEnt runs: sgd)
    lr: float = 6e-5  # learning rate of the encoder
    head_lr_mult: float = 10.0  # decoder learning rate = lr * this
    betas: List[float] = _list(0.9, 0.999)  # adamw only
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.01  # 0 for the encoder's norm layers
    warmup_iters: int = 1500  # linear warm-up ...
    warmup_ratio: float = 1e-6  # ... starting at lr * this
    power: float = 1.0  # then polynomial decay to min_lr at train.max_iters
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    max_iters: int = 40000
    seed: int = 2  # rank r uses seed + r; the paper reports the mean over seeds 0, 1, 2
    work_dir: str = 'work_dirs/gta2cs'  # run folder: config, logs, checkpoints, debug images, predictions
    log_interval: int = 50  # iterations between log lines
    eval_interval: int = 4000  # iterations between evaluations on data.val (0 = only at the end)
    ckpt_interval: int = 4000  # iterations between checkpoints (latest.pth); always at the end
    # also write latest.pth when this many minutes passed since the last one (0 = off): bounds the work
    # that a kill without warning (node failure, SIGKILL) costs, whatever the speed (docs/cluster.md)
    ckpt_minutes: float = _optional(0.0)
    debug_img_interval: int = 1000  # iterations between debug image grids (0 = never)
    amp: Literal['none', 'bf16', 'fp16'] = 'none'  # autocast precision (the paper: fp32)
    compile: bool = False  # torch.compile the student's encoder
    deterministic: bool = _optional(False)  # deterministic algorithms, no cuDNN autotuning (slower; for comparing runs)
    tensorboard: bool = _optional(False)  # also write TensorBoard logs to work_dir/tensorboard (needs `pip install tensorboard`)
    device: Optional[str] = None  # null = cuda if available, else cpu


@dataclass
class Config:
    model: ModelConfig = _section(ModelConfig)
    data: DataConfig = _section(DataConfig)
    uda: UDAConfig = _section(UDAConfig)
    optim: OptimConfig = _section(OptimConfig)
    train: TrainConfig = _section(TrainConfig)


# --------------------------------------------------------------------------
# Loading and validation
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

    def __deepcopy__(self, memo):
        out = AttrDict({k: copy.deepcopy(v, memo) for k, v in self.items()})
        out.__dict__.update(self.__dict__)  # keeps the schema tag (see validated)
        return out


def to_attrdict(value, schema=None):
    """AttrDicts of a (plain) tree. schema: the dataclass the tree was checked against; every node
    that is a section gets tagged with its class, so that validated() knows it needs no second check."""
    if isinstance(value, dict):
        hints = typing.get_type_hints(schema) if schema is not None else {}
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


_YAML11_EXPONENT = re.compile(r'[-+]?\d+(\.\d*)?[eE][-+]?\d+')


def _type_name(tp):
    if dataclasses.is_dataclass(tp):
        return 'a mapping'
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ' | '.join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return ' | '.join('null' if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f'list of {_type_name(typing.get_args(tp)[0])}'
    return getattr(tp, '__name__', str(tp))


def _check(value, tp, key):
    """Return `value` converted to the schema type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Union:
        inner = None  # the error inside the alternative of the value's own kind (a mapping, a list)
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, key)
            except ConfigError as e:
                if (isinstance(value, dict) and dataclasses.is_dataclass(arg)) or \
                        (isinstance(value, (list, tuple)) and typing.get_origin(arg) in (list, List)):
                    inner = inner or e
        if inner is not None and str(inner).startswith(('unknown config key', f'config key {key!r}[',
                                                         f"config key '{key}[", f"config key '{key}.")):
            raise inner  # names the inner key: 'data.classes.nmes', 'data.sync_crop_size[1]'
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_check(v, item_tp, f'{key}[{i}]') for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
            return float(value)  # PyYAML reads 1e-4 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _merge_section(tp, {}, value, key)
    else:
        raise TypeError(f'unsupported schema type {tp} for {key}')
    raise ConfigError(f'config key {key!r}: expected {_type_name(tp)}, got {value!r}')


def _merge_section(cls, base, update, prefix):
    """Check `update` (a dict) against dataclass `cls` and merge it into `base`."""
    if not isinstance(update, dict):
        raise ConfigError(f'config key {prefix!r}: expected a mapping, got {update!r}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
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
        elif isinstance(value, dict) and typing.get_origin(tp) is Union \
                and any(dataclasses.is_dataclass(a) for a in typing.get_args(tp)):
            # a mapping that may also be given otherwise (data.classes: a preset, a list of names):
            # --opt data.classes.palette=... updates it
            section = next(a for a in typing.get_args(tp) if dataclasses.is_dataclass(a))
            base = getattr(section, 'merge_base', lambda v, u: v)(out.get(name, fields[name].default), value)
            out[name] = _merge_section(section, base, value, key) if isinstance(base, dict) else _check(value, tp, key)
        else:
            out[name] = _check(value, tp, key)
    return out


# --------------------------------------------------------------------------
# Value ranges: checked after the types by load_config, merge and resolve_section
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """Allowed numbers lo <= v <= hi (open ends: lo < v, v < hi; None: unbounded); with `length`, a
    list of that many such numbers. None values (optional keys) and non-numbers ('same') pass."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    length: Optional[int] = None

    def holds(self, v):
        return ((self.lo is None or v > self.lo or (v == self.lo and not self.lo_open))
                and (self.hi is None or v < self.hi or (v == self.hi and not self.hi_open)))

    def text(self):
        if self.lo is not None and self.hi is not None:
            return f'in {"(" if self.lo_open else "["}{self.lo:g}, {self.hi:g}{")" if self.hi_open else "]"}'
        if self.lo is not None:
            return f'{">" if self.lo_open else ">="} {self.lo:g}'
        return f'{"<" if self.hi_open else "<="} {self.hi:g}'


def _ge(lo, n=None):
    return Range(lo=lo, length=n)


def _gt(lo, n=None):
    return Range(lo=lo, lo_open=True, length=n)


def _unit(n=None, hi_open=False):
    return Range(lo=0, hi=1, hi_open=hi_open, length=n)


# Every key whose value is meaningless outside a range (sizes are (h, w) pairs in pixels).
# Relations between keys (the HRDA detail crop against the training crop, ...) are in _check_relations.
_RANGES = {
    'model.backbone.drop_path_rate': _unit(),
    'model.decode_head.embed_dims': _ge(1),
    'model.decode_head.dropout': _unit(),
    'model.hrda.scales': _gt(0),
    'model.hrda.hr_crop_size': _ge(1, n=2),
    'model.hrda.crop_coord_divisible': _ge(1),
    'model.hrda.hr_loss_weight': _unit(),
    'model.hrda.lr_loss_weight': _unit(),
    'model.hrda.fixed_attention': _unit(),
    'model.hrda.feature_scale': Range(lo=0, hi=1, lo_open=True),
    'model.test.crop_size': _ge(1, n=2),
    'model.test.stride': _ge(1, n=2),
    'model.num_classes': Range(lo=1, hi=255),  # labels are uint8 with 255 = ignore
    **{f'data.{ds}.{key}': rng for ds in ('source', 'target', 'val')
       for key, rng in (('img_scale', _ge(1, n=2)), ('crop_pseudo_margins', _ge(0, n=4)))},
    'data.crop_size': _ge(1, n=2),
    'data.cat_max_ratio': Range(lo=0, lo_open=True),  # >= 1: no re-draws
    'data.sync_crop_size': _ge(1, n=2),
    'data.rcs.temperature': _gt(0),
    'data.rcs.min_pixels': _ge(0),
    'data.rcs.min_crop_ratio': _ge(0),
    'data.demo.seed': _ge(0),
    'data.demo.num_source': _ge(1),
    'data.demo.num_target': _ge(1),
    'data.demo.num_val': _ge(1),
    'data.demo.width': _ge(32),
    'data.demo.height': _ge(32),
    'data.demo.gap': _ge(0),
    'data.batch_size': _ge(1),
    'data.num_workers': _ge(0),
    'uda.alpha': _unit(),
    'uda.pseudo_threshold': _unit(),
    'uda.pseudo_weight_ignore_top': _ge(0),
    'uda.pseudo_weight_ignore_bottom': _ge(0),
    'uda.fd_lambda': _ge(0),
    'uda.fd_classes': Range(lo=0, hi=254),
    'uda.fd_min_ratio': _unit(),
    'uda.color_jitter_strength': _unit(),
    'uda.color_jitter_probability': _unit(),
    'uda.mask_alpha': _unit(),
    'uda.mask_pseudo_threshold': _unit(),
    'uda.mask_lambda': _ge(0),
    'uda.mask_block_size': _ge(1),
    'uda.mask_ratio': _unit(),
    'uda.advseg.lambda_adv': _ge(0),
    'uda.advseg.lr': _gt(0),
    'uda.advseg.power': _ge(0),
    'uda.advseg.min_lr': _ge(0),
    'uda.minent.lambda_ent': _ge(0),
    'optim.momentum': _unit(),
    'optim.lr': _gt(0),
    'optim.head_lr_mult': _ge(0),
    'optim.betas': _unit(n=2, hi_open=True),
    'optim.weight_decay': _ge(0),
    'optim.warmup_iters': _ge(0),
    'optim.warmup_ratio': _unit(),
    'optim.power': _ge(0),
    'optim.min_lr': _ge(0),
    'train.max_iters': _ge(1),
    'train.seed': _ge(0),  # numpy seeds are non-negative
    'train.log_interval': _ge(1),
    'train.eval_interval': _ge(0),
    'train.ckpt_interval': _ge(0),
    'train.ckpt_minutes': _ge(0),
    'train.debug_img_interval': _ge(0),
}
_MIT_MIN_SIZE = 32  # mic_model.MiT: stage 1 reduces keys/values 8x8 from a map at stride 4
# the segmentor's output stride per decoder (mic_model: backbone.feature_strides[head.logits_stage];
# tests/test_config.py holds the two to each other): MiT + DAFormer/SegFormer 4, ResNet + DeepLabV2 8
HEAD_OUTPUT_STRIDES = {'daformer': 4, 'segformer': 4, 'deeplabv2': 8}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_ranges(tree, prefix=''):
    """Raise ConfigError for the first value of `tree` (the section at `prefix`) outside _RANGES."""
    for key, rng in _RANGES.items():
        if prefix and not key.startswith(prefix + '.'):
            continue
        value = tree
        for part in key[len(prefix) + 1 if prefix else 0:].split('.'):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        if isinstance(value, list):
            if rng.length is not None and len(value) != rng.length:
                raise ConfigError(f'config key {key!r}: expected {rng.length} values, each {rng.text()}, '
                                  f'got {value!r}')
            for i, v in enumerate(value):
                if _is_number(v) and not rng.holds(v):
                    raise ConfigError(f"config key '{key}[{i}]': expected a value {rng.text()}, got {v!r}")
        elif _is_number(value) and not rng.holds(value):
            raise ConfigError(f'config key {key!r}: expected a value {rng.text()}, got {value!r}')


def _lcm(a, b):
    return a * b // math.gcd(a, b)


def _check_relations(model, data=None):
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
    mit = model['backbone']['type'].startswith('mit_')
    min_input = _MIT_MIN_SIZE if mit else 1
    out_stride = HEAD_OUTPUT_STRIDES[model['decode_head']['type']]
    if model['type'] != 'hrda':
        for size, key in ((test['crop_size'] if test['mode'] == 'slide' else None, 'model.test.crop_size'),
                          train_input or (None, None)):
            if size is not None and min(size) < min_input:
                raise ConfigError(f'config key {key!r}: {size} is too small: the MiT encoder needs at least '
                                  f'{_MIT_MIN_SIZE}x{_MIT_MIN_SIZE} pixels')
        return
    hrda = model['hrda']
    scales = sorted(hrda['scales'])
    if len(scales) != 2 or scales[1] != 1.0 or not 0 < scales[0] < 1 or (4 / scales[0]) % 1:
        raise ConfigError(f"config key 'model.hrda.scales': expected [context scale, 1.0] with 4 / context "
                          f'scale an integer (e.g. [0.5, 1.0]), got {hrda["scales"]}')
    context = scales[0]
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
    need = _lcm(divisor, 2 * out_stride if hrda['hr_slide_overlapping'] else out_stride)
    hr = hrda['hr_crop_size']
    if min(hr) < min_input:
        raise ConfigError(f"config key 'model.hrda.hr_crop_size': {hr} is too small: the detail crop goes through "
                          f'the MiT encoder, which needs at least {_MIT_MIN_SIZE}x{_MIT_MIN_SIZE} pixels')
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


# --------------------------------------------------------------------------
# Classes: data.classes, and the keys that follow from it (model.num_classes, uda.fd_classes)
# --------------------------------------------------------------------------

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


def _classes_error(key, text):
    return ConfigError(f'config key {key!r}: {text}')


def normalise_classes(value, key='data.classes'):
    """A data.classes value (preset name, list of names or mapping, as the schema allows) checked and in
    its resolved form: the preset name, or {names, palette, ignore_index, things} with the things as
    names. Raises ConfigError naming the key for duplicate names, a palette of the wrong length, ..."""
    if value is None or isinstance(value, str):
        name = 'cityscapes' if value is None else value
        if name not in CLASS_PRESETS:
            raise _classes_error(key, f'unknown class preset {name!r}; choose {", ".join(CLASS_PRESETS)}, or give '
                                      f'the names: {{names: [...], things: [...]}}')
        return name
    value = _merge_section(ClassesConfig, dataclasses.asdict(ClassesConfig()), to_plain(ClassesConfig.expand(value)),
                           key)
    names, palette, ignore, things = value['names'], value['palette'], value['ignore_index'], value['things']
    if not names:
        raise _classes_error(f'{key}.names', 'needs at least one class name (train id i = names[i])')
    if len(names) > MAX_CLASSES:
        raise _classes_error(f'{key}.names', f'{len(names)} classes; at most {MAX_CLASSES} fit in 8-bit labels '
                                             f'(255 marks unlabelled pixels)')
    seen = {}
    for i, n in enumerate(names):
        if not n.strip():
            raise _classes_error(f'{key}.names[{i}]', 'a class name must not be empty')
        if n in seen:
            raise _classes_error(f'{key}.names', f'{n!r} is listed twice (train ids {seen[n]} and {i}); class '
                                                 f'names must be unique (they name the IoU of each class)')
        seen[n] = i
    if palette is not None:
        if len(palette) != len(names):
            raise _classes_error(f'{key}.palette', f'{len(palette)} colours for {len(names)} classes '
                                                   f'({key}.names); give one [r, g, b] per class, or null for '
                                                   f'generated colours')
        for i, c in enumerate(palette):
            if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                raise _classes_error(f'{key}.palette[{i}]', f'expected [r, g, b] with values 0..255 (the colour '
                                                            f'of {names[i]!r}), got {c!r}')
    if not 0 <= ignore <= 255:
        raise _classes_error(f'{key}.ignore_index', f'expected a label value in 0..255, got {ignore}')
    if ignore < len(names):
        raise _classes_error(f'{key}.ignore_index', f'{ignore} is the train id of class {names[ignore]!r}; '
                                                    f'unlabelled pixels need a value >= {len(names)} (usually 255)')
    out_things = []
    for i, t in enumerate(things):
        if isinstance(t, int):
            if not 0 <= t < len(names):
                raise _classes_error(f'{key}.things[{i}]', f'{t} is not a train id of {key}.names '
                                                           f'(0..{len(names) - 1})')
            t = names[t]
        elif t not in seen:
            close = difflib.get_close_matches(t, names, n=1)
            raise _classes_error(f'{key}.things[{i}]', f'{t!r} is not one of {key}.names'
                                                       + (f' (did you mean {close[0]!r}?)' if close else ''))
        if t in out_things:
            raise _classes_error(f'{key}.things', f'{t!r} is listed twice')
        out_things.append(t)
    return {'names': list(names), 'palette': palette, 'ignore_index': ignore, 'things': out_things}


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


def _updates_classes(update):
    data = update.get('data') if isinstance(update, dict) else None
    return isinstance(data, dict) and 'classes' in data


def _drop_defaults(tree, cls):
    """Remove the _optional keys of `tree` (a section of schema `cls`) that hold their default, in place."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        if f.metadata.get('omit_default') and tree[f.name] == f.default:
            del tree[f.name]
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(tree[f.name], dict):
            _drop_defaults(tree[f.name], hints[f.name])


def _complete(cfg):
    """Resolve a merged whole config (a plain dict, in place): data.classes in its resolved form,
    model.num_classes and uda.fd_classes derived from it where null, optional keys at their
    defaults left out. Raises ConfigError when model.num_classes disagrees with data.classes."""
    data, model, uda = cfg['data'], cfg['model'], cfg['uda']
    if 'classes' in data:
        data['classes'] = normalise_classes(data['classes'])
    classes = data.get('classes', 'cityscapes')
    named = len(CLASS_PRESETS[classes]['names']) if isinstance(classes, str) else len(classes['names'])
    if model['num_classes'] is None:
        model['num_classes'] = named
    elif not isinstance(classes, str) and model['num_classes'] != named:
        raise ConfigError(f"config keys 'model.num_classes' ({model['num_classes']}) and 'data.classes' ({named} "
                          f'names) disagree: leave model.num_classes out (it follows data.classes) or make them agree')
    if uda['fd_classes'] is None:
        uda['fd_classes'] = list(resolve_classes(classes, model['num_classes'])['things'])
    return cfg


def _complete_section(name, section):
    """_complete for one section on its own (resolve_section): what cannot follow from data.classes
    follows from the default classes."""
    if name == 'data' and 'classes' in section:
        section['classes'] = normalise_classes(section['classes'])
    elif name == 'model' and section['num_classes'] is None:
        section['num_classes'] = len(CITYSCAPES_CLASSES['names'])
    elif name == 'uda' and section['fd_classes'] is None:
        section['fd_classes'] = list(resolve_classes()['things'])
    return section


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
    _check_ranges(cfg, section or '')
    if section is None:
        _check_relations(cfg['model'], cfg['data'])
        _check_classes(cfg)
    elif section == 'model':
        _check_relations(cfg)


def _schema_defaults():
    """The schema's defaults before resolution: keys that follow from data.classes are null."""
    return dataclasses.asdict(Config())


def defaults(section=None):
    """The default config as a plain dict (or one section of it: 'model', 'data', ...), resolved."""
    tree = _complete(_schema_defaults())
    return tree if section is None else tree[section]


def resolve_section(name, values):
    """Fill a partial section dict (e.g. a released model config) with defaults and validate it.
    A section of a config that load_config already validated is returned as it is."""
    cls = typing.get_type_hints(Config)[name]
    if validated(values, cls):
        return values
    section = _complete_section(name, _merge_section(cls, defaults(name), to_plain(values or {}), name))
    check_values(section, name)
    return to_attrdict(section, cls)


def parse_override(text):
    """'a.b.c=value' -> ('a.b.c', value) with the value read as YAML (null, 3, 1e-4, [1, 2], text)."""
    import yaml  # imported here so that mic_model (torch only) can use the schema without it
    if '=' not in text:
        raise ConfigError(f'override {text!r} must look like key.sub=value')
    key, raw = text.split('=', 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ''
    except yaml.YAMLError as e:
        raise ConfigError(f'override {text!r}: the value is not valid YAML ({e})') from None
    return key.strip(), value


def _nest(key, value):
    out = value
    for part in reversed(key.split('.')):
        out = {part: out}
    return out


def merge(cfg, *updates):
    """Validate (nested, partial) updates and merge them, in order, into a full config dict; the
    ranges and relations of the values are checked on the result. An update of data.classes makes
    model.num_classes and uda.fd_classes follow the new classes, unless the updates give them."""
    out = to_plain(cfg)
    updates = [to_plain(u) for u in updates]
    if any(_updates_classes(u) for u in updates):
        out['model']['num_classes'] = out['uda']['fd_classes'] = None
    for update in updates:
        out = _merge_section(Config, out, update, '')
    _complete(out)
    check_values(out)
    return to_attrdict(out, Config)


def read_yaml(path, what, missing_hint=''):
    """The YAML document at `path` ({} when empty); ConfigError '<what> does not exist<hint>' or
    '<what> is not valid YAML: ...' otherwise."""
    import yaml
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f'{what} does not exist{missing_hint}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'{what} is not valid YAML: {e}') from None


def load_config(path=None, overrides=()):
    """The validated config: defaults, then the YAML file at `path`, then `overrides`.

    overrides: strings 'key.sub=value' (YAML values) applied in order.
    Returns an AttrDict tree: cfg['model'] == cfg.model is what build_model takes.
    """
    cfg = _schema_defaults()
    if path is not None:
        update = read_yaml(path, f'config file {path}', ' (the shipped ones are in configs/)')
        if not isinstance(update, dict):
            raise ConfigError(f'config file {path} must hold a mapping of sections, got {type(update).__name__}')
        cfg = _merge_section(Config, cfg, update, '')
    for text in overrides:
        key, value = parse_override(text)
        cfg = _merge_section(Config, cfg, _nest(key, value), '')
    _complete(cfg)  # the keys that follow data.classes
    check_values(cfg)  # once all overrides are in: keys that must fit together may change one by one
    return to_attrdict(cfg, Config)


def stored(cfg):
    """The config as it is written to run folders and checkpoints: plain dicts, without the keys
    added after the first release while they hold their default (_optional), so that the stored
    configs of earlier runs stay comparable. In memory every key is present."""
    tree = to_plain(cfg)
    _drop_defaults(tree, Config)
    return tree


def dump_yaml(cfg):
    import yaml
    return yaml.safe_dump(stored(cfg), sort_keys=False, default_flow_style=None)


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
