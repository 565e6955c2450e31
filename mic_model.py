"""MIC's segmentation models in plain PyTorch: the MiT encoder, the DAFormer and
SegFormer decoders, the HRDA multi-resolution segmentor, inference and checkpoint loading.

    import mic_model, mic_train
    cfg = mic_train.load_config('configs/gta2cs.yaml')
    model = mic_model.build_model(cfg.model)                   # random init
    mic_model.load_checkpoint(model, 'work_dirs/RUN/latest.pth')  # ours, released MIC, or SegFormer mit_b*.pth
    logits = model.inference(img)                              # img: [B,3,H,W] normalised -> [B,19,H,W]

    python mic_model.py --cfg configs/gta2cs.yaml              # prints the architecture's parameter counts

Parameter names follow the mmsegmentation layout of the original checkpoints
(backbone.block1.0.attn.q.weight, decode_head.head.fuse_layer.bottleneck.conv.weight, ...),
so released weights load without conversion. This file imports only torch.
"""
import argparse
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

    def __init__(self, variant='b5', drop_path_rate=0.1):
        super().__init__()
        variant = variant.removeprefix('mit_')
        if variant not in MIT_VARIANTS:
            raise ValueError(f'unknown MiT variant {variant!r}; choose one of '
                             f'{", ".join("mit_" + v for v in MIT_VARIANTS)}')
        self.variant = variant
        self.embed_dims = MIT_VARIANTS[variant]['embed_dims']
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
# Decoders
# --------------------------------------------------------------------------

def resize(x, size=None, scale_factor=None):
    """Bilinear resize with align_corners=False (the convention of every resize here)."""
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode='bilinear', align_corners=False)


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

    def forward(self, x):
        return tokens_to_map(self.proj(map_to_tokens(x)), *x.shape[2:])


class DAFormerHead(nn.Module):
    """Embed the 4 encoder maps, resize to stride 4, concatenate, fuse, classify.

    fusion 'aspp': the segmentation head (context-aware fusion);
    fusion 'conv1x1': HRDA's scale-attention head.
    """

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
        x = [e if e.shape[2:] == size else resize(e, size) for e in x]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(x, dim=1))))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (an option; the paper uses DAFormerHead)."""

    def __init__(self, in_channels, num_classes, embed_dims=768, dropout=0.1):
        super().__init__()
        self.linear_c = nn.ModuleDict({str(i): TokenEmbed(c, embed_dims) for i, c in enumerate(in_channels)})
        self.linear_fuse = ConvBNReLU(embed_dims * len(in_channels), embed_dims, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dims, num_classes, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        x = [self.linear_c[str(i)](f) for i, f in enumerate(feats)]
        x = [e if e.shape[2:] == size else resize(e, size) for e in x]
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(x, dim=1))))


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
        self.scale_attention = scale_attention
        self.fixed_attention = fixed_attention

    def attention(self, context_feats):
        if self.scale_attention is None:
            shape = (context_feats[0].shape[0], 1, *context_feats[0].shape[2:])
            return context_feats[0].new_full(shape, self.fixed_attention)
        return torch.sigmoid(self.scale_attention(context_feats))


class HRDAEncoderDecoder(EncoderDecoder):
    """HRDA: a low-resolution context view of the whole input and a high-resolution detail view,
    fused by a learned class-wise scale attention."""

    output_stride = 4

    def __init__(self, backbone, decode_head, test_cfg, hrda_cfg):
        super().__init__(backbone, decode_head, test_cfg)
        self.scales = sorted(hrda_cfg['scales'])
        if len(self.scales) != 2 or self.scales[1] != 1.0:
            raise ValueError(f'model.hrda.scales must be [context_scale, 1.0], got {hrda_cfg["scales"]}')
        self.context_scale = self.scales[0]
        self.hr_crop_size = tuple(hrda_cfg['hr_crop_size'])
        self.crop_coord_divisible = hrda_cfg['crop_coord_divisible']
        self.hr_loss_weight = hrda_cfg['hr_loss_weight']
        self.lr_loss_weight = hrda_cfg['lr_loss_weight']
        self.hr_slide_inference = hrda_cfg['hr_slide_inference']
        self.hr_slide_overlapping = hrda_cfg['hr_slide_overlapping']
        if hrda_cfg['feature_scale'] != self.context_scale:
            raise ValueError('model.hrda.feature_scale must equal the context scale '
                             f'({self.context_scale}); got {hrda_cfg["feature_scale"]}')
        # Input sizes must keep the context logits (stride 4 / scale) aligned with the detail logits.
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

        Inputs whose size is not divisible by 8 are padded (bottom/right) and the logits cropped.
        """
        H, W = img.shape[2:]
        d = self.size_divisor
        pad_h, pad_w = -H % d, -W % d
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h))
        feats, context = self.context_logits(img)
        att = self.decode_head.attention(feats)
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
# Building and loading
# --------------------------------------------------------------------------

def build_model(cfg_model, load_pretrained=False):
    """The segmentor described by the `model:` config section (a dict; missing keys take defaults).

    load_pretrained: also load the ImageNet encoder weights from cfg_model['pretrained'].
    """
    from mic_config import resolve_section  # the schema sits beside this file; it imports only yaml
    cfg = resolve_section('model', cfg_model)
    backbone = MiT(cfg['backbone']['type'], cfg['backbone']['drop_path_rate'])
    backbone.activation_checkpointing = cfg['activation_checkpointing']
    channels, K = backbone.embed_dims, cfg['num_classes']
    head_cfg = cfg['decode_head']

    def make_head():
        if head_cfg['type'] == 'daformer':
            return DAFormerHead(channels, K, head_cfg['embed_dims'], 'aspp', head_cfg['dropout'])
        return SegFormerHead(channels, K, head_cfg['embed_dims'], head_cfg['dropout'])

    if cfg['type'] == 'encoder_decoder':
        model = EncoderDecoder(backbone, make_head(), cfg['test'])
    else:
        if head_cfg['type'] != 'daformer':
            raise ValueError('HRDA is implemented with the DAFormer head; set model.decode_head.type=daformer')
        h = cfg['hrda']
        attention = None
        if h['fixed_attention'] is None:
            attention = DAFormerHead(channels, K if h['attention_classwise'] else 1, head_cfg['embed_dims'],
                                     'conv1x1', head_cfg['dropout'])
        model = HRDAEncoderDecoder(backbone, HRDAHead(make_head(), attention, h['fixed_attention']),
                                   cfg['test'], h)
    model.cfg = cfg
    if load_pretrained and cfg['pretrained']:
        load_pretrained_encoder(model.backbone, cfg['pretrained'])
    return model


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
                              f'a released MIC/HRDA/DAFormer checkpoint or SegFormer ImageNet weights (mit_b*.pth)')
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
    """Load SegFormer's ImageNet weights (mit_b*.pth) into a MiT encoder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'pretrained encoder weights {path} not found. Download mit_b0..mit_b5.pth (ImageNet-1k) from '
            'SegFormer (https://github.com/NVlabs/SegFormer#training, "Download" link of the ImageNet-1K '
            f'pretrained weights) and put the file at {path}, or set model.pretrained=null to train '
            'from scratch.')
    return load_checkpoint(backbone, path)


def _extract_state_dict(ckpt, path):
    """(state_dict, format name) of the three supported checkpoint layouts."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} is not a checkpoint dict (got {type(ckpt).__name__})')
    if isinstance(ckpt.get('modules'), dict) and 'student' in ckpt['modules']:  # ours (mic_train.py)
        return ckpt['modules']['student'], 'mic_train'
    if 'student' in ckpt:  # ours, written before the trainer kept its modules in one dict
        return ckpt['student'], 'mic_train'
    sd = ckpt.get('state_dict', ckpt.get('model', ckpt))
    if not isinstance(sd, dict):
        raise CheckpointError(f'{path}: no state dict found (keys: {list(ckpt)[:10]})')
    if any(k.startswith('model.') for k in sd):  # released MIC/HRDA/DAFormer: student under 'model.'
        return {k[len('model.'):]: v for k, v in sd.items() if k.startswith('model.')}, 'released_uda'
    if any(k.startswith('patch_embed1.') for k in sd):  # SegFormer ImageNet encoder
        return sd, 'segformer_imagenet'
    return sd, 'segmentor'


def load_checkpoint(model, path):
    """Load weights into `model` (a segmentor or a bare MiT encoder) strictly.

    Accepts our checkpoints (the student), the released MIC/HRDA/DAFormer checkpoints
    (the 'model.' student; 'ema_model.' and 'imnet_model.' are ignored), and SegFormer's
    mit_b*.pth ImageNet weights (into the encoder; the classifier 'head.*' is dropped).
    Anything else that does not match raises CheckpointError naming the keys and shapes.
    Returns {'format', 'ignored': [keys dropped by name]}.
    """
    sd, fmt = _extract_state_dict(read_checkpoint(path), path)
    target = model
    ignored = []
    if fmt == 'segformer_imagenet':
        ignored = [k for k in sd if k.startswith('head.')]
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
        if not isinstance(model, MiT):
            target = model.backbone
    elif isinstance(model, MiT):
        if not any(k.startswith('backbone.') for k in sd):
            raise CheckpointError(f'{path} holds no encoder weights (backbone.*)')
        ignored = [k for k in sd if not k.startswith('backbone.')]
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    elif isinstance(getattr(model, 'decode_head', None), SegFormerHead):
        # mmseg's SegFormerHead keeps an unused conv_seg from its base class.
        ignored = [k for k in sd if k.startswith('decode_head.conv_seg.')]
        sd = {k: v for k, v in sd.items() if k not in ignored}
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
    n_ckpt, n_own = _stage3_depth(sd), _stage3_depth(own)
    if n_ckpt and n_own and n_ckpt != n_own:
        variant = {2: 'mit_b0 or mit_b1', 6: 'mit_b2', 18: 'mit_b3', 27: 'mit_b4', 40: 'mit_b5'}.get(n_ckpt, '?')
        hints.append(f'the checkpoint encoder has {n_ckpt} stage-3 blocks ({variant}), the model {n_own}: '
                     'set model.backbone.type accordingly')

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


def _stage3_depth(state_dict):
    """Number of stage-3 blocks of the MiT encoder in a state dict (0 if none): tells b0..b5 apart."""
    prefix = 'backbone.block3.' if any(k.startswith('backbone.block3.') for k in state_dict) else 'block3.'
    return len({k[len(prefix):].split('.')[0] for k in state_dict if k.startswith(prefix)})


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
