"""Our DINOv2 encoder (mic_model.DINOv2) against the official code (facebookresearch/dinov2) and
Hugging Face transformers (Dinov2Model), with random weights.

    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2_official   # the reference (not vendored)
    python benchmarks/compare_with_dinov2.py --ref /tmp/dinov2_official                   # token differences
    python benchmarks/compare_with_dinov2.py --ref /tmp/dinov2_official --write-fixtures  # tests' fixtures
    python benchmarks/compare_with_dinov2.py --speed                 # ViT-B/14 forward+backward vs transformers
    python benchmarks/compare_with_dinov2.py --checkpointing-memory  # ViT-L HRDA step, with/without

Token differences: the real ViT-S/14 and ViT-B/14 (with and without 4 registers, the official hub
flags) at 518x518 (the native 37x37 grid), 1120x1120 and 512x1024; the last is not a multiple of 14
and goes through DINOv2.prepare_input (VFM-UDA's x1.1 and floor to a multiple of 14: 560x1120) on both
sides. Prints the max abs and max relative (to the largest reference value) difference of all output
tokens (class, registers, patches), without and with a random token mask (half the patches).

--write-fixtures: tests/fixtures/dinov2_official_{mlp,reg,swiglu}.pt, tiny official models (width 48,
depth 4, 3 heads, img_size 98: a 7x7 native grid) with seeded random weights (layer scales, norms,
tokens and mask_token included) run at the native grid, other square and non-square sizes and with
token masks: {config, state_dict, inputs, masks, outputs}. tests/test_model_dinov2.py compares to them.

--speed: forward + backward (sum of the output tokens) of ViT-B/14, batch 1, at 518x518 and 1120x1120:
ours (forward_tokens) vs transformers' Dinov2Model with attn_implementation='sdpa', the same weights,
alternating (ours first on even repetitions), medians of --reps timed calls after one untimed call.
Peak memory: each side alone in a child process (this script with --child), the peak resident set
size (Linux VmHWM, restarted through /proc/self/clear_refs) minus the resident set size before the
call, for one forward + backward.

--checkpointing-memory: the same peak memory of one HRDA forward_train + backward (DAFormer head) on
dinov2_vitl14 at --crop (default 768x768, detail crop half of it), activation checkpointing off and on.
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
import mic_model  # noqa: E402
from peak_memory import reset_peak_rss, rss_kib  # noqa: E402

FIXTURES = os.path.join(HERE, '..', 'tests', 'fixtures')
TINY = dict(embed_dim=48, depth=4, num_heads=3, img_size=98)
TINY_KINDS = {'mlp': dict(ffn='mlp', registers=0), 'reg': dict(ffn='mlp', registers=4),
              'swiglu': dict(ffn='swiglu', registers=0)}
TINY_SIZES = [(98, 98), (70, 70), (112, 112), (56, 84), (84, 42)]  # native grid first
TINY_MASKED = [0, 3]  # indices of TINY_SIZES also run with a token mask


def official_vit(ref, embed_dim, depth, num_heads, ffn='mlp', registers=0, img_size=518):
    """The official DinoVisionTransformer as the hub builds it (layer scale 1.0, no block chunks,
    the register models with antialiased, offset-free position-embedding interpolation)."""
    os.environ['XFORMERS_DISABLED'] = '1'  # the plain-torch paths (the same maths)
    if ref not in sys.path:
        sys.path.insert(0, ref)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from dinov2.layers import MemEffAttention, NestedTensorBlock
        from dinov2.models.vision_transformer import DinoVisionTransformer
    return DinoVisionTransformer(
        img_size=img_size, patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4,
        init_values=1.0, block_chunks=0, num_register_tokens=registers, interpolate_antialias=registers > 0,
        interpolate_offset=0.0 if registers else 0.1, ffn_layer='swiglufused' if ffn == 'swiglu' else 'mlp',
        block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention))


def randomise(model, seed):
    """Random values for every parameter the initialisation sets to constants (norms, layer scales,
    biases, tokens, mask_token), so that a wrong mapping cannot hide behind a 0 or a 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('gamma') or (('norm' in name) and name.endswith('weight')):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name in ('cls_token', 'register_tokens', 'mask_token', 'pos_embed'):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def tokens_of(official, x, masks=None):
    """The official model's final-normed tokens [B, 1+R+N, C] (class, registers, patches)."""
    out = official.forward_features(x, masks)
    return torch.cat([out['x_norm_clstoken'][:, None], out['x_norm_regtokens'], out['x_norm_patchtokens']], 1)


def ours_like(official_sd, embed_dim, depth, num_heads, ffn='mlp', registers=0, img_size=518):
    ours = mic_model.DINOv2(embed_dim, depth, num_heads, ffn, registers, img_size=img_size)
    missing, unexpected = ours.load_state_dict(official_sd, strict=False)
    assert not unexpected and all(k.startswith('pyramid.') for k in missing), (missing, unexpected)
    return ours.eval()


def random_mask(batch, n, seed):
    return torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) < 0.5


def write_fixtures(ref):
    os.makedirs(FIXTURES, exist_ok=True)
    for i, (kind, spec) in enumerate(TINY_KINDS.items()):
        torch.manual_seed(i)
        cfg = {**TINY, **spec}
        official = randomise(official_vit(ref, **cfg), seed=100 + i).eval()
        g = torch.Generator().manual_seed(200 + i)
        # float16-representable inputs, stored as float16 (half the file, still exact)
        inputs = [torch.randn(2 if j == 0 else 1, 3, *s, generator=g).half() for j, s in enumerate(TINY_SIZES)]
        masks = {j: random_mask(inputs[j].shape[0], (TINY_SIZES[j][0] // 14) * (TINY_SIZES[j][1] // 14), 300 + j)
                 for j in TINY_MASKED}
        with torch.no_grad():
            outputs = [tokens_of(official, x.float()) for x in inputs]
            masked = {j: tokens_of(official, inputs[j].float(), m) for j, m in masks.items()}
        path = os.path.join(FIXTURES, f'dinov2_official_{kind}.pt')
        torch.save({'config': cfg, 'state_dict': official.state_dict(), 'inputs': inputs, 'outputs': outputs,
                    'masks': masks, 'masked_outputs': masked}, path)
        print(f'{path}: {os.path.getsize(path) / 1e6:.2f} MB')


def diff(a, b):
    d = (a - b).abs().max().item()
    return d, d / b.abs().max().item()


def compare(ref):
    torch.set_grad_enabled(False)
    for variant in ('vits14', 'vitb14'):
        for registers in (0, 4):
            v = mic_model.DINOV2_VARIANTS[variant]
            cfg = dict(embed_dim=v['embed_dim'], depth=v['depth'], num_heads=v['num_heads'], registers=registers)
            torch.manual_seed(0)
            official = randomise(official_vit(ref, **cfg), seed=1).eval()
            ours = ours_like(official.state_dict(), **cfg)
            for size in ((518, 518), (1120, 1120), (512, 1024)):
                x = ours.prepare_input(torch.randn(1, 3, *size)) if size[0] % 14 else torch.randn(1, 3, *size)
                n = (x.shape[2] // 14) * (x.shape[3] // 14)
                row = [f'dinov2_{variant}{"_reg" if registers else ""}', f'{size[0]}x{size[1]}',
                       f'({x.shape[2]}x{x.shape[3]})']
                for masks in (None, random_mask(1, n, 5)):
                    d, r = diff(ours.forward_tokens(x, masks), tokens_of(official, x, masks))
                    row.append(f'{"masked" if masks is not None else "plain"}: abs {d:.2e} rel {r:.2e}')
                print('  '.join(row), flush=True)


# --------------------------------------------------------------------------
# Speed and memory
# --------------------------------------------------------------------------

def vitb_pair():
    """(ours, transformers' Dinov2Model) ViT-B/14 with the same random weights."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518,
                                  patch_size=14, layerscale_value=1.0, attn_implementation='sdpa'))
    import tempfile
    with tempfile.TemporaryDirectory() as d:  # through the file format, as real weights arrive
        hf.save_pretrained(d)
        ours = mic_model.DINOv2(768, 12, 12)
        mic_model.load_checkpoint(ours, os.path.join(d, 'model.safetensors'))
    return ours.train(), hf.train()


def fwd_bwd(side, model, x):
    out = model.forward_tokens(x) if side == 'ours' else model(pixel_values=x).last_hidden_state
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)


def speed(args):
    ours, hf = vitb_pair()
    models = {'ours': ours, 'transformers': hf}
    res = {}
    for size in args.sizes:
        x = torch.randn(1, 3, size, size)
        times = {k: [] for k in models}
        for rep in range(args.reps + 1):
            order = list(models) if rep % 2 == 0 else list(models)[::-1]
            for side in order:
                t = time.perf_counter()
                fwd_bwd(side, models[side], x)
                if rep:  # the first round is untimed
                    times[side].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: child_peak(k, size) for k in models}
        res[size] = {'time_s': med, 'peak_mib': mem}
        print(f'ViT-B/14 {size}x{size} fwd+bwd: ours {med["ours"]:.2f} s, transformers {med["transformers"]:.2f} s '
              f'(ratio {med["ours"] / med["transformers"]:.2f}); peak memory ours {mem["ours"]:.0f} MiB, '
              f'transformers {mem["transformers"]:.0f} MiB (ratio {mem["ours"] / mem["transformers"]:.2f})',
              flush=True)
    print(json.dumps(res))


def child_peak(side, size):
    cmd = [sys.executable, '-W', 'ignore', os.path.abspath(__file__), '--child', side, '--size', str(size),
           '--threads', str(torch.get_num_threads())]
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith('CHILD ')]
    if p.returncode or not line:
        raise RuntimeError(f'child {side} failed:\n{p.stderr[-3000:]}')
    return json.loads(line[0][len('CHILD '):])['peak_mib']


def child(args):
    """One measured call in this process: prints CHILD {"peak_mib": ...}."""
    torch.manual_seed(0)
    if args.child in ('ours', 'transformers'):
        model = vitb_pair()[0 if args.child == 'ours' else 1]  # the other one is freed here
        x = torch.randn(1, 3, args.size, args.size)
        run = functools.partial(fwd_bwd, args.child, model, x)
    else:  # hrda_ac0 / hrda_ac1: ViT-L HRDA step without / with activation checkpointing
        model = mic_model.build_model({'backbone': {'type': 'dinov2_vitl14'}, 'pretrained': None,
                                       'activation_checkpointing': args.child.endswith('1'),
                                       'hrda': {'hr_crop_size': [args.crop // 2] * 2}}).train()
        x = torch.randn(1, 3, args.crop, args.crop)
        label = torch.randint(0, 19, (1, 1, args.crop, args.crop))

        def run():
            losses = model.forward_train(x, label)
            sum(v for k, v in losses.items() if k.startswith('loss')).backward()
    base = rss_kib('VmRSS')
    reset_peak_rss()
    t = time.perf_counter()
    run()
    print('CHILD ' + json.dumps({'peak_mib': (rss_kib('VmHWM') - base) / 1024,
                                 'time_s': time.perf_counter() - t}), flush=True)


def checkpointing_memory(args):
    peaks = {}
    for side in ('hrda_ac0', 'hrda_ac1'):
        cmd = [sys.executable, '-W', 'ignore', os.path.abspath(__file__), '--child', side, '--crop', str(args.crop),
               '--threads', str(torch.get_num_threads())]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith('CHILD ')]
        if p.returncode or not line:
            raise RuntimeError(f'child {side} failed:\n{p.stderr[-3000:]}')
        peaks[side] = json.loads(line[0][len('CHILD '):])
    off, on = peaks['hrda_ac0'], peaks['hrda_ac1']
    print(f'dinov2_vitl14 HRDA forward_train + backward, {args.crop}x{args.crop} (detail crop {args.crop // 2}): '
          f'peak memory without checkpointing {off["peak_mib"]:.0f} MiB ({off["time_s"]:.1f} s), with '
          f'{on["peak_mib"]:.0f} MiB ({on["time_s"]:.1f} s), ratio {on["peak_mib"] / off["peak_mib"]:.2f}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--ref', default='/tmp/dinov2_official', help='checkout of facebookresearch/dinov2')
    p.add_argument('--write-fixtures', action='store_true')
    p.add_argument('--speed', action='store_true')
    p.add_argument('--checkpointing-memory', action='store_true')
    p.add_argument('--sizes', type=int, nargs='+', default=[518, 1120])
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--crop', type=int, default=768)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--size', type=int, default=518, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
    elif args.write_fixtures:
        write_fixtures(args.ref)
    elif args.speed:
        speed(args)
    elif args.checkpointing_memory:
        checkpointing_memory(args)
    else:
        compare(args.ref)


if __name__ == '__main__':
    main()
