"""Bad input and faults in data, evaluation, config and label conversion: each case gives one line
'error: ...' (exit status 2) that names the file, folder or config key and what to do, and
nothing half-written (no metrics.json, no temporary files, old files intact).

Cases elsewhere: tests/test_eval.py::test_bad_input (checkpoints, --cfg, --opt, dataset layouts,
label sizes and values, the test split), test_data.py (layouts, label modes, RCS statistics),
test_convert_labels.py (layouts, corrupt PNGs), test_config.py (unknown keys, types).
"""
import contextlib
import errno
import gc
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import convert_labels
import mic_config
import mic_data
import mic_demo
import mic_eval
import mic_model
import mic_runtime
import mic_train
from helpers import tiny_model_cfg, tiny_opts
import png16
from mic_config import ConfigError, defaults, load_config, merge, resolve_section, to_plain
from mic_data import DataError, OutputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 64, 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared machine makes more threads slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def save(path, array, mode=None):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(path)


def truncate(path, keep=80):
    """Cut a file after `keep` bytes (a PNG's header survives, its image data does not)."""
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:keep])


def write_png16(path, samples):
    """A 16-bit PNG written byte by byte: uint16 [H,W] grey (colour type 0), [H,W,3] RGB (2) or
    [H,W,4] RGBA (6); big-endian samples, filter None (Pillow writes 16-bit grey only)."""
    samples = np.asarray(samples, np.uint16)
    h, w = samples.shape[:2]
    colour = 0 if samples.ndim == 2 else {3: 2, 4: 6}[samples.shape[2]]
    raw = b''.join(b'\x00' + samples[r].astype('>u2').tobytes() for r in range(h))

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    with open(path, 'wb') as f:
        f.write(png16.PNG_SIGNATURE + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def temp_files(folder):
    """Leftover temporary files of atomic_write anywhere under `folder`."""
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if mic_runtime.is_temp_file(n)]


def assert_complete_pngs(folder):
    """Every PNG under `folder` decodes completely (nothing half-written under a final name)."""
    for d, _, names in os.walk(folder):
        for n in names:
            if n.endswith('.png'):
                with Image.open(os.path.join(d, n)) as img:
                    img.load()


def run_cli(main, argv, expect_error=True):
    """Run a script's main() in-process -> (result, stdout, stderr). An error must end it with
    exit status 2 and exactly one line on stderr starting with 'error: ' (progress bars aside)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = main([str(a) for a in argv])
        except SystemExit as e:
            errors = [line for line in err.getvalue().splitlines() if line.startswith('error: ')]
            assert e.code == 2 and len(errors) == 1, (e.code, err.getvalue())
            assert 'Traceback' not in err.getvalue()
            return errors[0], out.getvalue(), err.getvalue()
    assert not expect_error, f'no error; stdout: {out.getvalue()}'
    return result, out.getvalue(), err.getvalue()


@pytest.fixture
def worker_errors(monkeypatch):
    """For tests whose loader workers raise: torch's ExceptionWrapper.reraise leaves the loader
    iterator in a reference cycle, and a worker shut down by the garbage collector is waited for
    MP_STATUS_CHECK_INTERVAL (5 s) (a script exits at once). Shorter here, and collected here."""
    monkeypatch.setattr(torch.utils.data._utils, 'MP_STATUS_CHECK_INTERVAL', 0.2)
    yield
    gc.collect()


SINGLE_SCALE = {'type': 'encoder_decoder', 'test': {'mode': 'whole'}}  # tiny_model_cfg's overrides here


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """One of our checkpoints of a tiny model (its data.val.root does not exist: tests pass --data-root)."""
    root = tmp_path_factory.mktemp('ckpt')
    cfg = to_plain(merge(defaults(), {'model': tiny_model_cfg(**SINGLE_SCALE), 'data': {
        'val': {'root': str(root / 'cs'), 'img_scale': [W, H]}, 'num_workers': 0}, 'uda': {'fd_lambda': 0}}))
    torch.manual_seed(0)
    model = mic_model.build_model(cfg['model'])
    torch.save({'student': model.state_dict(), 'config': cfg, 'iteration': 1}, root / 'latest.pth')
    return root / 'latest.pth'


@pytest.fixture
def cityscapes_val(tmp_path):
    """Two labelled Cityscapes val images under tmp_path/cs; returns their image paths."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        stem = f'frankfurt_{i:06d}_000019'
        paths.append(tmp_path / 'cs' / 'leftImg8bit' / 'val' / 'frankfurt' / f'{stem}_leftImg8bit.png')
        save(paths[-1], rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        save(tmp_path / 'cs' / 'gtFine' / 'val' / 'frankfurt' / f'{stem}_gtFine_labelTrainIds.png',
             rng.integers(0, 19, (H, W), dtype=np.uint8))
    return paths


@pytest.fixture
def train_data(tmp_path):
    """A GTA source (train-id labels) and a Cityscapes target, 32 x 64, as a `data` config section."""
    rng = np.random.default_rng(0)
    for i in range(2):
        save(tmp_path / 'gta' / 'images' / f'{i:05d}.png', rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        save(tmp_path / 'gta' / 'labels' / f'{i:05d}_labelTrainIds.png', rng.integers(0, 19, (H, W), dtype=np.uint8))
        save(tmp_path / 'cs' / 'leftImg8bit' / 'train' / 'aachen' / f'aachen_{i:06d}_000019_leftImg8bit.png',
             rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    return {'source': {'type': 'gta', 'root': str(tmp_path / 'gta'), 'img_scale': [W, H]},
            'target': {'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'train', 'img_scale': [W, H],
                       'crop_pseudo_margins': None},
            'val': {'type': 'cityscapes', 'root': str(tmp_path / 'cs'), 'split': 'val', 'img_scale': [W, H]},
            'crop_size': [32, 32], 'rcs': {'enabled': False}, 'batch_size': 2, 'num_workers': 1}


# --------------------------------------------------------------------------
# 16-bit images
# --------------------------------------------------------------------------

def test_16bit_grey_png_is_scaled_not_white(tmp_path):
    grey = np.random.default_rng(0).integers(0, 65536, (H, W)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / 'g16.png')  # Pillow writes 16-bit grey (mode I;16)
    assert Image.open(tmp_path / 'g16.png').mode == 'I;16'
    img = mic_data.read_image(str(tmp_path / 'g16.png'))
    assert img.dtype == np.uint8 and img.shape == (H, W, 3)
    np.testing.assert_array_equal(img, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert (img == 255).mean() < 0.01  # Pillow's own conversion makes ~100 % of these pixels 255


@pytest.mark.parametrize('channels', [3, 4])
def test_16bit_rgb_png_matches_the_exact_decoder(tmp_path, channels):
    samples = np.random.default_rng(channels).integers(0, 65536, (H, W, channels)).astype(np.uint16)
    path = str(tmp_path / 'rgb16.png')
    write_png16(path, samples)
    exact = png16.read_png(path)  # the project's exact 16-bit decoder (Synthia labels)
    np.testing.assert_array_equal(exact, samples)
    np.testing.assert_array_equal(mic_data.read_image(path), (exact[..., :3] >> 8).astype(np.uint8))


def test_float_image_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / 'f.tiff')
    os.rename(tmp_path / 'f.tiff', tmp_path / 'f.png')  # a float image behind an image extension
    with pytest.raises(DataError) as e:
        mic_data.read_image(str(tmp_path / 'f.png'))
    assert str(e.value) == (f'image {tmp_path}/f.png holds floating-point values (mode F), not an 8- or 16-bit '
                            f'image; convert it to an 8-bit RGB PNG or JPEG')


def test_images_cli_16bit_and_other_files(tmp_path, ckpt):
    folder = tmp_path / 'photos'
    grey = np.random.default_rng(1).integers(0, 65536, (H, W)).astype(np.uint16)
    os.makedirs(folder)
    Image.fromarray(grey).save(folder / 'g16.png')
    (folder / 'notes.txt').write_text('not an image')
    result, stdout, _ = run_cli(mic_eval.main, ['--ckpt', ckpt, '--images', folder, '--out', tmp_path / 'out'],
                                expect_error=False)
    assert result is None
    assert (f'skipping 1 file(s) under {folder} that are not images (.png, .jpg, .jpeg, .bmp, .tif, .tiff): notes.txt'
            in stdout.splitlines())
    assert 'skipped 1 file(s) that are not images (listed above)' in stdout
    assert sorted(os.listdir(tmp_path / 'out')) == ['g16_overlay.png', 'g16_pred.png']
    pred = np.asarray(Image.open(tmp_path / 'out' / 'g16_pred.png')).astype(np.float32)
    overlay = np.asarray(Image.open(tmp_path / 'out' / 'g16_overlay.png')).astype(np.float32)
    image = np.repeat((grey >> 8)[..., None], 3, axis=2).astype(np.float32)
    np.testing.assert_array_equal(overlay, np.clip(np.rint(0.5 * image + 0.5 * pred), 0, 255))  # not white


def test_images_cli_folder_without_images(tmp_path, ckpt):
    os.makedirs(tmp_path / 'docs')
    (tmp_path / 'docs' / 'a.txt').write_text('x')
    err, _, _ = run_cli(mic_eval.main, ['--ckpt', ckpt, '--images', tmp_path / 'docs', '--out', tmp_path / 'o'])
    assert err == (f'error: no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff) under {tmp_path}/docs '
                   f'(it holds 1 other file(s), e.g. {tmp_path}/docs/a.txt)')


# --------------------------------------------------------------------------
# An unreadable image among many: stop with the way to skip it, or skip and list
# --------------------------------------------------------------------------

@pytest.mark.parametrize('workers', [0, 1])
def test_images_cli_unreadable_file(tmp_path, ckpt, workers):
    folder = tmp_path / 'photos'
    rng = np.random.default_rng(2)
    for name in ('a.png', 'b.png', 'c.png'):
        save(folder / name, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    truncate(folder / 'b.png')
    try:
        mic_data.read_image(str(folder / 'b.png'))
    except DataError as e:
        reason = str(e)
    out = tmp_path / 'out'
    argv = ['--ckpt', ckpt, '--images', folder, '--out', out, '--opt', f'data.num_workers={workers}']
    err, _, _ = run_cli(mic_eval.main, argv)
    assert err == (f'error: {reason}. To skip unreadable images and list them at the end, run again with '
                   f'--skip-unreadable')
    assert reason.startswith(f'cannot read image {folder}/b.png: ')
    assert not temp_files(out) and 'b_pred.png' not in os.listdir(out)
    assert_complete_pngs(out)

    _, stdout, _ = run_cli(mic_eval.main, argv + ['--skip-unreadable'], expect_error=False)
    assert sorted(os.listdir(out)) == ['a_overlay.png', 'a_pred.png', 'c_overlay.png', 'c_pred.png']
    assert stdout.splitlines()[-3:] == [
        f'wrote colour predictions and overlays of 2 images to {out}',
        'skipped 1 unreadable image(s), no prediction written for them:',
        f'  {folder}/b.png: {reason}']


def test_skip_unreadable_is_for_images_only(ckpt):
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as e:
        mic_eval.main(['--ckpt', str(ckpt), '--skip-unreadable'])
    assert e.value.code == 2 and '--skip-unreadable applies to --images only' in err.getvalue()


# --------------------------------------------------------------------------
# Errors inside DataLoader workers: the real message, one line
# --------------------------------------------------------------------------

@pytest.mark.parametrize('message', ['label x.png is 20x30 but its image y.png is 40x30',
                                     'two\nlines: DataError: inside'])
def test_data_error_recovers_the_message_of_a_worker(message):
    from torch._utils import ExceptionWrapper  # what DataLoader sends from a worker to the main process
    try:
        raise DataError(message)
    except DataError:
        wrapper = ExceptionWrapper(where='in DataLoader worker process 0')
    with pytest.raises(DataError) as e:
        wrapper.reraise()
    assert str(e.value) == message
    assert e.value.worker_traceback.startswith('Caught DataError in DataLoader worker process 0.\nOriginal Traceback')
    assert DataError(message).worker_traceback is None


def test_training_loader_worker_errors_are_one_line(train_data, tmp_path, worker_errors):
    loader = mic_data.build_train_loader(train_data, seed=0)
    assert loader.num_workers == 1 and loader.worker_init_fn is mic_data.worker_init_fn
    # truncated source images
    images = sorted((tmp_path / 'gta' / 'images').iterdir())
    messages = []
    for p in images:
        truncate(p)
        with pytest.raises(DataError) as in_process:
            mic_data.read_image(str(p))
        messages.append(str(in_process.value))
    with pytest.raises(DataError) as e:
        next(iter(mic_data.build_train_loader(train_data, seed=0)))
    assert str(e.value) in messages and str(e.value).startswith('cannot read image ') and '\n' not in str(e.value)
    assert 'Traceback' in e.value.worker_traceback
    # labels of a different size than their images
    for i, p in enumerate(images):
        save(p, np.zeros((H, W, 3), np.uint8))
        save(tmp_path / 'gta' / 'labels' / f'{i:05d}_labelTrainIds.png', np.zeros((H, H), np.uint8))
    with pytest.raises(DataError) as e:
        next(iter(mic_data.build_train_loader(train_data, seed=0)))
    assert str(e.value) in [f'label {tmp_path}/gta/labels/{i:05d}_labelTrainIds.png is 32x32 but its image '
                            f'{tmp_path}/gta/images/{i:05d}.png is 64x32; labels must match their image size'
                            for i in range(2)]


def test_training_script_worker_error_is_one_line(train_data, tmp_path, worker_errors):
    for p in (tmp_path / 'gta' / 'images').iterdir():
        truncate(p)
    d = train_data
    work = tmp_path / 'run'
    opts = ['model.backbone.type=mit_b0', 'model.decode_head.embed_dims=32', 'model.pretrained=null',
            'model.hrda.hr_crop_size=[32,32]', 'model.test.crop_size=[64,64]', 'model.test.stride=[32,32]',
            'data.crop_size=[64,64]', f'data.source.root={d["source"]["root"]}', 'data.source.img_scale=[64,32]',
            f'data.target.root={d["target"]["root"]}', 'data.target.img_scale=[64,32]',
            'data.target.crop_pseudo_margins=null', 'data.val.type=gta', f'data.val.root={d["source"]["root"]}',
            'data.rcs.enabled=false', 'data.num_workers=1', 'uda.fd_lambda=0', 'uda.mask_block_size=16',
            'train.max_iters=2', 'train.device=cpu', f'train.work_dir={work}']  # (data.val: listed before training)
    err, _, _ = run_cli(mic_train.main, ['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt', *opts])
    assert err.startswith(f'error: cannot read image {tmp_path}/gta/images/0000') and 'corrupt' in err
    assert not work.exists()  # the first batch is drawn before anything is written to the run folder


def test_eval_worker_error_is_one_line(tmp_path, ckpt, cityscapes_val):
    truncate(cityscapes_val[1])
    with pytest.raises(DataError) as in_process:
        mic_data.read_image(str(cityscapes_val[1]))
    out = tmp_path / 'out'
    err, _, _ = run_cli(mic_eval.main, ['--ckpt', ckpt, '--data-root', tmp_path / 'cs', '--out', out,
                                        '--opt', 'data.num_workers=1'])
    assert err == f'error: {in_process.value}'
    assert not (out / 'metrics.json').exists() and not temp_files(out)
    assert_complete_pngs(out)


# --------------------------------------------------------------------------
# Output folders that cannot be written: read-only, full, forbidden, impossible
# --------------------------------------------------------------------------

def fail_os_open(monkeypatch, code, under):
    """os.open raises OSError(code) for files under the folder `under` (tests run as root: chmod
    would not stop them)."""
    real = os.open

    def fake(path, *args, **kwargs):
        if str(path).startswith(str(under)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, 'open', fake)


class _FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes (what a full disk does)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk(monkeypatch, under, room=100, spare=('.write_check.',)):
    """Files under `under` opened by atomic_write hold at most `room` bytes (names containing one
    of `spare` are not affected)."""
    real = os.fdopen

    def fake(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        name = os.readlink(f'/proc/self/fd/{fd}')
        if name.startswith(str(under)) and not any(s in name for s in spare):
            return _FullDisk(f, room)
        return f
    monkeypatch.setattr(os, 'fdopen', fake)


@pytest.mark.parametrize('code,cause,advice', [
    (errno.EROFS, '{d} is on a read-only file system', 'choose a folder on a writable disk'),
    (errno.ENOSPC, 'no space is left on the disk of {d}', 'free some space or choose a folder on another disk'),
    (errno.EACCES, 'permission denied in {d}', 'choose a folder you can write to, or change its permissions'),
])
def test_atomic_write_cannot_create(tmp_path, monkeypatch, code, cause, advice):
    fail_os_open(monkeypatch, code, tmp_path)
    with pytest.raises(OutputError) as e:
        mic_runtime.save_json(str(tmp_path / 'metrics.json'), {'mIoU': 1})
    name = errno.errorcode[code]
    assert str(e.value) == (f'cannot write {tmp_path}/metrics.json: {cause.format(d=tmp_path)} '
                            f'([{name}] {os.strerror(code)}); {advice}')
    assert os.listdir(tmp_path) == []


def test_atomic_write_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    """What protects a training checkpoint: a write that fails half-way keeps the previous file."""
    path = tmp_path / 'latest.pth'
    torch.save({'iteration': 4, 'w': torch.zeros(10)}, path)
    old = path.read_bytes()
    fill_disk(monkeypatch, tmp_path, room=1000)
    with pytest.raises(OutputError) as e:
        mic_runtime.atomic_write(str(path), lambda f: torch.save({'iteration': 8, 'w': torch.zeros(100000)}, f))
    assert str(e.value) == (f'cannot write {path}: no space is left on the disk of {tmp_path} ([ENOSPC] '
                            f'{os.strerror(errno.ENOSPC)}); free some space or choose a folder on another disk')
    assert path.read_bytes() == old and os.listdir(tmp_path) == ['latest.pth']
    # other errors of the writer pass unchanged, and leave no temporary file either
    with pytest.raises(ZeroDivisionError):
        mic_runtime.atomic_write(str(path), lambda f: 1 / 0)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ['latest.pth']


def test_impossible_folder():
    with pytest.raises(OutputError) as e:
        mic_runtime.make_dirs('/proc/xyz/out')
    assert str(e.value) == ('cannot create the folder /proc/xyz/out: /proc does not allow new folders '
                            '([ENOENT] No such file or directory); choose another output folder')
    with pytest.raises(OutputError) as e:
        mic_data.save_png('/proc/xyz/a.png', np.zeros((2, 2), np.uint8))
    assert str(e.value) == ('cannot write /proc/xyz/a.png: the folder /proc/xyz does not exist ([ENOENT] No such '
                            'file or directory); create it or choose an existing folder')


def test_file_where_a_folder_belongs(tmp_path):
    (tmp_path / 'f').write_text('x')
    with pytest.raises(OutputError) as e:
        mic_runtime.make_dirs(str(tmp_path / 'f' / 'sub'))
    assert str(e.value).startswith(f'cannot create the folder {tmp_path}/f/sub: a file of that name (or of one '
                                   f'of its parents) exists ([ENOTDIR]')


def test_eval_cli_impossible_out(tmp_path, ckpt, cityscapes_val):
    err, _, _ = run_cli(mic_eval.main, ['--ckpt', ckpt, '--data-root', tmp_path / 'cs', '--out', '/proc/xyz'])
    assert err == ('error: cannot create the folder /proc/xyz: /proc does not allow new folders ([ENOENT] No such '
                   'file or directory); choose another output folder')


def test_eval_cli_read_only_out_fails_before_evaluating(tmp_path, ckpt, cityscapes_val, monkeypatch):
    out = tmp_path / 'ro'
    os.makedirs(out)
    fail_os_open(monkeypatch, errno.EROFS, out)
    monkeypatch.setattr(mic_model, 'build_model', None)  # the model is never built
    err, _, _ = run_cli(mic_eval.main, ['--ckpt', ckpt, '--data-root', tmp_path / 'cs', '--out', out])
    assert err == (f'error: cannot write to the folder {out}: {out} is on a read-only file system ([EROFS] '
                   f'Read-only file system); choose a folder on a writable disk')
    assert os.listdir(out) == []


@pytest.mark.parametrize('preds', [True, False])
def test_eval_cli_disk_full(tmp_path, ckpt, cityscapes_val, monkeypatch, preds):
    out = tmp_path / 'out'
    fill_disk(monkeypatch, out)
    argv = ['--ckpt', ckpt, '--data-root', tmp_path / 'cs', '--out', out] + ([] if preds else ['--no-preds'])
    err, _, _ = run_cli(mic_eval.main, argv)
    folder, name = (out / 'preds', 'frankfurt_00000') if preds else (out, 'metrics.json')
    assert err.startswith(f'error: cannot write {folder}/{name}')
    assert err.endswith(f': no space is left on the disk of {folder} ([ENOSPC] {os.strerror(errno.ENOSPC)}); '
                        f'free some space or choose a folder on another disk')
    assert not (out / 'metrics.json').exists() and not temp_files(out)
    if preds:
        assert os.listdir(out / 'preds') == []


# --------------------------------------------------------------------------
# Config values out of range, keys that do not fit together
# --------------------------------------------------------------------------

@pytest.mark.parametrize('overrides,message', [
    (['train.max_iters=-3'], "config key 'train.max_iters': expected a value >= 1, got -3"),
    (['train.max_iters=0'], "config key 'train.max_iters': expected a value >= 1, got 0"),
    (['train.log_interval=0'], "config key 'train.log_interval': expected a value >= 1, got 0"),
    (['train.eval_interval=-1'], "config key 'train.eval_interval': expected a value >= 0, got -1"),
    (['train.seed=-1'], "config key 'train.seed': expected a value >= 0, got -1"),
    (['optim.lr=0'], "config key 'optim.lr': expected a value > 0, got 0.0"),
    (['optim.betas=[0.9, 1.0]'], "config key 'optim.betas[1]': expected a value in [0, 1), got 1.0"),
    (['optim.betas=[0.9]'], "config key 'optim.betas': expected 2 values, each in [0, 1), got [0.9]"),
    (['data.batch_size=0'], "config key 'data.batch_size': expected a value >= 1, got 0"),
    (['data.num_workers=-1'], "config key 'data.num_workers': expected a value >= 0, got -1"),
    (['data.crop_size=[512]'], "config key 'data.crop_size': expected 2 values, each >= 1, got [512]"),
    (['data.source.img_scale=[2560, 0]'], "config key 'data.source.img_scale[1]': expected a value >= 1, got 0"),
    (['data.target.crop_pseudo_margins=[30, 240, 30]'],
     "config key 'data.target.crop_pseudo_margins': expected 4 values, each >= 0, got [30, 240, 30]"),
    (['data.rcs.temperature=0'], "config key 'data.rcs.temperature': expected a value > 0, got 0.0"),
    (['uda.mask_ratio=1.5'], "config key 'uda.mask_ratio': expected a value in [0, 1], got 1.5"),
    (['uda.pseudo_threshold=-0.1'], "config key 'uda.pseudo_threshold': expected a value in [0, 1], got -0.1"),
    (['uda.mask_alpha=2'], "config key 'uda.mask_alpha': expected a value in [0, 1], got 2.0"),
    (['model.num_classes=0'], "config key 'model.num_classes': expected a value in [1, 255], got 0"),
    (['model.hrda.hr_crop_size=[5,5]'],
     "config key 'model.hrda.hr_crop_size': [5, 5] is too small: the detail crop goes through the MiT encoder, "
     "which needs at least 32x32 pixels"),
    (['model.hrda.hr_crop_size=[500,512]'],
     "config key 'model.hrda.hr_crop_size': [500, 512] must be divisible by 8 (HRDA with context scale 0.5 and "
     "output stride 4), e.g. [496, 512]"),
    (['model.hrda.hr_crop_size=[1056,512]'],
     "config key 'model.hrda.hr_crop_size': [1056, 512] is larger than the training crop data.crop_size "
     "[1024, 1024]: the detail crop is cut out of it"),
    (['data.sync_crop_size=[512,512]', 'model.hrda.hr_crop_size=[768,512]'],
     "config key 'model.hrda.hr_crop_size': [768, 512] is larger than the training crop data.sync_crop_size "
     "[512, 512]: the detail crop is cut out of it"),
    (['data.crop_size=[1020,1024]'],
     "config key 'data.crop_size': [1020, 1024] must be divisible by 8 and at least 64x64 pixels for HRDA "
     "with context scale 0.5"),
    (['model.type=encoder_decoder', 'model.test.crop_size=[16,16]', 'model.test.stride=[16,16]'],
     "config key 'model.test.crop_size': [16, 16] is too small: the MiT encoder needs at least 32x32 pixels"),
    (['model.test.crop_size=[32,32]', 'model.test.stride=[32,32]'],
     "config key 'model.test.crop_size': [32, 32] is too small for HRDA: the context view (0.5x) needs windows "
     "of at least 64x64 pixels"),
    (['model.type=encoder_decoder', 'data.crop_size=[16,16]'],
     "config key 'data.crop_size': [16, 16] is too small: the MiT encoder needs at least 32x32 pixels"),
    (['data.sync_crop_size=[2048,512]'],
     "config key 'data.sync_crop_size': [2048, 512] must fit in data.crop_size [1024, 1024]"),
    (['model.test.stride=[2000,512]'],
     "config key 'model.test.stride': [2000, 512] is larger than model.test.crop_size [1024, 1024]: the sliding "
     "windows would leave gaps"),
    (['model.hrda.scales=[0.5, 2.0]'],
     "config key 'model.hrda.scales': expected [context scale, 1.0] with 4 / context scale an integer "
     "(e.g. [0.5, 1.0]), got [0.5, 2.0]"),
    (['model.hrda.hr_loss_weight=0.6', 'model.hrda.lr_loss_weight=0.6'],
     "config keys 'model.hrda.hr_loss_weight' + 'model.hrda.lr_loss_weight' = 0.6 + 0.6 exceed 1 (the fused "
     "loss gets 1 - their sum)"),
])
def test_config_ranges(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(REPO, 'configs/gta2cs.yaml'), overrides)
    assert str(e.value) == message


def test_config_ranges_everywhere_a_config_is_read(tmp_path):
    # keys that must fit together may change one override at a time
    cfg = load_config(None, ['data.crop_size=[64,64]', 'model.hrda.hr_crop_size=[32,32]'])
    assert cfg.data.crop_size == [64, 64] and cfg.model.hrda.hr_crop_size == [32, 32]
    # a YAML file
    (tmp_path / 'bad.yaml').write_text('train:\n  max_iters: -3\n')
    with pytest.raises(ConfigError, match=r"^config key 'train.max_iters': expected a value >= 1, got -3$"):
        load_config(str(tmp_path / 'bad.yaml'))
    # merge (mic_eval's stored configs) and resolve_section (build_model's partial dicts)
    with pytest.raises(ConfigError, match=r"'data.batch_size': expected a value >= 1, got 0"):
        merge(defaults(), {'data': {'batch_size': 0}})
    with pytest.raises(ConfigError, match=r"'model.hrda.hr_crop_size': \[5, 5\] is too small"):
        resolve_section('model', {'hrda': {'hr_crop_size': [5, 5]}})
    with pytest.raises(ConfigError, match=r"'model.hrda.hr_crop_size': \[5, 5\] is too small"):
        mic_model.build_model({'hrda': {'hr_crop_size': [5, 5]}})
    with pytest.raises(ConfigError, match=r"'data.rcs.min_pixels': expected a value >= 0, got -1"):
        mic_data.UDADataset({'rcs': {'min_pixels': -1}}, seed=0)


def test_training_script_refuses_bad_values(tmp_path):
    work = tmp_path / 'run'
    err, _, _ = run_cli(mic_train.main, ['--cfg', os.path.join(REPO, 'configs/demo.yaml'), '--opt',
                                         'train.max_iters=-3', f'train.work_dir={work}'])
    assert err == "error: config key 'train.max_iters': expected a value >= 1, got -3"
    assert not work.exists()
    err, _, _ = run_cli(mic_train.main, ['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt',
                                         'model.hrda.hr_crop_size=[5,5]', f'train.work_dir={work}'])
    assert err.startswith("error: config key 'model.hrda.hr_crop_size': [5, 5] is too small")
    assert not work.exists()


def test_eval_script_refuses_bad_values(tmp_path, ckpt):
    err, _, _ = run_cli(mic_eval.main, ['--ckpt', ckpt, '--out', tmp_path / 'o', '--opt',
                                        'model.test.mode=slide', 'model.test.crop_size=[16,16]',
                                        'model.test.stride=[32,32]'])
    assert err == ("error: config key 'model.test.stride': [32, 32] is larger than model.test.crop_size [16, 16]: "
                   "the sliding windows would leave gaps")
    assert not (tmp_path / 'o').exists()


# --------------------------------------------------------------------------
# Every script: one line 'error: ...' and exit status 2
# --------------------------------------------------------------------------

def test_exit_status_2_as_processes(tmp_path):
    """The real programs (not only main()): status 2, stderr exactly one line."""
    for argv, message in [
        (['mic_config.py', 'configs/demo.yaml', '--opt', 'train.max_iters=-3'],
         "error: config key 'train.max_iters': expected a value >= 1, got -3\n"),
        (['convert_labels.py', 'gta', str(tmp_path / 'missing'), '--quiet'],
         f'error: dataset root {tmp_path}/missing does not exist; expected {tmp_path}/missing/images/*.png and '
         f'{tmp_path}/missing/labels/*.png as extracted from the GTA download (labels: 8-bit palette PNGs of '
         f'Cityscapes label ids)\n'),
    ]:
        p = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
        assert (p.returncode, p.stderr, p.stdout) == (2, message, '')


@pytest.mark.parametrize('content,message', [
    (None, 'is a folder, not a YAML file'),
    ('train:\n  max_iters: 5\n'.encode('utf-16'), 'is not UTF-8 text (byte 0: a binary file, or another encoding '
                                                    'such as UTF-16); save it as UTF-8'),
    (b'train:\n  max_iters: 5\ntrain:\n  seed: 1\n', "is not valid YAML: key 'train' is given twice (lines 1 and 3): "
                                                     'the second would silently replace the first'),
])
def test_bad_config_files_are_one_line(tmp_path, content, message):
    """--cfg of a folder, a UTF-16 file, a key given twice: one line naming the file, no run folder."""
    path, work = tmp_path / 'cfg.yaml', tmp_path / 'run'
    path.mkdir() if content is None else path.write_bytes(content)
    for main, argv in ((mic_config.main, [path]), (mic_train.main, ['--cfg', path, '--opt', f'train.work_dir={work}']),
                       (mic_data.main, ['show', path, '--out', tmp_path / 'show'])):
        err, _, _ = run_cli(main, argv)
        assert err == f'error: config file {path} {message}', main
    assert not work.exists() and not (tmp_path / 'show').exists()


def test_non_finite_numbers_are_one_line(tmp_path):
    work = tmp_path / 'run'
    for opt, message in (('optim.lr=1e999', "'optim.lr': expected a finite number, got '1e999'"),
                         ('optim.weight_decay=.inf', "'optim.weight_decay': expected a finite number, got inf"),
                         ('uda.mask_alpha=.nan', "'uda.mask_alpha': expected 'same' | a finite number, got nan")):
        err, _, _ = run_cli(mic_train.main, ['--cfg', os.path.join(REPO, 'configs/demo.yaml'), '--opt', opt,
                                             f'train.work_dir={work}'])
        assert err == f'error: config key {message}'
    assert not work.exists()
    p = subprocess.run([sys.executable, 'mic_config.py', 'configs/demo.yaml', '--opt', 'optim.lr=.inf'], cwd=REPO,
                       capture_output=True, text=True)
    assert (p.returncode, p.stderr, p.stdout) == (2, "error: config key 'optim.lr': expected a finite number, "
                                                     'got inf\n', '')


def test_exit_status_2_in_process(tmp_path, ckpt, monkeypatch):
    err, _, _ = run_cli(mic_eval.main, ['--ckpt', tmp_path / 'nope.pth'])
    assert err == f'error: checkpoint {tmp_path}/nope.pth does not exist'
    err, _, _ = run_cli(mic_config.main, ['--opt', 'data.batch_size=0'])
    assert err == "error: config key 'data.batch_size': expected a value >= 1, got 0"
    err, _, _ = run_cli(mic_data.main, ['show', str(tmp_path / 'nope.yaml')])
    assert err == f'error: config file {tmp_path}/nope.yaml does not exist (the shipped ones are in configs/)'
    err, _, _ = run_cli(mic_data.main, ['show', os.path.join(REPO, 'configs/demo.yaml'), '--opt',
                                        f'data.source.root={tmp_path}/none', '--out', tmp_path / 'show'])
    assert err.startswith(f'error: dataset root {tmp_path}/none (gta) does not exist; expected ')
    # convert_labels: the wrong folders of each kind still get their clear messages
    os.makedirs(tmp_path / 'gta' / 'images')
    err, _, _ = run_cli(convert_labels.main, ['gta', tmp_path / 'gta', '--quiet'])
    assert err.startswith(f'error: {tmp_path}/gta has no labels/ folder; expected {tmp_path}/gta/images/*.png')
    os.makedirs(tmp_path / 'cs' / 'leftImg8bit')
    err, _, _ = run_cli(convert_labels.main, ['cityscapes', tmp_path / 'cs', '--quiet'])
    assert err.startswith(f'error: {tmp_path}/cs has no gtFine/ folder; expected ')
    os.makedirs(tmp_path / 'syn' / 'GT' / 'LABELS')
    err, _, _ = run_cli(convert_labels.main, ['synthia', tmp_path / 'syn', '--quiet'])
    assert err.startswith(f'error: no label files GT/LABELS/*.png in {tmp_path}/syn; expected ')
    # a corrupt label file: named, and no output or temporary file
    save(tmp_path / 'g2' / 'labels' / '00001.png', np.random.default_rng(0).integers(0, 34, (H, W), dtype=np.uint8),
         mode='L')
    truncate(tmp_path / 'g2' / 'labels' / '00001.png')
    err, _, _ = run_cli(convert_labels.main, ['gta', tmp_path / 'g2', '--quiet'])
    assert err.startswith(f'error: cannot read label {tmp_path}/g2/labels/00001.png: ')
    assert os.listdir(tmp_path / 'g2' / 'labels') == ['00001.png'] and os.listdir(tmp_path / 'g2') == ['labels']
    # mic_demo: an output folder that cannot be written
    fail_os_open(monkeypatch, errno.EROFS, tmp_path / 'demo')
    err, _, _ = run_cli(mic_demo.main, [tmp_path / 'demo', '--num-source', '1', '--num-target', '1',
                                        '--num-val', '1', '--width', '64', '--height', '32'])
    assert err.startswith(f'error: cannot write {tmp_path}/demo/') and 'read-only file system' in err


# --------------------------------------------------------------------------
# Threads: one per loader worker; the main process within its cores
# --------------------------------------------------------------------------

def test_loader_workers_use_one_thread(train_data, monkeypatch, cityscapes_val, tmp_path):
    torch.set_num_threads(2)
    log = tmp_path / 'threads.txt'  # written by the worker processes
    read_image = mic_data.read_image

    def logged(path):
        with open(log, 'a') as f:
            f.write(f'{torch.get_num_threads()} ')
        return read_image(path)
    monkeypatch.setattr(mic_data, 'read_image', logged)
    next(iter(mic_data.build_train_loader(train_data, seed=0)))  # (and the batches the worker prefetches)
    threads = log.read_text().split()
    assert len(threads) >= 4 and set(threads) == {'1'} and torch.get_num_threads() == 2
    log.unlink()
    model = mic_model.build_model(tiny_model_cfg(**SINGLE_SCALE))
    monkeypatch.setattr(type(model), 'inference', lambda self, img, out_size: torch.zeros(1, 19, *out_size))
    mic_eval.evaluate(model, train_data['val'], num_workers=1, progress=False)  # the evaluation loader
    assert log.read_text().split() == ['1'] * 2


def test_limit_threads(monkeypatch):
    monkeypatch.setattr(mic_runtime, 'usable_cores', lambda: 4)
    torch.set_num_threads(8)
    assert mic_runtime.limit_threads() == 4
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')  # torchrun: the node's processes share the cores
    assert mic_runtime.limit_threads() == 2
    assert mic_runtime.limit_threads(local_world_size=8) == 1
    torch.set_num_threads(1)  # never raised (OMP_NUM_THREADS=1 stays 1)
    assert mic_runtime.limit_threads(local_world_size=1) == 1


def test_usable_cores_reads_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {3})
    assert mic_runtime.usable_cores() == 1


# --------------------------------------------------------------------------
# Bad input that already worked, at the level of the training data
# --------------------------------------------------------------------------

def test_training_data_bad_input(train_data, tmp_path):
    cases = []
    cases.append(({**train_data, 'source': {**train_data['source'], 'root': str(tmp_path / 'none')}},
                  f'dataset root {tmp_path}/none (gta) does not exist; expected {tmp_path}/none/images/*.png and '
                  f'{tmp_path}/none/labels/*.png as extracted from the GTA download, then `python convert_labels.py '
                  f'gta {tmp_path}/none` for labels/*_labelTrainIds.png'))
    # raw (unconverted) labels
    os.makedirs(tmp_path / 'raw' / 'images')
    os.makedirs(tmp_path / 'raw' / 'labels')
    save(tmp_path / 'raw' / 'images' / '00000.png', np.zeros((H, W, 3), np.uint8))
    save(tmp_path / 'raw' / 'labels' / '00000.png', np.zeros((H, W), np.uint8), mode='L')
    cases.append(({**train_data, 'source': {**train_data['source'], 'root': str(tmp_path / 'raw')}},
                  f'gta labels in {tmp_path}/raw/labels are not converted to train ids ({tmp_path}/raw/labels/'
                  f'00000.png has no {tmp_path}/raw/labels/00000_labelTrainIds.png): run `python convert_labels.py '
                  f'gta {tmp_path}/raw`'))
    # RCS without statistics
    cases.append(({**train_data, 'rcs': {'enabled': True}},
                  f'rare class sampling needs {tmp_path}/gta/sample_class_stats.json, which does not exist: run '
                  f'`python convert_labels.py gta {tmp_path}/gta` (or set data.rcs.enabled=false)'))
    for cfg, message in cases:
        with pytest.raises(DataError) as e:
            mic_data.UDADataset(cfg, seed=0)
        assert str(e.value) == message
    # a label in the wrong mode (RGB colours instead of train ids), found when a sample is loaded
    for i in range(2):
        save(tmp_path / 'gta' / 'labels' / f'{i:05d}_labelTrainIds.png', np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match=r"_labelTrainIds\.png has mode 'RGB': train-id labels must be 8-bit "
                                        r"single-channel PNGs.*python convert_labels\.py"):
        mic_data.UDADataset({**train_data, 'num_workers': 0}, seed=0)[0]


def test_eval_text_file_named_pth(tmp_path, cityscapes_val):
    (tmp_path / 'model.pth').write_text('these are not weights')
    out = tmp_path / 'out'
    err, _, _ = run_cli(mic_eval.main, ['--ckpt', tmp_path / 'model.pth', '--out', out])
    assert err.startswith(f'error: {tmp_path}/model.pth is not a PyTorch checkpoint')
    assert not out.exists()


def test_metrics_json_never_half_written(tmp_path, ckpt, cityscapes_val):
    """A good run for contrast: metrics.json is complete JSON and no temporary file is left."""
    out = tmp_path / 'out'
    metrics, _, _ = run_cli(mic_eval.main, ['--ckpt', ckpt, '--data-root', tmp_path / 'cs', '--out', out,
                                            '--no-preds'], expect_error=False)
    with open(out / 'metrics.json') as f:
        assert json.load(f)['num_images'] == 2 == metrics['num_images']
    assert os.listdir(out) == ['metrics.json']


# --------------------------------------------------------------------------
# Training faults: non-finite state, leftovers, failed starts, the run folder's history
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_demo(tmp_path_factory):
    return str(tmp_path_factory.mktemp('demo'))


def train_tiny(demo, work, *extra, resume=False):
    argv = ['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt',
            *tiny_opts(demo, str(work), 'train.eval_interval=0', 'train.debug_img_interval=0', *extra)]
    first, out, err = run_cli(mic_train.main, argv + (['--resume'] if resume else []), expect_error=False)
    return (first if isinstance(first, str) else ''), out, err  # the error line, '' after a clean run


def finite_checkpoint(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt['iteration'], all(torch.isfinite(v).all() for v in ckpt['modules']['student'].values()
                                  if v.is_floating_point())


def test_exploding_run_never_checkpoints_non_finite_weights(tiny_demo, tmp_path):
    work = tmp_path / 'lr'
    err, _, _ = train_tiny(tiny_demo, work, 'optim.lr=1e6', 'optim.warmup_iters=0', 'train.max_iters=10',
                           'train.ckpt_interval=4', 'train.log_interval=50')
    assert err.startswith('error: ') and 'non-finite' in err, err
    # the advice says what is true of the folder: a checkpoint to resume, or none yet
    assert ('No checkpoint was written yet' in err) != ('latest.pth holds iteration' in err), err
    assert not (work / 'metrics.json').exists() and not temp_files(work)
    if (work / 'latest.pth').exists():  # whatever was saved before the blow-up holds finite weights
        assert finite_checkpoint(work / 'latest.pth')[1]
        err, _, _ = train_tiny(tiny_demo, work, 'optim.lr=1e6', 'optim.warmup_iters=0', 'train.max_iters=10',
                               'train.ckpt_interval=4', 'train.log_interval=50', resume=True)
        assert 'non-finite' in err  # the same settings blow up again; the advice (lower lr) is what works


def test_non_finite_weights_with_finite_losses_are_not_saved(tiny_demo, tmp_path, monkeypatch):
    step = mic_train.Trainer.step

    def poison_at_3(self, batch, iteration, keep_debug=False):
        logs = step(self, batch, iteration, keep_debug)
        if iteration == 3:  # an overflow in the update: the losses were still finite
            with torch.no_grad():
                next(self.student.parameters()).fill_(float('inf'))
        return logs
    monkeypatch.setattr(mic_train.Trainer, 'step', poison_at_3)
    work = tmp_path / 'w'
    err, _, _ = train_tiny(tiny_demo, work, 'train.max_iters=6', 'train.ckpt_interval=2')
    assert 'the weights became non-finite by iteration 4' in err and 'continue with --resume' in err
    assert finite_checkpoint(work / 'latest.pth') == (2, True)
    monkeypatch.setattr(mic_train.Trainer, 'step', step)
    err, out, _ = train_tiny(tiny_demo, work, 'train.max_iters=6', 'train.ckpt_interval=2', resume=True)
    assert err == '' and 'resumed' in out and finite_checkpoint(work / 'latest.pth') == (6, True)
    lines = (work / 'command.txt').read_text().splitlines()  # every invocation, with its launcher
    assert len(lines) == 2 and all('[python]  ' in line for line in lines) and lines[1].endswith('--resume')


def test_leftover_temporary_files_are_removed_at_the_next_start(tiny_demo, tmp_path):
    work = tmp_path / 'tmpfiles'
    work.mkdir()
    (work / '.latest.pth.deadbeef.tmp').write_bytes(b'half a checkpoint')
    err, out, _ = train_tiny(tiny_demo, work, 'train.max_iters=2')
    assert err == '' and 'removed 1 temporary file(s) of an interrupted write' in out
    assert not temp_files(work) and (work / 'metrics.json').exists()


def test_a_failed_start_leaves_no_run_folder(tiny_demo, tmp_path):
    work = tmp_path / 'never'
    err, _, _ = train_tiny(tiny_demo, work, f'model.pretrained={tmp_path}/mit_b0.pth', 'uda.fd_lambda=0')
    assert 'pretrained encoder weights' in err and 'model.pretrained=null uda.fd_lambda=0' in err
    assert not work.exists()
    err, _, _ = train_tiny(tiny_demo, work, f'data.source.root={tmp_path}/nowhere')
    assert 'does not exist' in err and not work.exists()


def test_a_folder_of_another_model_is_not_offered_for_resume(tiny_demo, tmp_path):
    work = tmp_path / 'b0'
    assert train_tiny(tiny_demo, work, 'train.max_iters=2')[0] == ''
    err, _, _ = train_tiny(tiny_demo, work, 'train.max_iters=2', 'model.backbone.type=mit_b1')
    assert 'already holds a run of another model' in err and '--resume' not in err
    assert 'train.work_dir=work_dirs/NEW' in err
    err, _, _ = train_tiny(tiny_demo, work, 'train.max_iters=4')  # same model, another config
    assert 'Pass --resume to continue it' in err and '(differing keys: train.max_iters)' in err
