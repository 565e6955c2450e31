"""A folder where a file is expected, or a file where a folder is: each is named as such (not 'does
not exist'), with what to pass instead."""
import pytest

import convert_labels
import mic_config
import mic_eval
import mic_model
from mic_runtime import DataError


def test_eval_ckpt_that_is_a_run_folder(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    with pytest.raises(SystemExit):
        mic_eval.main(['--ckpt', str(run)])
    err = capsys.readouterr().err
    assert 'is a folder, not a checkpoint file' in err and 'a run folder holds latest.pth' in err
    (run / 'latest.pth').write_bytes(b'PK')
    with pytest.raises(SystemExit):
        mic_eval.main(['--ckpt', str(run)])
    assert f'pass {run / "latest.pth"}' in capsys.readouterr().err


def test_eval_images_that_is_a_file(tmp_path, capsys):
    image = tmp_path / 'photo.png'
    image.write_bytes(b'not read')
    with pytest.raises(SystemExit):
        mic_eval.main(['--ckpt', str(tmp_path / 'x.pth'), '--images', str(image)])
    err = capsys.readouterr().err
    assert f'--images {image} is a file; --images takes a folder' in err


@pytest.mark.parametrize('kind', ['gta', 'cityscapes', 'folder'])
def test_convert_labels_root_that_is_a_file(tmp_path, kind):
    root = tmp_path / 'data.zip'
    root.write_bytes(b'zip')
    with pytest.raises(DataError, match='is a file, not a folder'):
        if kind == 'folder':
            convert_labels.list_folder_labels(str(root), '_mask.png')
        else:
            convert_labels.list_label_files(kind, str(root))
    with pytest.raises(DataError, match='does not exist'):
        convert_labels.list_label_files('gta', str(tmp_path / 'missing'))


def test_pretrained_that_is_a_folder(tmp_path):
    cfg = mic_config.merge(mic_config.defaults(), {'model': {'backbone': {'type': 'mit_b0'}, 'pretrained': None},
                                                   'uda': {'fd_lambda': 0}})
    model = mic_model.build_model(cfg['model'], load_pretrained=False)
    with pytest.raises(FileNotFoundError) as e:
        mic_model.load_pretrained_encoder(model.backbone, str(tmp_path))
    assert 'is a folder: give the weights file in it' in str(e.value) and 'mit_b0.pth' in str(e.value)
