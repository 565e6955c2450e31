"""The paper's experiments by ID: configs/experiments.yaml expanded into runs and commands.

An experiment is a title, its seeds and its runs (a config file plus `--opt` overrides, and the
paper's number), or a grid of overrides expanded in the original's order; each run and seed
becomes one training command with train.seed and train.work_dir=work_dirs/exp<ID>/<run>_s<seed>.

    python mic_train.py --exp 81 --list          # the commands of experiment 81
    from mic_experiments import experiment_runs
    for name, cfg_path, overrides in experiment_runs(81): ...

Imports mic_config (the table's overrides are checked with its parser) and yaml.
"""
import itertools
import os
import re
import shlex

from mic_config import ConfigError, parse_override, read_yaml


_EXPERIMENT_KEYS = ('title', 'seeds', 'runs', 'grid', 'cfg', 'name', 'opt', 'skip', 'reuses')
_RUN_KEYS = ('name', 'cfg', 'opt', 'paper')
_RUN_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
_SET_BY_EXPANSION = ('train.seed', 'train.work_dir')  # experiment_runs adds them per run


def default_experiments_path():
    """configs/experiments.yaml beside this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'experiments.yaml')


def _experiment_error(where, message):
    return ConfigError(f'{where}: {message}')


def _check_keys(entry, allowed, where):
    if not isinstance(entry, dict):
        raise _experiment_error(where, f'expected a mapping, got {entry!r}')
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise _experiment_error(where, f'unknown key {unknown[0]!r}; valid keys: {", ".join(allowed)}')


def _check_overrides(opts, where):
    if opts is None:
        return []
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise _experiment_error(where, f"'opt' must be a list of 'key.sub=value' strings, got {opts!r}")
    for text in opts:
        key, _ = parse_override(text)
        if key in _SET_BY_EXPANSION:
            raise _experiment_error(where, f'{key} is set per run by the expansion (seed, work_dirs/exp<ID>/<run>)')
    return list(opts)


def _resolve_cfg_path(cfg, root, where):
    if not isinstance(cfg, str):
        raise _experiment_error(where, f"'cfg' must be a path, got {cfg!r}")
    full = cfg if os.path.isabs(cfg) else os.path.join(root, cfg)
    if not os.path.isfile(full):
        raise _experiment_error(where, f'config file {cfg} does not exist')
    rel = os.path.relpath(full)
    return full if rel.startswith(os.pardir) else rel  # as short as it gets from the working directory


def _grid_runs(exp, where, root):
    """The runs of a `grid` experiment: the cartesian product of the override values, first key outermost."""
    grid, template = exp['grid'], exp.get('name')
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise _experiment_error(where, "'grid' must map override keys to non-empty lists of values")
    if not isinstance(template, str):
        raise _experiment_error(where, "a grid needs 'name', a template such as run_b{mask_block_size}")
    fields = {key.split('.')[-1]: key for key in grid}
    if len(fields) != len(grid):
        raise _experiment_error(where, 'the last parts of the grid keys must differ (they name the template fields)')
    skip = exp.get('skip') or []
    for s in skip:
        if not isinstance(s, dict) or set(s) - set(grid):
            raise _experiment_error(where, f"'skip' entries map grid keys to values, got {s!r}")
    cfg = _resolve_cfg_path(exp.get('cfg'), root, where)
    common = _check_overrides(exp.get('opt'), where)
    runs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        if any(all(point[k] == v for k, v in s.items()) for s in skip):
            continue
        try:
            name = template.format(**{f: point[k] for f, k in fields.items()})
        except (KeyError, IndexError, ValueError) as e:
            raise _experiment_error(where, f'name template {template!r}: {e!r} is not a grid key\'s last part '
                                           f'({", ".join(fields)})') from None
        opts = [f'{k}={_opt_value(v)}' for k, v in point.items()]
        runs.append({'name': name, 'cfg': cfg, 'opt': common + opts, 'paper': None})
    return runs


def _opt_value(value):
    """A value as --opt takes it (YAML flow style): 0.7, null, [30, 240, 30, 30], separatetrg."""
    import yaml
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
    return text.split('\n...')[0].strip()  # scalars end with a document end marker


def load_experiments(path=None):
    """The experiment table (default: configs/experiments.yaml) as {id: experiment}, checked.

    An experiment: {'title': str, 'seeds': [int], 'runs': [{'name', 'cfg', 'opt', 'paper'}], 'reuses': str
    or None}; a grid is expanded into its runs here, in the original's order; seeds are not. 'cfg' is a path
    relative to the working directory when it lies below it (the table's paths are relative to the folder
    above configs/). Raises ConfigError naming the experiment and the key.
    """
    path = path or default_experiments_path()
    table = read_yaml(path, f'experiment table {path}')
    if not isinstance(table, dict):
        raise ConfigError(f'experiment table {path} must map experiment ids to experiments')
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    out = {}
    for exp_id, exp in table.items():
        where = f'{path}: experiment {exp_id}'
        if isinstance(exp_id, bool) or not (isinstance(exp_id, int) or isinstance(exp_id, str)
                                             and _RUN_NAME.fullmatch(exp_id) and not exp_id.isdigit()):
            raise _experiment_error(where, "experiment ids are the paper's numbers or names such as 'demo'")
        _check_keys(exp, _EXPERIMENT_KEYS, where)
        seeds = exp.get('seeds')
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise _experiment_error(where, f"'seeds' must be a list of distinct integers >= 0, got {seeds!r}")
        if ('runs' in exp) == ('grid' in exp):
            raise _experiment_error(where, "give either 'runs' or 'grid'")
        if 'grid' in exp:
            runs = _grid_runs(exp, where, root)
        else:
            extra = [k for k in ('cfg', 'name', 'opt', 'skip') if k in exp]
            if extra:
                raise _experiment_error(where, f"{extra[0]!r} belongs to a grid; a run list sets it per run")
            if not isinstance(exp['runs'], list) or not exp['runs']:
                raise _experiment_error(where, "'runs' must be a non-empty list")
            runs = []
            for i, run in enumerate(exp['runs']):
                run_where = f'{where}, run {i}'
                _check_keys(run, _RUN_KEYS, run_where)
                paper = run.get('paper')
                if paper is not None and (not isinstance(paper, (int, float)) or isinstance(paper, bool)):
                    raise _experiment_error(run_where, f"'paper' must be a number or null, got {paper!r}")
                runs.append({'name': run.get('name'), 'cfg': _resolve_cfg_path(run.get('cfg'), root, run_where),
                             'opt': _check_overrides(run.get('opt'), run_where), 'paper': paper})
        names = [r['name'] for r in runs]
        for name in names:
            if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
                raise _experiment_error(where, f'run name {name!r}: use letters, digits, _ . - (a folder name)')
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise _experiment_error(where, f'run names must be unique: {", ".join(twice)}')
        out[exp_id] = {'title': str(exp.get('title', '')), 'seeds': list(seeds), 'runs': runs,
                       'reuses': exp.get('reuses')}
    return out


def experiment_key(exp_id):
    """The table's key of an experiment id as typed: 81 and '81' -> 81, 'demo' -> 'demo'."""
    text = str(exp_id)
    return int(text) if text.isdigit() else text


def experiment_folder(exp_id):
    """Where the runs of an experiment go below the work root: exp81 for the paper's, demo for 'demo'."""
    key = experiment_key(exp_id)
    return f'exp{key}' if isinstance(key, int) else key


def experiment(exp_id, path=None):
    """One experiment of load_experiments; exp_id: an int, its text ('81') or a name ('demo')."""
    table = load_experiments(path)
    key = experiment_key(exp_id)
    if key not in table:
        raise ConfigError(f'unknown experiment {exp_id!r}; the experiments are {", ".join(map(str, table))}')
    return table[key]


def experiment_runs(exp_id, path=None, work_root='work_dirs'):
    """[(run_name, cfg_path, overrides)] of an experiment, one per run and seed in the original's order
    (runs outer, seeds inner). overrides end with train.seed and train.work_dir
    (<work_root>/exp<ID>/<run_name>), so load_config(cfg_path, overrides) is the run's config."""
    exp = experiment(exp_id, path)
    out = []
    for run in exp['runs']:
        for seed in exp['seeds']:
            name = f"{run['name']}_s{seed}"
            out.append((name, run['cfg'], [*run['opt'], f'train.seed={seed}',
                                            f'train.work_dir={work_root}/{experiment_folder(exp_id)}/{name}']))
    return out


def experiment_commands(exp_id, path=None, launcher='python mic_train.py', work_root='work_dirs'):
    """One shell command per run of an experiment (what `mic_train.py --exp ID --list` prints), e.g.
    python mic_train.py --cfg configs/gta2cs_dlv2_minent.yaml --opt train.seed=0 train.work_dir=...
    launcher: the program, e.g. 'torchrun --standalone --nproc_per_node=4 mic_train.py'."""
    return [f'{launcher} --cfg {shlex.quote(cfg)} --opt {" ".join(shlex.quote(o) for o in opts)}'
            for _, cfg, opts in experiment_runs(exp_id, path, work_root)]
