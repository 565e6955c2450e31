"""Train MIC (masked image consistency) on HRDA / DAFormer with DACS self-training.

    python mic_train.py --cfg configs/demo.yaml          # the demo: generates its data, trains, prints the target mIoU
    python mic_train.py --cfg configs/gta2cs.yaml        # MIC(HRDA) GTA->Cityscapes on one GPU
    torchrun --standalone --nproc_per_node=4 mic_train.py --cfg configs/gta2cs.yaml   # 4 GPUs (batch 2 per GPU)
    python mic_train.py --cfg configs/gta2cs.yaml --resume            # continue from train.work_dir/latest.pth
                                                                      # (a new run when there is none yet)
    python mic_train.py --cfg configs/gta2cs.yaml --opt train.amp=bf16 model.activation_checkpointing=true
    python mic_train.py --cfg configs/gta2cs.yaml --benchmark 20      # s/iteration and peak memory, no data needed

The run folder (train.work_dir) receives config.yaml (the resolved config), command.txt,
log.jsonl (losses, lr, pseudo-label confidence, time, memory; evaluations), debug/ (image
grids), latest.pth (student, teachers, optimizer, RNG, iteration, config; every
train.ckpt_interval iterations or train.ckpt_minutes, and before every evaluation), best.pth
(the checkpoint of the best evaluation) and, at the end, metrics.json (the last evaluation, and
the best under 'best') and preds/ from the evaluation on data.val. Nothing is written before the
config, the data (data.val included) and the first batch are checked. A running training holds
the lock RUN/.lock: a second one in the same folder is refused.

On SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) the training finishes the current iteration, writes
latest.pth at that iteration, prints 'stopped by SIGTERM at iteration N; latest.pth holds
iteration N; continue with --resume' and exits with 128 + the signal's number (143, 138, 130);
under torchrun all ranks stop at the same iteration. A third Ctrl-C aborts without a checkpoint.
Cluster recipes (Slurm requeue, torchrun restarts): docs/cluster.md.

One iteration (SPEC section 4): EMA teacher update -> source loss (+ ImageNet feature
distance) -> teacher pseudo-labels on the target -> ClassMix + strong augmentation ->
mixed loss -> masked-target loss (MIC) -> one AdamW step over all gradients.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import inspect
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, NamedTuple, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mic_data
import mic_demo
import mic_eval
import mic_experiments
import mic_model
import mic_report
import mic_runtime
from mic_config import ConfigError, dump_yaml, load_config, stored  # noqa: F401  (load_config: public API)
from mic_runtime import atomic_write_text, exit_error, is_main, print0, setup_distributed

# --------------------------------------------------------------------------
# Self-training helpers (public: tests and users rely on these names)
# --------------------------------------------------------------------------


def ema_update(teacher, student, iteration, alpha):
    """Mean teacher: at iteration 0 a copy of the student, then theta_t <- a theta_t + (1 - a) theta_s
    with a = min(1 - 1 / (iteration + 1), alpha). Parameters only; buffers (BN statistics) are not averaged."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    with torch.no_grad():
        if iteration == 0:
            torch._foreach_copy_(t_params, s_params)
            return
        a = min(1 - 1 / (iteration + 1), alpha)
        torch._foreach_mul_(t_params, a)
        torch._foreach_add_(t_params, s_params, alpha=1 - a)


def pseudo_label_and_weight(logits, threshold, valid_mask=None, ignore_top=0, ignore_bottom=0):
    """Teacher logits [B,K,H,W] -> (pseudo-label [B,H,W] long, weight [B,H,W] float).

    The weight is one scalar for the whole batch, the share of pixels whose max softmax
    probability is >= threshold (threshold None: weight 1), times the valid-region mask
    [B,1,H,W] (pseudo-label margins) and with DAFormer's legacy top/bottom rows zeroed.
    Computed on the device: no host synchronisation.
    """
    prob, label = torch.softmax(logits.detach().float(), dim=1).max(dim=1)
    if threshold is None:
        weight = torch.ones_like(prob)
    else:
        weight = (prob >= threshold).float().mean().expand_as(prob).clone()
    if ignore_top > 0:
        weight[:, :ignore_top] = 0
    if ignore_bottom > 0:
        weight[:, -ignore_bottom:] = 0
    if valid_mask is not None:
        weight = weight * valid_mask.reshape(weight.shape).to(weight.dtype)
    return label, weight


def class_mix_masks(labels, num_classes=19, ignore_index=mic_data.IGNORE_INDEX, generator=None):
    """ClassMix masks [B,1,H,W] (float 0/1) from source labels [B,1,H,W].

    For every sample: take the classes present in the WHOLE batch (the ignore label counts as
    one, as in the original), choose ceil(n / 2) of them at random, and mask the pixels of
    this sample's label that belong to the chosen classes. No host synchronisation.
    """
    labels = labels.long()
    B = labels.shape[0]
    slot = torch.where(labels == ignore_index, num_classes, labels)  # ignore -> slot K
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels.device)
    present[slot.flatten()] = True  # [K+1]; (bincount would size its output from a host-synced max)
    n_choose = (present.sum() + 1) // 2  # ceil(n / 2)
    # A random subset of size ceil(n/2) of the present classes: rank the present classes by
    # uniform keys (absent ones last) and keep the first ceil(n/2), independently per sample.
    keys = torch.rand((B, num_classes + 1), device=labels.device, generator=generator)
    keys = torch.where(present, keys, torch.full_like(keys, 2.0))
    rank = keys.argsort(dim=1).argsort(dim=1)
    chosen = (rank < n_choose) & present  # [B, K+1]
    return torch.gather(chosen, 1, slot.flatten(1)).reshape(labels.shape).float()


def mix(mask, a, b):
    """mask * a + (1 - mask) * b for binary masks, keeping a's dtype (also for labels)."""
    return torch.where(mask.bool(), a, b)


def block_mask(batch, height, width, ratio, block_size, device=None, generator=None):
    """MIC's random patch mask [B,1,H,W] (float): a grid of round(H/b) x round(W/b) cells,
    each kept where u > ratio, upsampled with nearest interpolation to H x W."""
    cells = (max(round(height / block_size), 1), max(round(width / block_size), 1))
    keep = (torch.rand((batch, 1, *cells), device=device, generator=generator) > ratio).float()
    return F.interpolate(keep, size=(height, width), mode='nearest')


def downscale_label_ratio(label, scale, min_ratio, num_classes, ignore_index=mic_data.IGNORE_INDEX):
    """Majority vote over scale x scale blocks of a label [B,1,H,W] -> [B,1,H/scale,W/scale].

    The majority class (the ignore label takes part as its own class) is kept where it covers
    at least min_ratio of the block, else ignore_index. Counts per block instead
    of a one-hot tensor of the full image (scatter_add: no host synchronisation, unlike bincount).
    """
    B, C, H, W = label.shape
    h, w = H // scale, W // scale
    label = label[:, 0, :h * scale, :w * scale].long()
    slot = torch.where(label == ignore_index, num_classes, label)
    block = (torch.arange(h * scale, device=label.device) // scale)[:, None] * w \
        + (torch.arange(w * scale, device=label.device) // scale)[None, :]
    index = (torch.arange(B, device=label.device)[:, None, None] * (h * w) + block) * (num_classes + 1) + slot
    index = index.flatten()
    counts = torch.zeros(B * h * w * (num_classes + 1), dtype=torch.int64, device=label.device)
    counts = counts.scatter_add_(0, index, torch.ones_like(index)).reshape(B, h, w, num_classes + 1)
    top, cls = counts.max(dim=-1)  # first maximum wins ties, like torch.max on the averaged one-hot
    cls = torch.where(cls == num_classes, ignore_index, cls)
    cls = torch.where(top < min_ratio * scale * scale, ignore_index, cls)
    return cls[:, None]


def lr_at(iteration, cfg):
    """Encoder learning rate at `iteration` (the decoder's is optim.head_lr_mult times this):
    polynomial decay to optim.min_lr at train.max_iters, with a linear warm-up from
    optim.warmup_ratio over optim.warmup_iters iterations that scales the decayed value."""
    o, max_iters = cfg['optim'], cfg['train']['max_iters']
    lr = (o['lr'] - o['min_lr']) * (1 - iteration / max_iters) ** o['power'] + o['min_lr']
    if iteration < o['warmup_iters']:
        k = (1 - iteration / o['warmup_iters']) * (1 - o['warmup_ratio'])
        lr = lr * (1 - k)
    return lr


def feature_distance(student_feats, imnet_feats, label, classes, min_ratio, num_classes):
    """Mean L2 distance between the last-stage features of the student and the frozen ImageNet
    encoder over blocks whose (majority, >= min_ratio) source label is a thing class."""
    fs, fi = student_feats[-1], imnet_feats[-1].detach()
    scale = label.shape[-1] // fs.shape[-1]
    small = downscale_label_ratio(label, scale, min_ratio, num_classes)[:, 0]  # [B,h,w]
    small = small[:, :fs.shape[2], :fs.shape[3]]
    mask = torch.isin(small, torch.as_tensor(classes, device=label.device))
    dist = torch.linalg.vector_norm(fs.float() - fi.float(), dim=1)  # [B,h,w]
    # Mean over the mask; an empty mask gives 0 (the original gets NaN, with no gradient either).
    return (dist * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------
# Strong augmentation (DACS): colour jitter and Gaussian blur, as kornia 0.5 did them
# --------------------------------------------------------------------------

def _rgb_to_hsv(img, eps=1e-6):
    maxc, max_idx = img.max(dim=1)
    minc = img.min(dim=1).values
    delta = maxc - minc
    s = delta / (maxc + eps)
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc[:, None] - img).unbind(1)
    h = torch.stack([bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc], dim=1)
    h = torch.gather(h, 1, max_idx[:, None])[:, 0] / delta
    h = (h / 6.0) % 1.0 * (2 * math.pi)
    return torch.stack([h, s, maxc], dim=1)


def _hsv_to_rgb(img):
    h, s, v = img[:, 0] / (2 * math.pi), img[:, 1], img[:, 2]
    hi = torch.floor(h * 6) % 6
    f = (h * 6) % 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.long()
    idx = torch.stack([hi, hi + 6, hi + 12], dim=1)
    table = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=1)
    return torch.gather(table, 1, idx)


def apply_color_jitter(img, order, brightness, contrast, saturation, hue):
    """Jitter images in [0, 1] [B,3,H,W] with per-image factors [B,1,1,1], the four operations in
    `order` (0 brightness: additive; 1 contrast: multiplicative; 2 saturation; 3 hue shift of
    hue * 2 pi in HSV), each clamped to [0, 1], as kornia 0.5.8's ColorJitter (used by the original)."""
    for op in order:
        if op == 0:
            img = (img + brightness).clamp(0, 1)
        elif op == 1:
            img = (img * contrast).clamp(0, 1)
        elif op == 2:
            h, s, v = _rgb_to_hsv(img).split(1, dim=1)
            img = _hsv_to_rgb(torch.cat([h, (s * saturation).clamp(0, 1), v], dim=1))
        else:
            h, s, v = _rgb_to_hsv(img).split(1, dim=1)
            img = _hsv_to_rgb(torch.cat([torch.fmod(h + hue * 2 * math.pi, 2 * math.pi), s, v], dim=1))
    return img


def color_jitter(img, strength):
    """Random colour jitter of images in [0, 1]: factors drawn per image on the device, one random order."""
    B, s = img.shape[0], strength

    def factor(lo, hi):
        return torch.rand(B, 1, 1, 1, device=img.device) * (hi - lo) + lo
    return apply_color_jitter(img, torch.randperm(4).tolist(), factor(-s, s), factor(1 - s, 1 + s),
                              factor(1 - s, 1 + s), factor(-s, s))


def gaussian_blur(img, sigma):
    """Separable Gaussian blur with a kernel of ~10% of the image (odd size), reflect padding."""
    def size(n):
        c = math.ceil(0.1 * n)
        return int(math.floor(c - 0.5 + c % 2))
    out = img
    for dim, n in ((2, img.shape[2]), (3, img.shape[3])):
        k = size(n)
        x = torch.arange(k, device=img.device, dtype=img.dtype) - k // 2
        g = torch.exp(-x ** 2 / (2 * sigma ** 2))
        g = (g / g.sum()).repeat(img.shape[1], 1)[:, None]  # [C,1,k]
        if dim == 2:
            out = F.conv2d(F.pad(out, (0, 0, k // 2, k // 2), mode='reflect'), g[..., None], groups=img.shape[1])
        else:
            out = F.conv2d(F.pad(out, (k // 2, k // 2, 0, 0), mode='reflect'), g[:, :, None], groups=img.shape[1])
    return out


def strong_augment(img, jitter, blur, strength, mean, std):
    """DACS's strong augmentation of normalised images [B,3,H,W]: colour jitter (in [0,1] space)
    if `jitter`, then Gaussian blur with sigma ~ U(0.15, 1.15) if `blur`."""
    if jitter:
        img = color_jitter((img * std + mean) / 255.0, strength) * 255.0
        img = (img - mean) / std
    if blur:
        img = gaussian_blur(img, 0.15 + float(torch.rand(())))
    return img


# --------------------------------------------------------------------------
# The iteration as a list of passes
# --------------------------------------------------------------------------
# A pass is one function (trainer, state) -> loss: it runs the models it needs, fills state.logs
# (detached values) and state.debug, and returns the scalar to backpropagate (or None). The
# iteration runs the method's passes in order and backpropagates each loss at once, so every
# pass's graph is freed before the next; the gradients of all passes add up to one optimizer
# step. Under DDP each trained module synchronises its gradients in the last pass (by position)
# that runs it. A new method is one pass function and one METHODS entry.

class Pass(NamedTuple):
    run: Callable  # (trainer, state) -> loss tensor or None
    trains: Tuple[str, ...] = ('student',)  # the trained modules whose gradients this pass produces


class StepState(types.SimpleNamespace):
    """What the passes of one iteration share: the batch, the iteration, the logs, the debug tensors
    (None unless a debug grid is wanted) and what earlier passes produced (e.g. pseudo-labels)."""


def source_pass(t, s):
    """Supervised loss on the source crops, plus the ImageNet feature distance on thing classes."""
    u = t.cfg.uda
    out = t.forward('student', s.src, s.gt, return_feat=t.fd, return_logits=t.keep_source_logits)
    loss = t.sum_losses(out, 'source', s.logs)
    if t.keep_source_logits:  # for a later pass (the discriminator's), at the input's size
        s.src_logits = mic_model.resize(out['logits'].detach(), s.src.shape[2:])
    if t.fd:
        with torch.no_grad(), t.autocast():
            imnet_feats = t.imnet(t.student.fd_view(s.src))
        fd = u.fd_lambda * feature_distance(out['features'], imnet_feats, s.gt, t.fd_classes, u.fd_min_ratio,
                                            t.num_classes)
        s.logs['source.loss_fd'] = fd.detach()
        loss = loss + fd
    return loss


def mix_pass(t, s):
    """DACS: the teacher's pseudo-labels of the target, ClassMix of source and target, strong
    augmentation, and the student's loss on the mixed images."""
    u = t.cfg.uda
    s.plabel, s.pweight = t.pseudo_labels('teacher', s.tgt, s.valid, u.pseudo_threshold)
    # the confidence share: the weight's value wherever the margins leave it alone
    s.logs['pseudo_ratio'] = s.pweight.amax(dim=(1, 2)).mean()
    s.logs.update(mic_report.pseudo_class_logs(s.plabel, s.valid, t.class_names))
    masks = class_mix_masks(s.gt, t.num_classes)
    mixed_img = mix(masks, s.src, s.tgt)
    mixed_lbl = mix(masks, s.gt, s.plabel[:, None])
    mixed_w = mix(masks[:, 0], torch.ones_like(s.pweight), s.pweight)
    # whether to jitter / blur is decided once per iteration, the draws are per image
    jitter, blur = augmentation_switches(u, blur=u.blur)
    mixed_img = torch.cat([strong_augment(mixed_img[i:i + 1], jitter, blur, u.color_jitter_strength, t.mean, t.std)
                           for i in range(s.B)])
    out = t.forward('student', mixed_img, mixed_lbl, seg_weight=mixed_w, return_logits=s.debug is not None)
    if s.debug is not None:
        s.debug.update(pseudo_label=s.plabel, mixed=mixed_img, mixed_label=mixed_lbl, mix_pred=out['logits'].detach())
    return t.sum_losses(out, 'mix', s.logs)


def masked_pass(t, s):
    """MIC: predict pseudo-labels (or source labels) from patch-masked images (uda.mask_mode)."""
    u = t.cfg.uda
    img, lbl, weight = mic_inputs(t, s)
    if 'aug' in u.mask_mode:
        jitter, blur = augmentation_switches(u, blur=True)
        img = strong_augment(img, jitter, blur, u.color_jitter_strength, t.mean, t.std)
    img = img * block_mask(s.B, s.H, s.W, u.mask_ratio, u.mask_block_size, device=img.device)
    out = t.forward('student', img, lbl, seg_weight=weight, return_logits=s.debug is not None)
    if s.debug is not None:
        s.debug.update(masked=img, masked_pred=out['logits'].detach())
    # MIC's weight scales the fused loss only, as in the original (mask_lambda = 1 by default)
    return t.sum_losses(out, 'masked', s.logs, scale={'loss_seg': u.mask_lambda})


def mic_inputs(t, s):
    """Images, labels and weights of the masked pass for uda.mask_mode: the MIC teacher's
    pseudo-labels if there is one, else those of the mix pass; source images in source-only training."""
    mode, B = t.cfg.uda.mask_mode, s.B
    plabel, pweight = s.plabel, s.pweight
    if 'mic_teacher' in t.modules:
        plabel, pweight = t.pseudo_labels('mic_teacher', s.tgt, s.valid, t.mic_threshold)
    if plabel is None or mode in ('separatesrc', 'separatesrcaug'):
        return s.src, s.gt, None
    if mode in ('separatetrg', 'separatetrgaug'):
        return s.tgt, plabel[:, None], pweight
    # 'separate' / 'separateaug': half source (labels, weight 1), half target (pseudo-labels)
    h = B // 2
    img = torch.cat([s.src[:h], s.tgt[:B - h]])
    lbl = torch.cat([s.gt[:h], plabel[:B - h, None]])
    weight = torch.cat([torch.ones_like(pweight[:h]), pweight[:B - h]])
    return img, lbl, weight


def target_logits(t, s):
    """The student's logits of the target crops at their full size [B,K,H,W] (with gradients)."""
    with t.autocast():
        return t.wrapped['student'](s.tgt)


def adversarial_pass(t, s):
    """AdvSeg, segmentor side: the discriminator (frozen here) should take the student's target
    predictions for source predictions; loss x uda.advseg.lambda_adv."""
    a = t.cfg.uda.advseg
    d = t.modules['discriminator']
    d.requires_grad_(False)  # this loss trains the segmentor only
    s.tgt_logits = target_logits(t, s)
    out = d(torch.softmax(s.tgt_logits.float(), dim=1))
    loss = a.lambda_adv * discriminator_loss(out, SOURCE_DOMAIN, a.loss)
    s.logs['adversarial.loss_adv'] = loss.detach()
    return loss


def discriminator_pass(t, s):
    """AdvSeg, discriminator side: tell the (detached) source predictions from the target ones."""
    a = t.cfg.uda.advseg
    t.modules['discriminator'].requires_grad_(True)
    probs = torch.softmax(torch.cat([s.src_logits, s.tgt_logits.detach()]).float(), dim=1)
    with t.autocast():
        out = t.wrapped['discriminator'](probs)  # one forward over both halves (one DDP forward)
    src_out, tgt_out = out.float().split(s.src_logits.shape[0])
    loss_src = discriminator_loss(src_out, SOURCE_DOMAIN, a.loss) / 2
    loss_tgt = discriminator_loss(tgt_out, TARGET_DOMAIN, a.loss) / 2
    s.logs['discriminator.loss_src'], s.logs['discriminator.loss_tgt'] = loss_src.detach(), loss_tgt.detach()
    return loss_src + loss_tgt


SOURCE_DOMAIN, TARGET_DOMAIN = 0.0, 1.0  # the discriminator's labels


def discriminator_loss(logits, domain, kind):
    """'ls': least squares (MSE to the domain label); 'vanilla': binary cross-entropy with logits."""
    target = torch.full_like(logits, domain)
    if kind == 'ls':
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def entropy_pass(t, s):
    """MinEnt: the mean normalised entropy of the student's target predictions x uda.minent.lambda_ent."""
    prob = torch.softmax(target_logits(t, s).float(), dim=1)
    loss = t.cfg.uda.minent.lambda_ent * normalised_entropy(prob)
    s.logs['entropy.loss_ent'] = loss.detach()
    return loss


def normalised_entropy(prob):
    """Mean over pixels of -sum_k p log2 p / log2 K, for probabilities [B,K,H,W] (1 = uniform)."""
    B, K, H, W = prob.shape
    return -(prob * torch.log2(prob + 1e-30)).sum() / (B * H * W * math.log2(K))


def augmentation_switches(u, blur):
    """DACS's per-iteration decisions: (colour jitter?, Gaussian blur?)."""
    jitter = float(torch.rand(())) > u.color_jitter_probability
    return jitter, blur and float(torch.rand(())) > 0.5


METHODS = {  # uda.mode -> its passes; 'masked' (MIC) runs only when uda.mask_mode is set
    'source_only': ('source', 'masked'),
    'dacs': ('source', 'mix', 'masked'),
    'advseg': ('source', 'adversarial', 'masked', 'discriminator'),
    'minent': ('source', 'entropy', 'masked'),
}
PASSES = {
    'source': Pass(source_pass),
    'mix': Pass(mix_pass),
    'masked': Pass(masked_pass),
    'adversarial': Pass(adversarial_pass),
    'entropy': Pass(entropy_pass),
    'discriminator': Pass(discriminator_pass, trains=('discriminator',)),
}


def method_passes(cfg):
    """[(name, Pass)] of the configured method, in order."""
    names = [n for n in METHODS[cfg.uda.mode] if n != 'masked' or cfg.uda.mask_mode is not None]
    return [(n, PASSES[n]) for n in names]


# --------------------------------------------------------------------------
# The trainer: the stateful modules, their optimizers and one iteration
# --------------------------------------------------------------------------

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class NonFiniteLossError(RuntimeError):
    pass


def build_optimizer(model, cfg):
    """The segmentor's optimizer (optim.type): encoder lr and weight decay (0 for the parameters the
    encoder names in no_weight_decay_keys, e.g. MiT's norm layers), decoder lr x optim.head_lr_mult."""
    o = cfg.optim
    no_decay_keys = getattr(model.backbone, 'no_weight_decay_keys', ('norm',))
    enc_decay, enc_no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if name.startswith('decode_head.'):
            head.append(p)
        elif any(k in name for k in no_decay_keys):
            enc_no_decay.append(p)
        else:
            enc_decay.append(p)
    groups = [dict(params=enc_decay, lr_mult=1.0, weight_decay=o.weight_decay),
              dict(params=enc_no_decay, lr_mult=1.0, weight_decay=0.0),
              dict(params=head, lr_mult=o.head_lr_mult, weight_decay=o.weight_decay)]
    groups = [g for g in groups if g['params']]
    if o.type == 'sgd':
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


# DDP without broadcasting buffers (BN statistics) from rank 0 at every forward: each rank keeps its own, as
# in the original. PyTorch 2.13 renamed broadcast_buffers (a FutureWarning per rank) to forward_sync_buffers,
# which also syncs them once at the start (the same on every rank then: fresh, or loaded from one checkpoint).
DDP_NO_BUFFER_SYNC = {'forward_sync_buffers': False} if 'forward_sync_buffers' in \
    inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters else {'broadcast_buffers': False}


class Trainer:
    """The stateful modules of a method (student, EMA teacher(s), ...) and their optimizers;
    `step` runs one iteration.

    modules: name -> nn.Module, everything checkpointing and resume save and restore.
    optimizers: name -> optimizer of the trained modules (a subset of modules); under DDP those
        modules run wrapped (self.wrapped) and synchronise in the last pass that trains them.
    ema: teacher name -> momentum; teachers follow the student before every iteration.
    The frozen ImageNet encoder (self.imnet) is not saved: it always holds the pretrained file.
    """

    def __init__(self, cfg, device, rank=0, world=1, load_pretrained=True, random_init=False):
        """load_pretrained: initialise the student's encoder from model.pretrained (not on resume).
        random_init: no weights from files at all (--benchmark): the frozen ImageNet encoder too."""
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        u = cfg.uda
        self.passes = method_passes(cfg)
        names = [n for n, _ in self.passes]
        self.fd = u.fd_lambda > 0
        if self.fd and not cfg.model.pretrained:
            raise ConfigError('uda.fd_lambda > 0 compares features with the ImageNet encoder, which needs '
                              'model.pretrained; set uda.fd_lambda=0 to train without the feature distance')
        if u.mode in ('advseg', 'minent') and cfg.model.type == 'hrda':
            raise ConfigError(f'uda.mode={u.mode} is implemented for single-scale models (as Table 1 runs it): '
                              'set model.type=encoder_decoder')
        student = mic_model.build_model(cfg.model, load_pretrained=load_pretrained and not random_init)
        self.modules = {'student': student.to(device)}
        self.num_classes = cfg.model.num_classes
        self.class_names = mic_data.class_table(cfg.data, self.num_classes).names
        self.ema = {}
        if 'mix' in names:
            self.modules['teacher'] = self._frozen_copy()
            self.ema['teacher'] = u.alpha
        separate = u.mask_alpha != 'same' or u.mask_pseudo_threshold != 'same'
        # MIC's own EMA teacher: when asked for, and for methods without a teacher (AdvSeg, MinEnt)
        if 'masked' in names and u.mode != 'source_only' and ('teacher' not in self.ema or separate):
            self.modules['mic_teacher'] = self._frozen_copy()
            self.ema['mic_teacher'] = u.alpha if u.mask_alpha == 'same' else u.mask_alpha
        self.mic_threshold = u.pseudo_threshold if u.mask_pseudo_threshold == 'same' else u.mask_pseudo_threshold
        self.imnet = None
        if self.fd:  # the frozen ImageNet encoder: always the pretrained file's weights (also on resume)
            self.imnet = copy.deepcopy(student.backbone)  # the architecture (a copy draws no random numbers)
            if not random_init:
                mic_model.load_pretrained_encoder(self.imnet, cfg.model.pretrained)
            self.imnet.to(device).eval()
            for p in self.imnet.parameters():
                p.requires_grad_(False)
        if cfg.train.compile:
            student.backbone.compile()
        self.optimizers = {'student': build_optimizer(student, cfg)}
        self.lr_schedules = {'student': lambda it: lr_at(it, cfg)}
        if 'discriminator' in names:
            a = u.advseg
            self.modules['discriminator'] = mic_model.FCDiscriminator(self.num_classes).to(device)
            self.optimizers['discriminator'] = torch.optim.Adam(self.modules['discriminator'].parameters(), lr=a.lr,
                                                                betas=(0.9, 0.99))
            self.lr_schedules['discriminator'] = \
                lambda it: (a.lr - a.min_lr) * (1 - it / cfg.train.max_iters) ** a.power + a.min_lr
            # As in the original, whose segmentor optimizer is built over all of its modules: the
            # segmentor's optimizer steps the discriminator too (after its gradients), before the Adam step.
            self.optimizers['student'].add_param_group(dict(params=list(self.modules['discriminator'].parameters()),
                                                            lr_mult=1.0, weight_decay=cfg.optim.weight_decay))
        self.keep_source_logits = 'discriminator' in names
        self.wrapped = {name: self.modules[name] for name in self.optimizers}
        if world > 1:
            ids = [device.index] if device.type == 'cuda' else None
            self.wrapped = {name: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids, **DDP_NO_BUFFER_SYNC)
                            for name, m in self.wrapped.items()}
        # each trained module synchronises its gradients (DDP) in the last pass that trains it
        self.last_pass = {m: max(i for i, (_, p) in enumerate(self.passes) if m in p.trains)
                          for m in self.optimizers if any(m in p.trains for _, p in self.passes)}
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == 'fp16')
        # constants made on the device once: a host->device copy inside the step would wait for the GPU
        self.fd_classes = torch.tensor(u.fd_classes, device=device)
        self.mean = torch.tensor(mic_data.IMG_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(mic_data.IMG_STD, device=device).view(1, 3, 1, 1)
        self.debug = None  # tensors of the last iteration, kept only when asked for (debug images)

    @property
    def student(self):
        return self.modules['student']

    def _frozen_copy(self):
        m = copy.deepcopy(self.student)
        for p in m.parameters():
            p.requires_grad_(False)
        m.train(True)
        mic_model.set_dropout(m, False)  # teachers: no dropout / drop path, BN on batch statistics
        return m

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- what passes call ------------------------------------------------------
    def forward(self, name, img, label, **kw):
        """Training forward of a trained module (through DDP when distributed) under autocast."""
        with self.autocast():
            return self.wrapped[name](img, label, **kw)

    def pseudo_labels(self, teacher, img, valid, threshold):
        """(pseudo-label [B,H,W], weight [B,H,W]) of a teacher on target images (no gradients)."""
        u = self.cfg.uda
        with torch.no_grad(), self.autocast():
            logits = self.modules[teacher].encode_decode(img)
        return pseudo_label_and_weight(logits, threshold, valid, u.pseudo_weight_ignore_top,
                                       u.pseudo_weight_ignore_bottom)

    def sum_losses(self, out, prefix, logs, scale=None):
        """The sum of the 'loss_*' entries of a forward's outputs (each times scale.get(key, 1));
        each term is logged as '<prefix>.<key>'."""
        loss = 0
        for k, v in out.items():
            if k.startswith('loss_'):
                if scale and k in scale:
                    v = v * scale[k]
                logs[f'{prefix}.{k}'] = v.detach()
                loss = loss + v
        return loss

    def set_lr(self, iteration):
        for name, opt in self.optimizers.items():
            lr = self.lr_schedules[name](iteration)
            for g in opt.param_groups:
                g['lr'] = lr * g.get('lr_mult', 1.0)
        return self.lr_schedules['student'](iteration)

    def _sync_context(self, index, trains):
        """no_sync() of every wrapped module this pass trains, unless this is its last pass."""
        stack = contextlib.ExitStack()
        if self.world > 1:
            for name in trains:
                if index != self.last_pass[name]:
                    stack.enter_context(self.wrapped[name].no_sync())
        return stack

    # -- the iteration -----------------------------------------------------------
    def step(self, batch, iteration, keep_debug=False):
        """One training iteration. Returns a dict of detached scalar tensors (losses, lr, pseudo ratio)."""
        src, tgt = batch['img'], batch['target_img']
        s = StepState(src=src, gt=batch['gt'].long(), tgt=tgt, valid=batch['valid_pseudo_mask'],
                      iteration=iteration, logs={}, B=src.shape[0], H=src.shape[2], W=src.shape[3],
                      plabel=None, pweight=None, src_logits=None, tgt_logits=None,
                      debug={'source': src, 'source_gt': batch['gt'], 'target': tgt} if keep_debug else None)
        # teachers follow the student (before this iteration's update)
        for name, momentum in self.ema.items():
            ema_update(self.modules[name], self.student, iteration, momentum)
        s.logs['lr'] = torch.tensor(self.set_lr(iteration))
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        for i, (name, p) in enumerate(self.passes):
            with self._sync_context(i, p.trains):
                loss = p.run(self, s)
                if loss is not None:
                    self.scaler.scale(loss).backward()
            del loss
        for opt in self.optimizers.values():  # one step over the gradients of all passes
            self.scaler.step(opt)
        self.scaler.update()
        self.debug = s.debug
        return s.logs

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self):
        return {'modules': {name: m.state_dict() for name, m in self.modules.items()},
                'optimizers': {name: o.state_dict() for name, o in self.optimizers.items()},
                'scaler': self.scaler.state_dict()}

    def load_state_dict(self, ckpt):
        modules, optimizers = ckpt.get('modules'), ckpt.get('optimizers')
        if modules is None:  # the layout of checkpoints written before the modules dict
            modules = {k: ckpt[k] for k in ('student', 'teacher', 'mic_teacher') if ckpt.get(k) is not None}
            optimizers = {'student': ckpt['optimizer']}
        for kind, ours, theirs in (('module', self.modules, modules), ('optimizer', self.optimizers, optimizers)):
            if set(ours) != set(theirs):
                raise ConfigError(f'the checkpoint holds the {kind}s {sorted(theirs)}, this config trains '
                                  f'{sorted(ours)}: resume with the config the run was started with')
        for name, m in self.modules.items():
            m.load_state_dict(modules[name])
        for name, o in self.optimizers.items():
            o.load_state_dict(optimizers[name])
        self.scaler.load_state_dict(ckpt['scaler'])


# --------------------------------------------------------------------------
# RNG state, checkpoints, run folder
# --------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    return {'python': random.getstate(),
            'numpy': (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _map_tensors(obj, fn):
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def gather_rng_states():
    """Every rank's RNG state (rank order), for an exact resume of all ranks."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    # numpy arrays travel through all_gather_object reliably; tensors are converted back after
    dist.all_gather_object(states, _map_tensors(state, lambda t: t.numpy() if torch.is_tensor(t) else t))
    return [_map_tensors(s, torch.from_numpy) for s in states]


def architecture(cfg_model):
    """The config fields that decide the parameters' names and shapes."""
    m = cfg_model
    return {'type': m['type'], 'backbone': m['backbone']['type'], 'decode_head': dict(m['decode_head']),
            'num_classes': m['num_classes'],
            'hrda_attention': (m['hrda']['attention_classwise'], m['hrda']['fixed_attention'])
            if m['type'] == 'hrda' else None}


def check_work_dir(cfg, resume):
    """Refuse to start a new run in a folder that holds another run.

    Returns True when the folder holds this very config's finished run (nothing left to train).
    """
    ckpt = os.path.join(cfg.train.work_dir, 'latest.pth')
    if resume or not os.path.exists(ckpt):
        return False
    try:
        old = mic_model.read_checkpoint(ckpt, mmap=True)
    except mic_model.CheckpointError as e:
        raise ConfigError(f'{e}\n{ckpt} is in the run folder: delete it or choose another train.work_dir') from None
    if old.get('config') == stored(cfg) and old.get('iteration', 0) >= cfg.train.max_iters:
        return True
    new_folder = 'set train.work_dir to a new folder (--opt train.work_dir=work_dirs/NEW)'
    old_model = old.get('config', {}).get('model')
    if old_model is not None and architecture(old_model) != architecture(cfg.model):
        raise ConfigError(f'{cfg.train.work_dir} already holds a run of another model ({ckpt}, iteration '
                          f'{old.get("iteration")}, model {architecture(old_model)}): {new_folder}')
    what = 'the same config, stopped at iteration' if old.get('config') == stored(cfg) else \
        'a run of another config, at iteration'
    raise ConfigError(f'{cfg.train.work_dir} already holds {what} {old.get("iteration")} ({ckpt}). '
                      f'Pass --resume to continue it, or {new_folder}.')


# --------------------------------------------------------------------------
# Logging and debug images
# --------------------------------------------------------------------------

def memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)


def save_debug_grid(debug, path, mean, std, max_width=1536, palette=None):
    """One row per sample, titled columns: source image and label, target image, pseudo-label, mixed
    image and label, the student's prediction on it, masked image, the prediction on that. Labels in
    `palette` (the colours of data.classes; default Cityscapes')."""
    from PIL import Image, ImageDraw

    def image(x):
        return ((x.float() * std[0] + mean[0]).clamp(0, 255)).byte().permute(1, 2, 0).cpu().numpy()

    def label(x):
        return mic_data.colorize(x.reshape(x.shape[-2:]).cpu().numpy().astype(np.uint8), palette)

    def pred(logits, size):
        return label(F.interpolate(logits[None].float(), size=size)[0].argmax(0))
    B, size = debug['source'].shape[0], tuple(debug['source'].shape[2:])
    columns = [('source', lambda i: image(debug['source'][i])), ('src label', lambda i: label(debug['source_gt'][i])),
               ('target', lambda i: image(debug['target'][i]))]
    if 'pseudo_label' in debug:
        columns += [('pseudo', lambda i: label(debug['pseudo_label'][i])),
                    ('mixed', lambda i: image(debug['mixed'][i])),
                    ('mix label', lambda i: label(debug['mixed_label'][i])),
                    ('mix pred', lambda i: pred(debug['mix_pred'][i], size))]
    if 'masked' in debug:
        columns += [('masked', lambda i: image(debug['masked'][i])),
                    ('mask pred', lambda i: pred(debug['masked_pred'][i], size))]
    rows = np.concatenate([np.concatenate([fn(i) for _, fn in columns], axis=1) for i in range(B)], axis=0)
    header = Image.new('RGB', (rows.shape[1], 14), 'white')
    draw = ImageDraw.Draw(header)
    for j, (title, _) in enumerate(columns):
        draw.text((j * size[1] + 2, 1), title, fill='black')
    grid = Image.new('RGB', (rows.shape[1], rows.shape[0] + 14))
    grid.paste(header, (0, 0))
    grid.paste(Image.fromarray(rows), (0, 14))
    if grid.width > max_width:
        grid = grid.resize((max_width, round(grid.height * max_width / grid.width)), Image.BILINEAR)
    mic_data.save_png(path, np.asarray(grid))


# --------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------

def train(cfg, resume=None, command=''):
    rank, world, device = setup_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, command, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def set_determinism(deterministic):
    """train.deterministic: deterministic algorithms and no cuDNN autotuning, so that two runs of
    one seed on one machine can be compared; otherwise cuDNN picks the fastest kernels (as the original)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(deterministic)


class RunLog:
    """What rank 0 writes while training: log.jsonl, TensorBoard (train.tensorboard), report.png,
    the progress lines and the debug grids. Other ranks get an object that does nothing."""

    def __init__(self, cfg, start, enabled, palette=None):
        self.cfg, self.enabled, self.palette = cfg, enabled, palette
        self.work_dir = cfg.train.work_dir
        self.path = os.path.join(self.work_dir, 'log.jsonl')
        self.progress = mic_report.Progress(cfg.train.max_iters, initial=start, enabled=enabled)
        self.tb = None
        if enabled and cfg.train.tensorboard:
            self.tb = mic_report.TensorBoardWriter(os.path.join(self.work_dir, 'tensorboard'), purge_step=start or None)
        self.report_note = None  # why report.png cannot be drawn (said once)

    def write(self, record):
        if not self.enabled:
            return
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            raise mic_runtime.output_error(e, self.path) from None
        if self.tb is not None:
            self.tb.add_record(record)

    def train_record(self, record, optimizers):
        self.write(record)
        self.progress.log(record)
        if self.tb is not None:
            for name, opt in optimizers.items():
                self.tb.add_learning_rates(opt, record['iteration'])

    def debug_grid(self, trainer, iteration):
        if not self.enabled:
            return
        path = os.path.join(self.work_dir, 'debug', f'{iteration:06d}.png')
        mic_runtime.make_dirs(os.path.dirname(path))
        save_debug_grid(trainer.debug, path, trainer.mean, trainer.std, palette=self.palette)
        if self.tb is not None:
            self.tb.add_image('debug', path, iteration)

    def report(self):
        """Redraw report.png (matplotlib is optional: without it, say so once and go on)."""
        if not self.enabled or self.report_note:
            return
        try:
            mic_report.write_report(self.work_dir)
        except mic_report.MissingPackageError as e:
            self.report_note = str(e)
            self.progress.write(f'note: no report.png: {e}')

    def message(self, text):
        if self.enabled:
            self.progress.write(text)

    def close(self):
        self.progress.close()
        if self.tb is not None:
            self.tb.close()


def resume_path(work_dir, resume):
    """The checkpoint to continue from, or None for a new run.

    --resume / --resume auto: work_dir/latest.pth, and a new run when it does not exist yet, so that
    one command serves the first start and every restart (docs/cluster.md). --resume PATH: PATH,
    which must exist."""
    if not resume:
        return None
    if resume == 'auto':
        path = os.path.join(work_dir, 'latest.pth')
        if os.path.isfile(path):
            return path
        print0(f'--resume auto: {path} does not exist yet; starting a new run')
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume: checkpoint {resume} does not exist')
    return resume


def finished_run(cfg):
    """The metrics of this config's finished run in train.work_dir (printed), or None."""
    path = os.path.join(cfg.train.work_dir, 'metrics.json')
    if not os.path.exists(path):
        return None
    print0(f'{cfg.train.work_dir} already holds this config\'s finished run; its results: {path}. '
           'Delete the folder or set train.work_dir to train again.')
    with open(path) as f:
        metrics = json.load(f)
    if metrics.get('mIoU') is not None:  # (a data.val without labels gives predictions only)
        print0(f'target mIoU: {metrics["mIoU"]:.2f}')
    return metrics


def trained_to_the_end(cfg, ckpt_path):
    """Whether ckpt_path holds this very config's run at train.max_iters (a restart of a finished run:
    --resume auto reports it instead of evaluating it again)."""
    if ckpt_path is None:
        return False
    old = mic_model.read_checkpoint(ckpt_path, mmap=True)
    return old.get('config') == stored(cfg) and old.get('iteration', 0) >= cfg.train.max_iters


def check_validation_split(cfg):
    """List data.val before the first iteration: a wrong root or split fails now, naming its path,
    and not at the first evaluation hours later."""
    val = cfg.data.val
    if not mic_data.list_samples(val, need_labels=mic_data.has_labels(val)):
        raise mic_data.DataError(f'data.val ({val.root}, split {val.split}) holds no images')


def first_batches(loader, ckpt, rank):
    """The batch iterator, restored RNG state, and the first batch drawn: a data error of the first
    batch fails before anything is written to the run folder. DataLoader workers die with the main
    process (die_with_parent), not seconds after it."""
    if loader.num_workers > 0:
        loader.worker_init_fn = functools.partial(_loader_worker_init, loader.worker_init_fn, os.getpid())
    batches = iter(loader)
    if ckpt is not None:  # after the loader is made: it draws its worker seed from the global RNG
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    return batches, next(batches)


def _loader_worker_init(previous, parent_pid, worker_id):
    mic_runtime.die_with_parent(parent_pid)
    if previous is not None:
        previous(worker_id)


def close_batches(batches):
    """Shut the loader's workers down now (persistent workers outlive their iterator otherwise)."""
    shutdown = getattr(batches, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()


def open_run_folder(cfg, command, world, start, device):
    """Rank 0 takes the run folder's lock and writes config.yaml and command.txt; log.jsonl loses the
    records after `start`. Every rank fails when rank 0 did (one flag, all_reduce MIN). The lock (rank 0)."""
    lock, error = None, None
    if is_main():
        try:
            lock = _prepare_run_folder(cfg, command, world, start)
        except Exception as e:  # raised below, after the other ranks have heard of it
            error = e
    if dist.is_initialized():
        ok = torch.tensor([int(error is None)], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok) and error is None:
            raise mic_runtime.RunLockError('rank 0 could not prepare the run folder (its message says why)')
    if error is not None:
        raise error
    return lock


def _prepare_run_folder(cfg, command, world, start):
    work_dir = cfg.train.work_dir
    lock = mic_runtime.RunLock(work_dir).acquire()
    try:
        if lock.took_over:
            print0(lock.took_over)
        removed = lock.remove_temp_files()  # a write that was killed midway (no other run writes here)
        if removed:
            print0(f'removed {len(removed)} temporary file(s) of an interrupted write from {work_dir}')
        mic_runtime.check_writable(work_dir)
        dropped = mic_report.truncate_log(os.path.join(work_dir, mic_report.LOG_NAME), start)
        if dropped:
            print0(f'log.jsonl: dropped {dropped} record(s) after iteration {start} (they are logged again)')
        atomic_write_text(os.path.join(work_dir, 'config.yaml'), dump_yaml(cfg))
        append_command(os.path.join(work_dir, 'command.txt'), command, world)
    except BaseException:
        lock.release()
        raise
    return lock


def best_from_log(work_dir):
    """The best evaluation logged in work_dir/log.jsonl (after its truncation to the resumed
    iteration), as metrics.json holds it, or None."""
    path = os.path.join(work_dir, mic_report.LOG_NAME)
    best = None
    for r in (mic_report.read_log(path)[1] if os.path.isfile(path) else []):
        entry = {**r['eval'], 'IoU': r.get('IoU'), 'iteration': r['iteration'],
                 'checkpoint': os.path.join(work_dir, mic_report.BEST_NAME)}
        if mic_report.is_best(entry, best):
            best = entry
    return best


def link_or_copy(src, dst):
    """dst becomes a copy of src, atomically: a hard link when the file system allows (no extra disk;
    src is later replaced by a new file, dst keeps this one), else a copy."""
    tmp = os.path.join(os.path.dirname(dst), f'.{os.path.basename(dst)}.link.tmp')
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        with open(src, 'rb') as f:
            mic_runtime.atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))


def time_to_checkpoint(cfg, last_save):
    """train.ckpt_minutes passed since the last checkpoint (on this rank's clock)."""
    minutes = cfg.train.ckpt_minutes
    return bool(minutes) and time.monotonic() - last_save >= 60 * minutes


def nonfinite_advice(work_dir):
    """What to do after a divergence, saying what is true of the run folder: whether a checkpoint
    exists, and whether the losses logged before it were already exploding (then resuming it would
    diverge again)."""
    fix = 'lower optim.lr, use train.amp=none or bf16 instead of fp16, or check the data'
    ckpt = os.path.join(work_dir, 'latest.pth')
    if not os.path.isfile(ckpt):
        return f'No checkpoint was written yet: {fix}, then start again.'
    kept = mic_model.read_checkpoint(ckpt, mmap=True).get('iteration')
    where = f'{ckpt} holds iteration {kept} (the non-finite state was not saved)'
    log = os.path.join(work_dir, mic_report.LOG_NAME)
    totals = [(r['iteration'], mic_report.total_loss(r)) for r in
              (mic_report.read_log(log)[0] if os.path.isfile(log) else []) if r['iteration'] <= (kept or 0)]
    if len(totals) >= 3:
        typical = statistics.median(t for _, t in totals)
        it, last = totals[-1]
        if last > EXPLODING * typical:
            return (f'{where}, but the losses were already exploding then (total {last:.3g} at iteration {it}, '
                    f'median {typical:.3g}): resuming it would diverge again. {fix}, then start again in a new '
                    f'train.work_dir.')
    return f'{where}: {fix}, then continue with --resume.'


EXPLODING = 10  # a logged total loss this many times the run's median means the run was diverging


def _train(cfg, resume, command, rank, world, device):
    work_dir = cfg.train.work_dir
    set_determinism(cfg.train.deterministic)
    ckpt_path = resume_path(work_dir, resume)
    if check_work_dir(cfg, ckpt_path is not None) or (resume == 'auto' and trained_to_the_end(cfg, ckpt_path)):
        metrics = finished_run(cfg)
        if metrics is not None:
            return metrics
        # trained to the end, but stopped before the final evaluation wrote metrics.json
        print0(f'{work_dir} holds this config\'s fully trained run without metrics.json; evaluating it')
        ckpt_path = os.path.join(work_dir, 'latest.pth')
    if is_main() and cfg.data.demo.enabled:
        mic_demo.ensure_demo_data(cfg.data.demo, log=print0)
    if dist.is_initialized():
        dist.barrier()

    # Everything that can fail on bad input (model, weights, data, the validation split, the first
    # batch) comes before the first file is written to the run folder, so that a failed start leaves
    # no half-made run behind.
    check_validation_split(cfg)
    seed_everything(cfg.train.seed + rank)
    trainer = Trainer(cfg, device, rank, world, load_pretrained=not ckpt_path)
    start, ckpt = 0, None
    if ckpt_path:
        ckpt = mic_model.read_checkpoint(ckpt_path)
        old = architecture(ckpt['config']['model'])
        if old != architecture(cfg.model):
            raise ConfigError(f'refusing to resume {ckpt_path}: it was trained with model {old}, '
                              f'the config asks for {architecture(cfg.model)}')
        trainer.load_state_dict(ckpt)
        start = ckpt['iteration']
    loader = mic_data.build_train_loader(cfg.data, cfg.train.seed, rank=rank, start_iter=start) \
        if start < cfg.train.max_iters else None
    run = types.SimpleNamespace(cfg=cfg, trainer=trainer, device=device, work_dir=work_dir, start=start,
                                classes=mic_data.class_table(cfg.data, cfg.model.num_classes), run_log=None,
                                nonfinite=NonFiniteWatch(device), best=None, saved=None, last_save=time.monotonic(),
                                it=start, command=command)
    # the handlers go in before the loader's workers start, so that the workers inherit them
    with mic_runtime.StopSignals() as stop:
        try:
            return _run(run, loader, ckpt, ckpt_path, command, world, stop)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f'{e} {nonfinite_advice(work_dir)}') from None


def _run(run, loader, ckpt, ckpt_path, command, world, stop):
    """The run folder opened (locked) and the loop, then the final evaluation and metrics.json."""
    cfg, work_dir, batches, lock = run.cfg, run.work_dir, None, None
    try:
        first = None
        if loader is not None:
            batches, first = first_batches(loader, ckpt, run.trainer.rank)
        del ckpt
        lock = open_run_folder(cfg, command, world, run.start, run.device)
        if ckpt_path:
            print0(f'resumed {ckpt_path} at iteration {run.start}')
        run.best = best_from_log(work_dir) if is_main() else None
        run.run_log = RunLog(cfg, run.start, enabled=is_main(), palette=run.classes.palette)
        if loader is not None:
            train_iterations(run, itertools.chain([first], batches), stop)
        else:
            print0(f'{work_dir} already trained to iteration {cfg.train.max_iters}; evaluating')
        metrics = evaluate_run(run, cfg.train.max_iters, pred_dir=os.path.join(work_dir, 'preds') if is_main() else None)
    except KeyboardInterrupt:  # the third Ctrl-C (StopSignals): no checkpoint
        raise TrainingInterrupted(run.it, work_dir) from None
    finally:
        close_batches(batches)
        if run.run_log is not None:
            run.run_log.close()
        if lock is not None:
            lock.release()
    if is_main():
        write_metrics(run, metrics)
    return metrics


def train_iterations(run, batches, stop):
    """Iterations run.start..max_iters: log records, checkpoints (every train.ckpt_interval iterations,
    every train.ckpt_minutes, at every evaluation and at the end), evaluations (after the checkpoint),
    and a stop on request (SIGTERM, SIGUSR1, SIGINT) with a checkpoint at the iteration reached."""
    trainer, t = run.trainer, run.cfg.train
    acc, acc_n, t_last, data_time = {}, 0, time.time(), 0.0
    for it in range(run.start, t.max_iters):
        run.it = it
        t0 = time.time()
        batch = {k: v.to(run.device, non_blocking=True) for k, v in next(batches).items()}
        data_time += time.time() - t0
        keep_debug = t.debug_img_interval > 0 and it % t.debug_img_interval == 0
        logs = trainer.step(batch, it, keep_debug=keep_debug)
        run.nonfinite.update(it, logs)  # on the device: no host synchronisation per iteration
        for k, v in logs.items():
            acc[k] = acc.get(k, 0) + v.detach().float()
        acc_n += 1
        if keep_debug:
            run.run_log.debug_grid(trainer, it)
        trainer.debug = None
        run.run_log.progress.update()
        done = run.it = it + 1
        if done % t.log_interval == 0 or done == t.max_iters:
            run.nonfinite.check()
            dt = (time.time() - t_last) / acc_n
            record = {'iteration': done, **{k: round(float(v) / acc_n, 6) for k, v in acc.items()},
                      'time_per_iter': round(dt, 4), 'data_time': round(data_time / acc_n, 4),
                      'memory_mb': round(memory_mb(run.device))}
            run.run_log.train_record(record, trainer.optimizers)
            acc, acc_n, t_last, data_time = {}, 0, time.time(), 0.0
        evaluating = t.eval_interval and done % t.eval_interval == 0 and done < t.max_iters
        if evaluating or (t.ckpt_interval and done % t.ckpt_interval == 0) or done == t.max_iters:
            save_checkpoint(run, done)
        if evaluating:
            evaluate_run(run, done)
        stop_if_asked(run, stop, done)


def stop_if_asked(run, stop, done):
    """Once per iteration on every rank: a checkpoint when train.ckpt_minutes passed, and on a stop
    signal (agreed by all ranks) a checkpoint at `done` and TrainingStopped."""
    signal_name = stop.agreed(run.device, checkpoint_due=time_to_checkpoint(run.cfg, run.last_save))
    if (signal_name or stop.checkpoint_due) and run.saved != done:
        save_checkpoint(run, done)
    if signal_name:
        raise TrainingStopped(signal_name, done)


def save_checkpoint(run, iteration):
    """latest.pth at `iteration` (rank 0 writes; every rank takes part: the RNG states are gathered).
    Refused when the losses or weights are non-finite, so that a bad state never replaces a good file."""
    run.nonfinite.check_before_checkpoint(run.trainer, iteration)
    states = gather_rng_states()
    if is_main():
        cfg = run.cfg
        checkpoint = {**run.trainer.state_dict(), 'iteration': iteration, 'rng': states,
                      'sampler': {'next_index': iteration * cfg.data.batch_size}, 'config': stored(cfg),
                      'meta': {'command': run.command, 'git_commit': git_commit(),
                               'best_mIoU': run.best['mIoU'] if run.best else None,
                               'time': datetime.datetime.now().isoformat(timespec='seconds'),
                               'torch': str(torch.__version__), 'world_size': run.trainer.world}}
        mic_runtime.atomic_write(os.path.join(run.work_dir, 'latest.pth'), lambda f: torch.save(checkpoint, f))
    run.saved, run.last_save = iteration, time.monotonic()


def evaluate_run(run, iteration, pred_dir=None):
    """Evaluate the student on data.val at `iteration` (after latest.pth of that iteration is written):
    log it, and make best.pth a copy of latest.pth when it is the best so far (mic_report.is_best)."""
    cfg, run_log = run.cfg, run.run_log
    labelled = mic_data.has_labels(cfg.data.val)
    if not labelled and iteration < cfg.train.max_iters:
        return None  # without labels data.val only gets the final predictions
    # The evaluation draws from the global RNG (its DataLoader's seed). latest.pth of this iteration was
    # written before it, so the training must go on with the numbers it had then: a resumed run is exact.
    state = rng_state()
    try:
        metrics = mic_eval.evaluate(run.trainer.student, cfg.data.val, num_classes=cfg.model.num_classes,
                                    device=run.device, amp=cfg.train.amp, pred_dir=pred_dir, progress=False,
                                    synthia16=cfg.data.source.type == 'synthia',
                                    num_workers=cfg.data.num_workers, classes=run.classes)
    finally:
        set_rng_state(state)
    if 'mIoU' not in metrics and not labelled:
        print0(f'data.val ({cfg.data.val.root}) has no labels: cannot compute mIoU, predictions only')
        return {'mIoU': None, **metrics}
    if 'mIoU' not in metrics:
        raise mic_data.DataError(f'data.val ({cfg.data.val.root}, split {cfg.data.val.split}) is not fully '
                                 'labelled: training evaluates on a labelled split; point data.val at one')
    entry = {**metrics, 'iteration': iteration, 'checkpoint': os.path.join(run.work_dir, mic_report.BEST_NAME)}
    if is_main() and mic_report.is_best(entry, run.best):
        run.best = entry
        link_or_copy(os.path.join(run.work_dir, 'latest.pth'), entry['checkpoint'])
    best = run.best['mIoU'] if run.best else metrics['mIoU']
    run_log.write({'iteration': iteration, 'eval': {k: v for k, v in metrics.items() if k != 'IoU'},
                   'IoU': metrics.get('IoU'), 'best_mIoU': best})
    run_log.message(f'iteration {iteration}: target mIoU {metrics["mIoU"]:.2f} (best {best:.2f})')
    run_log.report()
    return metrics


def write_metrics(run, metrics):
    """metrics.json: the final evaluation, and the best one (mic_report.metrics_record)."""
    work_dir, max_iters = run.work_dir, run.cfg.train.max_iters
    last = {**metrics, 'iteration': max_iters, 'checkpoint': os.path.join(work_dir, 'latest.pth')}
    mic_runtime.save_json(os.path.join(work_dir, 'metrics.json'), mic_report.metrics_record(last, run.best))
    if metrics['mIoU'] is None:
        print0(f'trained {max_iters} iterations; no mIoU without labels: predictions in {work_dir}/preds')
    else:
        print0(f'target mIoU after {max_iters} iterations: {metrics["mIoU"]:.2f} '
               f'(per class: {work_dir}/metrics.json, predictions: {work_dir}/preds)')


class TrainingStopped(Exception):
    """A stop asked for by a signal, after latest.pth was written at the iteration reached; `status`
    is the exit status (mic_runtime.stop_exit_status: 130 SIGINT, 138 SIGUSR1, 143 SIGTERM)."""

    def __init__(self, signal_name, iteration):
        self.status = mic_runtime.stop_exit_status(signal_name)
        super().__init__(f'stopped by {signal_name} at iteration {iteration}; latest.pth holds iteration '
                         f'{iteration}; continue with --resume')


class TrainingInterrupted(Exception):
    """An abort without a checkpoint (the third Ctrl-C, or Ctrl-C before the loop): the message says
    where the run stopped and how to continue it."""

    def __init__(self, iteration, work_dir):
        ckpt = os.path.join(work_dir, 'latest.pth')
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # one more Ctrl-C here would print a traceback
        try:
            kept = mic_model.read_checkpoint(ckpt, mmap=True).get('iteration') if os.path.isfile(ckpt) else None
        finally:
            signal.signal(signal.SIGINT, previous)
        where = f'the checkpoint {ckpt} holds iteration {kept}' if kept is not None else 'no checkpoint was written yet'
        super().__init__(f'training interrupted at iteration {iteration}; {where}. Continue it with the same '
                         f'command plus --resume' + ('' if kept is not None else ' (or start it again)'))


class NonFiniteWatch:
    """Watches the losses for NaN/inf without a host synchronisation per iteration: per log key, a
    device-side flag (and the first bad iteration) is accumulated every iteration and read at each log
    interval and before every checkpoint, which also checks the weights of the trained modules, so
    that a non-finite state never replaces a good latest.pth."""

    def __init__(self, device):
        self.keys, self.bad = None, None
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, iteration, logs):
        if self.keys != list(logs):  # the same keys every iteration; a change starts the flags afresh
            self.check()
            self.keys, self.bad = list(logs), torch.zeros(len(logs), dtype=torch.bool, device=self.first.device)
        bad_now = ~torch.isfinite(torch.stack([v.detach().float() for v in logs.values()]))
        self.first = torch.where(bad_now.any() & ~self.bad.any(), iteration, self.first)
        self.bad |= bad_now

    def check(self):
        if self.bad is not None and bool(self.bad.any()):  # the one synchronisation, at a log interval or checkpoint
            names = [k for k, b in zip(self.keys, self.bad.tolist()) if b]
            raise NonFiniteLossError(f'non-finite loss at iteration {int(self.first)}: {", ".join(names)}.')

    def check_before_checkpoint(self, trainer, iteration):
        self.check()
        finite = torch.stack([torch.isfinite(p).all() for m in trainer.optimizers for p in
                              trainer.modules[m].parameters()]).all()
        if not bool(finite):
            raise NonFiniteLossError(f'the weights became non-finite by iteration {iteration} (the losses were '
                                     f'finite: an overflow in the update).')


def append_command(path, command, world):
    """command.txt: one line per invocation of this run folder (time, launcher, command)."""
    launcher = f'torchrun x{world} (rank 0 of {world})' if world > 1 else 'python'
    line = f'{datetime.datetime.now().isoformat(timespec="seconds")}  [{launcher}]  {command}\n'
    old = ''
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    atomic_write_text(path, old + line)


# --------------------------------------------------------------------------
# --benchmark: iterations on synthetic tensors of the config's real sizes
# --------------------------------------------------------------------------

def benchmark(cfg, iters):
    rank, world, device = setup_distributed(cfg.train.device)
    try:
        seed_everything(cfg.train.seed + rank)
        trainer = Trainer(cfg, device, rank, world, random_init=True)  # random weights, same cost
        B, (H, W), K = cfg.data.batch_size, cfg.data.crop_size, cfg.model.num_classes
        gen = torch.Generator().manual_seed(0)
        batch = {'img': torch.randn(B, 3, H, W, generator=gen),
                 'gt': torch.randint(0, K, (B, 1, H, W), generator=gen, dtype=torch.uint8),
                 'target_img': torch.randn(B, 3, H, W, generator=gen),
                 'valid_pseudo_mask': torch.ones(B, 1, H, W, dtype=torch.uint8)}
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        times, checks = [], []
        warmup = min(3, max(iters - 1, 0))
        with mic_runtime.StopSignals() as stop:  # the run loop's stop check, timed on its own
            for i in range(warmup + iters):
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                trainer.step(batch, 1000 + i)
                t_check = time.perf_counter()
                stop.agreed(device)
                t_end = time.perf_counter()
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t - (t_end - t_check))
                    checks.append(t_end - t_check)
        result = {'config': cfg.train.work_dir, 'device': str(device),
                  'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
                  'amp': cfg.train.amp, 'activation_checkpointing': cfg.model.activation_checkpointing,
                  'compile': cfg.train.compile, 'batch': B, 'crop': [H, W], 'iterations': iters,
                  'median_s_per_iter': round(statistics.median(times), 4), 'peak_memory_mb': round(memory_mb(device)),
                  'stop_check_median_s': float(f'{statistics.median(checks):.3g}'),
                  'stop_check_share': float(f'{statistics.median(checks) / statistics.median(times):.3g}'),
                  'world_size': world, 'torch': torch.__version__}
        print0(json.dumps(result))
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Train MIC(HRDA) / MIC(DAFormer) domain adaptation (see the module docstring for examples).',
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n')[1])
    parser.add_argument('--cfg', help='YAML config, e.g. configs/gta2cs.yaml (only what differs '
                        'from the defaults in mic_config.py)')
    parser.add_argument('--exp', metavar='ID', help='train every run of one of the paper\'s experiments (80-85) or of '
                        'the demo study (demo), as listed in configs/experiments.yaml, in turn, each in its own run folder; finished runs are reported')
    parser.add_argument('--list', action='store_true', help='with --exp: print one command per run instead')
    parser.add_argument('--opt', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. train.max_iters=1000 model.pretrained=null data.batch_size=1')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='continue a run exactly; --resume (= --resume auto): from train.work_dir/latest.pth, '
                             'or a new run when there is none yet (one command for the first start and every '
                             'restart); --resume CKPT: from that file')
    parser.add_argument('--benchmark', type=int, default=None, metavar='N',
                        help='time N iterations on synthetic tensors of the config\'s sizes; prints median '
                             's/iteration and peak memory, needs no dataset')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms, no cuDNN autotuning (train.deterministic=true): two runs '
                             'of one seed on one machine and world size give the same numbers')
    args = parser.parse_args(argv)
    if (args.cfg is None) == (args.exp is None):
        parser.error('give either --cfg CONFIG or --exp ID')
    if args.list and args.exp is None:
        parser.error('--list goes with --exp')
    mic_runtime.limit_threads()  # no more intra-op threads than this process's share of the cores
    if args.exp is not None:
        return run_experiment(args, argv)
    try:
        cfg = load_config(args.cfg, args.opt + (['train.deterministic=true'] if args.deterministic else []))
        if args.benchmark:
            return benchmark(cfg, args.benchmark)
        command = ' '.join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))
        return train(cfg, args.resume, command)
    except TrainingStopped as e:
        print0(e)
        sys.exit(e.status)
    except TrainingInterrupted as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(130)  # the shell's status for Ctrl-C
    except (ConfigError, mic_data.DataError, mic_model.CheckpointError, FileNotFoundError, NonFiniteLossError,
            mic_report.MissingPackageError, mic_runtime.RunLockError) as e:
        exit_error(e)


def run_experiment(args, argv):
    """--exp ID: the runs of an experiment one after the other (--list: their commands)."""
    try:
        runs = mic_experiments.experiment_runs(args.exp)
        if args.list:
            for line in mic_experiments.experiment_commands(args.exp):
                print(line)
            return runs
        extra = args.opt + (['train.deterministic=true'] if args.deterministic else [])
        results = {}
        for i, (name, cfg_path, opts) in enumerate(runs):
            print0(f'== experiment {args.exp}, run {i + 1}/{len(runs)}: {name}')
            cfg = load_config(cfg_path, opts + extra)
            command = f'mic_train.py --cfg {cfg_path} --opt {" ".join(opts + extra)}'
            results[name] = train(cfg, interrupted_run(cfg), command)
        for name, metrics in results.items():
            print0(f'{name}: target mIoU {metrics["mIoU"]:.2f}')
        return results
    except TrainingStopped as e:
        print0(e)
        sys.exit(e.status)
    except TrainingInterrupted as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(130)
    except (ConfigError, mic_data.DataError, mic_model.CheckpointError, FileNotFoundError, NonFiniteLossError,
            mic_report.MissingPackageError, mic_runtime.RunLockError) as e:
        exit_error(e)


def interrupted_run(cfg):
    """'auto' when train.work_dir holds this very config's unfinished run (continue it), else None:
    a finished run is then reported, another config's run refused, an empty folder started."""
    ckpt = os.path.join(cfg.train.work_dir, 'latest.pth')
    if not os.path.isfile(ckpt):
        return None
    old = mic_model.read_checkpoint(ckpt, mmap=True)
    same = old.get('config') == stored(cfg) and old.get('iteration', 0) < cfg.train.max_iters
    return 'auto' if same else None


if __name__ == '__main__':
    main()
