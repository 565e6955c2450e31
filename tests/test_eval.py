"""mic_eval: metrics against hand computations and the official Cityscapes script, exports, inference
on any images, checkpoint layouts, distributed evaluation and every bad-input message."""
import contextlib
import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import helpers
import mic_eval
import mic_model
from mic_config import defaults, merge, to_plain
from mic_data import CLASSES, IMG_MEAN, IMG_STD, PALETTE, SYNTHIA_CLASSES, TRAIN_ID_TO_CS_ID
from mic_uda import block_mask

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 64, 32  # image size of the small datasets
CS_EVAL_IDS = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}


# --------------------------------------------------------------------------
# Helpers: datasets whose images encode the prediction, tiny models, checkpoints
# --------------------------------------------------------------------------

def encode_image(pred, seed=0):
    """An RGB image whose red channel carries the train id to predict: R = 10 * id + 5."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*pred.shape, 3), dtype=np.uint8)
    img[..., 0] = pred.astype(np.uint8) * 10 + 5
    return img


def decoded_inference(self, img, out_size=None):
    """Stands in for model.inference: one-hot logits of the train ids encoded in the image."""
    red = img[:, 0] * IMG_STD[0] + IMG_MEAN[0]
    cls = torch.div(red.round().long(), 10, rounding_mode='floor').clamp(0, 18)
    logits = F.one_hot(cls, 19).permute(0, 3, 1, 2).float()
    assert out_size is None or tuple(out_size) == tuple(logits.shape[2:])  # test scale = original size
    return logits


@pytest.fixture
def controlled(monkeypatch):
    """Every model predicts what its input image encodes (HRDA inherits inference)."""
    monkeypatch.setattr(mic_model.EncoderDecoder, 'inference', decoded_inference)


def save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def write_cityscapes(root, split, samples, cities=('frankfurt',)):
    """samples: [(pred, label or None)] train-id maps; Cityscapes layout, cities in turn."""
    stems = []
    for i, (pred, label) in enumerate(samples):
        city = cities[i % len(cities)]
        stem = f'{city}_{i:06d}_000019'
        save(f'{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png', encode_image(pred, i))
        if label is not None:
            save(f'{root}/gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png', label.astype(np.uint8))
        stems.append(stem)
    return stems


def tiny_model_cfg(kind='encoder_decoder'):
    return helpers.tiny_model_cfg(type=kind, test={'mode': 'whole'})


def tiny_config(val_root, kind='encoder_decoder', img_scale=(W, H), **data):
    cfg = merge(defaults(), {'model': tiny_model_cfg(kind),
                             'data': {'val': {'root': str(val_root), 'img_scale': list(img_scale)},
                                      'num_workers': 0, **data},
                             'uda': {'fd_lambda': 0}})  # no ImageNet encoder without model.pretrained
    return to_plain(cfg)


def save_ours(path, cfg, seed=0):
    torch.manual_seed(seed)
    model = mic_model.build_model(cfg['model'])
    torch.save({'student': model.state_dict(), 'teacher': model.state_dict(), 'config': cfg, 'iteration': 1},
               path)
    return model


def write_yaml(path, cfg):
    import yaml
    with open(path, 'w') as f:
        yaml.safe_dump(to_plain(cfg), f)
    return str(path)


def run_main(argv):
    """mic_eval.main in-process; returns (metrics or None, error message or None). An error ends
    it with exit status 2 and one line 'error: ...' on stderr."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return mic_eval.main([str(a) for a in argv]), None
    except SystemExit as e:
        errors = [line for line in stderr.getvalue().splitlines() if line.startswith('error: ')]
        assert e.code == 2 and len(errors) == 1, (e.code, stderr.getvalue())
        return None, errors[0]


def read_json(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

def test_compute_metrics_hand_matrix():
    # rows = label, columns = prediction; 'c' is only predicted (FP only), 'd' appears nowhere
    conf = torch.tensor([[5, 1, 4, 0],
                         [2, 3, 0, 0],
                         [0, 0, 0, 0],
                         [0, 0, 0, 0]])
    m = mic_eval.compute_metrics(conf, ['a', 'b', 'c', 'd'])
    assert m['IoU']['a'] == pytest.approx(100 * 5 / (5 + 2 + 1 + 4))  # TP 5, FP 2, FN 1 + 4
    assert m['IoU']['b'] == pytest.approx(100 * 3 / (3 + 1 + 2))
    assert m['IoU']['c'] == 0.0 and m['IoU']['d'] is None
    assert m['mIoU'] == pytest.approx(100 * (5 / 12 + 3 / 6 + 0) / 3)
    assert m['aAcc'] == pytest.approx(100 * 8 / 15) and m['num_pixels'] == 15
    assert 'mIoU16' not in m
    assert mic_eval.compute_metrics(np.asarray(conf), ['a', 'b', 'c', 'd']) == m  # numpy too
    empty = mic_eval.compute_metrics(torch.zeros(19, 19, dtype=torch.int64))
    assert empty['mIoU'] is None and empty['aAcc'] is None and list(empty['IoU']) == list(CLASSES)


def test_mIoU16_synthia_classes():
    conf = torch.diag(torch.arange(1, 20)) * 10
    for c in (9, 14, 16):  # present in the labels, never predicted right: IoU 0
        conf[c, c] = 0
        conf[c, 0] = 7
    m = mic_eval.compute_metrics(conf, synthia16=True)
    assert m['IoU']['terrain'] == 0 and m['IoU']['truck'] == 0 and m['IoU']['train'] == 0
    assert m['mIoU16'] == pytest.approx(m['mIoU'] * 19 / 16)
    ious = [m['IoU'][CLASSES[c]] for c in SYNTHIA_CLASSES]
    assert len(ious) == 16 and m['mIoU16'] == pytest.approx(sum(ious) / 16)
    for c in (9, 14, 16):  # absent from labels and predictions: excluded from both means
        conf[c] = 0
    m = mic_eval.compute_metrics(conf, synthia16=True)
    assert m['IoU']['terrain'] is None and m['mIoU16'] == pytest.approx(m['mIoU'])


def test_confusion_matrix_excludes_ignore():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 19, (40, 30))
    label[rng.random((40, 30)) < 0.2] = 255
    pred = rng.integers(0, 19, (40, 30))
    conf = mic_eval.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label).to(torch.uint8), 19)
    keep = label != 255
    expected = np.zeros((19, 19), np.int64)
    np.add.at(expected, (label[keep], pred[keep]), 1)
    assert np.array_equal(conf.view(19, 19).numpy(), expected) and int(conf.sum()) == keep.sum()


# --------------------------------------------------------------------------
# evaluate(): the whole-split confusion matrix, predictions, modes
# --------------------------------------------------------------------------

def hand_dataset(root):
    """Two images. A: label road | sidewalk with 8 ignored top rows, prediction road for 48 columns,
    then building. B: all sidewalk, predicted right."""
    label_a = np.zeros((H, W), np.uint8)
    label_a[:, 32:] = 1
    label_a[:8] = 255
    pred_a = np.zeros((H, W), np.uint8)
    pred_a[:, 48:] = 2
    pred_b = label_b = np.ones((H, W), np.uint8)
    return write_cityscapes(root, 'val', [(pred_a, label_a), (pred_b, label_b)])


def test_evaluate_whole_split_by_hand(tmp_path, controlled):
    hand_dataset(tmp_path / 'cs')
    model = mic_model.build_model(tiny_model_cfg()).train()
    ds_cfg = {'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'val', 'img_scale': [W, H]}
    before = sorted(os.listdir(tmp_path))
    m = mic_eval.evaluate(model, ds_cfg, num_workers=0, progress=False)
    assert sorted(os.listdir(tmp_path)) == before  # no pred_dir: nothing written
    assert model.training  # the previous mode is restored
    # road: TP 24*32, FP 24*16 (sidewalk predicted as road); sidewalk: TP 2048 (B), FN 24*32 (A);
    # building: FP only (24*16) -> 0; the other 16 classes are absent -> excluded (None)
    road, sidewalk = 768 / (768 + 384), 2048 / (2048 + 768)
    assert m['IoU']['road'] == pytest.approx(100 * road)
    assert m['IoU']['sidewalk'] == pytest.approx(100 * sidewalk)
    assert m['IoU']['building'] == 0.0
    assert all(m['IoU'][c] is None for c in CLASSES[3:])
    assert m['mIoU'] == pytest.approx(100 * (road + sidewalk + 0) / 3)  # not the mean of per-image mIoUs
    assert m['aAcc'] == pytest.approx(100 * (768 + 2048) / (24 * 64 + 2048))
    assert m['num_images'] == 2 and m['num_pixels'] == 24 * 64 + 2048

    pred_dir = tmp_path / 'preds'
    m2 = mic_eval.evaluate(model, ds_cfg, num_workers=1, progress=False, pred_dir=str(pred_dir),
                           synthia16=True)
    assert m2['mIoU'] == m['mIoU'] and m2['mIoU16'] == pytest.approx(100 * (road + sidewalk) / 3)
    names = sorted(os.listdir(pred_dir))
    assert names == ['frankfurt_000000_000019_leftImg8bit.png', 'frankfurt_000001_000019_leftImg8bit.png']
    colour = np.asarray(Image.open(pred_dir / names[0]))
    assert colour.shape == (H, W, 3)
    assert tuple(colour[0, 0]) == (128, 64, 128) and tuple(colour[0, 63]) == (70, 70, 70)  # road, building


def test_evaluate_real_model_bf16_and_slide(tmp_path):
    """A real (tiny HRDA) model end to end, in bf16 autocast with sliding test windows."""
    rng = np.random.default_rng(1)
    write_cityscapes(tmp_path / 'cs', 'val', [(rng.integers(0, 19, (64, 128)), rng.integers(0, 19, (64, 128)))])
    cfg = tiny_model_cfg('hrda')
    cfg['test'] = {'mode': 'slide', 'crop_size': [64, 64], 'stride': [32, 32]}
    model = mic_model.build_model(cfg)
    ds_cfg = {'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'val', 'img_scale': [128, 64]}
    m = mic_eval.evaluate(model, ds_cfg, amp='bf16', num_workers=0, progress=False)
    assert m['num_images'] == 1 and m['num_pixels'] == 64 * 128 and 0 <= m['mIoU'] <= 100


# --------------------------------------------------------------------------
# The command line: our checkpoints, released checkpoints
# --------------------------------------------------------------------------

def test_cli_our_checkpoint_with_only_ckpt(tmp_path, controlled):
    hand_dataset(tmp_path / 'cs')
    run_dir = tmp_path / 'work_dirs' / 'run'
    run_dir.mkdir(parents=True)
    cfg = tiny_config(tmp_path / 'cs')
    cfg['data']['source']['type'] = 'synthia'
    save_ours(run_dir / 'latest.pth', cfg)
    metrics, err = run_main(['--ckpt', run_dir / 'latest.pth'])
    assert err is None
    stored = read_json(run_dir / 'metrics.json')
    assert stored == json.loads(json.dumps(metrics))
    road, sidewalk = 768 / 1152, 2048 / 2816
    assert stored['mIoU'] == pytest.approx(100 * (road + sidewalk) / 3)
    assert stored['mIoU16'] == pytest.approx(100 * (road + sidewalk) / 3)  # the same 3 classes are present
    assert stored['IoU']['wall'] is None and stored['num_images'] == 2 and stored['split'] == 'val'
    assert stored['checkpoint'] == str(run_dir / 'latest.pth')
    assert stored['dataset_root'] == str(tmp_path / 'cs') and 'stored' in stored['config']
    assert len(os.listdir(run_dir / 'preds')) == 2
    assert sorted(os.listdir(run_dir)) == ['latest.pth', 'metrics.json', 'preds']


def test_cli_overrides_and_cfg(tmp_path, controlled):
    hand_dataset(tmp_path / 'cs')
    cfg = tiny_config('/nonexistent')
    save_ours(tmp_path / 'latest.pth', cfg)
    # --data-root fixes the stored root; --opt applies on top; --out elsewhere; --no-preds
    metrics, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--data-root', tmp_path / 'cs', '--out',
                             tmp_path / 'o', '--no-preds', '--opt', 'model.test.mode=slide',
                             'model.test.crop_size=[32,32]', 'model.test.stride=[16,16]'])
    assert err is None and metrics['num_images'] == 2
    assert os.listdir(tmp_path / 'o') == ['metrics.json']
    # --cfg replaces the stored config
    yaml_cfg = dict(cfg, data=dict(cfg['data'], val=dict(cfg['data']['val'], root=str(tmp_path / 'cs'))))
    metrics2, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--cfg', write_yaml(tmp_path / 'c.yaml', yaml_cfg),
                              '--out', tmp_path / 'o2', '--no-preds'])
    assert err is None and metrics2['mIoU'] == metrics['mIoU'] and metrics2['config'] == str(tmp_path / 'c.yaml')


def test_released_checkpoint_uses_the_student(tmp_path):
    """A released layout {'state_dict': model.*, ema_model.*, imnet_model.*}: labels are the student's
    own predictions (mIoU 100); the teacher predicts a class that never occurs (mIoU 0)."""
    cfg = tiny_config(tmp_path / 'cs', 'hrda', img_scale=(128, 64))
    torch.manual_seed(0)
    student = mic_model.build_model(cfg['model']).eval()
    images = [np.random.default_rng(i).integers(0, 256, (64, 128, 3), dtype=np.uint8) for i in range(2)]
    labels = []
    for i, img in enumerate(images):
        x = ((torch.from_numpy(img).float() - torch.tensor(IMG_MEAN)) / torch.tensor(IMG_STD)).permute(2, 0, 1)
        labels.append(student.inference(x[None])[0].argmax(0).numpy().astype(np.uint8))
        stem = f'frankfurt_{i:06d}_000019'
        save(f'{tmp_path}/cs/leftImg8bit/val/frankfurt/{stem}_leftImg8bit.png', img)
        save(f'{tmp_path}/cs/gtFine/val/frankfurt/{stem}_gtFine_labelTrainIds.png', labels[-1])
    absent = min(set(range(19)) - set(np.unique(labels).tolist()))
    teacher = mic_model.build_model(cfg['model'])
    with torch.no_grad():
        teacher.decode_head.head.conv_seg.bias.zero_()[absent] = 100.0
    sd = {f'model.{k}': v for k, v in student.state_dict().items()}
    sd.update({f'ema_model.{k}': v for k, v in teacher.state_dict().items()})
    sd.update({f'imnet_model.{k}': v for k, v in student.backbone.state_dict(prefix='backbone.').items()})
    torch.save({'meta': {'iter': 40000}, 'state_dict': sd}, tmp_path / 'released.pth')
    cfg_path = write_yaml(tmp_path / 'released.yaml', cfg)

    metrics, err = run_main(['--ckpt', tmp_path / 'released.pth', '--cfg', cfg_path, '--no-preds'])
    assert err is None and metrics['mIoU'] == 100.0 and metrics['aAcc'] == 100.0
    assert os.path.isfile(tmp_path / 'metrics.json')  # default --out: the checkpoint's folder
    # the teacher's weights under 'model.' would score 0: the student was used
    sd_teacher = {f'model.{k}': v for k, v in teacher.state_dict().items()}
    torch.save({'state_dict': sd_teacher}, tmp_path / 'teacher.pth')
    metrics, err = run_main(['--ckpt', tmp_path / 'teacher.pth', '--cfg', cfg_path, '--no-preds', '--out',
                             tmp_path / 't'])
    assert err is None and metrics['mIoU'] == 0.0


# --------------------------------------------------------------------------
# Exports for the benchmark servers
# --------------------------------------------------------------------------

def cityscapes_with_label_ids(root, rng, cities=('frankfurt', 'lindau'), n=4):
    """Cityscapes val with *_gtFine_labelIds.png over the full id set (0..33), the train ids derived
    with cityscapesscripts' own table, and images encoding a noisy prediction."""
    from cityscapesscripts.helpers.labels import id2label
    lut = np.full(256, 255, np.uint8)
    for i, lab in id2label.items():
        if 0 <= i and lab.trainId not in (-1, 255):
            lut[i] = lab.trainId
    for k in range(n):
        city = cities[k % len(cities)]
        stem = f'{city}_{k:06d}_{k * 7 + 19:06d}'
        ids = rng.integers(0, 34, (H, W)).astype(np.uint8)
        ids[:, :20] = rng.choice([7, 8, 26], (H, 20))  # some large regions
        train = lut[ids]
        pred = np.where(train == 255, rng.integers(0, 19, (H, W)), train)
        noise = rng.random((H, W)) < 0.3
        pred[noise] = rng.integers(0, 19, noise.sum())
        pred[:4, :4] = 17  # motorcycle: predicted, perhaps never labelled
        save(f'{root}/leftImg8bit/val/{city}/{stem}_leftImg8bit.png', encode_image(pred, k))
        save(f'{root}/gtFine/val/{city}/{stem}_gtFine_labelIds.png', ids)
        save(f'{root}/gtFine/val/{city}/{stem}_gtFine_labelTrainIds.png', train)


def test_labelids_export_matches_official_cityscapes_evaluation(tmp_path, controlled):
    CSEval = pytest.importorskip('cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling')
    cityscapes_with_label_ids(tmp_path / 'cs', np.random.default_rng(0))
    cfg = tiny_config(tmp_path / 'cs')
    save_ours(tmp_path / 'latest.pth', cfg)
    metrics, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--format', 'labelids', '--no-preds'])
    assert err is None
    export = tmp_path / 'labelIds'
    assert len(os.listdir(export)) == 4

    args = CSEval.args
    args.predictionPath, args.predictionWalk = str(export), None
    args.evalInstLevelScore, args.evalPixelAccuracy, args.JSONOutput, args.quiet = False, False, False, True
    gts = sorted(str(p) for p in (tmp_path / 'cs' / 'gtFine' / 'val').rglob('*_gtFine_labelIds.png'))
    preds = [CSEval.getPrediction(args, gt) for gt in gts]  # exits if a file is missing or ambiguous
    official = CSEval.evaluateImgLists(preds, gts, args)
    for name in CLASSES:
        ours, theirs = metrics['IoU'][name], official['classScores'][name]
        assert (ours is None and np.isnan(theirs)) or ours == pytest.approx(100 * theirs, abs=1e-9), name
    assert metrics['mIoU'] == pytest.approx(100 * official['averageScoreClasses'], abs=1e-9)


def test_test_split_exports(tmp_path, controlled):
    rng = np.random.default_rng(3)
    preds = [rng.integers(0, 19, (H, W)) for _ in range(3)]
    # the Cityscapes download's test labels are void everywhere (all 255 once converted): no metrics
    void = np.full((H, W), 255, np.uint8)
    stems = write_cityscapes(tmp_path / 'cs', 'test', [(p, void) for p in preds], cities=('berlin', 'bonn'))
    cfg = tiny_config(tmp_path / 'cs')
    save_ours(tmp_path / 'latest.pth', cfg)
    metrics, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--split', 'test', '--format', 'labelids'])
    assert err is None and metrics is None and not os.path.exists(tmp_path / 'metrics.json')
    names = sorted(os.listdir(tmp_path / 'labelIds'))
    assert names == sorted(f'{s}_leftImg8bit.png' for s in stems)  # <city>_<seq>_<frame>_leftImg8bit.png
    lut = np.zeros(256, np.int64)
    for t, i in TRAIN_ID_TO_CS_ID.items():
        lut[t] = i
    for s, p in zip(stems, preds):
        img = Image.open(tmp_path / 'labelIds' / f'{s}_leftImg8bit.png')
        out = np.asarray(img)
        assert img.mode == 'L' and out.shape == (H, W) and set(np.unique(out)) <= CS_EVAL_IDS
        assert np.array_equal(out, lut[p])
    assert len(os.listdir(tmp_path / 'preds')) == 3

    # ACDC layout (nested condition/sequence folders), train ids named after the images
    acdc = tmp_path / 'acdc'
    files = {}
    for k, (cond, seq) in enumerate([('fog', 'GOPR0475'), ('night', 'GOPR0355'), ('night', 'GP010376')]):
        name = f'{seq}_frame_{k:06d}_rgb_anon.png'
        save(f'{acdc}/rgb_anon/test/{cond}/{seq}/{name}', encode_image(preds[k], k))
        files[name] = preds[k]
    metrics, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--split', 'test', '--format', 'trainids',
                             '--out', tmp_path / 'acdc_out', '--no-preds', '--data-root', acdc,
                             '--opt', 'data.val.type=acdc'])
    assert err is None and metrics is None
    assert sorted(os.listdir(tmp_path / 'acdc_out')) == ['labelTrainIds']
    assert sorted(os.listdir(tmp_path / 'acdc_out' / 'labelTrainIds')) == sorted(files)
    for name, p in files.items():
        img = Image.open(tmp_path / 'acdc_out' / 'labelTrainIds' / name)
        assert img.mode == 'L' and np.array_equal(np.asarray(img), p) and np.asarray(img).max() <= 18

    # a second export into a folder holding something else is refused (servers want exactly one PNG per image)
    (tmp_path / 'acdc_out' / 'labelTrainIds' / 'notes.txt').write_text('x')
    _, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--split', 'test', '--format', 'trainids',
                       '--out', tmp_path / 'acdc_out', '--data-root', acdc, '--opt', 'data.val.type=acdc'])
    assert err.startswith('error: the export folder') and 'notes.txt' in err


# --------------------------------------------------------------------------
# Any folder of images
# --------------------------------------------------------------------------

def test_images_folder_odd_sizes(tmp_path):
    folder = tmp_path / 'photos'
    rng = np.random.default_rng(0)
    save(f'{folder}/a.png', rng.integers(0, 256, (53, 37, 3), dtype=np.uint8))
    save(f'{folder}/sub/b.png', rng.integers(0, 256, (45, 80), dtype=np.uint8), mode='L')  # grayscale
    save(f'{folder}/c.png', rng.integers(0, 256, (45, 80, 4), dtype=np.uint8), mode='RGBA')
    Image.fromarray(rng.integers(0, 256, (44, 60, 3), dtype=np.uint8)).save(folder / 'a.jpg')  # same stem as a.png
    cfg = tiny_config(tmp_path / 'unused')
    save_ours(tmp_path / 'latest.pth', cfg)
    metrics, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--images', folder])
    assert err is None and metrics is None
    out = tmp_path / 'pred_photos'  # default: <checkpoint folder>/pred_<folder name>
    expected = {'a_png': (53, 37), 'a_jpg': (44, 60), 'sub/b': (45, 80), 'c': (45, 80)}
    written = sorted(str(p.relative_to(out)) for p in out.rglob('*.png'))
    assert written == sorted(f'{n}_{kind}.png' for n in expected for kind in ('pred', 'overlay'))
    palette = {tuple(c) for c in PALETTE}
    for name, (h, w) in expected.items():
        pred = np.asarray(Image.open(out / f'{name}_pred.png'))
        overlay = np.asarray(Image.open(out / f'{name}_overlay.png'))
        assert pred.shape == overlay.shape == (h, w, 3)
        assert {tuple(c) for c in pred.reshape(-1, 3)} <= palette
    _, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--images', folder, '--out', folder / 'x'])
    assert 'inside the images folder' in err


# --------------------------------------------------------------------------
# Distributed: two gloo processes give the single-process result
# --------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, ports, argv, ds_cfg, pred_dir, queue):
    """torchrun's environment -> main(); then evaluate() in a group the caller made, pred_dir on rank 0 only."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    mic_model.EncoderDecoder.inference = decoded_inference
    try:
        from_main = mic_eval.main(argv)  # initialises and destroys its process group
        assert not torch.distributed.is_initialized()
        torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{ports[1]}', rank=rank,
                                             world_size=world)
        model = mic_model.build_model(tiny_model_cfg())
        from_evaluate = mic_eval.evaluate(model, ds_cfg, num_workers=0, progress=False,
                                          pred_dir=pred_dir if rank == 0 else None)
        torch.distributed.destroy_process_group()
        queue.put((rank, from_main, from_evaluate, None))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, None, None, repr(e)))


def test_distributed_matches_single_process(tmp_path, controlled):
    rng = np.random.default_rng(5)
    write_cityscapes(tmp_path / 'cs', 'val', [(rng.integers(0, 19, (H, W)), rng.integers(0, 19, (H, W)))
                                             for _ in range(5)])
    save_ours(tmp_path / 'latest.pth', tiny_config(tmp_path / 'cs'))
    single, err = run_main(['--ckpt', tmp_path / 'latest.pth', '--out', tmp_path / 'one'])
    assert err is None

    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    argv = ['--ckpt', str(tmp_path / 'latest.pth'), '--out', str(tmp_path / 'two')]
    ds_cfg = {'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'val', 'img_scale': [W, H]}
    ports = (_free_port(), _free_port())
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, ports, argv, ds_cfg, str(tmp_path / 'three'), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=30)
    assert [r[3] for r in results] == [None, None], results
    assert results[0][1] == single and results[1][1] == single  # every rank gets the summed result
    assert read_json(tmp_path / 'two' / 'metrics.json')['mIoU'] == single['mIoU']
    preds = sorted(os.listdir(tmp_path / 'one' / 'preds'))
    assert len(preds) == 5 and sorted(os.listdir(tmp_path / 'two' / 'preds')) == preds
    summed = {k: v for k, v in single.items() if k in results[0][2]}
    assert results[0][2] == results[1][2] == summed
    assert sorted(os.listdir(tmp_path / 'three')) == preds  # rank 1 wrote its images into rank 0's pred_dir


# --------------------------------------------------------------------------
# Bad input: one clear message, no traceback, no metrics.json
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad')
    rng = np.random.default_rng(0)
    write_cityscapes(root / 'cs', 'val', [(rng.integers(0, 19, (H, W)), rng.integers(0, 19, (H, W)))] * 2)
    # wrong label size: the second image's label is half size
    write_cityscapes(root / 'cs_size', 'val', [(rng.integers(0, 19, (H, W)), rng.integers(0, 19, (H, W))),
                                               (rng.integers(0, 19, (H, W)), rng.integers(0, 19, (H // 2, W // 2)))])
    # raw label ids where train ids belong
    write_cityscapes(root / 'cs_ids', 'val', [(rng.integers(0, 19, (H, W)), np.full((H, W), 26))])
    (root / 'empty').mkdir()
    cfg = tiny_config(root / 'cs')
    save_ours(root / 'ours.pth', cfg)
    model = mic_model.build_model(cfg['model'])
    torch.save({'state_dict': {f'model.{k}': v for k, v in model.state_dict().items()}}, root / 'released.pth')
    hrda = dict(cfg, model=tiny_model_cfg('hrda'))
    write_yaml(root / 'hrda.yaml', hrda)
    (root / 'garbage.pth').write_bytes(b'not a checkpoint')
    return root


@pytest.mark.parametrize('argv,message', [
    (['--ckpt', '{r}/missing.pth'], 'error: checkpoint {r}/missing.pth does not exist'),
    (['--ckpt', '{r}/garbage.pth'], 'error: {r}/garbage.pth is not a PyTorch checkpoint'),
    (['--ckpt', '{r}/released.pth'], 'holds no config (a released MIC checkpoint?): pass the config'),
    (['--ckpt', '{r}/ours.pth', '--cfg', '{r}/hrda.yaml'], 'does not match the model'),
    (['--ckpt', '{r}/ours.pth', '--cfg', '{r}/nope.yaml'], 'config file {r}/nope.yaml does not exist'),
    (['--ckpt', '{r}/ours.pth', '--opt', 'model.backbon.type=mit_b1'], "unknown config key 'model.backbon'"),
    (['--ckpt', '{r}/ours.pth', '--data-root', '{r}/nowhere'], 'dataset root {r}/nowhere (cityscapes) does not exist'),
    (['--ckpt', '{r}/ours.pth', '--data-root', '{r}/empty'], 'image folder {r}/empty/leftImg8bit/val does not exist'),
    (['--ckpt', '{r}/ours.pth', '--data-root', '{r}/cs_size'], 'frankfurt_000001_000019_gtFine_labelTrainIds.png is 32x16'),
    (['--ckpt', '{r}/ours.pth', '--data-root', '{r}/cs_ids'], 'outside the train ids 0..18'),
    (['--ckpt', '{r}/ours.pth', '--split', 'test'], 'the test split has no labels'),
])
def test_bad_input(setup, argv, message):
    r = str(setup)
    out = setup / ('out_' + str(abs(hash(tuple(argv)))))
    metrics, err = run_main([a.format(r=r) for a in argv] + ['--out', out, '--opt', 'data.num_workers=1'])
    assert metrics is None and err.startswith('error: ') and message.format(r=r) in err, err
    assert 'Traceback' not in err
    assert not os.path.exists(out / 'metrics.json') and not os.path.exists(setup / 'metrics.json')
    if 'test split' in message:
        assert '--split test --format labelids' in err


def test_help_runs():
    out = subprocess.run([sys.executable, 'mic_eval.py', '--help'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and '--format {trainids,labelids}' in out.stdout and 'torchrun' in out.stdout


def test_demo_masked_eval_scores_the_masked_images_and_the_hidden_pixels(tmp_path, controlled):
    """benchmarks/demo_masked_eval.py: a model that reads the class off each pixel predicts the visible
    pixels right and, where MIC's mask zeroes the normalised image, the class encoded by the mean colour."""
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    import demo_masked_eval
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 6, (H, W)), rng.integers(0, 6, (H, W))]
    write_cityscapes(tmp_path / 'cs', 'val', [(label, label) for label in labels])
    cfg = tiny_config(tmp_path / 'cs')
    cfg['data']['target'].update(root=str(tmp_path / 'cs'), split='val', img_scale=[W, H])
    save_ours(tmp_path / 'latest.pth', cfg)
    cfg, student, teacher = demo_masked_eval.load_run(str(tmp_path / 'latest.pth'))
    assert demo_masked_eval.teacher_miou(cfg, teacher) == pytest.approx(100.0)
    plain, masked, hidden = demo_masked_eval.masked_miou(cfg, student, 0.5, 8, mask_seed=3)
    # the same masks, drawn in the same order
    generator = torch.Generator().manual_seed(3)
    keep = [drawn_block_mask(generator) for _ in labels]
    zero_class = round(IMG_MEAN[0]) // 10  # the class a zeroed (mean-coloured) pixel encodes: 12
    assert zero_class == 12 and 0 < np.mean(keep) < 1
    visible = [np.sum([(k & (lab == c)).sum() for k, lab in zip(keep, labels)]) for c in range(6)]
    total = [np.sum([(lab == c).sum() for lab in labels]) for c in range(6)]
    # classes 0-5: no false positives, visible pixels right; class 12: false positives only (IoU 0)
    assert plain == pytest.approx(100.0)
    assert masked == pytest.approx(100 * sum(v / t for v, t in zip(visible, total)) / 7)
    assert hidden == 0.0  # no pixel under the mask is predicted right


def drawn_block_mask(generator):
    """The next MIC block mask (ratio 0.5, 8-pixel blocks) of `generator` at the test image size, as a bool array."""
    return block_mask(1, H, W, 0.5, 8, generator=generator)[0, 0].bool().numpy()
