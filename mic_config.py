"""The configuration schema: every default of every stage, in one place.

The defaults are the paper's MIC(HRDA) GTA->Cityscapes setting (experiment 80
of the reference, seed 2 = the released checkpoint). A YAML file in configs/
lists only what it changes; `--opt a.b=value` overrides anything after it:

    from mic_config import load_config
    cfg = load_config('configs/gta2cs.yaml', ['model.backbone.type=mit_b0'])
    cfg.model.backbone.type, cfg['train']['max_iters']

    python mic_config.py configs/demo.yaml --opt train.max_iters=10   # prints the resolved config

Unknown keys and values of the wrong type raise ConfigError naming the key.
The resolved config is a tree of plain dicts (JSON-serialisable, stored in
every checkpoint) that also allows attribute access.
"""
import argparse
import copy
import dataclasses
import difflib
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
    num_classes: int = 19  # Cityscapes train ids 0..18
    # ImageNet weights of the encoder; null: scratch. SegFormer's pretrained/mit_b5.pth (mit_bN.pth for the others);
    # ResNet-V1c: OpenMMLab's pretrained/resnet101_v1c-e67eebb6.pth or pretrained/resnet50_v1c-2cccc1ad.pth
    pretrained: Optional[str] = 'pretrained/mit_b5.pth'
    activation_checkpointing: bool = False  # recompute encoder blocks in backward: less memory, more compute


# --------------------------------------------------------------------------
# data: mic_data
# --------------------------------------------------------------------------

DATASET_TYPES = Literal['gta', 'synthia', 'cityscapes', 'acdc', 'darkzurich', 'folder']


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
class UDAConfig:
    mode: Literal['dacs', 'source_only'] = 'dacs'  # DACS self-training, or source-only training
    alpha: float = 0.999  # EMA teacher momentum (alpha_t = min(1 - 1/(t+1), alpha))
    pseudo_threshold: float = 0.968  # pseudo-label weight = share of target pixels with confidence >= this
    pseudo_weight_ignore_top: int = 0  # DAFormer's legacy margins: zero the pseudo weight of the crop's top rows
    pseudo_weight_ignore_bottom: int = 0  # ... and bottom rows
    fd_lambda: float = 0.005  # ImageNet feature distance weight (0 = off)
    fd_classes: List[int] = _list(6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # thing classes the distance applies to
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
    debug_img_interval: int = 1000  # iterations between debug image grids (0 = never)
    amp: Literal['none', 'bf16', 'fp16'] = 'none'  # autocast precision (the paper: fp32)
    compile: bool = False  # torch.compile the student's encoder
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
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, key)
            except ConfigError:
                pass
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
        else:
            out[name] = _check(value, tp, key)
    return out


def defaults(section=None):
    """The default config as a plain dict (or one section of it: 'model', 'data', ...)."""
    tree = dataclasses.asdict(Config())
    return tree if section is None else tree[section]


def resolve_section(name, values):
    """Fill a partial section dict (e.g. a released model config) with defaults and validate it.
    A section of a config that load_config already validated is returned as it is."""
    cls = typing.get_type_hints(Config)[name]
    if validated(values, cls):
        return values
    return to_attrdict(_merge_section(cls, defaults(name), to_plain(values or {}), name), cls)


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


def merge(cfg, update):
    """Validate a (nested, partial) update and merge it into a full config dict."""
    return to_attrdict(_merge_section(Config, to_plain(cfg), to_plain(update), ''), Config)


def load_config(path=None, overrides=()):
    """The validated config: defaults, then the YAML file at `path`, then `overrides`.

    overrides: strings 'key.sub=value' (YAML values) applied in order.
    Returns an AttrDict tree: cfg['model'] == cfg.model is what build_model takes.
    """
    import yaml
    cfg = defaults()
    if path is not None:
        try:
            with open(path) as f:
                update = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f'config file {path} does not exist (the shipped ones are in configs/)') from None
        except yaml.YAMLError as e:
            raise ConfigError(f'config file {path} is not valid YAML: {e}') from None
        if not isinstance(update, dict):
            raise ConfigError(f'config file {path} must hold a mapping of sections, got {type(update).__name__}')
        cfg = _merge_section(Config, cfg, update, '')
    for text in overrides:
        key, value = parse_override(text)
        cfg = _merge_section(Config, cfg, _nest(key, value), '')
    return to_attrdict(cfg, Config)


def dump_yaml(cfg):
    import yaml
    return yaml.safe_dump(to_plain(cfg), sort_keys=False, default_flow_style=None)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Print the resolved config of a YAML file plus overrides.')
    parser.add_argument('cfg', nargs='?', help='YAML config (default: the built-in defaults)')
    parser.add_argument('--opt', nargs='+', default=[], metavar='KEY=VALUE', help='overrides, e.g. train.max_iters=100')
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(dump_yaml(load_config(args.cfg, args.opt)))
    except ConfigError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
