"""The synthetic demo benchmark: real formats, determinism, class coverage and a real domain gap.
(Its speed is a benchmark, not a test: BENCHMARKS.md.)"""
import json
import os

import numpy as np
from PIL import Image

import mic_demo
from convert_labels import convert_dataset
from mic_data import EvalDataset, UDADataset, list_samples
from mic_demo import demo_sample, make_demo

CS_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
          27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # Cityscapes label id -> train id
VAL_CITIES = ('frankfurt', 'lindau', 'munster')
LUT = np.full(256, 255, np.uint8)
LUT[list(CS_IDS)] = list(CS_IDS.values())


def _files(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), 'rb').read()
            for d, _, names in os.walk(root) for n in names}


def test_demo_files(tmp_path):
    args = dict(seed=0, num_source=4, num_target=6, num_val=3, width=64, height=32)
    make_demo(str(tmp_path / 'a'), **args)
    files = _files(str(tmp_path / 'a'))
    assert sorted(files) == sorted(
        [f'gta/images/{i:05d}.png' for i in range(1, 5)] + [f'gta/labels/{i:05d}.png' for i in range(1, 5)]
        + [f'cityscapes/leftImg8bit/train/{c}/{c}_{s:06d}_000019_leftImg8bit.png' for c, s in
           [('aachen', 0), ('bochum', 0), ('bremen', 0), ('cologne', 0), ('darmstadt', 0), ('aachen', 1)]]
        + [f'cityscapes/gtFine/train/{c}/{c}_{s:06d}_000019_gtFine_labelIds.png' for c, s in
           [('aachen', 0), ('bochum', 0), ('bremen', 0), ('cologne', 0), ('darmstadt', 0), ('aachen', 1)]]
        + [f'cityscapes/leftImg8bit/val/{c}/{c}_000000_000019_leftImg8bit.png' for c in VAL_CITIES]
        + [f'cityscapes/gtFine/val/{c}/{c}_000000_000019_gtFine_labelIds.png' for c in VAL_CITIES]
        + ['demo_info.json'])
    assert json.loads(files['demo_info.json'])['num_target'] == 6
    gta_label = Image.open(tmp_path / 'a' / 'gta' / 'labels' / '00002.png')
    assert gta_label.mode == 'P' and gta_label.size == (64, 32)
    img, label = demo_sample(0, 0, 1, 32, 64)  # the written files are exactly demo_sample's output
    np.testing.assert_array_equal(np.asarray(gta_label), label)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'a' / 'gta' / 'images' / '00002.png')), img)
    cs_label = Image.open(tmp_path / 'a' / 'cityscapes' / 'gtFine' / 'val' / 'lindau'
                          / 'lindau_000000_000019_gtFine_labelIds.png')
    assert cs_label.mode == 'L'
    np.testing.assert_array_equal(np.asarray(cs_label), demo_sample(0, 2, 1, 32, 64)[1])

    # bit-identical for the same arguments (also with worker processes), different for another seed
    make_demo(str(tmp_path / 'b'), **args, nproc=2)
    assert _files(str(tmp_path / 'b')) == files
    make_demo(str(tmp_path / 'c'), **{**args, 'seed': 1})
    other = _files(str(tmp_path / 'c'))
    assert all(other[k] != v for k, v in files.items() if k.endswith('.png'))


CITYSCAPES_IDS_WITH_TRAIN_ID = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}


def test_demo_trains_after_conversion(tmp_path):
    root = tmp_path / 'demo'
    make_demo(str(root), seed=3, num_source=6, num_target=4, num_val=2, width=96, height=48)
    # the source's pixels whose (Cityscapes) id has no train id, counted from the written labels
    raw = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((root / 'gta' / 'labels').glob('*.png'))])
    unmapped = int((~np.isin(raw, list(CITYSCAPES_IDS_WITH_TRAIN_ID))).sum())
    gta = convert_dataset('gta', str(root / 'gta'), progress=False)
    cs = convert_dataset('cityscapes', str(root / 'cityscapes'), progress=False)
    assert gta['converted'] == 6 and cs['converted'] == 6 and cs['stats_files'] == 4
    assert cs['unmapped_pixels'] > 0  # the target's ego-vehicle hood is ignored
    assert gta['unmapped_pixels'] == unmapped
    data = {
        'source': {'type': 'gta', 'root': str(root / 'gta'), 'img_scale': [96, 48]},
        'target': {'type': 'cityscapes', 'root': str(root / 'cityscapes'), 'img_scale': [96, 48],
                   'crop_pseudo_margins': [2, 8, 2, 2]},
        'crop_size': [48, 48], 'rcs': {'min_pixels': 20}, 'batch_size': 2, 'num_workers': 0,
    }
    s = UDADataset(data, seed=0)[0]
    assert s['img'].shape == (3, 48, 48) and int(s['rare_class']) >= 0
    val = EvalDataset({'type': 'cityscapes', 'root': str(root / 'cityscapes'), 'split': 'val', 'img_scale': [96, 48]})
    assert len(val) == 2 and val[0]['label'].shape == (48, 96)
    assert len(list_samples({'type': 'cityscapes', 'root': str(root / 'cityscapes'), 'split': 'train'})) == 4


def test_demo_class_coverage():
    seen = {0: set(), 1: set()}
    for domain in (0, 1):
        for i in range(40):
            seen[domain] |= set(np.unique(demo_sample(5, domain, i, 64, 128)[1]).tolist())
    for domain in (0, 1):
        assert set(CS_IDS) <= seen[domain], f'missing classes {set(CS_IDS) - seen[domain]} in domain {domain}'
        assert seen[domain] <= set(CS_IDS) | {1, 4}  # plus ego vehicle (target) and static objects
        assert 4 in seen[domain]
    assert 1 in seen[1] and 1 not in seen[0]  # only the target camera sees its hood


def _pixels(domain, indices, gap=mic_demo.DEMO_GAP, h=64, w=128):
    """Images float [n,h,w,3] and train-id labels [n,h,w] of demo samples."""
    imgs, labels = zip(*(demo_sample(0, domain, i, h, w, gap) for i in indices))
    return np.stack(imgs).astype(np.float64), LUT[np.stack(labels)]


def _nearest_mean_accuracy(means, imgs, labels):
    """Pixel accuracy of classifying each pixel by the nearest class-mean colour."""
    valid = labels != 255
    x, y = imgs[valid], labels[valid]
    return (np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1) == y).mean()


def test_demo_domain_gap():
    src_imgs, src_labels = _pixels(0, range(24))
    means = np.array([src_imgs[src_labels == c].mean(0) if (src_labels == c).any() else [1e6] * 3 for c in range(19)])
    held_imgs, held_labels = _pixels(0, range(100, 112))
    tgt_imgs, tgt_labels = _pixels(1, range(12))
    same_imgs, same_labels = _pixels(1, range(12), gap=0.0)
    held = _nearest_mean_accuracy(means, held_imgs, held_labels)
    target = _nearest_mean_accuracy(means, tgt_imgs, tgt_labels)
    no_gap = _nearest_mean_accuracy(means, same_imgs, same_labels)
    # colour alone works on held-out source images and on the target without a gap, not on the target
    assert held > 0.4 and no_gap > 0.4 and target < 0.5 * held, (held, no_gap, target)

    # layout is shared: the source's per-pixel class prior predicts target and source alike
    prior = np.stack([(src_labels == c).mean(0) for c in range(19)]).argmax(0)  # (h, w)

    def prior_accuracy(labels):
        valid = labels != 255
        return (np.broadcast_to(prior, labels.shape)[valid] == labels[valid]).mean()
    src_more, tgt_more = _pixels(0, range(200, 240))[1], _pixels(1, range(200, 240))[1]
    assert prior_accuracy(src_more) > 0.5 and abs(prior_accuracy(tgt_more) - prior_accuracy(src_more)) < 0.1

    # road and sidewalk: distinct colours in the source, one colour in the target (told apart by context);
    # compared as chromaticity, since vignetting darkens the sidewalks at the image borders
    def chroma_distance(imgs, labels):
        chroma = imgs / np.maximum(imgs.sum(-1, keepdims=True), 1)
        return np.linalg.norm(chroma[labels == 0].mean(0) - chroma[labels == 1].mean(0))
    assert chroma_distance(src_imgs, src_labels) > 0.08 and chroma_distance(tgt_imgs, tgt_labels) < 0.015
