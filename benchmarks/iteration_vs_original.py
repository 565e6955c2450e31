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
between those draws runs each implementation's own code, except the colour jitter and blur kernels
(kornia's on both sides; ours agree with them to 2e-6, see compare_with_original.py and FixedDraws). Two iterations are run (1 and 2: the
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
    meta = build_meta(crop, batch)
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

    def __init__(self, batch, crop, hr_crop, block, ratio, seed, shared_kernels=True):
        # shared_kernels: our colour jitter and blur are replaced by kornia's (the original's) for the
        # comparison, with the same draws. They agree to 2e-6 (compare_with_original.py checks them),
        # but a deep randomly initialised network turns such input rounding into gradient differences
        # of ~1e-3; with shared kernels every remaining difference is the rest of the implementation.
        self.shared_kernels = shared_kernels
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
        import mic_uda

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
        patch(mic_uda, 'class_mix_masks', lambda labels, *a, **k: self.class_mix.float())
        patch(dacs_module, 'get_class_masks', lambda labels: [m[None] for m in self.class_mix])
        # jitter and blur always on (the decisions), with the same factors and sigmas
        patch(mic_uda, 'augmentation_switches', lambda u, blur: (True, bool(blur)))
        always = types.SimpleNamespace(uniform=lambda a, b: 0.9)
        patch(dacs_module, 'random', always)
        patch(mcm_module, 'random', always)

        def our_jitter(img, strength):
            order, b, c, s, h = next(jitter['ours'])
            if not self.shared_kernels:
                return mic_uda.apply_color_jitter(img, order, b, c, s, h)
            params = dict(brightness_factor=1 + b.flatten(), contrast_factor=c.flatten(),
                          saturation_factor=s.flatten(), hue_factor=h.flatten(), order=torch.tensor(order))
            return kornia.augmentation.ColorJitter(0.2, 0.2, 0.2, 0.2).apply_transform(img, params)
        patch(mic_uda, 'color_jitter', our_jitter)

        def their_params(module, batch_shape):
            order, b, c, s, h = next(jitter['theirs'])
            return dict(brightness_factor=1 + b.flatten(), contrast_factor=c.flatten(), saturation_factor=s.flatten(),
                        hue_factor=h.flatten(), order=torch.tensor(order))
        patch(kornia.augmentation.ColorJitter, 'generate_parameters', their_params)
        blur = mic_uda.gaussian_blur

        def our_blur(img, sigma):
            sigma = next(sigmas['ours'])
            if not self.shared_kernels:
                return blur(img, sigma)
            size = [int(np.floor(np.ceil(0.1 * n) - 0.5 + np.ceil(0.1 * n) % 2)) for n in img.shape[2:]]
            return kornia.filters.GaussianBlur2d(tuple(size), (sigma, sigma))(img)
        patch(mic_uda, 'gaussian_blur', our_blur)
        patch(dacs_transforms, 'np', types.SimpleNamespace(
            floor=np.floor, ceil=np.ceil, random=types.SimpleNamespace(uniform=lambda a, b: next(sigmas['theirs']))))
        # MIC's patch mask
        patch(mic_uda, 'block_mask', lambda *a, **k: self.block_mask)
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


def compare_gradients(what, ours, theirs, tol=1e-2):
    """Gradients (name -> tensor) of the two sides. Each parameter's max |difference| is taken relative
    to its own max |gradient|, but at least 1e-3 of the largest gradient of all: parameters whose
    gradient is 0 in exact arithmetic (e.g. the bias of an embedding followed by BatchNorm) carry
    only rounding noise, which differs between any two implementations. Tolerance 1e-2: BatchNorm on
    batch statistics makes the gradients reaching a layer sum to ~0 per channel, so a weight's
    gradient is a sum of cancelling terms whose float32 rounding (summation order: NCHW vs channels-
    last kernels) shows at 1e-4..1e-2 of its size; the losses, updates and teachers are held tighter."""
    for side, grads in (('ours', ours), ('original', theirs)):
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        if bad:
            print(f'    {side}: {len(bad)} parameters with non-finite gradients, e.g. {bad[:3]}')
    top = max(g.abs().max().item() for g in theirs.values())
    rel = {n: (ours[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-3 * top) for n, g in theirs.items()}
    worst = max(rel.values())
    ok = worst <= tol and set(ours) == set(theirs)
    print(f'{"gradients, max |diff| / max |grad| per parameter":52s} {worst:.2e}  {"OK" if ok else "FAIL"}')
    if not ok:
        FAILED.append(f'gradients, {what}')
        for n in sorted(rel, key=rel.get)[-5:]:
            print(f'    {n}: {rel[n]:.2e} (max|grad| {theirs[n].abs().max().item():.2e})')


def compare_updates(what, ours, theirs, grads, grads_ours, tol=1e-3):
    """Parameter updates (name -> after - before) of the optimizer step. Adam(W) divides each
    gradient entry by its own running magnitude, so an entry's relative gradient difference reaches
    its update undamped: an entry whose gradient is rounding noise moves by +-lr on either side at
    random, and one whose two gradients differ by 10 % (BatchNorm's cancelling sums, see
    compare_gradients) moves ~10 % differently. Entries are therefore compared where the gradient is
    >= 1 % of its tensor's largest and the two sides' gradients agree to 1e-3 of it (the gradients
    themselves are compared above); a wrong learning rate, multiplier, weight decay or moment would
    move all of them."""
    diff = torch.cat([(ours[n] - theirs[n]).flatten() for n in theirs])
    scale = torch.cat([theirs[n].flatten() for n in theirs]).abs().max()
    sure = torch.cat([((grads[n].abs() >= 0.01 * grads[n].abs().max())
                       & ((grads_ours[n] - grads[n]).abs() <= 1e-3 * grads[n].abs())).flatten() for n in theirs])
    close = diff.abs() <= tol * scale
    share, share_all = close[sure].double().mean().item(), close.double().mean().item()
    ok = share >= 0.999
    print(f'{"update of the step, |diff| <= 1e-3 max |update|":52s} {100 * share:.3f} % of {int(sure.sum())} '
          f'entries ({100 * share_all:.3f} % of all {diff.numel()})  {"OK" if ok else "FAIL"}')
    if not ok:
        FAILED.append(f'parameter update, {what}')


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
        compare_gradients(f'iteration {it}', grads_ours, grads_theirs)
        ref_params = dict(s_theirs.named_parameters())
        compare_updates(f'iteration {it}', {n: p.detach() - before[n] for n, p in s_ours.named_parameters()},
                        {n: ref_params[n].detach() - before[n] for n, _ in s_ours.named_parameters()},
                        grads_theirs, grads_ours)
        # Adam moves an entry whose gradient is rounding noise by +-lr either way (see compare_updates):
        # iteration 2 starts both sides from the original's weights and AdamW moments again, so that
        # it is compared at the same point (the teachers then hold EMAs of two different students).
        with torch.no_grad():
            for n, p in s_ours.named_parameters():
                p.copy_(ref_params[n])
                state = optimizer.state.get(ref_params[n])  # and AdamW's moments: the same point in all
                if state:
                    ours.optimizers['student'].state[p] = {k: v.clone() for k, v in state.items()}
        teacher_ref = dict(theirs.get_ema_model().named_parameters())
        report('EMA teacher parameters', torch.cat([p.flatten() for p in ours.modules['teacher'].parameters()]),
               torch.cat([teacher_ref[n].detach().flatten() for n, _ in ours.modules['teacher'].named_parameters()]))


# --------------------------------------------------------------------------
# AdvSeg and MinEnt with DeepLabV2 (Table 1, experiment 81), MIC on top
# --------------------------------------------------------------------------

def original_experiment_config(ref_root, exp_id, uda):
    """The original's generated config of the first run of experiment `exp_id` whose UDA method is
    `uda` (its experiments.py, written to a config file as its run_experiments.py does)."""
    from mmcv import Config
    cwd = os.getcwd()
    os.chdir(ref_root)
    try:
        from experiments import generate_experiment_cfgs
        cfg = next(c for c in generate_experiment_cfgs(exp_id) if c['name_uda'].split('_')[0] == uda)
        path = os.path.join('configs', f'_compare_{os.getpid()}.py')
        with open(path, 'w') as f:  # plain reprs (mmcv's pretty_text needs an old yapf)
            f.write(''.join(f'{k} = {v!r}\n' for k, v in cfg.items()))
        try:
            return Config.fromfile(path)
        finally:
            os.remove(path)
    finally:
        os.chdir(cwd)


def compare_method(ref_root, method, depth=50, crop=128, iteration=2000, threshold=0.2):
    """One iteration of AdvSeg or MinEnt with MIC on DeepLabV2-ResNet (exp. 81's settings, ResNet-50 by
    default for speed): every loss, the gradients of the segmentor (and discriminator), the SGD (and
    Adam) updates and the MIC teacher. The original calls .cuda() in AdvSeg; here that is a no-op."""
    import contextlib
    from mmcv.runner import build_optimizer
    from mmcv.runner.hooks.lr_updater import PolyLrUpdaterHook
    from mmseg.models.builder import build_train_model
    import mic_config
    import mic_train

    print(f'-- {method} + MIC, DeepLabV2-ResNet-{depth}, iteration {iteration} (full learning rates)')
    torch.manual_seed(0)
    cfg = original_experiment_config(ref_root, 81, method)
    cfg.model.pretrained = None
    cfg.model.backbone.depth = depth
    cfg.model.train_cfg = dict(work_dir=tempfile.mkdtemp(prefix='mic_ref_'), log_config=dict(img_interval=1000))
    cfg.uda.pseudo_threshold = threshold  # the random teacher is never 96.8 % sure: let part of its labels count
    stack = contextlib.ExitStack()
    stack.callback(setattr, torch.nn.Module, 'cuda', torch.nn.Module.cuda)
    stack.callback(setattr, torch.Tensor, 'cuda', torch.Tensor.cuda)
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    with stack:
        theirs = build_train_model(cfg)
        theirs.init_weights()
        with torch.no_grad():  # BatchNorm affines like a trained ResNet's: the residual branches' last
            for k, v in theirs.get_model().state_dict().items():  # BN small, so that the net is well conditioned
                if k.endswith('bn3.weight'):
                    v.uniform_(0.05, 0.15)
                elif k.endswith('.weight') and '.bn' in k or 'stem.1.weight' in k or 'stem.4.weight' in k:
                    v.uniform_(0.8, 1.2)
                elif k.endswith('.bias'):
                    v.normal_(0, 0.02)
        ema = theirs.mic.teacher
        ema._init_ema_weights(theirs.get_model())
        theirs.local_iter = iteration
        optimizer = build_optimizer(theirs, cfg.optimizer)
        hook = PolyLrUpdaterHook(power=1.0, min_lr=0.0, by_epoch=False, warmup='linear', warmup_iters=1500,
                                 warmup_ratio=1e-6)
        runner = types.SimpleNamespace(optimizer=optimizer, max_iters=cfg.runner.max_iters, iter=0, epoch=0)
        hook.before_run(runner)
        in_sgd = {id(p) for g in optimizer.param_groups for p in g['params']}
        d_params = list(theirs.model_D.parameters()) if method == 'advseg' else []
        print(f'    the original\'s segmentor optimizer ({type(optimizer).__name__}) also holds the discriminator: '
              f'{bool(d_params) and all(id(p) in in_sgd for p in d_params)}')

        name = next(n for n, _, _ in mic_config.experiment_runs(81) if f'_{method}_' in n)
        run = dict((n, (c, o)) for n, c, o in mic_config.experiment_runs(81))[name]
        ours_cfg = mic_config.load_config(run[0], run[1] + [
            f'model.backbone.type=resnet{depth}_v1c', 'model.pretrained=null', f'data.crop_size=[{crop},{crop}]',
            'train.device=cpu', f'uda.pseudo_threshold={threshold}'])
        ours = mic_train.Trainer(ours_cfg, torch.device('cpu'))
        ours.student.load_state_dict(theirs.get_model().state_dict(), strict=True)
        ours.modules['mic_teacher'].load_state_dict(ema.get_ema_model().state_dict(), strict=True)
        if method == 'advseg':
            ours.modules['discriminator'].load_state_dict(theirs.model_D['main'].state_dict(), strict=True)

        g = torch.Generator().manual_seed(1)
        gt = torch.randint(0, 19, (2, 1, crop // 32, crop // 32), generator=g).repeat_interleave(32, 2)
        gt = gt.repeat_interleave(32, 3)
        src, tgt = torch.randn(2, 3, crop, crop, generator=g), torch.randn(2, 3, crop, crop, generator=g)
        meta = build_meta(crop, 2)
        b_ours = {'img': src, 'gt': gt.to(torch.uint8), 'target_img': tgt,
                  'valid_pseudo_mask': torch.ones(2, 1, crop, crop, dtype=torch.uint8)}
        b_theirs = dict(img=src, img_metas=meta, gt_semantic_seg=gt, target_img=tgt, target_img_metas=meta)
        # MIC's draws: jitter/blur decisions, jitter factors (one call on the batch), sigma, patch mask
        draws = FixedDraws(2, crop, crop // 2, ours_cfg.uda.mask_block_size, ours_cfg.uda.mask_ratio, seed=3)
        draws.jitter = draws.jitter[2:]
        draws.sigmas = draws.sigmas[2:]
        grads_ours, grads_theirs = {}, {}
        ours_params = {f'student.{n}': p for n, p in ours.student.named_parameters()}
        theirs_params = {f'student.{n[len("model."):]}': p for n, p in theirs.named_parameters()
                         if n.startswith('model.')}
        if method == 'advseg':
            ours_params.update({f'discriminator.{n}': p for n, p in ours.modules['discriminator'].named_parameters()})
            theirs_params.update({f'discriminator.{n[len("model_D.main."):]}': p
                                  for n, p in theirs.named_parameters() if n.startswith('model_D.main.')})
        capture_grads_before_step(ours.optimizers['student'], ours_params, grads_ours)
        capture_grads_before_step(optimizer, theirs_params, grads_theirs)
        with contextlib.ExitStack() as patches:
            draws.install(patches)
            logs = ours.step(b_ours, iteration)
            runner.iter = iteration
            hook.before_train_iter(runner)
            out = theirs.train_step(b_theirs, optimizer)['log_vars']
    names = {'source.loss_seg': 'decode.loss_seg', 'masked.loss_seg': 'masked.decode.loss_seg'}
    if method == 'advseg':
        names.update({'adversarial.loss_adv': 'G_trg.loss.main', 'discriminator.loss_src': 'D_src.loss.main',
                      'discriminator.loss_tgt': 'D_trg.loss.main'})
    else:
        names['entropy.loss_ent'] = 'ent.loss.main'
    for k, ref_key in names.items():
        if ref_key in out:  # the original's MinEnt backpropagates its masked loss without logging it
            report(f'loss {k}', logs[k], out[ref_key])
    for part in sorted({n.split('.')[0] for n in grads_theirs}):
        print(f'  {part}:')
        keys = [n for n in grads_theirs if n.startswith(part + '.')]
        compare_gradients(f'{method} {part}', {n: grads_ours[n] for n in keys}, {n: grads_theirs[n] for n in keys})
        report(f'{part} parameters after the step', torch.cat([ours_params[n].detach().flatten() for n in keys]),
               torch.cat([theirs_params[n].detach().flatten() for n in keys]))
    teacher = dict(ema.get_ema_model().named_parameters())
    report('MIC teacher parameters', torch.cat([p.flatten() for p in ours.modules['mic_teacher'].parameters()]),
           torch.cat([teacher[n].detach().flatten() for n, _ in ours.modules['mic_teacher'].named_parameters()]))


def build_meta(crop, batch):
    import mic_data
    return [dict(ori_shape=(crop, crop, 3), img_shape=(crop, crop, 3), pad_shape=(crop, crop, 3), flip=False,
                 img_norm_cfg=dict(mean=np.array(mic_data.IMG_MEAN, np.float32),
                                   std=np.array(mic_data.IMG_STD, np.float32), to_rgb=True))] * batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ref', required=True, help="the original's seg/ folder (git clone lhoyer/MIC)")
    parser.add_argument('--variant', default='b0', help='MiT variant (b0..b5)')
    parser.add_argument('--crop', type=int, default=256, help='training crop (the detail crop is half of it)')
    parser.add_argument('--method', default='mic_hrda', choices=['mic_hrda', 'advseg', 'minent', 'all'],
                        help='MIC(HRDA) with DACS (default), or AdvSeg / MinEnt + MIC on DeepLabV2 (exp. 81)')
    args = parser.parse_args()
    install_stand_ins()
    sys.path.insert(0, os.path.abspath(args.ref))
    torch.set_num_threads(min(4, torch.get_num_threads()))
    ref = os.path.abspath(args.ref)
    if args.method in ('mic_hrda', 'all'):
        compare_iteration(ref, args.variant, args.crop, args.crop // 2)
    for method in ('advseg', 'minent'):
        if args.method in (method, 'all'):
            compare_method(ref, method)
    print(f'\n{len(FAILED)} check(s) failed: {FAILED}' if FAILED else '\nall checks passed')
    sys.exit(1 if FAILED else 0)


if __name__ == '__main__':
    main()
