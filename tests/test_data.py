"""mic_data.py: file reading, dataset listing, transforms, rare class sampling, UDA samples, loaders."""
import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mic_data
from convert_labels import convert_dataset
from mic_data import (DataError, EvalDataset, InfiniteSampler, UDADataset, build_train_loader, colorize,
                      crop_box_cat_max_ratio, eval_collate, list_samples, random_crop_box,
                      rcs_class_probs, read_image, read_label, rescale_size, resize_image, resize_label)
from mic_layouts import list_images

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def denormalize(x):
    """float32 tensor [3,h,w] -> float64 [h,w,3] on the 0..255 scale."""
    return x.permute(1, 2, 0).double().numpy() * STD + MEAN


# --------------------------------------------------------------------------
# Constants and files
# --------------------------------------------------------------------------

def test_constants():
    assert len(mic_data.CLASSES) == 19 and mic_data.CLASSES[0] == 'road' and mic_data.CLASSES[18] == 'bicycle'
    assert mic_data.PALETTE[0] == (128, 64, 128) and mic_data.PALETTE[13] == (0, 0, 142) and len(mic_data.PALETTE) == 19
    assert mic_data.SYNTHIA_CLASSES == tuple(c for c in range(19) if c not in (9, 14, 16))
    assert sorted(mic_data.CS_ID_TO_TRAIN_ID.values()) == list(range(19))
    for cs_id, train_id in mic_data.CS_ID_TO_TRAIN_ID.items():
        assert mic_data.TRAIN_ID_TO_CS_ID[train_id] == cs_id
    assert mic_data.TRAIN_ID_TO_CS_ID[255] == 0 and mic_data.IGNORE_INDEX == 255


def test_read_image_modes_and_errors(tmp_path, save_png):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_png(str(tmp_path / 'g.png'), grey, mode='L')
    np.testing.assert_array_equal(read_image(str(tmp_path / 'g.png')), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4)).astype(np.uint8)
    save_png(str(tmp_path / 'a.png'), rgba, mode='RGBA')
    np.testing.assert_array_equal(read_image(str(tmp_path / 'a.png')), rgba[..., :3])
    Image.fromarray(rgba[..., :3]).save(tmp_path / 'j.jpg', quality=100)
    assert read_image(str(tmp_path / 'j.jpg')).shape == (3, 4, 3)
    (tmp_path / 'bad.png').write_bytes((tmp_path / 'a.png').read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=r'cannot read image .*bad\.png.*corrupt'):
        read_image(str(tmp_path / 'bad.png'))
    with pytest.raises(DataError, match=r'image .*missing\.png does not exist'):
        read_image(str(tmp_path / 'missing.png'))


def test_read_label_modes(tmp_path, save_png):
    ids = np.array([[0, 5, 255], [18, 3, 7]], np.uint8)
    save_png(str(tmp_path / 'l.png'), ids, mode='L')
    np.testing.assert_array_equal(read_label(str(tmp_path / 'l.png')), ids)
    save_png(str(tmp_path / 'p.png'), ids, mode='P', palette=[200] * 768)  # every index shows the same colour
    np.testing.assert_array_equal(read_label(str(tmp_path / 'p.png')), ids)
    save_png(str(tmp_path / 'rgb.png'), np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataError, match=r"rgb\.png has mode 'RGB'.*8-bit single-channel.*convert_labels\.py"):
        read_label(str(tmp_path / 'rgb.png'))
    Image.fromarray(ids.astype(np.uint16) * 300).save(tmp_path / 'i16.png')  # 16-bit grey
    with pytest.raises(DataError, match=r'i16\.png has mode'):
        read_label(str(tmp_path / 'i16.png'))


def test_colorize():
    out = colorize(np.array([[0, 13], [255, 40]], np.uint8))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [128, 64, 128] and out[0, 1].tolist() == [0, 0, 142]
    assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------
# Listing datasets
# --------------------------------------------------------------------------

def _touch_png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(path)


def test_list_samples_every_type(tmp_path):
    r = str(tmp_path)
    for name in ('b', 'a'):  # written out of order: listings are sorted
        _touch_png(f'{r}/gta/images/{name}.png')
        _touch_png(f'{r}/gta/labels/{name}_labelTrainIds.png')
        _touch_png(f'{r}/gta/labels/{name}.png')  # the raw label must not be listed as an image
        _touch_png(f'{r}/syn/RGB/{name}.png')
        _touch_png(f'{r}/syn/GT/LABELS/{name}_labelTrainIds.png')
        _touch_png(f'{r}/cs/leftImg8bit/val/x/{name}_leftImg8bit.png')
        _touch_png(f'{r}/cs/gtFine/val/x/{name}_gtFine_labelTrainIds.png')
        _touch_png(f'{r}/acdc/rgb_anon/val/fog/GOPR/{name}_rgb_anon.png')
        _touch_png(f'{r}/acdc/gt/val/fog/GOPR/{name}_gt_labelTrainIds.png')
        _touch_png(f'{r}/dz/rgb_anon/train/night/GP/{name}_rgb_anon.png')  # train: no labels
        _touch_png(f'{r}/dz/rgb_anon/val/night/GP/{name}_rgb_anon.png')
        _touch_png(f'{r}/dz/gt/val/night/GP/{name}_gt_labelTrainIds.png')
        _touch_png(f'{r}/f/sub/{name}.png')
        _touch_png(f'{r}/f/sub/{name}_mask.png')
    assert list_samples({'type': 'gta', 'root': f'{r}/gta'}) == [
        (f'{r}/gta/images/a.png', f'{r}/gta/labels/a_labelTrainIds.png'),
        (f'{r}/gta/images/b.png', f'{r}/gta/labels/b_labelTrainIds.png')]
    assert list_samples({'type': 'synthia', 'root': f'{r}/syn'})[1] == (
        f'{r}/syn/RGB/b.png', f'{r}/syn/GT/LABELS/b_labelTrainIds.png')
    assert list_samples({'type': 'cityscapes', 'root': f'{r}/cs', 'split': 'val'})[0] == (
        f'{r}/cs/leftImg8bit/val/x/a_leftImg8bit.png', f'{r}/cs/gtFine/val/x/a_gtFine_labelTrainIds.png')
    assert list_samples({'type': 'acdc', 'root': f'{r}/acdc'}, split='val')[0] == (
        f'{r}/acdc/rgb_anon/val/fog/GOPR/a_rgb_anon.png', f'{r}/acdc/gt/val/fog/GOPR/a_gt_labelTrainIds.png')
    assert list_samples({'type': 'darkzurich', 'root': f'{r}/dz', 'split': 'val'})[1][1] == \
        f'{r}/dz/gt/val/night/GP/b_gt_labelTrainIds.png'
    assert list_samples({'type': 'darkzurich', 'root': f'{r}/dz', 'split': 'train'}, need_labels=False) == [
        (f'{r}/dz/rgb_anon/train/night/GP/a_rgb_anon.png', None),
        (f'{r}/dz/rgb_anon/train/night/GP/b_rgb_anon.png', None)]
    folder = {'type': 'folder', 'root': f'{r}/f', 'img_suffix': '.png', 'label_suffix': '_mask.png'}
    assert list_samples(folder) == [(f'{r}/f/sub/a.png', f'{r}/f/sub/a_mask.png'),
                                    (f'{r}/f/sub/b.png', f'{r}/f/sub/b_mask.png')]
    assert list_samples({**folder, 'label_suffix': None}, need_labels=False) == [
        (f'{r}/f/sub/{n}', None) for n in ('a.png', 'a_mask.png', 'b.png', 'b_mask.png')]


def test_list_samples_errors(tmp_path):
    r = str(tmp_path)
    with pytest.raises(DataError, match=r'dataset root .*nothing \(gta\) does not exist; expected .*images/\*\.png'):
        list_samples({'type': 'gta', 'root': f'{r}/nothing'})
    os.makedirs(f'{r}/cs/leftImg8bit/train')
    with pytest.raises(DataError, match=r'no images ending with .*_leftImg8bit\.png'):
        list_samples({'type': 'cityscapes', 'root': f'{r}/cs'})
    with pytest.raises(DataError, match=r'cityscapes image folder .*leftImg8bit/val does not exist; expected'):
        list_samples({'type': 'cityscapes', 'root': f'{r}/cs', 'split': 'val'})
    _touch_png(f'{r}/cs/leftImg8bit/train/x/x_1_leftImg8bit.png')
    with pytest.raises(DataError, match=r'label folder .*gtFine/train does not exist.*convert_labels\.py cityscapes'):
        list_samples({'type': 'cityscapes', 'root': f'{r}/cs'})
    _touch_png(f'{r}/cs/gtFine/train/x/x_1_gtFine_labelIds.png')
    with pytest.raises(DataError, match=r'not converted.*run `python convert_labels\.py cityscapes .*cs`'):
        list_samples({'type': 'cityscapes', 'root': f'{r}/cs'})
    # the first image without a label is named, with the expected label path
    for name in ('a', 'b', 'c'):
        _touch_png(f'{r}/gta/images/{name}.png')
    _touch_png(f'{r}/gta/labels/a_labelTrainIds.png')
    _touch_png(f'{r}/gta/labels/c_labelTrainIds.png')
    with pytest.raises(DataError, match=r'image .*gta/images/b\.png has no label: '
                                        r'expected .*gta/labels/b_labelTrainIds\.png'):
        list_samples({'type': 'gta', 'root': f'{r}/gta'})
    partial = list_samples({'type': 'gta', 'root': f'{r}/gta'}, need_labels=False)
    assert [lbl is None for _, lbl in partial] == [False, True, False]
    # the test split needs no labels by default
    _touch_png(f'{r}/cs/leftImg8bit/test/y/y_1_leftImg8bit.png')
    assert list_samples({'type': 'cityscapes', 'root': f'{r}/cs', 'split': 'test'}) == [
        (f'{r}/cs/leftImg8bit/test/y/y_1_leftImg8bit.png', None)]
    with pytest.raises(DataError, match='has no labels: set label_suffix'):
        list_samples({'type': 'folder', 'root': f'{r}/gta'})
    with pytest.raises(DataError, match='unknown dataset type'):
        list_samples({'type': 'kitti', 'root': r})


def test_list_images(tmp_path):
    for name in ('b.JPG', 'a.png', 'sub/c.jpeg', 'd.bmp', 'notes.txt', '.x.png.0123abcd.tmp'):
        os.makedirs(os.path.dirname(str(tmp_path / name)), exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    assert list_images(str(tmp_path)) == [str(tmp_path / n) for n in ('a.png', 'b.JPG', 'd.bmp', 'sub/c.jpeg')]
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(DataError, match='no images'):
        list_images(str(tmp_path / 'empty'))
    with pytest.raises(DataError, match='does not exist'):
        list_images(str(tmp_path / 'missing'))


# --------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------

def test_rescale_size():
    assert rescale_size(1052, 1914, (2560, 1440)) == (1407, 2560)  # GTA -> HRDA source scale
    assert rescale_size(760, 1280, (2560, 1520)) == (1520, 2560)  # Synthia
    assert rescale_size(1024, 2048, (1024, 512)) == (512, 1024)  # Cityscapes, DAFormer scale
    assert rescale_size(1080, 1920, (1920, 1080)) == (1080, 1920)
    assert rescale_size(2048, 1024, (2048, 1024)) == (2048, 1024)  # portrait keeps its orientation
    assert rescale_size(100, 301, (200, 100)) == (66, 200)  # 301 * 200/301 = 200, 100 * 0.664 + 0.5 = 66.9 -> 66
    assert rescale_size(5, 8, (4, 4)) == (3, 4)  # 2.5 rounds half up (int(x + 0.5)), not to even


def test_margin_mask():
    expected = np.zeros((6, 10), np.uint8)
    expected[1:4, 3:8] = 1  # top 1, bottom 2, left 3, right 2
    np.testing.assert_array_equal(mic_data.margin_mask((6, 10), [1, 2, 3, 2]), expected)
    assert (mic_data.margin_mask((6, 10), [0, 0, 0, 0]) == 1).all()


def test_resize_image_is_cv2_bilinear():
    img = np.array([[0, 100]], np.uint8)[..., None].repeat(3, axis=2)  # 1 x 2
    # align_corners=False: source x = (dst + 0.5) * 0.5 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped
    np.testing.assert_array_equal(resize_image(img, (1, 4))[0, :, 0], [0, 25, 75, 100])
    img = np.array([[0, 10, 20, 31]], np.uint8)[..., None].repeat(3, axis=2)
    # downscale by 2 without antialiasing: samples at x = 0.5, 2.5 -> means of neighbours, rounded
    np.testing.assert_array_equal(resize_image(img, (1, 2))[0, :, 0], [5, 26])
    assert resize_image(img, (1, 4)) is img  # no resize at the same size
    img = np.arange(8, dtype=np.uint8)[None, :, None].repeat(3, axis=2)
    # 0.5, 2.5, 4.5, 6.5: halves round up as in cv2's fixed-point kernel (not to even)
    np.testing.assert_array_equal(resize_image(img, (1, 4))[0, :, 0], [1, 3, 5, 7])
    out = resize_image(np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8), (11, 5))
    assert out.shape == (11, 5, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_resize_label_nearest():
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    # cv2 INTER_NEAREST: source index floor(dst * in / out)
    np.testing.assert_array_equal(resize_label(label, (2, 3)), [[0, 1, 2], [4, 5, 6]])
    np.testing.assert_array_equal(resize_label(label, (5, 7))[:, [0, 1, 2, 6]],
                                  [[0, 0, 1, 3], [0, 0, 1, 3], [4, 4, 5, 7], [4, 4, 5, 7], [8, 8, 9, 11]])


def test_random_crop_box_range():
    rng = np.random.default_rng(0)
    boxes = np.array([random_crop_box(rng, (30, 50), (10, 20)) for _ in range(2000)])
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, 1] <= 30).all() and (boxes[:, 3] <= 50).all()
    assert (boxes[:, 1] - boxes[:, 0] == 10).all() and (boxes[:, 3] - boxes[:, 2] == 20).all()
    assert boxes[:, 0].min() == 0 and boxes[:, 0].max() == 20 and boxes[:, 2].max() == 30  # offsets reach both ends
    assert random_crop_box(rng, (5, 8), (10, 20)) == (0, 10, 0, 20)  # smaller image: all of it (then padded)


class CountingRng:
    """Wraps a Generator and counts integers() calls (2 per crop box)."""

    def __init__(self, seed):
        self.rng, self.calls = np.random.default_rng(seed), 0

    def integers(self, *args, **kwargs):
        self.calls += 1
        return self.rng.integers(*args, **kwargs)


def _satisfies(crop, ratio=0.75):
    counts = np.bincount(crop[crop != 255], minlength=256)
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio():
    # road everywhere except an 18 x 18 block of cars at the top-left; 20 x 20 crops of a 40 x 40 label
    label = np.zeros((40, 40), np.uint8)
    label[:18, :18] = 13
    label[30:, 30:] = 255  # ignored pixels do not count
    outcomes = set()
    for seed in range(30):
        rng = CountingRng(seed)
        y1, y2, x1, x2 = crop_box_cat_max_ratio(rng, label, (20, 20), 0.75)
        draws = rng.calls // 2
        # replay the same draws: the result is the first satisfying box, else the 11th box
        replay = np.random.default_rng(seed)
        boxes = [random_crop_box(replay, (40, 40), (20, 20)) for _ in range(draws)]
        ok = [_satisfies(label[a:b, c:d]) for a, b, c, d in boxes]
        assert boxes[-1] == (y1, y2, x1, x2)
        assert not any(ok[:-1]) and (ok[-1] or draws == 11)
        outcomes.add((ok[-1], draws == 11))
    assert (True, False) in outcomes and len(outcomes) >= 2  # accepted early, and also after re-draws
    # a label of one class: never satisfiable -> exactly 11 boxes drawn
    rng = CountingRng(0)
    crop_box_cat_max_ratio(rng, np.zeros((40, 40), np.uint8), (20, 20), 0.75)
    assert rng.calls == 22
    rng = CountingRng(0)
    crop_box_cat_max_ratio(rng, label, (20, 20), 1.0)  # ratio 1: no constraint, one box
    assert rng.calls == 2
    rng = CountingRng(0)
    crop_box_cat_max_ratio(rng, np.full((40, 40), 255, np.uint8), (20, 20), 0.75)  # nothing labelled
    assert rng.calls == 22


def test_cat_max_ratio_is_honoured_when_possible():
    label = np.zeros((40, 40), np.uint8)
    label[:18, :18] = 13  # 28% of the boxes satisfy the ratio: with 11 draws 97% of the crops do
    ok = sum(_satisfies(label[a:b, c:d]) for a, b, c, d in
             (crop_box_cat_max_ratio(np.random.default_rng(seed), label, (20, 20), 0.75) for seed in range(50)))
    plain = sum(_satisfies(label[a:b, c:d]) for a, b, c, d in
                (random_crop_box(np.random.default_rng(seed), (40, 40), (20, 20)) for seed in range(50)))
    assert ok >= 45 and plain <= 25


# --------------------------------------------------------------------------
# UDA samples
# --------------------------------------------------------------------------

def coordinate_image(h, w):
    """RGB image whose pixel (y, x) is (5x, 5y, 77): a crop reveals where it came from."""
    y, x = np.mgrid[:h, :w]
    return np.stack([5 * x, 5 * y, np.full_like(x, 77)], axis=-1).astype(np.uint8)


def label_at(y, x):
    return (x + 2 * y) % 19


@pytest.fixture
def coord_data(tmp_path, write_cityscapes):
    """GTA source (train ids written directly) and Cityscapes target, 30 x 40, coordinate-encoded."""
    h, w = 30, 40
    y, x = np.mgrid[:h, :w]
    img = coordinate_image(h, w)
    gta = tmp_path / 'gta'
    os.makedirs(gta / 'images')
    os.makedirs(gta / 'labels')
    for i in range(2):
        Image.fromarray(img).save(gta / 'images' / f'{i:05d}.png')
        Image.fromarray(label_at(y, x).astype(np.uint8)).save(gta / 'labels' / f'{i:05d}_labelTrainIds.png')
    write_cityscapes(str(tmp_path / 'cs'), 'train', 'aachen', [np.zeros((h, w), np.uint8)] * 3, images=[img] * 3)
    return {
        'source': {'type': 'gta', 'root': str(gta), 'img_scale': [40, 30]},
        'target': {'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'train', 'img_scale': [40, 30],
                   'crop_pseudo_margins': [2, 3, 4, 5]},
        'crop_size': [16, 20], 'cat_max_ratio': 1.0, 'rcs': {'enabled': False}, 'batch_size': 2, 'num_workers': 0,
    }


def decode_coordinates(img):
    """Normalised crop [3,h,w] of a coordinate image -> integer (y, x) per pixel."""
    rgb = np.rint(denormalize(img)).astype(int)
    assert (rgb[..., 2] == 77).all()
    return rgb[..., 1] // 5, rgb[..., 0] // 5


def test_crop_flip_keeps_image_label_mask_aligned(coord_data):
    ds = UDADataset(coord_data, seed=3)
    flips, seen = set(), np.zeros((30, 40), bool)
    for k in range(48):
        s = ds[k]
        assert s['img'].shape == (3, 16, 20) and s['img'].dtype == torch.float32
        assert s['gt'].shape == (1, 16, 20) and s['gt'].dtype == torch.uint8
        assert s['target_img'].shape == (3, 16, 20) and s['valid_pseudo_mask'].dtype == torch.uint8
        assert s['rare_class'].dtype == torch.int64 and int(s['rare_class']) == -1
        y, x = decode_coordinates(s['img'])
        # a contiguous box inside the 30 x 40 image, mirrored or not
        assert (y == y[:, :1]).all() and (np.diff(y[:, 0]) == 1).all() and 0 <= y.min() and y.max() < 30
        step = np.diff(x, axis=1)
        assert (step == step[0, 0]).all() and abs(step[0, 0]) == 1 and 0 <= x.min() and x.max() < 40
        flips.add(step[0, 0])
        np.testing.assert_array_equal(s['gt'][0].numpy(), label_at(y, x))
        ty, tx = decode_coordinates(s['target_img'])
        inside = (ty >= 2) & (ty < 30 - 3) & (tx >= 4) & (tx < 40 - 5)
        np.testing.assert_array_equal(s['valid_pseudo_mask'][0].numpy(), inside.astype(np.uint8))
        seen[ty, tx] = True
    assert flips == {-1, 1}
    assert seen[:, 3].any() and seen[:, 35].any() and seen[1].any() and seen[27].any()  # every margin's edge


def test_padding_when_the_image_is_smaller_than_the_crop(coord_data):
    cfg = {**coord_data, 'crop_size': [32, 44]}  # image 30 x 40
    s = UDADataset(cfg, seed=0)[0]
    assert s['img'].shape == (3, 32, 44)
    assert (s['img'][:, 30:] == 0).all() and (s['img'][:, :, 40:] == 0).all()
    assert (s['gt'][0, 30:] == 255).all() and (s['gt'][0, :, 40:] == 255).all() and (s['gt'][0, :30, :40] != 255).all()
    assert (s['valid_pseudo_mask'][0, 30:] == 0).all() and (s['valid_pseudo_mask'][0, :, 40:] == 0).all()
    y, x = decode_coordinates(s['img'][:, :30, :40])
    np.testing.assert_array_equal(s['gt'][0, :30, :40].numpy(), label_at(y, x))


def test_no_margins_gives_an_all_ones_mask(coord_data):
    cfg = {**coord_data, 'target': {**coord_data['target'], 'crop_pseudo_margins': None}}
    assert (UDADataset(cfg, seed=0)[1]['valid_pseudo_mask'] == 1).all()


def test_resize_to_img_scale(coord_data):
    cfg = {**coord_data, 'source': {**coord_data['source'], 'img_scale': [80, 60]}, 'crop_size': [60, 80]}
    ds = UDADataset(cfg, seed=0)
    label = label_at(*np.mgrid[:30, :40]).repeat(2, axis=0).repeat(2, axis=1)  # nearest x2
    for k in range(4):  # upscaled x2 to 60 x 80: the crop is the whole resized image, maybe mirrored
        gt = ds[k]['gt'][0].numpy()
        assert np.array_equal(gt, label) or np.array_equal(gt, label[:, ::-1])


def test_label_size_tolerance(coord_data):
    labels = os.path.join(coord_data['source']['root'], 'labels')
    y, x = np.mgrid[:31, :40]  # one row more than the 30 x 40 image: resized to the image (as the reference)
    Image.fromarray(label_at(y, x).astype(np.uint8)).save(os.path.join(labels, '00000_labelTrainIds.png'))
    Image.fromarray(label_at(y, x).astype(np.uint8)).save(os.path.join(labels, '00001_labelTrainIds.png'))
    assert UDADataset(coord_data, seed=0)[0]['gt'].shape == (1, 16, 20)
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(os.path.join(labels, '00000_labelTrainIds.png'))
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(os.path.join(labels, '00001_labelTrainIds.png'))
    with pytest.raises(DataError, match=r'label .*_labelTrainIds\.png is 20x30 but its image .*\.png is 40x30'):
        UDADataset(coord_data, seed=0)[0]


def test_sync_crop_takes_one_box_of_both(coord_data):
    plain = UDADataset(coord_data, seed=5)
    synced = UDADataset({**coord_data, 'sync_crop_size': [8, 10]}, seed=5)
    for k in range(6):
        a, b = plain[k], synced[k]
        assert b['img'].shape == (3, 8, 10) and b['gt'].shape == (1, 8, 10)
        # the same draws up to the sync box, so the synced sample is one sub-box of the plain one
        boxes = [(y, x) for y, x in itertools.product(range(9), range(11))
                 if all(torch.equal(a[key][..., y:y + 8, x:x + 10], b[key])
                        for key in ('img', 'gt', 'target_img', 'valid_pseudo_mask'))]
        assert boxes, 'source and target were not cropped at one shared box'


def test_determinism_ranks_and_workers(coord_data):
    a, b = UDADataset(coord_data, seed=7, rank=0), UDADataset(coord_data, seed=7, rank=0)
    c = UDADataset(coord_data, seed=7, rank=1)
    same_rank = all(torch.equal(a[k]['img'], b[k]['img']) and torch.equal(a[k]['target_img'], b[k]['target_img'])
                    for k in range(8))
    other_rank = sum(torch.equal(a[k]['img'], c[k]['img']) for k in range(8))
    assert same_rank and other_rank < 3
    batches = {}
    for workers in (0, 2):
        loader = build_train_loader({**coord_data, 'num_workers': workers}, seed=7)
        batches[workers] = list(itertools.islice(iter(loader), 4))
    for x, y in zip(batches[0], batches[2]):
        assert x['img'].shape == (2, 3, 16, 20) and x['gt'].shape == (2, 1, 16, 20) and x['rare_class'].shape == (2,)
        for key in x:
            assert torch.equal(x[key], y[key])
    # batch i = samples 2i, 2i + 1 of the dataset
    assert torch.equal(batches[0][1]['img'][0], a[2]['img']) and torch.equal(batches[0][1]['gt'][1], a[3]['gt'])


def test_resume_continues_the_same_samples(coord_data):
    full = list(itertools.islice(iter(build_train_loader(coord_data, seed=1)), 5))
    resumed = list(itertools.islice(iter(build_train_loader(coord_data, seed=1, start_iter=3)), 2))
    for x, y in zip(full[3:], resumed):
        assert all(torch.equal(x[key], y[key]) for key in x)
    sampler = InfiniteSampler(start=4)
    it = iter(sampler)
    assert [next(it) for _ in range(3)] == [4, 5, 6] and sampler.state_dict() == {'next_index': 7}
    other = InfiniteSampler()
    other.load_state_dict(sampler.state_dict())
    assert list(itertools.islice(iter(other), 2)) == [7, 8]


# --------------------------------------------------------------------------
# Rare class sampling
# --------------------------------------------------------------------------

def test_rcs_class_probs_hand_computed(tmp_path):
    stats = [{'0': 500, '1': 100, 'file': 'a'}, {'0': 100, '1': 200, '2': 100, 'file': 'b'}]
    (tmp_path / 'sample_class_stats.json').write_text(json.dumps(stats))
    classes, probs = rcs_class_probs(str(tmp_path / 'sample_class_stats.json'), 0.5)
    # totals 0: 600, 1: 300, 2: 100 -> ascending [2, 1, 0], f = [0.1, 0.3, 0.6]
    # softmax((1 - f) / 0.5) = softmax([1.8, 1.4, 0.8]) = [6.0496, 4.0552, 2.2255] / 12.3303
    assert classes == [2, 1, 0]
    np.testing.assert_allclose(probs, [0.490632, 0.328880, 0.180489], atol=1e-5)
    with pytest.raises(DataError, match=r'run `python convert_labels\.py gta .*nowhere`'):
        rcs_class_probs(str(tmp_path / 'nowhere' / 'sample_class_stats.json'), 0.01, kind='gta')


@pytest.fixture
def rcs_data(tmp_path, write_gta, write_cityscapes):
    """3 GTA files of 40 x 40 road; file 1 has a 24 x 24 block of poles at the top-left (576 px), the
    others 9 pole pixels. Image colour = 50 * file index."""
    labels, images = [], []
    for i in range(3):
        label = np.full((40, 40), 7, np.uint8)  # road
        if i == 1:
            label[:24, :24] = 17  # pole
        else:
            label[20:23, 20:23] = 17
        labels.append(label)
        images.append(np.full((40, 40, 3), 50 * i, np.uint8))
    write_gta(str(tmp_path / 'gta'), labels, images)
    convert_dataset('gta', str(tmp_path / 'gta'), progress=False)
    write_cityscapes(str(tmp_path / 'cs'), 'train', 'aachen', [np.zeros((40, 40), np.uint8)])
    return {
        'source': {'type': 'gta', 'root': str(tmp_path / 'gta'), 'img_scale': [40, 40]},
        'target': {'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'train', 'img_scale': [40, 40]},
        'crop_size': [20, 20], 'cat_max_ratio': 1.0,
        'rcs': {'enabled': True, 'temperature': 0.01, 'min_pixels': 100, 'min_crop_ratio': 1.0},
    }


def test_rcs_samples_rare_files_and_recrops(rcs_data):
    ds = UDADataset(rcs_data, seed=0)
    assert ds.rcs_classes == [5, 0]  # pole is rarer than road
    poles = []
    for k in range(30):
        s = ds[k]
        c = int(s['rare_class'])
        file_index = int(round(denormalize(s['img'])[0, 0, 0] / 50))
        if c == 5:
            assert file_index == 1  # the only file with more than min_pixels pole pixels
            poles.append(int((s['gt'] == 5).sum()))
    assert len(poles) >= 28  # p(pole) = softmax: ~1 at T = 0.01
    # a crop hits > 100 pole pixels with p = 0.70; with up to 10 re-crops all do (p fail ~ 2e-6 each)
    assert min(poles) > 100
    without = UDADataset({**rcs_data, 'rcs': {**rcs_data['rcs'], 'min_crop_ratio': 0.0}}, seed=0)
    counts = [int((without[k]['gt'] == 5).sum()) for k in range(30) if int(without[k]['rare_class']) == 5]
    assert min(counts) <= 100  # without re-crops some miss (p all hit = 0.7^30 ~ 2e-5)


def test_rcs_matches_stats_by_basename(rcs_data):
    root = rcs_data['source']['root']
    path = os.path.join(root, 'samples_with_class.json')
    with open(path) as f:
        with_class = json.load(f)
    moved = {c: [['/elsewhere/data/gta/labels/' + os.path.basename(p), n] for p, n in v] for c, v in with_class.items()}
    with open(path, 'w') as f:
        json.dump(moved, f)
    ds = UDADataset(rcs_data, seed=0)
    assert ds.rcs_files[5] == [1] and ds.rcs_files[0] == [0, 1, 2]
    moved['5'].append(['/elsewhere/data/gta/labels/99999_labelTrainIds.png', 5000])
    with open(path, 'w') as f:
        json.dump(moved, f)
    with pytest.raises(DataError, match=r'99999_labelTrainIds\.png.*stale.*convert_labels\.py gta'):
        UDADataset(rcs_data, seed=0)


def test_rcs_missing_stats(rcs_data):
    os.remove(os.path.join(rcs_data['source']['root'], 'sample_class_stats.json'))
    with pytest.raises(DataError, match=r'sample_class_stats\.json.*does not exist.*python convert_labels\.py gta'):
        UDADataset(rcs_data, seed=0)


# --------------------------------------------------------------------------
# Evaluation data
# --------------------------------------------------------------------------

def test_eval_dataset(tmp_path, write_cityscapes):
    labels = [np.random.default_rng(i).integers(0, 19, (30, 40)).astype(np.uint8) for i in range(2)]
    write_cityscapes(str(tmp_path / 'cs'), 'val', 'lindau', labels, train_ids=True)
    ds = EvalDataset({'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'val', 'img_scale': [20, 15]})
    assert len(ds) == 2
    s = eval_collate([ds[1]])
    assert s['img'].shape == (3, 15, 20) and s['img'].dtype == torch.float32
    assert s['ori_size'] == (30, 40) and s['label'].dtype == torch.uint8
    np.testing.assert_array_equal(s['label'].numpy(), labels[1])
    assert s['img_path'].endswith('lindau_000001_000019_leftImg8bit.png')
    assert s['label_path'].endswith('lindau_000001_000019_gtFine_labelTrainIds.png')
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=eval_collate)
    assert [b['ori_size'] for b in loader] == [(30, 40), (30, 40)]
    # test split without labels
    test_dir = tmp_path / 'cs' / 'leftImg8bit' / 'test' / 'berlin'
    os.makedirs(test_dir)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(test_dir / 'b_leftImg8bit.png')
    t = EvalDataset({'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'test', 'img_scale': [40, 30]},
                    need_labels=False)[0]
    assert t['label'] is None and t['label_path'] is None and t['img'].shape == (3, 30, 40)
    # a label of the wrong size
    Image.fromarray(labels[0][:20]).save(ds.samples[0][1])
    with pytest.raises(DataError, match=r'label .*lindau_000000_000019_gtFine_labelTrainIds\.png is 40x20 '
                                        r'but its image .* is 40x30'):
        ds[0]
