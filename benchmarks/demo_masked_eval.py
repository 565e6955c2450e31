"""Does a model of the demo study predict masked target images from their context?

For each run of the study and seed: target val mIoU of the trained student on the plain images
and on the same images with MIC's random block mask applied (the normalised image times the
mask, as the masked training pass sees it; the same masks for every model), and the mIoU on the
masked-out pixels alone, i.e. what the model infers there from the visible context only; and the
mIoU of the EMA teacher's predictions on the target train split, i.e. the quality of the
pseudo-labels (before the confidence weighting) that the DACS and MIC losses learn from.

    python mic_train.py --exp demo                       # the study (BENCHMARKS.md section 3)
    python benchmarks/demo_masked_eval.py --seeds 0 1 2  # this table
    python benchmarks/demo_masked_eval.py --runs work_dirs/demo_oracle --names demo_target_oracle  # the ceiling
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import mic_data  # noqa: E402
import mic_model  # noqa: E402
from mic_eval import compute_metrics, confusion_matrix, evaluate  # noqa: E402
from mic_predict import resolve_config  # noqa: E402
from mic_uda import block_mask  # noqa: E402

RUNS = ('demo_source_only', 'demo_daformer', 'demo_hrda_dacs', 'demo_hrda_mic')


def load_run(ckpt):
    """(resolved config, student, EMA teacher or None) of one run's checkpoint, in eval mode."""
    cfg, _ = resolve_config(ckpt)
    student = mic_model.build_model(cfg['model'], load_pretrained=False)
    mic_model.load_checkpoint(student, ckpt)
    stored = mic_model.read_checkpoint(ckpt)
    weights = stored.get('modules', stored).get('teacher')  # older checkpoints keep it at the top level
    teacher = None
    if weights is not None:
        teacher = mic_model.build_model(cfg['model'], load_pretrained=False)
        teacher.load_state_dict(weights)
        teacher.eval()
    return cfg, student.eval(), teacher


@torch.no_grad()
def masked_miou(cfg, model, ratio, block, mask_seed):
    """(plain mIoU, masked-image mIoU, mIoU on the masked-out pixels only) of `model` on cfg's val split."""
    K = cfg['model']['num_classes']
    dataset = mic_data.EvalDataset(cfg['data']['val'], classes=mic_data.class_table(cfg['data'], K))
    generator = torch.Generator().manual_seed(mask_seed)
    conf = {name: torch.zeros(K * K, dtype=torch.int64) for name in ('plain', 'masked', 'hidden')}
    for i in range(len(dataset)):
        item = dataset[i]
        img, label = item['img'][None], item['label']
        h0, w0 = item['ori_size']
        # the mask is drawn at the label's size (the same for every model), then resized to the input
        mask = block_mask(1, h0, w0, ratio, block, generator=generator)
        small = torch.nn.functional.interpolate(mask, size=img.shape[-2:], mode='nearest')
        plain = model.inference(img, out_size=(h0, w0))[0].argmax(0)
        masked = model.inference(img * small, out_size=(h0, w0))[0].argmax(0)
        hidden = torch.where(mask[0, 0].bool(), torch.full_like(label, mic_data.IGNORE_INDEX), label)
        conf['plain'] += confusion_matrix(plain, label, K)
        conf['masked'] += confusion_matrix(masked, label, K)
        conf['hidden'] += confusion_matrix(masked, hidden, K)
    return tuple(compute_metrics(conf[name].view(K, K))['mIoU'] for name in ('plain', 'masked', 'hidden'))


def teacher_miou(cfg, teacher):
    """mIoU of the EMA teacher on cfg's (labelled) target train split: the pseudo-labels' quality."""
    K = cfg['model']['num_classes']
    # the target as the teacher sees it in training (scale), scored against its labels
    target = dict(cfg['data']['target'], crop_pseudo_margins=None)
    return evaluate(teacher, target, K, num_workers=0, progress=False,
                    classes=mic_data.class_table(cfg['data'], K))['mIoU']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', default='work_dirs/demo', help="folder of the study's run folders")
    parser.add_argument('--names', nargs='+', default=list(RUNS), help='run names (folders <name>_s<seed>)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--ratio', type=float, default=0.7, help="share of masked blocks (the demo's MIC: 0.7)")
    parser.add_argument('--block', type=int, default=16, help="block size in label pixels (the demo's MIC: 16)")
    parser.add_argument('--mask-seed', type=int, default=0)
    args = parser.parse_args(argv)
    print(f'target val mIoU (%), mask ratio {args.ratio}, {args.block}-pixel blocks, mean +- std over seeds '
          f'{args.seeds}')
    print('| run | plain image | masked image | masked-out pixels only | teacher on the target train split |')
    print('|---|---|---|---|---|')
    for run in args.names:
        rows = []
        for seed in args.seeds:
            ckpt = os.path.join(args.runs, f'{run}_s{seed}', 'latest.pth')
            if not os.path.isfile(ckpt):
                sys.exit(f'error: {ckpt} does not exist: train the study first (python mic_train.py --exp demo)')
            cfg, student, teacher = load_run(ckpt)
            rows.append(masked_miou(cfg, student, args.ratio, args.block, args.mask_seed)
                        + (np.nan if teacher is None else teacher_miou(cfg, teacher),))
        values = np.array(rows)
        spread = values.std(0, ddof=1) if len(rows) > 1 else np.zeros(values.shape[1])
        cells = ['-' if np.isnan(m) else f'{m:.1f} +- {s:.1f}' for m, s in zip(values.mean(0), spread)]
        print(f'| `{run}` | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
