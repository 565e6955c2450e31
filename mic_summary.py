"""Summaries over finished runs (seeds): python mic_eval.py --summary 'work_dirs/gta2cs_s*'.

mIoU, mIoU16, aAcc and per-class IoU of the run folders' metrics.json (the last evaluation of each
run, or with which='best' its best one) as mean ± sample standard deviation (n - 1), a markdown
table like the paper's (format_summary) and its JSON (summary_main --summary-json); folders without
metrics.json are listed as unfinished, runs whose config.yaml differ (other than seeds, folders and
logging) are refused.

    summary = summarize(['work_dirs/gta2cs_s*'], which='last')   # {'runs', 'mean', 'std', 'count', ...}
    print(format_summary(summary))

Imports: the standard library, mic_runtime, mic_report (log reading, run folders) and mic_config
(config.yaml, where configs are compared); mic_eval imports this for --summary, mic_report does not.
"""
import json
import os
import re
import statistics
import sys

import mic_runtime
from mic_report import LOG_NAME, METRICS_NAME, _class_order, _number, _unique, find_runs, read_log

STD_DEFINITION = 'sample standard deviation (n - 1 in the denominator); null with fewer than 2 values'


class ReportError(Exception):
    """A usage error of the reports (no run folder matches, ...); the message says what to do."""


def pick_evaluation(metrics, which):
    """The evaluation of a metrics.json to summarise: 'last' (the top level) or 'best' (None when the
    file holds no best evaluation, written before best checkpoints were kept)."""
    if which == 'best':
        best = metrics.get('best')
        return best if isinstance(best, dict) else None
    return {k: v for k, v in metrics.items() if k != 'best'}


def _unfinished_reason(folder):
    log = os.path.join(folder, LOG_NAME)
    if os.path.isfile(log):
        train, evals = read_log(log)
        last = max([r['iteration'] for r in train + evals], default=None)
        return f'no {METRICS_NAME}' + (f' (logged up to iteration {last})' if last is not None else '')
    if os.path.isfile(os.path.join(folder, 'latest.pth')):
        return f'no {METRICS_NAME} (holds latest.pth: evaluate it with mic_eval.py --ckpt)'
    return f'no {METRICS_NAME}, no {LOG_NAME}: not a run folder?'


def _stats(values):
    """(mean, sample std or None, count) of the numbers in `values` (None skipped)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _read_run(folder, which):
    """(run row, None) of a finished run folder, or (None, why it is not in the statistics)."""
    path = os.path.join(folder, METRICS_NAME)
    if not os.path.isfile(path):
        return None, _unfinished_reason(folder)
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        return None, f'{METRICS_NAME} unreadable: {e}'
    if not isinstance(m, dict) or _number(m.get('mIoU')) is None:
        return None, f'{METRICS_NAME} holds no mIoU'
    picked = pick_evaluation(m, which)
    if picked is None or _number(picked.get('mIoU')) is None:
        return None, f'{METRICS_NAME} holds no best evaluation (written before best checkpoints were kept)'
    run = {'run': folder, 'mIoU': picked['mIoU']}
    for k in ('mIoU16', 'aAcc', 'iteration'):
        if k in picked:
            run[k] = picked[k]
    run['IoU'] = dict(picked.get('IoU') or {})
    for k in ('split', 'dataset_type'):
        if k in m:
            run[k] = m[k]
    return run, None


# config keys in which the runs of one experiment may differ (seeds, places, logging, speed)
SUMMARY_FREE_KEYS = re.compile(r'^(train\.(seed|work_dir|device|tensorboard|log_interval|debug_img_interval|'
                               r'ckpt_interval|ckpt_minutes|eval_interval)|data\.num_workers|.*\.root)$')


def _flat(tree, prefix=''):
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


def config_differences(folders):
    """{key: [value per folder]} of the config.yaml entries in which the run folders differ (other
    than SUMMARY_FREE_KEYS), and the folders without a readable config.yaml."""
    import mic_config
    configs, missing = {}, []
    for folder in folders:
        try:
            configs[folder] = _flat(mic_config.read_yaml(os.path.join(folder, 'config.yaml'), 'config.yaml'))
        except (mic_config.ConfigError, OSError):
            missing.append(folder)
    keys = sorted({k for c in configs.values() for k in c if not SUMMARY_FREE_KEYS.match(k)})
    diffs = {k: [c.get(k) for c in configs.values()] for k in keys}
    return {k: v for k, v in diffs.items() if any(x != v[0] for x in v)}, missing


def summarize(patterns, which='last'):
    """Mean and sample standard deviation (n - 1) over the finished runs matching `patterns`.

    which: the evaluation of each run, 'last' (default, as the paper reports) or 'best' (the best
    evaluation during training: chosen on the evaluated split itself, so optimistic).
    Returns {'runs': [{'run', 'mIoU', ['mIoU16'], 'aAcc', 'IoU', ['iteration']}], 'unfinished': [{'run',
    'reason'}], 'unmatched': [pattern], 'n': number of finished runs, 'which', 'mean', 'std', 'count':
    {'mIoU', ['mIoU16'], 'aAcc', 'IoU': {class: value}}, 'std_definition', 'warnings'}. A class or metric
    that is null in a run (absent from its labels and predictions) is left out of that class's statistics.
    Raises ReportError when no pattern matches a folder, and when the finished runs have different
    configs (config.yaml; seeds, folders and logging may differ): a mean over them would mean nothing.
    """
    folders, unmatched = find_runs(patterns)
    if not folders:
        raise ReportError(f'no run folder matches {" ".join(repr(p) for p in patterns)}: pass run folders '
                          f"(train.work_dir) or quoted glob patterns, e.g. --summary 'work_dirs/gta2cs_s*'")
    runs, unfinished = [], []
    for folder in folders:
        run, reason = _read_run(folder, which)
        if run is None:
            unfinished.append({'run': folder, 'reason': reason})
        else:
            runs.append(run)
    diffs, no_config = config_differences([r['run'] for r in runs])
    if diffs:
        listed = '; '.join(f'{k}: {", ".join(map(str, v))}' for k, v in list(diffs.items())[:5])
        raise ReportError(f'the runs have different configs ({listed}' + (' ...' if len(diffs) > 5 else '') +
                          f', in the order {", ".join(r["run"] for r in runs)}): summarise the runs of one '
                          'config (its seeds) at a time')
    classes = _class_order(_unique(n for r in runs for n in r['IoU']))
    metrics = ['mIoU'] + [k for k in ('mIoU16', 'aAcc') if any(k in r for r in runs)]
    mean, std, count = {}, {}, {}
    for k in metrics:
        mean[k], std[k], count[k] = _stats([_number(r.get(k)) for r in runs])
    mean['IoU'], std['IoU'], count['IoU'] = {}, {}, {}
    for c in classes:
        mean['IoU'][c], std['IoU'][c], count['IoU'][c] = _stats([_number(r['IoU'].get(c)) for r in runs])
    # (metrics.json files written by hand or by mic_eval.py have no config.yaml beside them: nothing to compare)
    warnings = [f'{f}: no config.yaml, its config was not compared with the others' for f in no_config
                if len(no_config) < len(runs)]
    for k in ('split', 'dataset_type'):
        values = _unique(str(r[k]) for r in runs if k in r)
        if len(values) > 1:
            warnings.append(f'the runs were evaluated on different {k}s: {", ".join(values)}')
    if any(k in r for r in runs for k in ('mIoU16',)) and not all('mIoU16' in r for r in runs):
        warnings.append('only some runs hold mIoU16 (Synthia sources): are these runs of one experiment?')
    return {'runs': runs, 'unfinished': unfinished, 'unmatched': unmatched, 'n': len(runs), 'which': which,
            'mean': mean, 'std': std, 'count': count, 'std_definition': STD_DEFINITION, 'warnings': warnings}


def _cell(mean, std=None):
    if mean is None:
        return '–'
    return f'{mean:.1f}' if std is None else f'{mean:.1f} ± {std:.1f}'


def format_summary(summary):
    """The summary as a markdown table like the paper's: a row per run, then mean ± std; classes
    as columns, then mIoU (and mIoU16); IoU in %, one decimal. Notes below the table."""
    runs, mean, std = summary['runs'], summary['mean'], summary['std']
    lines = []
    if runs:
        classes = list(mean['IoU'])
        metrics = [k for k in ('mIoU', 'mIoU16') if k in mean]
        header = ['run'] + classes + metrics
        lines += ['| ' + ' | '.join(header) + ' |', '|---' + '|--:' * (len(header) - 1) + '|']
        for r in runs:
            cells = [r['run']] + [_cell(r['IoU'].get(c)) for c in classes] + [_cell(r.get(k)) for k in metrics]
            lines.append('| ' + ' | '.join(cells) + ' |')
        n = summary['n']
        cells = [f'mean ± std (n={n})' if n > 1 else 'mean (n=1)']
        cells += [_cell(mean['IoU'][c], std['IoU'][c]) for c in classes]
        cells += [_cell(mean[k], std[k]) for k in metrics]
        lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
        note = (f'IoU and mIoU in %: mean ± sample standard deviation (n - 1 in the denominator) over {n} runs'
                if n > 1 else 'IoU and mIoU in %: one finished run, no standard deviation (it needs 2 or more)')
        if 'mIoU16' in mean:
            note += '; mIoU16 = mean over the 16 Synthia classes'
        if summary.get('which') == 'best':
            note += ('; the best evaluation of each run (chosen on this very split, so optimistic; the paper '
                     'reports the last)')
        else:
            note += '; the last evaluation of each run (as the paper reports)'
        if any(c < n for c in summary['count']['IoU'].values()):
            note += '; – = absent from labels and predictions (left out of the mean)'
        lines.append(note + '.')
    else:
        lines.append('no finished run (no folder holds a metrics.json with an mIoU)')
    for u in summary['unfinished']:
        lines.append(f'unfinished, not in the statistics: {u["run"]} ({u["reason"]})')
    for p in summary['unmatched']:
        lines.append(f'no folder matches {p!r}')
    for w in summary['warnings']:
        lines.append(f'warning: {w}')
    return '\n'.join(lines)


def summary_main(patterns, json_path=None, stream=None, which='last'):
    """The --summary command: prints the markdown table of the runs' `which` evaluation ('last' or
    'best'), writes JSON to json_path (atomically) when given, returns the summary. Errors: a message
    and exit status 2."""
    stream = stream if stream is not None else sys.stdout
    try:
        summary = summarize(patterns, which)
    except ReportError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_summary(summary), file=stream, flush=True)
    if json_path:
        mic_runtime.save_json(json_path, summary)
        print(f'wrote {json_path}', file=stream, flush=True)
    return summary
