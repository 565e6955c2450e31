"""DINOv2 under MIC's training: the optimizer's parameter groups (weight decay, encoder lr, layer decay),
token masking in the masked pass, the config's checks, and a tiny MIC(HRDA) run on DINOv2-S that resumes
exactly. The encoder is shrunk in-process (DINOV2_VARIANTS) so that everything runs in seconds on a CPU."""
import copy
import os

import pytest
import torch

import mic_model
import mic_train
from helpers import REPO, synthetic_batch, tiny_cfg, tiny_opts
from mic_config import ConfigError, load_config

TINY_VITS = dict(embed_dim=48, depth=4, num_heads=3, ffn='mlp', hf='small')


@pytest.fixture(autouse=True)
def tiny_vits(monkeypatch):
    monkeypatch.setitem(mic_model.DINOV2_VARIANTS, 'vits14', TINY_VITS)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dino_cfg(*opts):
    return tiny_cfg('model.backbone.type=dinov2_vits14', *opts)


# --------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------

def test_layer_decay_groups_follow_vfm_uda():
    cfg = dino_cfg('model.type=encoder_decoder', 'model.decode_head.type=vfm_uda', 'optim.layer_decay=0.5',
                   'optim.encoder_lr_mult=0.1', 'optim.head_lr_mult=1')
    model = mic_model.build_model(cfg.model)
    groups = mic_train.param_groups(model, cfg.optim)
    names = [n for g in groups for n in g['names']]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    mult = {n: g['lr_mult'] for g in groups for n in g['names']}
    wd = {n: g['weight_decay'] for g in groups for n in g['names']}
    depth = TINY_VITS['depth']
    assert mult['backbone.blocks.3.attn.qkv.weight'] == pytest.approx(0.1)  # the last block: the encoder's lr
    assert mult['backbone.blocks.2.mlp.fc1.weight'] == pytest.approx(0.1 * 0.5)
    assert mult['backbone.blocks.0.norm1.weight'] == pytest.approx(0.1 * 0.5 ** 3)
    for stem in ('backbone.patch_embed.proj.weight', 'backbone.cls_token', 'backbone.pos_embed', 'backbone.mask_token'):
        assert mult[stem] == pytest.approx(0.1 * 0.5 ** depth), stem  # the stems: decayed the most
    assert mult['backbone.norm.weight'] == pytest.approx(0.1) and mult['decode_head.out.weight'] == 1.0
    for n in ('backbone.cls_token', 'backbone.pos_embed', 'backbone.mask_token', 'backbone.norm.bias',
              'backbone.blocks.0.attn.qkv.bias', 'backbone.blocks.1.ls1.gamma', 'backbone.blocks.2.norm2.weight'):
        assert wd[n] == 0.0, n
    assert wd['backbone.blocks.0.attn.qkv.weight'] == wd['decode_head.out.weight'] == cfg.optim.weight_decay
    opt = mic_train.build_optimizer(model, cfg)
    assert [len(g['params']) for g in opt.param_groups] == [len(g['names']) for g in groups]


def test_mit_groups_are_the_three_of_before():
    cfg = tiny_cfg('optim.layer_decay=0.5')  # MiT states no layer ids: layer decay does not apply
    model = mic_model.build_model(cfg.model)
    groups = mic_train.param_groups(model, cfg.optim)
    params = list(model.named_parameters())
    decay = [n for n, _ in params if not n.startswith('decode_head.') and 'norm' not in n]
    no_decay = [n for n, _ in params if not n.startswith('decode_head.') and 'norm' in n]
    head = [n for n, _ in params if n.startswith('decode_head.')]
    assert [g['names'] for g in groups] == [decay, no_decay, head]
    assert [(g['lr_mult'], g['weight_decay']) for g in groups] == [(1.0, 0.01), (1.0, 0.0), (10.0, 0.01)]


# --------------------------------------------------------------------------
# Token masking
# --------------------------------------------------------------------------

def test_token_masking_in_the_masked_pass(monkeypatch):
    """The student's encoder in the masked pass gets Bernoulli(mask_ratio) token masks drawn from the torch
    RNG, and its features are forward_tokens(image, masks); teachers and the other passes never mask."""
    cfg = dino_cfg('model.type=encoder_decoder', 'model.decode_head.type=vfm_uda', 'uda.mask_type=token')
    trainer = mic_train.Trainer(cfg, torch.device('cpu'))
    calls, draws = [], []
    prepare, draw = mic_model.DINOv2.prepare_tokens, mic_model.DINOv2.random_token_masks

    def recording_prepare(self, img, masks=None):
        calls.append((self, img, masks))
        return prepare(self, img, masks)

    def recording_draw(self, *args):
        draws.append(torch.get_rng_state())
        return draw(self, *args)
    monkeypatch.setattr(mic_model.DINOv2, 'prepare_tokens', recording_prepare)
    monkeypatch.setattr(mic_model.DINOv2, 'random_token_masks', recording_draw)
    seen, head_forward = [], mic_model.VFMUDAHead.forward

    def recording_head(head, feats):
        seen.append(feats.tokens)
        return head_forward(head, feats)
    monkeypatch.setattr(mic_model.VFMUDAHead, 'forward', recording_head)
    encoder_before = copy.deepcopy(trainer.student.backbone)  # the step updates the student's weights
    trainer.step(synthetic_batch(), 0)
    masked = [(i, c) for i, c in enumerate(calls) if c[2] is not None]
    assert len(masked) == len(draws) == 1 and masked[0][1][0] is trainer.student.backbone
    assert trainer.student.backbone.token_mask_ratio == 0.0  # switched off after the pass
    index, (encoder, img, masks) = masked[0]
    torch.set_rng_state(draws[0])
    assert torch.equal(masks, torch.rand(masks.shape) < cfg.uda.mask_ratio)
    assert 0.4 < masks.float().mean() < 0.95
    with torch.no_grad():
        expect = encoder_before.forward_tokens(img, masks)[:, 1:]
    got = [t for t in seen if t.requires_grad][-1]  # the student's tokens of the masked pass
    h, w = img.shape[2] // 14, img.shape[3] // 14
    torch.testing.assert_close(got.detach(), mic_model.tokens_to_map(expect, h, w), rtol=0, atol=0)


def test_pixel_masking_and_the_vfm_head_on_dinov2_train():
    cfg = dino_cfg('model.decode_head.type=vfm_uda')  # HRDA with two light heads, MIC's image blocks
    trainer = mic_train.Trainer(cfg, torch.device('cpu'))
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    logs = trainer.step(synthetic_batch(), 0)
    assert torch.isfinite(logs['masked.loss_seg'])
    changed = {n for n, p in trainer.student.named_parameters() if not torch.equal(p, before[n])}
    pyramid = {n for n in before if n.startswith('backbone.pyramid.')}
    assert pyramid and not pyramid & changed  # the light head reads the token grid: the pyramid is frozen
    assert 'backbone.blocks.0.attn.qkv.weight' in changed and 'decode_head.head.out.weight' in changed


def test_the_light_head_reads_the_unresized_token_grid():
    model = mic_model.build_model(dino_cfg('model.type=encoder_decoder', 'model.decode_head.type=vfm_uda').model)
    feats = model.eval().backbone(torch.randn(1, 3, 64, 96))  # x1.1 -> 70x105: 5x7 tokens, stride-16 map 4x6
    assert feats.tokens.shape[2:] == (5, 7) and feats[2].shape[2:] == (4, 6)
    assert model.decode_head(feats).shape[2:] == feats[0].shape[2:] == (16, 24)


def test_config_errors():
    with pytest.raises(ConfigError, match="'uda.mask_type'.*mit_b0 has none"):
        tiny_cfg('uda.mask_type=token')
    with pytest.raises(ConfigError, match="'uda.mask_type'"):
        dino_cfg('uda.mask_type=tokens')
    with pytest.raises(ConfigError, match="'optim.layer_decay': expected a value in \\(0, 1\\]"):
        dino_cfg('optim.layer_decay=1.5')
    with pytest.raises(ConfigError, match="'optim.encoder_lr_mult'"):
        dino_cfg('optim.encoder_lr_mult=-1')
    for name in ('vitb', 'vitl', 'vitb_hrda'):
        cfg = load_config(os.path.join(REPO, f'configs/gta2cs_dinov2_{name}.yaml'))
        assert (cfg.uda.mask_type, cfg.uda.mask_ratio, cfg.uda.fd_lambda) == ('token', 0.7, 0)
        assert (cfg.optim.lr * cfg.optim.encoder_lr_mult, cfg.optim.warmup_ratio) == (pytest.approx(1.4142e-5), 1e-3)


# --------------------------------------------------------------------------
# A tiny MIC(HRDA) run on DINOv2-S: exact resume
# --------------------------------------------------------------------------

def test_tiny_dinov2_hrda_run_resumes_exactly(tmp_path, monkeypatch):
    demo = str(tmp_path / 'demo')
    extra = ['model.backbone.type=dinov2_vits14', 'uda.mask_type=token', 'train.max_iters=4',
             'train.ckpt_interval=2', 'train.eval_interval=0', 'train.debug_img_interval=0', 'data.demo.num_val=1']

    def run(work, resume=False):
        argv = ['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt', *tiny_opts(demo, work, *extra)]
        return mic_train.main(argv + (['--resume'] if resume else []))
    draws, draw = [], mic_model.DINOv2.random_token_masks
    monkeypatch.setattr(mic_model.DINOv2, 'random_token_masks', lambda self, *a: draws.append(a) or draw(self, *a))
    run(str(tmp_path / 'full'))
    assert len(draws) == 2 * 4  # each iteration's masked pass: the context and the detail view
    full = torch.load(tmp_path / 'full' / 'latest.pth', weights_only=True)
    original = mic_train.Trainer.step

    def crash_at_3(self, batch, iteration, keep_debug=False):
        if iteration == 3:
            raise KeyboardInterrupt  # after the checkpoint of iteration 2
        return original(self, batch, iteration, keep_debug)
    monkeypatch.setattr(mic_train.Trainer, 'step', crash_at_3)
    with pytest.raises(SystemExit):
        run(str(tmp_path / 'cut'))
    monkeypatch.setattr(mic_train.Trainer, 'step', original)
    run(str(tmp_path / 'cut'), resume=True)
    resumed = torch.load(tmp_path / 'cut' / 'latest.pth', weights_only=True)
    assert full['iteration'] == resumed['iteration'] == 4
    for part in ('student', 'teacher'):
        for k, v in full['modules'][part].items():
            assert torch.equal(v, resumed['modules'][part][k]), (part, k)
