"""mic_model: each component against values derived independently in the test."""
import math

import pytest
import torch
import torch.nn.functional as F

import mic_model
from helpers import tiny_model_cfg
from mic_config import load_config
from mic_model import CheckpointError, build_model, load_checkpoint

torch.set_num_threads(2)


# --------------------------------------------------------------------------
# MiT against an explicit re-derivation of SegFormer's equations
# --------------------------------------------------------------------------

def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _explicit_attention(x, H, W, attn):
    """Per sample, per head: softmax(q k^T / sqrt(d)) v, keys/values from the sr-reduced map."""
    B, N, C = x.shape
    nh = attn.num_heads
    d = C // nh
    q = _linear(x, attn.q)
    if attn.sr_ratio > 1:
        m = x.transpose(1, 2).reshape(B, C, H, W)
        m = F.conv2d(m, attn.sr.weight, attn.sr.bias, stride=attn.sr_ratio).flatten(2).transpose(1, 2)
        m = _layer_norm(m, attn.norm.weight, attn.norm.bias, 1e-5)
    else:
        m = x
    kv = _linear(m, attn.kv)
    k, v = kv[..., :C], kv[..., C:]
    out = torch.zeros(B, N, C)
    for b in range(B):
        for h in range(nh):
            sl = slice(h * d, (h + 1) * d)
            scores = q[b, :, sl] @ k[b, :, sl].T / math.sqrt(d)
            p = torch.exp(scores - scores.max(-1, keepdim=True).values)
            out[b, :, sl] = (p / p.sum(-1, keepdim=True)) @ v[b, :, sl]
    return _linear(out, attn.proj)


def _explicit_mit(model, img):
    outs = []
    x = img
    for i in range(1, 5):
        pe = getattr(model, f'patch_embed{i}')
        x = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride, padding=pe.proj.padding)
        B, C, H, W = x.shape
        x = _layer_norm(x.flatten(2).transpose(1, 2), pe.norm.weight, pe.norm.bias, 1e-5)
        for blk in getattr(model, f'block{i}'):
            x = x + _explicit_attention(_layer_norm(x, blk.norm1.weight, blk.norm1.bias, 1e-6), H, W, blk.attn)
            h = _linear(_layer_norm(x, blk.norm2.weight, blk.norm2.bias, 1e-6), blk.mlp.fc1)
            dw = blk.mlp.dwconv.dwconv
            h = F.conv2d(h.transpose(1, 2).reshape(B, -1, H, W), dw.weight, dw.bias, padding=1, groups=dw.groups)
            h = h.flatten(2).transpose(1, 2)
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
            x = x + _linear(h, blk.mlp.fc2)
        norm = getattr(model, f'norm{i}')
        x = _layer_norm(x, norm.weight, norm.bias, 1e-6)
        x = x.transpose(1, 2).reshape(B, C, H, W)
        outs.append(x)
    return outs


def test_mit_matches_explicit_reference():
    torch.manual_seed(0)
    model = mic_model.MiT('b0', drop_path_rate=0.0).eval()
    with torch.no_grad():  # non-trivial norms so that eps and affine placement matter
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = model(img)
        ref = _explicit_mit(model, img)
    shapes = [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)]
    for o, r, s in zip(ours, ref, shapes):
        assert tuple(o.shape) == s
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


def test_mit_any_input_size_and_variant_names():
    model = mic_model.MiT('mit_b0').eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 50, 70))  # not a multiple of 32: convs round up
    assert [tuple(f.shape[2:]) for f in feats] == [(13, 18), (7, 9), (4, 5), (2, 3)]
    with pytest.raises(ValueError, match='at least 32x32'):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match='mit_b0, mit_b1'):
        mic_model.MiT('b9')


@pytest.mark.parametrize('variant,low,high', [('b0', 3.2e6, 3.4e6), ('b5', 81.0e6, 82.0e6)])
def test_mit_parameter_counts(variant, low, high):
    assert low < mic_model.count_params(mic_model.MiT(variant)) < high


def test_drop_path_rates_and_layer_norm_eps():
    model = mic_model.MiT('b2', drop_path_rate=0.1)
    rates = [b.drop_path.p for i in range(1, 5) for b in getattr(model, f'block{i}')]
    assert len(rates) == 16 and rates[0] == 0.0 and abs(rates[-1] - 0.1) < 1e-7
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert model.patch_embed1.norm.eps == 1e-5 and model.block1[0].attn.norm.eps == 1e-5
    assert model.block1[0].norm1.eps == 1e-6 and model.norm4.eps == 1e-6


def test_state_dict_names_follow_mmseg_layout():
    keys = set(build_model(tiny_model_cfg()).state_dict())
    for k in ['backbone.patch_embed1.proj.weight', 'backbone.block1.0.attn.q.weight', 'backbone.block1.0.attn.kv.weight',
              'backbone.block1.0.attn.sr.weight', 'backbone.block1.0.attn.norm.weight',
              'backbone.block1.0.mlp.fc1.weight', 'backbone.block1.0.mlp.dwconv.dwconv.weight', 'backbone.norm1.weight',
              'decode_head.head.embed_layers.3.proj.bias', 'decode_head.head.fuse_layer.aspp_modules.0.conv.weight',
              'decode_head.head.fuse_layer.aspp_modules.0.bn.running_var',
              'decode_head.head.fuse_layer.aspp_modules.2.depthwise_conv.conv.weight',
              'decode_head.head.fuse_layer.aspp_modules.3.pointwise_conv.bn.weight',
              'decode_head.head.fuse_layer.bottleneck.conv.weight', 'decode_head.head.conv_seg.weight',
              'decode_head.scale_attention.fuse_layer.conv.weight', 'decode_head.scale_attention.fuse_layer.bn.bias',
              'decode_head.scale_attention.conv_seg.bias']:
        assert k in keys, k
    # convs followed by BN carry no bias; the depthwise ASPP convs are dilated 6/12/18
    assert 'decode_head.head.fuse_layer.aspp_modules.0.conv.bias' not in keys
    head = build_model(tiny_model_cfg()).decode_head.head
    assert [m.depthwise_conv.conv.dilation[0] for m in head.fuse_layer.aspp_modules[1:]] == [6, 12, 18]
    plain = set(build_model(tiny_model_cfg(type='encoder_decoder')).state_dict())
    assert 'decode_head.fuse_layer.bottleneck.bn.weight' in plain and 'decode_head.conv_seg.weight' in plain


# --------------------------------------------------------------------------
# HRDA fusion against a hand computation
# --------------------------------------------------------------------------

def _upsample2x(x):
    """Bilinear x2, align_corners=False, written out: out[i] samples in[(i + 0.5) / 2 - 0.5]."""
    *lead, h, w = x.shape

    def weights(n):
        m = torch.zeros(2 * n, n)
        for i in range(2 * n):
            src = max((i + 0.5) / 2 - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n - 1)
            i1 = min(i0 + 1, n - 1)
            m[i, i0] += 1 - (src - i0)
            m[i, i1] += src - i0
        return m
    return weights(h) @ x @ weights(w).T


def test_hrda_fuse_matches_hand_computation():
    torch.manual_seed(0)
    K = 3
    context = torch.randn(1, K, 4, 4)  # input 32x32: context logits at stride 8
    detail = torch.randn(1, K, 4, 4)  # detail crop 16x16 at stride 4
    att = torch.rand(1, K, 4, 4)
    box = (8, 24, 0, 16)  # (y1, y2, x1, x2) in input pixels
    fused, scaled = mic_model.hrda_fuse(context, detail, att, box, output_stride=4, context_scale=0.5)

    mask = torch.zeros(4, 4)
    mask[1:3, 0:2] = 1  # box / 8
    att_m = att * mask
    expect_scaled = (1 - att_m) * context
    inserted = torch.zeros(1, K, 8, 8)
    inserted[:, :, 2:6, 0:4] = detail  # box / 4
    expect = _upsample2x(att_m) * inserted + _upsample2x(expect_scaled)
    torch.testing.assert_close(scaled, expect_scaled)
    torch.testing.assert_close(fused, expect, atol=1e-6, rtol=1e-6)
    # outside the box the fused logits are the upsampled context alone
    torch.testing.assert_close(fused[:, :, :, 6:], _upsample2x(expect_scaled)[:, :, :, 6:])


def test_hrda_fuse_without_box_uses_unmasked_attention():
    context, detail, att = torch.randn(2, 2, 3, 5), torch.randn(2, 2, 6, 10), torch.rand(2, 1, 3, 5)
    fused, _ = mic_model.hrda_fuse(context, detail, att)
    torch.testing.assert_close(fused, _upsample2x(att) * detail + _upsample2x((1 - att) * context),
                               atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------
# Sliding windows against a per-window loop
# --------------------------------------------------------------------------

def test_slide_boxes_cover_image_and_stay_inside():
    boxes = mic_model.slide_boxes(100, 150, (64, 64), (32, 32))
    assert len(boxes) == 3 * 4
    cover = torch.zeros(100, 150)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= 100 and 0 <= x1 < x2 <= 150 and (y2 - y1, x2 - x1) == (64, 64)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert mic_model.slide_boxes(20, 30, (64, 64), (32, 32)) == [(0, 20, 0, 30)]  # small input: one window


def test_slide_inference_equals_per_window_loop():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(type='encoder_decoder', test={'mode': 'slide', 'crop_size': [32, 48],
                                                               'stride': [16, 24]})).eval()
    img = torch.randn(2, 3, 56, 88)
    with torch.no_grad():
        batched = model.inference(img)
        total = torch.zeros(2, 19, 56, 88)
        count = torch.zeros(56, 88)
        for y1, y2, x1, x2 in mic_model.slide_boxes(56, 88, (32, 48), (16, 24)):
            total[:, :, y1:y2, x1:x2] += model.encode_decode(img[:, :, y1:y2, x1:x2])
            count[y1:y2, x1:x2] += 1
    torch.testing.assert_close(batched, total / count, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert model.inference(img, out_size=(112, 176)).shape == (2, 19, 112, 176)


def test_hrda_detail_slide_equals_per_window_loop():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg()).eval()
    img = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        batched = model.detail_logits_slide(img)
        total, count = torch.zeros(1, 19, 16, 24), torch.zeros(16, 24)
        for y1, y2, x1, x2 in mic_model.slide_boxes(64, 96, (32, 32), (16, 16)):
            win = model.decode_head.head(model.backbone(img[:, :, y1:y2, x1:x2]))
            total[:, :, y1 // 4:y2 // 4, x1 // 4:x2 // 4] += win
            count[y1 // 4:y2 // 4, x1 // 4:x2 // 4] += 1
        torch.testing.assert_close(batched, total / count, atol=1e-5, rtol=1e-5)
        # encode_decode = hand-assembled context + detail fusion, upsampled to the input
        feats = model.backbone(F.interpolate(img, scale_factor=0.5, mode='bilinear', align_corners=False))
        ctx = model.decode_head.head(feats)
        att = torch.sigmoid(model.decode_head.scale_attention(feats))
        expect = _upsample2x(att) * (total / count) + _upsample2x((1 - att) * ctx)
        expect = F.interpolate(expect, size=(64, 96), mode='bilinear', align_corners=False)
        torch.testing.assert_close(model.encode_decode(img), expect, atol=1e-5, rtol=1e-5)


def test_hrda_handles_sizes_not_divisible_by_8():
    model = build_model(tiny_model_cfg()).eval()
    with torch.no_grad():
        assert model.encode_decode(torch.randn(1, 3, 70, 101)).shape == (1, 19, 70, 101)
        with pytest.raises(ValueError, match='at least 32x32'):
            model.encode_decode(torch.randn(1, 3, 40, 40))  # context view 20x20
    with pytest.raises(ValueError, match='divisible by 8'):
        model.forward_train(torch.randn(1, 3, 44, 64), torch.zeros(1, 1, 44, 64, dtype=torch.long))


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------

def test_seg_loss_is_mean_over_all_pixels_with_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    label = torch.randint(0, 4, (2, 1, 3, 5))
    label[0, 0, 0, :] = 255
    weight = torch.rand(2, 3, 5)
    total = 0.0
    for b in range(2):
        for y in range(3):
            for x in range(5):
                c = int(label[b, 0, y, x])
                if c == 255:
                    continue  # counts in the denominator, contributes 0
                logp = logits[b, :, y, x] - torch.logsumexp(logits[b, :, y, x], 0)
                total += -float(logp[c]) * float(weight[b, y, x])
    assert abs(float(mic_model.seg_loss(logits, label, weight)) - total / 30) < 1e-6


def test_seg_loss_resizes_logits_to_label():
    logits = torch.randn(1, 3, 4, 4)
    label = torch.randint(0, 3, (1, 1, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode='bilinear', align_corners=False)
    assert torch.allclose(mic_model.seg_loss(logits, label), F.cross_entropy(up, label[:, 0]))


def test_hrda_training_losses_with_fixed_box():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg())
    mic_model.set_dropout(model, False)
    img = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 19, (2, 1, 64, 64))
    box = (8, 40, 16, 48)
    out = model.forward_train(img, label, hr_crop_box=box, return_feat=True, return_logits=True)
    assert out['hr_crop_box'] == box
    # detail loss = 0.1 x CE of the detail logits against the cropped label
    with torch.no_grad():
        detail = model.decode_head.head(model.backbone(img[:, :, 8:40, 16:48]))
    torch.testing.assert_close(out['loss_seg_hr'], 0.1 * mic_model.seg_loss(detail, label[:, :, 8:40, 16:48]))
    torch.testing.assert_close(out['loss_seg'], 0.9 * mic_model.seg_loss(out['logits'], label))
    assert [tuple(f.shape) for f in out['features']][0] == (2, 32, 8, 8)  # context view: 32x32 input
    assert out['logits'].shape == (2, 19, 16, 16)
    # random boxes have corners divisible by 8 and stay inside
    for _ in range(20):
        y1, y2, x1, x2 = model.random_crop_box(64, 96)
        assert y1 % 8 == 0 and x1 % 8 == 0 and y2 <= 64 and x2 <= 96 and (y2 - y1, x2 - x1) == (32, 32)


def test_activation_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    a = build_model(tiny_model_cfg())
    b = build_model(tiny_model_cfg(activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        mic_model.set_dropout(m, False)
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 1, 64, 64))
    grads = []
    for m in (a, b):
        out = m.forward_train(img, label, hr_crop_box=(0, 32, 0, 32))
        (out['loss_seg'] + out['loss_seg_hr']).backward()
        grads.append(m.backbone.block1[0].attn.q.weight.grad.clone())
    assert b.backbone.activation_checkpointing
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_runs_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg()).eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_decode(img)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model.encode_decode(img)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_set_dropout_keeps_batchnorm_in_train_mode():
    model = build_model(tiny_model_cfg(backbone={'type': 'mit_b0', 'drop_path_rate': 0.5}))
    model.train()
    mic_model.set_dropout(model, False)
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_decode(img), model.encode_decode(img))  # deterministic
    assert model.decode_head.head.fuse_layer.bottleneck.bn.training


def test_decoder_convolutions_get_nchw_maps_on_the_cpu():
    """The encoder's maps are channels-last; the decoders' convolutions run several times faster on
    contiguous NCHW on the CPU (BENCHMARKS.md section 8), and the values are the same either way."""
    model = build_model(tiny_model_cfg()).eval()
    seen = []
    for m in model.decode_head.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.groups > 1:  # ASPP depthwise
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model.encode_decode(img)
        assert seen and all(seen)
        layout = mic_model.decoder_layout
        try:  # the channels-last maps as they come from the encoder: same logits
            mic_model.decoder_layout = lambda x: x
            torch.testing.assert_close(model.encode_decode(img), out, atol=1e-5, rtol=1e-5)
        finally:
            mic_model.decoder_layout = layout


# --------------------------------------------------------------------------
# Building from configs and loading checkpoints
# --------------------------------------------------------------------------

def test_build_from_shipped_configs():
    model = build_model(load_config('configs/gta2cs.yaml', ['model.backbone.type=mit_b0'])['model'])
    assert isinstance(model, mic_model.HRDAEncoderDecoder)
    assert model.decode_head.head.embed_layers['3'].proj.in_features == 256  # b0's last stage width
    plain = build_model(load_config('configs/gta2cs_daformer.yaml', ['model.backbone.type=mit_b0']).model)
    assert type(plain) is mic_model.EncoderDecoder and plain.test_cfg['mode'] == 'whole'


def test_load_our_checkpoint(tmp_path):
    src, dst = build_model(tiny_model_cfg()), build_model(tiny_model_cfg())
    torch.save({'student': src.state_dict(), 'teacher': {}, 'config': {}}, tmp_path / 'ours.pth')
    info = load_checkpoint(dst, str(tmp_path / 'ours.pth'))
    assert info['format'] == 'mic_train'
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_load_released_checkpoint_takes_the_student(tmp_path):
    student, teacher = build_model(tiny_model_cfg()), build_model(tiny_model_cfg())
    sd = {}
    for k, v in student.state_dict().items():
        sd['model.' + k] = v
        sd['ema_model.' + k] = teacher.state_dict()[k]
    for k, v in teacher.backbone.state_dict().items():
        sd['imnet_model.backbone.' + k] = v
    torch.save({'state_dict': sd, 'meta': {'iter': 40000, 'CLASSES': ('road',)}}, tmp_path / 'released.pth')
    dst = build_model(tiny_model_cfg())
    assert load_checkpoint(dst, str(tmp_path / 'released.pth'))['format'] == 'released_uda'
    w = 'backbone.block1.0.attn.q.weight'
    assert torch.equal(dst.state_dict()[w], student.state_dict()[w])
    assert not torch.equal(dst.state_dict()[w], teacher.state_dict()[w])


def test_load_segformer_imagenet_weights(tmp_path):
    enc = mic_model.MiT('b0')
    sd = dict(enc.state_dict())
    sd['head.weight'], sd['head.bias'] = torch.zeros(1000, 256), torch.zeros(1000)
    torch.save(sd, tmp_path / 'mit_b0.pth')
    model = build_model(tiny_model_cfg(pretrained=str(tmp_path / 'mit_b0.pth')), load_pretrained=True)
    assert torch.equal(model.backbone.norm4.weight, enc.norm4.weight)
    bare = mic_model.MiT('b0')
    assert load_checkpoint(bare, str(tmp_path / 'mit_b0.pth'))['ignored'] == ['head.weight', 'head.bias']
    assert torch.equal(bare.patch_embed1.proj.weight, enc.patch_embed1.proj.weight)


def test_load_mismatches_name_keys_and_shapes(tmp_path):
    b5_like = {'student': build_model(tiny_model_cfg(backbone={'type': 'mit_b2'})).state_dict()}
    torch.save(b5_like, tmp_path / 'b2.pth')
    with pytest.raises(CheckpointError, match=r'stage-3 blocks \(mit_b2\)'):
        load_checkpoint(build_model(tiny_model_cfg()), str(tmp_path / 'b2.pth'))
    hrda = {'student': build_model(tiny_model_cfg()).state_dict()}
    torch.save(hrda, tmp_path / 'hrda.pth')
    with pytest.raises(CheckpointError, match='model.type=hrda') as e:
        load_checkpoint(build_model(tiny_model_cfg(type='encoder_decoder')), str(tmp_path / 'hrda.pth'))
    assert 'unexpected keys: decode_head.head.' in str(e.value)
    sd = build_model(tiny_model_cfg()).state_dict()
    sd['decode_head.head.conv_seg.weight'] = torch.zeros(16, 32, 1, 1)  # 16 classes
    torch.save({'student': sd}, tmp_path / 'k16.pth')
    with pytest.raises(CheckpointError, match=r'conv_seg.weight: checkpoint \(16, 32, 1, 1\) vs model \(19, 32, 1, 1\)'):
        load_checkpoint(build_model(tiny_model_cfg()), str(tmp_path / 'k16.pth'))


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_checkpoint(build_model(tiny_model_cfg()), str(tmp_path / 'nope.pth'))
    with pytest.raises(FileNotFoundError, match=r'SegFormer.*model.pretrained=null'):
        build_model(tiny_model_cfg(pretrained=str(tmp_path / 'mit_b5.pth')), load_pretrained=True)
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'):
        load_checkpoint(build_model(tiny_model_cfg()), str(tmp_path / 'junk.pth'))
    model = build_model(tiny_model_cfg())
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'whole.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'whole.pth').read_bytes()[:5000])  # an interrupted copy
    with pytest.raises(CheckpointError, match='truncated or damaged.*Download or copy it again'):
        load_checkpoint(model, str(tmp_path / 'cut.pth'))
