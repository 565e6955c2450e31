"""Time of mic_data.check_data against the number of files (CPU, a warm file cache).

    python benchmarks/check_data_speed.py [--num 2000]

Writes NUM tiny source pairs (64x48 PNG image + label, labels in their own folder), 10 target and
10 val images, then times check_data on a config of them (best of 3): it lists the samples, reads
every image size from its header (Pillow, lazily) and every label size from its PNG header, and
decodes the first val image and label. Prints the seconds per source pair and the time extrapolated
to 25,000 pairs (GTA's 24,966).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import mic_config  # noqa: E402
import mic_data  # noqa: E402


def write(root, n, labels):
    os.makedirs(os.path.join(root, 'images'))
    os.makedirs(os.path.join(root, 'labels'))
    img = Image.fromarray(np.full((48, 64, 3), 90, np.uint8))
    lbl = Image.fromarray(np.zeros((48, 64), np.uint8))
    for i in range(n):
        img.save(os.path.join(root, 'images', f'{i:06d}.png'))
        if labels:
            lbl.save(os.path.join(root, 'labels', f'{i:06d}.png'))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num', type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, labels in (('source', args.num, True), ('target', 10, False), ('val', 10, True)):
            write(os.path.join(tmp, name), n, labels)
        ds = {'type': 'folder', 'img_dir': 'images', 'label_dir': 'labels', 'label_suffix': '.png',
              'img_scale': [64, 48]}
        data = {k: {**ds, 'root': os.path.join(tmp, k)} for k in ('source', 'target', 'val')}
        data['target']['label_suffix'] = None
        cfg = mic_config.merge(mic_config.defaults(), {
            'data': {**data, 'classes': ['a', 'b'], 'crop_size': [64, 64]}, 'uda': {'fd_lambda': 0},
            'model': {'hrda': {'hr_crop_size': [32, 32]}}})
        times = []
        for _ in range(3):
            start = time.perf_counter()
            mic_data.check_data(cfg)
            times.append(time.perf_counter() - start)
    best = min(times)
    print(f'check_data, {args.num} source pairs: {best:.2f} s ({best / args.num * 1e3:.3f} ms per pair); '
          f'25,000 pairs: about {best / args.num * 25000:.0f} s')


if __name__ == '__main__':
    main()
