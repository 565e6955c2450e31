"""configs/experiments.yaml: the paper's experiments (the original's IDs 80-85) and the demo study as runs.

The counts and settings below were checked by hand against the original's seg/experiments.py;
benchmarks/experiments_vs_original.py compares every run with the original's generated configs.
"""
import itertools
import shlex

import pytest

from mic_config import ConfigError, load_config
from mic_experiments import experiment, experiment_commands, experiment_runs, load_experiments

COUNTS = {80: 12, 81: 18, 82: 12, 83: 12, 84: 45, 85: 3}  # len(generate_experiment_cfgs(ID)) in the original


def resolved(exp_id):
    """{run name: resolved config} of an experiment, in order."""
    return {name: load_config(cfg, opts) for name, cfg, opts in experiment_runs(exp_id)}


def test_run_counts_and_seeds_match_the_original():
    assert {i: len(experiment_runs(i)) for i in load_experiments() if isinstance(i, int)} == COUNTS
    for exp_id in COUNTS:  # every run with seeds 0, 1, 2, seeds inner as in the original
        seeds = [load_config(cfg, opts).train.seed for _, cfg, opts in experiment_runs(exp_id)]
        assert seeds == [0, 1, 2] * (COUNTS[exp_id] // 3)


def test_every_run_resolves_with_a_unique_folder():
    dirs = []
    for exp_id in COUNTS:
        for name, cfg, opts in experiment_runs(exp_id):
            c = load_config(cfg, opts)
            assert c.train.work_dir == f'work_dirs/exp{exp_id}/{name}' and name.endswith(f'_s{c.train.seed}')
            dirs.append(c.train.work_dir)
    assert len(set(dirs)) == len(dirs) == sum(COUNTS.values())


def test_exp80_mic_hrda_on_four_benchmarks():
    runs = resolved(80)
    assert list(runs)[:4] == ['gta2cs_hrda_mic_mitb5_s0', 'gta2cs_hrda_mic_mitb5_s1', 'gta2cs_hrda_mic_mitb5_s2',
                              'synthia2cs_hrda_mic_mitb5_s0']
    gta = runs['gta2cs_hrda_mic_mitb5_s2']
    assert gta.model.type == 'hrda' and gta.model.backbone.type == 'mit_b5' and gta.data.crop_size == [1024, 1024]
    assert gta.data.rcs.min_crop_ratio == 2.0 and gta.data.target.crop_pseudo_margins == [30, 240, 30, 30]
    assert (gta.uda.mask_mode, gta.uda.mask_block_size, gta.uda.mask_ratio) == ('separatetrgaug', 64, 0.7)
    assert runs['synthia2cs_hrda_mic_mitb5_s0'].data.source.img_scale == [2560, 1520]
    for bench, target in (('cs2acdc', 'acdc'), ('cs2darkzurich', 'darkzurich')):
        c = runs[f'{bench}_hrda_mic_mitb5_s1']
        assert c.data.source.type == 'cityscapes' and c.data.target.type == target and c.uda.mask_mode == 'separate'
        assert c.data.target.img_scale == [1920, 1080] and c.data.target.crop_pseudo_margins is None


def test_exp81_mic_with_further_uda_methods():
    runs = resolved(81)
    for method in ('advseg', 'minent'):  # sgd, lr 0.0025, no head multiplier, no FD / RCS / margins
        c = runs[f'gta2cs_{method}_mic_dlv2_r101_s0']
        assert c.uda.mode == method and c.model.type == 'encoder_decoder'
        assert c.model.backbone.type == 'resnet101_v1c' and c.model.decode_head.type == 'deeplabv2'
        assert c.model.decode_head.dilations == [6, 12] and c.model.pretrained.endswith('resnet101_v1c-e67eebb6.pth')
        assert (c.optim.type, c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.head_lr_mult) == \
            ('sgd', 0.0025, 0.9, 0.0005, 1.0)
        assert c.optim.warmup_iters == 1500 and c.optim.power == 1.0
        assert c.uda.fd_lambda == 0 and not c.data.rcs.enabled and c.data.target.crop_pseudo_margins is None
        assert c.uda.alpha == 0.999 and c.uda.pseudo_threshold == 0.968  # the MIC teacher's
        assert c.data.crop_size == [512, 512] and c.data.source.img_scale == [1280, 720]
        assert c.model.test.mode == 'whole' and c.uda.mask_block_size == 32 and c.uda.mask_ratio == 0.7
    dacs = runs['gta2cs_dacs_mic_dlv2_r101_s1']
    assert dacs.uda.mode == 'dacs' and dacs.uda.alpha == 0.99 and dacs.uda.fd_lambda == 0 and not dacs.data.rcs.enabled
    assert dacs.optim.type == 'adamw' and dacs.optim.head_lr_mult == 10 and dacs.uda.pseudo_weight_ignore_top == 0
    daformer = runs['gta2cs_daformer_mic_dlv2_r101_s2']
    assert daformer.uda.alpha == 0.999 and daformer.uda.fd_lambda == 0.005 and daformer.data.rcs.enabled
    assert daformer.data.rcs.temperature == 0.01 and daformer.data.rcs.min_crop_ratio == 0.5
    assert (daformer.uda.pseudo_weight_ignore_top, daformer.uda.pseudo_weight_ignore_bottom) == (15, 120)
    assert daformer.data.target.crop_pseudo_margins is None
    hrda = runs['gta2cs_hrda_mic_dlv2_r101_s0']
    assert hrda.model.type == 'hrda' and hrda.model.decode_head.type == 'deeplabv2'
    assert hrda.model.backbone.type == 'resnet101_v1c' and hrda.data.crop_size == [1024, 1024]
    assert hrda.uda.mask_block_size == 64 and hrda.data.target.crop_pseudo_margins == [30, 240, 30, 30]
    assert hrda.model.test.mode == 'slide' and hrda.data.rcs.min_crop_ratio == 2.0
    mit = runs['gta2cs_daformer_mic_mitb5_s0']
    assert mit.model.backbone.type == 'mit_b5' and mit.model.decode_head.type == 'daformer'
    assert mit.model.type == 'encoder_decoder' and mit.uda.mask_block_size == 32


def test_exp82_mask_modes():
    modes = [(c.data.target.type, c.uda.mask_mode) for c in resolved(82).values()][::3]
    assert modes == [('cityscapes', 'separatesrcaug'), ('cityscapes', 'separateaug'),
                     ('acdc', 'separatesrc'), ('acdc', 'separatetrg')]


def test_exp83_ablations():
    runs = list(resolved(83).values())[::3]
    assert [c.uda.mask_mode for c in runs] == ['separatetrg', 'separatetrgaug', 'separatetrgaug', 'separatetrgaug']
    assert [c.uda.mask_ratio for c in runs] == [0.7, 0.0, 0.7, 0.7]
    assert [c.uda.mask_alpha for c in runs] == ['same', 'same', 0.0, 'same']
    assert [c.uda.mask_pseudo_threshold for c in runs] == ['same', 'same', 'same', None]
    assert all(c.model.type == 'encoder_decoder' and c.uda.mask_block_size == 32 for c in runs)


def test_exp84_block_size_and_ratio_grid():
    points = [(c.uda.mask_block_size, c.uda.mask_ratio) for c in resolved(84).values()][::3]
    expected = [p for p in itertools.product([16, 32, 64, 128], [0.3, 0.5, 0.7, 0.9]) if p != (32, 0.7)]
    assert points == expected  # block size outer, ratio inner, as the original
    assert experiment_runs(84)[0][0] == 'gta2cs_daformer_mic_b16_r0.3_mitb5_s0'


def test_exp85_supervised_cityscapes():
    for c in resolved(85).values():
        assert c.uda.mode == 'source_only' and c.uda.mask_mode == 'separatesrc' and c.uda.mask_block_size == 32
        assert c.data.source.type == 'cityscapes' and c.data.source.split == 'train'
        assert c.data.source.img_scale == [1024, 512] and c.data.val.type == 'cityscapes'
        assert not c.data.rcs.enabled and c.uda.fd_lambda == 0 and c.model.test.mode == 'whole'


def test_commands_are_shell_lines_of_the_runs():
    lines = experiment_commands('81', launcher='torchrun --nproc_per_node=2 mic_train.py')
    assert len(lines) == 18
    argv = shlex.split(lines[0])
    assert argv[:5] == ['torchrun', '--nproc_per_node=2', 'mic_train.py', '--cfg', 'configs/gta2cs_dlv2_advseg.yaml']
    assert argv[5] == '--opt' and argv[-2:] == ['train.seed=0',
                                                'train.work_dir=work_dirs/exp81/gta2cs_advseg_mic_dlv2_r101_s0']
    name, cfg, opts = experiment_runs(81)[0]
    assert load_config(argv[4], argv[6:]) == load_config(cfg, opts)


def test_experiment_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match='unknown experiment 79; the experiments are 80, 81'):
        experiment(79)
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'a.yaml').write_text('train: {max_iters: 3}\n')
    table = tmp_path / 'configs' / 'experiments.yaml'
    cases = [
        ('1: {seeds: [0], runs: [{name: a, cfg: configs/b.yaml}]}', 'config file configs/b.yaml does not exist'),
        ('1: {seeds: [0], runs: [{name: a, cfg: configs/a.yaml}, {name: a, cfg: configs/a.yaml}]}',
         'run names must be unique: a'),
        ('1: {seeds: [0], runs: [{name: a, cfg: configs/a.yaml, opt: [train.seed=3]}]}', 'set per run'),
        ('1: {seeds: [0], runs: [{name: a, cfg: configs/a.yaml, opts: []}]}', "unknown key 'opts'"),
        ('1: {seeds: [], runs: [{name: a, cfg: configs/a.yaml}]}', "'seeds' must be"),
        ('1: {seeds: [0], cfg: configs/a.yaml, name: "r{x}", grid: {uda.mask_ratio: [0.5]}}', "'x'"),
        ('"7": {seeds: [0], runs: [{name: a, cfg: configs/a.yaml}]}', "the paper's numbers or names"),
        ('a b: {seeds: [0], runs: [{name: a, cfg: configs/a.yaml}]}', "the paper's numbers or names"),
    ]
    for text, message in cases:
        table.write_text(text + '\n')
        with pytest.raises(ConfigError, match=message):
            load_experiments(str(table))
    table.write_text('1: {seeds: [4], cfg: configs/a.yaml, name: "r{mask_ratio}", grid: {uda.mask_ratio: [0.5, 1]}}\n')
    runs = experiment_runs(1, str(table), work_root='out')
    assert [(n, o) for n, _, o in runs] == [
        ('r0.5_s4', ['uda.mask_ratio=0.5', 'train.seed=4', 'train.work_dir=out/exp1/r0.5_s4']),
        ('r1_s4', ['uda.mask_ratio=1', 'train.seed=4', 'train.work_dir=out/exp1/r1_s4'])]
    assert load_config(runs[0][1], runs[0][2]).train.max_iters == 3


def _flat(tree, prefix=''):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {prefix + k: v})
    return out


def test_demo_study_runs_differ_only_in_the_method_switches():
    runs = experiment_runs('demo')
    assert [n for n, _, _ in runs[::3]] == ['demo_source_only_s0', 'demo_daformer_s0', 'demo_hrda_dacs_s0',
                                            'demo_hrda_mic_s0']
    assert {cfg for _, cfg, _ in runs} == {runs[0][1]} and runs[0][1].endswith('configs/demo.yaml')
    base = _flat(load_config(runs[0][1]))
    switches = {'uda.mode', 'uda.mask_mode', 'model.type', 'train.seed', 'train.work_dir'}
    # DAFormer is compared at half the resolution of HRDA, as in HRDA's paper: scales and crop halved
    half = {k: [v // 2 for v in base[k]] for k in ('data.source.img_scale', 'data.target.img_scale',
                                                   'data.val.img_scale', 'data.crop_size')}
    methods = set()
    for name, cfg, opts in runs:
        c = _flat(load_config(cfg, opts))
        changed = {k for k in base if base[k] != c[k]}
        if c['model.type'] == 'encoder_decoder':
            assert {k: c[k] for k in half} == half, name
            changed -= set(half)
        assert changed <= switches, name
        assert c['train.work_dir'] == f'work_dirs/demo/{name}'
        methods.add((c['uda.mode'], c['model.type'], c['uda.mask_mode']))
    assert methods == {('source_only', 'hrda', None), ('dacs', 'encoder_decoder', None), ('dacs', 'hrda', None),
                       ('dacs', 'hrda', 'separatetrgaug')}
    assert experiment(81) == experiment('81')  # ids as typed on the command line


def test_vfm_uda_entry_trains_dinov2_with_token_masking():
    exp = experiment('vfm_uda')
    assert 'GPU' in exp['title'] and [r['paper'] for r in exp['runs']] == [77.1, 78.4, None]
    runs = resolved('vfm_uda')
    assert len(runs) == 9 and all(c.train.work_dir == f'work_dirs/vfm_uda/{n}' for n, c in runs.items())
    vitl = runs['gta2cs_vfm_uda_dinov2_vitl_s0']
    assert vitl.model.backbone.type == 'dinov2_vitl14' and vitl.model.decode_head.type == 'vfm_uda'
    assert (vitl.model.type, vitl.uda.mask_type, vitl.uda.alpha, vitl.uda.pseudo_threshold) == \
        ('encoder_decoder', 'token', 0.999, 0.968)
    assert (vitl.optim.encoder_lr_mult, vitl.optim.layer_decay, vitl.optim.warmup_iters, vitl.train.max_iters) == \
        (0.1, 1.0, 1500, 40000)
    hrda = runs['gta2cs_hrda_mic_dinov2_vitb_s2']
    assert hrda.model.type == 'hrda' and hrda.model.decode_head.type == 'daformer'
