"""Helpers shared by the test modules (test modules never import each other): tiny configs,
a synthetic batch, the options of a tiny demo run and a PNG writer with chosen row filters.
Fixtures live in conftest.py; this is plain functions, also usable in spawned processes."""
import os
import struct
import zlib

import numpy as np
import torch

from mic_config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Tiny configs and a synthetic batch
# --------------------------------------------------------------------------

def tiny_cfg(*opts, pretrained=None):
    """The full config (defaults + `opts` as KEY=VALUE overrides) of a tiny model on 64x64 crops:
    MiT-b0, a 32-wide decoder, 32x32 HRDA detail crops, on the CPU. `pretrained`: an encoder file
    (None: random weights and no feature distance, which needs one)."""
    base = ['model.backbone.type=mit_b0', 'model.decode_head.embed_dims=32', 'model.hrda.hr_crop_size=[32,32]',
            'data.crop_size=[64,64]', 'train.device=cpu', 'uda.mask_block_size=16',
            f'model.pretrained={pretrained or "null"}']
    if pretrained is None:
        base.append('uda.fd_lambda=0')
    return load_config(None, base + list(opts))


def tiny_model_cfg(**overrides):
    """The model section alone, as a plain dict for mic_model.build_model: tiny_cfg's model without
    drop path, sliding windows for 64x64 inputs. `overrides` replace whole top-level keys, e.g.
    type='encoder_decoder', test={'mode': 'whole'}."""
    cfg = {'backbone': {'type': 'mit_b0', 'drop_path_rate': 0.0}, 'pretrained': None,
           'decode_head': {'embed_dims': 32}, 'hrda': {'hr_crop_size': [32, 32]},
           'test': {'crop_size': [64, 64], 'stride': [32, 32]}}
    cfg.update(overrides)
    return cfg


def synthetic_batch(seed=0, B=2, H=64, W=64):
    """A training batch of random images and labels, mostly person (a thing class: the feature
    distance has blocks to act on)."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 19, (B, 1, H, W), generator=g, dtype=torch.uint8)
    gt[:, :, :56] = 11
    return {'img': torch.randn(B, 3, H, W, generator=g), 'gt': gt,
            'target_img': torch.randn(B, 3, H, W, generator=g),
            'valid_pseudo_mask': torch.ones(B, 1, H, W, dtype=torch.uint8)}


def tiny_opts(demo_root, work_dir, *extra):
    """--opt overrides of configs/gta2cs.yaml for a tiny run (8 iterations) on a generated demo."""
    return ['model.backbone.type=mit_b0', 'model.decode_head.embed_dims=32', 'model.pretrained=null',
            'model.hrda.hr_crop_size=[32,32]', 'model.test.crop_size=[64,64]', 'model.test.stride=[32,32]',
            'data.demo.enabled=true', f'data.demo.root={demo_root}', 'data.demo.num_source=6',
            'data.demo.num_target=4', 'data.demo.num_val=2', 'data.demo.width=128', 'data.demo.height=64',
            f'data.source.root={demo_root}/gta', f'data.target.root={demo_root}/cityscapes',
            f'data.val.root={demo_root}/cityscapes', 'data.source.img_scale=[128,64]',
            'data.target.img_scale=[128,64]', 'data.val.img_scale=[128,64]', 'data.crop_size=[64,64]',
            'data.rcs.min_pixels=20', 'data.num_workers=0', 'uda.fd_lambda=0', 'uda.mask_block_size=16',
            'train.max_iters=8', 'train.log_interval=2', 'train.eval_interval=4', 'train.ckpt_interval=4',
            'train.debug_img_interval=4', 'train.device=cpu', f'train.work_dir={work_dir}', *extra]


# --------------------------------------------------------------------------
# A minimal PNG writer that applies a chosen row filter to every row
# --------------------------------------------------------------------------

def paeth_predictor(a, b, c):
    a, b, c = (x.astype(np.int16) for x in (a, b, c))
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c)).astype(np.uint8)


def filter_rows(raw, bpp, types):
    """raw [H, S] uint8 scanlines -> [H, 1 + S] with each row filtered by types[r] (0 None .. 4 Paeth).

    Filtering only looks at raw (unfiltered) neighbours, so it vectorises over the whole image.
    """
    h, s = raw.shape
    up = np.vstack([np.zeros((1, s), np.uint8), raw[:-1]])
    left = np.hstack([np.zeros((h, bpp), np.uint8), raw[:, :-bpp]])
    up_left = np.hstack([np.zeros((h, bpp), np.uint8), up[:, :-bpp]])
    predictors = [np.zeros_like(raw), left, up, ((left.astype(np.int16) + up) // 2).astype(np.uint8),
                  paeth_predictor(left, up, up_left)]
    out = np.empty((h, s + 1), np.uint8)
    out[:, 0] = types
    for t in range(5):
        rows = types == t
        out[rows, 1:] = raw[rows] - predictors[t][rows]  # uint8 arithmetic wraps modulo 256
    return out


def _chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def write_png(path, array, types, colour_type=None, interlace=0):
    """Write uint8 / uint16 [H,W,C] as PNG with row filters `types` [H] (16-bit: big-endian samples)."""
    h, w, c = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c] if colour_type is None else colour_type
    raw = (array.astype('>u2') if depth == 16 else array).view(np.uint8).reshape(h, -1)
    data = filter_rows(raw, c * depth // 8, np.asarray(types, np.uint8))
    ihdr = struct.pack('>IIBBBBB', w, h, depth, colour_type, 0, 0, interlace)
    png = (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + _chunk(b'IDAT', zlib.compress(data.tobytes()))
           + _chunk(b'IEND', b''))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(png)
