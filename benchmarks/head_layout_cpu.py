"""DAFormer head forward + backward on the CPU with its maps channels-last (as the MiT encoder
returns them) vs contiguous NCHW (mic_model.decoder_layout): why the head gets NCHW on the CPU.

    python benchmarks/head_layout_cpu.py                  # MiT-b0 maps of two 512x512 crops, 2 threads

Prints the median seconds of `--repeats` calls per layout, the layouts alternating.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import mic_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--crop', type=int, default=512)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels = (32, 64, 160, 256)  # MiT-b0 stages, strides 4, 8, 16, 32
    feats = [torch.randn(args.batch, c, args.crop // s, args.crop // s).contiguous(memory_format=torch.channels_last)
             .requires_grad_() for c, s in zip(channels, (4, 8, 16, 32))]
    head = mic_model.DAFormerHead(channels, 19, embed_dims=256)
    nchw = mic_model.decoder_layout
    layouts = {'channels-last': lambda x: x, 'NCHW': nchw}
    times = {name: [] for name in layouts}
    try:
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, layout in layouts.items():
                mic_model.decoder_layout = layout
                t = time.perf_counter()
                head(feats).sum().backward()
                if rep:
                    times[name].append(time.perf_counter() - t)
    finally:
        mic_model.decoder_layout = nchw
    for name, ts in times.items():
        print(f'{name:14s} {statistics.median(ts):.3f} s (forward + backward, median of {len(ts)})')


if __name__ == '__main__':
    main()
