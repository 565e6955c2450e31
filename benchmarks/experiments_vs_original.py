"""Hold configs/experiments.yaml to the original's experiments (lhoyer/MIC, seg/experiments.py).

For each experiment ID the original's generate_experiment_cfgs(ID) gives the runs `run_experiments.py
--exp ID` trains; each is resolved through its `_base_` chain with mmcv's Config, as the original does,
and its settings that matter (model, crops and image scales, the UDA method and its parameters, MIC,
optimizer, schedule, iterations, batch, seed, test mode) are set beside those of our run of the same
place in the list (`mic_experiments.experiment_runs(ID)` + `load_config`). Prints one line per run, OK or
FAIL with the settings that differ, and a summary per experiment.

Runs in the original's environment (the pure-Python mmcv 1.3.7; no torch import is needed here), e.g.
the one of benchmarks/compare_with_original.py:

    /tmp/micref/bin/python benchmarks/experiments_vs_original.py --ref /tmp/MIC/seg
    /tmp/micref/bin/python benchmarks/experiments_vs_original.py --ref /tmp/MIC/seg --exp 81 --verbose

Exit status 1 when a run differs or the run counts differ.
"""
import argparse
import math
import os
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, REPO)

from mic_config import load_config  # noqa: E402
from mic_experiments import experiment_runs, load_experiments  # noqa: E402

DATASETS = {'GTADataset': 'gta', 'SynthiaDataset': 'synthia', 'CityscapesDataset': 'cityscapes',
            'ACDCDataset': 'acdc', 'DarkZurichDataset': 'darkzurich'}
HEADS = {'DLV2Head': 'deeplabv2', 'SegFormerHead': 'segformer'}
# the original's pretrained names -> the files our configs name (same weights, downloaded by hand)
PRETRAINED = {'open-mmlab://resnet101_v1c': 'pretrained/resnet101_v1c-e67eebb6.pth',
              'open-mmlab://resnet50_v1c': 'pretrained/resnet50_v1c-2cccc1ad.pth'}


# --------------------------------------------------------------------------
# The original: generated configs, resolved through their _base_ files
# --------------------------------------------------------------------------

def original_runs(ref, exp_id):
    """[(name, mmcv Config)] of the original's experiment, in its order."""
    from mmcv import Config
    cwd = os.getcwd()
    os.chdir(ref)  # generate_experiment_cfgs reads configs/_base_/models/... relative to seg/
    try:
        if ref not in sys.path:
            sys.path.insert(0, ref)
        from experiments import generate_experiment_cfgs
        cfgs = generate_experiment_cfgs(exp_id)
    finally:
        os.chdir(cwd)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, cfg in enumerate(cfgs):
            cfg = dict(cfg, _base_=[os.path.join(ref, 'configs', b) for b in cfg['_base_']])
            path = os.path.join(tmp, f'run{i}.py')
            with open(path, 'w') as f:  # what run_experiments.py writes, less its pretty-printing
                f.writelines(f'{k} = {v!r}\n' for k, v in cfg.items())
            out.append((cfg['name'], Config.fromfile(path)))
    return out


def _step(pipeline, kind):
    steps = [s for s in pipeline if s['type'] == kind]
    return steps[0] if steps else None


def _dataset(ds, train=True):
    """type, root, split, img_scale (and crop, cat_max_ratio for training) of an mmseg dataset config."""
    out = {'type': DATASETS[ds['type']], 'root': ds['data_root'].rstrip('/')}
    if out['type'] not in ('gta', 'synthia'):  # one split only: we ignore the key there
        out['split'] = 'val' if '/val' in ds['img_dir'] else 'train'
    if train:
        out['img_scale'] = list(_step(ds['pipeline'], 'Resize')['img_scale'])
        crop = _step(ds['pipeline'], 'RandomCrop')
        out['crop_size'] = list(crop['crop_size'])
        out['cat_max_ratio'] = crop.get('cat_max_ratio', 1.0)
    else:
        out['img_scale'] = list(_step(ds['pipeline'], 'MultiScaleFlipAug')['img_scale'])
    return out


def original_settings(o):
    """The settings that matter of a resolved original config, under our key names."""
    s = {}
    m = o['model']
    hrda = m['type'] == 'HRDAEncoderDecoder'
    assert hrda or m['type'] == 'EncoderDecoder', m['type']
    s['model.type'] = 'hrda' if hrda else 'encoder_decoder'
    bb = m['backbone']
    if bb['type'].startswith('mit_'):
        s['model.backbone.type'] = bb['type']
    else:  # DeepLabV2's dilated ResNet-V1c (output stride 8)
        dilated = (bb['type'] == 'ResNetV1c' and tuple(bb['dilations']) == (1, 1, 2, 4)
                   and tuple(bb['strides']) == (1, 2, 1, 1) and bb['contract_dilation'])
        s['model.backbone.type'] = f'resnet{bb["depth"]}_v1c' if dilated else f'other {bb}'
    head = m['decode_head']
    head_type = head['single_scale_head'] if hrda else head['type']
    if head_type == 'DAFormerHead':
        fusion = head['decoder_params']['fusion_cfg']
        sepaspp = (fusion['type'] == 'aspp' and fusion['sep'] and tuple(fusion['dilations']) == (1, 6, 12, 18)
                   and not fusion['pool'])
        s['model.decode_head.type'] = 'daformer' if sepaspp else f'other {fusion}'
        s['model.decode_head.embed_dims'] = head['decoder_params']['embed_dims']
        s['model.decode_head.dropout'] = head['dropout_ratio']
    else:
        s['model.decode_head.type'] = HEADS[head_type]
    if head_type == 'DLV2Head':
        s['model.decode_head.dilations'] = list(head['dilations'])
    s['model.num_classes'] = head['num_classes']
    s['model.pretrained'] = PRETRAINED.get(m['pretrained'], m['pretrained'])
    if hrda:  # unset keys: the defaults of HRDAEncoderDecoder / HRDAHead
        s['model.hrda.scales'] = sorted(m['scales'])
        s['model.hrda.hr_crop_size'] = list(m['hr_crop_size'])
        s['model.hrda.crop_coord_divisible'] = m.get('crop_coord_divisible', 1)
        s['model.hrda.hr_loss_weight'] = head.get('hr_loss_weight', 0)
        s['model.hrda.lr_loss_weight'] = head.get('lr_loss_weight', 0)
        s['model.hrda.attention_classwise'] = head.get('attention_classwise', True)
        s['model.hrda.fixed_attention'] = head.get('fixed_attention', None)
        s['model.hrda.hr_slide_inference'] = m.get('hr_slide_inference', True)
        s['model.hrda.hr_slide_overlapping'] = m.get('hr_slide_overlapping', True)
        s['model.hrda.feature_scale'] = m.get('feature_scale', 1)
    test = m['test_cfg']
    s['model.test.mode'] = test['mode']
    if test['mode'] == 'slide':
        s['model.test.crop_size'] = list(test['crop_size'])
        s['model.test.stride'] = list(test['stride'])

    d = o['data']
    train = d['train']
    assert train['type'] == 'UDADataset', train['type']
    u = o['uda']
    mode = {'DACS': 'source_only' if u.get('source_only') else 'dacs', 'AdvSeg': 'advseg',
            'MinEnt': 'minent'}[u['type']]
    src, tgt, val = _dataset(train['source']), _dataset(train['target']), _dataset(d['val'], train=False)
    s['data.crop_size'] = src.pop('crop_size')
    s['data.cat_max_ratio'] = src.pop('cat_max_ratio')
    s['data.target.crop_size'] = tgt.pop('crop_size')
    cat_tgt = tgt.pop('cat_max_ratio')
    if mode != 'source_only':  # source-only training reads no target images
        s['data.target.cat_max_ratio'] = cat_tgt
    for name, ds in (('source', src), ('target', tgt), ('val', val)):
        s.update({f'data.{name}.{k}': v for k, v in ds.items()})
    s['data.target.crop_pseudo_margins'] = train['target'].get('crop_pseudo_margins')
    s['data.sync_crop_size'] = train.get('sync_crop_size')
    s['data.batch_size'] = d['samples_per_gpu']
    rcs = train.get('rare_class_sampling')
    s['data.rcs.enabled'] = rcs is not None
    if rcs is not None:
        s['data.rcs.temperature'] = rcs['class_temp']
        s['data.rcs.min_pixels'] = rcs['min_pixels']
        s['data.rcs.min_crop_ratio'] = rcs['min_crop_ratio']

    s['uda.mode'] = mode
    masking = u['mask_mode'] is not None
    if mode != 'source_only':  # a teacher exists: DACS's, or with MIC the one of AdvSeg / MinEnt
        for key in ('alpha', 'pseudo_threshold', 'pseudo_weight_ignore_top', 'pseudo_weight_ignore_bottom'):
            s[f'uda.{key}'] = u[key]
    fd = u.get('imnet_feature_dist_lambda', 0)
    s['uda.fd_lambda'] = fd
    if fd > 0:
        s['uda.fd_classes'] = list(u['imnet_feature_dist_classes'])
        s['uda.fd_min_ratio'] = u['imnet_feature_dist_scale_min_ratio']
    if mode in ('dacs', 'source_only'):
        assert u['mix'] == 'class', u['mix']
    for key in ('color_jitter_strength', 'color_jitter_probability', 'blur'):
        s[f'uda.{key}'] = u[key]
    s['uda.mask_mode'] = u['mask_mode']
    if masking:
        gen = u['mask_generator']
        assert gen['type'] == 'block', gen
        s['uda.mask_block_size'] = gen['mask_block_size']
        s['uda.mask_ratio'] = gen['mask_ratio']
        for key in ('mask_alpha', 'mask_pseudo_threshold', 'mask_lambda'):
            s[f'uda.{key}'] = u[key]
    if mode == 'advseg':
        s['uda.advseg.loss'] = {'LS': 'ls', 'Vanilla': 'vanilla'}[u['discriminator_type']]
        s['uda.advseg.lambda_adv'] = u['lambda_adv_target']['main']  # 'aux': the model has no auxiliary head
        s['uda.advseg.lr'] = u['lr_D']
        s['uda.advseg.power'] = u['lr_D_power']
        s['uda.advseg.min_lr'] = u['lr_D_min']
    if mode == 'minent':
        s['uda.minent.lambda_ent'] = u['lambda_ent']['main']

    opt = o['optimizer']
    s['optim.type'] = opt['type'].lower()
    s['optim.lr'] = opt['lr']
    s['optim.weight_decay'] = opt['weight_decay']
    if s['optim.type'] == 'adamw':
        s['optim.betas'] = list(opt['betas'])
    else:
        s['optim.momentum'] = opt['momentum']
    custom = opt.get('paramwise_cfg', {}).get('custom_keys', {})
    s['optim.head_lr_mult'] = custom.get('head', {}).get('lr_mult', 1.0)
    s['optim.encoder_norm_decay_mult'] = custom.get('norm', {}).get('decay_mult', 1.0)
    lr = o['lr_config']
    assert lr['policy'] == 'poly' and lr.get('warmup') in ('linear', None) and not lr['by_epoch'], lr
    s['optim.warmup_iters'] = lr['warmup_iters'] if lr.get('warmup') else 0
    if lr.get('warmup'):
        s['optim.warmup_ratio'] = lr['warmup_ratio']
    s['optim.power'] = lr['power']
    s['optim.min_lr'] = lr['min_lr']

    s['train.max_iters'] = o['runner']['max_iters']
    s['train.seed'] = o['seed']
    s['train.eval_interval'] = o['evaluation']['interval']
    return s


# --------------------------------------------------------------------------
# Ours: the same settings of a resolved config
# --------------------------------------------------------------------------

def our_settings(c):
    """The settings of our resolved config `c` that original_settings extracts, under the same keys."""
    s = {}
    m, d, u, o = c['model'], c['data'], c['uda'], c['optim']
    s['model.type'] = m['type']
    s['model.backbone.type'] = m['backbone']['type']
    s['model.decode_head.type'] = m['decode_head']['type']
    if m['decode_head']['type'] in ('daformer', 'segformer'):
        s['model.decode_head.embed_dims'] = m['decode_head']['embed_dims']
        s['model.decode_head.dropout'] = m['decode_head']['dropout']
    if m['decode_head']['type'] == 'deeplabv2':
        s['model.decode_head.dilations'] = m['decode_head']['dilations']
    s['model.num_classes'] = m['num_classes']
    s['model.pretrained'] = m['pretrained']
    if m['type'] == 'hrda':
        s.update({f'model.hrda.{k}': m['hrda'][k] for k in (
            'scales', 'hr_crop_size', 'crop_coord_divisible', 'hr_loss_weight', 'lr_loss_weight',
            'attention_classwise', 'fixed_attention', 'hr_slide_inference', 'hr_slide_overlapping',
            'feature_scale')})
        s['model.hrda.scales'] = sorted(s['model.hrda.scales'])
    s['model.test.mode'] = m['test']['mode']
    if m['test']['mode'] == 'slide':
        s['model.test.crop_size'] = m['test']['crop_size']
        s['model.test.stride'] = m['test']['stride']

    s['data.crop_size'] = d['crop_size']
    s['data.cat_max_ratio'] = d['cat_max_ratio']
    s['data.target.crop_size'] = d['crop_size']  # source and target crops share data.crop_size
    if u['mode'] != 'source_only':
        s['data.target.cat_max_ratio'] = 1.0  # mic_data re-draws source crops only
    for name in ('source', 'target', 'val'):
        ds = d[name]
        s[f'data.{name}.type'] = ds['type']
        s[f'data.{name}.root'] = ds['root'].rstrip('/')
        if ds['type'] not in ('gta', 'synthia'):
            s[f'data.{name}.split'] = ds['split']
        s[f'data.{name}.img_scale'] = ds['img_scale']
    s['data.target.crop_pseudo_margins'] = d['target']['crop_pseudo_margins']
    s['data.sync_crop_size'] = d['sync_crop_size']
    s['data.batch_size'] = d['batch_size']
    s['data.rcs.enabled'] = d['rcs']['enabled']
    if d['rcs']['enabled']:
        s.update({f'data.rcs.{k}': d['rcs'][k] for k in ('temperature', 'min_pixels', 'min_crop_ratio')})

    s['uda.mode'] = u['mode']
    if u['mode'] != 'source_only':
        s.update({f'uda.{k}': u[k] for k in (
            'alpha', 'pseudo_threshold', 'pseudo_weight_ignore_top', 'pseudo_weight_ignore_bottom')})
    s['uda.fd_lambda'] = u['fd_lambda']
    if u['fd_lambda'] > 0:
        s['uda.fd_classes'] = u['fd_classes']
        s['uda.fd_min_ratio'] = u['fd_min_ratio']
    s.update({f'uda.{k}': u[k] for k in ('color_jitter_strength', 'color_jitter_probability', 'blur')})
    s['uda.mask_mode'] = u['mask_mode']
    if u['mask_mode'] is not None:
        s.update({f'uda.{k}': u[k] for k in (
            'mask_block_size', 'mask_ratio', 'mask_alpha', 'mask_pseudo_threshold', 'mask_lambda')})
    if u['mode'] == 'advseg':
        s.update({f'uda.advseg.{k}': v for k, v in u['advseg'].items()})
    if u['mode'] == 'minent':
        s['uda.minent.lambda_ent'] = u['minent']['lambda_ent']

    s['optim.type'] = o['type']
    s['optim.lr'] = o['lr']
    s['optim.weight_decay'] = o['weight_decay']
    if o['type'] == 'adamw':
        s['optim.betas'] = o['betas']
    else:
        s['optim.momentum'] = o['momentum']
    s['optim.head_lr_mult'] = o['head_lr_mult']
    # mic_model: MiT encoders train their norm layers without weight decay, ResNets decay everything
    s['optim.encoder_norm_decay_mult'] = 0.0 if m['backbone']['type'].startswith('mit_') else 1.0
    s['optim.warmup_iters'] = o['warmup_iters']
    if o['warmup_iters']:
        s['optim.warmup_ratio'] = o['warmup_ratio']
    s['optim.power'] = o['power']
    s['optim.min_lr'] = o['min_lr']

    s['train.max_iters'] = c['train']['max_iters']
    s['train.seed'] = c['train']['seed']
    s['train.eval_interval'] = c['train']['eval_interval']
    return s


def same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def compare(exp_id, ref, table=None, verbose=False):
    """Print one line per run; return the number of failures (a count mismatch counts as one)."""
    theirs = original_runs(ref, exp_id)
    ours = experiment_runs(exp_id, table)
    failures = 0
    if len(theirs) != len(ours):
        print(f'FAIL exp {exp_id}: {len(ours)} runs here, {len(theirs)} in the original')
        failures += 1
    for i, ((name, cfg_path, opts), (their_name, their_cfg)) in enumerate(zip(ours, theirs)):
        a = our_settings(load_config(cfg_path, opts))
        b = original_settings(their_cfg)
        diff = [f'{k}: ours {a.get(k, "<unset>")!r}, original {b.get(k, "<unset>")!r}'
                for k in sorted(set(a) | set(b)) if k not in a or k not in b or not same(a[k], b[k])]
        failures += bool(diff)
        print(f'{"FAIL" if diff else "OK  "} exp{exp_id} {name:44s} {len(b):2d} settings  = {their_name}')
        for line in diff:
            print(f'       {line}')
        if verbose and not diff:
            print('       ' + ', '.join(f'{k}={v!r}' for k, v in sorted(a.items())))
    print(f'exp {exp_id}: {len(ours)} runs here, {len(theirs)} in the original: '
          + ('all OK' if not failures else f'{failures} FAIL'))
    return failures


def _commit(path):
    import subprocess
    try:
        return subprocess.run(['git', '-C', path, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ref', default='/tmp/MIC/seg', help="the original's seg/ folder")
    parser.add_argument('--exp', type=int, nargs='+', default=None, help='experiment ids (default: all)')
    parser.add_argument('--table', default=None, help='experiment table (default: configs/experiments.yaml)')
    parser.add_argument('--verbose', action='store_true', help='also print the compared settings of OK runs')
    args = parser.parse_args(argv)
    ids = args.exp or sorted(load_experiments(args.table))
    print(f'original: {args.ref} (commit {_commit(args.ref)}); ours: {args.table or "configs/experiments.yaml"}')
    failures = sum(compare(i, os.path.abspath(args.ref), args.table, args.verbose) for i in ids)
    print(f'experiments {", ".join(map(str, ids))}: ' + ('every run matches the original' if not failures
          else f'{failures} differences from the original (a differing run or run count counts once)'))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
