"""MIC's segmentation models in plain PyTorch: the MiT, ResNet-V1c and DINOv2 encoders, the DAFormer,
SegFormer, DeepLabV2 and VFM-UDA decoders, the HRDA multi-resolution segmentor, inference and checkpoint
loading.

    import mic_model, mic_train
    cfg = mic_train.load_config('configs/gta2cs.yaml')
    model = mic_model.build_model(cfg.model)                   # random init
    mic_model.load_checkpoint(model, 'work_dirs/RUN/latest.pth')  # ours, released MIC, ImageNet encoders
    logits = model.inference(img)                              # img: [B,3,H,W] normalised -> [B,19,H,W]

    python mic_model.py --cfg configs/gta2cs.yaml              # prints the architecture's parameter counts

Parameter names follow the mmsegmentation layout of the original checkpoints
(backbone.block1.0.attn.q.weight, backbone.layer1.0.conv1.weight,
decode_head.head.fuse_layer.bottleneck.conv.weight, decode_head.aspp_modules.0.conv.weight, ...),
so released weights load without conversion. Encoders and heads are small factories in the
BACKBONES and HEADS tables. This file imports only torch.
"""
import argparse
import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = 255

# --------------------------------------------------------------------------
# MiT encoder (SegFormer's Mix Transformer)
# --------------------------------------------------------------------------

MIT_VARIANTS = {
    'b0': dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    'b1': dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    'b2': dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    'b3': dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    'b4': dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    'b5': dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
MIT_HEADS = (1, 2, 5, 8)
MIT_SR_RATIOS = (8, 4, 2, 1)  # spatial reduction of keys/values per stage
MIT_MLP_RATIO = 4


def tokens_to_map(x, H, W):
    """[B,N,C] tokens -> [B,C,H,W] map without a copy: tokens are the map in channels-last memory."""
    B, N, C = x.shape
    return x.view(B, H, W, C).permute(0, 3, 1, 2)


def map_to_tokens(x):
    """[B,C,H,W] map -> [B,N,C] tokens (free for channels-last maps, e.g. conv outputs of tokens_to_map)."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples with probability p."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f'p={self.p}'


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm: [B,Cin,H,W] -> [B,N,C]."""

    def __init__(self, in_chans, embed_dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5, as in SegFormer (only the blocks use 1e-6)

    def forward(self, x):
        x = self.proj(x)
        H, W = x.shape[2:]
        return self.norm(map_to_tokens(x)), H, W


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a map reduced sr x sr."""

    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5

    def forward(self, x, H, W):
        B, N, C = x.shape
        nh, hd = self.num_heads, C // self.num_heads
        q = self.q(x).view(B, N, nh, hd).transpose(1, 2)  # (B, nh, N, hd)
        if self.sr_ratio > 1:
            x = self.norm(map_to_tokens(self.sr(tokens_to_map(x, H, W))))  # (B, M, C), M = N / sr^2
        k, v = self.kv(x).view(B, -1, 2, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, M, hd) each
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DWConv(nn.Module):
    """Depthwise 3x3 conv on the token map: the 'Mix' of Mix-FFN."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        # The weight [dim,1,3,3] gets the strides its gradient has on channels-last maps (the same memory
        # order: dim 1 has size 1): DDP copies a gradient whose strides differ from its parameter's.
        w = self.dwconv.weight
        self.dwconv.weight = nn.Parameter(w.detach().as_strided(w.shape, (9, 1, 3, 1)))

    def forward(self, x, H, W):
        return map_to_tokens(self.dwconv(tokens_to_map(x, H, W)))


class MixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * MIT_MLP_RATIO)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class MiT(nn.Module):
    """Mix Transformer encoder. forward(x [B,3,H,W]) -> 4 maps [B,C_i,H/s_i,W/s_i], s = 4, 8, 16, 32."""

    feature_strides = (4, 8, 16, 32)  # input pixels per position of each stage's map
    no_weight_decay_keys = ('norm',)  # the original's paramwise 'norm' key: every LayerNorm gets weight decay 0
    classifier_prefix = 'head.'  # SegFormer's ImageNet classifier in mit_b*.pth, dropped when loading

    def __init__(self, variant='b5', drop_path_rate=0.1):
        super().__init__()
        variant = variant.removeprefix('mit_')
        if variant not in MIT_VARIANTS:
            raise ValueError(f'unknown MiT variant {variant!r}; choose one of '
                             f'{", ".join("mit_" + v for v in MIT_VARIANTS)}')
        self.variant = variant
        self.embed_dims = MIT_VARIANTS[variant]['embed_dims']
        self.out_channels = self.embed_dims  # channels of each stage's map
        self.default_pretrained = f'pretrained/mit_{variant}.pth'  # the usual model.pretrained of this encoder
        self.depths = MIT_VARIANTS[variant]['depths']
        self.activation_checkpointing = False
        rates = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        in_chans = 3
        for i, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f'patch_embed{i + 1}', OverlapPatchEmbed(in_chans, dim, patch, stride))
            start = sum(self.depths[:i])
            setattr(self, f'block{i + 1}', nn.ModuleList(
                Block(dim, MIT_HEADS[i], MIT_SR_RATIOS[i], rates[start + j]) for j in range(depth)))
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dim, eps=1e-6))
            in_chans = dim
        self.apply(_init_mit_weights)

    def pretrained_help(self, path):
        """Where the ImageNet weights of this encoder come from (for the missing-file message)."""
        return (f'Download mit_{self.variant}.pth (ImageNet-1k) from SegFormer (https://github.com/NVlabs/SegFormer'
                f'#training, "Download" link of the ImageNet-1K pretrained weights) and put the file at {path}')

    def forward(self, x):
        if min(x.shape[2:]) < 32:  # stage 1 reduces its keys/values 8x8 from a map at stride 4
            raise ValueError(f'MiT needs inputs of at least 32x32 pixels, got {tuple(x.shape[2:])}')
        outs = []
        x = x.contiguous(memory_format=torch.channels_last)  # every map here is channels-last (= token order)
        for i in range(1, 5):
            x, H, W = getattr(self, f'patch_embed{i}')(x)
            for blk in getattr(self, f'block{i}'):
                if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(blk, x, H, W, use_reentrant=False)
                else:
                    x = blk(x, H, W)
            x = tokens_to_map(getattr(self, f'norm{i}')(x), H, W)
            outs.append(x)
        return outs


def _init_mit_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------
# ResNet-V1c encoder (DeepLabV2's, as in mmsegmentation's -d8 configs)
# --------------------------------------------------------------------------

RESNET_STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # bottleneck blocks per stage
RESNET_V1C_URLS = {  # OpenMMLab's ImageNet weights, what the original's open-mmlab://resnet{50,101}_v1c load
    50: 'https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth',
    101: 'https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth',
}


class Bottleneck(nn.Module):
    """1x1 conv (reduce) -> 3x3 conv (stride, dilation) -> 1x1 conv (expand x4), each followed by BN,
    ReLU after the first two and after the sum with the shortcut: the input, or `downsample`
    (1x1 conv with the block's stride + BN) where the shape changes. [B,Cin,H,W] -> [B,4P,H/s,W/s]."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut, inplace=True)


def _recompute_without_bn_updates(module):
    """context_fn for checkpoint(): when backward recomputes `module`, its BatchNorm layers normalise
    with the batch statistics as in the forward pass, and their running statistics (already updated
    once by the forward pass) are put back as they were afterwards."""

    @contextlib.contextmanager
    def restored_stats():
        buffers = [b for m in module.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)
    return lambda: (contextlib.nullcontext(), restored_stats())


class ResNetV1c(nn.Module):
    """ResNet-V1c with dilated stages: forward(x [B,3,H,W]) -> 4 maps [B,256,H/4,W/4], [B,512,H/8,W/8],
    [B,1024,H/8,W/8], [B,2048,H/8,W/8] (with the default strides and dilations).

    V1c: ResNet-V1b (the stride sits in the bottleneck's 3x3 conv) whose 7x7 stem conv is replaced by
    three 3x3 convs (32, 32, 64 channels, the first with stride 2), then a 3x3 max-pool with stride 2.
    Strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) per stage give output stride 8, as DeepLabV2 in the
    original (configs/_base_/models/deeplabv2_r50-d8.py); contract_dilation: the first block of a dilated
    stage uses half the stage's dilation. BatchNorm everywhere, trained and in train mode like the
    rest of the model (the original's norm_cfg BN with requires_grad=True, norm_eval=False).
    """

    no_weight_decay_keys = ()  # the original adds its 'norm' key for MiT encoders only: BN gets weight decay
    classifier_prefix = 'fc.'  # the ImageNet classifier in OpenMMLab's resnet*_v1c checkpoints, dropped

    def __init__(self, depth=101, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True):
        super().__init__()
        if depth not in RESNET_STAGE_BLOCKS:
            raise ValueError(f'unsupported ResNet depth {depth}; choose one of {sorted(RESNET_STAGE_BLOCKS)}')
        self.depth = depth
        self.default_pretrained = 'pretrained/' + RESNET_V1C_URLS[depth].rsplit('/', 1)[1]  # usual model.pretrained
        self.activation_checkpointing = False
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stride, out_channels, feature_strides = 64, 4, [], []
        for i, (n, s, d) in enumerate(zip(RESNET_STAGE_BLOCKS[depth], strides, dilations)):
            planes = 64 * 2 ** i
            cout = planes * Bottleneck.expansion
            downsample = None
            if s != 1 or cin != cout:
                downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))
            first_dilation = d // 2 if contract_dilation and d > 1 else d
            blocks = [Bottleneck(cin, planes, s, first_dilation, downsample)]
            blocks += [Bottleneck(cout, planes, 1, d) for _ in range(n - 1)]
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
            cin, stride = cout, stride * s
            out_channels.append(cout)
            feature_strides.append(stride)
        self.out_channels = tuple(out_channels)  # channels of each stage's map
        self.feature_strides = tuple(feature_strides)  # input pixels per position of each stage's map
        self.apply(_init_resnet_weights)
        for m in self.modules():  # each residual branch starts at zero (mmcv's zero_init_residual)
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def pretrained_help(self, path):
        """Where the ImageNet weights of this encoder come from (for the missing-file message)."""
        url = RESNET_V1C_URLS[self.depth]
        return (f'Download {url} (OpenMMLab\'s ImageNet ResNet-{self.depth}-V1c, what the original loads as '
                f'open-mmlab://resnet{self.depth}_v1c) and put the file at {path}')

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(1, 5):
            for block in getattr(self, f'layer{i}'):
                if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False, context_fn=_recompute_without_bn_updates(block))
                else:
                    x = block(x)
            outs.append(x)
        return outs


def _init_resnet_weights(m):
    """mmcv's ResNet initialisation without pretrained weights: Kaiming (fan_out) convs, BN 1 / 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------
# DINOv2 ViT encoder (facebookresearch/dinov2), with a simple feature pyramid for the decoders
# --------------------------------------------------------------------------

DINOV2_VARIANTS = {  # the hub models of facebookresearch/dinov2 (hub/backbones.py, models/vision_transformer.py)
    'vits14': dict(embed_dim=384, depth=12, num_heads=6, ffn='mlp', hf='small'),
    'vitb14': dict(embed_dim=768, depth=12, num_heads=12, ffn='mlp', hf='base'),
    'vitl14': dict(embed_dim=1024, depth=24, num_heads=16, ffn='mlp', hf='large'),
    'vitg14': dict(embed_dim=1536, depth=40, num_heads=24, ffn='swiglu', hf='giant'),  # 'vit_giant2'
}
DINOV2_REGISTERS = 4  # register tokens of the *_reg models (Darcet et al., "Vision Transformers Need Registers")
DINOV2_PATCH = 14
DINOV2_IMG_SIZE = 518  # pretraining size of the released weights: a 37x37 grid of position embeddings
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2'
# VFM-UDA (tue-mps/vfm-uda, VITLightweightHead) resizes every input by 1.1 and floors the sides to a
# multiple of the patch: a 1024 crop becomes 1120 pixels, 80x80 tokens.
VFM_UDA_INPUT_SCALE = 1.1


def swiglu_hidden(dim, mlp_ratio=4):
    """Hidden width of the official SwiGLU FFN (SwiGLUFFNFused): 2/3 of the MLP's, rounded up to 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B,C,H,W] map (timm's LayerNorm2d, eps 1e-6)."""

    def __init__(self, channels):
        super().__init__(channels, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ViTAttention(nn.Module):
    """Global multi-head self-attention with a fused qkv projection: [B,N,C] -> [B,N,C]."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        nh, hd = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd) each
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT); DINOv2's hub models start it at 1.0."""

    def __init__(self, dim, init_value=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


class ViTMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """ViT-g's FFN: w12 projects to [gate | value] (in that order), silu(gate) * value, w3 back."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class ViTBlock(nn.Module):
    """Pre-norm transformer block with layer scale: [B,N,C] -> [B,N,C] (LayerNorm eps 1e-6)."""

    def __init__(self, dim, num_heads, ffn, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLUFFN(dim, swiglu_hidden(dim)) if ffn == 'swiglu' else ViTMlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv: [B,3,H,W] -> [B,(H/p)(W/p),C] (sides multiples of p)."""

    def __init__(self, embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022) on token maps of stride p (14):
    maps [B,C,h,w] x 4 -> [B,C/4,4h,4w], [B,C/2,2h,2w], [B,C,h,w], [B,C,h/2,w/2]
    (two 2x transposed convs with LayerNorm + GELU between; one; identity; 2x2 max-pool)."""

    def __init__(self, dim):
        super().__init__()
        self.up4_1 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.up4_norm = LayerNorm2d(dim // 2)  # 'norm' in its name: no weight decay (DINOv2's keys)
        self.up4_2 = nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.pool = nn.MaxPool2d(2)
        self.out_channels = (dim // 4, dim // 2, dim, dim)

    def forward(self, maps):
        a, b, c, d = maps
        # a frozen pyramid (freeze_pyramid: the head reads the token grid) gives its upsampled maps
        # without a graph: they only size the outputs, and would hold their activations until backward
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.up2.weight.requires_grad):
            up4, up2 = self.up4_2(F.gelu(self.up4_norm(self.up4_1(a)))), self.up2(b)
        return [up4, up2, c, self.pool(d)]


class EncoderMaps(list):
    """The 4 maps of an encoder (a list) plus `tokens`: a ViT's last-block token grid [B,C,h,w] as it
    is, before the pyramid resizes it (what VFM-UDA's head upsamples); None for other encoders."""
    tokens = None


class DINOv2(nn.Module):
    """DINOv2 ViT (Oquab et al., 2023) as a segmentation encoder.

    forward_tokens(img [B,3,H,W], masks [B,h*w] bool or None) -> [B, 1+R+h*w, C]: final-normed tokens
        (class, R registers, patches in row-major order), h, w = H/14, W/14: the official model's
        forward_features (x_norm_*). The sides must be multiples of 14, as there.
    forward(img [B,3,H,W]) -> 4 maps [B,C_i,ceil(H/s),ceil(W/s)], s = 4, 8, 16, 32, C_i = C/4, C/2, C, C
        (an EncoderMaps list whose .tokens is the last block's unresized map [B,C,h,w]).
    Token masking (MIC on tokens, VFM-UDA's): while token_mask_ratio > 0 (set by the token_masking context
        manager) a training forward replaces each patch embedding by mask_token with that probability,
        drawn from the torch RNG per forward (an HRDA context and detail view each get their own draw).

    Sides that are not multiples of 14 are resized, as VFM-UDA does (tue-mps/vfm-uda, bilinear, not padded):
    forward scales the input by input_scale (VFM-UDA's 1.1) and floors each side to a multiple of 14
    (a 1024 crop runs as 1120 pixels, 80x80 tokens); input_scale=1.0 keeps multiples of 14 as they are.
    Padding would put tokens of black pixels into every attention; a resize keeps all tokens on the image.

    The maps: the tokens after the blocks at 1/4, 1/2, 3/4 and the whole depth (blocks 3, 6, 9, 12 of 12;
    indices 2, 5, 8, 11), each normed by the final LayerNorm (as the official get_intermediate_layers
    with norm=True), turned into maps at stride 14, then ViTDet's simple pyramid: 1/4 depth upsampled 4x,
    1/2 depth 2x, the last block as it is (the map VFM-UDA's head reads), 3/4 depth max-pooled 2x; each
    is then resized bilinearly to ceil(H/s) x ceil(W/s) of the input, the strides the decoders and HRDA
    assume. Parameter names are those of the official checkpoints (cls_token, pos_embed, mask_token,
    register_tokens, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1|w12, mlp.fc2|w3, ls2.gamma}, norm); the pyramid (pyramid.*) is not part of them.
    """

    feature_strides = (4, 8, 16, 32)
    # weight decay 0 for every norm, bias, layer scale, token and position embedding (1-D or token
    # parameters, the usual ViT rule of timm and BEiT)
    no_weight_decay_keys = ('norm', 'bias', '.gamma', 'cls_token', 'register_tokens', 'mask_token', 'pos_embed')
    classifier_prefix = 'head.'  # the official files hold no classifier; kept for the loader's interface
    not_pretrained_prefix = 'pyramid.'  # trained from scratch: absent from the DINOv2 files

    def __init__(self, embed_dim=768, depth=12, num_heads=12, ffn='mlp', num_register_tokens=0,
                 img_size=DINOV2_IMG_SIZE, drop_path_rate=0.0, input_scale=VFM_UDA_INPUT_SCALE, name=None):
        super().__init__()
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, DINOV2_PATCH
        self.num_register_tokens = num_register_tokens
        self.input_scale = input_scale
        self.name = name or f'dinov2 C={embed_dim} depth={depth}'
        self.grid = img_size // DINOV2_PATCH  # M: the position embeddings form an M x M grid
        # The hub builds the register models with interpolate_antialias=True, interpolate_offset=0.0
        # and the others with False, 0.1 (hub/backbones.py): see interpolate_pos_embed.
        self.pos_embed_antialias = num_register_tokens > 0
        self.patch_embed = PatchEmbed(embed_dim, DINOV2_PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(ViTBlock(embed_dim, num_heads, ffn, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pyramid = SimplePyramid(embed_dim)
        self.out_channels = self.pyramid.out_channels
        self.out_indices = tuple(depth * (i + 1) // 4 - 1 for i in range(4))  # 2, 5, 8, 11 for depth 12
        self.num_layers = depth + 1  # layer_id: 0 = embeddings, 1..depth = blocks (the last with norm, pyramid)
        self.activation_checkpointing = False
        self.token_mask_ratio = 0.0  # set by token_masking() around the student's masked pass only
        self.default_pretrained = None  # set by build_dinov2 for the released variants
        self._init_weights()

    def _init_weights(self):
        """The official init (trunc-normal 0.02 linears and position embeddings, tiny tokens)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pretrained_help(self, path):
        """Where the weights of this encoder come from (for the missing-file message)."""
        return getattr(self, '_pretrained_help', 'DINOv2 weights exist for the dinov2_* model.backbone.types '
                                                 'only') + f', and put the file at {path}'

    def layer_id(self, name):
        """Depth of a parameter for layer-wise lr decay (lr x decay ** (num_layers - 1 - layer_id)): 0 for
        the patch embedding and the tokens, i + 1 for block i; the final norm and the pyramid share the last
        block's, num_layers - 1 ('backbone.' is optional). So the last block trains at the encoder's lr
        and the stems at decay ** depth, as VFM-UDA's groups (there the final norm sits with the stems)."""
        name = name.removeprefix('backbone.')
        if name.startswith(('cls_token', 'pos_embed', 'mask_token', 'register_tokens', 'patch_embed.')):
            return 0
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        if name.startswith(('norm.', 'pyramid.')):
            return self.depth
        raise KeyError(f'{name!r} is not a parameter of the DINOv2 encoder')

    # -- tokens --------------------------------------------------------------
    def interpolate_pos_embed(self, h, w, dtype):
        """Position embeddings [1, 1+h*w, C] of an h x w token grid, computed as the official model does:
        none for the native M x M grid; else bicubic in float32 from M x M, with scale factors
        ((h+0.1)/M, (w+0.1)/M) and no antialiasing (no-register models), or to size (h, w) with
        antialiasing (register models), then cast to the tokens' dtype."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        pos = self.pos_embed.float()
        M, C = self.grid, pos.shape[-1]
        grid = pos[:, 1:].reshape(1, M, M, C).permute(0, 3, 1, 2)
        if self.pos_embed_antialias:
            grid = F.interpolate(grid, size=(h, w), mode='bicubic', antialias=True)
        else:  # the official 0.1 offset (a work-around from facebookresearch/dino, kept for its weights)
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode='bicubic')
        assert grid.shape[2:] == (h, w), (grid.shape, h, w)
        return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, C)), dim=1).to(dtype)

    def prepare_tokens(self, img, masks=None):
        """[B,3,H,W] (sides multiples of 14) -> [B, 1+R+h*w, C]: patch embeddings (masked ones replaced
        by mask_token), class token, position embeddings, then the registers (which have none)."""
        H, W = img.shape[2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f'DINOv2 tokens need sides that are multiples of {self.patch_size}, got {H}x{W} '
                             '(forward() resizes; see DINOv2.prepare_input)')
        x = self.patch_embed(img)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def run_blocks(self, x, keep=()):
        """All blocks on tokens [B,N,C]; returns (output, [outputs of the blocks whose index is in keep])."""
        kept = []
        for i, blk in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in keep:
                kept.append(x)
        return x, kept

    def forward_tokens(self, img, masks=None):
        x, _ = self.run_blocks(self.prepare_tokens(img, masks))
        return self.norm(x)

    # -- maps for the decoders ---------------------------------------------
    def prepare_input(self, img):
        """VFM-UDA's input resize: each side x input_scale, floored to a multiple of 14 (at least 14)."""
        p = self.patch_size
        size = tuple(max(int((s * self.input_scale) // p * p), p) for s in img.shape[2:])
        return img if size == tuple(img.shape[2:]) else resize(img, size)

    def random_token_masks(self, batch, num_tokens, device):
        """[B, h*w] bool, True with probability token_mask_ratio (VFM-UDA's Bernoulli per token)."""
        return torch.rand((batch, num_tokens), device=device) < self.token_mask_ratio

    def forward(self, img):
        H, W = img.shape[2:]
        x = self.prepare_input(img)
        h, w = (s // self.patch_size for s in x.shape[2:])
        masks = None
        if self.token_mask_ratio > 0 and self.training:
            masks = self.random_token_masks(x.shape[0], h * w, x.device)
        _, kept = self.run_blocks(self.prepare_tokens(x, masks), keep=self.out_indices)
        skip = 1 + self.num_register_tokens
        maps = [tokens_to_map(self.norm(t)[:, skip:], h, w) for t in kept]
        tokens = maps[3]
        maps = self.pyramid([maps[0], maps[1], maps[3], maps[2]])  # the last block at stride 16, see above
        sizes = [(-(-H // s), -(-W // s)) for s in self.feature_strides]  # ceil(H/s), ceil(W/s)
        out = EncoderMaps(m if tuple(m.shape[2:]) == size else resize(m, size) for m, size in zip(maps, sizes))
        out.tokens = tokens
        return out

    def freeze_pyramid(self):
        """For a head that reads only the token grid: the pyramid's convs feed nothing trained, so
        they get no gradient (DDP refuses parameters that take part in no loss) and build no graph."""
        self.pyramid.requires_grad_(False)


@contextlib.contextmanager
def token_masking(model, ratio):
    """Token masking in the ViT encoders of `model` (a segmentor, unwrapped) for the duration:
    MIC's masked pass with uda.mask_type=token. Teachers are other modules and stay unmasked."""
    encoders = [m for m in model.modules() if hasattr(m, 'token_mask_ratio')]
    if not encoders:
        raise ValueError('token masking needs a ViT encoder with a mask token (DINOv2)')
    for m in encoders:
        m.token_mask_ratio = ratio
    try:
        yield
    finally:
        for m in encoders:
            m.token_mask_ratio = 0.0


def dinov2_spec(backbone_type):
    """('vitb14', number of registers) of a model.backbone.type such as 'dinov2_vitb14_reg'."""
    name = backbone_type.removeprefix('dinov2_')
    variant, registers = name.removesuffix('_reg'), DINOV2_REGISTERS if name.endswith('_reg') else 0
    if variant not in DINOV2_VARIANTS:
        raise ValueError(f'unknown DINOv2 variant {backbone_type!r}; choose one of '
                         f'{", ".join(DINOV2_BACKBONE_TYPES)}')
    return variant, registers


def dinov2_file_name(variant, registers):
    """The official checkpoint's file name, e.g. dinov2_vitb14_reg4_pretrain.pth."""
    return f'dinov2_{variant}{f"_reg{registers}" if registers else ""}_pretrain.pth'


def build_dinov2(cfg_backbone):
    """A released DINOv2 model (drop path 0, as VFM-UDA; model.backbone.drop_path_rate is MiT's)."""
    variant, registers = dinov2_spec(cfg_backbone['type'])
    v = DINOV2_VARIANTS[variant]
    model = DINOv2(v['embed_dim'], v['depth'], v['num_heads'], v['ffn'], registers, name=cfg_backbone['type'])
    file = dinov2_file_name(variant, registers)
    hf = f'https://huggingface.co/facebook/dinov2-{"with-registers-" if registers else ""}{v["hf"]}'
    model.default_pretrained = f'pretrained/{file}'
    model._pretrained_help = (f'Download {DINOV2_URL}/dinov2_{variant}/{file} (the official {cfg_backbone["type"]}, '
                              f'facebookresearch/dinov2) or model.safetensors / pytorch_model.bin of {hf}')
    return model


DINOV2_BACKBONE_TYPES = tuple(f'dinov2_{v}{r}' for r in ('', '_reg') for v in DINOV2_VARIANTS)


# --------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------

def resize(x, size=None, scale_factor=None):
    """Bilinear resize with align_corners=False (the convention of every resize here)."""
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode='bilinear', align_corners=False)


def decoder_layout(x):
    """x in the memory layout the decoders' convolutions are fastest with on its device.

    The encoder keeps its maps channels-last (the token order). On the CPU, oneDNN's dilated
    depthwise 3x3 convolutions of the ASPP and the 3x3 bottleneck are several times slower on
    channels-last input than on contiguous NCHW (the DAFormer head's forward + backward: 23 s
    vs 9 s for MiT-b0 maps of two 512x512 crops, BENCHMARKS.md section 8), so the CPU gets NCHW;
    on other devices the maps stay as they are (no GPU measurement yet says otherwise).
    """
    return x.contiguous() if x.device.type == 'cpu' else x


class ConvBNReLU(nn.Module):
    """conv (no bias) + BatchNorm + ReLU, named like mmcv's ConvModule (.conv, .bn)."""

    def __init__(self, cin, cout, kernel_size, padding=0, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, cin, cout, dilation):
        super().__init__()
        self.depthwise_conv = ConvBNReLU(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvBNReLU(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPP(nn.Module):
    """DAFormer's fusion: depthwise-separable ASPP (no image pooling) + 3x3 bottleneck."""

    def __init__(self, cin, channels, dilations=(1, 6, 12, 18)):
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(cin, channels, 1) if d == 1 else DepthwiseSeparableConv(cin, channels, d)
            for d in dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x):
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class TokenEmbed(nn.Module):
    """Linear embedding of every position of a map: [B,C,H,W] -> [B,E,H,W]."""

    def __init__(self, cin, embed_dim):
        super().__init__()
        self.proj = nn.Linear(cin, embed_dim)

    def forward(self, x):  # in the decoders' layout already, so that their concatenation needs no copy
        return decoder_layout(tokens_to_map(self.proj(map_to_tokens(x)), *x.shape[2:]))


class DAFormerHead(nn.Module):
    """Embed the 4 encoder maps, resize to stride 4, concatenate, fuse, classify.

    fusion 'aspp': the segmentation head (context-aware fusion);
    fusion 'conv1x1': HRDA's scale-attention head.
    """

    logits_stage = 0  # the logits have the resolution of the first encoder map

    def __init__(self, in_channels, num_classes, embed_dims=256, fusion='aspp', dropout=0.1):
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): TokenEmbed(c, embed_dims) for i, c in enumerate(in_channels)})
        cat_dims = embed_dims * len(in_channels)
        if fusion == 'aspp':
            self.fuse_layer = SepASPP(cat_dims, embed_dims)
        elif fusion == 'conv1x1':
            self.fuse_layer = ConvBNReLU(cat_dims, embed_dims, 1)
        else:
            raise ValueError(f'unknown fusion {fusion!r}')
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(embed_dims, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = [self.embed_layers[str(i)](f) for i, f in enumerate(feats)]
        x = torch.cat([e if e.shape[2:] == size else resize(e, size) for e in x], dim=1)  # frees the parts
        return self.conv_seg(self.dropout(self.fuse_layer(x)))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (an option; the paper uses DAFormerHead)."""

    logits_stage = 0

    def __init__(self, in_channels, num_classes, embed_dims=768, dropout=0.1):
        super().__init__()
        self.linear_c = nn.ModuleDict({str(i): TokenEmbed(c, embed_dims) for i, c in enumerate(in_channels)})
        self.linear_fuse = ConvBNReLU(embed_dims * len(in_channels), embed_dims, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dims, num_classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = [self.linear_c[str(i)](f) for i, f in enumerate(feats)]
        x = torch.cat([e if e.shape[2:] == size else resize(e, size) for e in x], dim=1)  # frees the parts
        return self.linear_pred(self.dropout(self.linear_fuse(x)))


class ClassifierConv(nn.Module):
    """A conv with bias and nothing after it, named like mmcv's ConvModule without norm (.conv)."""

    def __init__(self, cin, cout, dilation):
        super().__init__()
        kernel, padding = (1, 0) if dilation == 1 else (3, dilation)
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation)

    def forward(self, x):
        return self.conv(x)


class DeepLabV2Head(nn.Module):
    """DeepLabV2's ASPP classifier: dilated 3x3 convs from the last encoder map straight to the classes,
    summed. [B,C,h,w] -> [B,K,h,w] (no norm, no activation, no dropout).

    The UDA literature, and the original's 'dlv2red' (Table 1), use dilations (6, 12) only: AdaptSegNet's
    classifier returns inside its loop over (6, 12, 18, 24). Weights normal(0, 0.01), biases 0.
    """

    logits_stage = -1  # the logits have the resolution of the last encoder map

    def __init__(self, in_channels, num_classes, dilations=(6, 12)):
        super().__init__()
        self.dilations = tuple(dilations)
        self.aspp_modules = nn.ModuleList(ClassifierConv(in_channels, num_classes, d) for d in self.dilations)
        for m in self.aspp_modules:
            nn.init.normal_(m.conv.weight, 0, 0.01)
            nn.init.zeros_(m.conv.bias)

    def forward(self, feats):
        x = feats[-1]
        out = self.aspp_modules[0](x)
        for m in self.aspp_modules[1:]:
            out = out + m(x)
        return out


class VFMUDAHead(nn.Module):
    """VFM-UDA's light head (tue-mps/vfm-uda, VITLightweightHead) on the last block's token grid:
    [B,C,h,w] -> 2x transposed conv to C/2, LayerNorm2d, GELU, 2x transposed conv to C/4,
    LayerNorm2d, 3x3 conv, LayerNorm2d, 1x1 classifier -> [B,K,4h,4w] (convs without bias, the
    classifier's weights normal(0, 0.1), as there), then resized bilinearly to the first map's size,
    so that the logits sit at stride 4 like the DAFormer head's (HRDA and the loss assume it).

    It reads the encoder's unresized grid (EncoderMaps.tokens: 80x80 tokens of a 1024 crop ->
    320x320 logits -> 256x256, as VFM-UDA upsamples then resizes), else the map at stride 16
    (encoders without a token grid). Its encoder's pyramid is then unused: build_model freezes it.
    """

    logits_stage = 0
    in_index = 2  # the map at stride 16
    reads_tokens = True

    def __init__(self, in_channels, num_classes):
        super().__init__()
        c = in_channels[self.in_index]
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, 2, bias=False), LayerNorm2d(c // 2), nn.GELU(),
            nn.ConvTranspose2d(c // 2, c // 4, 2, 2, bias=False), LayerNorm2d(c // 4),
            nn.Conv2d(c // 4, c // 4, 3, padding=1, bias=False), LayerNorm2d(c // 4))
        self.out = nn.Conv2d(c // 4, num_classes, 1, bias=False)
        nn.init.normal_(self.out.weight, 0, 0.1)

    def forward(self, feats):
        x = getattr(feats, 'tokens', None)
        logits = self.out(self.upscale(feats[self.in_index] if x is None else x))
        size = feats[0].shape[2:]
        return logits if logits.shape[2:] == size else resize(logits, size)


# --------------------------------------------------------------------------
# Loss and sliding windows
# --------------------------------------------------------------------------

def seg_loss(logits, label, weight=None, ignore_index=IGNORE_INDEX):
    """Pixel-wise cross-entropy, mean over ALL pixels (ignored ones contribute 0).

    logits [B,K,h,w] (resized bilinearly to the label size), label [B,1,H,W] or [B,H,W],
    weight None or [B,H,W] per-pixel weights.
    """
    if label.dim() == 4:
        label = label.squeeze(1)
    logits = resize(logits.float(), label.shape[-2:])  # the loss is computed in float32
    loss = F.cross_entropy(logits, label.long(), ignore_index=ignore_index, reduction='none')
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def slide_boxes(height, width, crop, stride):
    """Window boxes (y1, y2, x1, x2) covering the image; the last row/column is shifted inside."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def crop_windows(img, boxes):
    """[B,C,H,W] -> [N*B,C,h,w], window-major (all images of window 0 first)."""
    return torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], dim=0)


def stitch_windows(logits, boxes, batch, size, scale=1):
    """Average window logits [N*B,K,h,w] into [B,K,*size]; boxes are divided by `scale`."""
    out = logits.new_zeros((batch, logits.shape[1], *size))
    count = logits.new_zeros((1, 1, *size))
    for i, box in enumerate(boxes):
        y1, y2, x1, x2 = (int(v / scale) for v in box)
        out[:, :, y1:y2, x1:x2] += logits[i * batch:(i + 1) * batch]
        count[:, :, y1:y2, x1:x2] += 1
    return out / count


# --------------------------------------------------------------------------
# Segmentors
# --------------------------------------------------------------------------

class EncoderDecoder(nn.Module):
    """Encoder + one decoder at a single scale (DAFormer's segmentor)."""

    def __init__(self, backbone, decode_head, test_cfg):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.test_cfg = dict(test_cfg)
        # input pixels per logit: MiT + DAFormer 4, ResNet-V1c (dilated) + DeepLabV2 8
        self.output_stride = backbone.feature_strides[decode_head.logits_stage]

    def forward(self, img, label=None, **kwargs):
        """Training losses when a label is given (so DDP wraps forward_train), else logits."""
        if label is None:
            return self.encode_decode(img)
        return self.forward_train(img, label, **kwargs)

    def encode_decode(self, img):
        """One pass: logits [B,K,H,W] at the input's size."""
        return resize(self.decode_head(self.backbone(img)), img.shape[2:])

    def forward_train(self, img, label, seg_weight=None, return_feat=False, hr_crop_box=None,
                      return_logits=False):
        """Losses {'loss_seg'} (+ 'features': the 4 encoder maps, 'logits')."""
        if hr_crop_box is not None:
            raise ValueError('hr_crop_box is an HRDA option; this model is a single-scale encoder_decoder')
        feats = self.backbone(img)
        logits = self.decode_head(feats)
        out = {'loss_seg': seg_loss(logits, label, seg_weight)}
        if return_feat:
            out['features'] = feats
        if return_logits:
            out['logits'] = logits
        return out

    def fd_view(self, img):
        """The input whose encoder features the ImageNet feature distance compares (the whole image)."""
        return img

    @torch.no_grad()
    def inference(self, img, out_size=None):
        """Test-time logits [B,K,H,W] ('whole' or batched 'slide' windows), optionally resized to out_size."""
        if self.test_cfg['mode'] == 'slide':
            boxes = slide_boxes(*img.shape[2:], self.test_cfg['crop_size'], self.test_cfg['stride'])
            logits = self.encode_decode(crop_windows(img, boxes))
            logits = stitch_windows(logits, boxes, img.shape[0], img.shape[2:])
        else:
            logits = self.encode_decode(img)
        if out_size is not None and tuple(out_size) != tuple(logits.shape[2:]):
            logits = resize(logits, out_size)
        return logits


def hrda_fuse(context_logits, detail_logits, attention, box=None, output_stride=4, context_scale=0.5):
    """HRDA's scale-attention fusion.

    context_logits [B,K,h,w]: logits of the whole input at context_scale (stride output_stride / scale).
    detail_logits: [B,K,hd,wd] of the detail crop `box` = (y1, y2, x1, x2) in input pixels, or of the
        whole input ([B,K,2h,2w] for scale 0.5) when box is None.
    attention [B,K|1,h,w] in [0, 1]: the weight of the detail prediction.
    Returns (fused [B,K,2h,2w], context_logits * (1 - attention)).
    """
    if box is not None:
        # The detail prediction exists only inside its box: attention is zero outside.
        s = output_stride / context_scale
        y1, y2, x1, x2 = (int(v / s) for v in box)
        mask = attention.new_zeros((1, 1, *attention.shape[2:]))
        mask[:, :, y1:y2, x1:x2] = 1
        attention = attention * mask
    context_logits = (1 - attention) * context_logits
    up = 1 / context_scale
    fused = resize(context_logits, scale_factor=up)
    attention = resize(attention, scale_factor=up)
    if box is None:
        return attention * detail_logits + fused, context_logits
    # Insert the detail logits into the box (zeros elsewhere): only the box changes.
    y1, y2, x1, x2 = (int(v / output_stride) for v in box)
    inserted = attention[:, :, y1:y2, x1:x2] * detail_logits
    pad = (x1, fused.shape[3] - x2, y1, fused.shape[2] - y2)
    return fused + F.pad(inserted, pad), context_logits


class HRDAHead(nn.Module):
    """Holds HRDA's two decoders: `head` (segmentation, shared by both scales) and `scale_attention`."""

    def __init__(self, head, scale_attention, fixed_attention=None):
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention  # a head of the same type with K (class-wise) or 1 outputs
        self.fixed_attention = fixed_attention

    @property
    def logits_stage(self):
        return self.head.logits_stage

    def attention(self, context_feats):
        """[B,K|1,h,w] in [0, 1] at the context logits' resolution: the weight of the detail prediction."""
        if self.scale_attention is None:
            ref = context_feats[self.head.logits_stage]
            return ref.new_full((ref.shape[0], 1, *ref.shape[2:]), self.fixed_attention)
        return torch.sigmoid(self.scale_attention(context_feats))


class HRDAEncoderDecoder(EncoderDecoder):
    """HRDA: a low-resolution context view of the whole input and a high-resolution detail view,
    fused by a learned class-wise scale attention. Works with any encoder and head of HEADS that can
    build a scale attention (DAFormer: output stride 4; DeepLabV2 on ResNet-V1c: output stride 8)."""

    def __init__(self, backbone, decode_head, test_cfg, hrda_cfg):
        super().__init__(backbone, decode_head, test_cfg)
        # hrda_cfg is a section checked by mic_config (scales [context, 1], detail crop on the output grid,
        # feature_scale = the context scale)
        self.scales = sorted(hrda_cfg['scales'])
        self.context_scale = self.scales[0]
        self.hr_crop_size = tuple(hrda_cfg['hr_crop_size'])
        self.crop_coord_divisible = hrda_cfg['crop_coord_divisible']
        self.hr_loss_weight = hrda_cfg['hr_loss_weight']
        self.lr_loss_weight = hrda_cfg['lr_loss_weight']
        self.hr_slide_inference = hrda_cfg['hr_slide_inference']
        self.hr_slide_overlapping = hrda_cfg['hr_slide_overlapping']
        # Input sizes must keep the context logits (stride output_stride / scale: 8 with DAFormer,
        # 16 with DeepLabV2) aligned with the detail logits.
        self.size_divisor = int(self.output_stride / self.context_scale)

    # -- stages ------------------------------------------------------------
    def context_view(self, img):
        return resize(img, scale_factor=self.context_scale)

    def context_logits(self, img):
        """Features and logits of the whole input downscaled by the context scale."""
        feats = self.backbone(self.context_view(img))
        return feats, self.decode_head.head(feats)

    def detail_logits_slide(self, img):
        """Detail logits of the full-resolution input from (overlapping) windows, all in one batch."""
        crop = self.hr_crop_size
        stride = tuple(c // 2 for c in crop) if self.hr_slide_overlapping else crop
        boxes = slide_boxes(*img.shape[2:], crop, stride)
        logits = self.decode_head.head(self.backbone(crop_windows(img, boxes)))
        size = tuple(s // self.output_stride for s in img.shape[2:])
        return stitch_windows(logits, boxes, img.shape[0], size, scale=self.output_stride)

    def random_crop_box(self, height, width):
        """A random detail crop (y1, y2, x1, x2) whose corner is divisible by crop_coord_divisible."""
        ch, cw = self.hr_crop_size
        if height < ch or width < cw:
            raise ValueError(f'training input {height}x{width} is smaller than the detail crop '
                             f'model.hrda.hr_crop_size={list(self.hr_crop_size)}')
        d = self.crop_coord_divisible
        y1 = int(torch.randint(0, max((height - ch + 1) // d, 1), ())) * d
        x1 = int(torch.randint(0, max((width - cw + 1) // d, 1), ())) * d
        return y1, y1 + ch, x1, x1 + cw

    # -- API -----------------------------------------------------------------
    def _check_size(self, img):
        h, w = img.shape[2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f'HRDA needs input sizes divisible by {self.size_divisor}, got {h}x{w}')

    def encode_decode(self, img):
        """Context + detail (sliding windows) fused; logits [B,K,H,W] at the input's size.

        Inputs whose size is not divisible by size_divisor (8 with DAFormer, 16 with DeepLabV2) are padded
        (bottom/right) and the logits cropped.
        """
        H, W = img.shape[2:]
        d = self.size_divisor
        pad_h, pad_w = -H % d, -W % d
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h))
        feats, context = self.context_logits(img)
        att = self.decode_head.attention(feats)
        del feats  # not needed by the detail pass, the peak of memory
        if self.hr_slide_inference:
            detail = self.detail_logits_slide(img)
        else:
            detail = self.decode_head.head(self.backbone(img))
        fused, _ = hrda_fuse(context, detail, att, None, self.output_stride, self.context_scale)
        fused = resize(fused, img.shape[2:])
        return fused[:, :, :H, :W] if (pad_h or pad_w) else fused

    def forward_train(self, img, label, seg_weight=None, return_feat=False, hr_crop_box=None,
                      return_logits=False):
        """Losses {'loss_seg' (fused x (1 - hr - lr)), 'loss_seg_hr', ['loss_seg_lr']}
        (+ 'features': the context view's encoder maps, 'logits': fused logits, 'hr_crop_box')."""
        self._check_size(img)
        box = tuple(hr_crop_box) if hr_crop_box is not None else self.random_crop_box(*img.shape[2:])
        y1, y2, x1, x2 = box
        feats, context = self.context_logits(img)
        att = self.decode_head.attention(feats)
        detail = self.decode_head.head(self.backbone(img[:, :, y1:y2, x1:x2]))
        fused, context_scaled = hrda_fuse(context, detail, att, box, self.output_stride, self.context_scale)

        out = {'loss_seg': seg_loss(fused, label, seg_weight) * (1 - self.hr_loss_weight - self.lr_loss_weight)}
        if self.hr_loss_weight > 0:
            crop_weight = None if seg_weight is None else seg_weight[..., y1:y2, x1:x2]
            out['loss_seg_hr'] = self.hr_loss_weight * seg_loss(detail, label[..., y1:y2, x1:x2], crop_weight)
        if self.lr_loss_weight > 0:
            out['loss_seg_lr'] = self.lr_loss_weight * seg_loss(context_scaled, label, seg_weight)
        if return_feat:
            out['features'] = feats
        if return_logits:
            out['logits'] = fused
        out['hr_crop_box'] = box
        return out

    def fd_view(self, img):
        """The input whose encoder features the ImageNet feature distance compares (the context view)."""
        return self.context_view(img)


# --------------------------------------------------------------------------
# Output-space discriminator (AdvSeg)
# --------------------------------------------------------------------------

class FCDiscriminator(nn.Module):
    """AdaptSegNet's fully convolutional discriminator: class probabilities [B,K,H,W] -> one logit
    per 32x32 patch [B,1,H/32,W/32] (source 0, target 1). Four 4x4 stride-2 convs (64, 128, 256,
    512 channels, LeakyReLU 0.2), then a 4x4 stride-2 classifier; PyTorch's default init."""

    def __init__(self, num_classes, width=64):
        super().__init__()
        conv = dict(kernel_size=4, stride=2, padding=1)
        self.conv1 = nn.Conv2d(num_classes, width, **conv)
        self.conv2 = nn.Conv2d(width, width * 2, **conv)
        self.conv3 = nn.Conv2d(width * 2, width * 4, **conv)
        self.conv4 = nn.Conv2d(width * 4, width * 8, **conv)
        self.classifier = nn.Conv2d(width * 8, 1, **conv)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.leaky_relu(conv(x), 0.2)
        return self.classifier(x)


# --------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------

# An encoder module provides forward(x [B,3,H,W]) -> list of 4 maps and the attributes
#   out_channels           channels of each map
#   feature_strides        input pixels per position of each map (the output stride of a head follows)
#   no_weight_decay_keys   substrings of parameter names trained with weight decay 0 (the trainer reads
#                          model.backbone.no_weight_decay_keys)
#   classifier_prefix      keys of its ImageNet classifier, dropped when loading ImageNet weights
#   default_pretrained     the usual model.pretrained path of its ImageNet weights
#   pretrained_help(path)  where those weights come from (for the missing-file message)
#   activation_checkpointing (bool attribute, set by build_model)
# and, for layer-wise lr decay (DINOv2), num_layers and layer_id(parameter name) -> 0 .. num_layers - 1
# (mic_train.param_groups: lr x optim.layer_decay ** (num_layers - 1 - layer_id)); for token masking
# (uda.mask_type=token), token_mask_ratio (see token_masking); freeze_pyramid() for heads that skip it.
# A head provides forward(list of maps) -> logits and logits_stage (the map whose resolution they have);
# a factory with reads_tokens = True builds one that reads the ViT token grid (EncoderMaps.tokens).

def build_mit(cfg_backbone):
    return MiT(cfg_backbone['type'], cfg_backbone['drop_path_rate'])


def build_resnet_v1c(cfg_backbone):
    depth = int(cfg_backbone['type'].removeprefix('resnet').removesuffix('_v1c'))
    return ResNetV1c(depth)  # output stride 8 (dilated stages 3 and 4), as DeepLabV2 in the original


BACKBONES = {  # model.backbone.type -> factory(backbone config section)
    **{f'mit_{v}': build_mit for v in MIT_VARIANTS},
    'resnet50_v1c': build_resnet_v1c,
    'resnet101_v1c': build_resnet_v1c,
    **{t: build_dinov2 for t in DINOV2_BACKBONE_TYPES},  # dinov2_vit{s,b,l,g}14[_reg]
}


def build_daformer_head(in_channels, num_classes, head_cfg, attention=False):
    """DAFormer's head; attention=True: HRDA's scale attention, the same head with a 1x1 conv fusion."""
    fusion = 'conv1x1' if attention else 'aspp'
    return DAFormerHead(in_channels, num_classes, head_cfg['embed_dims'], fusion, head_cfg['dropout'])


def build_segformer_head(in_channels, num_classes, head_cfg, attention=False):
    if attention:
        raise ValueError('HRDA is implemented with the daformer and deeplabv2 heads (as in the original); '
                         'set model.decode_head.type accordingly or model.type=encoder_decoder')
    return SegFormerHead(in_channels, num_classes, head_cfg['embed_dims'], head_cfg['dropout'])


def build_deeplabv2_head(in_channels, num_classes, head_cfg, attention=False):
    """DeepLabV2's classifier on the last map; HRDA's scale attention is an identical head (the original)."""
    return DeepLabV2Head(in_channels[-1], num_classes, head_cfg['dilations'])


def build_vfm_uda_head(in_channels, num_classes, head_cfg, attention=False):
    """VFM-UDA's light head on the token grid; HRDA's scale attention is an identical head."""
    return VFMUDAHead(in_channels, num_classes)


build_vfm_uda_head.reads_tokens = VFMUDAHead.reads_tokens


HEADS = {  # model.decode_head.type -> factory(in_channels per map, num_classes, head config, attention)
    'daformer': build_daformer_head,
    'segformer': build_segformer_head,
    'deeplabv2': build_deeplabv2_head,
    'vfm_uda': build_vfm_uda_head,
}


def build_model(cfg_model, load_pretrained=False):
    """The segmentor described by the `model:` config section (a dict; missing keys take defaults).

    load_pretrained: also load the ImageNet encoder weights from cfg_model['pretrained'].
    """
    from mic_config import resolve_section  # the schema sits beside this file; it imports no torch
    cfg = resolve_section('model', cfg_model)
    backbone = BACKBONES[cfg['backbone']['type']](cfg['backbone'])
    backbone.activation_checkpointing = cfg['activation_checkpointing']
    channels, K = backbone.out_channels, cfg['num_classes']
    head_cfg = cfg['decode_head']
    make_head = HEADS[head_cfg['type']]
    if getattr(make_head, 'reads_tokens', False) and hasattr(backbone, 'freeze_pyramid'):
        backbone.freeze_pyramid()  # the head reads the token grid, not the pyramid's maps
    if cfg['type'] == 'encoder_decoder':
        model = EncoderDecoder(backbone, make_head(channels, K, head_cfg), cfg['test'])
    else:
        h = cfg['hrda']
        attention = None
        if h['fixed_attention'] is None:
            attention = make_head(channels, K if h['attention_classwise'] else 1, head_cfg, attention=True)
        head = HRDAHead(make_head(channels, K, head_cfg), attention, h['fixed_attention'])
        model = HRDAEncoderDecoder(backbone, head, cfg['test'], h)
    if cfg['in_channels'] != 3:
        set_input_channels(backbone, cfg['in_channels'])
    model.cfg = cfg
    if load_pretrained and cfg['pretrained']:
        load_pretrained_encoder(model.backbone, cfg['pretrained'])
    return model


def input_conv_name(encoder):
    """The name of the encoder's first convolution, the one that sees the image bands (MiT:
    patch_embed1.proj, ResNet-V1c: stem.0)."""
    return next(name for name, m in encoder.named_modules() if isinstance(m, nn.Conv2d))


def extend_input_weight(weight, channels):
    """RGB filters [O,3,k,k] -> [O,channels,k,k] for images of other bands: the RGB filters stay, each
    extra band (near infrared, ...) gets the mean of the RGB filters, and all are scaled by 3 / channels
    so that an image whose bands look alike gives the same response as before. Fewer than 3 bands: each
    gets the mean RGB filter x 3 / channels (1 band: the sum, exact for a grey image)."""
    mean = weight.mean(1, keepdim=True)
    if channels >= 3:
        extended = torch.cat([weight, mean.expand(-1, channels - 3, -1, -1)], 1)
    else:
        extended = mean.expand(-1, channels, -1, -1)
    return (extended * (3 / channels)).contiguous()


def set_input_channels(encoder, channels):
    """Replace the encoder's first convolution by one that takes `channels` bands, its initial
    weights extended from the RGB ones (extend_input_weight); ImageNet weights loaded later are
    extended the same way (load_checkpoint)."""
    name = input_conv_name(encoder)
    parent_name, _, attr = name.rpartition('.')
    parent = encoder.get_submodule(parent_name) if parent_name else encoder
    old = getattr(parent, attr)
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(extend_input_weight(old.weight, channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, attr, new)


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(path, mmap=False):
    """The object stored in a checkpoint file, on the CPU, loaded as data only (weights_only: a
    checkpoint never runs code). mmap: map the tensors instead of reading them (cheap when only the
    config of a large file is wanted). Missing, foreign or damaged files raise a message that says
    what is wrong and what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    with open(path, 'rb') as f:
        head = f.read(2)
    # torch.save writes a zip archive ('PK'); files of torch < 1.6 start with a pickle opcode (0x80)
    if not (head == b'PK' or head.startswith(b'\x80')):
        raise CheckpointError(f'{path} is not a PyTorch checkpoint (it does not start like a file written by '
                              f'torch.save): pass a .pth file written by mic_train.py (work_dirs/RUN/latest.pth), '
                              f'a released MIC/HRDA/DAFormer checkpoint, SegFormer ImageNet weights (mit_b*.pth) or '
                              f'OpenMMLab ImageNet weights (resnet*_v1c-*.pth)')
    try:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(path, map_location='cpu', weights_only=True)  # the old format cannot be mapped
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'could not read checkpoint {path}: the file is truncated or damaged ({reason}). '
                              f'Download or copy it again (a run\'s latest.pth is only ever replaced by a '
                              f'complete file, so an interrupted copy or download is the usual cause)') from None


def load_pretrained_encoder(backbone, path):
    """Load ImageNet weights into an encoder: SegFormer's mit_b*.pth into MiT, OpenMMLab's
    resnet*_v1c-*.pth into ResNetV1c (their classifiers are dropped)."""
    if os.path.isdir(path):
        raise FileNotFoundError(f'model.pretrained={path} is a folder: give the weights file in it (e.g. '
                                f'{os.path.join(path, os.path.basename(backbone.default_pretrained))})')
    if not os.path.isfile(path):
        note = ''
        if os.path.basename(path) != os.path.basename(backbone.default_pretrained):
            note = (f' (model.pretrained={path} is not the usual file of this encoder, '
                    f'{backbone.default_pretrained}: check model.backbone.type and model.pretrained)')
        raise FileNotFoundError(
            f'pretrained encoder weights {path} not found{note}. {backbone.pretrained_help(path)}, or set '
            'model.pretrained=null uda.fd_lambda=0 to train from scratch (the ImageNet feature distance '
            'needs these weights).')
    return load_checkpoint(backbone, path)


def _extract_state_dict(ckpt, path):
    """(state_dict, format name) of the supported checkpoint layouts."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} is not a checkpoint dict (got {type(ckpt).__name__})')
    if isinstance(ckpt.get('modules'), dict) and 'student' in ckpt['modules']:  # ours (mic_train.py)
        return ckpt['modules']['student'], 'mic_train'
    if 'student' in ckpt:  # ours, written before the trainer kept its modules in one dict
        return ckpt['student'], 'mic_train'
    sd = ckpt.get('state_dict', ckpt.get('model', ckpt))
    if not isinstance(sd, dict):
        raise CheckpointError(f'{path}: no state dict found (keys: {list(ckpt)[:10]})')
    if sd and all(k.startswith('module.') for k in sd):  # saved from a DataParallel wrapper
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    if any(k.startswith('model.') for k in sd):  # released MIC/HRDA/DAFormer: student under 'model.'
        return {k[len('model.'):]: v for k, v in sd.items() if k.startswith('model.')}, 'released_uda'
    if any(k.startswith('patch_embed1.') for k in sd):  # SegFormer ImageNet encoder
        return sd, 'segformer_imagenet'
    if any(k.startswith('stem.') for k in sd):  # OpenMMLab ImageNet ResNet-V1c (open-mmlab://resnet*_v1c)
        return sd, 'openmmlab_imagenet'
    if 'pos_embed' in sd and 'cls_token' in sd:  # facebookresearch/dinov2's dinov2_*_pretrain.pth
        return sd, 'dinov2_official'
    if any(k.startswith('embeddings.patch_embeddings.') for k in sd):  # Hugging Face facebook/dinov2-*
        return dinov2_from_hf(sd), 'dinov2_hf'
    return sd, 'segmentor'


# Hugging Face's file names (Dinov2Model, Dinov2WithRegistersModel) -> the official ones, per block and outside
_HF_DINOV2_BLOCK = {'norm1': 'norm1', 'attention.output.dense': 'attn.proj', 'layer_scale1.lambda1': 'ls1.gamma',
                    'norm2': 'norm2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2', 'mlp.weights_in': 'mlp.w12',
                    'mlp.weights_out': 'mlp.w3', 'layer_scale2.lambda1': 'ls2.gamma'}
_HF_DINOV2_TOP = {'embeddings.cls_token': 'cls_token', 'embeddings.mask_token': 'mask_token',
                  'embeddings.position_embeddings': 'pos_embed', 'embeddings.register_tokens': 'register_tokens',
                  'embeddings.patch_embeddings.projection': 'patch_embed.proj', 'layernorm': 'norm'}


def _renamed(key, table):
    """key with the first entry of table that is the key or a prefix of it (followed by '.') renamed."""
    for old, new in table.items():
        if key == old or key.startswith(old + '.'):
            return new + key[len(old):]
    return None


def dinov2_from_hf(sd):
    """A Hugging Face DINOv2 state dict (names as stored in the hub's files) with the official names:
    query, key and value are stacked into qkv (in that order, the official qkv layout); keys that are
    not DINOv2's stay as they are, so that the strict check names them."""
    out, qkv = {}, {}
    for k, v in sd.items():
        name = _renamed(k, _HF_DINOV2_TOP)
        if k.startswith('encoder.layer.'):
            i, rest = k[len('encoder.layer.'):].split('.', 1)
            if rest.startswith('attention.attention.'):  # attention.attention.{query,key,value}.{weight,bias}
                part, kind = rest[len('attention.attention.'):].split('.', 1)
                qkv.setdefault((i, kind), {})[part] = (k, v)
                continue
            name = _renamed(rest, _HF_DINOV2_BLOCK)
            name = name and f'blocks.{i}.{name}'
        out[name or k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) == {'query', 'key', 'value'}:
            out[f'blocks.{i}.attn.qkv.{kind}'] = torch.cat([parts[p][1] for p in ('query', 'key', 'value')])
        else:  # incomplete: left under the file's names for the error message
            out.update(dict(parts.values()))
    return out


IMAGENET_FORMATS = ('segformer_imagenet', 'openmmlab_imagenet')  # a bare encoder with its ImageNet classifier
DINOV2_FORMATS = ('dinov2_official', 'dinov2_hf')  # a bare DINOv2 encoder (official or Hugging Face names)


def is_safetensors(path):
    """A safetensors file: an 8-byte little-endian header length, then the JSON header ('{')."""
    with open(path, 'rb') as f:
        return f.read(9)[8:] == b'{'


def read_weights(path):
    """read_checkpoint, or the tensors of a safetensors file (Hugging Face's model.safetensors)."""
    if not (os.path.isfile(path) and is_safetensors(path)):
        return read_checkpoint(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f'{path} is a safetensors file: reading it needs the safetensors package '
                              '(pip install safetensors)') from None
    return load_file(path, device='cpu')


def load_checkpoint(model, path):
    """Load weights into `model` (a segmentor or a bare encoder) strictly.

    Accepts our checkpoints (the student), the released MIC/HRDA/DAFormer checkpoints
    (the 'model.' student; 'ema_model.' and 'imnet_model.' are ignored), SegFormer's mit_b*.pth and
    OpenMMLab's resnet*_v1c-*.pth ImageNet weights (into the encoder; the classifier, 'head.*' or 'fc.*',
    is dropped; BatchNorm's num_batches_tracked counters, absent from old files, keep the model's values),
    and DINOv2 encoder weights: the official dinov2_*_pretrain.pth or Hugging Face's facebook/dinov2-*
    pytorch_model.bin / model.safetensors (into the encoder; its pyramid keeps the model's values).
    Anything else that does not match raises CheckpointError naming the keys and shapes.
    Returns {'format', 'ignored': [keys dropped by name]}.
    """
    sd, fmt = _extract_state_dict(read_weights(path), path)
    encoder_only = not hasattr(model, 'backbone')
    target = model
    ignored = []
    if fmt in DINOV2_FORMATS:
        target = model if encoder_only else model.backbone
        if not isinstance(target, DINOv2):
            raise CheckpointError(f'{path} ({fmt}) holds DINOv2 encoder weights ({_dinov2_name(sd)}) but the '
                                  f'model\'s encoder is not DINOv2: set model.backbone.type={_dinov2_name(sd)}')
        # the pyramid is trained from scratch: it keeps the model's values (MAE's rule: only these may miss)
        sd = {**sd, **{k: v for k, v in target.state_dict().items() if k.startswith(target.not_pretrained_prefix)}}
    elif fmt in IMAGENET_FORMATS:
        target = model if encoder_only else model.backbone
        ignored = [k for k in sd if k.startswith(target.classifier_prefix)]
        sd = {k: v for k, v in sd.items() if k not in ignored}
        key = input_conv_name(target) + '.weight'
        bands = target.state_dict()[key].shape[1]
        if key in sd and sd[key].shape[1] == 3 and bands != 3:  # RGB weights for an encoder of other bands
            sd[key] = extend_input_weight(sd[key], bands)
    elif encoder_only:
        if not any(k.startswith('backbone.') for k in sd):
            raise CheckpointError(f'{path} holds no encoder weights (backbone.*)')
        ignored = [k for k in sd if not k.startswith('backbone.')]
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    elif isinstance(getattr(model, 'decode_head', None), SegFormerHead):
        # mmseg's SegFormerHead keeps an unused conv_seg from its base class.
        ignored = [k for k in sd if k.startswith('decode_head.conv_seg.')]
        sd = {k: v for k, v in sd.items() if k not in ignored}
    own = target.state_dict()
    if not any(k.endswith('.num_batches_tracked') for k in sd):  # a file of PyTorch < 0.4.1 has none of them
        sd = {**sd, **{k: v for k, v in own.items() if k.endswith('.num_batches_tracked')
                       and k.replace('num_batches_tracked', 'running_mean') in sd}}
    _check_state_dict(target, sd, path, fmt)
    target.load_state_dict(sd, strict=True)
    return {'format': fmt, 'ignored': ignored}


def _check_state_dict(model, sd, path, fmt):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}'
             for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return
    hints = []
    ckpt_hrda = any(k.startswith('decode_head.head.') for k in sd)
    model_hrda = any(k.startswith('decode_head.head.') for k in own)
    if ckpt_hrda and not model_hrda:
        hints.append('the checkpoint is an HRDA model: set model.type=hrda')
    if model_hrda and sd and not ckpt_hrda:
        hints.append('the checkpoint is a single-scale model: set model.type=encoder_decoder')
    (kind, n_ckpt), (own_kind, n_own) = _encoder_kind(sd), _encoder_kind(own)
    if kind and own_kind and (kind, n_ckpt) != (own_kind, n_own):
        name = _encoder_name(kind, n_ckpt)
        if kind == own_kind:
            hints.append(f'the checkpoint encoder has {n_ckpt} stage-3 blocks ({name}), the model {n_own}: '
                         'set model.backbone.type accordingly')
        else:
            hints.append(f'the checkpoint holds a {name} encoder, the model a {_encoder_name(own_kind, n_own)}: '
                         'set model.backbone.type accordingly')
    dino, own_dino = _dinov2_name(sd), _dinov2_name(own)
    if dino and own_dino and dino != own_dino:
        hints.append(f'the checkpoint holds a {dino} encoder, the model a {own_dino}: '
                     'set model.backbone.type accordingly')
    head, own_head = _head_type(sd), _head_type(own)
    if head and own_head and head != own_head:
        hints.append(f'the checkpoint has a {head} head: set model.decode_head.type={head}')

    def show(items):
        return ', '.join(items[:8]) + (f' ... ({len(items)} in all)' if len(items) > 8 else '')
    lines = [f'checkpoint {path} ({fmt}) does not match the model:']
    if missing:
        lines.append(f'  missing keys: {show(missing)}')
    if unexpected:
        lines.append(f'  unexpected keys: {show(unexpected)}')
    if wrong:
        lines.append(f'  shape mismatches: {show(wrong)}')
    lines += [f'  hint: {h}' for h in hints]
    raise CheckpointError('\n'.join(lines))


# stage-3 parameter prefix of each encoder family: its block count tells the variants apart
_ENCODER_STAGE3 = {'mit': 'block3.', 'resnet': 'layer3.'}


def _encoder_kind(state_dict):
    """(family, number of stage-3 blocks) of the encoder in a state dict, or (None, 0)."""
    for kind, stage3 in _ENCODER_STAGE3.items():
        for prefix in ('backbone.' + stage3, stage3):
            blocks = {k[len(prefix):].split('.')[0] for k in state_dict if k.startswith(prefix)}
            if blocks:
                return kind, len(blocks)
    return None, 0


def _encoder_name(kind, n_stage3):
    if kind == 'mit':
        names = [f'mit_{v}' for v, a in MIT_VARIANTS.items() if a['depths'][2] == n_stage3]
    else:
        names = [f'resnet{d}_v1c' for d, blocks in RESNET_STAGE_BLOCKS.items() if blocks[2] == n_stage3]
    return ' or '.join(names) or f'{kind} with {n_stage3} stage-3 blocks'


def _dinov2_name(state_dict):
    """The model.backbone.type of the DINOv2 encoder in a state dict (by width, depth and registers),
    a description when no released variant has them, or None when it holds no DINOv2 encoder."""
    prefix = 'backbone.' if 'backbone.pos_embed' in state_dict else ''
    pos = state_dict.get(prefix + 'pos_embed')
    if pos is None or pos.ndim != 3:
        return None
    dim = pos.shape[-1]
    depth = len({k[len(prefix) + 7:].split('.')[0] for k in state_dict if k.startswith(prefix + 'blocks.')})
    reg = prefix + 'register_tokens' in state_dict
    for variant, v in DINOV2_VARIANTS.items():
        if (v['embed_dim'], v['depth']) == (dim, depth):
            return f'dinov2_{variant}' + ('_reg' if reg else '')
    return f'DINOv2 of width {dim} and depth {depth}'


def _head_type(state_dict):
    """The HEADS name of the (single-scale or HRDA) decoder in a state dict, or None."""
    for k in state_dict:
        k = k.replace('decode_head.head.', 'decode_head.')
        if k.startswith('decode_head.fuse_layer.'):
            return 'daformer'
        if k.startswith('decode_head.linear_c.'):
            return 'segformer'
        if k.startswith('decode_head.aspp_modules.'):
            return 'deeplabv2'
        if k.startswith('decode_head.upscale.'):
            return 'vfm_uda'
    return None


def set_dropout(module, enabled):
    """Switch dropout and drop path on/off without touching BatchNorm's mode (teacher pseudo-labels)."""
    for m in module.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, DropPath)):
            m.training = enabled


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description='Build the model of a config and print its parameter counts.')
    parser.add_argument('--cfg', default=None, help='YAML config (default: the built-in MIC(HRDA) defaults)')
    parser.add_argument('--opt', nargs='+', default=[], metavar='KEY=VALUE', help='config overrides')
    args = parser.parse_args(argv)
    from mic_config import load_config
    cfg = load_config(args.cfg, args.opt)
    model = build_model(cfg.model)
    print(f'{cfg.model.type} / {cfg.model.backbone.type} / {cfg.model.decode_head.type}')
    print(f'encoder {count_params(model.backbone) / 1e6:.2f} M, '
          f'decoder {count_params(model.decode_head) / 1e6:.2f} M, total {count_params(model) / 1e6:.2f} M')


if __name__ == '__main__':
    main()
