"""Own data and inference: every folder layout of docs/own_data_inference.md, EXIF orientation,
N-band images, test-time augmentation, the Python inference API (load_model, predict) against the
CLI bit for bit, the --images outputs, ids upsampled in strips, mic_data check, and the 4-class
aerial task of the docs trained, evaluated and predicted by the docs' own commands."""
import contextlib
import io
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _p in (REPO, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import convert_labels  # noqa: E402
import mic_config  # noqa: E402
import mic_data  # noqa: E402
import mic_eval  # noqa: E402
import mic_model  # noqa: E402
import mic_predict  # noqa: E402
import mic_train  # noqa: E402
import test_eval as te  # noqa: E402  (its small checkpoints and configs)
from mic_data import DataError  # noqa: E402

torch.set_num_threads(2)


def save(path, array, mode=None, **kw):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(array, mode=mode).save(str(path), **kw)


def run_cli(main, argv):
    """main(argv) in-process -> (result, stdout, stderr, error line or None)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return main([str(a) for a in argv]), out.getvalue(), err.getvalue(), None
        except SystemExit as e:
            errors = [line for line in err.getvalue().splitlines() if line.startswith('error: ')]
            assert e.code == 2 and len(errors) == 1 and 'Traceback' not in err.getvalue(), err.getvalue()
            return None, out.getvalue(), err.getvalue(), errors[0]


# --------------------------------------------------------------------------
# Folder layouts: labels beside the images or in their own folder, any suffixes
# --------------------------------------------------------------------------

def _pair(root, img_rel, lbl_rel, ids, img_ext='png'):
    h, w = ids.shape
    img = np.full((h, w, 3), 100, np.uint8)
    if img_ext == 'jpg':
        save(os.path.join(root, img_rel), img, quality=95)
    else:
        save(os.path.join(root, img_rel), img)
    save(os.path.join(root, lbl_rel), ids)


LAYOUTS = {  # name: (image, label, dataset keys)
    'own folders, one suffix': ('images/a/x.png', 'labels/a/x.png', dict(img_dir='images', label_dir='labels',
                                                                          label_suffix='.png')),
    'own folders, jpg images': ('images/x.jpg', 'labels/x.png', dict(img_dir='images', label_dir='labels',
                                                                      img_suffix='.jpg', label_suffix='.png')),
    'beside, other extension': ('x.jpg', 'x.png', dict(img_suffix='.jpg', label_suffix='.png')),
    'beside, suffix': ('sub/x.png', 'sub/x_mask.png', dict(label_suffix='_mask.png')),
    'labels inside the images': ('x_rgb.png', 'gt/x_gt.png', dict(label_dir='gt', img_suffix='_rgb.png',
                                                                  label_suffix='_gt.png')),
    'converted names': ('images/x.png', 'labels/x_labelTrainIds.png', dict(img_dir='images', label_dir='labels',
                                                                          label_suffix='_labelTrainIds.png')),
}


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_every_layout_lists_its_pairs(tmp_path, layout):
    img_rel, lbl_rel, keys = LAYOUTS[layout]
    ids = np.zeros((8, 8), np.uint8)
    _pair(tmp_path, img_rel, lbl_rel, ids, img_rel.rsplit('.', 1)[1])
    _pair(tmp_path, img_rel.replace('x', 'y'), lbl_rel.replace('x', 'y'), ids, img_rel.rsplit('.', 1)[1])
    cfg = {'type': 'folder', 'root': str(tmp_path), **keys}
    samples = mic_data.list_samples(cfg)
    assert [(os.path.relpath(i, tmp_path), os.path.relpath(lbl, tmp_path)) for i, lbl in samples] == [
        (img_rel, lbl_rel), (img_rel.replace('x', 'y'), lbl_rel.replace('x', 'y'))]
    # the labels as convert_labels.py writes them are read instead, with the same label_suffix
    if not lbl_rel.endswith('_labelTrainIds.png'):
        for lbl in (lbl_rel, lbl_rel.replace('x', 'y')):
            stem = lbl[:-len(keys['label_suffix'])]
            save(tmp_path / (stem + '_labelTrainIds.png'), ids)
        assert [os.path.relpath(lbl, tmp_path) for _, lbl in mic_data.list_samples(cfg)] == [
            lbl_rel[:-len(keys['label_suffix'])] + '_labelTrainIds.png',
            lbl_rel.replace('x', 'y')[:-len(keys['label_suffix'])] + '_labelTrainIds.png']


def test_raw_label_suffix_in_the_config_reads_the_converted_labels(tmp_path):
    """The easy mix-up: label_suffix .png (the raw labels' suffix, as given to convert_labels.py)
    trains on the converted labels; half-converted folders and one folder with one suffix say what to do."""
    root = tmp_path / 'd'
    for name in ('a', 'b'):
        save(root / 'images' / f'{name}.png', np.zeros((8, 8, 3), np.uint8))
        rgb = np.zeros((8, 8, 3), np.uint8)
        rgb[:4] = (255, 0, 0)
        save(root / 'labels' / f'{name}.png', rgb)
    (tmp_path / 'map.yaml').write_text('format: rgb\nclasses:\n  0: [0, 0, 0]\n  1: [255, 0, 0]\n')
    convert_labels.convert_folder(str(root), '.png', img_dir='images', label_dir='labels',
                                  id_map=str(tmp_path / 'map.yaml'), progress=False)
    cfg = {'type': 'folder', 'root': str(root), 'img_dir': 'images', 'label_dir': 'labels', 'label_suffix': '.png'}
    assert [os.path.basename(lbl) for _, lbl in mic_data.list_samples(cfg)] == ['a_labelTrainIds.png',
                                                                              'b_labelTrainIds.png']
    os.remove(root / 'labels' / 'b_labelTrainIds.png')
    with pytest.raises(DataError) as e:
        mic_data.list_samples(cfg)
    assert 'not converted to train ids' in str(e.value) and 'remove' not in str(e.value)
    assert f'python convert_labels.py folder {root} --img-dir images --label-dir labels --label-suffix .png ' \
           f'--id-map MAP.yaml' in str(e.value)
    with pytest.raises(DataError, match='cannot be told apart'):
        mic_data.list_samples({'type': 'folder', 'root': str(root / 'images'), 'label_suffix': '.png'})


# --------------------------------------------------------------------------
# Reading images: EXIF orientation, bands
# --------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)  # stored landscape; the camera was turned: Orientation 6
    stored[:, :10] = 255  # a white band on the stored image's left edge
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / 'turned.jpg', exif=exif, quality=98)
    read = mic_data.read_image(str(tmp_path / 'turned.jpg'))
    assert read.shape == (60, 40, 3)  # upright: portrait
    assert read[:10].mean() > 200 and read[20:].mean() < 30  # orientation 6 = rotate 90 clockwise: left -> top
    assert mic_data.image_size(str(tmp_path / 'turned.jpg')) == (60, 40)  # the headers say the same


def test_bands_are_kept_or_refused(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    save(tmp_path / 'a.tif', rgba, mode='RGBA')
    save(tmp_path / 'a.png', rgba, mode='RGBA')
    np.save(tmp_path / 'a.npy', np.concatenate([rgba, rgba[..., :1]], 2))
    np.testing.assert_array_equal(mic_data.read_image(str(tmp_path / 'a.tif'), 4), rgba)
    np.testing.assert_array_equal(mic_data.read_image(str(tmp_path / 'a.npy'), 5)[..., :4], rgba)
    np.testing.assert_array_equal(mic_data.read_image(str(tmp_path / 'a.png')), rgba[..., :3])  # PNG alpha
    with pytest.raises(DataError, match=r'a\.tif has 4 band\(s\), but the model takes 3 \(data.channels\)'):
        mic_data.read_image(str(tmp_path / 'a.tif'))
    save(tmp_path / 'b.png', rgba[..., :3])
    with pytest.raises(DataError, match=r'has 3 band\(s\), but the model takes 4'):
        mic_data.read_image(str(tmp_path / 'b.png'), 4)


def test_imagenet_filters_extended_to_extra_bands(tmp_path):
    cfg = {'type': 'encoder_decoder', 'backbone': {'type': 'mit_b0'}, 'decode_head': {'embed_dims': 32},
           'pretrained': None, 'in_channels': 4}
    rgb = mic_model.build_model({**cfg, 'in_channels': 3})
    torch.save(rgb.backbone.state_dict(), tmp_path / 'mit_b0.pth')  # an ImageNet file of the encoder
    model = mic_model.build_model({**cfg, 'pretrained': str(tmp_path / 'mit_b0.pth')}, load_pretrained=True)
    w, w4 = rgb.backbone.patch_embed1.proj.weight, model.backbone.patch_embed1.proj.weight
    assert w4.shape[1] == 4
    torch.testing.assert_close(w4[:, :3], w * 0.75)
    torch.testing.assert_close(w4[:, 3], w.mean(1) * 0.75)
    # equal bands (a grey scene in RGB and NIR) give the RGB model's features
    grey = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(model.backbone(grey.expand(1, 4, -1, -1))[0], rgb.backbone(grey.expand(1, 3, -1, -1))[0],
                               rtol=1e-4, atol=1e-4)
    resnet = mic_model.build_model({'type': 'encoder_decoder', 'backbone': {'type': 'resnet50_v1c'},
                                    'decode_head': {'type': 'deeplabv2'}, 'pretrained': None, 'in_channels': 5})
    assert resnet.backbone.stem[0].weight.shape[1] == 5


def test_band_config_keys():
    cfg = mic_config.load_config(None, ['data.channels=4', 'data.mean=[1,2,3,4]', 'data.std=[1,1,1,2]'])
    assert cfg.model.in_channels == 4 and mic_data.Bands.of(cfg.data) == mic_data.Bands(4, (1, 2, 3, 4), (1, 1, 1, 2))
    assert 'in_channels' not in mic_config.stored(mic_config.load_config())['model']  # RGB configs stay as they were
    with pytest.raises(mic_config.ConfigError, match="'data.mean': 4 bands"):
        mic_config.load_config(None, ['data.channels=4'])
    with pytest.raises(mic_config.ConfigError, match="'data.std': 3 values for 4 bands"):
        mic_config.load_config(None, ['data.channels=4', 'data.mean=[1,2,3,4]', 'data.std=[1,1,1]'])


def test_four_band_task_trains_and_predicts(tmp_path):
    """RGB + near infrared (RGBA TIFF): a folder task trains two iterations, evaluates and predicts;
    a 3-band image given to the 4-band model is refused, naming both band counts."""
    import yaml
    root = tmp_path / 'nir'
    for domain, n in (('source', 3), ('target', 2)):
        for i in range(n):
            ids = np.zeros((64, 64), np.uint8)
            ids[16 * (i + 1):] = 1
            img = np.zeros((64, 64, 4), np.uint8)
            img[..., :3] = 90  # the classes look alike in RGB; the infrared band tells them apart
            img[..., 3] = 40 + 160 * ids
            save(root / domain / 'images' / f'{i}.tif', img, mode='RGBA')
            if domain == 'source':
                save(root / domain / 'labels' / f'{i}.png', ids)

    def folder(domain, **keys):
        return {'type': 'folder', 'root': str(root / domain), 'img_dir': 'images', 'img_suffix': '.tif',
                'img_scale': [64, 64], **keys}
    labelled = folder('source', label_dir='labels', label_suffix='.png')
    cfg = {'data': {'classes': ['land', 'water'], 'channels': 4, 'mean': [123.675, 116.28, 103.53, 120.0],
                    'std': [58.395, 57.12, 57.375, 80.0], 'source': labelled,
                    'target': folder('target', crop_pseudo_margins=None), 'val': labelled, 'crop_size': [64, 64],
                    'rcs': {'enabled': False}, 'num_workers': 0},
           'model': {'backbone': {'type': 'mit_b0'}, 'pretrained': None, 'decode_head': {'embed_dims': 32},
                     'hrda': {'hr_crop_size': [32, 32]}, 'test': {'mode': 'whole'}},
           'uda': {'fd_lambda': 0},
           'train': {'max_iters': 2, 'log_interval': 1, 'eval_interval': 2, 'ckpt_interval': 2,
                     'debug_img_interval': 2, 'work_dir': str(tmp_path / 'run'), 'device': 'cpu'}}
    (tmp_path / 'nir.yaml').write_text(yaml.safe_dump(cfg))
    metrics, _, _, error = run_cli(mic_train.main, ['--cfg', tmp_path / 'nir.yaml'])
    assert error is None and 0 <= metrics['mIoU'] <= 100
    model = mic_eval.load_model(str(tmp_path / 'run' / 'latest.pth'), device='cpu')
    assert model.backbone.patch_embed1.proj.weight.shape[1] == 4
    ids = mic_eval.predict(model, str(root / 'target' / 'images' / '0.tif'))
    assert ids.shape == (64, 64) and set(np.unique(ids)) <= {0, 1}
    with pytest.raises(DataError, match=r'has 3 band\(s\), but the model takes 4 \(data.channels\)'):
        mic_eval.predict(model, np.zeros((64, 64, 3), np.uint8))


# --------------------------------------------------------------------------
# Prediction: predict() = the CLI, test-time augmentation, strips
# --------------------------------------------------------------------------

@pytest.fixture
def tiny_ckpt(tmp_path):
    cfg = te.tiny_config(tmp_path / 'unused', img_scale=(64, 48))
    te.save_ours(tmp_path / 'latest.pth', cfg)
    return tmp_path / 'latest.pth'


def test_predict_equals_the_cli_bit_for_bit(tmp_path, tiny_ckpt):
    rng = np.random.default_rng(1)
    folder = tmp_path / 'photos'
    save(folder / 'a.png', rng.integers(0, 256, (53, 77, 3), dtype=np.uint8))
    save(folder / 'b.jpg', rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    save(folder / 'c.tif', rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    _, out, err, error = run_cli(mic_eval.main, ['--ckpt', tiny_ckpt, '--images', folder, '--out', tmp_path / 'o',
                                                 '--format', 'all', '--save-confidence'])
    assert error is None and '\r' not in err  # plain progress lines off a terminal
    assert 'wrote colour predictions, overlays, id masks and confidences of 3 images' in out
    model = mic_eval.load_model(str(tiny_ckpt), device='cpu')
    for name, ext in (('a', 'png'), ('b', 'jpg'), ('c', 'tif')):
        written = np.asarray(Image.open(tmp_path / 'o' / f'{name}_ids.png'))
        path = str(folder / f'{name}.{ext}')
        ids = mic_eval.predict(model, path)
        assert ids.dtype == np.uint8 and np.array_equal(ids, written)  # bit for bit
        assert np.array_equal(mic_eval.predict(model, Image.open(path)), ids)  # a PIL image, an array, a tensor
        array = mic_data.read_image(path)
        assert np.array_equal(mic_eval.predict(model, array), ids)
        assert np.array_equal(mic_eval.predict(model, torch.from_numpy(array).permute(2, 0, 1)), ids)
        ids2, probs = mic_eval.predict(model, path, return_probs=True)
        assert probs.shape == (19, *ids.shape) and np.allclose(probs.sum(0), 1, atol=1e-4)
        conf = np.asarray(Image.open(tmp_path / 'o' / f'{name}_conf.png'))
        assert conf.shape == ids.shape and np.abs(conf.astype(int) - np.round(probs.max(0) * 255)).max() <= 1
    # ids through a mapping file: the raw value of each class (ids, or colours)
    (tmp_path / 'map.yaml').write_text('classes:\n' + ''.join(f'  {c}: [{10 * c + 10}, {300 + c}]\n'
                                                              for c in range(19)))
    _, out, _, error = run_cli(mic_eval.main, ['--ckpt', tiny_ckpt, '--images', folder, '--out', tmp_path / 'm',
                                               '--format', 'ids', '--id-map', tmp_path / 'map.yaml'])
    assert error is None and f"(ids: label ids of {tmp_path / 'map.yaml'})" in out
    ids = mic_eval.predict(model, str(folder / 'a.png'))
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'm' / 'a_ids.png')), ids * 10 + 10)
    assert sorted(os.listdir(tmp_path / 'm')) == ['a_ids.png', 'b_ids.png', 'c_ids.png']


def test_failed_images_run_leaves_no_folder(tmp_path, tiny_ckpt):
    folder = tmp_path / 'photos'
    save(folder / 'a.tif', np.zeros((40, 40, 4), np.uint8), mode='RGBA')  # 4 bands into an RGB model
    _, _, _, error = run_cli(mic_eval.main, ['--ckpt', tiny_ckpt, '--images', folder, '--out', tmp_path / 'o'])
    assert 'a.tif has 4 band(s), but the model takes 3' in error
    assert not (tmp_path / 'o').exists()


def test_flip_tta_is_the_mean_of_the_two_passes(tiny_ckpt):
    model = mic_eval.load_model(str(tiny_ckpt), device='cpu')
    x = torch.randn(1, 3, 48, 64)
    scores, are_probs = mic_predict.model_scores(model, x, flip=True)
    plain = model.inference(x).softmax(1)
    mirrored = model.inference(x.flip(3)).softmax(1).flip(3)
    assert are_probs and torch.allclose(scores, (plain + mirrored) / 2, atol=1e-6)
    # from the config: model.test.flip / model.test.scales, in predict() and evaluation alike
    cfg = mic_config.load_config(None, ['model.test.flip=true', 'model.test.scales=[0.75,1.0]'])
    assert cfg.model.test.flip and cfg.model.test.scales == [0.75, 1.0]
    assert 'flip' not in mic_config.stored(mic_config.load_config())['model']['test']  # (not stored at their defaults)
    model.test_cfg.update(flip=True, scales=[0.75, 1.0])
    assert mic_predict.test_time_options(model) == (True, [0.75, 1.0])
    scores, _ = mic_predict.model_scores(model, x, True, [0.75, 1.0])
    small = F.interpolate(x, size=(36, 48), mode='bilinear', align_corners=False)
    passes = [model.inference(small).softmax(1), model.inference(small.flip(3)).softmax(1).flip(3)]
    passes = [F.interpolate(p, size=(48, 64), mode='bilinear', align_corners=False) for p in passes]
    assert torch.allclose(scores, (plain + mirrored + passes[0] + passes[1]) / 4, atol=1e-6)


def test_strips_match_whole_map_upsampling(monkeypatch):
    scores = torch.randn(5, 30, 40)
    whole = F.interpolate(scores[None], size=(301, 413), mode='bilinear', align_corners=False)[0]
    monkeypatch.setattr(mic_predict, 'STRIP_ELEMENTS', 5 * 413 * 7)  # strips of 7 rows
    ids, conf = mic_predict.scores_to_ids(scores, False, (301, 413), confidence=True)
    assert (ids.long() == whole.argmax(0)).float().mean() > 0.999  # (float rounding may flip near-ties)
    assert (conf.int() - (whole.softmax(0).max(0).values * 255).round().int()).abs().max() <= 1
    rows = mic_predict.resize_rows(scores, (301, 413), 100, 107)
    torch.testing.assert_close(rows, whole[:, 100:107], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# mic_data check
# --------------------------------------------------------------------------

def test_check_data_reports_and_stops(tmp_path):
    root = tmp_path / 'd'
    for i in range(3):
        _pair(root, f'images/{i}.png', f'labels/{i}.png', np.zeros((40, 60), np.uint8))
    ds = {'type': 'folder', 'root': str(root), 'img_dir': 'images', 'label_dir': 'labels', 'label_suffix': '.png',
          'img_scale': [512, 512]}
    cfg = mic_config.load_config(None, ['data.classes=[a, b]', 'uda.fd_lambda=0', f'data.source={ds}',
                                        f'data.target={ds}', f'data.val={ds}', 'data.crop_size=[128,128]',
                                        'model.hrda.hr_crop_size=[64,64]'])
    report = mic_data.check_data(cfg, stats_images=2)
    assert report['lines'][0] == 'source: 3 images, 60x40; img_scale [512, 512] -> 512x341'
    assert any('enlarges the source images 8.5x' in w and '[60, 40]' in w for w in report['warnings'])
    assert 'per-band mean and std of 2 source images' in report['lines'][-1]
    (tmp_path / 'c.yaml').write_text(mic_config.dump_yaml(cfg))
    _, out, _, error = run_cli(mic_data.main, ['check', '--stats', '0', tmp_path / 'c.yaml'])
    assert error is None and 'data check passed with' in out
    save(root / 'labels' / '1.png', np.zeros((41, 60), np.uint8))
    with pytest.raises(DataError, match=r'source label .*labels/1\.png is 60x41 but its image .*images/1\.png is 60x40'):
        mic_data.check_data(cfg)


# --------------------------------------------------------------------------
# The goal: a 4-class aerial task by the commands of docs/own_data_inference.md
# --------------------------------------------------------------------------

AERIAL_COLOURS = [(255, 255, 255), (0, 0, 255), (0, 255, 0), (255, 255, 0)]  # RGB source labels
AERIAL_IDS = [10, 20, 30, 40]  # grayscale ids of the target val labels


def write_aerial_task(root, seed=0):
    """source: JPEG images, RGB-coded labels; target: PNG images of another size; target_val: PNG
    images with labels of ids 10/20/30/40 (0: unlabelled); labels in their own folders."""
    rng = np.random.default_rng(seed)
    looks = np.array([(150, 150, 140), (190, 90, 70), (60, 140, 60), (200, 190, 80)], np.float32)
    for domain, n, (h, w), ext, labels in (('source', 6, (96, 128), 'jpg', 'rgb'), ('target', 4, (80, 80), 'png', None),
                                           ('target_val', 3, (80, 80), 'png', 'ids')):
        for i in range(n):
            ids = np.zeros((h, w), np.uint8)
            ids[h // 2:] = 1
            ids[:, :w // 3] = 2
            ids[rng.integers(0, h - 12):, rng.integers(0, w - 12):][:10, :10] = 3
            img = np.clip(looks[ids] * (1.0 if domain == 'source' else 0.7) + rng.normal(0, 6, (h, w, 3)), 0, 255)
            path = f'{root}/{domain}/images/{i:03d}.{ext}'
            save(path, img.astype(np.uint8), **({'quality': 95} if ext == 'jpg' else {}))
            if labels == 'rgb':
                save(f'{root}/{domain}/labels/{i:03d}.png', np.array(AERIAL_COLOURS, np.uint8)[ids])
            elif labels == 'ids':
                save(f'{root}/{domain}/labels/{i:03d}.png', np.array(AERIAL_IDS, np.uint8)[ids])
    return root


def doc_blocks(kind):
    text = open(os.path.join(REPO, 'docs', 'own_data_inference.md'), encoding='utf-8').read()
    return re.findall(rf'```{kind}\n(.*?)```', text, re.S)


def doc_file(name):
    """The docs' file block that starts with '# <name>'."""
    (block,) = [b for b in doc_blocks('yaml') if b.startswith(f'# {name}')]
    return block


SCRIPTS = {'convert_labels.py': convert_labels.main, 'mic_train.py': mic_train.main, 'mic_eval.py': mic_eval.main,
           'mic_data.py': mic_data.main}
FAST = ['model.backbone.type=mit_b0', 'model.pretrained=null', 'uda.fd_lambda=0', 'model.decode_head.embed_dims=32',
        'model.hrda.hr_crop_size=[32,32]', 'data.crop_size=[64,64]', 'data.source.img_scale=[128,96]',
        'data.target.img_scale=[80,80]', 'data.val.img_scale=[80,80]', 'model.test.mode=whole',
        'data.rcs.min_pixels=20', 'data.num_workers=0',
        'train.max_iters=2', 'train.log_interval=1', 'train.eval_interval=2', 'train.ckpt_interval=2',
        'train.debug_img_interval=0', 'train.device=cpu']


def run_doc_command(line, base):
    argv = shlex.split(line.replace('data/aerial', f'{base}/data/aerial').replace('work_dirs/aerial',
                                                                                  f'{base}/work_dirs/aerial')
                       .replace('aerial.yaml', f'{base}/aerial.yaml'))
    assert argv[0] == 'python' and argv[1] in SCRIPTS, line
    args = argv[2:]
    if argv[1] == 'mic_train.py':
        args += ['--opt', *FAST] if '--opt' not in args else FAST
    result, out, err, error = run_cli(SCRIPTS[argv[1]], args)
    assert error is None, (line, error)
    return result, out


def test_aerial_task_by_the_docs_commands(tmp_path):
    base = str(tmp_path)
    write_aerial_task(f'{base}/data/aerial')
    for name in ('source_map.yaml', 'val_map.yaml'):
        (tmp_path / 'data' / 'aerial' / name).write_text(doc_file(name))
    (tmp_path / 'aerial.yaml').write_text(doc_file('aerial.yaml').replace('data/aerial', f'{base}/data/aerial')
                                          .replace('work_dirs/aerial', f'{base}/work_dirs/aerial'))
    (block,) = [b for b in doc_blocks('bash') if 'convert_labels.py' in b]  # the worked example's commands
    commands = [line.strip() for line in block.splitlines() if line.startswith('python ')]
    assert [c.split()[1] for c in commands] == ['convert_labels.py', 'convert_labels.py', 'mic_data.py',
                                                 'mic_train.py', 'mic_eval.py', 'mic_eval.py']
    results = [run_doc_command(c, base) for c in commands]
    metrics = results[3][0]
    assert 0 <= metrics['mIoU'] <= 100 and results[4][0]['mIoU'] == pytest.approx(metrics['mIoU'])
    pred = tmp_path / 'work_dirs' / 'aerial' / 'pred_target'
    for i in range(4):
        ids = np.asarray(Image.open(pred / f'{i:03d}_ids.png'))
        assert ids.shape == (80, 80) and set(np.unique(ids)) <= set(AERIAL_IDS)  # the target's own label ids
