"""Pins of what the Cityscapes-class benchmarks produce: the resolved config of every configs/*.yaml,
convert_labels' GTA / Cityscapes / Synthia outputs and statistics, training samples with rare class
sampling, evaluation items, colour predictions and metrics. tests/test_own_data.py compares the code
with the fixture in tests/fixtures/cityscapes_pins/, written by this file from the code before
classes became data (data.classes); nothing of the existing benchmarks may change.

    python tests/cityscapes_pins.py --write    # only after a deliberate change of these outputs

Everything is generated from fixed seeds; the hashes cover decoded pixels and file bytes (with the
temporary dataset root replaced by '<root>'), not PNG bytes (zlib versions differ).
"""
import glob
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

from conftest import _save  # the tests' PNG writer

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FIXTURE = os.path.join(TESTS, 'fixtures', 'cityscapes_pins')
for p in (REPO, TESTS):
    if p not in sys.path:
        sys.path.insert(0, p)


def _sha(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()




def config_dumps():
    """{name: resolved YAML} of every shipped config, and of the defaults ('defaults')."""
    from mic_config import dump_yaml, load_config
    out = {'defaults': dump_yaml(load_config())}
    for path in sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml'))):
        if os.path.basename(path) != 'experiments.yaml':  # the table of experiments, not a config
            out[os.path.basename(path)[:-5]] = dump_yaml(load_config(path))
    return out


def write_datasets(root):
    """A GTA, a Cityscapes and a Synthia folder with random raw ids (mapped and unmapped ones)."""
    from helpers import write_png
    rng = np.random.default_rng(1234)
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    for i in range(4):
        h, w = 40 + 4 * i, 56
        ids = rng.integers(0, 36, (h, w)).astype(np.uint8)
        ids[: h // 2, : w // 2] = [7, 11, 21, 26][i]  # large blocks, so RCS has candidates
        _save(os.path.join(root, 'gta', 'images', f'{i:05d}.png'), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _save(os.path.join(root, 'gta', 'labels', f'{i:05d}.png'), ids, mode='P', palette=palette)
    for split, city, n in (('train', 'aachen', 3), ('train', 'bonn', 2), ('val', 'lindau', 2)):
        for i in range(n):
            stem = f'{city}_{i:06d}_000019'
            ids = rng.integers(0, 34, (48, 64)).astype(np.uint8)
            _save(os.path.join(root, 'cs', 'leftImg8bit', split, city, f'{stem}_leftImg8bit.png'),
                  rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
            _save(os.path.join(root, 'cs', 'gtFine', split, city, f'{stem}_gtFine_labelIds.png'), ids, mode='L')
    for i in range(3):
        ids = rng.integers(0, 25, (30, 40, 3)).astype(np.uint16)
        _save(os.path.join(root, 'synthia', 'RGB', f'{i:07d}.png'), rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
        write_png(os.path.join(root, 'synthia', 'GT', 'LABELS', f'{i:07d}.png'), ids, rng.integers(0, 5, 30))


def convert_pins(root):
    """{kind: {summary, outputs (hash of the decoded train-id PNGs), stats file hashes}}."""
    from convert_labels import convert_dataset
    out = {}
    for kind, sub in (('gta', 'gta'), ('cityscapes', 'cs'), ('synthia', 'synthia')):
        folder = os.path.join(root, sub)
        summary = convert_dataset(kind, folder, progress=False)
        summary = {k: v for k, v in summary.items() if k != 'root'}
        outputs = sorted(glob.glob(os.path.join(folder, '**', '*_labelTrainIds.png'), recursive=True))
        arrays = []
        for p in outputs:
            with Image.open(p) as img:
                arrays.append(np.asarray(img))
                assert img.mode == 'L'
        stats = {}
        for name in ('sample_class_stats.json', 'sample_class_stats_dict.json', 'samples_with_class.json'):
            with open(os.path.join(folder, name), 'rb') as f:
                stats[name] = hashlib.sha256(f.read().replace(folder.encode(), b'<root>')).hexdigest()
        out[kind] = {'summary': summary, 'outputs': [os.path.relpath(p, folder) for p in outputs],
                     'labels': _sha(*arrays), 'stats': stats}
    return out


def sample_pins(root):
    """Hashes of UDADataset samples (GTA with RCS -> Cityscapes) and of EvalDataset items."""
    import mic_data
    data = {'source': {'type': 'gta', 'root': os.path.join(root, 'gta'), 'img_scale': [64, 48]},
            'target': {'type': 'cityscapes', 'root': os.path.join(root, 'cs'), 'split': 'train',
                       'img_scale': [64, 48], 'crop_pseudo_margins': [2, 6, 2, 2]},
            'crop_size': [32, 32], 'rcs': {'min_pixels': 50, 'min_crop_ratio': 1.0}}
    ds = mic_data.UDADataset(data, seed=3)
    samples = [ds[k] for k in range(8)]
    keys = ('img', 'gt', 'target_img', 'valid_pseudo_mask', 'rare_class')
    train = _sha(*[s[k].numpy() for s in samples for k in keys])
    ev = mic_data.EvalDataset({'type': 'cityscapes', 'root': os.path.join(root, 'cs'), 'split': 'val',
                               'img_scale': [80, 60]})
    items = [ev[i] for i in range(len(ev))]
    return {'train_samples': train, 'rcs_classes': [int(c) for c in ds.rcs_classes],
            'rcs_probs': [round(float(p), 12) for p in ds.rcs_probs],
            'eval_items': _sha(*[x for it in items for x in (it['img'].numpy(), it['label'].numpy())])}


def eval_pins(root):
    """evaluate() with a model whose logits are a fixed function of the image: its colour predictions,
    exports and metrics (names, values, mIoU16); and colorize() over all 256 values."""
    import torch
    import mic_data
    import mic_eval

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def inference(self, img, out_size=None):
            red = img[:, 0:1]  # normalised red channel; logits peak at 19 different levels
            centres = torch.linspace(-2.0, 2.2, 19).view(1, 19, 1, 1)
            return -(red - centres) ** 2

    ds_cfg = {'type': 'cityscapes', 'root': os.path.join(root, 'cs'), 'split': 'val', 'img_scale': [64, 48]}
    pred_dir, export_dir = os.path.join(root, 'preds'), os.path.join(root, 'export')
    metrics = mic_eval.evaluate(Fixed(), ds_cfg, num_workers=0, progress=False, pred_dir=pred_dir,
                                export_dir=export_dir, export_format='labelids', synthia16=True)
    preds = []
    for folder in (pred_dir, export_dir):
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as img:
                preds.append(np.asarray(img))
    metrics = json.loads(json.dumps(metrics))
    return {'metrics': metrics, 'preds': _sha(*preds),
            'colorize': _sha(mic_data.colorize(np.arange(256, dtype=np.uint8).reshape(16, 16)))}


def compute():
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        write_datasets(root)
        pins = {'convert': convert_pins(root)}
        pins.update(sample_pins(root))
        pins.update(eval_pins(root))
    return config_dumps(), pins


def write():
    dumps, pins = compute()
    os.makedirs(os.path.join(FIXTURE, 'configs'), exist_ok=True)
    for name, text in dumps.items():
        with open(os.path.join(FIXTURE, 'configs', name + '.yaml'), 'w') as f:
            f.write(text)
    with open(os.path.join(FIXTURE, 'pins.json'), 'w') as f:
        json.dump(pins, f, indent=1, sort_keys=True)
        f.write('\n')


if __name__ == '__main__':
    if sys.argv[1:] != ['--write']:
        sys.exit('usage: python tests/cityscapes_pins.py --write')
    write()
