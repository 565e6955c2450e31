"""Peak memory of `mic_eval.py --images` against the photo size (CPU).

    python benchmarks/predict_memory.py [--repo .] [--format all] [--sizes 2048x1024 6000x4000]

Writes one JPEG per size (a smooth scene with noise) and a checkpoint of the demo model
(configs/demo.yaml: HRDA, MiT-b0, random weights) whose test scale is data.val.img_scale=[192,128],
then runs `mic_eval.main(['--ckpt', ..., '--images', DIR, ...])` on each photo alone in a fresh
child process (data.num_workers=0, so the photo is read, resized and its outputs written in the
measured process) and reports that process's peak resident set size (Linux VmHWM) at the end.
--repo: the checkout whose mic_eval runs (an older one for a before/after comparison; --format
default means no --format argument, i.e. colour predictions and overlays).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def vmhwm_mib():
    with open('/proc/self/status') as f:
        return int(re.search(r'VmHWM:\s+(\d+)', f.read()).group(1)) / 1024


def child(args):
    sys.path.insert(0, os.path.abspath(args.repo))
    import mic_eval
    argv = ['--ckpt', args.ckpt, '--images', args.images, '--out', args.out, '--opt', 'data.num_workers=0']
    if args.format != 'default':
        argv += ['--format', args.format, '--save-confidence']
    mic_eval.main(argv)
    print(json.dumps({'peak_mib': round(vmhwm_mib())}))


def write_inputs(folder, sizes):
    import numpy as np
    import torch
    from PIL import Image
    sys.path.insert(0, os.path.join(HERE, '..'))
    import mic_config
    import mic_model
    cfg = mic_config.load_config(os.path.join(HERE, '..', 'configs', 'demo.yaml'), ['data.val.img_scale=[192,128]'])
    torch.manual_seed(0)
    model = mic_model.build_model(cfg.model)
    ckpt = os.path.join(folder, 'latest.pth')
    torch.save({'student': model.state_dict(), 'config': mic_config.stored(cfg), 'iteration': 1}, ckpt)
    rng = np.random.default_rng(0)
    for w, h in sizes:
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        img = np.stack([128 + 100 * np.sin(xx / 300), 128 + 100 * np.cos(yy / 200), (xx + yy) % 256], -1)
        img += rng.normal(0, 8, img.shape).astype(np.float32)
        os.makedirs(os.path.join(folder, f'{w}x{h}'))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f'{w}x{h}', 'photo.jpg'),
                                                                   quality=90)
    return ckpt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repo', default=os.path.join(HERE, '..'))
    parser.add_argument('--format', default='all', help="mic_eval --format (with --save-confidence), or 'default'")
    parser.add_argument('--sizes', nargs='+', default=['2048x1024', '6000x4000'])
    parser.add_argument('--child', action='store_true')
    parser.add_argument('--ckpt')
    parser.add_argument('--images')
    parser.add_argument('--out')
    args = parser.parse_args()
    if args.child:
        return child(args)
    sizes = [tuple(int(v) for v in s.split('x')) for s in args.sizes]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_inputs(tmp, sizes)
        for w, h in sizes:
            cmd = [sys.executable, __file__, '--child', '--repo', args.repo, '--format', args.format, '--ckpt', ckpt,
                   '--images', os.path.join(tmp, f'{w}x{h}'), '--out', os.path.join(tmp, f'out_{w}x{h}')]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '2'})
            if done.returncode:
                sys.exit(done.stderr)
            results[f'{w}x{h}'] = json.loads(done.stdout.strip().splitlines()[-1])['peak_mib']
            print(f'{w}x{h}: peak RSS {results[f"{w}x{h}"]} MiB', flush=True)
    print(json.dumps({'repo': os.path.abspath(args.repo), 'format': args.format, 'peak_mib': results}))


if __name__ == '__main__':
    main()
