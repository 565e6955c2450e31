"""MiT encoder forward on CPU: ours vs HuggingFace transformers' SegformerModel, same weights.

    pip install transformers        # benchmark-only dependency
    python benchmarks/mit_forward_cpu.py --variant b2 --size 512 --batch 1 --repeats 10

Copies our weights into the HuggingFace model, checks that both give the same features,
then times the two forward passes alternately in one process (timings on a shared machine
are noisy; the ratio of interleaved medians is what to compare). Prints one JSON line.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import mic_model  # noqa: E402


# Our name -> HuggingFace name, for the layouts of transformers 4.x and 5.x.
HF_NAMES = {
    4: dict(patch='encoder.patch_embeddings.{i}.', patch_norm='layer_norm', stage_norm='encoder.layer_norm.{i}',
            block='encoder.block.{i}.{j}.', norm1='layer_norm_1', q='attention.self.query',
            k='attention.self.key', v='attention.self.value', proj='attention.output.dense',
            sr='attention.self.sr', sr_norm='attention.self.layer_norm', norm2='layer_norm_2',
            fc1='mlp.dense1', dw='mlp.dwconv.dwconv', fc2='mlp.dense2'),
    5: dict(patch='stages.{i}.patch_embeddings.', patch_norm='layer_norm', stage_norm='stages.{i}.layer_norm',
            block='stages.{i}.blocks.{j}.', norm1='layernorm_before', q='attention.q_proj',
            k='attention.k_proj', v='attention.v_proj', proj='attention.o_proj',
            sr='attention.sequence_reduction.sequence_reduction', sr_norm='attention.sequence_reduction.layer_norm',
            norm2='layernorm_after', fc1='mlp.fc1', dw='mlp.dwconv.dwconv', fc2='mlp.fc2'),
}


def to_hf_state_dict(ours, layout):
    """Our (mmseg-layout) MiT weights under HuggingFace Segformer names."""
    n = HF_NAMES[layout]
    sd = ours.state_dict()
    out = {}

    def put(hf, mine, wb=('weight', 'bias')):
        for t in wb:
            out[f'{hf}.{t}'] = sd[f'{mine}.{t}']
    for i in range(4):
        p = n['patch'].format(i=i)
        put(p + 'proj', f'patch_embed{i + 1}.proj')
        put(p + n['patch_norm'], f'patch_embed{i + 1}.norm')
        put(n['stage_norm'].format(i=i), f'norm{i + 1}')
        C = ours.embed_dims[i]
        for j in range(ours.depths[i]):
            h, s = n['block'].format(i=i, j=j), f'block{i + 1}.{j}.'
            for key, mine in (('norm1', 'norm1'), ('q', 'attn.q'), ('proj', 'attn.proj'), ('norm2', 'norm2'),
                              ('fc1', 'mlp.fc1'), ('dw', 'mlp.dwconv.dwconv'), ('fc2', 'mlp.fc2')):
                put(h + n[key], s + mine)
            if s + 'attn.sr.weight' in sd:
                put(h + n['sr'], s + 'attn.sr')
                put(h + n['sr_norm'], s + 'attn.norm')
            for t in ('weight', 'bias'):
                kv = sd[f'{s}attn.kv.{t}']
                out[f'{h}{n["k"]}.{t}'], out[f'{h}{n["v"]}.{t}'] = kv[:C], kv[C:]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variant', default='b2')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import SegformerConfig, SegformerModel

    ours = mic_model.MiT(args.variant).eval()
    v = mic_model.MIT_VARIANTS[args.variant]
    hf_cfg = SegformerConfig(hidden_sizes=list(v['embed_dims']), depths=list(v['depths']),
                             num_attention_heads=list(mic_model.MIT_HEADS), sr_ratios=list(mic_model.MIT_SR_RATIOS),
                             drop_path_rate=0.0, layer_norm_eps=1e-6)
    hf = SegformerModel(hf_cfg).eval()
    layout = 5 if any(k.startswith('stages.') for k in hf.state_dict()) else 4
    hf.load_state_dict(to_hf_state_dict(ours, layout), strict=True)

    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        a = ours(x)
        b = hf(x, output_hidden_states=True).hidden_states
        max_diff = max((p - q).abs().max().item() for p, q in zip(a, b))
        times = {'ours': [], 'hf': []}
        for _ in range(2):  # warm-up
            ours(x), hf(x)
        for _ in range(args.repeats):
            for name, fn in (('ours', lambda: ours(x)), ('hf', lambda: hf(x))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({'variant': args.variant, 'input': [args.batch, 3, args.size, args.size],
                      'threads': args.threads, 'torch': torch.__version__,
                      'ours_s': round(med['ours'], 4), 'hf_s': round(med['hf'], 4),
                      'hf_over_ours': round(med['hf'] / med['ours'], 3), 'max_abs_feature_diff': max_diff}))


if __name__ == '__main__':
    main()
