"""mic_model's ResNet-V1c encoder, DeepLabV2 head and HRDA on top of them (the original's Table 1),
against values derived independently in the test. ResNet-50 and small inputs keep each test short."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mic_config
import mic_model
from mic_model import CheckpointError, build_model, load_checkpoint


pytestmark = pytest.mark.usefixtures('one_thread')


R101_URL = 'https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth'


def dlv2_cfg(**kw):
    cfg = {'backbone': {'type': 'resnet50_v1c'}, 'decode_head': {'type': 'deeplabv2'}, 'pretrained': None,
           'hrda': {'hr_crop_size': [32, 32]}, 'test': {'mode': 'whole'}}
    cfg.update(kw)
    return cfg


@pytest.fixture(scope='module')
def r50():
    torch.manual_seed(0)
    return mic_model.ResNetV1c(50)


@pytest.fixture(scope='module')
def r101():
    torch.manual_seed(0)
    return mic_model.ResNetV1c(101)


def assert_close(ours, ref):
    """Equal up to float32 rounding through a deep network (batched and per-window convs round differently)."""
    torch.testing.assert_close(ours, ref, atol=1e-4 * max(1.0, float(ref.abs().max())), rtol=1e-4)


def _randomise_bn(module, seed=0):
    """Non-trivial BatchNorm statistics and affines (fresh ones are 1 / 0, and bn3 weights 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# --------------------------------------------------------------------------
# ResNet-V1c
# --------------------------------------------------------------------------

def test_resnet_parameter_counts(r101):
    # torchvision's ResNet-101 has 44,549,160 parameters, its fc 2048 x 1000 + 1000 = 2,049,000; the V1c
    # stem (3x3 convs 3-32, 32-32, 32-64 = 28,512 + BN 256) replaces the 7x7 conv 3-64 (9,408 + BN 128):
    # +19,232. ResNet-50: 25,557,032 - 2,049,000 + 19,232.
    assert mic_model.count_params(r101) == 44_549_160 - 2_049_000 + 19_232  # 42.52 M
    assert mic_model.count_params(mic_model.ResNetV1c(50)) == 25_557_032 - 2_049_000 + 19_232  # 23.53 M
    with pytest.raises(ValueError, match='unsupported ResNet depth 34'):
        mic_model.ResNetV1c(34)


def test_resnet_output_stride_8_with_dilation(r50, r101):
    assert r50.out_channels == (256, 512, 1024, 2048) and r50.feature_strides == (4, 8, 8, 8)
    with torch.no_grad():
        feats = r50.eval()(torch.randn(1, 3, 40, 56))
    assert [tuple(f.shape) for f in feats] == [(1, 256, 10, 14), (1, 512, 5, 7), (1, 1024, 5, 7), (1, 2048, 5, 7)]
    # strides (1, 2, 1, 1) in the 3x3 convs and the shortcuts; dilations (1, 1, 2, 4), the first block of
    # a dilated stage contracted to half
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].downsample[0].stride == (2, 2)
    assert r50.layer3[0].conv2.stride == (1, 1) and r50.layer4[0].downsample[0].stride == (1, 1)
    assert [b.conv2.dilation[0] for b in r50.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in r50.layer4] == [2, 4, 4]
    assert all(b.conv2.padding == b.conv2.dilation for i in range(1, 5) for b in getattr(r50, f'layer{i}'))
    assert [len(getattr(r101, f'layer{i}')) for i in range(1, 5)] == [3, 4, 23, 3]


def _bn(x, bn):
    return (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps) \
        * bn.weight[:, None, None] + bn.bias[:, None, None]


def _conv(x, conv):
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)


def test_resnet_stem_and_first_blocks_match_explicit_computation(r50):
    _randomise_bn(r50)
    r50.eval()
    x = torch.randn(2, 3, 37, 45)  # odd sizes: every stride-2 step rounds up
    with torch.no_grad():
        s = r50.stem
        h = torch.relu(_bn(F.conv2d(x, s[0].weight, stride=2, padding=1), s[1]))
        h = torch.relu(_bn(F.conv2d(h, s[3].weight, padding=1), s[4]))
        h = torch.relu(_bn(F.conv2d(h, s[6].weight, padding=1), s[7]))
        h = F.max_pool2d(h, 3, 2, 1)
        assert h.shape[2:] == (10, 12)
        for block in (r50.layer1[0], r50.layer1[1]):  # with and without the projection shortcut
            out = torch.relu(_bn(_conv(h, block.conv1), block.bn1))
            out = torch.relu(_bn(_conv(out, block.conv2), block.bn2))
            out = _bn(_conv(out, block.conv3), block.bn3)
            short = h if block.downsample is None else _bn(_conv(h, block.downsample[0]), block.downsample[1])
            h = torch.relu(out + short)
        ours = r50.layer1[1](r50.layer1[0](r50.maxpool(r50.stem(x))))
    torch.testing.assert_close(ours, h, atol=1e-4, rtol=1e-4)


def test_resnet_initialisation_and_batchnorm_mode():
    torch.manual_seed(0)
    enc = mic_model.ResNetV1c(50)
    assert all(float(b.bn3.weight.abs().max()) == 0 for i in range(1, 5) for b in getattr(enc, f'layer{i}'))
    assert torch.equal(enc.layer1[0].bn1.weight, torch.ones(64)) and torch.equal(enc.stem[1].bias, torch.zeros(32))
    w = enc.layer3[0].conv2.weight  # Kaiming normal, fan_out = 256 x 3 x 3
    assert abs(float(w.std()) - math.sqrt(2 / (256 * 9))) < 0.05 * math.sqrt(2 / (256 * 9))
    enc.train()  # BN is trained and uses batch statistics (the original's norm_eval=False, requires_grad=True)
    assert all(m.training and m.weight.requires_grad for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert enc.no_weight_decay_keys == () and mic_model.MiT('b0').no_weight_decay_keys == ('norm',)


def test_resnet_activation_checkpointing_same_grads_and_running_stats(r50):
    a = copy.deepcopy(r50).train()
    b = copy.deepcopy(r50).train()
    b.activation_checkpointing = True
    img = torch.randn(2, 3, 32, 32)
    for m in (a, b):
        sum(f.square().mean() for f in m(img)).backward()
    torch.testing.assert_close(b.layer3[2].conv2.weight.grad, a.layer3[2].conv2.weight.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(b.stem[0].weight.grad, a.stem[0].weight.grad, atol=1e-6, rtol=1e-4)
    # the recomputation in backward does not update the running statistics a second time
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    assert int(b.layer2[0].bn2.num_batches_tracked) == int(r50.layer2[0].bn2.num_batches_tracked) + 1


# --------------------------------------------------------------------------
# DeepLabV2 head
# --------------------------------------------------------------------------

def test_deeplabv2_head_is_sum_of_dilated_convs():
    torch.manual_seed(0)
    head = mic_model.DeepLabV2Head(16, 3, dilations=(1, 6, 12))
    feats = [None, None, None, torch.randn(2, 16, 20, 26)]
    expect = sum(F.conv2d(feats[3], m.conv.weight, m.conv.bias, padding=d if d > 1 else 0, dilation=d)
                 for m, d in zip(head.aspp_modules, (1, 6, 12)))
    with torch.no_grad():
        torch.testing.assert_close(head(feats), expect)
    assert head.aspp_modules[0].conv.kernel_size == (1, 1) and head.aspp_modules[2].conv.kernel_size == (3, 3)
    # the original's init: normal(0, 0.01) weights, zero biases
    big = mic_model.DeepLabV2Head(2048, 19)
    assert big.dilations == (6, 12)
    assert abs(float(big.aspp_modules[1].conv.weight.std()) - 0.01) < 5e-4
    assert float(big.aspp_modules[0].conv.bias.abs().max()) == 0


def test_config_tables_agree_with_the_model():
    assert tuple(mic_model.BACKBONES) == mic_config.BACKBONE_TYPES
    assert tuple(mic_model.HEADS) == mic_config.HEAD_TYPES
    cfg = mic_config.load_config(None, ['model.backbone.type=resnet101_v1c', 'model.decode_head.type=deeplabv2'])
    assert cfg.model.decode_head.dilations == [6, 12]  # the original's dlv2red (exp. 81)
    with pytest.raises(mic_config.ConfigError, match='model.decode_head.type'):
        mic_config.load_config(None, ['model.decode_head.type=aspp'])
    model = build_model(dlv2_cfg(type='encoder_decoder',
                                 decode_head={'type': 'deeplabv2', 'dilations': [6, 12, 18, 24]}))
    assert model.output_stride == 8 and len(model.decode_head.aspp_modules) == 4
    assert build_model({'backbone': {'type': 'mit_b0'}, 'decode_head': {'embed_dims': 32}, 'pretrained': None,
                        'hrda': {'hr_crop_size': [32, 32]}}).output_stride == 4
    with pytest.raises(ValueError, match='HRDA is implemented with the daformer and deeplabv2 heads'):
        build_model(dlv2_cfg(decode_head={'type': 'segformer'}))


def test_plain_deeplabv2_encode_decode_and_loss():
    torch.manual_seed(0)
    model = build_model(dlv2_cfg(type='encoder_decoder'))
    _randomise_bn(model)
    model.eval()
    img = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        logits = model.decode_head(model.backbone(img))
        assert logits.shape == (1, 19, 6, 8)
        up = F.interpolate(logits, size=(48, 64), mode='bilinear', align_corners=False)
        torch.testing.assert_close(model.encode_decode(img), up)
        label = torch.randint(0, 19, (1, 1, 48, 64))
        torch.testing.assert_close(model.forward_train(img, label)['loss_seg'], F.cross_entropy(up, label[:, 0]))


# --------------------------------------------------------------------------
# Parameter names and checkpoints
# --------------------------------------------------------------------------

def test_state_dict_names_follow_mmseg_layout():
    plain = build_model(dlv2_cfg(type='encoder_decoder')).state_dict()
    for k in ['backbone.stem.0.weight', 'backbone.stem.1.running_mean', 'backbone.stem.3.weight',
              'backbone.stem.7.bias', 'backbone.layer1.0.conv1.weight', 'backbone.layer1.0.bn1.weight',
              'backbone.layer1.0.bn3.num_batches_tracked', 'backbone.layer1.0.downsample.0.weight',
              'backbone.layer1.0.downsample.1.running_var', 'backbone.layer3.5.conv2.weight',
              'backbone.layer4.2.bn3.bias', 'decode_head.aspp_modules.0.conv.weight',
              'decode_head.aspp_modules.1.conv.bias']:
        assert k in plain, k
    assert not any(k.startswith('backbone.fc.') or 'layer1.1.downsample' in k for k in plain)
    assert len([k for k in plain if k.startswith('decode_head.')]) == 4
    hrda = build_model(dlv2_cfg()).state_dict()
    assert {k for k in hrda if k.startswith('decode_head.')} == {
        f'decode_head.{h}.aspp_modules.{i}.conv.{p}' for h in ('head', 'scale_attention') for i in (0, 1)
        for p in ('weight', 'bias')}


def _openmmlab_imagenet_file(path, encoder):
    """A file laid out like open-mmlab://resnet*_v1c: plain encoder keys and the ImageNet classifier fc.*;
    written by an old PyTorch, so without BatchNorm's num_batches_tracked."""
    sd = {k: v for k, v in encoder.state_dict().items() if not k.endswith('num_batches_tracked')}
    sd['fc.weight'], sd['fc.bias'] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save({'state_dict': sd, 'meta': {}}, path)


def test_load_openmmlab_imagenet_weights(tmp_path, r50):
    _randomise_bn(r50, seed=3)
    path = tmp_path / 'resnet50_v1c-2cccc1ad.pth'
    _openmmlab_imagenet_file(path, r50)
    model = build_model(dlv2_cfg(pretrained=str(path)), load_pretrained=True)
    for k, v in r50.state_dict().items():
        if not k.endswith('num_batches_tracked'):
            assert torch.equal(model.backbone.state_dict()[k], v), k
    bare = mic_model.ResNetV1c(50)
    info = load_checkpoint(bare, str(path))
    assert info == {'format': 'openmmlab_imagenet', 'ignored': ['fc.weight', 'fc.bias']}
    assert torch.equal(bare.layer4[2].bn3.running_var, r50.layer4[2].bn3.running_var)
    # saved from a DataParallel wrapper: 'module.' prefixes are stripped
    mit = mic_model.MiT('b0')
    torch.save({'module.' + k: v for k, v in mit.state_dict().items()}, tmp_path / 'wrapped.pth')
    assert load_checkpoint(mic_model.MiT('b0'), str(tmp_path / 'wrapped.pth'))['format'] == 'segformer_imagenet'


def test_load_released_uda_checkpoint_of_hrda_deeplabv2(tmp_path):
    torch.manual_seed(0)
    student = build_model(dlv2_cfg())
    _randomise_bn(student, seed=1)
    sd = {}
    other = torch.zeros(1)  # the teacher and the ImageNet copy: ignored (one small shared tensor keeps the file small)
    for k, v in student.state_dict().items():
        sd['model.' + k] = v
        sd['ema_model.' + k] = other
        if k.startswith('backbone.'):
            sd['imnet_model.' + k] = other
    torch.save({'state_dict': sd, 'meta': {'iter': 40000}}, tmp_path / 'released.pth')
    dst = build_model(dlv2_cfg())
    assert load_checkpoint(dst, str(tmp_path / 'released.pth'))['format'] == 'released_uda'
    for k, v in student.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    enc = mic_model.ResNetV1c(50)  # the encoder alone (the trainer's frozen ImageNet copy)
    assert load_checkpoint(enc, str(tmp_path / 'released.pth'))['format'] == 'released_uda'
    assert torch.equal(enc.layer3[1].bn2.running_mean, student.backbone.layer3[1].bn2.running_mean)


def test_mismatched_checkpoints_get_hints(tmp_path, r50, r101):
    _openmmlab_imagenet_file(tmp_path / 'r50.pth', r50)
    with pytest.raises(CheckpointError, match=r'stage-3 blocks \(resnet50_v1c\)'):
        load_checkpoint(r101, str(tmp_path / 'r50.pth'))
    with pytest.raises(CheckpointError, match='holds a resnet50_v1c encoder, the model a mit_b0'):
        load_checkpoint(mic_model.MiT('b0'), str(tmp_path / 'r50.pth'))
    torch.save({'student': build_model(dlv2_cfg(type='encoder_decoder')).state_dict()}, tmp_path / 'dlv2.pth')
    with pytest.raises(CheckpointError, match='model.decode_head.type=deeplabv2'):
        load_checkpoint(build_model(dlv2_cfg(type='encoder_decoder', decode_head={'type': 'daformer',
                                                                                   'embed_dims': 32})),
                        str(tmp_path / 'dlv2.pth'))


def test_missing_pretrained_files_say_where_they_come_from(tmp_path, r101):
    path = str(tmp_path / 'resnet101_v1c-e67eebb6.pth')
    with pytest.raises(FileNotFoundError) as e:
        mic_model.load_pretrained_encoder(r101, path)
    msg = str(e.value)
    assert R101_URL in msg and f'put the file at {path}' in msg
    assert 'model.pretrained=null uda.fd_lambda=0' in msg and 'not the usual file' not in msg
    # the MiT default path with a ResNet encoder: the usual file is named
    with pytest.raises(FileNotFoundError, match='not the usual file of this encoder, '
                                                'pretrained/resnet50_v1c-2cccc1ad.pth'):
        build_model(dlv2_cfg(pretrained=str(tmp_path / 'mit_b5.pth')), load_pretrained=True)
    with pytest.raises(FileNotFoundError, match=r'SegFormer.*model.pretrained=null uda.fd_lambda=0'):
        mic_model.load_pretrained_encoder(mic_model.MiT('b0'), str(tmp_path / 'mit_b0.pth'))


# --------------------------------------------------------------------------
# HRDA on DeepLabV2 (exp. 81's hrda1-512-0.1_dlv2red)
# --------------------------------------------------------------------------

def _upsample2x(x):
    """Bilinear x2, align_corners=False, written out: out[i] samples in[(i + 0.5) / 2 - 0.5]."""
    h, w = x.shape[-2:]

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


def test_hrda_deeplabv2_training_fusion_by_hand():
    torch.manual_seed(0)
    model = build_model(dlv2_cfg(hrda={'hr_crop_size': [32, 32], 'fixed_attention': 0.3}))
    assert model.output_stride == 8 and model.size_divisor == 16 and model.decode_head.scale_attention is None
    img, label = torch.randn(1, 3, 64, 64), torch.randint(0, 19, (1, 1, 64, 64))
    box = (16, 48, 32, 64)  # corners divisible by 16: whole context cells
    out = model.forward_train(img, label, hr_crop_box=box, return_logits=True, return_feat=True)
    with torch.no_grad():
        ctx = model.decode_head.head(model.backbone(F.interpolate(img, scale_factor=0.5, mode='bilinear',
                                                                          align_corners=False)))  # 4x4
        detail = model.decode_head.head(model.backbone(img[:, :, 16:48, 32:64]))  # 4x4 at stride 8
        att = torch.zeros(1, 1, 4, 4)
        att[:, :, 1:3, 2:4] = 0.3  # the box at stride 16
        inserted = torch.zeros(1, 19, 8, 8)
        inserted[:, :, 2:6, 4:8] = detail  # the box at stride 8
        fused = _upsample2x(att) * inserted + _upsample2x((1 - att) * ctx)
    assert out['logits'].shape == (1, 19, 8, 8)
    torch.testing.assert_close(out['logits'], fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out['loss_seg'], 0.9 * mic_model.seg_loss(fused, label), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out['loss_seg_hr'], 0.1 * mic_model.seg_loss(detail, label[:, :, 16:48, 32:64]),
                               atol=1e-5, rtol=1e-5)
    assert [tuple(f.shape) for f in out['features']] == [(1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 4, 4),
                                                         (1, 2048, 4, 4)]
    with pytest.raises(ValueError, match='divisible by 16'):
        model.forward_train(torch.randn(1, 3, 56, 64), torch.zeros(1, 1, 56, 64, dtype=torch.long))


def test_hrda_deeplabv2_encode_decode_equals_hand_assembly():
    torch.manual_seed(0)
    model = build_model(dlv2_cfg())
    _randomise_bn(model)
    model.eval()
    img = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        total, count = torch.zeros(1, 19, 6, 8), torch.zeros(6, 8)
        for y1, y2, x1, x2 in mic_model.slide_boxes(48, 64, (32, 32), (16, 16)):
            win = model.decode_head.head(model.backbone(img[:, :, y1:y2, x1:x2]))
            total[:, :, y1 // 8:y2 // 8, x1 // 8:x2 // 8] += win
            count[y1 // 8:y2 // 8, x1 // 8:x2 // 8] += 1
        assert_close(model.detail_logits_slide(img), total / count)
        feats = model.backbone(F.interpolate(img, scale_factor=0.5, mode='bilinear', align_corners=False))
        ctx = model.decode_head.head(feats)  # 3x4
        att = torch.sigmoid(model.decode_head.scale_attention(feats))
        assert att.shape == ctx.shape == (1, 19, 3, 4)  # class-wise attention from a second DeepLabV2 head
        expect = _upsample2x(att) * (total / count) + _upsample2x((1 - att) * ctx)
        expect = F.interpolate(expect, size=(48, 64), mode='bilinear', align_corners=False)
        assert_close(model.encode_decode(img), expect)
        assert model.encode_decode(torch.randn(1, 3, 40, 56)).shape == (1, 19, 40, 56)  # padded to 48x64


def test_hrda_deeplabv2_random_boxes_and_crop_size_check():
    model = build_model(dlv2_cfg())
    for _ in range(20):  # the original keeps crop_coord_divisible 8 with DeepLabV2
        y1, y2, x1, x2 = model.random_crop_box(64, 96)
        assert y1 % 8 == 0 and x1 % 8 == 0 and y2 <= 64 and x2 <= 96 and (y2 - y1, x2 - x1) == (32, 32)
    # the config check names the key (context stride 16 with DeepLabV2's output stride 8)
    with pytest.raises(ValueError, match=r"'model.hrda.hr_crop_size': \[36, 36\] must be divisible by 16"):
        build_model(dlv2_cfg(hrda={'hr_crop_size': [36, 36]}))
