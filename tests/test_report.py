"""mic_report: report.png panels, TensorBoard event files read back, the summary over seeds against
hand-computed means and sample standard deviations, plain progress lines, robust log reading."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mic_eval
import mic_report
import mic_runtime
import mic_summary
from mic_data import CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSES = ('source', 'mix', 'masked')


# --------------------------------------------------------------------------
# A fake run folder: log.jsonl as mic_train writes it
# --------------------------------------------------------------------------

def train_record(it, pseudo=True, passes=PASSES):
    r = {'iteration': it}
    for j, p in enumerate(passes):
        r[f'{p}.loss_seg'] = round(2.0 / (1 + it / 100) + 0.1 * j, 6)
    r['source.loss_seg_hr'] = 0.1
    r['lr'] = 6e-5 * (1 - it / 2000)
    if pseudo:
        r['pseudo_ratio'] = min(0.9, it / 1000)
        shares = np.linspace(1, 19, 19)[::-1] / np.linspace(1, 19, 19).sum()
        r.update({f'pseudo_class.{c}': float(s) for c, s in zip(CLASSES, shares)})
        r['pseudo_class.train'] = 0.0  # the teacher never predicts 'train'
    r.update(time_per_iter=0.5, data_time=0.01, memory_mb=1234)
    return r


def eval_record(it, miou):
    iou = {c: (miou + k % 5 if c != 'train' else 0.0) for k, c in enumerate(CLASSES)}
    iou['terrain'] = None  # absent from labels and predictions
    return {'iteration': it, 'eval': {'mIoU': miou, 'aAcc': 90.0, 'num_pixels': 10, 'num_images': 2},
            'IoU': iou, 'best_mIoU': miou}


def write_log(folder, records, tail=''):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'log.jsonl'), 'w') as f:
        for r in records:
            f.write(json.dumps(r) + '\n')
        f.write(tail)
    return os.path.join(folder, 'log.jsonl')


def full_log(folder, n=40, interval=50, eval_every=10):
    records = []
    for i in range(1, n + 1):
        records.append(train_record(i * interval))
        if i % eval_every == 0:
            records.append(eval_record(i * interval, 20.0 + i))
    return write_log(folder, records)


# --------------------------------------------------------------------------
# log.jsonl reading
# --------------------------------------------------------------------------

def test_read_log_truncated_last_line_and_resume(tmp_path):
    rec = [train_record(50), train_record(100), eval_record(100, 30.0), train_record(150)]
    path = write_log(str(tmp_path), rec, tail=json.dumps(train_record(200))[:37])  # killed mid-write
    train, evals = mic_report.read_log(path)
    assert [r['iteration'] for r in train] == [50, 100, 150] and [r['iteration'] for r in evals] == [100]
    # resumed from the checkpoint at 100: its first record lands on the partial line, then 150 again
    with open(path, 'a') as f:
        f.write(json.dumps(train_record(150, pseudo=False)) + '\n' + json.dumps(eval_record(200, 35.0)) + '\n')
        f.write('\n{"not a record": 1}\n[1, 2]\n')
    train, evals = mic_report.read_log(path)
    assert [r['iteration'] for r in train] == [50, 100, 150]
    assert 'pseudo_ratio' not in train[-1]  # the resumed run's record replaced the first run's
    assert [(r['iteration'], r['eval']['mIoU']) for r in evals] == [(100, 30.0), (200, 35.0)]


# --------------------------------------------------------------------------
# report.png
# --------------------------------------------------------------------------

def _png(path):
    return np.asarray(Image.open(path).convert('RGB'))


def test_report_png_panels(tmp_path):
    pytest.importorskip('matplotlib', reason='report.png needs matplotlib (requirements-optional.txt)')
    run = str(tmp_path / 'run')
    full_log(run)
    panels = mic_report.write_report(run)
    assert panels == ['loss: source', 'loss: mix', 'loss: masked', 'learning rate', 'pseudo-label confidence',
                      'target mIoU', 'per-class IoU', 'pseudo-label classes']
    img = _png(os.path.join(run, 'report.png'))
    assert img.shape[1] == 1600 and img.shape[0] > 600
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # drawn, not uniform
    # the collapsed class shows in the heat map: red cells (RdYlGn at 0) that a healthy run lacks
    healthy = str(tmp_path / 'healthy')
    train, evals = mic_report.read_log(os.path.join(run, 'log.jsonl'))
    write_log(healthy, train + [{**r, 'IoU': {**r['IoU'], 'train': 50.0}} for r in evals])
    mic_report.write_report(healthy)

    def red(a):
        return int(((a[..., 0] > 150) & (a[..., 1] < 40) & (a[..., 2] < 60)).sum())
    assert red(img) > red(_png(os.path.join(healthy, 'report.png'))) + 200
    assert sorted(os.listdir(run)) == ['log.jsonl', 'report.png']  # atomic: no temporary file left

    # a source-only run before its first evaluation: no pseudo-label panels, 'no evaluation yet'
    run2 = str(tmp_path / 'src_only')
    write_log(run2, [train_record(i * 10, pseudo=False, passes=('source',)) for i in range(1, 6)])
    panels2 = mic_report.write_report(run2, path=str(tmp_path / 'r2.png'))
    assert panels2 == ['loss: source', 'learning rate', 'target mIoU', 'per-class IoU']
    img2 = _png(str(tmp_path / 'r2.png'))
    assert img2.shape[1] == 1600 and img2.shape[0] < img.shape[0]  # fewer rows of panels
    assert len(np.unique(img2.reshape(-1, 3), axis=0)) > 20


def test_report_png_survives_truncated_log_and_cli(tmp_path):
    pytest.importorskip('matplotlib', reason='report.png needs matplotlib (requirements-optional.txt)')
    run = str(tmp_path / 'run')
    full_log(run, n=12, eval_every=4)
    with open(os.path.join(run, 'log.jsonl'), 'a') as f:
        f.write('{"iteration": 650, "source.loss_seg": 0.')  # a killed run's last line
    mic_report.main([str(tmp_path / 'ru*')])
    assert os.path.getsize(os.path.join(run, 'report.png')) > 10000
    with pytest.raises(SystemExit):
        mic_report.main([str(tmp_path / 'nothing_here')])


def test_missing_optional_packages_name_the_pip_command(tmp_path, monkeypatch):
    full_log(str(tmp_path))
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(mic_report.MissingPackageError, match='pip install matplotlib'):
        mic_report.write_report(str(tmp_path))
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(mic_report.MissingPackageError, match="'tensorboard'.*pip install tensorboard"):
        mic_report.TensorBoardWriter(str(tmp_path / 'tb'))


# --------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------

def test_tensorboard_event_file(tmp_path):
    pytest.importorskip('tensorboard', reason='TensorBoard logging needs tensorboard (requirements-optional.txt)')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = str(tmp_path / 'tensorboard')
    grid = tmp_path / 'grid.png'
    Image.fromarray(np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3)).save(grid)
    opt = torch.optim.AdamW([{'params': [torch.zeros(1, requires_grad=True)], 'lr': 1e-4},
                             {'params': [torch.zeros(1, requires_grad=True)], 'lr': 1e-3, 'name': 'head'}])
    with mic_report.TensorBoardWriter(logdir) as tb:
        for it in (50, 100):
            tb.add_record(train_record(it))
            tb.add_learning_rates(opt, it)
        tb.add_record(eval_record(100, 42.5))
        tb.add_image('debug', str(grid), 100)
        tb.add_image('debug_array', np.zeros((8, 8, 3), np.uint8), 100)
    acc = EventAccumulator(logdir, size_guidance={'scalars': 0, 'images': 0})
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    expected = {'source/loss_seg', 'source/loss_seg_hr', 'mix/loss_seg', 'masked/loss_seg', 'train/lr',
                'train/pseudo_ratio', 'train/time_per_iter', 'train/memory_mb', 'pseudo_class/traffic_light',
                'pseudo_class/train', 'lr/group0', 'lr/head', 'eval/mIoU', 'eval/aAcc', 'eval/best_mIoU',
                'IoU/road', 'IoU/traffic_light', 'IoU/train'}
    assert expected <= tags
    assert 'IoU/terrain' not in tags and 'eval/num_pixels' not in tags  # null IoU and counts are not scalars
    loss = acc.Scalars('mix/loss_seg')
    assert [e.step for e in loss] == [50, 100]
    assert [e.value for e in loss] == pytest.approx([train_record(it)['mix.loss_seg'] for it in (50, 100)])
    assert [(e.step, e.value) for e in acc.Scalars('eval/mIoU')] == [(100, 42.5)]
    assert acc.Scalars('IoU/train')[0].value == 0.0
    assert acc.Scalars('lr/head')[0].value == pytest.approx(1e-3)
    assert acc.Scalars('train/pseudo_ratio')[-1].value == pytest.approx(0.1)
    img = acc.Images('debug')
    assert len(img) == 1 and img[0].step == 100 and (img[0].width, img[0].height) == (40, 24)


# --------------------------------------------------------------------------
# Pseudo-label class shares
# --------------------------------------------------------------------------

def test_pseudo_class_logs():
    plabel = torch.tensor([[[0, 0, 1, 13]], [[13, 13, 2, 2]]])  # [B=2,1,4] as [B,H,W]
    valid = torch.tensor([[[[1, 1, 1, 1]]], [[[1, 1, 0, 0]]]], dtype=torch.uint8)  # [B,1,H,W]
    logs = mic_report.pseudo_class_logs(plabel, valid)
    assert len(logs) == 19 and all(k.startswith('pseudo_class.') for k in logs)
    shares = {k[len('pseudo_class.'):]: float(v) for k, v in logs.items()}
    assert shares['road'] == pytest.approx(2 / 6) and shares['car'] == pytest.approx(3 / 6)
    assert shares['sidewalk'] == pytest.approx(1 / 6) and shares['building'] == 0
    assert sum(shares.values()) == pytest.approx(1)


# --------------------------------------------------------------------------
# Summary over seeds
# --------------------------------------------------------------------------

def write_metrics(folder, miou, iou, miou16=None):
    os.makedirs(folder, exist_ok=True)
    m = {'mIoU': miou, 'IoU': iou, 'aAcc': 95.0, 'num_images': 500}
    if miou16 is not None:
        m['mIoU16'] = miou16
    mic_runtime.save_json(os.path.join(folder, 'metrics.json'), m)


def test_summary_mean_and_sample_std(tmp_path, capsys):
    # 3 seeds with known numbers; 'train' collapses in seed 1; 'terrain' absent in seed 2
    write_metrics(str(tmp_path / 'gta2cs_s0'), 70.0, {'road': 96.0, 'train': 60.0, 'terrain': 40.0})
    write_metrics(str(tmp_path / 'gta2cs_s1'), 73.0, {'road': 97.0, 'train': 0.0, 'terrain': 44.0})
    write_metrics(str(tmp_path / 'gta2cs_s2'), 76.0, {'road': 98.0, 'train': 30.0, 'terrain': None})
    os.makedirs(tmp_path / 'gta2cs_s3')  # still training
    with open(tmp_path / 'gta2cs_s3' / 'log.jsonl', 'w') as f:
        f.write(json.dumps({'iteration': 12000, 'lr': 1e-5}) + '\n')
    out = str(tmp_path / 'summary.json')
    mic_eval.main(['--summary', str(tmp_path / 'gta2cs_s*'), '--summary-json', out])
    text = capsys.readouterr().out
    with open(out) as f:
        s = json.load(f)
    assert s['n'] == 3 and [os.path.basename(r['run']) for r in s['runs']] == ['gta2cs_s0', 'gta2cs_s1', 'gta2cs_s2']
    assert s['mean']['mIoU'] == pytest.approx(73.0) and s['std']['mIoU'] == pytest.approx(3.0)  # sqrt((9+0+9)/2)
    assert s['mean']['IoU']['road'] == pytest.approx(97.0) and s['std']['IoU']['road'] == pytest.approx(1.0)
    assert s['mean']['IoU']['train'] == pytest.approx(30.0) and s['std']['IoU']['train'] == pytest.approx(30.0)
    # terrain: two values, 40 and 44 -> mean 42, std sqrt(8) (n - 1 = 1)
    assert s['mean']['IoU']['terrain'] == pytest.approx(42.0)
    assert s['std']['IoU']['terrain'] == pytest.approx(math.sqrt(8)) and s['count']['IoU']['terrain'] == 2
    assert s['std']['aAcc'] == pytest.approx(0.0) and 'mIoU16' not in s['mean']
    assert [os.path.basename(u['run']) for u in s['unfinished']] == ['gta2cs_s3']
    assert 'iteration 12000' in s['unfinished'][0]['reason'] and 'n - 1' in s['std_definition']
    # the markdown table: header, a row per run, mean ± std; the unfinished run is listed
    lines = text.splitlines()
    assert lines[0] == '| run | road | terrain | train | mIoU |'
    assert lines[1] == '|---|--:|--:|--:|--:|'
    assert lines[3].endswith('| 97.0 | 44.0 | 0.0 | 73.0 |')
    assert lines[4].endswith('| 98.0 | – | 30.0 | 76.0 |')
    assert lines[5] == '| mean ± std (n=3) | 97.0 ± 1.0 | 42.0 ± 2.8 | 30.0 ± 30.0 | 73.0 ± 3.0 |'
    assert 'sample standard deviation (n - 1' in text
    assert any(line.startswith('unfinished') and 'gta2cs_s3' in line for line in lines)


def test_summary_synthia_mIoU16_and_explicit_folders(tmp_path, capsys):
    runs = []
    for i, (m19, m16) in enumerate([(60.0, 70.0), (62.0, 72.0)]):
        runs.append(str(tmp_path / f'syn_s{i}'))
        write_metrics(runs[-1], m19, {'road': 80.0 + i}, miou16=m16)
    summary = mic_summary.summary_main(runs + [str(tmp_path / 'missing_*')])
    text = capsys.readouterr().out
    assert summary['mean']['mIoU16'] == pytest.approx(71.0)
    assert summary['std']['mIoU16'] == pytest.approx(math.sqrt(2))
    assert text.splitlines()[0] == '| run | road | mIoU | mIoU16 |'
    assert '| mean ± std (n=2) | 80.5 ± 0.7 | 61.0 ± 1.4 | 71.0 ± 1.4 |' in text
    assert "no folder matches" in text and 'missing_*' in text
    # --summary needs no --ckpt, and refuses both
    with pytest.raises(SystemExit):
        mic_eval.parse_args(['--summary', runs[0], '--ckpt', 'x.pth'])
    with pytest.raises(SystemExit):
        mic_eval.parse_args([])
    with pytest.raises(SystemExit):  # nothing matches at all: a clean error
        mic_summary.summary_main([str(tmp_path / 'nope*')])


def test_summary_cli_subprocess(tmp_path):
    write_metrics(str(tmp_path / 'a'), 50.0, {'road': 90.0})
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'mic_eval.py'), '--summary', str(tmp_path / '*')],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert '| mean (n=1) | 90.0 | 50.0 |' in p.stdout and 'no standard deviation' in p.stdout


# --------------------------------------------------------------------------
# Progress lines
# --------------------------------------------------------------------------

def test_progress_plain_lines_when_not_a_terminal():
    stream = io.StringIO()  # isatty() is False, like a job's log file
    total, interval = 40, 10
    progress = mic_report.Progress(total, stream=stream)
    assert progress.plain and progress.bar is None
    for it in range(total):
        progress.update()
        done = it + 1
        if done % interval == 0:
            progress.log({**train_record(done), 'time_per_iter': 0.5, 'lr': 5.9e-5, 'memory_mb': 10234})
    progress.write('iteration 40: target mIoU 42.00')
    progress.close()
    out = stream.getvalue()
    assert '\r' not in out
    lines = out.splitlines()
    assert len(lines) == total // interval + 1
    assert lines[0].startswith('iteration 10/40  loss ') and lines[0].endswith('  lr 5.90e-05  0.500 s/it  '
                                                                              'ETA 0:00:15  mem 10234 MB')
    assert [line.split()[1] for line in lines[:4]] == ['10/40', '20/40', '30/40', '40/40']
    assert lines[3].endswith('ETA 0:00:00  mem 10234 MB') and lines[4] == 'iteration 40: target mIoU 42.00'
    assert mic_report.progress_line({'iteration': 1200, 'a.loss_x': 1.0, 'b.loss_y': 0.234, 'lr': 5.9e-5,
                                     'time_per_iter': 0.412, 'memory_mb': 10234.4}, 40000) == \
        'iteration 1200/40000  loss 1.234  lr 5.90e-05  0.412 s/it  ETA 4:26:26  mem 10234 MB'


def test_progress_eta_ignores_one_slow_interval_and_disabled_rank():
    stream = io.StringIO()
    progress = mic_report.Progress(100, stream=stream)
    for it, t in ((10, 1.0), (20, 1.0), (30, 50.0)):  # the interval holding an evaluation is slow
        progress.log({'iteration': it, 'time_per_iter': t})
    assert stream.getvalue().splitlines()[-1] == 'iteration 30/100  50.000 s/it  ETA 0:01:10'
    quiet = io.StringIO()
    p = mic_report.Progress(100, stream=quiet, enabled=False)
    p.update()
    p.log(train_record(10))
    p.write('x')
    p.close()
    assert quiet.getvalue() == ''


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal():
    stream = _FakeTerminal()
    with mic_report.Progress(20, stream=stream) as progress:
        assert progress.bar is not None
        for it in range(20):
            progress.update()
            if (it + 1) % 10 == 0:
                progress.log(train_record(it + 1))
    assert '\r' in stream.getvalue() and '20/20' in stream.getvalue()
