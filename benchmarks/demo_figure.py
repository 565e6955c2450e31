"""The README's demo figure: one target validation image, its ground truth, and the prediction of
each method of the demo study side by side (the colour predictions that training writes into
<run folder>/preds/ at its end).

    python mic_train.py --exp demo                      # the 12 runs of the study (BENCHMARKS.md)
    python benchmarks/demo_figure.py --seed 0 --out docs/demo_methods.png

Images are picked by their file stem (default: the validation image on which the methods differ
most, i.e. with the largest spread of pixel accuracy over the methods); --image names one.
"""
import argparse
import glob
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import mic_data  # noqa: E402
from mic_data import colorize, save_png  # noqa: E402

METHODS = (('demo_source_only', 'source only'), ('demo_daformer', 'DAFormer (DACS, half res.)'),
           ('demo_hrda_dacs', 'HRDA + DACS'), ('demo_hrda_mic', 'MIC(HRDA)'))


def val_pairs(root):
    """{stem: (image path, train-id label path)} of the demo's Cityscapes-format validation split."""
    out = {}
    for img in sorted(glob.glob(os.path.join(root, 'leftImg8bit', 'val', '*', '*_leftImg8bit.png'))):
        stem = os.path.basename(img)[:-len('.png')]
        city = os.path.basename(os.path.dirname(img))
        label = os.path.join(root, 'gtFine', 'val', city, stem.replace('_leftImg8bit', '_gtFine_labelTrainIds.png'))
        out[stem] = (img, label)
    return out


def pixel_accuracy(pred_rgb, label):
    valid = label != mic_data.IGNORE_INDEX
    return float((pred_rgb[valid] == colorize(label)[valid]).all(-1).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', default='work_dirs/demo', help='folder of the study\'s run folders')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--data', default='data/demo/cityscapes', help='the demo target (Cityscapes format)')
    parser.add_argument('--image', default=None, help='file stem of the validation image (default: see above)')
    parser.add_argument('--out', default='docs/demo_methods.png')
    args = parser.parse_args(argv)
    pairs = val_pairs(args.data)
    if not pairs:
        sys.exit(f'error: no validation images under {args.data}/leftImg8bit/val (run the demo once)')
    preds = {}
    for run, _ in METHODS:
        folder = os.path.join(args.runs, f'{run}_s{args.seed}', 'preds')
        if not os.path.isdir(folder):
            sys.exit(f'error: {folder} does not exist: train the study first (python mic_train.py --exp demo)')
        preds[run] = folder
    stems = [args.image] if args.image else list(pairs)
    best, best_spread = None, -1.0
    for stem in stems:
        if stem not in pairs:
            sys.exit(f'error: {stem} is not a validation image of {args.data}')
        label = np.asarray(Image.open(pairs[stem][1]))
        accs = [pixel_accuracy(np.asarray(Image.open(os.path.join(preds[r], stem + '.png')).convert('RGB')), label)
                for r, _ in METHODS]
        if max(accs) - min(accs) > best_spread:
            best, best_spread = stem, max(accs) - min(accs)
    img_path, label_path = pairs[best]
    panels = [('target image', Image.open(img_path).convert('RGB')),
              ('ground truth', Image.fromarray(colorize(np.asarray(Image.open(label_path)))))]
    panels += [(title, Image.open(os.path.join(preds[r], best + '.png')).convert('RGB')) for r, title in METHODS]
    w, h = panels[0][1].size
    caption = 14
    sheet = Image.new('RGB', (3 * w, 2 * (h + caption)), 'white')
    draw = ImageDraw.Draw(sheet)
    for i, (title, im) in enumerate(panels):
        x, y = (i % 3) * w, (i // 3) * (h + caption)
        draw.text((x + 4, y + 1), title, fill='black')
        sheet.paste(im.resize((w, h), Image.NEAREST), (x, y + caption))
    save_png(args.out, np.asarray(sheet))
    print(f'{args.out}: {best} (seed {args.seed})')


if __name__ == '__main__':
    main()
