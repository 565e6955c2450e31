"""mic_config: defaults, YAML diffs, overrides and validation errors that name the key."""
import glob

import pytest

from mic_config import ConfigError, defaults, dump_yaml, load_config, resolve_section


def test_defaults_are_the_paper_setting():
    cfg = load_config()
    assert cfg.model.type == 'hrda' and cfg.model.backbone.type == 'mit_b5'
    assert cfg.model.hrda.hr_crop_size == [512, 512] and cfg.model.hrda.hr_loss_weight == 0.1
    assert cfg.model.test == {'mode': 'slide', 'crop_size': [1024, 1024], 'stride': [512, 512]}
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


@pytest.mark.parametrize('path', sorted(set(glob.glob('configs/*.yaml')) - {'configs/experiments.yaml'}))  # a table
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    (tmp_path / 'resolved.yaml').write_text(dump_yaml(cfg))
    assert load_config(str(tmp_path / 'resolved.yaml')) == cfg


def test_defaults_are_json_like():
    import json
    json.dumps(defaults())


def test_output_strides_of_the_schema_match_the_models():
    import mic_config
    import mic_model
    for head, backbone in (('daformer', 'mit_b0'), ('segformer', 'mit_b0'), ('deeplabv2', 'resnet50_v1c')):
        model = mic_model.build_model({'type': 'encoder_decoder', 'backbone': {'type': backbone},
                                       'decode_head': {'type': head}, 'pretrained': None})
        assert model.output_stride == mic_config.HEAD_OUTPUT_STRIDES[head], head
