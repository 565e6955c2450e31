"""Train MIC (masked image consistency) on HRDA / DAFormer with DACS self-training.

    python mic_train.py --cfg configs/demo.yaml          # the demo: generates its data, trains, prints the target mIoU
    python mic_train.py --cfg configs/gta2cs.yaml        # MIC(HRDA) GTA->Cityscapes on one GPU
    torchrun --standalone --nproc_per_node=4 mic_train.py --cfg configs/gta2cs.yaml   # 4 GPUs (batch 2 per GPU)
    python mic_train.py --cfg configs/gta2cs.yaml --resume            # continue from train.work_dir/latest.pth
                                                                      # (a new run when there is none yet)
    python mic_train.py --cfg configs/gta2cs.yaml --opt train.amp=bf16 model.activation_checkpointing=true
    python mic_train.py --cfg configs/gta2cs.yaml --benchmark 20      # s/iteration and peak memory, no data needed

The run folder (train.work_dir) receives config.yaml (the resolved config), command.txt,
log.jsonl (losses, lr, pseudo-label confidence, time, memory; evaluations), debug/ (image
grids), latest.pth (student, teachers, optimizer, RNG, iteration, config; every
train.ckpt_interval iterations or train.ckpt_minutes, and before every evaluation), best.pth
(the checkpoint of the best evaluation) and, at the end, metrics.json (the last evaluation, and
the best under 'best') and preds/ from the evaluation on data.val. Nothing is written before the
config, the data (data.val included) and the first batch are checked. A running training holds
the lock RUN/.lock: a second one in the same folder is refused.

On SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) the training finishes the current iteration, writes
latest.pth at that iteration, prints 'stopped by SIGTERM at iteration N; latest.pth holds
iteration N; continue with --resume' and exits with 128 + the signal's number (143, 138, 130);
under torchrun all ranks stop at the same iteration. A third Ctrl-C aborts without a checkpoint.
Cluster recipes (Slurm requeue, torchrun restarts): docs/cluster.md.

One iteration: EMA teacher update -> source loss (+ ImageNet feature
distance) -> teacher pseudo-labels on the target -> ClassMix + strong augmentation ->
mixed loss -> masked-target loss (MIC) -> one AdamW step over all gradients.

This file holds the Trainer (the modules and optimizers a method's entry in mic_uda.METHODS
declares, and one iteration over its passes), the run (Run: the loop, evaluation, logging, when to
save), --benchmark, --exp and the command line; mic_train.load_config is the config loader of
mic_config, re-exported. What an iteration computes is in mic_uda.py; checkpoints, exact resume
and the run folder's files are in mic_checkpoint.py. Imports run one way: this file imports
mic_uda, mic_checkpoint, mic_eval, mic_report, mic_demo, mic_experiments and the modules below them
(mic_model, mic_data, mic_config, mic_runtime); none of them imports it.
"""
import argparse
import contextlib
import copy
import functools
import inspect
import itertools
import json
import os
import random
import resource
import signal
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import mic_data
import mic_demo
import mic_eval
import mic_experiments
import mic_model
import mic_report
import mic_runtime
import mic_uda
from mic_checkpoint import (best_from_log, gather_rng_states, interrupted_run, link_or_copy, nonfinite_advice,
                            open_run_folder, read_for_resume, resolve_resume, rng_state, save_latest, set_rng_state,
                            time_to_checkpoint)
from mic_config import ConfigError, load_config  # noqa: F401  (load_config: public API)
from mic_runtime import exit_error, is_main, print0, setup_distributed

# --------------------------------------------------------------------------
# The student's optimizer and learning rate
# --------------------------------------------------------------------------

def lr_at(iteration, cfg):
    """Encoder learning rate at `iteration` (the decoder's is optim.head_lr_mult times this):
    polynomial decay to optim.min_lr at train.max_iters, with a linear warm-up from
    optim.warmup_ratio over optim.warmup_iters iterations that scales the decayed value."""
    o, max_iters = cfg['optim'], cfg['train']['max_iters']
    lr = (o['lr'] - o['min_lr']) * (1 - iteration / max_iters) ** o['power'] + o['min_lr']
    if iteration < o['warmup_iters']:
        k = (1 - iteration / o['warmup_iters']) * (1 - o['warmup_ratio'])
        lr = lr * (1 - k)
    return lr


# --------------------------------------------------------------------------
# The trainer: the stateful modules, their optimizers and one iteration
# --------------------------------------------------------------------------

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class NonFiniteLossError(RuntimeError):
    pass


def param_groups(model, cfg_optim):
    """The student's parameter groups: [{'names', 'params', 'lr_mult', 'weight_decay'}], each parameter in
    exactly one (frozen ones too: they get no gradient, so no step and no state, as before). What the
    encoder states decides: weight decay 0 for the names holding one of its no_weight_decay_keys (MiT:
    norms; DINOv2: norms, biases, layer scales, tokens, pos_embed), lr x optim.encoder_lr_mult for the
    encoder, and for encoders with layer_id / num_layers (DINOv2) x
    optim.layer_decay ** (num_layers - 1 - layer_id): the last block at the encoder's lr, the patch
    embedding and tokens decayed the most (VFM-UDA's rule). The decoder: lr x optim.head_lr_mult.
    Groups are made in the order of named_parameters and empty ones dropped, so that an encoder without
    layer ids and multipliers of 1 gives the three groups of before: decay, no decay, head."""
    o, enc = cfg_optim, model.backbone
    layered = o.layer_decay != 1.0 and hasattr(enc, 'layer_id')
    no_decay_keys = getattr(enc, 'no_weight_decay_keys', ('norm',))
    groups = {}  # (part, layer, decays) -> group
    for name, p in model.named_parameters():
        if name.startswith('decode_head.'):
            key, lr_mult, wd = ('head', 0, True), o.head_lr_mult, o.weight_decay
        else:
            layer = enc.layer_id(name) if layered else 0
            decays = not any(k in name for k in no_decay_keys)
            key = ('encoder', layer, decays)
            lr_mult = o.encoder_lr_mult * (o.layer_decay ** (enc.num_layers - 1 - layer) if layered else 1.0)
            wd = o.weight_decay if decays else 0.0
        g = groups.setdefault(key, dict(names=[], params=[], lr_mult=lr_mult, weight_decay=wd))
        g['names'].append(name)
        g['params'].append(p)
    order = sorted(groups, key=lambda k: (k[0] == 'head', k[1], not k[2]))  # encoder by layer, decay first
    return [groups[k] for k in order]


def build_optimizer(model, cfg):
    """The segmentor's optimizer (optim.type) over param_groups(model, cfg.optim); each group's lr is the
    schedule's (lr_at) times its lr_mult (Trainer.set_lr)."""
    o = cfg.optim
    groups = [{k: v for k, v in g.items() if k != 'names'} for g in param_groups(model, o)]
    if o.type == 'sgd':
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


# DDP without broadcasting buffers (BN statistics) from rank 0 at every forward: each rank keeps its own, as
# in the original. PyTorch 2.13 renamed broadcast_buffers (a FutureWarning per rank) to forward_sync_buffers,
# which also syncs them once at the start (the same on every rank then: fresh, or loaded from one checkpoint).
DDP_NO_BUFFER_SYNC = {'forward_sync_buffers': False} if 'forward_sync_buffers' in \
    inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters else {'broadcast_buffers': False}


class Trainer:
    """The stateful modules of a method (student, EMA teacher(s), ...) and their optimizers;
    `step` runs one iteration. It builds what the method's entry in mic_uda.METHODS declares.

    modules: name -> nn.Module, everything checkpointing and resume save and restore.
    optimizers: name -> optimizer of the trained modules (a subset of modules); under DDP those
        modules run wrapped (self.wrapped) and synchronise in the last pass that trains them.
    ema: teacher name -> momentum; teachers follow the student before every iteration.
    frozen: name -> frozen module made from a file (the ImageNet encoder), not saved.
    """

    def __init__(self, cfg, device, rank=0, world=1, load_pretrained=True, random_init=False):
        """load_pretrained: initialise the student's encoder from model.pretrained (not on resume).
        random_init: no weights from files at all (--benchmark): the frozen modules too."""
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        method = mic_uda.METHODS[cfg.uda.mode]
        self.passes = mic_uda.method_passes(cfg)
        student = mic_model.build_model(cfg.model, load_pretrained=load_pretrained and not random_init)
        self.modules = {'student': student.to(device)}
        self.num_classes = cfg.model.num_classes
        self.class_names = mic_data.class_table(cfg.data, self.num_classes).names
        self.ema, self.frozen = {}, {}
        for name, teacher in method.teachers.items():
            if not teacher.when(cfg):
                continue
            if teacher.momentum is not None:
                self.modules[name] = self._frozen_copy()
                self.ema[name] = teacher.momentum(cfg)
            else:
                self.frozen[name] = teacher.build(student, cfg, not random_init).to(device)
        if cfg.train.compile:
            student.backbone.compile()
        self.optimizers = {'student': build_optimizer(student, cfg)}
        self.lr_schedules = {'student': lambda it: lr_at(it, cfg)}
        for name, extra in method.modules.items():
            self._add_trained_module(name, extra)
        self.keep_source_logits = any(p.reads_source_logits for _, p in self.passes)
        self.wrapped = {name: self.modules[name] for name in self.optimizers}
        if world > 1:
            ids = [device.index] if device.type == 'cuda' else None
            self.wrapped = {name: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids, **DDP_NO_BUFFER_SYNC)
                            for name, m in self.wrapped.items()}
        # each trained module synchronises its gradients (DDP) in the last pass that trains it
        self.last_pass = {m: max(i for i, (_, p) in enumerate(self.passes) if m in p.trains)
                          for m in self.optimizers if any(m in p.trains for _, p in self.passes)}
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == 'fp16')
        # constants made on the device once: a host->device copy inside the step would wait for the GPU
        self.fd_classes = torch.tensor(cfg.uda.fd_classes, device=device)
        bands = mic_data.Bands.of(cfg.data)  # per-band statistics (ImageNet's RGB ones by default)
        self.mean = torch.tensor(bands.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(bands.std, device=device).view(1, -1, 1, 1)
        self.debug = None  # tensors of the last iteration, kept only when asked for (debug images)

    def _add_trained_module(self, name, extra):
        """A method's extra trained module (mic_uda.Module), its optimizer and learning-rate schedule."""
        cfg = self.cfg
        module = self.modules[name] = extra.build(cfg).to(self.device)
        self.optimizers[name] = extra.optimizer(module, cfg)
        self.lr_schedules[name] = lambda it: extra.lr(it, cfg)
        if extra.in_student_optimizer:
            self.optimizers['student'].add_param_group(dict(params=list(module.parameters()), lr_mult=1.0,
                                                            weight_decay=cfg.optim.weight_decay))

    @property
    def imnet(self):
        """The frozen ImageNet encoder of the feature distance (None when uda.fd_lambda is 0)."""
        return self.frozen.get('imnet')

    @property
    def student(self):
        return self.modules['student']

    def _frozen_copy(self):
        m = copy.deepcopy(self.student)
        for p in m.parameters():
            p.requires_grad_(False)
        m.train(True)
        mic_model.set_dropout(m, False)  # teachers: no dropout / drop path, BN on batch statistics
        return m

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- what passes call ------------------------------------------------------
    def forward(self, name, img, label, **kw):
        """Training forward of a trained module (through DDP when distributed) under autocast."""
        with self.autocast():
            return self.wrapped[name](img, label, **kw)

    def pseudo_labels(self, teacher, img, valid, threshold):
        """(pseudo-label [B,H,W], weight [B,H,W]) of a teacher on target images (no gradients)."""
        u = self.cfg.uda
        with torch.no_grad(), self.autocast():
            logits = self.modules[teacher].encode_decode(img)
        return mic_uda.pseudo_label_and_weight(logits, threshold, valid, u.pseudo_weight_ignore_top,
                                       u.pseudo_weight_ignore_bottom)

    def sum_losses(self, out, prefix, logs, scale=None):
        """The sum of the 'loss_*' entries of a forward's outputs (each times scale.get(key, 1));
        each term is logged as '<prefix>.<key>'."""
        loss = 0
        for k, v in out.items():
            if k.startswith('loss_'):
                if scale and k in scale:
                    v = v * scale[k]
                logs[f'{prefix}.{k}'] = v.detach()
                loss = loss + v
        return loss

    def set_lr(self, iteration):
        for name, opt in self.optimizers.items():
            lr = self.lr_schedules[name](iteration)
            for g in opt.param_groups:
                g['lr'] = lr * g.get('lr_mult', 1.0)
        return self.lr_schedules['student'](iteration)

    def _sync_context(self, index, trains):
        """no_sync() of every wrapped module this pass trains, unless this is its last pass."""
        stack = contextlib.ExitStack()
        if self.world > 1:
            for name in trains:
                if index != self.last_pass[name]:
                    stack.enter_context(self.wrapped[name].no_sync())
        return stack

    # -- the iteration -----------------------------------------------------------
    def step(self, batch, iteration, keep_debug=False):
        """One training iteration. Returns a dict of detached scalar tensors (losses, lr, pseudo ratio)."""
        src, tgt = batch['img'], batch['target_img']
        s = mic_uda.StepState(src=src, gt=batch['gt'].long(), tgt=tgt, valid=batch['valid_pseudo_mask'],
                      iteration=iteration, logs={}, B=src.shape[0], H=src.shape[2], W=src.shape[3],
                      plabel=None, pweight=None, src_logits=None, tgt_logits=None,
                      debug={'source': src, 'source_gt': batch['gt'], 'target': tgt} if keep_debug else None)
        # teachers follow the student (before this iteration's update)
        for name, momentum in self.ema.items():
            mic_uda.ema_update(self.modules[name], self.student, iteration, momentum)
        s.logs['lr'] = torch.tensor(self.set_lr(iteration))
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        for i, (name, p) in enumerate(self.passes):
            with self._sync_context(i, p.trains):
                loss = p.run(self, s)
                if loss is not None:
                    self.scaler.scale(loss).backward()
            del loss
        for opt in self.optimizers.values():  # one step over the gradients of all passes
            self.scaler.step(opt)
        self.scaler.update()
        self.debug = s.debug
        return s.logs

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self):
        return {'modules': {name: m.state_dict() for name, m in self.modules.items()},
                'optimizers': {name: o.state_dict() for name, o in self.optimizers.items()},
                'scaler': self.scaler.state_dict()}

    def load_state_dict(self, ckpt):
        modules, optimizers = ckpt.get('modules'), ckpt.get('optimizers')
        if modules is None:  # the layout of checkpoints written before the modules dict
            modules = {k: ckpt[k] for k in ('student', 'teacher', 'mic_teacher') if ckpt.get(k) is not None}
            optimizers = {'student': ckpt['optimizer']}
        for kind, ours, theirs in (('module', self.modules, modules), ('optimizer', self.optimizers, optimizers)):
            if set(ours) != set(theirs):
                raise ConfigError(f'the checkpoint holds the {kind}s {sorted(theirs)}, this config trains '
                                  f'{sorted(ours)}: resume with the config the run was started with')
        for name, m in self.modules.items():
            m.load_state_dict(modules[name])
        for name, o in self.optimizers.items():
            o.load_state_dict(optimizers[name])
        self.scaler.load_state_dict(ckpt['scaler'])


# --------------------------------------------------------------------------
# Seeding (the RNG state a checkpoint holds: mic_checkpoint)
# --------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------
# Logging and debug images
# --------------------------------------------------------------------------

def memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)


# --------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------

def set_determinism(deterministic):
    """train.deterministic: deterministic algorithms and no cuDNN autotuning, so that two runs of
    one seed on one machine can be compared; otherwise cuDNN picks the fastest kernels (as the original)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(deterministic)


class RunLog:
    """What rank 0 writes while training: log.jsonl, TensorBoard (train.tensorboard), report.png,
    the progress lines and the debug grids. Other ranks get an object that does nothing."""

    def __init__(self, cfg, start, enabled, palette=None):
        self.cfg, self.enabled, self.palette = cfg, enabled, palette
        self.work_dir = cfg.train.work_dir
        self.path = os.path.join(self.work_dir, 'log.jsonl')
        self.progress = mic_report.Progress(cfg.train.max_iters, initial=start, enabled=enabled)
        self.tb = None
        if enabled and cfg.train.tensorboard:
            self.tb = mic_report.TensorBoardWriter(os.path.join(self.work_dir, 'tensorboard'), purge_step=start or None)
        self.report_note = None  # why report.png cannot be drawn (said once)

    def write(self, record):
        if not self.enabled:
            return
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:
            raise mic_runtime.output_error(e, self.path) from None
        if self.tb is not None:
            self.tb.add_record(record)

    def train_record(self, record, optimizers):
        self.write(record)
        self.progress.log(record)
        if self.tb is not None:
            for name, opt in optimizers.items():
                self.tb.add_learning_rates(opt, record['iteration'])

    def debug_grid(self, trainer, iteration):
        if not self.enabled:
            return
        path = os.path.join(self.work_dir, 'debug', f'{iteration:06d}.png')
        mic_runtime.make_dirs(os.path.dirname(path))
        mic_report.save_debug_grid(trainer.debug, path, trainer.mean, trainer.std, palette=self.palette)
        if self.tb is not None:
            self.tb.add_image('debug', path, iteration)

    def report(self):
        """Redraw report.png (matplotlib is optional: without it, say so once and go on)."""
        if not self.enabled or self.report_note:
            return
        try:
            mic_report.write_report(self.work_dir)
        except mic_report.MissingPackageError as e:
            self.report_note = str(e)
            self.progress.write(f'note: no report.png: {e}')

    def eval_record(self, iteration, metrics, best):
        self.write({'iteration': iteration, 'eval': {k: v for k, v in metrics.items() if k != 'IoU'},
                    'IoU': metrics.get('IoU'), 'best_mIoU': best})
        self.message(f'iteration {iteration}: target mIoU {metrics["mIoU"]:.2f} (best {best:.2f})')
        if metrics.get('IoU'):
            self.message(mic_eval.format_table(metrics))  # per class, in the text log too
        self.report()

    def message(self, text):
        if self.enabled:
            self.progress.write(text)

    def close(self):
        self.progress.close()
        if self.tb is not None:
            self.tb.close()


def check_data(cfg):
    """Everything about the data that can be checked before the first iteration (mic_data.check_data:
    folders, labels beside images, label sizes from the PNG headers, that data.val lists and opens), so a
    wrong path fails now, naming it, and not at the first evaluation hours later. Its warnings (crops
    larger than the images, an img_scale that enlarges them) are printed once."""
    for warning in mic_data.check_data(cfg)['warnings']:
        print0(f'warning: {warning}')


def first_batches(loader, ckpt, rank):
    """The batch iterator, restored RNG state, and the first batch drawn: a data error of the first
    batch fails before anything is written to the run folder. DataLoader workers die with the main
    process (die_with_parent), not seconds after it."""
    if loader.num_workers > 0:
        loader.worker_init_fn = functools.partial(_loader_worker_init, loader.worker_init_fn, os.getpid())
    batches = iter(loader)
    if ckpt is not None:  # after the loader is made: it draws its worker seed from the global RNG
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    return batches, next(batches)


def _loader_worker_init(previous, parent_pid, worker_id):
    mic_runtime.die_with_parent(parent_pid)
    if previous is not None:
        previous(worker_id)


def close_batches(batches):
    """Shut the loader's workers down now (persistent workers outlive their iterator otherwise)."""
    shutdown = getattr(batches, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()


def train(cfg, resume=None, command=''):
    """Train cfg in train.work_dir (resume: 'auto' for its latest.pth, or a checkpoint path) and
    evaluate on data.val; returns the final metrics."""
    rank, world, device = setup_distributed(cfg.train.device)
    try:
        set_determinism(cfg.train.deterministic)
        ckpt_path, finished = resolve_resume(cfg, resume)
        if finished is not None:
            return finished
        prepare_work_dir(cfg)
        check_data(cfg)  # a wrong data.val, a label of the wrong size: fails now, not hours later
        # the handlers go in before the loader's workers start, so that the workers inherit them
        with mic_runtime.StopSignals() as stop:
            return Run(cfg, ckpt_path, command, rank, world, device).train(stop)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def prepare_work_dir(cfg):
    """Rank 0 generates the demo data. (What a killed write left behind is removed under the run
    folder's lock: open_run_folder.)"""
    if is_main():
        if cfg.data.demo.enabled:
            mic_demo.ensure_demo_data(cfg.data.demo, log=print0)
    if dist.is_initialized():
        dist.barrier()


class Run:
    """One training run in train.work_dir: the trainer, the data, the log and the best mIoU so far.
    `train` is the loop; `log_train`, `evaluate` and `save` are what it does at its intervals."""

    def __init__(self, cfg, ckpt_path, command, rank, world, device):
        self.cfg, self.command, self.world, self.device = cfg, command, world, device
        self.work_dir, self.max_iters = cfg.train.work_dir, cfg.train.max_iters
        # Everything that can fail on bad input (model, weights, data) comes before the first file is
        # written to the run folder, so that a failed start leaves no half-made run behind.
        seed_everything(cfg.train.seed + rank)
        self.trainer = Trainer(cfg, device, rank, world, load_pretrained=not ckpt_path)
        self.ckpt = self.load_checkpoint(ckpt_path) if ckpt_path else None
        self.start = self.ckpt['iteration'] if self.ckpt else 0
        self.loader = mic_data.build_train_loader(cfg.data, cfg.train.seed, rank=rank, start_iter=self.start) \
            if self.start < self.max_iters else None
        self.classes = mic_data.class_table(cfg.data, cfg.model.num_classes)  # names and colours of data.classes
        self.ckpt_path, self.best, self.log = ckpt_path, None, None  # best: the best evaluation (dict)
        self.saved, self.last_save = None, time.monotonic()  # the iteration and time of the last checkpoint
        self.nonfinite = NonFiniteWatch(device)
        self.meter = IntervalMeter(device)

    def load_checkpoint(self, path):
        ckpt = read_for_resume(path, self.cfg)
        self.trainer.load_state_dict(ckpt)
        return ckpt

    def open(self):
        """After the first batch: the run folder locked and written (rank 0), the log opened."""
        lock = open_run_folder(self.cfg, self.command, self.world, self.start, self.device)
        if self.ckpt_path:
            print0(f'resumed {self.ckpt_path} at iteration {self.start}')
        self.best = best_from_log(self.work_dir) if is_main() else None
        self.log = RunLog(self.cfg, self.start, enabled=is_main(), palette=self.classes.palette)
        return lock

    def train(self, stop):
        """The iterations from the checkpoint's on (if any are left), then the final evaluation.
        At an evaluation iteration the checkpoint comes first; `stop` (StopSignals) ends the run
        with a checkpoint at the iteration reached (TrainingStopped)."""
        t, it, batches, loader_iter, lock = self.cfg.train, self.start, None, None, None
        try:
            if self.loader is not None:  # the first batch before any file: a data error leaves no run folder
                loader_iter, first = first_batches(self.loader, self.ckpt, self.trainer.rank)
                batches = itertools.chain([first], loader_iter)
            self.ckpt = None  # free its tensors
            lock = self.open()
            self.meter.reset()
            for it in range(self.start, self.max_iters if batches is not None else self.start):
                self.iteration(next(batches), it)
                done = it + 1
                if done % t.log_interval == 0 or done == self.max_iters:
                    self.log_train(done)
                evaluating = t.eval_interval and done % t.eval_interval == 0 and done < self.max_iters
                if evaluating or (t.ckpt_interval and done % t.ckpt_interval == 0) or done == self.max_iters:
                    self.save(done)
                if evaluating:
                    self.evaluate(done)
                self.stop_if_asked(stop, done)
            if batches is None:
                print0(f'{self.work_dir} already trained to iteration {self.max_iters}; evaluating')
            it = self.max_iters
            pred_dir = os.path.join(self.work_dir, 'preds') if is_main() else None
            metrics = self.evaluate(self.max_iters, pred_dir=pred_dir)
        except KeyboardInterrupt:  # the third Ctrl-C (StopSignals): no checkpoint
            raise TrainingInterrupted(it, self.work_dir) from None
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f'{e} {nonfinite_advice(self.work_dir)}') from None
        finally:
            close_batches(loader_iter)
            if self.log is not None:
                self.log.close()
            if lock is not None:
                lock.release()
        self.finish(metrics)
        return metrics

    def stop_if_asked(self, stop, done):
        """Once per iteration on every rank: a checkpoint when train.ckpt_minutes passed, and on a stop
        signal (agreed by all ranks) a checkpoint at `done` and TrainingStopped."""
        signal_name = stop.agreed(self.device, checkpoint_due=time_to_checkpoint(self.cfg, self.last_save))
        if (signal_name or stop.checkpoint_due) and self.saved != done:
            self.save(done)
        if signal_name:
            raise TrainingStopped(signal_name, done)

    def iteration(self, batch, it):
        t0 = time.time()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.meter.data_time += time.time() - t0
        keep_debug = self.cfg.train.debug_img_interval > 0 and it % self.cfg.train.debug_img_interval == 0
        logs = self.trainer.step(batch, it, keep_debug=keep_debug)
        self.nonfinite.update(it, logs)  # on the device: no host synchronisation per iteration
        self.meter.add(logs)
        if keep_debug:
            self.log.debug_grid(self.trainer, it)
        self.trainer.debug = None
        self.log.progress.update()

    def log_train(self, iteration):
        self.nonfinite.check()
        self.log.train_record(self.meter.record(iteration), self.trainer.optimizers)

    def evaluate(self, iteration, pred_dir=None):
        """Target metrics on data.val (None before the end when it has no labels: only the final
        predictions are written then); logged with the best mIoU so far."""
        cfg = self.cfg
        labelled = mic_data.has_labels(cfg.data.val)
        if not labelled and iteration < self.max_iters:
            return None
        # The evaluation draws from the global RNG (its DataLoader's seed). latest.pth of this iteration was
        # written before it, so the training must go on with the numbers it had then: a resumed run is exact.
        state = rng_state()
        try:
            metrics = mic_eval.evaluate(self.trainer.student, cfg.data.val, num_classes=cfg.model.num_classes,
                                        device=self.device, amp=cfg.train.amp, pred_dir=pred_dir, progress=False,
                                        synthia16=cfg.data.source.type == 'synthia',
                                        num_workers=cfg.data.num_workers, classes=self.classes, bands=cfg.data)
        finally:
            set_rng_state(state)
        if 'mIoU' not in metrics and not labelled:
            print0(f'data.val ({cfg.data.val.root}) has no labels: cannot compute mIoU, predictions only')
            return {'mIoU': None, **metrics}
        if 'mIoU' not in metrics:
            raise mic_data.DataError(f'data.val ({cfg.data.val.root}, split {cfg.data.val.split}) is not fully '
                                     'labelled: training evaluates on a labelled split; point data.val at one')
        entry = {**metrics, 'iteration': iteration, 'checkpoint': os.path.join(self.work_dir, mic_report.BEST_NAME)}
        if is_main() and mic_report.is_best(entry, self.best):  # best.pth: latest.pth of this iteration
            self.best = entry
            link_or_copy(os.path.join(self.work_dir, 'latest.pth'), entry['checkpoint'])
        self.log.eval_record(iteration, metrics, self.best['mIoU'] if self.best else metrics['mIoU'])
        return metrics

    def save(self, iteration):
        """latest.pth, written by rank 0 with every rank's RNG state, once the state is checked finite."""
        self.nonfinite.check_before_checkpoint(self.trainer, iteration)
        states = gather_rng_states()
        self.saved, self.last_save = iteration, time.monotonic()
        if not is_main():
            return
        save_latest(self.work_dir, self.trainer.state_dict(), iteration, states, self.cfg, self.command,
                    self.best['mIoU'] if self.best else None, self.world)

    def finish(self, metrics):
        """metrics.json and the closing line (rank 0)."""
        if not is_main():
            return
        work_dir, n = self.work_dir, self.max_iters
        last = {**metrics, 'iteration': n, 'checkpoint': os.path.join(work_dir, 'latest.pth')}
        mic_runtime.save_json(os.path.join(work_dir, 'metrics.json'), mic_report.metrics_record(last, self.best))
        if metrics['mIoU'] is None:
            print0(f'trained {n} iterations; no mIoU without labels: predictions in {work_dir}/preds')
        else:
            print0(f'target mIoU after {n} iterations: {metrics["mIoU"]:.2f} '
                   f'(per class: {work_dir}/metrics.json, predictions: {work_dir}/preds)')


class IntervalMeter:
    """The step's logs summed on the device over one log interval, with the time per iteration and
    the time spent waiting for data."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums, self.n, self.t0, self.data_time = {}, 0, time.time(), 0.0

    AT_ITERATION = ('lr',)  # logged as they are at the record's iteration (a warm-up peak shows where it is)

    def add(self, logs):
        for k, v in logs.items():
            v = v.detach().float()
            self.sums[k] = v if k in self.AT_ITERATION else self.sums.get(k, 0) + v
        self.n += 1

    def record(self, iteration):
        """The log.jsonl record of the interval ending at `iteration` (means; the learning rate of that
        iteration), then a new interval."""
        n = self.n
        values = {k: float(v) if k in self.AT_ITERATION else float(v) / n for k, v in self.sums.items()}
        record = {'iteration': iteration, **{k: round(v, 6) for k, v in values.items()},
                  'time_per_iter': round((time.time() - self.t0) / n, 4), 'data_time': round(self.data_time / n, 4),
                  'memory_mb': round(memory_mb(self.device))}
        self.reset()
        return record


class TrainingStopped(Exception):
    """A stop asked for by a signal, after latest.pth was written at the iteration reached; `status`
    is the exit status (mic_runtime.stop_exit_status: 130 SIGINT, 138 SIGUSR1, 143 SIGTERM)."""

    def __init__(self, signal_name, iteration):
        self.status = mic_runtime.stop_exit_status(signal_name)
        super().__init__(f'stopped by {signal_name} at iteration {iteration}; latest.pth holds iteration '
                         f'{iteration}; continue with --resume')


class TrainingInterrupted(Exception):
    """An abort without a checkpoint (the third Ctrl-C, or Ctrl-C before the loop): the message says
    where the run stopped and how to continue it."""

    def __init__(self, iteration, work_dir):
        ckpt = os.path.join(work_dir, 'latest.pth')
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # one more Ctrl-C here would print a traceback
        try:
            kept = mic_model.read_checkpoint(ckpt, mmap=True).get('iteration') if os.path.isfile(ckpt) else None
        finally:
            signal.signal(signal.SIGINT, previous)
        where = f'the checkpoint {ckpt} holds iteration {kept}' if kept is not None else 'no checkpoint was written yet'
        super().__init__(f'training interrupted at iteration {iteration}; {where}. Continue it with the same '
                         f'command plus --resume' + ('' if kept is not None else ' (or start it again)'))


class NonFiniteWatch:
    """Watches the losses for NaN/inf without a host synchronisation per iteration: per log key, a
    device-side flag (and the first bad iteration) is accumulated every iteration and read at each log
    interval and before every checkpoint, which also checks the weights of the trained modules, so
    that a non-finite state never replaces a good latest.pth."""

    def __init__(self, device):
        self.keys, self.bad = None, None
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, iteration, logs):
        if self.keys != list(logs):  # the same keys every iteration; a change starts the flags afresh
            self.check()
            self.keys, self.bad = list(logs), torch.zeros(len(logs), dtype=torch.bool, device=self.first.device)
        bad_now = ~torch.isfinite(torch.stack([v.detach().float() for v in logs.values()]))
        self.first = torch.where(bad_now.any() & ~self.bad.any(), iteration, self.first)
        self.bad |= bad_now

    def check(self):
        if self.bad is not None and bool(self.bad.any()):  # the one synchronisation, at a log interval or checkpoint
            names = [k for k, b in zip(self.keys, self.bad.tolist()) if b]
            raise NonFiniteLossError(f'non-finite loss at iteration {int(self.first)}: {", ".join(names)}.')

    def check_before_checkpoint(self, trainer, iteration):
        self.check()
        finite = torch.stack([torch.isfinite(p).all() for m in trainer.optimizers for p in
                              trainer.modules[m].parameters()]).all()
        if not bool(finite):
            raise NonFiniteLossError(f'the weights became non-finite by iteration {iteration} (the losses were '
                                     f'finite: an overflow in the update).')


# --------------------------------------------------------------------------
# --benchmark: iterations on synthetic tensors of the config's real sizes
# --------------------------------------------------------------------------

def benchmark(cfg, iters):
    rank, world, device = setup_distributed(cfg.train.device)
    try:
        seed_everything(cfg.train.seed + rank)
        trainer = Trainer(cfg, device, rank, world, random_init=True)  # random weights, same cost
        B, (H, W), K = cfg.data.batch_size, cfg.data.crop_size, cfg.model.num_classes
        gen = torch.Generator().manual_seed(0)
        batch = {'img': torch.randn(B, 3, H, W, generator=gen),
                 'gt': torch.randint(0, K, (B, 1, H, W), generator=gen, dtype=torch.uint8),
                 'target_img': torch.randn(B, 3, H, W, generator=gen),
                 'valid_pseudo_mask': torch.ones(B, 1, H, W, dtype=torch.uint8)}
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        times, checks = [], []
        warmup = min(3, max(iters - 1, 0))
        with mic_runtime.StopSignals() as stop:  # the run loop's stop check, timed on its own
            for i in range(warmup + iters):
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                trainer.step(batch, 1000 + i)
                t_check = time.perf_counter()
                stop.agreed(device)
                t_end = time.perf_counter()
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t - (t_end - t_check))
                    checks.append(t_end - t_check)
        result = {'config': cfg.train.work_dir, 'device': str(device),
                  'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
                  'amp': cfg.train.amp, 'activation_checkpointing': cfg.model.activation_checkpointing,
                  'compile': cfg.train.compile, 'batch': B, 'crop': [H, W], 'iterations': iters,
                  'median_s_per_iter': round(statistics.median(times), 4), 'peak_memory_mb': round(memory_mb(device)),
                  'stop_check_median_s': float(f'{statistics.median(checks):.3g}'),
                  'stop_check_share': float(f'{statistics.median(checks) / statistics.median(times):.3g}'),
                  'world_size': world, 'torch': torch.__version__}
        print0(json.dumps(result))
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Train MIC(HRDA) / MIC(DAFormer) domain adaptation (see the module docstring for examples).',
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n')[1])
    parser.add_argument('--cfg', help='YAML config, e.g. configs/gta2cs.yaml (only what differs '
                        'from the defaults in mic_config.py)')
    parser.add_argument('--exp', metavar='ID', help='train every run of one of the paper\'s experiments (80-85) or of '
                        'the demo study (demo), as listed in configs/experiments.yaml, in turn, each in its own run folder; finished runs are reported')
    parser.add_argument('--list', action='store_true', help='with --exp: print one command per run instead')
    parser.add_argument('--opt', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. train.max_iters=1000 model.pretrained=null data.batch_size=1')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='continue a run exactly; --resume (= --resume auto): from train.work_dir/latest.pth, '
                             'or a new run when there is none yet (one command for the first start and every '
                             'restart); --resume CKPT: from that file')
    parser.add_argument('--benchmark', type=int, default=None, metavar='N',
                        help='time N iterations on synthetic tensors of the config\'s sizes; prints median '
                             's/iteration and peak memory, needs no dataset')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms, no cuDNN autotuning (train.deterministic=true): two runs '
                             'of one seed on one machine and world size give the same numbers')
    args = parser.parse_args(argv)
    if (args.cfg is None) == (args.exp is None):
        parser.error('give either --cfg CONFIG or --exp ID')
    if args.list and args.exp is None:
        parser.error('--list goes with --exp')
    mic_runtime.limit_threads()  # no more intra-op threads than this process's share of the cores
    if args.exp is not None:
        return run_experiment(args, argv)
    try:
        cfg = load_config(args.cfg, args.opt + (['train.deterministic=true'] if args.deterministic else []))
        if args.benchmark:
            return benchmark(cfg, args.benchmark)
        command = ' '.join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))
        return train(cfg, args.resume, command)
    except TrainingStopped as e:
        print0(e)
        sys.exit(e.status)
    except TrainingInterrupted as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(130)  # the shell's status for Ctrl-C
    except (ConfigError, mic_data.DataError, mic_model.CheckpointError, FileNotFoundError, NonFiniteLossError,
            mic_report.MissingPackageError, mic_runtime.RunLockError) as e:
        exit_error(e)


def run_experiment(args, argv):
    """--exp ID: the runs of an experiment one after the other (--list: their commands)."""
    try:
        runs = mic_experiments.experiment_runs(args.exp)
        if args.list:
            for line in mic_experiments.experiment_commands(args.exp):
                print(line)
            return runs
        extra = args.opt + (['train.deterministic=true'] if args.deterministic else [])
        results = {}
        for i, (name, cfg_path, opts) in enumerate(runs):
            print0(f'== experiment {args.exp}, run {i + 1}/{len(runs)}: {name}')
            cfg = load_config(cfg_path, opts + extra)
            command = f'mic_train.py --cfg {cfg_path} --opt {" ".join(opts + extra)}'
            results[name] = train(cfg, interrupted_run(cfg), command)
        for name, metrics in results.items():
            print0(f'{name}: target mIoU {metrics["mIoU"]:.2f}')
        return results
    except TrainingStopped as e:
        print0(e)
        sys.exit(e.status)
    except TrainingInterrupted as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(130)
    except (ConfigError, mic_data.DataError, mic_model.CheckpointError, FileNotFoundError, NonFiniteLossError,
            mic_report.MissingPackageError, mic_runtime.RunLockError) as e:
        exit_error(e)


if __name__ == '__main__':
    main()
