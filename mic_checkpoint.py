"""Checkpoints and resume: latest.pth and best.pth, written atomically and read back for an exact
resume, and the run folder (train.work_dir) that holds them.

    rng_state, set_rng_state, gather_rng_states   the RNG state of every rank (saved, restored)
    save_latest, link_or_copy, time_to_checkpoint  latest.pth (atomic), best.pth, train.ckpt_minutes
    architecture, read_for_resume, check_work_dir  a checkpoint or folder of this model / config only
    resume_path, resolve_resume, interrupted_run   --resume [auto | PATH], a finished run reported
    best_from_log, nonfinite_advice                what a resumed run knows of its folder's past
    open_run_folder, append_command                the lock, config.yaml, command.txt, log.jsonl cut
                                                   back to the resumed iteration

Everything here is about what survives the process: mic_train's Trainer gives its state_dict, Run
decides when to save. Imports: torch, numpy, mic_model (read_checkpoint), mic_config (stored, the
YAML dump), mic_report (log.jsonl) and mic_runtime (atomic writes, the lock); never mic_train or
mic_uda, which sit above it (mic_train imports this).
"""
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import time

import numpy as np
import torch
import torch.distributed as dist

import mic_model
import mic_report
import mic_runtime
from mic_config import ConfigError, dump_yaml, stored
from mic_runtime import atomic_write_text, is_main, print0

EXPLODING = 10  # a logged total loss this many times the run's median means the run was diverging


# --------------------------------------------------------------------------
# RNG state: every rank's, so that a resumed run draws the numbers it would have drawn
# --------------------------------------------------------------------------

def rng_state():
    np_state = np.random.get_state()
    return {'python': random.getstate(),
            'numpy': (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _map_tensors(obj, fn):
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def gather_rng_states():
    """Every rank's RNG state (rank order), for an exact resume of all ranks."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    # numpy arrays travel through all_gather_object reliably; tensors are converted back after
    dist.all_gather_object(states, _map_tensors(state, lambda t: t.numpy() if torch.is_tensor(t) else t))
    return [_map_tensors(s, torch.from_numpy) for s in states]


# --------------------------------------------------------------------------
# Writing: latest.pth and best.pth
# --------------------------------------------------------------------------

def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_latest(work_dir, state, iteration, rng, cfg, command, best_mIoU, world):
    """work_dir/latest.pth, atomically: the trainer's state_dict, the iteration, every rank's RNG state
    (gather_rng_states), the sampler's position, the stored config and where the run came from."""
    checkpoint = {**state, 'iteration': iteration, 'rng': rng,
                  'sampler': {'next_index': iteration * cfg.data.batch_size}, 'config': stored(cfg),
                  'meta': {'command': command, 'git_commit': git_commit(), 'best_mIoU': best_mIoU,
                           'time': datetime.datetime.now().isoformat(timespec='seconds'),
                           'torch': str(torch.__version__), 'world_size': world}}
    mic_runtime.atomic_write(os.path.join(work_dir, 'latest.pth'), lambda f: torch.save(checkpoint, f))


def link_or_copy(src, dst):
    """dst becomes a copy of src, atomically: a hard link when the file system allows (no extra disk;
    src is later replaced by a new file, dst keeps this one), else a copy."""
    tmp = os.path.join(os.path.dirname(dst), f'.{os.path.basename(dst)}.link.tmp')
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        with open(src, 'rb') as f:
            mic_runtime.atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))


def time_to_checkpoint(cfg, last_save):
    """train.ckpt_minutes passed since the last checkpoint (on this rank's clock)."""
    minutes = cfg.train.ckpt_minutes
    return bool(minutes) and time.monotonic() - last_save >= 60 * minutes


# --------------------------------------------------------------------------
# Reading and resume
# --------------------------------------------------------------------------

def architecture(cfg_model):
    """The config fields that decide the parameters' names and shapes."""
    m = cfg_model
    return {'type': m['type'], 'backbone': m['backbone']['type'], 'decode_head': dict(m['decode_head']),
            'num_classes': m['num_classes'],
            'hrda_attention': (m['hrda']['attention_classwise'], m['hrda']['fixed_attention'])
            if m['type'] == 'hrda' else None}


def read_for_resume(path, cfg):
    """The checkpoint at path, refused when it was trained with another architecture than cfg's."""
    ckpt = mic_model.read_checkpoint(path)
    old, new = architecture(ckpt['config']['model']), architecture(cfg.model)
    if old != new:
        raise ConfigError(f'refusing to resume {path}: it was trained with model {old}, the config asks for {new}')
    return ckpt


def check_work_dir(cfg, resume):
    """Refuse to start a new run in a folder that holds another run.

    Returns True when the folder holds this very config's finished run (nothing left to train).
    """
    ckpt = os.path.join(cfg.train.work_dir, 'latest.pth')
    if resume or not os.path.exists(ckpt):
        return False
    try:
        old = mic_model.read_checkpoint(ckpt, mmap=True)
    except mic_model.CheckpointError as e:
        raise ConfigError(f'{e}\n{ckpt} is in the run folder: delete it or choose another train.work_dir') from None
    if old.get('config') == stored(cfg) and old.get('iteration', 0) >= cfg.train.max_iters:
        return True
    new_folder = 'set train.work_dir to a new folder (--opt train.work_dir=work_dirs/NEW)'
    old_model = old.get('config', {}).get('model')
    if old_model is not None and architecture(old_model) != architecture(cfg.model):
        raise ConfigError(f'{cfg.train.work_dir} already holds a run of another model ({ckpt}, iteration '
                          f'{old.get("iteration")}, model {architecture(old_model)}): {new_folder}')
    if old.get('config') == stored(cfg):
        what = 'the same config, stopped at iteration'
    else:
        differ = differing_keys(old.get('config') or {}, stored(cfg))
        shown = ', '.join(differ[:5]) + (f' and {len(differ) - 5} more' if len(differ) > 5 else '')
        what = f'a run of another config (differing keys: {shown}), at iteration'
    raise ConfigError(f'{cfg.train.work_dir} already holds {what} {old.get("iteration")} ({ckpt}). '
                      f'Pass --resume to continue it, or {new_folder}.')


def differing_keys(a, b, prefix=''):
    """The dotted keys whose values differ between two config trees (present in one only included)."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, f'{prefix}{key}.')
        elif va != vb or (key in a) != (key in b):
            out.append(prefix + str(key))
    return out


def resume_path(work_dir, resume):
    """The checkpoint to continue from, or None for a new run.

    --resume / --resume auto: work_dir/latest.pth, and a new run when it does not exist yet, so that
    one command serves the first start and every restart (docs/cluster.md). --resume PATH: PATH,
    which must exist."""
    if not resume:
        return None
    if resume == 'auto':
        path = os.path.join(work_dir, 'latest.pth')
        if os.path.isfile(path):
            return path
        print0(f'--resume auto: {path} does not exist yet; starting a new run')
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume: checkpoint {resume} does not exist')
    return resume


def trained_to_the_end(cfg, ckpt_path):
    """Whether ckpt_path holds this very config's run at train.max_iters (a restart of a finished run:
    --resume auto reports it instead of evaluating it again)."""
    if ckpt_path is None:
        return False
    old = mic_model.read_checkpoint(ckpt_path, mmap=True)
    return old.get('config') == stored(cfg) and old.get('iteration', 0) >= cfg.train.max_iters


def resolve_resume(cfg, resume):
    """(checkpoint to continue from or None, metrics of this config's finished run or None).

    A folder that holds this very config's finished run is not trained again: its metrics.json is
    reported, or, when the final evaluation did not write one, the run is resumed to evaluate it."""
    work_dir = cfg.train.work_dir
    latest = os.path.join(work_dir, 'latest.pth')
    ckpt_path = resume_path(work_dir, resume)  # --resume auto: None when there is nothing to resume yet
    if not check_work_dir(cfg, ckpt_path is not None) and not (resume == 'auto' and
                                                               trained_to_the_end(cfg, ckpt_path)):
        return ckpt_path, None
    path = os.path.join(work_dir, 'metrics.json')
    if not os.path.exists(path):  # trained to the end, but stopped before the final evaluation
        print0(f'{work_dir} holds this config\'s fully trained run without metrics.json; evaluating it')
        return latest, None
    print0(f'{work_dir} already holds this config\'s finished run; its results: {path}. '
           'Delete the folder or set train.work_dir to train again.')
    with open(path) as f:
        metrics = json.load(f)
    if metrics.get('mIoU') is not None:  # (a data.val without labels gives predictions only)
        print0(f'target mIoU: {metrics["mIoU"]:.2f}')
    return None, metrics


def interrupted_run(cfg):
    """'auto' when train.work_dir holds this very config's unfinished run (continue it), else None:
    a finished run is then reported, another config's run refused, an empty folder started."""
    ckpt = os.path.join(cfg.train.work_dir, 'latest.pth')
    if not os.path.isfile(ckpt):
        return None
    old = mic_model.read_checkpoint(ckpt, mmap=True)
    same = old.get('config') == stored(cfg) and old.get('iteration', 0) < cfg.train.max_iters
    return 'auto' if same else None


def best_from_log(work_dir):
    """The best evaluation logged in work_dir/log.jsonl (after its truncation to the resumed
    iteration), as metrics.json holds it, or None."""
    path = os.path.join(work_dir, mic_report.LOG_NAME)
    best = None
    for r in (mic_report.read_log(path)[1] if os.path.isfile(path) else []):
        entry = {**r['eval'], 'IoU': r.get('IoU'), 'iteration': r['iteration'],
                 'checkpoint': os.path.join(work_dir, mic_report.BEST_NAME)}
        if mic_report.is_best(entry, best):
            best = entry
    return best


def nonfinite_advice(work_dir):
    """What to do after a divergence, saying what is true of the run folder: whether a checkpoint
    exists, and whether the losses logged before it were already exploding (then resuming it would
    diverge again)."""
    fix = 'lower optim.lr, use train.amp=none or bf16 instead of fp16, or check the data'
    ckpt = os.path.join(work_dir, 'latest.pth')
    if not os.path.isfile(ckpt):
        return f'No checkpoint was written yet: {fix}, then start again.'
    kept = mic_model.read_checkpoint(ckpt, mmap=True).get('iteration')
    where = f'{ckpt} holds iteration {kept} (the non-finite state was not saved)'
    log = os.path.join(work_dir, mic_report.LOG_NAME)
    totals = [(r['iteration'], mic_report.total_loss(r)) for r in
              (mic_report.read_log(log)[0] if os.path.isfile(log) else []) if r['iteration'] <= (kept or 0)]
    if len(totals) >= 3:
        typical = statistics.median(t for _, t in totals)
        it, last = totals[-1]
        if last > EXPLODING * typical:
            return (f'{where}, but the losses were already exploding then (total {last:.3g} at iteration {it}, '
                    f'median {typical:.3g}): resuming it would diverge again. {fix}, then start again in a new '
                    f'train.work_dir.')
    return f'{where}: {fix}, then continue with --resume.'


# --------------------------------------------------------------------------
# The run folder at the start of a run (after the first batch)
# --------------------------------------------------------------------------

def open_run_folder(cfg, command, world, start, device):
    """Rank 0 takes the run folder's lock and writes config.yaml and command.txt; log.jsonl loses the
    records after `start`. Every rank fails when rank 0 did (one flag, all_reduce MIN). The lock (rank 0)."""
    lock, error = None, None
    if is_main():
        try:
            lock = _prepare_run_folder(cfg, command, world, start)
        except Exception as e:  # raised below, after the other ranks have heard of it
            error = e
    if dist.is_initialized():
        ok = torch.tensor([int(error is None)], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok) and error is None:
            raise mic_runtime.RunLockError('rank 0 could not prepare the run folder (its message says why)')
    if error is not None:
        raise error
    return lock


def _prepare_run_folder(cfg, command, world, start):
    work_dir = cfg.train.work_dir
    lock = mic_runtime.RunLock(work_dir).acquire()
    try:
        if lock.took_over:
            print0(lock.took_over)
        removed = lock.remove_temp_files()  # a write that was killed midway (no other run writes here)
        if removed:
            print0(f'removed {len(removed)} temporary file(s) of an interrupted write from {work_dir}')
        mic_runtime.check_writable(work_dir)
        dropped = mic_report.truncate_log(os.path.join(work_dir, mic_report.LOG_NAME), start)
        if dropped:
            print0(f'log.jsonl: dropped {dropped} record(s) after iteration {start} (they are logged again)')
        atomic_write_text(os.path.join(work_dir, 'config.yaml'), dump_yaml(cfg))
        append_command(os.path.join(work_dir, 'command.txt'), command, world)
    except BaseException:
        lock.release()
        raise
    return lock


def append_command(path, command, world):
    """command.txt: one line per invocation of this run folder (time, launcher, command)."""
    launcher = f'torchrun x{world} (rank 0 of {world})' if world > 1 else 'python'
    line = f'{datetime.datetime.now().isoformat(timespec="seconds")}  [{launcher}]  {command}\n'
    old = ''
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
    atomic_write_text(path, old + line)
