"""The training step as a list of passes: how the losses of DACS + MIC combine (against a hand-built
sum of seg_loss terms), AdvSeg and MinEnt, and experiments run by ID."""
import copy
import os

import pytest
import torch

import mic_config
import mic_experiments
import mic_model
import mic_train
import mic_uda
from helpers import REPO, synthetic_batch, tiny_cfg, tiny_opts

NO_DROPOUT = ['model.decode_head.dropout=0', 'model.backbone.drop_path_rate=0']


def _grads_of_one_step(trainer, batch, iteration=0):
    """Run trainer.step without its optimizer step; return the student's gradients (name -> tensor)."""
    for opt in trainer.optimizers.values():
        opt.step = lambda *a, **k: None
    logs = trainer.step(batch, iteration)
    return logs, {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('model_type', ['encoder_decoder', 'hrda'])
def test_losses_combine_as_a_hand_built_sum(monkeypatch, model_type):
    """Fixed draws, jitter and blur off: the student's gradient after one iteration equals that of
    source + mixed (pseudo-label weight) + mask_lambda x masked fused loss (+ detail losses)."""
    lam = 0.5
    cfg = tiny_cfg(f'model.type={model_type}', 'uda.mask_mode=separatetrg', f'uda.mask_lambda={lam}', *NO_DROPOUT)
    torch.manual_seed(0)
    trainer = mic_train.Trainer(cfg, torch.device('cpu'))
    student0 = copy.deepcopy(trainer.student)  # iteration 0: the teacher is this copy
    b = synthetic_batch(3)
    with torch.no_grad():  # a threshold that about half of the random teacher's pixels pass
        threshold = float(torch.softmax(student0.encode_decode(b['target_img']), dim=1).amax(dim=1).median())
    trainer.cfg.uda.pseudo_threshold = threshold
    B, _, H, W = b['img'].shape
    g = torch.Generator().manual_seed(5)
    mix_mask = (torch.rand(B, 1, H, W, generator=g) > 0.5).float()
    patch_mask = (torch.rand(B, 1, H, W, generator=g) > 0.7).float()
    box = (8, 40, 16, 48)
    monkeypatch.setattr(mic_uda, 'class_mix_masks', lambda *a, **k: mix_mask)
    monkeypatch.setattr(mic_uda, 'block_mask', lambda *a, **k: patch_mask)
    monkeypatch.setattr(mic_uda, 'augmentation_switches', lambda u, blur: (False, False))
    monkeypatch.setattr(mic_model.HRDAEncoderDecoder, 'random_crop_box', lambda self, h, w: box)
    logs, grads = _grads_of_one_step(trainer, b)

    # by hand, on the initial weights
    model, teacher = copy.deepcopy(student0), copy.deepcopy(student0)
    mic_model.set_dropout(teacher, False)
    src, gt, tgt = b['img'], b['gt'].long(), b['target_img']
    with torch.no_grad():
        prob, plabel = torch.softmax(teacher.encode_decode(tgt), dim=1).max(dim=1)
    ratio = (prob >= threshold).float().mean()
    assert 0.05 < float(ratio) < 0.95  # a real weight, not 0 or 1
    pweight = ratio.expand_as(prob)
    kw = {'hr_crop_box': box} if model_type == 'hrda' else {}

    def loss(img, label, weight, fused_scale=1.0):
        out = model.forward_train(img, label, seg_weight=weight, **kw)
        return out['loss_seg'] * fused_scale + out.get('loss_seg_hr', 0)
    mixed_img = mix_mask * src + (1 - mix_mask) * tgt
    mixed_lbl = torch.where(mix_mask.bool(), gt, plabel[:, None])
    mixed_w = torch.where(mix_mask[:, 0].bool(), torch.ones_like(pweight), pweight)
    total = (loss(src, gt, None) + loss(mixed_img, mixed_lbl, mixed_w)
             + loss(tgt * patch_mask, plabel[:, None], pweight, fused_scale=lam))
    total.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected)
    for n, g_ in expected.items():
        torch.testing.assert_close(grads[n], g_, rtol=1e-5, atol=1e-7, msg=n)
    assert float(logs['pseudo_ratio']) == pytest.approx(float(ratio))
    # and the logs hold the scaled MIC term
    assert float(logs['masked.loss_seg']) == pytest.approx(
        lam * float(model.forward_train(tgt * patch_mask, plabel[:, None], seg_weight=pweight, **kw)['loss_seg']),
        rel=1e-5)


def test_the_last_pass_of_each_trained_module_synchronises():
    cfg = tiny_cfg('model.type=encoder_decoder', 'uda.mode=advseg', *NO_DROPOUT)
    trainer = mic_train.Trainer(cfg, torch.device('cpu'))
    assert [n for n, _ in trainer.passes] == ['source', 'adversarial', 'masked', 'discriminator']
    assert trainer.last_pass == {'student': 2, 'discriminator': 3}
    cfg = tiny_cfg('uda.mask_mode=null')
    assert mic_train.Trainer(cfg, torch.device('cpu')).last_pass == {'student': 1}


def test_advseg_one_iteration():
    cfg = tiny_cfg('model.type=encoder_decoder', 'uda.mode=advseg', 'optim.type=sgd', 'optim.lr=0.0025',
                   'optim.head_lr_mult=1', 'optim.warmup_iters=0', *NO_DROPOUT)
    torch.manual_seed(0)
    trainer = mic_train.Trainer(cfg, torch.device('cpu'))
    assert set(trainer.modules) == {'student', 'mic_teacher', 'discriminator'}
    d = trainer.modules['discriminator']
    # as in the original, the segmentor's SGD holds the discriminator as well as its own Adam
    assert {id(p) for p in d.parameters()} <= {id(p) for g in trainer.optimizers['student'].param_groups
                                               for p in g['params']}
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    logs = trainer.step(synthetic_batch(), 10)
    for k in ('source.loss_seg', 'adversarial.loss_adv', 'masked.loss_seg', 'discriminator.loss_src',
              'discriminator.loss_tgt'):
        assert torch.isfinite(logs[k]), k
    assert all(p.requires_grad for p in d.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in d.named_parameters())
    # D's learning rate: poly decay with power 0.9 from uda.advseg.lr
    lr_d = trainer.optimizers['discriminator'].param_groups[0]['lr']
    assert lr_d == pytest.approx(1e-4 * (1 - 10 / cfg.train.max_iters) ** 0.9)


def test_discriminator_and_entropy_losses_by_hand():
    out = torch.tensor([[[[0.25, -0.5]]]])
    assert float(mic_uda.discriminator_loss(out, 1.0, 'ls')) == pytest.approx((0.75 ** 2 + 1.5 ** 2) / 2)
    bce = -(torch.log(torch.sigmoid(out)).mean())
    assert float(mic_uda.discriminator_loss(out, 1.0, 'vanilla')) == pytest.approx(float(bce), rel=1e-6)
    uniform = torch.full((2, 4, 3, 3), 0.25)
    assert float(mic_uda.normalised_entropy(uniform)) == pytest.approx(1.0)
    onehot = torch.zeros(1, 4, 2, 2)
    onehot[:, 1] = 1
    assert float(mic_uda.normalised_entropy(onehot)) == pytest.approx(0.0, abs=1e-6)


def test_minent_one_iteration():
    cfg = tiny_cfg('model.type=encoder_decoder', 'uda.mode=minent', 'uda.mask_mode=null', *NO_DROPOUT)
    torch.manual_seed(0)
    trainer = mic_train.Trainer(cfg, torch.device('cpu'))
    assert [n for n, _ in trainer.passes] == ['source', 'entropy'] and set(trainer.modules) == {'student'}
    b = synthetic_batch()
    with torch.no_grad():
        prob = torch.softmax(trainer.student.encode_decode(b['target_img']), dim=1)
    logs = trainer.step(b, 0)
    assert float(logs['entropy.loss_ent']) == pytest.approx(0.001 * float(mic_uda.normalised_entropy(prob)),
                                                            rel=1e-5)


def test_advseg_and_minent_on_hrda_are_refused_by_the_config():
    for mode in ('advseg', 'minent'):
        with pytest.raises(mic_config.ConfigError, match=f'uda.mode={mode} is implemented for single-scale models'):
            tiny_cfg(f'uda.mode={mode}')


def test_experiment_runs_train_in_turn_and_finished_ones_are_reported(tmp_path, monkeypatch, capsys):
    demo = str(tmp_path / 'demo')
    runs = [(f'tiny_s{seed}', os.path.join(REPO, 'configs/gta2cs.yaml'),
             tiny_opts(demo, str(tmp_path / f'exp/tiny_s{seed}'), 'train.max_iters=2', 'train.eval_interval=0',
                       'train.debug_img_interval=0', f'train.seed={seed}')) for seed in (0, 1)]
    monkeypatch.setattr(mic_experiments, 'experiment_runs', lambda exp_id, *a, **k: runs)
    first = mic_train.main(['--exp', '99'])
    assert set(first) == {'tiny_s0', 'tiny_s1'}
    for name in first:
        assert os.path.isfile(tmp_path / 'exp' / name / 'metrics.json')
    log = (tmp_path / 'exp' / 'tiny_s0' / 'log.jsonl').read_text()
    capsys.readouterr()
    again = mic_train.main(['--exp', '99'])
    assert {k: v['mIoU'] for k, v in again.items()} == {k: v['mIoU'] for k, v in first.items()}
    assert (tmp_path / 'exp' / 'tiny_s0' / 'log.jsonl').read_text() == log  # not trained again
    assert "already holds this config's finished run" in capsys.readouterr().out


def test_exp_list_prints_one_command_per_run(capsys):
    mic_train.main(['--exp', '85', '--list'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith('python mic_train.py --cfg configs/') for line in lines)
    assert [line.rsplit('train.seed=', 1)[1][0] for line in lines] == ['0', '1', '2']


def test_the_config_modes_are_the_method_table():
    assert set(mic_config.UDA_MODES) == set(mic_uda.METHODS)
    assert all(n in mic_uda.PASSES for m in mic_uda.METHODS.values() for n in m.passes)


# --------------------------------------------------------------------------
# A new method is its functions and one table entry: a toy method with its own trained module
# --------------------------------------------------------------------------

class ToyCritic(torch.nn.Module):
    """A 1x1 convolution that scores class probabilities (a stand-in for a discriminator)."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(num_classes, 1, 1)

    def forward(self, prob):
        return self.conv(prob)


def critic_pass(t, s):
    """The critic learns to score the teacher's target predictions 1."""
    with torch.no_grad():
        prob = torch.softmax(t.modules['teacher'].encode_decode(s.tgt), dim=1)
    loss = (t.wrapped['critic'](prob) - 1).pow(2).mean()
    s.logs['critic.loss'] = loss.detach()
    return loss


TOY = mic_uda.Method(
    passes=('source', 'critic'),
    teachers={'teacher': mic_uda.Teacher(when=lambda cfg: True, momentum=lambda cfg: 0.5)},
    modules={'critic': mic_uda.Module(build=lambda cfg: ToyCritic(cfg.model.num_classes),
                                      optimizer=lambda m, cfg: torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9),
                                      lr=lambda it, cfg: 0.1 * (1 - it / cfg.train.max_iters))})


def test_a_toy_method_with_its_own_module_trains_and_resumes(monkeypatch, tmp_path):
    monkeypatch.setitem(mic_uda.METHODS, 'toy', TOY)
    monkeypatch.setitem(mic_uda.PASSES, 'critic', mic_uda.Pass(critic_pass, trains=('critic',)))
    cfg = tiny_cfg('model.type=encoder_decoder', 'uda.mask_mode=null', 'train.max_iters=10', *NO_DROPOUT)
    cfg.uda.mode = 'toy'  # (the config schema lists the shipped methods only)

    def trainer():
        torch.manual_seed(0)
        return mic_train.Trainer(cfg, torch.device('cpu'))
    a = trainer()
    assert [n for n, _ in a.passes] == ['source', 'critic'] and a.last_pass == {'student': 0, 'critic': 1}
    assert set(a.modules) == {'student', 'teacher', 'critic'} and set(a.optimizers) == {'student', 'critic'}
    assert a.ema == {'teacher': 0.5} and a.frozen == {}
    critic0 = {k: v.clone() for k, v in a.modules['critic'].state_dict().items()}
    for it in range(2):
        logs = a.step(synthetic_batch(it), it)
    assert torch.isfinite(logs['critic.loss'])
    assert a.optimizers['critic'].param_groups[0]['lr'] == pytest.approx(0.1 * (1 - 1 / 10))
    assert any(not torch.equal(v, critic0[k]) for k, v in a.modules['critic'].state_dict().items())
    torch.save(a.state_dict(), tmp_path / 'ckpt.pth')

    b = trainer()
    b.load_state_dict(torch.load(tmp_path / 'ckpt.pth', weights_only=True))
    for name in a.modules:
        for k, v in a.modules[name].state_dict().items():
            assert torch.equal(v, b.modules[name].state_dict()[k]), (name, k)
    assert b.optimizers['critic'].state_dict()['state'][0]['momentum_buffer'].abs().sum() > 0
    for t in (a, b):  # the next iteration continues exactly (the momentum buffers were restored)
        torch.manual_seed(7)
        t.step(synthetic_batch(2), 2)
    for name in ('student', 'critic'):
        for k, v in a.modules[name].state_dict().items():
            assert torch.equal(v, b.modules[name].state_dict()[k]), (name, k)
