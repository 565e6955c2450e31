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
    best = mic_report.summarize([str(tmp_path / 's*')], 'best')
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
