"""Hold one whole MIC(HRDA) training iteration to the original (lhoyer/MIC, seg/): every loss, the
pseudo-label weight, every gradient, the parameter update of the AdamW step and the EMA teacher.

Environment: the original's, as in benchmarks/compare_with_original.py (pure-Python mmcv 1.3.7,
kornia 0.5.8, stand-ins for timm and torchvision):

    python benchmarks/iteration_vs_original.py --ref /tmp/MIC/seg                 # MiT-b0, ~1 min on 2 cores
    python benchmarks/iteration_vs_original.py --ref /tmp/MIC/seg --variant b5    # the real encoder

Both sides hold the same weights (the parameter names are the original's) and see the same
batch. The random draws of an iteration differ in kind between the two (numpy vs torch), so they
are fixed on both sides to the same values at the places they are drawn: the HRDA detail crop
boxes, the ClassMix masks, the colour-jitter factors and order, the blur sigma and the
jitter/blur decisions, the MIC patch mask. Dropout and drop path are 0 on both sides. Everything
between those draws runs each implementation's own code. Two iterations are run (1 and 2: the
teacher is then an EMA of two different students). build_pair() is also what
benchmarks/speed_vs_original.py times.
"""
import argparse
import os
import sys
import tempfile
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, '..')]
from compare_with_original import install_stand_ins  # noqa: E402

FAILED = []


def report(name, ours, ref, tol=1e-4):
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    diff = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    ok = diff <= tol * scale
    if not ok:
        FAILED.append(name)
    print(f'{name:52s} max|diff| {diff:.2e}  (max|value| {ref.abs().max().item():.2e})  {"OK" if ok else "FAIL"}')


# --------------------------------------------------------------------------
# Both implementations on the same weights and the same batch
# --------------------------------------------------------------------------

def ours_config(variant, crop, hr_crop, extra=()):
    from mic_config import load_config
    return load_config(None, [f'model.backbone.type=mit_{variant}', 'model.backbone.drop_path_rate=0',
                              'model.decode_head.dropout=0', f'model.hrda.hr_crop_size=[{hr_crop},{hr_crop}]',
                              f'data.crop_size=[{crop},{crop}]', 'model.pretrained=unused.pth',
                              'optim.warmup_iters=0', 'train.device=cpu', *extra])


def theirs_config(ref_root, variant, hr_crop, work_dir, pseudo_threshold):
    from mmcv import Config
    import mic_model
    cfg = Config.fromfile(os.path.join(ref_root, 'configs/mic/gtaHR2csHR_mic_hrda.py'))
    cfg.model.pretrained = None
    cfg.model.backbone = dict(type=f'mit_{variant}', style='pytorch', drop_path_rate=0.0)
    cfg.model.decode_head.in_channels = list(mic_model.MIT_VARIANTS[variant]['embed_dims'])
    cfg.model.decode_head.dropout_ratio = 0.0
    cfg.model.hr_crop_size = (hr_crop, hr_crop)
    cfg.model.train_cfg = dict(work_dir=work_dir, log_config=dict(img_interval=1000))
    cfg.uda.pseudo_threshold = pseudo_threshold
    return cfg


def build_pair(ref_root, variant='b0', crop=256, hr_crop=128, batch=2, pseudo_threshold=0.3, seed=0):
    """(ours: mic_train.Trainer, theirs: the original's DACS model, its AdamW and poly-lr hook, batch
    dicts for both). Same weights (the student's conv_seg is scaled up so that part of the teacher's
    pseudo-labels pass the confidence threshold), BatchNorm statistics and biases randomised."""
    from mmcv.runner import build_optimizer
    from mmcv.runner.hooks.lr_updater import PolyLrUpdaterHook
    from mmseg.models.builder import build_train_model
    import mic_data
    import mic_train

    torch.manual_seed(seed)
    work_dir = tempfile.mkdtemp(prefix='mic_ref_')
    cfg = theirs_config(ref_root, variant, hr_crop, work_dir, pseudo_threshold)
    cfg.runner.max_iters = 40000
    theirs = build_train_model(cfg)
    theirs.init_weights()
    theirs.get_model().automatic_debug = False
    with torch.no_grad():  # non-trivial BatchNorm statistics and affines, and confident predictions
        for k, v in theirs.get_model().state_dict().items():
            if 'running_var' in k or k.endswith('bn.weight'):
                v.uniform_(0.5, 1.5)
            elif 'running_mean' in k or k.endswith('bn.bias'):
                v.normal_(0, 0.1)
            elif k.endswith('conv_seg.weight'):
                v.mul_(8)
            elif k.endswith('.bias'):  # as trained weights have; zero biases turn masked patches into exactly-zero
                v.normal_(0, 0.02)     # tokens, whose LayerNorm gradients overflow in both implementations alike
    theirs._init_ema_weights()  # iteration 0's copy; the comparison starts at iteration 1
    theirs.local_iter = 1
    with torch.no_grad():  # the ImageNet encoder: the student's encoder, perturbed (else the distance is 0)
        imnet = theirs.get_imnet_model().backbone
        imnet.load_state_dict(theirs.get_model().backbone.state_dict())
        for p in imnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    optimizer = build_optimizer(theirs, cfg.optimizer)
    hook = PolyLrUpdaterHook(power=1.0, min_lr=0.0, by_epoch=False)
    runner = types.SimpleNamespace(optimizer=optimizer, max_iters=40000, iter=0, epoch=0)
    hook.before_run(runner)

    ours = mic_train.Trainer(ours_config(variant, crop, hr_crop, [f'uda.pseudo_threshold={pseudo_threshold}']),
                             torch.device('cpu'), random_init=True)
    ours.student.load_state_dict(theirs.get_model().state_dict(), strict=True)  # same names: a plain copy
    ours.modules['teacher'].load_state_dict(theirs.get_ema_model().state_dict(), strict=True)
    ours.imnet.load_state_dict(theirs.get_imnet_model().backbone.state_dict(), strict=True)

    g = torch.Generator().manual_seed(seed + 1)
    blocks = torch.randint(0, 19, (batch, 1, crop // 64, crop // 64), generator=g)
    blocks[:, :, 0, :] = torch.tensor([11, 13, 17, 18] * 4, dtype=torch.long)[:crop // 64]  # thing blocks: FD
    gt = blocks.repeat_interleave(64, 2).repeat_interleave(64, 3)
    gt[:, :, :, :5] = 255
    valid = torch.ones(batch, 1, crop, crop)
    valid[:, :, :6] = 0  # pseudo-label margins
    src, tgt = torch.randn(batch, 3, crop, crop, generator=g), torch.randn(batch, 3, crop, crop, generator=g)
    meta = [dict(ori_shape=(crop, crop, 3), img_shape=(crop, crop, 3), pad_shape=(crop, crop, 3), flip=False,
                 img_norm_cfg=dict(mean=np.array(mic_data.IMG_MEAN, np.float32),
                                   std=np.array(mic_data.IMG_STD, np.float32), to_rgb=True))] * batch
    batch_ours = {'img': src, 'gt': gt.to(torch.uint8), 'target_img': tgt,
                  'valid_pseudo_mask': valid.to(torch.uint8)}
    batch_theirs = dict(img=src, img_metas=meta, gt_semantic_seg=gt, target_img=tgt, target_img_metas=meta,
                        valid_pseudo_mask=valid)
    return ours, (theirs, optimizer, hook, runner), batch_ours, batch_theirs


# --------------------------------------------------------------------------
# The same draws on both sides
# --------------------------------------------------------------------------

class FixedDraws:
    """Predetermined values for every random draw of an iteration, handed to both implementations."""

    def __init__(self, batch, crop, hr_crop, block, ratio, seed):
        g = torch.Generator().manual_seed(seed)
        d = 8
        n = (crop - hr_crop) // d + 1
        self.boxes = [tuple(int(v) for v in torch.randint(0, n, (2,), generator=g) * d) for _ in range(3)]
        self.boxes = [(y, y + hr_crop, x, x + hr_crop) for y, x in self.boxes]
        self.class_mix = (torch.rand(batch, 1, crop, crop, generator=g) > 0.5).long()
        self.jitter = []  # per call: (order, brightness, contrast, saturation, hue), factors [n,1,1,1]
        for n_img in (1, 1, batch):  # the two mixed images one at a time, then the masked batch
            order = torch.randperm(4, generator=g).tolist()
            f = [torch.rand(n_img, 1, 1, 1, generator=g) * 0.4 + lo for lo in (-0.2, 0.8, 0.8, -0.2)]
            self.jitter.append((order, *f))
        self.sigmas = (0.15 + torch.rand(3, generator=g)).tolist()
        cells = torch.rand(batch, 1, round(crop / block), round(crop / block), generator=g) > ratio
        self.block_mask = torch.nn.functional.interpolate(cells.float(), size=(crop, crop), mode='nearest')

    def install(self, stack):
        """Patch both implementations (undone when the ExitStack closes)."""
        import kornia
        import mmseg.models.segmentors.hrda_encoder_decoder as hrda_module
        import mmseg.models.uda.dacs as dacs_module
        import mmseg.models.uda.masking_consistency_module as mcm_module
        import mmseg.models.utils.dacs_transforms as dacs_transforms
        from mmseg.models.utils.masking_transforms import BlockMaskGenerator
        import mic_model
        import mic_train

        boxes = {'ours': iter(self.boxes), 'theirs': iter(self.boxes)}
        jitter = {'ours': iter(self.jitter), 'theirs': iter(self.jitter)}
        sigmas = {'ours': iter(self.sigmas), 'theirs': iter(self.sigmas)}

        def patch(obj, name, value):
            old = getattr(obj, name)
            setattr(obj, name, value)
            stack.callback(setattr, obj, name, old)

        # HRDA detail crops
        patch(mic_model.HRDAEncoderDecoder, 'random_crop_box', lambda self, h, w: next(boxes['ours']))
        patch(hrda_module, 'get_crop_bbox', lambda *a, **k: next(boxes['theirs']))
        # ClassMix masks
        patch(mic_train, 'class_mix_masks', lambda labels, *a, **k: self.class_mix.float())
        patch(dacs_module, 'get_class_masks', lambda labels: [m[None] for m in self.class_mix])
        # jitter and blur always on (the decisions), with the same factors and sigmas
        patch(mic_train, 'augmentation_switches', lambda u, blur: (True, bool(blur)))
        always = types.SimpleNamespace(uniform=lambda a, b: 0.9)
        patch(dacs_module, 'random', always)
        patch(mcm_module, 'random', always)

        def our_jitter(img, strength):
            order, b, c, s, h = next(jitter['ours'])
            return mic_train.apply_color_jitter(img, order, b, c, s, h)
        patch(mic_train, 'color_jitter', our_jitter)

        def their_params(module, batch_shape):
            order, b, c, s, h = next(jitter['theirs'])
            return dict(brightness_factor=1 + b.flatten(), contrast_factor=c.flatten(), saturation_factor=s.flatten(),
                        hue_factor=h.flatten(), order=torch.tensor(order))
        patch(kornia.augmentation.ColorJitter, 'generate_parameters', their_params)
        blur = mic_train.gaussian_blur
        patch(mic_train, 'gaussian_blur', lambda img, sigma: blur(img, next(sigmas['ours'])))
        patch(dacs_transforms, 'np', types.SimpleNamespace(
            floor=np.floor, ceil=np.ceil, random=types.SimpleNamespace(uniform=lambda a, b: next(sigmas['theirs']))))
        # MIC's patch mask
        patch(mic_train, 'block_mask', lambda *a, **k: self.block_mask)
        patch(BlockMaskGenerator, 'generate_mask', lambda gen, imgs: self.block_mask)
        return boxes, jitter, sigmas


# --------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------

LOSS_NAMES = {  # ours -> the original's log key
    'source.loss_seg': 'decode.loss_seg', 'source.loss_seg_hr': 'decode.hr.loss_seg',
    'source.loss_fd': 'src.loss_imnet_feat_dist',
    'mix.loss_seg': 'mix.decode.loss_seg', 'mix.loss_seg_hr': 'mix.decode.hr.loss_seg',
    'masked.loss_seg': 'masked.decode.loss_seg', 'masked.loss_seg_hr': 'masked.decode.hr.loss_seg',
}


def capture_grads_before_step(optimizer, params, store):
    """Wrap optimizer.step so that it first records the gradients of `params` (name -> tensor)."""
    step = optimizer.step

    def wrapped(*a, **k):
        store.clear()
        store.update({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
        return step(*a, **k)
    optimizer.step = wrapped


def compare_iteration(ref_root, variant, crop, hr_crop):
    import contextlib
    ours, (theirs, optimizer, hook, runner), b_ours, b_theirs = build_pair(ref_root, variant, crop, hr_crop)
    crop = b_ours['img'].shape[-1]
    hr_crop = ours.student.hr_crop_size[0]
    s_theirs, s_ours = theirs.get_model(), ours.student
    grads_ours, grads_theirs = {}, {}
    capture_grads_before_step(ours.optimizers['student'], dict(s_ours.named_parameters()), grads_ours)
    capture_grads_before_step(optimizer, {n[len('model.'):]: p for n, p in theirs.named_parameters()
                                          if n.startswith('model.')}, grads_theirs)
    for it in (1, 2):
        draws = FixedDraws(2, crop, hr_crop, ours.cfg.uda.mask_block_size, ours.cfg.uda.mask_ratio, seed=10 + it)
        before = {n: p.detach().clone() for n, p in s_ours.named_parameters()}
        with contextlib.ExitStack() as stack:
            boxes, jitter, sigmas = draws.install(stack)
            logs = ours.step(b_ours, it)
            runner.iter = it
            hook.before_train_iter(runner)
            out = theirs.train_step(b_theirs, optimizer)['log_vars']
            for what, left in (('crop boxes', boxes), ('jitter draws', jitter), ('blur sigmas', sigmas)):
                for side, rest in left.items():  # both sides drew exactly the prepared values
                    if next(rest, None) is not None:
                        FAILED.append(f'{side} drew fewer {what}')
                        print(f'{side} drew fewer {what} than prepared: FAIL')
        print(f'-- iteration {it} (pseudo-label weight {float(logs["pseudo_ratio"]):.3f}, '
              f'lr {float(logs["lr"]):.3e})')
        for k, ref_key in LOSS_NAMES.items():
            report(f'loss {k}', logs[k], out[ref_key])
        report('learning rate', logs['lr'] * 1e6, optimizer.param_groups[0]['lr'] * 1e6)
        for side, grads in (('ours', grads_ours), ('original', grads_theirs)):
            bad = [n for n, g_ in grads.items() if not torch.isfinite(g_).all()]
            if bad:
                print(f'    {side}: {len(bad)} parameters with non-finite gradients, e.g. {bad[:3]}')
        rel = {n: (grads_ours[n] - grads_theirs[n]).abs().max().item() / max(grads_theirs[n].abs().max().item(), 1e-12)
               for n in grads_theirs}
        worst = max(rel.values())
        print(f'{"gradients: max over parameters of |diff| / max|grad|":52s} {worst:.2e}  '
              f'{"OK" if worst <= 1e-3 else "FAIL"}')
        if worst > 1e-3:
            for n in sorted(rel, key=rel.get)[-5:]:
                print(f'    {n}: {rel[n]:.2e} (max|grad| {grads_theirs[n].abs().max().item():.2e})')
        if worst > 1e-3 or set(grads_ours) != set(grads_theirs):
            FAILED.append(f'gradients, iteration {it}')
        ref_params = dict(s_theirs.named_parameters())
        step_ours = torch.cat([(p.detach() - before[n]).flatten() for n, p in s_ours.named_parameters()])
        step_theirs = torch.cat([(ref_params[n].detach() - before[n]).flatten() for n, _ in s_ours.named_parameters()])
        rel = ((step_ours - step_theirs).abs().max() / step_theirs.abs().max()).item()
        agree = ((step_ours - step_theirs).abs() <= 1e-3 * step_theirs.abs().max()).double().mean().item()
        print(f'{"AdamW update: max |diff| / max |update|":52s} {rel:.2e}  ({100 * agree:.3f} % of the '
              f'{step_theirs.numel()} entries within 1e-3)  {"OK" if agree > 0.999 else "FAIL"}')
        if agree <= 0.999:
            FAILED.append(f'parameter update, iteration {it}')
            off = {}
            for n, p in s_ours.named_parameters():
                d_o, d_t = p.detach() - before[n], ref_params[n].detach() - before[n]
                off[n] = int(((d_o - d_t).abs() > 1e-3 * step_theirs.abs().max()).sum())
            for n in sorted(off, key=off.get)[-8:]:
                print(f'    {n}: {off[n]} of {before[n].numel()} entries differ')
        report('student parameters after the step', torch.cat([p.detach().flatten() for p in s_ours.parameters()]),
               torch.cat([ref_params[n].detach().flatten() for n, _ in s_ours.named_parameters()]))
        teacher_ref = dict(theirs.get_ema_model().named_parameters())
        report('EMA teacher parameters', torch.cat([p.flatten() for p in ours.modules['teacher'].parameters()]),
               torch.cat([teacher_ref[n].detach().flatten() for n, _ in ours.modules['teacher'].named_parameters()]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ref', required=True, help="the original's seg/ folder (git clone lhoyer/MIC)")
    parser.add_argument('--variant', default='b0', help='MiT variant (b0..b5)')
    parser.add_argument('--crop', type=int, default=256, help='training crop (the detail crop is half of it)')
    args = parser.parse_args()
    install_stand_ins()
    sys.path.insert(0, os.path.abspath(args.ref))
    torch.set_num_threads(min(4, torch.get_num_threads()))
    compare_iteration(os.path.abspath(args.ref), args.variant, args.crop, args.crop // 2)
    print(f'\n{len(FAILED)} check(s) failed: {FAILED}' if FAILED else '\nall checks passed')
    sys.exit(1 if FAILED else 0)


if __name__ == '__main__':
    main()
