"""Runs that survive a cluster: stop signals (SIGTERM, SIGUSR1, SIGINT) turned into a clean stop, the
agreement of torchrun ranks on the iteration to stop at, the run-folder lock, log.jsonl on resume,
the best evaluation in metrics.json and the summary's choice of evaluation."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import mic_eval
import mic_report
import mic_runtime
import mic_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# StopSignals
# --------------------------------------------------------------------------

def test_exit_status_is_128_plus_the_signal():
    assert [mic_runtime.stop_exit_status(n) for n in ('SIGINT', 'SIGUSR1', 'SIGTERM')] == [130, 138, 143]


def test_signals_are_recorded_first_wins_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with mic_runtime.StopSignals() as stop:
        assert stop.requested() is None and stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal, even Ctrl-C, raises nothing
        assert stop.requested() == 'SIGUSR1' and stop.agreed() == 'SIGUSR1'
    assert {s: signal.getsignal(s) for s in before} == before


def test_third_sigint_aborts():
    with pytest.raises(KeyboardInterrupt):
        with mic_runtime.StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested() == 'SIGINT'
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


CHILD = textwrap.dedent('''
    import sys, time
    import mic_runtime
    with mic_runtime.StopSignals() as stop:
        print('ready', flush=True)
        while stop.requested() is None:
            time.sleep(0.01)
        time.sleep(0.5)  # "writing the checkpoint": more signals arrive meanwhile
        print(f'stopped by {stop.requested()}', flush=True)
    sys.exit(mic_runtime.stop_exit_status(stop.requested()))
''')


@pytest.mark.parametrize('sig,status', [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_signalled_process_finishes_its_work_and_exits_with_the_status(sig, status):
    proc = subprocess.Popen([sys.executable, '-c', CHILD], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == 'ready'
    os.killpg(proc.pid, sig)  # to the process group, as a terminal's Ctrl-C does
    os.killpg(proc.pid, sig)  # twice: the second one while "saving"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status and err == '' and out.strip() == f'stopped by {sig.name}'


def _agree_worker(rank, store, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        answers, dues = [], []
        with mic_runtime.StopSignals() as stop:
            for call in range(8):
                if rank == 1 and call == 3:
                    os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled
                answers.append(stop.agreed(torch.device('cpu'), checkpoint_due=rank == 0 and call == 1))
                dues.append(stop.checkpoint_due)
        torch.save({'answers': answers, 'dues': dues, 'requested': stop.requested()}, f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_call_to_stop_at(tmp_path):
    out = str(tmp_path / 'answers')
    torch.multiprocessing.spawn(_agree_worker, args=(str(tmp_path / 'store'), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f'{out}.{r}', weights_only=False) for r in (0, 1))
    # posted at call 3, answered by the next call on both ranks; rank 0 learns why
    assert r0['answers'] == r1['answers'] == [None] * 4 + ['SIGTERM'] * 4
    assert r0['requested'] == r1['requested'] == 'SIGTERM'
    # rank 0's clock says a time-based checkpoint is due at call 1: both ranks save at call 2
    assert r0['dues'] == r1['dues'] == [False, False, True] + [False] * 5


# --------------------------------------------------------------------------
# RunLock
# --------------------------------------------------------------------------

def _dead_pid():
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    work = str(tmp_path / 'run')
    with mic_runtime.RunLock(work) as lock:
        owner = json.load(open(os.path.join(work, '.lock')))
        assert owner['pid'] == os.getpid() and owner['host'] and owner['since'] and lock.took_over is None
        with pytest.raises(mic_runtime.RunLockError) as e:
            mic_runtime.RunLock(work).acquire()
        msg = str(e.value)
        assert f'process {os.getpid()} on this host' in msg and owner['since'] in msg and 'train.work_dir' in msg
    assert not os.path.exists(os.path.join(work, '.lock'))


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    work = tmp_path / 'run'
    work.mkdir()
    import socket
    pid = _dead_pid()
    (work / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': pid, 'since': '2001-01-01T00:00:00'}))
    with mic_runtime.RunLock(str(work)) as lock:
        assert f'left by process {pid}' in lock.took_over and 'no longer runs' in lock.took_over
        assert json.loads((work / '.lock').read_text())['pid'] == os.getpid()


def test_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    work = tmp_path / 'run'
    work.mkdir()
    (work / '.lock').write_text(json.dumps({'host': 'node-17', 'pid': 4242, 'since': '2001-01-01T00:00:00'}))
    with pytest.raises(mic_runtime.RunLockError) as e:
        mic_runtime.RunLock(str(work)).acquire()
    assert 'process 4242 on host node-17' in str(e.value) and f'rm {work / ".lock"}' in str(e.value)
    (work / '.lock').write_text('')  # a lock its writer never finished
    with pytest.raises(mic_runtime.RunLockError, match='unreadable or incomplete'):
        mic_runtime.RunLock(str(work)).acquire()


def test_temp_files_are_removed_only_under_the_lock(tmp_path):
    work = tmp_path / 'run'
    work.mkdir()
    (work / '.latest.pth.0123abcd.tmp').write_bytes(b'half a checkpoint')
    lock = mic_runtime.RunLock(str(work))
    with pytest.raises(RuntimeError, match='without holding its lock'):
        lock.remove_temp_files()
    assert (work / '.latest.pth.0123abcd.tmp').exists()
    with lock:
        assert lock.remove_temp_files() == ['.latest.pth.0123abcd.tmp']
    assert os.listdir(work) == []


# --------------------------------------------------------------------------
# log.jsonl on resume
# --------------------------------------------------------------------------

def _write_log(path, records, tail=''):
    with open(path, 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in records) + tail)


def _iterations(path):
    return [(r['iteration'], 'eval' in r) for r in map(json.loads, open(path))]


def test_log_truncated_to_the_checkpoint(tmp_path):
    log = str(tmp_path / 'log.jsonl')
    records = [{'iteration': i, 'lr': 0.1} for i in (2, 4)] + [{'iteration': 4, 'eval': {'mIoU': 1.0}}] + \
              [{'iteration': i, 'lr': 0.1} for i in (6, 8)] + [{'iteration': 8, 'eval': {'mIoU': 2.0}}]
    _write_log(log, records, tail='{"iteration": 10, "lr"')  # the partial line of a killed write
    assert mic_report.truncate_log(log, 4) == 4
    assert _iterations(log) == [(2, False), (4, False), (4, True)]
    assert mic_report.truncate_log(log, 4) == 0  # nothing to do: the file stays as it is
    assert mic_report.truncate_log(str(tmp_path / 'none.jsonl'), 4) == 0


def test_log_of_earlier_resumes_holds_each_iteration_once(tmp_path):
    log = str(tmp_path / 'log.jsonl')
    _write_log(log, [{'iteration': i} for i in (2, 4, 6, 2, 4, 6, 8)])  # stopped at 7, resumed from 0
    assert mic_report.truncate_log(log, 6) == 4
    assert _iterations(log) == [(2, False), (4, False), (6, False)]
    train, _ = mic_report.read_log(log)
    assert [r['iteration'] for r in train] == [2, 4, 6]


# --------------------------------------------------------------------------
# The best evaluation, metrics.json and the summary
# --------------------------------------------------------------------------

def test_is_best_by_miou_higher_is_better_ties_keep_the_first():
    assert mic_report.is_best({'mIoU': 10.0}, None)
    assert mic_report.is_best({'mIoU': 11.0}, {'mIoU': 10.0})
    assert not mic_report.is_best({'mIoU': 10.0}, {'mIoU': 10.0})
    assert not mic_report.is_best({'mIoU': 9.0}, {'mIoU': 10.0})
    assert not mic_report.is_best({'mIoU': None}, None)  # no labels: never best


def _finished_run(folder, last, best, seed=0, lr=6e-5):
    os.makedirs(folder, exist_ok=True)
    m = mic_report.metrics_record({'mIoU': last, 'IoU': {'road': last}, 'iteration': 40, 'checkpoint': 'latest.pth'},
                                  {'mIoU': best, 'IoU': {'road': best}, 'iteration': 20, 'checkpoint': 'best.pth'})
    mic_runtime.save_json(os.path.join(folder, 'metrics.json'), m)
    with open(os.path.join(folder, 'config.yaml'), 'w') as f:
        f.write(f'optim:\n  lr: {lr}\ntrain:\n  seed: {seed}\n  work_dir: {folder}\n')
    return m


def test_metrics_json_holds_last_and_best_and_summary_picks_one(tmp_path, capsys):
    m = _finished_run(str(tmp_path / 's0'), 50.0, 54.0, seed=0)
    assert m['mIoU'] == 50.0 and m['iteration'] == 40 and m['best']['mIoU'] == 54.0 and m['best']['iteration'] == 20
    _finished_run(str(tmp_path / 's1'), 52.0, 56.0, seed=1)  # seeds and folders may differ
    last = mic_eval.main(['--summary', str(tmp_path / 's*')])
    assert last['which'] == 'last' and last['mean']['mIoU'] == pytest.approx(51.0)
    assert 'the last evaluation of each run (as the paper reports)' in capsys.readouterr().out
    best = mic_eval.main(['--summary', str(tmp_path / 's*'), '--summary-of', 'best'])
    assert best['mean']['mIoU'] == pytest.approx(55.0) and [r['iteration'] for r in best['runs']] == [20, 20]
    assert 'optimistic' in capsys.readouterr().out
    # a metrics.json of before best checkpoints: not in the statistics of the best evaluations
    mic_runtime.save_json(str(tmp_path / 's1' / 'metrics.json'), {'mIoU': 52.0, 'IoU': {'road': 52.0}})
    best = mic_summary.summarize([str(tmp_path / 's*')], 'best')
    assert best['n'] == 1 and 'no best evaluation' in best['unfinished'][0]['reason']


def test_summary_refuses_runs_of_different_configs(tmp_path, capsys):
    _finished_run(str(tmp_path / 'a'), 50.0, 50.0, lr=6e-5)
    _finished_run(str(tmp_path / 'b'), 52.0, 52.0, lr=1e-4)
    with pytest.raises(SystemExit) as e:
        mic_eval.main(['--summary', str(tmp_path / 'a'), str(tmp_path / 'b')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'different configs (optim.lr: 6e-05, 0.0001' in err


# --------------------------------------------------------------------------
# DDP: every gradient in its parameter's layout (no "Grad strides do not match bucket view strides")
# --------------------------------------------------------------------------

def test_gradients_have_their_parameters_strides():
    sys.path.insert(0, os.path.join(REPO, 'tests'))
    import mic_train
    from test_train_helpers import synthetic_batch, tiny_cfg
    torch.manual_seed(0)
    trainer = mic_train.Trainer(tiny_cfg(), torch.device('cpu'))
    trainer.step(synthetic_batch(seed=0), 0)
    params = [(n, p) for n, p in trainer.student.named_parameters() if p.grad is not None]
    assert params and [n for n, p in params if p.grad.stride() != p.stride()] == []


# --------------------------------------------------------------------------
# mic_train end to end: stops at random iterations, torchrun, checks before iteration 1
# --------------------------------------------------------------------------

sys.path.insert(0, os.path.join(REPO, 'tests'))
from test_train_run import tiny_opts  # noqa: E402  (the tiny demo of the end-to-end tests)

SOAK_ITERS = 16
STATUS = {'SIGTERM': 143, 'SIGUSR1': 138, 'SIGINT': 130}


@pytest.fixture(scope='module')
def soak_demo(tmp_path_factory):
    return str(tmp_path_factory.mktemp('soak_demo'))


def soak_opts(demo, work, *extra):
    """The tiniest run: DAFormer (no HRDA) on 32x32 crops of 64x32 scenes, a 16-wide decoder, no
    evaluation before the end, a log record every iteration, checkpoints only at the end."""
    return tiny_opts(demo, work, 'model.type=encoder_decoder', 'data.crop_size=[32,32]',
                     'model.decode_head.embed_dims=16', 'data.demo.width=64', 'data.demo.height=32',
                     'data.source.img_scale=[64,32]', 'data.target.img_scale=[64,32]', 'data.val.img_scale=[64,32]',
                     'model.test.crop_size=[32,32]', 'model.test.stride=[32,32]', 'uda.mask_block_size=8',
                     'optim.warmup_iters=0', f'train.max_iters={SOAK_ITERS}', 'train.log_interval=1',
                     'train.eval_interval=0', 'train.ckpt_interval=0', 'train.debug_img_interval=0',
                     'data.rcs.min_pixels=1', *extra)


def train_main(demo, work, *extra, resume=True):
    argv = ['--cfg', os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt', *soak_opts(demo, str(work), *extra)]
    import mic_train
    return mic_train.main(argv + (['--resume'] if resume else []))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    yield
    torch.set_num_threads(before)


@pytest.mark.soak
def test_soak_stops_at_random_iterations(soak_demo, tmp_path, monkeypatch, capsys, one_thread):
    """SIGTERM, SIGUSR1 and SIGINT in turn at 10 random iterations, each followed by --resume (which
    starts the run the first time): the final weights are those of an uninterrupted run, latest.pth
    holds the iteration reached at every stop, and log.jsonl holds each iteration once."""
    import random

    import mic_train
    train_main(soak_demo, tmp_path / 'full', resume=False)
    full = torch.load(tmp_path / 'full' / 'latest.pth', weights_only=True)
    stops = sorted(random.Random(0).sample(range(SOAK_ITERS - 1), 10))  # 0-based iterations, distinct
    names = [('SIGTERM', 'SIGUSR1', 'SIGINT')[i % 3] for i in range(len(stops))]
    original = mic_train.Trainer.step
    plan = dict(zip(stops, names))

    def step_then_signal(self, batch, iteration, keep_debug=False):
        logs = original(self, batch, iteration, keep_debug)
        if iteration in plan:  # a real signal to this process, during the iteration
            os.kill(os.getpid(), getattr(signal, plan.pop(iteration)))
        return logs
    monkeypatch.setattr(mic_train.Trainer, 'step', step_then_signal)
    work = tmp_path / 'cut'
    capsys.readouterr()
    for it, name in zip(stops, names):
        with pytest.raises(SystemExit) as e:
            train_main(soak_demo, work)
        out, err = capsys.readouterr()
        assert e.value.code == STATUS[name] and 'Traceback' not in err, err
        assert f'stopped by {name} at iteration {it + 1}; latest.pth holds iteration {it + 1}; continue with ' \
               f'--resume' in out
        assert torch.load(work / 'latest.pth', weights_only=True)['iteration'] == it + 1
        assert not os.path.exists(work / '.lock')
    train_main(soak_demo, work)
    cut = torch.load(work / 'latest.pth', weights_only=True)
    for part in ('modules', 'optimizers'):
        for name, state in full[part].items():
            flat_a, flat_b = _flatten(state), _flatten(cut[part][name])
            assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), (part, name)
    records = [json.loads(line) for line in open(work / 'log.jsonl')]
    assert [r['iteration'] for r in records if 'eval' not in r] == list(range(1, SOAK_ITERS + 1))
    assert [r['iteration'] for r in records if 'eval' in r] == [SOAK_ITERS]
    metrics = json.load(open(work / 'metrics.json'))
    assert metrics['iteration'] == metrics['best']['iteration'] == SOAK_ITERS and (work / 'best.pth').exists()
    assert train_main(soak_demo, work) == metrics  # a restart of the finished run reports it
    assert 'already holds this config\'s finished run' in capsys.readouterr().out


def _flatten(state, prefix=''):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        elif torch.is_tensor(v):
            out[f'{prefix}{k}'] = v
    return out


def _processes_mentioning(text):
    """PIDs of live processes whose command line holds `text` (DataLoader workers share their parent's)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _wait_for_log(work, iteration, proc, timeout=300):
    """Block until log.jsonl of `work` records `iteration` (the loop is running)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(json.loads(line).get('iteration', 0) >= iteration for line in open(work / 'log.jsonl')):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f'no log record of iteration {iteration}: {proc.poll()}')


def _soak_command(demo, work, *extra, launcher=()):
    return [sys.executable, *launcher, os.path.join(REPO, 'mic_train.py'), '--cfg',
            os.path.join(REPO, 'configs/gta2cs.yaml'), '--opt', *soak_opts(demo, str(work), *extra), '--resume']


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_sigint_to_the_process_group_with_loader_workers(soak_demo, tmp_path, one_thread):
    """Ctrl-C in a terminal reaches the whole process group: the training and its DataLoader workers.
    One clean line, status 130, no worker traceback, and no worker left once the training has exited."""
    train_main(soak_demo, tmp_path / 'prepare', 'train.max_iters=1', resume=False)  # the demo data exist now
    work = tmp_path / 'workers'
    cmd = _soak_command(soak_demo, work, 'train.max_iters=100000', 'data.num_workers=2')
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    _wait_for_log(work, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)  # twice, as an impatient user does
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and 'Traceback' not in err, err[-3000:]
    n = torch.load(work / 'latest.pth', weights_only=True)['iteration']
    assert f'stopped by SIGINT at iteration {n}; latest.pth holds iteration {n}' in out
    assert _processes_mentioning(str(work)) == []  # the workers ended before the training did


def test_torchrun_sigterm_saves_one_consistent_checkpoint(soak_demo, tmp_path, one_thread):
    """SIGTERM to torchrun (2 gloo ranks on the CPU): it forwards it to both ranks, which agree on one
    iteration, save latest.pth there and exit 143. No DDP warning on the way."""
    train_main(soak_demo, tmp_path / 'prepare', 'train.max_iters=1', resume=False)
    work = tmp_path / 'ddp'
    cmd = _soak_command(soak_demo, work, 'train.max_iters=100000',
                        launcher=('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    _wait_for_log(work, 3, proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun only
    out, err = proc.communicate(timeout=300)
    ckpt = torch.load(work / 'latest.pth', weights_only=True)
    n = ckpt['iteration']
    assert f'stopped by SIGTERM at iteration {n}; latest.pth holds iteration {n}' in out, (out[-2000:], err[-3000:])
    assert ckpt['meta']['world_size'] == 2 and len(ckpt['rng']) == 2
    records = [json.loads(line) for line in open(work / 'log.jsonl')]
    assert records[-1]['iteration'] == n  # logged every iteration: the last record is the checkpoint's
    assert 'Grad strides do not match' not in err and 'FutureWarning' not in err, err[-3000:]
    assert not os.path.exists(work / '.lock') and _processes_mentioning(str(work)) == []


def test_wrong_validation_split_fails_before_iteration_1(soak_demo, tmp_path, capsys, one_thread):
    work = tmp_path / 'never'
    with pytest.raises(SystemExit) as e:
        train_main(soak_demo, work, f'data.val.root={tmp_path}/cityscapes_typo', resume=False)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and f'{tmp_path}/cityscapes_typo' in err and 'iteration 1' not in out
    assert not work.exists()


def test_a_second_training_in_a_live_run_folder_is_refused(soak_demo, tmp_path, capsys, one_thread):
    work = tmp_path / 'live'
    work.mkdir()
    import socket
    (work / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getppid(),
                                            'since': '2001-01-01T00:00:00'}))
    (work / '.latest.pth.0123abcd.tmp').write_bytes(b'being written by the live run')
    with pytest.raises(SystemExit) as e:
        train_main(soak_demo, work)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f'process {os.getppid()} on this host' in err
    assert sorted(os.listdir(work)) == ['.latest.pth.0123abcd.tmp', '.lock']  # nothing touched


def test_non_finite_advice_says_what_is_true(soak_demo, tmp_path, monkeypatch, capsys, one_thread):
    import mic_train
    original = mic_train.Trainer.step

    def diverging(self, batch, iteration, keep_debug=False):
        logs = original(self, batch, iteration, keep_debug)
        if iteration >= 5:  # finite but exploding from iteration 6 on, NaN at iteration 10
            logs['mix.loss_seg'] = torch.tensor(float('nan') if iteration == 9 else 1e10)
        return logs
    monkeypatch.setattr(mic_train.Trainer, 'step', diverging)
    with pytest.raises(SystemExit):  # no checkpoint yet
        train_main(soak_demo, tmp_path / 'a', 'train.ckpt_interval=20', resume=False)
    err = capsys.readouterr().err
    assert 'non-finite loss at iteration 9: mix.loss_seg' in err and 'No checkpoint was written yet' in err
    assert '--resume' not in err
    with pytest.raises(SystemExit):  # a checkpoint at 8, taken while the losses were exploding
        train_main(soak_demo, tmp_path / 'b', 'train.ckpt_interval=4', resume=False)
    err = capsys.readouterr().err
    assert 'holds iteration 8' in err and 'already exploding' in err and 'new train.work_dir' in err
    monkeypatch.setattr(mic_train.Trainer, 'step', lambda self, b, i, keep_debug=False: (
        {**original(self, b, i, keep_debug), 'mix.loss_seg': torch.tensor(float('nan'))} if i == 6
        else original(self, b, i, keep_debug)))
    with pytest.raises(SystemExit):  # a checkpoint at 4, before anything went wrong: resume it
        train_main(soak_demo, tmp_path / 'd', 'train.ckpt_interval=4', resume=False)
    err = capsys.readouterr().err
    assert 'holds iteration 4' in err and 'continue with --resume' in err and 'exploding' not in err
