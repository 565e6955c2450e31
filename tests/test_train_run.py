"""mic_train end to end on a tiny generated demo: the run folder, exact resume, two gloo processes,
bad input. Sizes are tiny so that the whole file runs in about a minute on 2 cores."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import mic_model
import mic_train
from helpers import REPO, synthetic_batch, tiny_cfg, tiny_opts



@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('demo'))


def run(demo_root, work_dir, *extra, resume=False):
    argv = ['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt', *tiny_opts(demo_root, work_dir, *extra)]
    if resume:
        argv.append('--resume')
    return mic_train.main(argv)


HAS_TENSORBOARD = importlib.util.find_spec('tensorboard') is not None
HAS_MATPLOTLIB = importlib.util.find_spec('matplotlib') is not None  # report.png


def test_run_folder_contents(demo_root, tmp_path, capsys):
    """The run folder's files; TensorBoard's events and report.png where their packages are installed."""
    work = str(tmp_path / 'run')
    tb = f'train.tensorboard={str(HAS_TENSORBOARD).lower()}'
    metrics = run(demo_root, work, tb)
    assert 0 <= metrics['mIoU'] <= 100
    # stdout is no terminal here: one plain progress line per log interval, no carriage returns
    out = capsys.readouterr().out
    assert '\r' not in out and [line.split()[1] for line in out.splitlines() if line.startswith('iteration ')
                                and 's/it' in line] == ['2/8', '4/8', '6/8', '8/8']
    for name in ('config.yaml', 'command.txt', 'log.jsonl', 'latest.pth', 'metrics.json',
                 'debug/000000.png', 'debug/000004.png'):
        assert os.path.isfile(os.path.join(work, name)), name
    assert len(os.listdir(os.path.join(work, 'preds'))) == 2
    # every file was written through a temporary file that was renamed: nothing else is left
    assert sorted(os.listdir(work)) == ['best.pth', 'command.txt', 'config.yaml', 'debug', 'latest.pth', 'log.jsonl',
                                        'metrics.json', 'preds'] + ['report.png'] * HAS_MATPLOTLIB + \
        ['tensorboard'] * HAS_TENSORBOARD
    if HAS_TENSORBOARD:  # the event file holds what log.jsonl holds
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(os.path.join(work, 'tensorboard'), size_guidance={'images': 0}).Reload()
        tags = events.Tags()
        assert {'source/loss_seg', 'masked/loss_seg', 'train/pseudo_ratio', 'eval/mIoU', 'IoU/road'} <= \
            set(tags['scalars']) and 'debug' in tags['images']
        assert [e.step for e in events.Scalars('eval/mIoU')] == [4, 8]
    records = [json.loads(line) for line in open(os.path.join(work, 'log.jsonl'))]
    train = [r for r in records if 'eval' not in r]
    assert [r['iteration'] for r in train] == [2, 4, 6, 8]
    for key in ('lr', 'source.loss_seg', 'source.loss_seg_hr', 'mix.loss_seg', 'masked.loss_seg', 'pseudo_ratio',
                'time_per_iter', 'memory_mb'):
        assert key in train[0], key
    assert [r['iteration'] for r in records if 'eval' in r] == [4, 8]
    ckpt = torch.load(os.path.join(work, 'latest.pth'), weights_only=True)
    assert ckpt['iteration'] == 8 and ckpt['config']['train']['max_iters'] == 8 and len(ckpt['rng']) == 1
    assert {'modules', 'optimizers', 'scaler', 'sampler', 'meta'} <= set(ckpt)
    assert set(ckpt['modules']) == {'student', 'teacher'} and set(ckpt['optimizers']) == {'student'}
    model = mic_model.build_model(ckpt['config']['model'])
    assert mic_model.load_checkpoint(model, os.path.join(work, 'latest.pth'))['format'] == 'mic_train'
    # the same command again: the finished run is reported, not overwritten
    assert run(demo_root, work, tb)['mIoU'] == metrics['mIoU']
    # stopped after the last checkpoint but before metrics.json: the same command evaluates it
    os.remove(os.path.join(work, 'metrics.json'))
    assert run(demo_root, work, tb)['mIoU'] == metrics['mIoU']
    assert json.load(open(os.path.join(work, 'metrics.json')))['mIoU'] == metrics['mIoU']
    # another config in the same folder is refused
    with pytest.raises(SystemExit):
        run(demo_root, work, tb, 'train.seed=5')


def test_interrupted_run_resumes_exactly(demo_root, tmp_path, monkeypatch, capsys):
    run(demo_root, str(tmp_path / 'full'))
    full = torch.load(tmp_path / 'full' / 'latest.pth', weights_only=True)

    original = mic_train.Trainer.step

    def crash_at_5(self, batch, iteration, keep_debug=False):
        if iteration == 5:
            raise KeyboardInterrupt  # killed after the checkpoint at iteration 4
        return original(self, batch, iteration, keep_debug)
    monkeypatch.setattr(mic_train.Trainer, 'step', crash_at_5)
    with pytest.raises(SystemExit) as stop:  # Ctrl-C: one line that says how to continue, status 130
        run(demo_root, str(tmp_path / 'cut'))
    err = capsys.readouterr().err
    assert stop.value.code == 130 and 'Traceback' not in err
    assert 'training interrupted at iteration 5; the checkpoint ' in err
    assert 'holds iteration 4. Continue it with the same command plus --resume' in err
    assert torch.load(tmp_path / 'cut' / 'latest.pth', weights_only=True)['iteration'] == 4
    monkeypatch.setattr(mic_train.Trainer, 'step', original)
    run(demo_root, str(tmp_path / 'cut'), resume=True)
    resumed = torch.load(tmp_path / 'cut' / 'latest.pth', weights_only=True)
    for part in ('student', 'teacher'):
        for k, v in full['modules'][part].items():
            assert torch.equal(v, resumed['modules'][part][k]), (part, k)
    # resuming with another architecture is refused
    with pytest.raises(SystemExit):
        run(demo_root, str(tmp_path / 'cut'), 'model.backbone.type=mit_b1', resume=True)


def test_non_finite_loss_stops_with_names_and_keeps_the_checkpoint(demo_root, tmp_path, monkeypatch, capsys):
    original = mic_train.Trainer.step

    def nan_at_5(self, batch, iteration, keep_debug=False):
        logs = original(self, batch, iteration, keep_debug)
        if iteration == 5:
            logs['mix.loss_seg'] = torch.tensor(float('nan'))
        return logs
    monkeypatch.setattr(mic_train.Trainer, 'step', nan_at_5)
    with pytest.raises(SystemExit):
        run(demo_root, str(tmp_path / 'nan'))
    err = capsys.readouterr().err
    assert 'non-finite loss at iteration 5: mix.loss_seg' in err
    assert torch.load(tmp_path / 'nan' / 'latest.pth', weights_only=True)['iteration'] == 4


def test_bad_input_messages(demo_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(demo_root, str(tmp_path / 'a'), 'data.demo.enabled=false', f'data.source.root={tmp_path}/nope')
    assert 'nope' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(demo_root, str(tmp_path / 'b'), f'model.pretrained={tmp_path}/mit_b0.pth')
    assert 'SegFormer' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mic_train.main(['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt', 'train.max_itres=3'])
    assert "unknown config key 'train.max_itres'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (--resume without a path starts a new run when there is nothing to resume)
        mic_train.main(['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--resume', str(tmp_path / 'c.pth')])
    assert 'does not exist' in capsys.readouterr().err


def test_benchmark_needs_no_dataset(tmp_path, capsys):
    result = mic_train.main(['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--benchmark', '1', '--opt',
                             'model.backbone.type=mit_b0', 'model.decode_head.embed_dims=32',
                             'model.hrda.hr_crop_size=[32,32]', 'data.crop_size=[64,64]', 'train.device=cpu',
                             f'data.source.root={tmp_path}/none'])
    assert result['median_s_per_iter'] > 0 and result['crop'] == [64, 64]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['peak_memory_mb'] > 0


def test_two_process_gloo_run(demo_root, tmp_path):
    run(demo_root, str(tmp_path / 'prepare'), 'train.max_iters=1', 'train.eval_interval=0')  # data exists now
    work = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'mic_train.py'),
           '--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'),
           '--opt', *tiny_opts(demo_root, str(work), 'train.max_iters=3', 'train.eval_interval=0')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(work / 'latest.pth', weights_only=True)
    assert ckpt['meta']['world_size'] == 2 and len(ckpt['rng']) == 2 and ckpt['iteration'] == 3
    assert not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])  # seeds offset by rank
    assert 'target mIoU after 3 iterations' in proc.stdout


def _ddp_worker(rank, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        trainer = mic_train.Trainer(tiny_cfg(), torch.device('cpu'), rank, 2)
        torch.manual_seed(10 + rank)
        trainer.step(synthetic_batch(seed=rank), 0)  # different data per rank
        flat = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
        both = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(both, flat)
        if rank == 0:
            torch.save({'same': torch.equal(both[0], both[1]), 'params': flat}, out)
        dist.barrier()  # neither rank tears the group down while the other is still in the all-gather
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_are_synchronised(tmp_path):
    out = str(tmp_path / 'ddp.pt')
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / 'store'), out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert result['same']  # every pass's gradients reached both ranks
    # ... and they are not rank 0's alone: a single process on rank 0's batch ends elsewhere
    torch.manual_seed(0)
    single = mic_train.Trainer(tiny_cfg(), torch.device('cpu'))
    torch.manual_seed(10)
    single.step(synthetic_batch(seed=0), 0)
    flat = torch.cat([p.detach().flatten() for p in single.student.parameters()])
    assert not torch.equal(flat, result['params'])


def test_logged_lr_is_that_of_the_logged_iteration():
    """The learning rate in log.jsonl is the one of the record's iteration (a warm-up peak shows where it is),
    the losses are the interval's means."""
    meter = mic_train.IntervalMeter(torch.device('cpu'))
    for lr, loss in ((1.0, 2.0), (3.0, 4.0), (5.0, 9.0)):
        meter.add({'lr': torch.tensor(lr), 'source.loss_seg': torch.tensor(loss)})
    record = meter.record(3)
    assert record['lr'] == 5.0 and record['source.loss_seg'] == 5.0 and record['iteration'] == 3


def test_another_config_in_the_run_folder_names_the_differing_keys():
    from mic_checkpoint import differing_keys
    a = {'train': {'seed': 0, 'max_iters': 10}, 'optim': {'lr': 1e-3}}
    b = {'train': {'seed': 1, 'max_iters': 10}, 'optim': {'lr': 1e-3}, 'uda': {'mode': 'dacs'}}
    assert differing_keys(a, b) == ['train.seed', 'uda']
