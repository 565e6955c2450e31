"""Hold this implementation to the original MIC code (lhoyer/MIC, folder seg/) on the same weights and inputs.

The original needs its own environment (mmcv-full is not needed: the pure-Python mmcv builds on CPU):

    git clone https://github.com/lhoyer/MIC /tmp/MIC
    python -m venv /tmp/micref && . /tmp/micref/bin/activate
    pip install torch==2.13.0 numpy pyyaml tqdm matplotlib addict yapf "setuptools<70" wheel
    pip install --no-build-isolation mmcv==1.3.7 && pip install --no-deps kornia==0.5.8
    python benchmarks/compare_with_original.py --ref /tmp/MIC/seg --variant b0   # ~4 min on 2 CPU cores (b5: +4 min)
    python benchmarks/compare_with_original.py --ref /tmp/MIC/seg --only dlv2     # one part: mit, dlv2 or helpers

Parts: MiT + DAFormer + HRDA (the paper's model), ResNet-V1c + DeepLabV2 ('dlv2red') + HRDA on it
(Table 1, experiment 81 of the original; --depth 50 for a faster ResNet-50 run), and the training helpers.
timm 0.3.2 and torchvision do not import with a current CPU torch, so minimal stand-ins for the
three timm helpers the original uses (DropPath, to_2tuple, trunc_normal_: initialisation and stochastic
depth only, both switched off in the comparisons) and an empty torchvision are put in sys.modules.
Prints one line per check: max |ours - original| and OK when <= 1e-4 x max(1, max |value|).
"""
import argparse
import collections.abc
import copy
import math
import os
import sys
import types

import torch
import torch.nn as nn

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def install_stand_ins():
    tv = types.ModuleType('torchvision')
    tv.__version__ = '0.0.0'
    tv.models = types.ModuleType('torchvision.models')
    tv.models.__path__ = []
    sys.modules.update({'torchvision': tv, 'torchvision.models': tv.models})

    class DropPath(nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if not self.drop_prob or not self.training:
                return x
            keep = 1 - self.drop_prob
            return x.div(keep) * (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1))).floor_()
    layers = types.ModuleType('timm.models.layers')
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)
    layers.trunc_normal_ = lambda t, std=1.0: nn.init.trunc_normal_(t, std=std)
    timm = types.ModuleType('timm')
    timm.models = types.ModuleType('timm.models')
    timm.models.layers = layers
    sys.modules.update({'timm': timm, 'timm.models': timm.models, 'timm.models.layers': layers})
    # mic_train imports mic_eval, whose only heavy dependency is fine here; nothing to stub


FAILED = []


def report(name, ours, ref):
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    diff = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    ok = diff <= 1e-4 * scale
    if not ok:
        FAILED.append(name)
    print(f'{name:48s} max|diff| {diff:.2e}  (max|value| {ref.abs().max().item():.2e})  {"OK" if ok else "FAIL"}')


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)) or type(m).__name__ == 'DropPath':
            m.training = False


def compare_models(variant):
    from mmcv import Config, ConfigDict
    from mmseg.models import build_segmentor
    import mmseg.models.segmentors.hrda_encoder_decoder as hrda_module
    import mic_model

    torch.manual_seed(0)
    chans = list(mic_model.MIT_VARIANTS[variant]['embed_dims'])
    cfg = Config.fromfile(os.path.join(ARGS.ref, 'configs/mic/gtaHR2csHR_mic_hrda.py'))
    m = copy.deepcopy(cfg.model)
    m.pretrained = None
    m.backbone = dict(type=f'mit_{variant}', style='pytorch')
    m.decode_head.in_channels = chans
    m.hr_crop_size = (128, 128)
    m.test_cfg = dict(mode='slide', batched_slide=True, stride=[128, 128], crop_size=[256, 256])
    ref = build_segmentor(m)
    ref.init_weights()
    ref.test_cfg = ConfigDict(ref.test_cfg)
    ref.automatic_debug = False
    ours = mic_model.build_model({'backbone': {'type': f'mit_{variant}'}, 'pretrained': None,
                                  'hrda': {'hr_crop_size': [128, 128]},
                                  'test': {'crop_size': [256, 256], 'stride': [128, 128]}})
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names: a plain copy
    with torch.no_grad():  # non-trivial BatchNorm statistics and affines, so that they matter
        for k, v in ours.state_dict().items():
            if 'running_var' in k or k.endswith('bn.weight'):
                v.uniform_(0.5, 1.5)
            elif 'running_mean' in k or k.endswith('bn.bias'):
                v.normal_(0, 0.1)
    ref.load_state_dict(ours.state_dict(), strict=True)

    img = torch.randn(2, 3, 256, 384)
    meta = [dict(ori_shape=(256, 384, 3), img_shape=(256, 384, 3), pad_shape=(256, 384, 3), flip=False)] * 2
    ref.eval(), ours.eval()
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(ours.backbone(img), ref.backbone(img))):
            report(f'MiT-{variant} stage {i + 1} features', a, b)
        report('HRDA encode_decode (detail sliding windows)', ours.encode_decode(img), ref.encode_decode(img, meta))
        report('test-time sliding windows', ours.inference(img), ref.slide_inference(img, meta, rescale=False))
        img2 = torch.randn(1, 3, 256, 512)
        report('test-time windows, rescaled to the original size', ours.inference(img2, out_size=(512, 1024)),
               ref.slide_inference(img2, [dict(ori_shape=(512, 1024, 3), flip=False)], rescale=True))

    ref.train(), ours.train()
    no_dropout(ref), no_dropout(ours)
    label = torch.randint(0, 19, (2, 1, 256, 384))
    label[:, :, :20] = 255
    weight = torch.rand(2, 256, 384)
    box = (64, 192, 128, 256)
    hrda_module.get_crop_bbox = lambda *a, **k: box
    lr = ref.forward_train(img, meta, label, seg_weight=weight, return_feat=True)
    lo = ours.forward_train(img, label, seg_weight=weight, return_feat=True, hr_crop_box=box)
    report('training loss, fused (x 0.9)', lo['loss_seg'].detach(), lr['decode.loss_seg'].detach())
    report('training loss, detail crop (x 0.1)', lo['loss_seg_hr'].detach(), lr['decode.hr.loss_seg'].detach())
    for i in range(4):
        report(f'training features (context view) stage {i + 1}', lo['features'][i].detach(),
               lr['features'][i].detach())
    (lo['loss_seg'] + lo['loss_seg_hr']).backward()
    (lr['decode.loss_seg'] + lr['decode.hr.loss_seg']).backward()
    ref_grads = dict(ref.named_parameters())
    worst = max((p.grad - ref_grads[n].grad).abs().max().item() for n, p in ours.named_parameters())
    print(f'{"gradients, max |diff| over all parameters":48s} {worst:.2e}')
    if worst > 1e-5:
        FAILED.append('gradients')

    m2 = Config.fromfile(os.path.join(ARGS.ref, 'configs/_base_/models/daformer_sepaspp_mitb5.py')).model
    m2.pretrained = None
    m2.backbone = dict(type=f'mit_{variant}', style='pytorch')
    m2.decode_head.in_channels = chans
    ref2 = build_segmentor(m2)
    ref2.automatic_debug = False
    ours2 = mic_model.build_model({'type': 'encoder_decoder', 'backbone': {'type': f'mit_{variant}'},
                                   'test': {'mode': 'whole'}, 'pretrained': None})
    ours2.load_state_dict(ref2.state_dict(), strict=True)
    ref2.eval(), ours2.eval()
    with torch.no_grad():
        report('DAFormer encode_decode', ours2.encode_decode(img), ref2.encode_decode(img, meta))
    ref2.train(), ours2.train()
    no_dropout(ref2), no_dropout(ours2)
    report('DAFormer training loss', ours2.forward_train(img, label, seg_weight=weight)['loss_seg'].detach(),
           ref2.forward_train(img, meta, label, seg_weight=weight)['decode.loss_seg'].detach())


def randomise_batchnorm(model, img, seed=0):
    """Non-trivial BatchNorm affines (fresh ones are 1 / 0, the ResNet's bn3 weights 0) and running
    statistics: the averages of the batch statistics of `img` and a second random batch, so that the
    eval-mode activations stay in a realistic range through the 100 layers."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        model.encode_decode(img)
        model.encode_decode(torch.randn(img.shape, generator=g))
        for m in bns:
            m.momentum = 0.1


def report_grads(name, ours, ref):
    """Max |ours - original| over all parameter gradients, relative to the largest gradient."""
    ref_grads = dict(ref.named_parameters())
    diff = max((p.grad - ref_grads[n].grad).abs().max().item() for n, p in ours.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    ok = diff <= 1e-4 * max(1.0, scale)
    if not ok:
        FAILED.append(name)
    print(f'{name:48s} max|diff| {diff:.2e}  (max|value| {scale:.2e})  {"OK" if ok else "FAIL"}')


def compare_deeplabv2(depth):
    """ResNet-V1c + DeepLabV2 ('dlv2red') and HRDA on it, as experiment 81 of the original builds them."""
    from mmcv import Config
    from mmseg.models import build_segmentor
    import mmseg.models.segmentors.hrda_encoder_decoder as hrda_module
    import mic_model

    torch.manual_seed(0)
    base = Config.fromfile(os.path.join(ARGS.ref, 'configs/_base_/models/deeplabv2red_r50-d8.py')).model
    base.pretrained = None
    base.backbone.depth = depth
    name = f'ResNet-{depth}-V1c'

    # -- single scale (dlv2red + r101v1c, 512x512 crops, whole-image test) -------------------------
    ref = build_segmentor(copy.deepcopy(base))
    ref.init_weights()
    ref.automatic_debug = False
    ours = mic_model.build_model({'type': 'encoder_decoder', 'backbone': {'type': f'resnet{depth}_v1c'},
                                  'decode_head': {'type': 'deeplabv2'}, 'test': {'mode': 'whole'},
                                  'pretrained': None})
    report(f'{name} encoder parameter count', mic_model.count_params(ours.backbone),
           mic_model.count_params(ref.backbone))
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names: a plain copy
    img = torch.randn(2, 3, 64, 96)
    randomise_batchnorm(ours, img)
    ref.load_state_dict(ours.state_dict(), strict=True)

    meta = [dict(ori_shape=(128, 160, 3), img_shape=(64, 96, 3), pad_shape=(64, 96, 3), flip=False)] * 2
    ref.eval(), ours.eval()
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(ours.backbone(img), ref.backbone(img))):
            report(f'{name} stage {i + 1} features', a, b)
        report('DeepLabV2 encode_decode', ours.encode_decode(img), ref.encode_decode(img, meta))
        report('DeepLabV2 whole inference, rescaled', ours.inference(img, out_size=(128, 160)),
               ref.whole_inference(img, meta, rescale=True))

    ref.train(), ours.train()
    label = torch.randint(0, 19, (2, 1, 64, 96))
    label[:, :, :8] = 255
    weight = torch.rand(2, 64, 96)
    lo = ours.forward_train(img, label, seg_weight=weight)['loss_seg']
    lr = ref.forward_train(img, meta, label, seg_weight=weight)['decode.loss_seg']
    report('DeepLabV2 training loss', lo.detach(), lr.detach())
    lo.backward()
    lr.backward()
    report_grads('DeepLabV2 gradients (all parameters)', ours, ref)
    ref_buffers = dict(ref.named_buffers())
    report('BN running statistics after the training pass',
           torch.cat([v.flatten().float() for k, v in ours.named_buffers() if 'running' in k]),
           torch.cat([ref_buffers[k].flatten().float() for k, v in ours.named_buffers() if 'running' in k]))

    # -- HRDA on DeepLabV2 (hrda1-512-0.1_dlv2red; here a 64x64 detail crop) -------------------------
    m = copy.deepcopy(base)
    m.type = 'HRDAEncoderDecoder'
    m.scales = [1, 0.5]
    m.decode_head.single_scale_head = 'DLV2Head'
    m.decode_head.type = 'HRDAHead'
    m.decode_head.attention_classwise = True
    m.decode_head.hr_loss_weight = 0.1
    m.hr_crop_size = (64, 64)
    m.feature_scale = 0.5
    m.crop_coord_divisible = 8
    m.hr_slide_inference = True
    ref = build_segmentor(m)
    ref.init_weights()
    ref.automatic_debug = False
    ours = mic_model.build_model({'backbone': {'type': f'resnet{depth}_v1c'}, 'decode_head': {'type': 'deeplabv2'},
                                  'hrda': {'hr_crop_size': [64, 64]}, 'pretrained': None})
    ours.load_state_dict(ref.state_dict(), strict=True)
    img = torch.randn(2, 3, 96, 128)
    randomise_batchnorm(ours, img, seed=1)
    ref.load_state_dict(ours.state_dict(), strict=True)

    meta = [dict(ori_shape=(96, 128, 3), img_shape=(96, 128, 3), pad_shape=(96, 128, 3), flip=False)] * 2
    ref.eval(), ours.eval()
    with torch.no_grad():
        report('HRDA-DeepLabV2 encode_decode (detail windows)', ours.encode_decode(img), ref.encode_decode(img, meta))

    ref.train(), ours.train()
    label = torch.randint(0, 19, (2, 1, 96, 128))
    label[:, :, :8] = 255
    weight = torch.rand(2, 96, 128)
    box = (8, 72, 40, 104)  # corner divisible by 8 but not 16: the context mask truncates, as in the original
    hrda_module.get_crop_bbox = lambda *a, **k: box
    lr = ref.forward_train(img, meta, label, seg_weight=weight, return_feat=True)
    lo = ours.forward_train(img, label, seg_weight=weight, return_feat=True, hr_crop_box=box)
    report('HRDA-DeepLabV2 loss, fused (x 0.9)', lo['loss_seg'].detach(), lr['decode.loss_seg'].detach())
    report('HRDA-DeepLabV2 loss, detail crop (x 0.1)', lo['loss_seg_hr'].detach(), lr['decode.hr.loss_seg'].detach())
    report('HRDA-DeepLabV2 context features, stage 4', lo['features'][3].detach(), lr['features'][3].detach())
    (lo['loss_seg'] + lo['loss_seg_hr']).backward()
    (lr['decode.loss_seg'] + lr['decode.hr.loss_seg']).backward()
    report_grads('HRDA-DeepLabV2 gradients (all parameters)', ours, ref)


def compare_training_helpers():
    import kornia
    from mmcv.runner.hooks.lr_updater import PolyLrUpdaterHook
    from mmseg.models.utils.masking_transforms import BlockMaskGenerator
    from mmseg.utils.utils import downscale_label_ratio
    import mic_train
    import mic_uda
    from mic_config import load_config

    torch.manual_seed(0)
    gt = torch.randint(0, 19, (2, 1, 256, 320))
    gt[:, :, :64] = 3
    gt[:, :, 100:140, :70] = 255
    for s in (2, 8, 64):
        report(f'label downscaling x{s} (majority, min ratio 0.75)', mic_uda.downscale_label_ratio(gt, s, 0.75, 19),
               downscale_label_ratio(gt, s, 0.75, 19, 255))
    for H, W, b in ((1024, 1024, 64), (100, 130, 32), (96, 160, 64)):
        torch.manual_seed(1)
        ref = BlockMaskGenerator(0.7, b).generate_mask(torch.zeros(2, 3, H, W))
        torch.manual_seed(1)
        report(f'MIC block mask {H}x{W}, block {b} (same seed)', mic_uda.block_mask(2, H, W, 0.7, b), ref)
    logits = torch.randn(2, 19, 64, 64) * 4
    prob, _ = torch.softmax(logits, 1).max(1)
    report('pseudo-label weight (confident share of the batch)',
           mic_uda.pseudo_label_and_weight(logits, 0.968)[1][0, 0, 0], (prob >= 0.968).sum() / prob.numel())

    cfg = load_config()
    opt = torch.optim.AdamW([{'params': [nn.Parameter(torch.zeros(1))], 'lr': 6e-5},
                             {'params': [nn.Parameter(torch.zeros(1))], 'lr': 6e-4}])
    hook = PolyLrUpdaterHook(power=1.0, min_lr=0.0, by_epoch=False, warmup='linear', warmup_iters=1500,
                             warmup_ratio=1e-6)
    runner = types.SimpleNamespace(optimizer=opt, max_iters=40000, iter=0, epoch=0)
    hook.before_run(runner)
    ours, theirs = [], []
    for it in (0, 1, 749, 750, 1499, 1500, 20000, 39999):
        runner.iter = it
        hook.before_train_iter(runner)
        ours.append(mic_train.lr_at(it, cfg) * 1e6)
        theirs.append(opt.param_groups[0]['lr'] * 1e6)
    report('learning rate schedule (x 1e6)', torch.tensor(ours), torch.tensor(theirs))

    img = torch.rand(3, 3, 40, 60)
    b, c = torch.tensor([0.1, -0.15, 0.05]).view(3, 1, 1, 1), torch.tensor([0.9, 1.1, 1.2]).view(3, 1, 1, 1)
    s, h = torch.tensor([0.85, 1.15, 1.0]).view(3, 1, 1, 1), torch.tensor([0.12, -0.18, 0.05]).view(3, 1, 1, 1)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        params = dict(brightness_factor=1 + b.flatten(), contrast_factor=c.flatten(), saturation_factor=s.flatten(),
                      hue_factor=h.flatten(), order=torch.tensor(order))
        report(f'colour jitter, order {order} (kornia 0.5.8)', mic_uda.apply_color_jitter(img, order, b, c, s, h),
               kornia.augmentation.ColorJitter(0.2, 0.2, 0.2, 0.2).apply_transform(img, params))
    for H, W, sigma in ((40, 60, 0.7), (1024, 1024, 0.3)):
        x = torch.randn(1, 3, H, W)

        def size(n):
            return int(math.floor(math.ceil(0.1 * n) - 0.5 + math.ceil(0.1 * n) % 2))
        report(f'Gaussian blur {H}x{W}, sigma {sigma} (kornia 0.5.8)', mic_uda.gaussian_blur(x, sigma),
               kornia.filters.GaussianBlur2d((size(H), size(W)), (sigma, sigma))(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ref', required=True, help="the original's seg/ folder (git clone lhoyer/MIC)")
    parser.add_argument('--variant', default='b0', help='MiT variant of the model comparison (b0..b5)')
    parser.add_argument('--depth', type=int, default=101, choices=(50, 101),
                        help='ResNet-V1c depth of the DeepLabV2 comparison')
    parser.add_argument('--only', choices=('mit', 'dlv2', 'helpers'), default=None,
                        help='run one part: MiT/DAFormer/HRDA, ResNet/DeepLabV2/HRDA, or the training helpers')
    global ARGS
    ARGS = parser.parse_args()
    install_stand_ins()
    sys.path[:0] = [os.path.abspath(ARGS.ref), REPO]
    torch.set_num_threads(min(4, torch.get_num_threads()))
    if ARGS.only in (None, 'mit'):
        compare_models(ARGS.variant)
    if ARGS.only in (None, 'dlv2'):
        compare_deeplabv2(ARGS.depth)
    if ARGS.only in (None, 'helpers'):
        compare_training_helpers()
    print(f'\n{len(FAILED)} check(s) failed: {FAILED}' if FAILED else '\nall checks passed')
    sys.exit(1 if FAILED else 0)


if __name__ == '__main__':
    main()
