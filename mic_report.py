"""Reports of training runs: report.png (curves and per-class heat maps), TensorBoard, log.jsonl,
the best evaluation and metrics.json, and plain progress lines when stdout is not a terminal. The
summary table over seeds (mic_eval.py --summary) is in mic_summary.py.

    python mic_report.py work_dirs/gta2cs
        (re)draws work_dirs/gta2cs/report.png from its log.jsonl (training does this at every
        evaluation and at the end); several run folders or glob patterns are accepted
    python mic_eval.py --summary 'work_dirs/gta2cs_s*'
        mIoU and per-class IoU of finished runs (folders holding metrics.json) as mean ± sample
        standard deviation (n - 1), a markdown table on stdout; folders without metrics.json are
        listed as unfinished. --summary-json FILE also writes it as JSON (mic_summary.py).

report.png needs matplotlib, TensorBoard logs need tensorboard (requirements-optional.txt); both
are imported only when used and raise MissingPackageError with the pip command when missing.

Library use (mic_train.py; files and TensorBoard on rank 0 only):

    logs.update(pseudo_class_logs(plabel, valid, names))     # in Trainer.step: 'pseudo_class.<name>' shares
                                                             # (names: mic_data.class_table(cfg.data).names)
    progress = Progress(max_iters, initial=start, enabled=is_main())   # bar on a terminal, else plain lines
    tb = TensorBoardWriter(os.path.join(work_dir, 'tensorboard'), purge_step=start)  # train.tensorboard=true
    for it in range(start, max_iters):
        ...; progress.update()
        every log interval:   progress.log(record); tb.add_record(record); tb.add_learning_rates(opt, done)
        every debug grid:     save_debug_grid(trainer.debug, path, mean, std); tb.add_image('debug', path, it)
        every evaluation:     tb.add_record(eval_record); progress.write(line); write_report(work_dir)
    progress.close(); write_report(work_dir); tb.close()

log.jsonl, as read here: one JSON object per line. Training records hold 'iteration' and numbers:
losses '<pass>.loss_<name>' (source, mix, masked, ...), 'lr', 'pseudo_ratio', 'time_per_iter',
'memory_mb', and the pseudo-label class shares 'pseudo_class.<class name>' (fractions of the
pseudo-labelled pixels, summing to 1). Evaluation records hold 'iteration', 'eval' (mIoU, aAcc,
[mIoU16]), 'IoU' {class name: IoU or null} and 'best_mIoU'.

Imports: numpy, mic_runtime and mic_data (matplotlib and tensorboard where used); mic_summary,
mic_eval, convert_labels, mic_uda and mic_train import this, it imports none of them.
"""
import argparse
import datetime
import glob
import json
import math
import os
import re
import statistics
import sys
import time

import numpy as np

import mic_data
import mic_runtime

REPORT_NAME = 'report.png'  # in the run folder
LOG_NAME = 'log.jsonl'
METRICS_NAME = 'metrics.json'
PSEUDO_CLASS_PREFIX = 'pseudo_class.'  # log keys of the pseudo-label class shares
OPTIONAL_REQUIREMENTS = 'requirements-optional.txt'
COLLAPSE_IOU = 1.0  # report.png names the classes below this IoU (%) at the last evaluation


class MissingPackageError(ImportError):
    """An optional package (matplotlib, tensorboard) is needed and not installed; the message says how to fix it."""


def _missing(package, what):
    return MissingPackageError(f'{what} needs the {package!r} package, which is not installed: '
                               f'pip install {package}  (or pip install -r {OPTIONAL_REQUIREMENTS})')


# --------------------------------------------------------------------------
# Reading log.jsonl
# --------------------------------------------------------------------------

_RECORD_START = re.compile(r'\{\s*"iteration"')


def _parse_line(line):
    """The record of one log line, or None. A line that is not JSON may be the partial last line
    of a killed run with the next run's first record appended to it: the last record that starts
    on the line and parses to its end is taken."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
        for m in reversed(list(_RECORD_START.finditer(line))):
            try:
                record = json.loads(line[m.start():])
                break
            except ValueError:
                continue
    if isinstance(record, dict) and isinstance(record.get('iteration'), int):
        return record
    return None


def _keep_latest(records, record):
    """Append `record`; a resumed run logs iterations again: its records replace the earlier ones
    at the same or later iterations."""
    while records and records[-1]['iteration'] >= record['iteration']:
        records.pop()
    records.append(record)


def read_log(path):
    """(train_records, eval_records) of a log.jsonl, each in iteration order.

    Robust to what killed or resumed runs leave: unparsable lines (a partially written last
    line) are skipped, and records logged again after a resume replace the earlier ones.
    Evaluation records are those with an 'eval' key.
    """
    train, evals = [], []
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            record = _parse_line(line.strip())
            if record is not None:
                _keep_latest(evals if 'eval' in record else train, record)
    return train, evals


def truncate_log(path, iteration):
    """Make log.jsonl hold each iteration once when a run resumes from a checkpoint of `iteration`:
    records after it (logged by the stopped run, about to be logged again) are dropped, as are
    unparsable lines (a partial last line) and the older duplicates that logs of earlier resumes hold.
    Rewritten atomically, only when something changes; returns the number of lines dropped.
    report.png and TensorBoard (purge_step) then show what the resumed run logs."""
    if not os.path.isfile(path):
        return 0
    kept, lines = [], 0
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            if not line.strip():
                continue
            lines += 1
            record = _parse_line(line.strip())
            if record is None or record['iteration'] > iteration:
                continue
            is_eval = 'eval' in record
            # a record replaces the earlier ones of its kind at the same or later iterations (as read_log)
            kept = [r for r in kept if ('eval' in r) != is_eval or r['iteration'] < record['iteration']]
            kept.append(record)
    if len(kept) < lines:
        mic_runtime.atomic_write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))
    return lines - len(kept)


def _number(v):
    """float(v) for real numbers (bool excluded), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _loss_groups(train):
    """{pass: [keys]} of the loss keys ('<pass>.loss_<name>', or 'loss...' without a pass), in log order."""
    groups = {}
    for r in train:
        for k, v in r.items():
            prefix, _, name = k.rpartition('.')
            if name.startswith('loss') and _number(v) is not None:
                keys = groups.setdefault(prefix or 'loss', [])
                if k not in keys:
                    keys.append(k)
    return groups


def _series(records, key):
    """(iterations, values) of the records holding a number under `key`."""
    pts = [(r['iteration'], _number(r.get(key))) for r in records]
    pts = [(i, v) for i, v in pts if v is not None]
    return [i for i, _ in pts], [v for _, v in pts]


def _class_order(names):
    """Class names in train-id order: the Cityscapes order when they are all Cityscapes classes, else
    their order of appearance (metrics.json and log.jsonl list a task's classes in train-id order;
    a task of its own, data.classes, may share some names with Cityscapes)."""
    names = list(names)
    if not set(names) <= set(mic_data.CLASSES):
        return names
    return [c for c in mic_data.CLASSES if c in names]


def _unique(items):
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------
# report.png
# --------------------------------------------------------------------------

def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError:
        raise _missing('matplotlib', f'the run report ({REPORT_NAME})') from None
    return matplotlib, Figure, FigureCanvasAgg, LogNorm


def _smooth(values, window):
    """Running mean over `window` points (shorter at the ends)."""
    v = np.asarray(values, float)
    if window <= 1 or len(v) < 3:
        return v
    kernel = np.ones(window)
    return np.convolve(v, kernel, 'same') / np.convolve(np.ones_like(v), kernel, 'same')


def _no_data(ax, text):
    ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes, color='0.4')
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_curves(ax, title, train, keys, legend=True):
    for k in keys:
        its, vals = _series(train, k)
        label = k.rpartition('.')[2]
        if len(vals) > 50:  # noisy: a faint raw line under a running mean over ~2 % of the points
            line, = ax.plot(its, vals, lw=0.6, alpha=0.35)
            ax.plot(its, _smooth(vals, max(3, len(vals) // 50)), lw=1.4, color=line.get_color(), label=label)
        else:
            ax.plot(its, vals, lw=1.2, marker='.' if len(vals) < 20 else None, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('iteration', fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    if legend:
        ax.legend(fontsize=7)
    # The first iterations' large values would flatten the rest: scale y to the later ones.
    vals = np.concatenate([np.asarray(_series(train, k)[1], float) for k in keys])
    if len(vals) >= 20 and np.isfinite(vals).all():
        later = vals[len(vals) // 10:]
        top, bottom = later.max(), min(later.min(), 0.0)
        if top > bottom:
            ax.set_ylim(bottom, top + 0.1 * (top - bottom))


def _draw_miou(ax, evals):
    its, miou = _series([{'iteration': r['iteration'], **r['eval']} for r in evals], 'mIoU')
    if not miou:
        ax.set_title('target mIoU (%)', fontsize=10)
        return _no_data(ax, 'no evaluation yet')
    ax.plot(its, miou, marker='o', ms=3, label='mIoU')
    its16, m16 = _series([{'iteration': r['iteration'], **r['eval']} for r in evals], 'mIoU16')
    if m16:
        ax.plot(its16, m16, marker='o', ms=3, label='mIoU16')
    b = int(np.argmax(miou))
    ax.set_title(f'target mIoU (%): last {miou[-1]:.1f}, best {miou[b]:.1f} at {its[b]}', fontsize=10)
    ax.set_xlabel('iteration', fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    if m16:
        ax.legend(fontsize=7)


def _heatmap(fig, ax, matrix, rows, cols, norm=None, vmin=None, vmax=None, cmap='RdYlGn', annotate=False,
             cbar_label=''):
    import matplotlib
    cm = matplotlib.colormaps[cmap].with_extremes(bad='0.85')
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect='auto', interpolation='nearest', cmap=cm, norm=norm,
                   vmin=None if norm else vmin, vmax=None if norm else vmax)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    step = max(1, math.ceil(len(cols) / 12))
    ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]], fontsize=7,
                  rotation=45 if len(cols) > 6 else 0)
    ax.set_xlabel('iteration', fontsize=8)
    if annotate:
        for (y, x), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                dark = v < 0.2 * vmax or v > 0.85 * vmax  # the ends of RdYlGn are dark
                ax.text(x, y, f'{v:.0f}', ha='center', va='center', fontsize=7, color='white' if dark else 'black')
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01).set_label(cbar_label, fontsize=7)


def _draw_iou_heatmap(fig, ax, evals):
    names = _class_order(_unique(n for r in evals for n in (r.get('IoU') or {})))
    if not names:
        ax.set_title('per-class IoU (%)', fontsize=10)
        return _no_data(ax, 'no evaluation yet')
    its = [r['iteration'] for r in evals]
    m = np.array([[_number((r.get('IoU') or {}).get(n)) for r in evals] for n in names], float)  # None -> nan
    _heatmap(fig, ax, m, names, its, vmin=0, vmax=100, annotate=len(its) <= 16, cbar_label='IoU (%)')
    last = m[:, -1]
    low = [n for n, v in zip(names, last) if np.isfinite(v) and v < COLLAPSE_IOU]
    title = 'per-class IoU (%), classes x evaluations'
    if low:
        listed = ', '.join(low[:8]) + (', ...' if len(low) > 8 else '')
        title += f'\nbelow {COLLAPSE_IOU:g} at iteration {its[-1]}: {listed}'
    ax.set_title(title, fontsize=10)


def _draw_pseudo_classes(fig, ax, records, names, LogNorm):
    its = [r['iteration'] for r in records]
    m = np.array([[_number(r.get(PSEUDO_CLASS_PREFIX + n)) for r in records] for n in names], float)
    m = np.where(np.isnan(m), 0.0, m) * 100  # a class missing from a record that has others: share 0
    floor = 1e-2  # % ; shares below it (and 0) get the lowest colour of the log scale
    _heatmap(fig, ax, np.maximum(m, floor), names, its, norm=LogNorm(vmin=floor, vmax=100), cmap='viridis',
             cbar_label='share of pseudo-labelled pixels (%)')
    ax.set_title('pseudo-label classes, share of pixels (%, log scale)', fontsize=10)


def report_panels(train, evals):
    """Names of the panels write_report draws for these records, in order. Losses: one panel per
    pass; learning rate, pseudo-label confidence and pseudo-label classes when logged; the mIoU
    curve and the per-class IoU heat map always (saying 'no evaluation yet' without data)."""
    panels = [f'loss: {g}' for g in _loss_groups(train)]
    if any(_number(r.get('lr')) is not None for r in train):
        panels.append('learning rate')
    if any(_number(r.get('pseudo_ratio')) is not None for r in train):
        panels.append('pseudo-label confidence')
    panels += ['target mIoU', 'per-class IoU']
    if any(k.startswith(PSEUDO_CLASS_PREFIX) for r in train for k in r):
        panels.append('pseudo-label classes')
    return panels


def write_report(work_dir, path=None, log_path=None, dpi=100):
    """Draw the run report of `work_dir` from its log.jsonl into `path` (default work_dir/report.png),
    written atomically. Returns the names of the panels drawn (see report_panels).

    Top: small panels, three per row (losses per pass, learning rate, pseudo-label confidence, the
    mIoU curve). Bottom: the per-class IoU heat map (classes x evaluations; a collapsed class is a
    red row and is named in the title) and, when logged, the pseudo-label class shares (classes x
    log intervals) with the same class rows. Raises MissingPackageError without matplotlib and
    FileNotFoundError without a log.
    """
    _, Figure, FigureCanvasAgg, LogNorm = _import_matplotlib()
    log_path = log_path or os.path.join(work_dir, LOG_NAME)
    path = path or os.path.join(work_dir, REPORT_NAME)
    if not os.path.isfile(log_path):
        raise FileNotFoundError(f'no training log {log_path}: is {work_dir} a run folder (train.work_dir)?')
    train, evals = read_log(log_path)
    panels = report_panels(train, evals)
    groups = _loss_groups(train)
    small = [p for p in panels if p not in ('per-class IoU', 'pseudo-label classes')]
    pseudo = 'pseudo-label classes' in panels

    iou_names = _class_order(_unique(n for r in evals for n in (r.get('IoU') or {})))
    pseudo_names = _class_order(_unique(k[len(PSEUDO_CLASS_PREFIX):] for r in train for k in r
                                        if k.startswith(PSEUDO_CLASS_PREFIX)))
    ncol, row_h = 3, 3.0
    nrow = math.ceil(len(small) / ncol)
    heat_h = max(3.5, 0.22 * max(len(iou_names), len(pseudo_names), 1) + 1.6)
    fig = Figure(figsize=(16, nrow * row_h + heat_h + 0.5), dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(nrow + 1, 2 * ncol, height_ratios=[row_h] * nrow + [heat_h])
    fig.suptitle(f'{os.path.abspath(work_dir)}  (log up to iteration '
                 f'{max([r["iteration"] for r in train + evals], default=0)})', fontsize=11)
    for i, name in enumerate(small):
        ax = fig.add_subplot(gs[i // ncol, 2 * (i % ncol):2 * (i % ncol) + 2])
        if name.startswith('loss: '):
            _draw_curves(ax, name, train, groups[name[len('loss: '):]])
        elif name == 'learning rate':
            _draw_curves(ax, 'learning rate (encoder)', train, ['lr'], legend=False)
            ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
        elif name == 'pseudo-label confidence':
            _draw_curves(ax, 'pseudo-label confidence (share of pixels >= threshold)', train, ['pseudo_ratio'],
                         legend=False)
        elif name == 'target mIoU':
            _draw_miou(ax, evals)
    ax = fig.add_subplot(gs[nrow, :ncol] if pseudo else gs[nrow, :])
    _draw_iou_heatmap(fig, ax, evals)
    if pseudo:
        records = [r for r in train if any(k.startswith(PSEUDO_CLASS_PREFIX) for k in r)]
        _draw_pseudo_classes(fig, fig.add_subplot(gs[nrow, ncol:]), records, pseudo_names, LogNorm)
    mic_runtime.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=dpi))
    return panels


# --------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------

def _tag(key):
    """log key -> TensorBoard tag: '<pass>.loss_x' -> '<pass>/loss_x', 'pseudo_class.traffic light' ->
    'pseudo_class/traffic_light', plain keys (lr, pseudo_ratio, time_per_iter, memory_mb) -> 'train/<key>'."""
    key = key.replace(' ', '_')
    return key.replace('.', '/', 1) if '.' in key else f'train/{key}'


class TensorBoardWriter:
    """TensorBoard event files of a training run (train.tensorboard=true), on rank 0.

    Sections: train/ (lr, pseudo_ratio, time_per_iter, memory_mb, ...), one per pass with its losses
    (source/, mix/, masked/), pseudo_class/ (pseudo-label class shares), eval/ (mIoU, aAcc, mIoU16,
    best_mIoU), IoU/ (per class), lr/ (every optimizer param group), and images (debug grids).
    purge_step: on resume, the iteration resumed from; events of the earlier run at or after it
    are discarded by TensorBoard.
    """

    def __init__(self, log_dir, purge_step=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing('tensorboard', 'train.tensorboard=true (TensorBoard logging)') from None
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def add_record(self, record):
        """Every number of a log.jsonl record (training or evaluation) at step record['iteration']."""
        step = record['iteration']
        if 'eval' in record:
            for k, v in (record.get('eval') or {}).items():
                if k not in ('num_pixels', 'num_images') and _number(v) is not None:
                    self.writer.add_scalar(f'eval/{k}', _number(v), step)
            for name, v in (record.get('IoU') or {}).items():
                if _number(v) is not None:
                    self.writer.add_scalar(_tag(f'IoU.{name}'), _number(v), step)
            if _number(record.get('best_mIoU')) is not None:
                self.writer.add_scalar('eval/best_mIoU', _number(record['best_mIoU']), step)
            return
        for k, v in record.items():
            if k != 'iteration' and _number(v) is not None:
                self.writer.add_scalar(_tag(k), _number(v), step)

    def add_learning_rates(self, optimizer, step):
        """The learning rate of every param group: lr/<group 'name'> or lr/group<i>."""
        for i, g in enumerate(optimizer.param_groups):
            self.writer.add_scalar(f'lr/{g.get("name", f"group{i}")}', float(g['lr']), step)

    def add_image(self, tag, image, step):
        """An image: a file path (a debug grid PNG), a uint8 array [H,W,3] / [H,W], or a tensor [3,H,W]."""
        if isinstance(image, (str, os.PathLike)):
            image = mic_data.read_image(image)
        if hasattr(image, 'detach'):  # torch tensor [C,H,W]
            self.writer.add_image(tag, image.detach().cpu(), step, dataformats='CHW')
            return
        image = np.asarray(image)
        self.writer.add_image(tag, image, step, dataformats='HWC' if image.ndim == 3 else 'HW')

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------
# Pseudo-label class shares (logged by the training step)
# --------------------------------------------------------------------------

def pseudo_class_shares(pseudo_label, valid=None, num_classes=19):
    """Share of each class among the pseudo-labelled pixels: pseudo_label [B,H,W] (train ids), valid
    [B,1,H,W] or [B,H,W] (the pseudo-label margins; None: all pixels). Returns a float tensor [K]
    summing to 1 (0s when no pixel is valid), on the labels' device, without host synchronisation."""
    import torch
    label = pseudo_label.reshape(-1).long()
    weight = torch.ones_like(label, dtype=torch.float32) if valid is None else valid.reshape(-1).float()
    inside = label < num_classes  # ignore (255) never comes from an argmax, but be safe
    counts = torch.zeros(num_classes, dtype=torch.float32, device=label.device)
    counts.scatter_add_(0, torch.where(inside, label, 0), weight * inside)
    return counts / counts.sum().clamp(min=1e-12)


def pseudo_class_logs(pseudo_label, valid=None, class_names=mic_data.CLASSES):
    """{'pseudo_class.<name>': 0-d tensor} for the training step's logs (averaged over the log
    interval like the losses, then written to log.jsonl). class_names: one per class, in train-id
    order (data.classes: mic_data.class_table(cfg.data, cfg.model.num_classes).names)."""
    shares = pseudo_class_shares(pseudo_label, valid, len(class_names))
    return {PSEUDO_CLASS_PREFIX + name: s for name, s in zip(class_names, shares.unbind())}


# --------------------------------------------------------------------------
# Debug grids of the training step (train.debug_img_interval)
# --------------------------------------------------------------------------

def save_debug_grid(debug, path, mean, std, max_width=1536, palette=None):
    """One row per sample, titled columns: source image and label, target image, pseudo-label, mixed
    image and label, the student's prediction on it, masked image, the prediction on that. Labels in
    `palette` (the colours of data.classes; default Cityscapes')."""
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    def image(x):
        x = (x.float() * std[0] + mean[0]).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
        return mic_data.display_rgb(x)  # (the first three bands)

    def label(x):
        return mic_data.colorize(x.reshape(x.shape[-2:]).cpu().numpy().astype(np.uint8), palette)

    def pred(logits, size):
        return label(F.interpolate(logits[None].float(), size=size)[0].argmax(0))
    B, size = debug['source'].shape[0], tuple(debug['source'].shape[2:])
    columns = [('source', lambda i: image(debug['source'][i])), ('src label', lambda i: label(debug['source_gt'][i])),
               ('target', lambda i: image(debug['target'][i]))]
    if 'pseudo_label' in debug:
        columns += [('pseudo', lambda i: label(debug['pseudo_label'][i])),
                    ('mixed', lambda i: image(debug['mixed'][i])),
                    ('mix label', lambda i: label(debug['mixed_label'][i])),
                    ('mix pred', lambda i: pred(debug['mix_pred'][i], size))]
    if 'masked' in debug:
        columns += [('masked', lambda i: image(debug['masked'][i])),
                    ('mask pred', lambda i: pred(debug['masked_pred'][i], size))]
    rows = np.concatenate([np.concatenate([fn(i) for _, fn in columns], axis=1) for i in range(B)], axis=0)
    header = Image.new('RGB', (rows.shape[1], 14), 'white')
    draw = ImageDraw.Draw(header)
    for j, (title, _) in enumerate(columns):
        draw.text((j * size[1] + 2, 1), title, fill='black')
    grid = Image.new('RGB', (rows.shape[1], rows.shape[0] + 14))
    grid.paste(header, (0, 0))
    grid.paste(Image.fromarray(rows), (0, 14))
    if grid.width > max_width:
        grid = grid.resize((max_width, round(grid.height * max_width / grid.width)), Image.BILINEAR)
    mic_data.save_png(path, np.asarray(grid))


# --------------------------------------------------------------------------
# Progress: a tqdm bar on a terminal, plain lines elsewhere
# --------------------------------------------------------------------------

def total_loss(record):
    """Sum of a training record's losses (keys whose last dotted part starts with 'loss')."""
    return sum(v for k, v in record.items() if k.rpartition('.')[2].startswith('loss') and _number(v) is not None)


def format_eta(seconds):
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def progress_line(record, total, s_per_iter=None):
    """'iteration 1200/40000  loss 1.234  lr 5.90e-05  0.412 s/it  ETA 4:26:01  mem 10234 MB'.

    s/it is the record's time_per_iter; the ETA is (total - iteration) x s_per_iter (default:
    time_per_iter). Fields the record lacks are left out."""
    it = record['iteration']
    parts = [f'iteration {it}/{total}']
    if any(k.rpartition('.')[2].startswith('loss') for k in record):
        parts.append(f'loss {total_loss(record):.3f}')
    if _number(record.get('lr')) is not None:
        parts.append(f'lr {record["lr"]:.2e}')
    t = _number(record.get('time_per_iter'))
    if t is not None:
        parts.append(f'{t:.3f} s/it')
        parts.append(f'ETA {format_eta((total - it) * (s_per_iter if s_per_iter is not None else t))}')
    if _number(record.get('memory_mb')) is not None:
        parts.append(f'mem {record["memory_mb"]:.0f} MB')
    return '  '.join(parts)


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Training progress on `stream` (default stdout).

    On a terminal: a tqdm bar, advanced by update() every iteration, with the loss and lr of the
    last log record. Otherwise (a cluster job's log file, CI, a pipe): no bar and no carriage
    returns, one progress_line() per log() call, i.e. per log interval; the ETA uses the median
    s/iteration of the last 10 intervals (robust to an interval that held an evaluation).
    enabled=False (ranks other than 0) prints nothing; plain=True/False forces the mode.
    """

    def __init__(self, total, initial=0, stream=None, enabled=True, plain=None, desc='train'):
        self.total, self.enabled = total, enabled
        self.stream = stream if stream is not None else sys.stdout
        self.plain = not _isatty(self.stream) if plain is None else plain
        self.times = []
        self.bar = None
        if enabled and not self.plain:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True, desc=desc)

    def update(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record):
        """A training record of log.jsonl (at every log interval)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{total_loss(record):.3f}', lr=f'{record.get("lr", 0):.2e}', refresh=False)
            return
        t = _number(record.get('time_per_iter'))
        if t is not None:
            self.times = (self.times + [t])[-10:]
        eta_rate = statistics.median(self.times) if self.times else None
        print(progress_line(record, self.total, eta_rate), file=self.stream, flush=True)

    def write(self, message):
        """A message line (an evaluation result) that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PlainProgress:
    """tqdm's iteration interface for a log file (CI, a cluster job): one plain line at each tenth of
    the work and at the end, no carriage returns."""

    def __init__(self, iterable, total, desc, unit, stream):
        self.iterable, self.total, self.desc, self.unit, self.stream = iterable, total, desc, unit, stream

    def __iter__(self):
        start, done = time.monotonic(), 0
        step = max(1, -(-(self.total or 0) // 10))
        for item in self.iterable:
            yield item
            done += 1
            if done % step == 0 or done == self.total:
                total = f'/{self.total}' if self.total else ''
                print(f'{self.desc}: {done}{total} {self.unit}s, {time.monotonic() - start:.1f} s',
                      file=self.stream, flush=True)

    def close(self):
        pass


def progress_bar(iterable, desc, disable=False, total=None, unit='it', stream=None):
    """Progress over `iterable`: a tqdm bar on a terminal, plain lines elsewhere (PlainProgress, as
    training's Progress does), nothing when disabled. Both have close()."""
    stream = stream if stream is not None else sys.stderr
    total = total if total is not None else (len(iterable) if hasattr(iterable, '__len__') else None)
    if disable or not _isatty(stream):
        return PlainProgress(iterable, total, desc, unit, stream) if not disable else _Silent(iterable)
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)


class _Silent(PlainProgress):
    def __init__(self, iterable):
        super().__init__(iterable, None, '', '', None)

    def __iter__(self):
        return iter(self.iterable)


# --------------------------------------------------------------------------
# The best evaluation and metrics.json
# --------------------------------------------------------------------------

BEST_METRIC = 'mIoU'  # the evaluation that decides best.pth; higher is better
BEST_NAME = 'best.pth'  # in the run folder, beside latest.pth


def is_best(metrics, best, key=BEST_METRIC):
    """True when the evaluation `metrics` beats `best` (the best evaluation so far, or None) on `key`
    (higher is better). A tie keeps the earlier one; an evaluation without the metric is never best."""
    value = _number(metrics.get(key))
    if value is None:
        return False
    old = None if best is None else _number(best.get(key))
    return old is None or value > old


def metrics_record(last, best=None):
    """metrics.json: the last evaluation at the top level (what summaries average by default, as the
    paper reports the last), and under 'best' the best one. Each evaluation is a dict of metrics with
    'iteration' and 'checkpoint' (latest.pth / best.pth) added by the caller."""
    record = dict(last)
    if best is not None:
        record['best'] = {k: v for k, v in best.items() if k != 'best'}
    return record


# --------------------------------------------------------------------------
# Run folders from folder names or glob patterns (this command line and mic_summary's --summary)
# --------------------------------------------------------------------------

def _natural_key(path):
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', path)]


def find_runs(patterns):
    """(run folders, patterns that matched nothing): each pattern is a folder, a glob of folders or
    a metrics.json file (its folder); matched files that are not metrics.json are ignored."""
    runs, unmatched, seen = [], [], set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern), key=_natural_key) if glob.has_magic(pattern) else \
            ([pattern] if os.path.exists(pattern) else [])
        folders = [m for m in matches if os.path.isdir(m)] + \
                  [os.path.dirname(m) or '.' for m in matches if os.path.basename(m) == METRICS_NAME]
        if not folders:
            unmatched.append(pattern)
        for folder in folders:
            folder = os.path.normpath(folder)
            if os.path.realpath(folder) not in seen:
                seen.add(os.path.realpath(folder))
                runs.append(folder)
    return runs, unmatched


# --------------------------------------------------------------------------
# Command line: redraw report.png
# --------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(
        description=f'(Re)draw {REPORT_NAME} of run folders from their {LOG_NAME} (the summary over seeds: '
                    "python mic_eval.py --summary 'work_dirs/gta2cs_s*').")
    parser.add_argument('runs', nargs='+', metavar='RUN', help='run folders (train.work_dir) or glob patterns')
    args = parser.parse_args(argv)
    folders, unmatched = find_runs(args.runs)
    status = 0
    for p in unmatched:
        print(f'error: no folder matches {p!r}', file=sys.stderr)
        status = 2
    for folder in folders:
        try:
            panels = write_report(folder)
        except (MissingPackageError, FileNotFoundError) as e:
            print(f'error: {e}', file=sys.stderr)
            status = 2
            continue
        print(f'wrote {os.path.join(folder, REPORT_NAME)} ({len(panels)} panels: {", ".join(panels)})')
    if status:
        sys.exit(status)


if __name__ == '__main__':
    main()
