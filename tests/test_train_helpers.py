"""mic_train's self-training helpers and one iteration, against hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mic_model
import mic_train
import mic_uda
from helpers import synthetic_batch, tiny_cfg
from mic_config import ConfigError, load_config

torch.set_num_threads(2)


# --------------------------------------------------------------------------
# EMA, pseudo-labels, ClassMix, masks, label downscaling, lr
# --------------------------------------------------------------------------

def test_ema_update_formula_and_iteration_zero():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    bn_s, bn_t = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    bn_s.running_mean.fill_(5.0)
    s, t = torch.nn.ModuleList([student, bn_s]), torch.nn.ModuleList([teacher, bn_t])
    mic_uda.ema_update(t, s, 0, 0.999)  # iteration 0: a copy of the student's parameters
    assert torch.equal(teacher.weight, student.weight) and torch.equal(teacher.bias, student.bias)
    assert torch.equal(bn_t.running_mean, torch.zeros(2))  # buffers are not copied / averaged
    before = teacher.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    mic_uda.ema_update(t, s, 1, 0.999)  # alpha = min(1 - 1/2, 0.999) = 0.5
    torch.testing.assert_close(teacher.weight, 0.5 * before + 0.5 * student.weight)
    before = teacher.weight.detach().clone()
    mic_uda.ema_update(t, s, 5000, 0.999)  # alpha = min(1 - 1/5001, 0.999) = 0.999
    torch.testing.assert_close(teacher.weight, 0.999 * before + 0.001 * student.weight)


def test_pseudo_weight_is_the_confident_share_of_the_whole_batch():
    logits = torch.zeros(2, 3, 2, 3)
    logits[0, 1, :, :2] = 10.0  # 4 confident pixels in image 0 (p ~ 0.9999)
    logits[1, 2, 0, 0] = 10.0  # 1 confident pixel in image 1
    logits[1, 0, 1, 2] = 2.0  # argmax 0 but p ~ 0.79 < 0.968
    label, weight = mic_uda.pseudo_label_and_weight(logits, 0.968)
    assert label[0, 0, 0] == 1 and label[1, 0, 0] == 2 and label[1, 1, 2] == 0
    assert torch.allclose(weight, torch.full((2, 2, 3), 5 / 12))  # one scalar for the batch
    valid = torch.ones(2, 1, 2, 3)
    valid[1, 0, 0, :] = 0
    _, weight = mic_uda.pseudo_label_and_weight(logits, 0.968, valid)
    assert torch.allclose(weight[1, 0], torch.zeros(3)) and torch.allclose(weight[0], torch.full((2, 3), 5 / 12))
    _, weight = mic_uda.pseudo_label_and_weight(logits, None)
    assert torch.equal(weight, torch.ones(2, 2, 3))
    _, weight = mic_uda.pseudo_label_and_weight(torch.zeros(1, 2, 6, 2), 0.4, ignore_top=2, ignore_bottom=1)
    assert weight[0, :, 0].tolist() == [0, 0, 1, 1, 1, 0]


def test_class_mix_masks_with_a_seeded_draw():
    labels = torch.tensor([[[0, 0, 1], [255, 1, 1]], [[2, 2, 3], [3, 7, 7]]])[:, None]  # [2,1,2,3]
    g = torch.Generator().manual_seed(3)
    masks = mic_uda.class_mix_masks(labels, 19, generator=g)
    # Re-draw the same keys and derive the subsets the way the original does: the classes of the
    # whole batch (incl. the ignore label), ceil(n / 2) of them per sample.
    present = [0, 1, 2, 3, 7, 255]
    keys = torch.rand((2, 20), generator=torch.Generator().manual_seed(3))
    for i in range(2):
        slots = [19 if c == 255 else c for c in present]
        chosen = sorted(slots, key=lambda c: float(keys[i, c]))[:math.ceil(len(present) / 2)]
        chosen = [255 if c == 19 else c for c in chosen]
        expect = torch.isin(labels[i, 0], torch.tensor(chosen)).float()
        assert torch.equal(masks[i, 0], expect)
    assert masks.shape == (2, 1, 2, 3)


def test_class_mix_draws_from_the_whole_batch():
    labels = torch.tensor([[[0, 1]], [[2, 3]]])[:, None]  # sample 0 holds {0,1}, sample 1 {2,3}
    empty = 0
    for seed in range(300):
        m = mic_uda.class_mix_masks(labels, 19, generator=torch.Generator().manual_seed(seed))
        assert int(m[0].sum() + m[1].sum()) <= 4
        empty += int(m[0].sum() == 0)  # both chosen classes only in sample 1: P = 1/6
    assert 25 < empty < 75


def test_mix_keeps_dtypes():
    mask = torch.tensor([[[[1.0, 0.0]]]])
    assert mic_uda.mix(mask, torch.tensor([[[[5, 6]]]]), torch.tensor([[[[7, 8]]]])).tolist() == [[[[5, 8]]]]
    a, b = torch.randn(1, 3, 1, 2), torch.randn(1, 3, 1, 2)
    torch.testing.assert_close(mic_uda.mix(mask, a, b), mask * a + (1 - mask) * b)


@pytest.mark.parametrize('H,W,block,cells', [(128, 128, 64, (2, 2)), (100, 130, 32, (3, 4)), (96, 160, 64, (2, 2)),
                                             (20, 20, 64, (1, 1))])
def test_block_mask_geometry(H, W, block, cells):
    torch.manual_seed(0)
    m = mic_uda.block_mask(3, H, W, 0.7, block)
    assert m.shape == (3, 1, H, W) and set(m.unique().tolist()) <= {0.0, 1.0}
    # nearest upsampling: pixel (y, x) shows cell (floor(y * ch / H), floor(x * cw / W))
    ch, cw = cells
    for y in range(H):
        for x in range(0, W, 7):
            cy, cx = y * ch // H, x * cw // W
            y0, x0 = -(-cy * H // ch), -(-cx * W // cw)  # first pixel of that cell
            assert m[0, 0, y, x] == m[0, 0, y0, x0]


def test_block_mask_ratio():
    torch.manual_seed(0)
    m = mic_uda.block_mask(64, 640, 640, 0.7, 64)
    assert abs(float(m.mean()) - 0.3) < 0.03


def _downscale_by_one_hot(label, s, min_ratio, K):
    """The original's formulation: average-pool a one-hot encoding (ignore as class K)."""
    x = label.clone()
    x[x == 255] = K
    onehot = F.one_hot(x[:, 0], K + 1).permute(0, 3, 1, 2).float()
    ratio, cls = F.avg_pool2d(onehot, s).max(dim=1, keepdim=True)
    cls[cls == K] = 255
    cls[ratio < min_ratio] = 255
    return cls


def test_downscale_label_ratio_by_hand_and_against_one_hot():
    label = torch.tensor([[5, 5, 1, 2],
                          [5, 9, 1, 1],
                          [255, 255, 4, 4],
                          [255, 3, 4, 4]])[None, None]
    out = mic_uda.downscale_label_ratio(label, 2, 0.75, 19)
    # block (0,0): 5 covers 3/4 -> 5; (0,1): 1 covers 3/4 -> 1; (1,0): ignore is the majority -> 255; (1,1): 4
    assert out[0, 0].tolist() == [[5, 1], [255, 4]]
    assert mic_uda.downscale_label_ratio(label, 2, 0.8, 19)[0, 0].tolist() == [[255, 255], [255, 4]]
    torch.manual_seed(0)
    big = torch.randint(0, 4, (2, 1, 64, 96))
    big[:, :, :16] = 2
    big[0, :, 20:40, :30] = 255
    for s in (4, 16):
        assert torch.equal(mic_uda.downscale_label_ratio(big, s, 0.75, 19), _downscale_by_one_hot(big, s, 0.75, 19))


def test_lr_schedule_points():
    cfg = load_config()
    assert math.isclose(mic_train.lr_at(0, cfg), 6e-5 * 1e-6, rel_tol=1e-9)
    poly = 6e-5 * (1 - 750 / 40000)
    assert math.isclose(mic_train.lr_at(750, cfg), poly * (1 - 0.5 * (1 - 1e-6)), rel_tol=1e-9)
    assert math.isclose(mic_train.lr_at(1500, cfg), 6e-5 * (1 - 1500 / 40000), rel_tol=1e-12)
    assert math.isclose(mic_train.lr_at(20000, cfg), 3e-5, rel_tol=1e-12)
    assert mic_train.lr_at(40000, cfg) == 0.0


def test_optimizer_groups():
    cfg = load_config(None, ['model.backbone.type=mit_b0', 'model.pretrained=null', 'uda.fd_lambda=0'])
    model = mic_model.build_model(cfg.model)
    opt = mic_train.build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    enc, norm, head = opt.param_groups
    assert all(names[id(p)].startswith('backbone.') and 'norm' not in names[id(p)] for p in enc['params'])
    assert all('norm' in names[id(p)] for p in norm['params']) and norm['weight_decay'] == 0.0
    assert 'backbone.block1.0.attn.norm.weight' in {names[id(p)] for p in norm['params']}
    assert all(names[id(p)].startswith('decode_head.') for p in head['params']) and head['lr_mult'] == 10.0
    assert enc['weight_decay'] == head['weight_decay'] == 0.01
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_feature_distance_on_thing_classes_only():
    fs = [torch.zeros(1, 2, 2, 2, requires_grad=True)]
    fi = [torch.zeros(1, 2, 2, 2)]
    fi[0][0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 in block (0,0)
    fi[0][0, :, 1, 1] = torch.tensor([6.0, 8.0])  # distance 10 in block (1,1)
    label = torch.full((1, 1, 4, 4), 13)  # car (a thing) everywhere ...
    label[..., 2:, 2:] = 0  # ... but road (stuff) in block (1,1)
    d = mic_uda.feature_distance(fs, fi, label, [13], 0.75, 19)
    assert math.isclose(float(d.detach()), 5 / 3, rel_tol=1e-6)  # mean over the 3 thing blocks
    d.backward()
    assert fs[0].grad[0, :, 1, 1].abs().sum() == 0
    no_things = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    assert float(mic_uda.feature_distance(fs, fi, no_things, [13], 0.75, 19).detach()) == 0


# --------------------------------------------------------------------------
# Strong augmentation (matches kornia 0.5.8, which the original used)
# --------------------------------------------------------------------------

def test_hsv_round_trip_and_known_values():
    img = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(mic_uda._hsv_to_rgb(mic_uda._rgb_to_hsv(img)), img, atol=1e-5, rtol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    one = torch.ones(1, 1, 1, 1)
    green = mic_uda.apply_color_jitter(red, [3], None, None, None, one / 3)  # hue + 120 degrees
    torch.testing.assert_close(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    grey = mic_uda.apply_color_jitter(torch.tensor([0.8, 0.2, 0.4]).view(1, 3, 1, 1), [2], None, None, 0 * one, None)
    torch.testing.assert_close(grey.flatten(), torch.full((3,), 0.8))  # saturation 0: the value channel
    x = torch.tensor([0.5, 0.9, 0.1]).view(1, 3, 1, 1)
    out = mic_uda.apply_color_jitter(x, [0, 1], 0.2 * one, 2 * one, None, None)  # (x + 0.2) * 2, clamped
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 1.0, 0.6]))


def test_gaussian_blur_against_explicit_convolution():
    torch.manual_seed(0)
    img = torch.randn(1, 2, 50, 30)  # kernels: ceil(5) = 5 (odd) rows, ceil(3) = 3 columns
    sigma = 0.8
    out = mic_uda.gaussian_blur(img, sigma).numpy()

    def kernel(k):
        x = np.arange(k) - k // 2
        g = np.exp(-x ** 2 / (2 * sigma ** 2))
        return g / g.sum()
    k2 = np.outer(kernel(5), kernel(3))
    padded = np.pad(img.numpy(), ((0, 0), (0, 0), (2, 2), (1, 1)), mode='reflect')
    expect = np.zeros_like(out)
    for dy in range(5):
        for dx in range(3):
            expect += k2[dy, dx] * padded[:, :, dy:dy + 50, dx:dx + 30]
    np.testing.assert_allclose(out, expect, atol=1e-5)


# --------------------------------------------------------------------------
# One iteration of the trainer
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def mit_b0_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('pretrained') / 'mit_b0.pth'
    torch.manual_seed(1)
    torch.save(mic_model.MiT('b0').state_dict(), path)
    return str(path)


def test_one_iteration_produces_every_loss_and_touches_only_the_student(mit_b0_weights):
    torch.manual_seed(0)
    trainer = mic_train.Trainer(tiny_cfg(pretrained=mit_b0_weights), torch.device('cpu'))
    imnet_before = {k: v.clone() for k, v in trainer.imnet.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.student.named_parameters()}
    logs = trainer.step(synthetic_batch(), 0)
    shares = {k: float(v) for k, v in logs.items() if k.startswith('pseudo_class.')}
    assert set(logs) - set(shares) == {'lr', 'pseudo_ratio', 'source.loss_seg', 'source.loss_seg_hr', 'source.loss_fd',
                                       'mix.loss_seg', 'mix.loss_seg_hr', 'masked.loss_seg', 'masked.loss_seg_hr'}
    assert len(shares) == 19 and abs(sum(shares.values()) - 1) < 1e-5  # the pseudo-labels' class distribution
    assert all(torch.isfinite(v) for v in logs.values()) and float(logs['source.loss_fd']) > 0
    # iteration 0: the teacher became a copy of the student *before* its update
    for n, p in trainer.modules['teacher'].named_parameters():
        assert torch.equal(p, student_before[n]) and not p.requires_grad and p.grad is None
    assert any(not torch.equal(p, student_before[n]) for n, p in trainer.student.named_parameters())
    for k, v in trainer.imnet.state_dict().items():
        assert torch.equal(v, imnet_before[k])
    assert all(p.grad is None for p in trainer.imnet.parameters()) and not trainer.imnet.training
    # the teacher predicts with dropout / drop path off but BatchNorm in train mode
    assert trainer.modules['teacher'].training and not trainer.modules['teacher'].decode_head.head.dropout.training
    assert trainer.modules['teacher'].decode_head.head.fuse_layer.bottleneck.bn.training
    assert set(trainer.modules) == {'student', 'teacher'} and trainer.ema == {'teacher': 0.999}


def _losses_after_one_step(*opts, pretrained=None, seed=0):
    torch.manual_seed(seed)
    trainer = mic_train.Trainer(tiny_cfg(*opts, pretrained=pretrained), torch.device('cpu'))
    logs = trainer.step(synthetic_batch(), 0)
    return logs, trainer


def test_switches_change_the_losses(mit_b0_weights):
    # threshold 0: the fresh teacher's pseudo-labels get weight 1, so the masked loss has gradients
    full, t_full = _losses_after_one_step('uda.pseudo_threshold=0', pretrained=mit_b0_weights)
    no_fd, t_no_fd = _losses_after_one_step('uda.pseudo_threshold=0', 'uda.fd_lambda=0', pretrained=mit_b0_weights)
    no_mic, t_no_mic = _losses_after_one_step('uda.pseudo_threshold=0', 'uda.mask_mode=null',
                                              pretrained=mit_b0_weights)
    assert float(full['masked.loss_seg']) > 0 and float(full['pseudo_ratio']) == 1.0
    assert 'source.loss_fd' not in no_fd and 'masked.loss_seg' not in no_mic
    # the same first losses, but different updates of the student
    assert torch.equal(full['source.loss_seg'], no_fd['source.loss_seg'])
    w = 'backbone.block4.1.mlp.fc2.weight'
    assert not torch.equal(t_full.student.state_dict()[w], t_no_fd.student.state_dict()[w])
    assert not torch.equal(t_full.student.state_dict()[w], t_no_mic.student.state_dict()[w])
    src_only, _ = _losses_after_one_step('uda.mode=source_only', 'uda.mask_mode=null')
    assert set(src_only) == {'lr', 'source.loss_seg', 'source.loss_seg_hr'}


def test_fd_without_pretrained_weights_is_refused_by_the_config():
    with pytest.raises(ConfigError, match='uda.fd_lambda > 0 compares features with the ImageNet encoder'):
        load_config(None, ['model.backbone.type=mit_b0', 'model.pretrained=null'])


@pytest.mark.parametrize('mode', ['separate', 'separateaug', 'separatesrc', 'separatesrcaug', 'separatetrg',
                                  'separatetrgaug'])
def test_mask_modes_pick_their_images(mode):
    torch.manual_seed(0)
    trainer = mic_train.Trainer(tiny_cfg(f'uda.mask_mode={mode}'), torch.device('cpu'))
    b = synthetic_batch()
    src, gt, tgt = b['img'], b['gt'].long(), b['target_img']
    plabel = torch.randint(0, 19, (2, 64, 64))
    pweight = torch.full((2, 64, 64), 0.3)
    state = mic_uda.StepState(src=src, gt=gt, tgt=tgt, valid=b['valid_pseudo_mask'], plabel=plabel,
                                pweight=pweight, B=2)
    img, lbl, w = mic_uda.mic_inputs(trainer, state)
    if mode.startswith('separatesrc'):
        assert img is src and lbl is gt and w is None
    elif mode.startswith('separatetrg'):
        assert img is tgt and torch.equal(lbl[:, 0], plabel) and w is pweight
    else:  # one source image (weight 1) and one target image (its pseudo-label and weight)
        assert torch.equal(img[0], src[0]) and torch.equal(img[1], tgt[0])
        assert torch.equal(lbl[0], gt[0]) and torch.equal(lbl[1, 0], plabel[0])
        assert torch.equal(w[0], torch.ones(64, 64)) and torch.equal(w[1], pweight[0])
    logs = trainer.step(b, 0)
    assert 'masked.loss_seg' in logs and torch.isfinite(logs['masked.loss_seg'])


def test_separate_mic_teacher():
    torch.manual_seed(0)
    trainer = mic_train.Trainer(tiny_cfg('uda.mask_alpha=0.9', 'uda.mask_pseudo_threshold=null'), torch.device('cpu'))
    assert trainer.ema == {'teacher': 0.999, 'mic_teacher': 0.9}
    assert mic_uda.mic_pseudo_threshold(trainer.cfg) is None
    b = synthetic_batch()
    state = mic_uda.StepState(src=b['img'], gt=b['gt'].long(), tgt=b['target_img'], valid=b['valid_pseudo_mask'],
                                plabel=torch.zeros(2, 64, 64, dtype=torch.long), pweight=torch.zeros(2, 64, 64), B=2)
    img, lbl, w = mic_uda.mic_inputs(trainer, state)
    assert torch.equal(w, torch.ones(2, 64, 64))  # threshold null: weight 1, from the MIC teacher's labels
    trainer.step(b, 0)
    trainer.step(synthetic_batch(1), 1)  # alpha_1 = min(0.5, 0.9): MIC teacher and teacher agree
    for (n, a), (_, c) in zip(trainer.modules['teacher'].named_parameters(), trainer.modules['mic_teacher'].named_parameters()):
        assert torch.equal(a, c), n


def _losses_and_gradients(*opts):
    """The logs and the student's gradients of iteration 0 (no optimizer step), from seed 0."""
    torch.manual_seed(0)
    trainer = mic_train.Trainer(tiny_cfg('uda.pseudo_threshold=0', *opts), torch.device('cpu'))
    for opt in trainer.optimizers.values():
        opt.step = lambda *a, **k: None
    logs = trainer.step(synthetic_batch(), 0)
    return logs, {n: p.grad for n, p in trainer.student.named_parameters() if p.grad is not None}


def test_activation_checkpointing_is_exact_and_bf16_is_close():
    logs, grads = _losses_and_gradients()
    # activation checkpointing recomputes the same forward (dropout's RNG state is replayed): identical
    ckpt_logs, ckpt_grads = _losses_and_gradients('model.activation_checkpointing=true')
    assert set(ckpt_logs) == set(logs) and all(torch.equal(ckpt_logs[k], v) for k, v in logs.items())
    assert set(ckpt_grads) == set(grads) and all(torch.equal(ckpt_grads[k], g) for k, g in grads.items())
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per value), but the losses are means over
    # thousands of pixels computed in fp32, so the independent roundings average out: measured within
    # 1e-4 of fp32, required within 1e-3. The gradients pass back through every stage in bf16 and
    # are noisier (measured: 14% relative difference); their direction must still agree.
    bf16_logs, bf16_grads = _losses_and_gradients('train.amp=bf16')
    for k, v in logs.items():
        if '.loss_' in k:
            assert float(bf16_logs[k]) == pytest.approx(float(v), rel=1e-3), k
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_bf16 = torch.cat([bf16_grads[k].flatten() for k in grads])
    assert float(F.cosine_similarity(flat, flat_bf16, dim=0)) > 0.97


def test_imagenet_encoder_is_the_pretrained_file_also_on_resume(mit_b0_weights):
    pretrained = torch.load(mit_b0_weights, weights_only=True)
    for load_student in (True, False):  # a fresh start, and a resume (student from the checkpoint)
        trainer = mic_train.Trainer(tiny_cfg(pretrained=mit_b0_weights), torch.device('cpu'),
                                    load_pretrained=load_student)
        for k, v in trainer.imnet.state_dict().items():
            assert torch.equal(v, pretrained[k]), k
        w = trainer.student.backbone.state_dict()['block1.0.attn.q.weight']
        assert torch.equal(w, pretrained['block1.0.attn.q.weight']) == load_student
