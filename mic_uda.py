"""The self-training pieces of MIC on DACS (and of the AdvSeg / MinEnt baselines): what one
training iteration computes, as functions and a table of methods. mic_train.Trainer owns the
modules and optimizers and runs the passes this module declares.

    ema_update, pseudo_label_and_weight       mean teacher and its pseudo-labels
    class_mix_masks, mix, strong_augment      DACS's ClassMix and colour jitter / blur (kornia 0.5's maths)
    block_mask                                MIC's random patch mask (token masking: mic_model.token_masking)
    downscale_label_ratio, feature_distance   DAFormer's ImageNet feature distance
    Pass, StepState, *_pass                   the iteration as a list of passes
    Method, Teacher, Module, METHODS          uda.mode -> its passes, teachers and extra trained modules

Imports: torch, mic_model (resize, the discriminator), mic_data (label constants, image statistics)
and mic_report (the pseudo-label class shares of the logs); never mic_train, which imports this.
"""
import contextlib
import copy
import math
import types
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

import mic_data
import mic_model
import mic_report

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
        img = (img * std + mean) / 255.0
        if img.shape[1] > 3:  # colour jitter is defined on RGB: extra bands (near infrared, ...) keep their values
            img = torch.cat([color_jitter(img[:, :3], strength), img[:, 3:]], 1) * 255.0
        else:
            img = color_jitter(img, strength) * 255.0
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
# that runs it. A new method is its pass functions and one METHODS entry (below).

class Pass(NamedTuple):
    run: Callable  # (trainer, state) -> loss tensor or None
    trains: Tuple[str, ...] = ('student',)  # the trained modules whose gradients this pass produces
    when: Callable = lambda cfg: True  # cfg -> whether the pass runs under this config
    reads_source_logits: bool = False  # reads state.src_logits, which the source pass then keeps


class StepState(types.SimpleNamespace):
    """What the passes of one iteration share: the batch, the iteration, the logs, the debug tensors
    (None unless a debug grid is wanted) and what earlier passes produced (e.g. pseudo-labels)."""


def source_pass(t, s):
    """Supervised loss on the source crops, plus the ImageNet feature distance on thing classes."""
    u = t.cfg.uda
    imnet = t.frozen.get('imnet')  # kept when uda.fd_lambda > 0
    out = t.forward('student', s.src, s.gt, return_feat=imnet is not None, return_logits=t.keep_source_logits)
    loss = t.sum_losses(out, 'source', s.logs)
    if t.keep_source_logits:  # for a later pass (the discriminator's), at the input's size
        s.src_logits = mic_model.resize(out['logits'].detach(), s.src.shape[2:])
    if imnet is not None:
        with torch.no_grad(), t.autocast():
            imnet_feats = imnet(t.student.fd_view(s.src))
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
    """MIC: predict pseudo-labels (or source labels) from masked images (uda.mask_mode): image blocks
    zeroed (uda.mask_type=pixel), or the student's ViT tokens replaced by its mask token (token:
    VFM-UDA's masking; the image goes in whole, the encoder draws the masks, teachers never mask)."""
    u = t.cfg.uda
    img, lbl, weight = mic_inputs(t, s)
    if 'aug' in u.mask_mode:
        jitter, blur = augmentation_switches(u, blur=True)
        img = strong_augment(img, jitter, blur, u.color_jitter_strength, t.mean, t.std)
    masking = contextlib.nullcontext()
    if u.mask_type == 'token':
        masking = mic_model.token_masking(t.student, u.mask_ratio)
    else:
        img = img * block_mask(s.B, s.H, s.W, u.mask_ratio, u.mask_block_size, device=img.device)
    with masking:
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
        plabel, pweight = t.pseudo_labels('mic_teacher', s.tgt, s.valid, mic_pseudo_threshold(t.cfg))
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


def mic_pseudo_threshold(cfg):
    """The confidence threshold of the MIC teacher's pseudo-labels (uda.mask_pseudo_threshold)."""
    u = cfg.uda
    return u.pseudo_threshold if u.mask_pseudo_threshold == 'same' else u.mask_pseudo_threshold


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


# --------------------------------------------------------------------------
# The methods: uda.mode -> its passes, teachers and extra trained modules
# --------------------------------------------------------------------------
# mic_train.Trainer builds what an entry declares: an EMA copy of the student per EMA teacher (saved
# in checkpoints, updated before every iteration), each frozen module once (not saved), and each
# extra module with its optimizer and learning-rate schedule (saved and restored on resume).

class Teacher(NamedTuple):
    """A model the passes read but never train, kept when when(cfg) holds: with `momentum` an EMA
    copy of the student; with `build` a frozen module made once from a file (not saved)."""
    when: Callable  # cfg -> bool
    momentum: Optional[Callable] = None  # cfg -> the EMA momentum
    build: Optional[Callable] = None  # (student, cfg, load_weights) -> frozen module


class Module(NamedTuple):
    """A trained module besides the student, with its own optimizer and learning-rate schedule."""
    build: Callable  # cfg -> nn.Module (the trainer moves it to the device)
    optimizer: Callable  # (module, cfg) -> torch.optim.Optimizer
    lr: Callable  # (iteration, cfg) -> its learning rate
    in_student_optimizer: bool = False  # also a parameter group of the student's optimizer


class Method(NamedTuple):
    passes: Tuple[str, ...]  # keys of PASSES, in the order they run (each if its `when` holds)
    teachers: Dict[str, Teacher]  # name -> teacher; EMA teachers are trainer.modules[name]
    modules: Dict[str, Module]  # name -> extra trained module, trainer.modules[name]


def imagenet_encoder(student, cfg, load_weights):
    """DAFormer's frozen ImageNet encoder for the feature distance: the student's encoder architecture
    (a copy draws no random numbers) with model.pretrained's weights, also on resume. load_weights
    False (--benchmark): random weights of the same cost."""
    encoder = copy.deepcopy(student.backbone)
    if load_weights:
        mic_model.load_pretrained_encoder(encoder, cfg.model.pretrained)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def separate_mic_teacher(cfg):
    """Whether MIC asks for its own EMA teacher (uda.mask_alpha / uda.mask_pseudo_threshold set)."""
    return cfg.uda.mask_alpha != 'same' or cfg.uda.mask_pseudo_threshold != 'same'


def mic_momentum(cfg):
    return cfg.uda.alpha if cfg.uda.mask_alpha == 'same' else cfg.uda.mask_alpha


def discriminator_optimizer(module, cfg):
    return torch.optim.Adam(module.parameters(), lr=cfg.uda.advseg.lr, betas=(0.9, 0.99))


def discriminator_lr(iteration, cfg):
    """AdvSeg's polynomial decay from uda.advseg.lr to uda.advseg.min_lr at train.max_iters."""
    a = cfg.uda.advseg
    return (a.lr - a.min_lr) * (1 - iteration / cfg.train.max_iters) ** a.power + a.min_lr


def masking(cfg):
    return cfg.uda.mask_mode is not None


PASSES = {
    'source': Pass(source_pass),
    'mix': Pass(mix_pass),
    'masked': Pass(masked_pass, when=masking),  # MIC
    'adversarial': Pass(adversarial_pass),
    'entropy': Pass(entropy_pass),
    'discriminator': Pass(discriminator_pass, trains=('discriminator',), reads_source_logits=True),
}
IMAGENET_ENCODER = Teacher(when=lambda cfg: cfg.uda.fd_lambda > 0, build=imagenet_encoder)
# MIC's own EMA teacher: when asked for, and for the methods without a teacher of their own
OWN_MIC_TEACHER = Teacher(when=masking, momentum=mic_momentum)
DISCRIMINATOR = Module(build=lambda cfg: mic_model.FCDiscriminator(cfg.model.num_classes),
                       optimizer=discriminator_optimizer, lr=discriminator_lr,
                       # the original's segmentor optimizer is built over all of its modules: it steps
                       # the discriminator too (after its gradients), before the discriminator's Adam
                       in_student_optimizer=True)

METHODS = {  # uda.mode -> Method (mic_config.UDA_MODES lists the same keys; a test holds them equal)
    'source_only': Method(('source', 'masked'), {'imnet': IMAGENET_ENCODER}, {}),
    'dacs': Method(('source', 'mix', 'masked'),
                   {'teacher': Teacher(when=lambda cfg: True, momentum=lambda cfg: cfg.uda.alpha),
                    'mic_teacher': Teacher(when=lambda cfg: masking(cfg) and separate_mic_teacher(cfg),
                                           momentum=mic_momentum),
                    'imnet': IMAGENET_ENCODER}, {}),
    'advseg': Method(('source', 'adversarial', 'masked', 'discriminator'),
                     {'mic_teacher': OWN_MIC_TEACHER, 'imnet': IMAGENET_ENCODER}, {'discriminator': DISCRIMINATOR}),
    'minent': Method(('source', 'entropy', 'masked'), {'mic_teacher': OWN_MIC_TEACHER, 'imnet': IMAGENET_ENCODER}, {}),
}


def method_passes(cfg):
    """[(name, Pass)] of the configured method that run under cfg, in order."""
    passes = [(n, PASSES[n]) for n in METHODS[cfg.uda.mode].passes]
    return [(n, p) for n, p in passes if p.when(cfg)]
