"""mic_model's DINOv2 encoder: parity with the official code (tests/fixtures/dinov2_official_*.pt, written
by benchmarks/compare_with_dinov2.py --write-fixtures from facebookresearch/dinov2) and with transformers,
the weight loaders, the parameter-group information, the pyramid and the segmentors on top of it.
Tiny models (width 48, depth 4, 7x7 native grid) keep the file to seconds."""
import copy
import os

import pytest
import torch

import mic_config
import mic_model
from mic_model import CheckpointError, DINOv2, load_checkpoint, load_pretrained_encoder

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
KINDS = ('mlp', 'reg', 'swiglu')  # plain, 4 registers (antialiased interpolation), ViT-g's SwiGLU FFN


pytestmark = pytest.mark.usefixtures('one_thread')


def fixture(kind):
    return torch.load(os.path.join(FIXTURES, f'dinov2_official_{kind}.pt'), weights_only=True)


def tiny(cfg=None, **kw):
    """A tiny DINOv2 in the fixtures' configuration (kw overrides)."""
    cfg = {**dict(embed_dim=48, depth=4, num_heads=3, ffn='mlp', registers=0, img_size=98), **(cfg or {}), **kw}
    return DINOv2(cfg['embed_dim'], cfg['depth'], cfg['num_heads'], cfg['ffn'], cfg['registers'],
                  img_size=cfg['img_size'], **{k: v for k, v in kw.items() if k in ('input_scale', 'drop_path_rate')})


def loaded_from_fixture(kind, tmp_path):
    fx = fixture(kind)
    path = tmp_path / f'dinov2_{kind}_pretrain.pth'
    torch.save(fx['state_dict'], path)  # a bare state dict, like the official files
    model = tiny(fx['config']).eval()
    assert load_checkpoint(model, str(path))['format'] == 'dinov2_official'
    return model, fx


# --------------------------------------------------------------------------
# Parity with the official code
# --------------------------------------------------------------------------

@pytest.mark.parametrize('kind', KINDS)
def test_tokens_match_the_official_code(kind, tmp_path):
    """Native grid (no interpolation), smaller and larger square grids, non-square grids, token masks."""
    model, fx = loaded_from_fixture(kind, tmp_path)
    with torch.no_grad():
        for x, expect in zip(fx['inputs'], fx['outputs']):
            torch.testing.assert_close(model.forward_tokens(x.float()), expect, rtol=1e-5, atol=1e-5)
        for j, masks in fx['masks'].items():
            out = model.forward_tokens(fx['inputs'][j].float(), masks)
            torch.testing.assert_close(out, fx['masked_outputs'][j], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out, fx['outputs'][j], atol=1e-3)  # the mask changed the tokens


def test_position_embedding_interpolation_follows_the_hub_flags():
    plain, reg = tiny(), tiny(registers=4)
    assert not plain.pos_embed_antialias and reg.pos_embed_antialias
    assert plain.interpolate_pos_embed(7, 7, torch.float32) is plain.pos_embed  # native grid: as it is
    for m in (plain, reg):
        assert m.interpolate_pos_embed(5, 9, torch.float32).shape == (1, 1 + 45, 48)
        assert m.interpolate_pos_embed(5, 9, torch.bfloat16).dtype == torch.bfloat16  # computed in float32
    with pytest.raises(ValueError, match='multiples of 14'):
        plain.forward_tokens(torch.zeros(1, 3, 98, 100))


# --------------------------------------------------------------------------
# Hugging Face files and transformers
# --------------------------------------------------------------------------

def hf_model(registers, swiglu=False, seed=0):
    transformers = pytest.importorskip('transformers')
    pytest.importorskip('safetensors')
    kw = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=98, patch_size=14,
              use_swiglu_ffn=swiglu, layerscale_value=1.0, layer_norm_eps=1e-6)
    torch.manual_seed(seed)
    if registers:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            num_register_tokens=registers, **kw))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    with torch.no_grad():  # random values where the init puts constants
        for name, p in model.named_parameters():
            if p.ndim == 1 or 'token' in name or 'position' in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def hf_files(model, folder):
    """The model as the hub stores it: model.safetensors and pytorch_model.bin (the same tensors)."""
    from safetensors.torch import load_file
    model.save_pretrained(folder)
    st = os.path.join(folder, 'model.safetensors')
    torch.save(load_file(st), os.path.join(folder, 'pytorch_model.bin'))
    return st, os.path.join(folder, 'pytorch_model.bin')


@pytest.mark.parametrize('registers,swiglu', [(0, False), (0, True), (4, False)])
def test_hugging_face_files_match_transformers(registers, swiglu, tmp_path):
    """Both file formats load into the same numbers, equal to transformers' at the native grid. Off the
    native grid Dinov2Model interpolates to a size without the official 0.1 offset and so differs from
    the official no-register models (we follow the official code, see the fixtures' test);
    Dinov2WithRegistersModel interpolates as the official register models, so it is compared there too."""
    hf = hf_model(registers, swiglu)
    st, pt = hf_files(hf, str(tmp_path))
    ours = [tiny(depth=2, registers=registers, ffn='swiglu' if swiglu else 'mlp').eval() for _ in range(2)]
    assert load_pretrained_encoder(ours[0], st)['format'] == 'dinov2_hf'
    assert load_pretrained_encoder(ours[1], pt)['format'] == 'dinov2_hf'
    sd0, sd1 = ours[0].state_dict(), ours[1].state_dict()
    for k in sd0:
        assert k.startswith('pyramid.') or torch.equal(sd0[k], sd1[k]), k  # the pyramid is not in the files
    sizes = [(98, 98)] + ([(70, 70), (56, 84)] if registers else [])
    torch.manual_seed(1)
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(2, 3, *size)
            expect = hf(pixel_values=x).last_hidden_state
            torch.testing.assert_close(ours[0].forward_tokens(x), expect, rtol=1e-5, atol=1e-5)
        x, masks = torch.randn(2, 3, 98, 98), torch.rand(2, 49) < 0.5  # transformers' bool_masked_pos
        expect = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        torch.testing.assert_close(ours[0].forward_tokens(x, masks), expect, rtol=1e-5, atol=1e-5)


def test_safetensors_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / 'model.safetensors'
    path.write_bytes((2).to_bytes(8, 'little') + b'{}')
    monkeypatch.setitem(__import__('sys').modules, 'safetensors', None)
    monkeypatch.setitem(__import__('sys').modules, 'safetensors.torch', None)
    with pytest.raises(CheckpointError, match='pip install safetensors'):
        load_checkpoint(tiny(), str(path))


# --------------------------------------------------------------------------
# Strict loading and its messages
# --------------------------------------------------------------------------

def test_strict_loading_names_the_offending_keys(tmp_path):
    sd = fixture('mlp')['state_dict']
    bad = dict(sd)
    del bad['blocks.1.ls1.gamma']
    bad['blocks.0.attn.extra'] = torch.zeros(1)
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tiny(), str(tmp_path / 'bad.pth'))
    msg = str(e.value)
    assert 'dinov2_official' in msg and 'blocks.1.ls1.gamma' in msg and 'blocks.0.attn.extra' in msg
    # the wrong size (these weights into a wider model) names keys and shapes, and the model type
    torch.save(sd, tmp_path / 'w48.pth')
    with pytest.raises(CheckpointError, match=r'pos_embed: checkpoint \(1, 50, 48\) vs model \(1, 50, 96\)'):
        load_checkpoint(tiny(embed_dim=96), str(tmp_path / 'w48.pth'))
    vits = mic_model.BACKBONES['dinov2_vits14']({'type': 'dinov2_vits14'})
    vitb_like = {k: torch.zeros(v.shape[:-1] + (768,) if k == 'pos_embed' else v.shape)
                 for k, v in vits.state_dict().items() if not k.startswith('pyramid.')}
    torch.save(vitb_like, tmp_path / 'vitb.pth')
    with pytest.raises(CheckpointError, match='holds a dinov2_vitb14 encoder, the model a dinov2_vits14'):
        load_checkpoint(vits, str(tmp_path / 'vitb.pth'))


def test_incomplete_hugging_face_attention_is_named(tmp_path):
    sd = {'embeddings.patch_embeddings.projection.weight': torch.zeros(48, 3, 14, 14),
          'encoder.layer.0.attention.attention.query.weight': torch.zeros(48, 48)}
    torch.save(sd, tmp_path / 'pytorch_model.bin')
    with pytest.raises(CheckpointError, match=r'dinov2_hf.*\n.*missing keys.*\n.*attention\.attention\.query'):
        load_checkpoint(tiny(), str(tmp_path / 'pytorch_model.bin'))


def test_dinov2_weights_into_another_encoder_say_which_type(tmp_path):
    torch.save(fixture('reg')['state_dict'], tmp_path / 'w.pth')
    model = mic_model.MiT('b0')
    with pytest.raises(CheckpointError, match='not DINOv2'):
        load_checkpoint(model, str(tmp_path / 'w.pth'))


@pytest.mark.parametrize('kind,url,hf', [
    ('dinov2_vits14', 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth',
     'https://huggingface.co/facebook/dinov2-small'),
    ('dinov2_vits14_reg', 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth',
     'https://huggingface.co/facebook/dinov2-with-registers-small')])
def test_missing_file_message_gives_the_urls(kind, url, hf, tmp_path):
    backbone = mic_model.BACKBONES[kind]({'type': kind})
    assert backbone.default_pretrained == 'pretrained/' + url.rsplit('/', 1)[1]
    with pytest.raises(FileNotFoundError) as e:
        load_pretrained_encoder(backbone, str(tmp_path / 'nothing.pth'))
    assert url in str(e.value) and hf in str(e.value)


def test_segmentor_checkpoint_round_trip(tmp_path):
    """Our own checkpoints of a DINOv2 segmentor stay 'segmentor' files (backbone.pos_embed, not pos_embed)."""
    model = tiny_hrda(tiny())
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'seg.pth')
    other = tiny_hrda(tiny())
    assert load_checkpoint(other, str(tmp_path / 'seg.pth'))['format'] == 'segmentor'
    assert torch.equal(other.backbone.pos_embed, model.backbone.pos_embed)


# --------------------------------------------------------------------------
# What the optimizer reads
# --------------------------------------------------------------------------

def test_layer_ids_and_weight_decay_groups():
    m = tiny(registers=4)
    assert m.num_layers == 5  # the final norm and the pyramid share the last block's id (VFM-UDA's lr)
    expect = {'cls_token': 0, 'pos_embed': 0, 'mask_token': 0, 'register_tokens': 0, 'patch_embed.proj.weight': 0,
              'blocks.0.attn.qkv.weight': 1, 'blocks.3.ls2.gamma': 4, 'norm.weight': 4,
              'pyramid.up4_1.weight': 4, 'backbone.blocks.2.mlp.fc1.bias': 3}
    assert {k: m.layer_id(k) for k in expect} == expect
    assert all(0 <= m.layer_id(n) < m.num_layers for n, _ in m.named_parameters())
    with pytest.raises(KeyError):
        m.layer_id('decode_head.conv_seg.weight')
    no_decay = {n for n, _ in m.named_parameters() if any(k in n for k in m.no_weight_decay_keys)}
    decay = {n for n, _ in m.named_parameters()} - no_decay
    assert {'cls_token', 'pos_embed', 'mask_token', 'register_tokens', 'blocks.0.ls1.gamma', 'blocks.0.norm1.weight',
            'blocks.0.attn.qkv.bias', 'norm.weight', 'pyramid.up4_norm.weight'} <= no_decay
    assert all(n.endswith('.weight') and 'norm' not in n for n in decay)
    assert {'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.mlp.fc2.weight',
            'pyramid.up2.weight'} <= decay


# --------------------------------------------------------------------------
# Pyramid and segmentors
# --------------------------------------------------------------------------

def test_pyramid_sizes_and_sources():
    m = tiny().eval()
    assert m.out_indices == (0, 1, 2, 3) and m.out_channels == (12, 24, 48, 48)
    with torch.no_grad():
        for H, W in ((64, 64), (50, 77), (98, 98)):
            feats = m(torch.randn(1, 3, H, W))
            assert [tuple(f.shape) for f in feats] == [
                (1, c, -(-H // s), -(-W // s)) for c, s in zip(m.out_channels, m.feature_strides)]
        # input_scale 14/16 puts the tokens of a 128x128 input exactly on the stride-16 grid: the map at
        # stride 16 is then the final-normed patch tokens, unresized
        m.input_scale = 14 / 16
        x = torch.randn(1, 3, 128, 128)
        tokens = m.forward_tokens(torch.nn.functional.interpolate(x, size=(112, 112), mode='bilinear'))
        torch.testing.assert_close(m(x)[2], mic_model.tokens_to_map(tokens[:, 1:], 8, 8))
    m.input_scale = mic_model.VFM_UDA_INPUT_SCALE  # the default
    assert m.prepare_input(torch.zeros(1, 3, 1024, 1024)).shape[2:] == (1120, 1120)  # VFM-UDA's 1.1x, floored
    assert m.prepare_input(torch.zeros(1, 3, 512, 1024)).shape[2:] == (560, 1120)


def tiny_hrda(backbone, head='daformer', **cfg):
    """An HRDA segmentor around `backbone`, built as build_model does (the schema has no tiny ViT)."""
    cfg = mic_config.resolve_section('model', {'backbone': {'type': 'dinov2_vits14'}, 'pretrained': None,
                                              'decode_head': {'type': head, 'embed_dims': 16},
                                              'hrda': {'hr_crop_size': [32, 32]}, 'test': {'mode': 'whole'}, **cfg})
    make = mic_model.HEADS[head]
    K, ch = cfg['num_classes'] or 19, backbone.out_channels
    heads = mic_model.HRDAHead(make(ch, K, cfg['decode_head']), make(ch, K, cfg['decode_head'], attention=True))
    return mic_model.HRDAEncoderDecoder(backbone, heads, cfg['test'], cfg['hrda'])


@pytest.mark.parametrize('head', ['daformer', 'vfm_uda'])
def test_build_model_hrda_on_dinov2_vits14(head):
    torch.manual_seed(0)
    model = mic_model.build_model({'backbone': {'type': 'dinov2_vits14'}, 'decode_head': {'type': head},
                                   'pretrained': None, 'hrda': {'hr_crop_size': [32, 32]},
                                   'test': {'mode': 'whole'}})
    assert model.output_stride == mic_config.HEAD_OUTPUT_STRIDES[head] == 4
    x, label = torch.randn(1, 3, 64, 64), torch.randint(0, 19, (1, 1, 64, 64))
    losses = model.train().forward_train(x, label)
    loss = sum(v for k, v in losses.items() if k.startswith('loss'))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    assert model.encode_decode(x).shape == (1, 19, 64, 64)
    assert model.inference(torch.randn(1, 3, 72, 88), out_size=(36, 44)).shape == (1, 19, 36, 44)


def test_vfm_uda_head_in_a_single_scale_segmentor():
    model = mic_model.EncoderDecoder(tiny(), mic_model.VFMUDAHead((12, 24, 48, 48), 5), {'mode': 'whole'})
    assert model.output_stride == 4
    feats = model.backbone(torch.randn(2, 3, 112, 80))  # x1.1 -> 112x84: 8x6 tokens, upsampled 4x, resized
    assert feats.tokens.shape[2:] == (8, 6) and model.decode_head(feats).shape == (2, 5, 28, 20)
    assert model.encode_decode(torch.randn(2, 3, 112, 80)).shape == (2, 5, 112, 80)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = tiny_hrda(tiny(drop_path_rate=0.2)).train()  # drop path: checkpoint must replay its draws
    x, label = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 1, 64, 64))
    results = []
    for ac in (False, True):
        m = copy.deepcopy(model)
        m.backbone.activation_checkpointing = ac
        torch.manual_seed(1)
        losses = m.forward_train(x, label, hr_crop_box=(0, 32, 16, 48))
        loss = sum(v for k, v in losses.items() if k.startswith('loss'))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys() and any(k.startswith('backbone.blocks.') for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_swiglu_width_rule_and_variant_table():
    assert mic_model.swiglu_hidden(1536) == 4096  # ViT-g/14: w12 1536 -> 8192, w3 4096 -> 1536
    assert mic_model.swiglu_hidden(48) == 128
    assert set(mic_model.DINOV2_BACKBONE_TYPES) == {f'dinov2_vit{v}14{r}' for v in 'sblg' for r in ('', '_reg')}
    assert set(mic_model.DINOV2_BACKBONE_TYPES) <= set(mic_model.BACKBONES)
    assert mic_model.dinov2_spec('dinov2_vitg14_reg') == ('vitg14', 4)
