"""mic_config: defaults, YAML diffs, overrides and validation errors that name the key."""
import copy
import glob
import json
import os
import pickle
import subprocess
import sys

import pytest
import yaml

import mic_config
from mic_config import ConfigError, defaults, dump_yaml, load_config, merge, resolve_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(set(glob.glob(os.path.join(REPO, 'configs', '*.yaml'))) - {os.path.join(REPO, 'configs', 'experiments.yaml')})


def test_defaults_are_the_paper_setting():
    cfg = load_config()
    assert cfg.model.type == 'hrda' and cfg.model.backbone.type == 'mit_b5'
    assert cfg.model.hrda.hr_crop_size == [512, 512] and cfg.model.hrda.hr_loss_weight == 0.1
    assert cfg.model.test == {'mode': 'slide', 'crop_size': [1024, 1024], 'stride': [512, 512], 'flip': False,
                              'scales': [1.0]}  # one pass: test-time augmentation is off
    assert cfg.uda.alpha == 0.999 and cfg.uda.pseudo_threshold == 0.968 and cfg.uda.fd_lambda == 0.005
    assert cfg.uda.mask_mode == 'separatetrgaug' and cfg.uda.mask_block_size == 64 and cfg.uda.mask_ratio == 0.7
    assert cfg.optim.lr == 6e-5 and cfg.optim.warmup_iters == 1500 and cfg.train.max_iters == 40000
    assert cfg.data.target.crop_pseudo_margins == [30, 240, 30, 30] and cfg.data.rcs.min_crop_ratio == 2.0
    assert cfg['model'] is cfg.model  # dict and attribute access


def test_yaml_diff_and_overrides(tmp_path):
    path = tmp_path / 'x.yaml'
    path.write_text('model:\n  backbone: {type: mit_b0}\ntrain:\n  max_iters: 7\n')
    cfg = load_config(str(path), ['train.max_iters=9', 'model.pretrained=null', 'uda.fd_lambda=0',
                                  'data.crop_size=[512, 1024]', 'optim.lr=1e-4', 'uda.mask_alpha=0.99'])
    assert cfg.model.backbone.type == 'mit_b0' and cfg.model.backbone.drop_path_rate == 0.1
    assert cfg.train.max_iters == 9 and cfg.model.pretrained is None
    assert cfg.data.crop_size == [512, 1024] and cfg.optim.lr == 1e-4 and cfg.uda.mask_alpha == 0.99
    assert isinstance(load_config(None, ['optim.lr=1']).optim.lr, float)  # ints widen to float


@pytest.mark.parametrize('override,message', [
    ('model.bakbone.type=mit_b0', "unknown config key 'model.bakbone' (did you mean backbone?)"),
    ('model.backbone.type=mit_b9', "config key 'model.backbone.type': expected 'mit_b0'"),
    ('train.max_iters=1.5', "config key 'train.max_iters': expected int"),
    ('train.max_iters=true', "config key 'train.max_iters': expected int"),
    ('data.crop_size=[512, x]', "config key 'data.crop_size[1]': expected int"),
    ('uda.mask_alpha=other', "config key 'uda.mask_alpha'"),
    ('model.hrda=3', "config key 'model.hrda': expected a mapping"),
    ('noequals', 'must look like key.sub=value'),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        load_config(str(tmp_path / 'missing.yaml'))
    (tmp_path / 'bad.yaml').write_text('model: [1, 2')
    with pytest.raises(ConfigError, match='not valid YAML'):
        load_config(str(tmp_path / 'bad.yaml'))
    (tmp_path / 'typo.yaml').write_text('trian:\n  max_iters: 3\n')
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(str(tmp_path / 'typo.yaml'))


def test_resolve_section_fills_partial_dicts():
    model = resolve_section('model', {'backbone': {'type': 'mit_b1'}})
    assert model.backbone.type == 'mit_b1' and model.decode_head.embed_dims == 256
    with pytest.raises(ConfigError, match="'model.nope'"):
        resolve_section('model', {'nope': 1})


def test_the_shipped_configs_are_found():
    assert len(SHIPPED) >= 10 and os.path.join(REPO, 'configs', 'gta2cs.yaml') in SHIPPED


@pytest.mark.parametrize('path', SHIPPED, ids=os.path.basename)  # not experiments.yaml: a table of runs
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    (tmp_path / 'resolved.yaml').write_text(dump_yaml(cfg))
    assert load_config(str(tmp_path / 'resolved.yaml')) == cfg


def test_defaults_are_json_like():
    tree = defaults()
    assert json.loads(json.dumps(tree)) == tree  # plain dicts, lists, numbers, text, None: nothing lost
    assert list(tree) == ['model', 'data', 'uda', 'optim', 'train']
    assert defaults('model') == tree['model'] and tree['model']['num_classes'] == 19


def test_schema_tables_match_the_model():
    """The names and sizes the schema repeats from mic_model (mic_model imports the schema)."""
    import torch

    import mic_model
    assert set(mic_config.BACKBONE_TYPES) == set(mic_model.BACKBONES)
    assert set(mic_config.HEAD_TYPES) == set(mic_model.HEADS) == set(mic_config.HEAD_OUTPUT_STRIDES)
    mit = mic_model.MiT('b0', 0.0).eval()
    n = mic_config.MIT_MIN_SIZE
    with torch.no_grad():
        mit(torch.zeros(1, 3, n, n))
        with pytest.raises(ValueError, match=f'at least {n}x{n} pixels'):
            mit(torch.zeros(1, 3, n - 1, n))
    for head, backbone in (('daformer', 'mit_b0'), ('segformer', 'mit_b0'), ('deeplabv2', 'resnet50_v1c')):
        model = mic_model.build_model({'type': 'encoder_decoder', 'backbone': {'type': backbone},
                                       'decode_head': {'type': head}, 'pretrained': None})
        assert model.output_stride == mic_config.HEAD_OUTPUT_STRIDES[head], head


def test_the_schema_imports_no_torch():
    code = 'import sys, mic_config; mic_config.load_config(); assert "torch" not in sys.modules, "torch"'
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_ranges_live_on_the_fields():
    """Every range is metadata of its field (num, unit): the texts of a few, and keys without one."""
    ranges = {f'{s}.{f.name}': f.metadata['range'][1] for s, cls in (('optim', mic_config.OptimConfig),
                                                                     ('model.hrda', mic_config.HRDAConfig))
              for f in mic_config.dataclasses.fields(cls) if 'range' in f.metadata}
    assert ranges['optim.lr'] == '> 0' and ranges['optim.betas'] == 'in [0, 1)'
    assert ranges['optim.momentum'] == 'in [0, 1]' and ranges['model.hrda.feature_scale'] == 'in (0, 1]'
    assert 'optim.type' not in ranges and 'model.hrda.attention_classwise' not in ranges


@pytest.mark.parametrize('override', ['optim.lr=1e999', 'optim.lr=.inf', 'optim.weight_decay=.inf',
                                      'optim.min_lr=.nan', 'uda.mask_alpha=.nan', 'model.hrda.fixed_attention=-.inf',
                                      'model.hrda.scales=[.nan, 1.0]', 'data.demo.gap=.inf'])
def test_non_finite_numbers_are_refused(override):
    key, _ = override.split('=')
    with pytest.raises(ConfigError, match=r"^config key '" + key.replace('.', r'\.') + r"(\[0\])?': expected "
                                          r"('same' \| )?a finite number( \| null)?, got '?(1e999|-?inf|nan)'?$"):
        load_config(None, [override])


def test_non_finite_numbers_are_refused_in_files_and_stored_configs(tmp_path):
    (tmp_path / 'inf.yaml').write_text('optim:\n  weight_decay: .inf\n')
    with pytest.raises(ConfigError, match="^config key 'optim.weight_decay': expected a finite number, got inf$"):
        load_config(str(tmp_path / 'inf.yaml'))
    with pytest.raises(ConfigError, match="'uda.alpha': expected a finite number, got nan"):
        merge(defaults(), {'uda': {'alpha': float('nan')}})  # e.g. a config stored in a checkpoint


def test_a_key_given_twice_in_a_file_is_refused(tmp_path):
    path = tmp_path / 'twice.yaml'
    path.write_text('train:\n  max_iters: 5\nmodel:\n  pretrained: null\ntrain:\n  seed: 1\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == (f"config file {path} is not valid YAML: key 'train' is given twice (lines 1 and 5): "
                            f'the second would silently replace the first')
    path.write_text('train:\n  max_iters: 5\n  max_iters: 6\n')  # inside a section too
    with pytest.raises(ConfigError, match="key 'max_iters' is given twice \\(lines 2 and 3\\)"):
        load_config(str(path))
    path.write_text('data: {crop_size: [512, 512], crop_size: [64, 64]}\n')  # on one line
    with pytest.raises(ConfigError, match="key 'crop_size' is given twice \\(lines 1 and 1\\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="override 'data=.a: 1, a: 2.': the value is not valid YAML .key 'a' is"):
        load_config(None, ['data={a: 1, a: 2}'])
    # keys brought in by YAML merge keys may still be overridden
    path.write_text('a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n')
    assert mic_config.read_yaml(str(path), 'f') == {'a': {'x': 1, 'y': 2}, 'c': {'x': 3, 'y': 2}}


@pytest.mark.parametrize('content,message', [
    (None, 'is a folder, not a YAML file'),
    ('train:\n  max_iters: 5\n'.encode('utf-16'), 'is not UTF-8 text (byte 0: a binary file, or another encoding '
                                                    'such as UTF-16); save it as UTF-8'),
    ('train:\n  max_iters: 5\n'.encode('utf-16-le'), 'is not UTF-8 text (byte 1: '),
    (bytes(range(256)), 'is not UTF-8 text (byte 128: '),
    (b'\x89PNG\r\n\x1a\n' + bytes(20), 'is not UTF-8 text (byte 0: '),
])
def test_unreadable_config_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / 'cfg.yaml'
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f'config file {path} {message}')
    (tmp_path / 'ok.yaml').write_bytes('# é\ntrain: {max_iters: 5}\n'.encode('utf-8-sig'))  # UTF-8 with a BOM: fine
    assert load_config(str(tmp_path / 'ok.yaml')).train.max_iters == 5


def test_hrda_feature_scale_is_the_context_scale():
    """A check of the model's section that HRDAEncoderDecoder made before; now the config makes it."""
    import mic_model
    message = "config key 'model.hrda.feature_scale': 1 must equal the context scale 0.5 of model.hrda.scales"
    with pytest.raises(ConfigError, match=message):
        load_config(None, ['model.hrda.feature_scale=1.0'])
    with pytest.raises(ConfigError, match=message):
        mic_model.build_model({'hrda': {'feature_scale': 1.0}, 'pretrained': None})
    assert load_config(None, ['model.hrda.scales=[0.25, 1.0]', 'model.hrda.feature_scale=0.25',
                              'data.crop_size=[512, 512]', 'model.hrda.hr_crop_size=[256, 256]'])
    assert load_config(None, ['model.type=encoder_decoder', 'model.hrda.feature_scale=1.0'])  # HRDA only


def test_configs_stored_before_the_added_keys_resolve_as_they_did():
    """A config stored by the first release (run folders, checkpoints) has none of the keys added since:
    it resolves to the same config, and is stored again byte for byte."""
    added = {'data.classes', 'data.source.img_dir', 'data.source.label_dir', 'data.target.img_dir',
             'data.target.label_dir', 'data.val.img_dir', 'data.val.label_dir', 'train.deterministic',
             'train.tensorboard', 'model.test.flip', 'model.test.scales', 'model.in_channels', 'data.channels',
             'data.mean', 'data.std', 'train.ckpt_minutes',
             'uda.mask_type', 'optim.encoder_lr_mult', 'optim.layer_decay'}
    cfg = load_config(os.path.join(REPO, 'configs', 'gta2cs.yaml'))

    def keys(tree, prefix=''):
        return {k for n, v in tree.items()
                for k in (keys(v, f'{prefix}{n}.') if isinstance(v, dict) else [prefix + n])}
    assert keys(cfg) - keys(mic_config.stored(cfg)) == added
    pinned = os.path.join(REPO, 'tests', 'fixtures', 'cityscapes_pins', 'configs', 'gta2cs.yaml')
    with open(pinned) as f:
        text = f.read()
    old = merge(defaults(), yaml.safe_load(text))
    assert old == cfg and dump_yaml(old) == text
    assert load_config(None, ['train.deterministic=true']).train.deterministic is True
    assert mic_config.stored(load_config(None, ['train.deterministic=true']))['train']['deterministic'] is True


def test_resolved_configs_keep_their_sections_checked_through_copies():
    cfg = load_config()
    for copied in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert copied == cfg and copied.model.backbone.type == 'mit_b5'
        assert mic_config.validated(copied.model, mic_config.ModelConfig)
        assert mic_config.validated(copied.data.source, mic_config.DatasetConfig)
    assert not mic_config.validated(dict(cfg.model), mic_config.ModelConfig)
    assert resolve_section('model', cfg.model) is cfg.model
