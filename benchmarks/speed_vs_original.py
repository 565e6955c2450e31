"""Time one MIC(HRDA) training iteration and test-time inference: ours vs the original (lhoyer/MIC, seg/),
in one process, same weights, same batch, alternating.

Environment: the original's, as in benchmarks/compare_with_original.py (pure-Python mmcv 1.3.7,
kornia 0.5.8, stand-ins for timm and torchvision):

    python benchmarks/speed_vs_original.py --ref /tmp/MIC/seg                     # MiT-b0, ~10 min on 2 cores
    python benchmarks/speed_vs_original.py --ref /tmp/MIC/seg --variant b5        # the real encoder
    python benchmarks/speed_vs_original.py --ref /tmp/MIC/seg --profile ours      # torch.profiler top-20 of
                                                                                  # one iteration (or theirs)

What is timed (defaults: 2 intra-op threads, batch 2 source + 2 target crops of 512x512, HRDA detail
crop 256x256, random weights; benchmarks/iteration_vs_original.build_pair builds both sides):
- train: one full iteration (EMA update, source loss + ImageNet feature distance, teacher
  pseudo-labels, ClassMix, strong augmentation, mixed loss, masked loss, AdamW step): our
  Trainer.step against the original's DACS.train_step (with its poly-lr hook before it).
  Colour jitter and Gaussian blur are switched on in every iteration on both sides (the
  per-iteration decisions only; the factors, sigmas, crops and masks are each side's own draws).
- infer whole / infer slide: test-time inference of one 512x1024 image in eval mode, no gradients:
  `whole` = one HRDA encode_decode of the image (context view + 256x256 detail windows, stride 128);
  `slide` = test windows of 512x512 with stride 256 (3 windows in one batch, the original's
  batched_slide), each an HRDA encode_decode. The original's inference() also takes a softmax.
The two sides run alternately (ours first on even repetitions, the original first on odd ones) after
`--warmup` untimed rounds; medians of wall time (time.perf_counter) and CPU time of the process
(time.process_time: all threads) per call, and the ratio ours / original.

Peak memory: each side runs alone in a fresh child process (this script with --child) that builds
both models exactly as here. It reports the peak resident set size (Linux VmHWM, restarted through
/proc/self/clear_refs just before the measured calls) minus the resident set size at that moment,
i.e. the memory the calls add on top of the built models and the batch: for `train`, `--mem-iters`
training iterations from a fresh optimizer (AdamW state, gradients and activations included); for
`infer`, the whole and the slide inference.
Prints a table and one JSON line with everything.
"""
import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, '..')]
from peak_memory import reset_peak_rss, rss_kib  # noqa: E402


def loadavg():
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


# --------------------------------------------------------------------------
# The two sides, each as a few callables
# --------------------------------------------------------------------------

class Sides:
    """Both implementations built by build_pair, with `train(it)`, `infer(mode)` per side."""

    def __init__(self, args):
        from compare_with_original import install_stand_ins
        install_stand_ins()
        sys.path.insert(0, os.path.abspath(args.ref))
        import iteration_vs_original as ivo
        self.args = args
        self.ours, (self.theirs, self.optimizer, self.hook, self.runner), self.b_ours, self.b_theirs = \
            ivo.build_pair(os.path.abspath(args.ref), args.variant, args.crop, args.hr_crop, batch=args.batch)
        self.stack = contextlib.ExitStack()
        self._switches_on()
        g = torch.Generator().manual_seed(123)
        H, W = args.infer_size
        self.infer_img = torch.randn(1, 3, H, W, generator=g)
        self.infer_meta = [dict(ori_shape=(H, W, 3), img_shape=(H, W, 3), pad_shape=(H, W, 3), flip=False)]
        self.it = {'ours': 1, 'theirs': 1}

    def _switches_on(self):
        """Colour jitter and blur on in every iteration, on both sides (only the on/off decisions)."""
        import mmseg.models.uda.dacs as dacs_module
        import mmseg.models.uda.masking_consistency_module as mcm_module
        import mic_uda

        def patch(obj, name, value):
            old = getattr(obj, name)
            setattr(obj, name, value)
            self.stack.callback(setattr, obj, name, old)
        patch(mic_uda, 'augmentation_switches', lambda u, blur: (True, bool(blur)))
        always = types.SimpleNamespace(uniform=lambda a, b: 0.9)  # > color_jitter_p 0.2 and > 0.5 for blur
        patch(dacs_module, 'random', always)
        patch(mcm_module, 'random', always)

    def train(self, side):
        it = self.it[side]
        self.it[side] += 1
        if side == 'ours':
            logs = self.ours.step(self.b_ours, it)
            return float(sum(v for k, v in logs.items() if 'loss' in k))
        self.runner.iter = it
        self.hook.before_train_iter(self.runner)
        logs = self.theirs.train_step(self.b_theirs, self.optimizer)['log_vars']
        return float(sum(v for k, v in logs.items() if 'loss' in k))

    def infer(self, side, mode):
        H, W = self.args.infer_size
        c = self.args.test_crop
        cfg = dict(mode=mode, crop_size=[c, c], stride=[c // 2, c // 2])
        if side == 'ours':
            m = self.ours.student
            m.test_cfg = cfg
            m.eval()
            try:
                with torch.no_grad():
                    return m.inference(self.infer_img, out_size=(H, W))
            finally:
                m.train()
        from mmcv import ConfigDict
        m = self.theirs.get_model()
        m.test_cfg = ConfigDict(dict(cfg, batched_slide=True))
        m.eval()
        try:
            with torch.no_grad():
                return m.inference(self.infer_img, self.infer_meta, rescale=True)
        finally:
            m.train()

    def call(self, side, what):
        if what == 'train':
            return self.train(side)
        return self.infer(side, what.split()[1])


ROWS = ('train', 'infer whole', 'infer slide')


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


# --------------------------------------------------------------------------
# Modes: alternating timing, one side's memory in a child, a profile
# --------------------------------------------------------------------------

def run_timing(args, sides):
    times = {(r, s): {'wall': [], 'cpu': []} for r in ROWS for s in ('ours', 'theirs')}
    for row in ROWS:
        n = args.iters if row == 'train' else args.infer_iters
        for rep in range(args.warmup + n):
            order = ('ours', 'theirs') if rep % 2 == 0 else ('theirs', 'ours')
            for side in order:
                wall, cpu = timed(lambda: sides.call(side, row))
                if rep >= args.warmup:
                    times[row, side]['wall'].append(wall)
                    times[row, side]['cpu'].append(cpu)
            print(f'  {row} {rep}: ' + ', '.join(f'{s} {times[row, s]["wall"][-1]:.2f}s wall'
                                              for s in ('ours', 'theirs') if rep >= args.warmup), flush=True)
    return {f'{r}': {s: {k: statistics.median(v) for k, v in times[r, s].items()} | {'n': len(times[r, s]['wall'])}
                     for s in ('ours', 'theirs')} for r in ROWS}


def child_memory(args):
    """Runs in a fresh process: one side only; prints a JSON line of KiB added by the measured calls."""
    sides = Sides(args)
    out = {'side': args.child, 'baseline_rss_mib': None}
    import gc
    gc.collect()
    base = rss_kib('VmRSS')
    out['baseline_rss_mib'] = round(base / 1024, 1)
    reset_peak_rss()
    for _ in range(args.mem_iters):
        sides.train(args.child)
    out['train_peak_minus_baseline_mib'] = round((rss_kib('VmHWM') - base) / 1024, 1)
    gc.collect()
    base = rss_kib('VmRSS')
    reset_peak_rss()
    sides.infer(args.child, 'whole')
    sides.infer(args.child, 'slide')
    out['infer_peak_minus_baseline_mib'] = round((rss_kib('VmHWM') - base) / 1024, 1)
    print('CHILD ' + json.dumps(out), flush=True)


def run_memory(args):
    res = {}
    for side in ('ours', 'theirs'):
        cmd = [sys.executable, '-W', 'ignore', os.path.abspath(__file__), *sys.argv[1:], '--child', side]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith('CHILD ')]
        if p.returncode or not line:
            raise RuntimeError(f'memory child {side} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
        res[side] = json.loads(line[0][len('CHILD '):])
    return res


def run_profile(args, sides):
    from torch.profiler import ProfilerActivity, profile, record_function
    side = args.profile
    # label the stages of an iteration so that the table can be read per stage
    if side == 'ours':
        passes = []
        for name, p in sides.ours.passes:
            run = p.run
            passes.append((name, p._replace(run=lambda t, s, run=run, name=name: _labelled(f'## {name}_pass', run,
                                                                                          t, s))))
        sides.ours.passes = passes
    for _ in range(args.warmup):
        sides.call(side, args.profile_what)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(f'## {side} {args.profile_what}'):
            sides.call(side, args.profile_what)
    table = prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.profile_rows)
    print(table)
    labels = [e for e in prof.key_averages() if e.key.startswith('##')]
    for e in labels:
        print(f'{e.key:40s} {e.cpu_time_total / 1e6:8.3f} s (cpu total)')


def _labelled(label, fn, *a):
    from torch.profiler import record_function
    with record_function(label):
        return fn(*a)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ref', required=True, help="the original's seg/ folder (git clone lhoyer/MIC)")
    parser.add_argument('--variant', default='b0', help='MiT variant (b0..b5)')
    parser.add_argument('--crop', type=int, default=512, help='training crops (source and target)')
    parser.add_argument('--hr-crop', type=int, default=256, help='HRDA detail crop (and detail window)')
    parser.add_argument('--batch', type=int, default=2, help='source and target images per iteration')
    parser.add_argument('--infer-size', type=int, nargs=2, default=(512, 1024), help='test image H W')
    parser.add_argument('--test-crop', type=int, default=512, help='test-time window (stride: half of it)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds of each row')
    parser.add_argument('--iters', type=int, default=5, help='timed training iterations per side')
    parser.add_argument('--infer-iters', type=int, default=5, help='timed inference calls per side and mode')
    parser.add_argument('--mem-iters', type=int, default=2, help='training iterations of the memory children')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory children')
    parser.add_argument('--profile', choices=('ours', 'theirs'), default=None,
                        help='only profile one call of one side (torch.profiler, CPU)')
    parser.add_argument('--profile-what', choices=ROWS, default='train')
    parser.add_argument('--profile-rows', type=int, default=20)
    parser.add_argument('--child', choices=('ours', 'theirs'), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child_memory(args)
    load_start = loadavg()
    info = {'variant': args.variant, 'crop': args.crop, 'hr_crop': args.hr_crop, 'batch': args.batch,
            'infer_size': list(args.infer_size), 'threads': args.threads, 'torch': torch.__version__,
            'cpu': _cpu_name(), 'load_start': load_start}
    print(f'# {json.dumps(info)}', flush=True)
    sides = Sides(args)
    if args.profile:
        run_profile(args, sides)
        print(f'# load average: start {load_start}, end {loadavg()}')
        return
    res = run_timing(args, sides)
    del sides
    mem = None if args.no_memory else run_memory(args)
    info['load_end'] = loadavg()
    print(f'\nMiT-{args.variant}, batch {args.batch}+{args.batch}, crops {args.crop}x{args.crop} (detail '
          f'{args.hr_crop}x{args.hr_crop}), test image {args.infer_size[0]}x{args.infer_size[1]}, {args.threads} '
          f'threads; load average {load_start} -> {info["load_end"]}')
    print(f'{"row":14s} {"ours wall":>10s} {"orig wall":>10s} {"ratio":>6s}   {"ours cpu":>9s} {"orig cpu":>9s} '
          f'{"ratio":>6s}  n')
    for row, r in res.items():
        o, t = r['ours'], r['theirs']
        print(f'{row:14s} {o["wall"]:9.3f}s {t["wall"]:9.3f}s {o["wall"] / t["wall"]:6.2f}   {o["cpu"]:8.3f}s '
              f'{t["cpu"]:8.3f}s {o["cpu"] / t["cpu"]:6.2f}  {o["n"]}')
        r['ratio_wall'], r['ratio_cpu'] = o['wall'] / t['wall'], o['cpu'] / t['cpu']
    if mem:
        for key, label in (('train_peak_minus_baseline_mib', f'peak memory, {args.mem_iters} train iterations'),
                           ('infer_peak_minus_baseline_mib', 'peak memory, inference whole + slide')):
            o, t = mem['ours'][key], mem['theirs'][key]
            print(f'{label:40s} ours {o:8.1f} MiB  original {t:8.1f} MiB  ratio {o / t:.2f}')
    print('JSON ' + json.dumps({**info, 'timing': res, 'memory': mem}))


def _cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            return re.search(r'model name\s*:\s*(.*)', f.read()).group(1).strip() + f' x{os.cpu_count()}'
    except (OSError, AttributeError):
        return None


if __name__ == '__main__':
    main()
