"""How fast the training data pipeline makes samples at the full-scale sizes, on this CPU.

    python benchmarks/data_loader_cpu.py --cfg configs/gta2cs.yaml --images 8 --samples 30

Writes a few synthetic street scenes at the real dataset sizes (GTA 1914x1052 with palette
labels, Cityscapes 2048x1024) in the real formats, converts the GTA labels, then times
(1) each step of one training sample in this process: decoding the PNGs, resizing to the
config's img_scale, the whole UDADataset sample (source with rare class sampling + target);
(2) the DataLoader with 0, 1, 2 ... workers. Prints a table and one JSON line.

The synthetic images are noisier than photographs, so their PNGs are larger and slower to
decode than GTA's or Cityscapes' (the file sizes are printed): the figures are an upper bound.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import convert_labels  # noqa: E402
import mic_config  # noqa: E402
import mic_data  # noqa: E402
import mic_demo  # noqa: E402

GTA_SIZE = (1052, 1914)  # (h, w) of the GTA images
CITYSCAPES_SIZE = (1024, 2048)


def write_dataset(root, n, seed=0):
    """n GTA-format source and n Cityscapes-format target images under root/{gta,cityscapes}."""
    cities = ('aachen', 'bochum')
    for folder in ('gta/images', 'gta/labels', *(f'cityscapes/leftImg8bit/train/{c}' for c in cities)):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i in range(n):
        img, label = mic_demo.demo_sample(seed, 0, i, *GTA_SIZE)
        mic_data.save_png(os.path.join(root, 'gta', 'images', f'{i:05d}.png'), img)
        mic_data.save_png(os.path.join(root, 'gta', 'labels', f'{i:05d}.png'), label, mode='P',
                          palette=mic_demo.gta_palette())
        img, _ = mic_demo.demo_sample(seed, 1, i, *CITYSCAPES_SIZE)
        city = cities[i % 2]
        mic_data.save_png(os.path.join(root, 'cityscapes', 'leftImg8bit', 'train', city,
                                       f'{city}_{i:06d}_000019_leftImg8bit.png'), img)
    convert_labels.convert_dataset('gta', os.path.join(root, 'gta'), progress=False)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loader_time(data_cfg, workers, batches):
    """Median seconds per batch of a DataLoader with `workers` processes, after a warm-up."""
    data_cfg = dict(data_cfg, num_workers=workers)
    loader = iter(mic_data.build_train_loader(data_cfg, seed=0))
    for _ in range(max(workers, 1)):  # let every worker start and fill its first batch
        next(loader)
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return (time.perf_counter() - t) / batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--cfg', default='configs/gta2cs.yaml', help='config whose data section is timed')
    p.add_argument('--images', type=int, default=8, help='images per domain to write')
    p.add_argument('--samples', type=int, default=30, help='samples timed per step')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2], help='DataLoader worker counts')
    p.add_argument('--root', default=None, help='where to write the images (default: a temporary folder)')
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a loader worker

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        t = time.perf_counter()
        write_dataset(root, args.images)
        print(f'wrote {args.images} + {args.images} full-size images in {time.perf_counter() - t:.0f} s')
        cfg = mic_config.load_config(args.cfg, [f'data.source.root={root}/gta',
                                                f'data.target.root={root}/cityscapes'])
        data = cfg.data
        gta_img = os.path.join(root, 'gta', 'images', '00000.png')
        gta_label = os.path.join(root, 'gta', 'labels', '00000_labelTrainIds.png')
        cs_img = next(p for p, _ in mic_data.list_samples(data.target, need_labels=False))
        img = mic_data.read_image(gta_img)
        size = mic_data.rescale_size(*img.shape[:2], data.source.img_scale)
        label = mic_data.read_label(gta_label)
        dataset = mic_data.UDADataset(data, seed=0)
        k = iter(range(10 ** 9))
        steps = {
            'decode GTA image': lambda: mic_data.read_image(gta_img),
            'decode GTA label': lambda: mic_data.read_label(gta_label),
            f'resize GTA image to {size[1]}x{size[0]}': lambda: mic_data.resize_image(img, size),
            'resize GTA label': lambda: mic_data.resize_label(label, size),
            'decode Cityscapes image': lambda: mic_data.read_image(cs_img),
            'one UDA sample (source + target)': lambda: dataset[next(k)],
        }
        result = {'config': args.cfg, 'gta_png_mb': os.path.getsize(gta_img) / 2 ** 20,
                  'cityscapes_png_mb': os.path.getsize(cs_img) / 2 ** 20, 'steps_s': {}, 'loader_s_per_batch': {}}
        print(f'PNG sizes: GTA image {result["gta_png_mb"]:.1f} MB, Cityscapes image '
              f'{result["cityscapes_png_mb"]:.1f} MB')
        for name, fn in steps.items():
            result['steps_s'][name] = s = median_time(fn, args.samples)
            print(f'{name:40s} {s * 1000:7.1f} ms')
        for w in args.workers:
            result['loader_s_per_batch'][w] = s = loader_time(data, w, max(args.samples // data.batch_size, 4))
            print(f'DataLoader, {w} workers, batch {data.batch_size}: {s:.3f} s per batch')
        print(json.dumps(result))


if __name__ == '__main__':
    main()
