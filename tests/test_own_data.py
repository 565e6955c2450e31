"""Your own data: classes as data (data.classes), the folder layout, convert_labels.py folder with a
mapping file (label ids or RGB colours), a 5-class task trained and evaluated end to end, bad input,
and pins that nothing changes for the Cityscapes benchmarks.

The toy task of the README section "Your own data" is generated here; to try the README's commands:

    python tests/test_own_data.py data/toy      # writes data/toy/{source,target,target_val}, map.yaml
"""
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _p in (REPO, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# --------------------------------------------------------------------------
# The toy task: 5 classes, colour-coded labels (the ISPRS Potsdam / Vaihingen convention)
# --------------------------------------------------------------------------

TOY_NAMES = ['impervious surfaces', 'building', 'low vegetation', 'tree', 'car']
TOY_COLOURS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0)]
CLUTTER = (255, 0, 0)  # the sixth ISPRS class, ignored (255) by the mapping
# The colour of each class (and clutter) in the images: the source crisp and saturated, the target
# hazy, bluish, low in contrast and noisier (another camera and season): a domain gap.
SOURCE_LOOK = [(150, 150, 145), (190, 90, 70), (110, 160, 70), (40, 100, 40), (40, 60, 200), (200, 180, 60)]
TARGET_LOOK = [tuple(round(0.55 * v + o) for v, o in zip(c, (45, 60, 85))) for c in SOURCE_LOOK]
TOY_SIZES = [(64, 64), (96, 64), (64, 80), (80, 80), (72, 96), (96, 96)]  # (w, h): any sizes

TOY_MAP = """\
# map.yaml: raw label value -> train id (the ISPRS Potsdam / Vaihingen colours)
format: rgb
classes:
  0: [255, 255, 255]   # impervious surfaces
  1: [0, 0, 255]       # building
  2: [0, 255, 255]     # low vegetation
  3: [0, 255, 0]       # tree
  4: [255, 255, 0]     # car
ignore: [[255, 0, 0]]  # clutter / background -> 255, not learnt
"""


def toy_scene(rng, w, h):
    """Train ids [h,w] uint8 (255: clutter): ground, buildings, low vegetation, trees, cars."""
    ids = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(2, 4)):  # low vegetation, large soft blobs
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 22)
        ids[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
    for _ in range(rng.integers(1, 3)):  # buildings, rectangles
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        ids[y:y + rng.integers(12, 28), x:x + rng.integers(12, 28)] = 1
    for _ in range(rng.integers(2, 5)):  # trees, discs
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 8)
        ids[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 3
    for _ in range(rng.integers(1, 4)):  # cars, small rectangles on the ground
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 10)
        ids[y:y + 4, x:x + 8] = 4
    for _ in range(rng.integers(0, 3)):  # clutter
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        ids[y:y + 3, x:x + 3] = 255
    return ids


def toy_image(rng, ids, look, noise):
    colours = np.array(look, np.float32)
    img = colours[np.where(ids == 255, 5, ids)]
    img += rng.normal(0, noise, img.shape)  # texture
    return np.clip(img, 0, 255).astype(np.uint8)


def toy_label_rgb(ids):
    table = np.zeros((256, 3), np.uint8)
    table[:5] = TOY_COLOURS
    table[255] = CLUTTER
    return table[ids]


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def write_toy_dataset(root, num_source=6, num_target=4, num_val=3, seed=0):
    """The toy task under root: source/{images,labels}, target/images, target_val/{images,labels}
    (labels: RGB colour PNGs) and map.yaml. Returns {label path: train ids [h,w]} (255: clutter)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for domain, n, look, noise, labelled in (('source', num_source, SOURCE_LOOK, 8, True),
                                             ('target', num_target, TARGET_LOOK, 14, False),
                                             ('target_val', num_val, TARGET_LOOK, 14, True)):
        for i in range(n):
            w, h = TOY_SIZES[(i + len(domain)) % len(TOY_SIZES)]
            ids = toy_scene(rng, w, h)
            name = f'{domain[0] if domain != "target_val" else "v"}{i:03d}.png'
            _save(os.path.join(root, domain, 'images', name), toy_image(rng, ids, look, noise))
            if labelled:
                path = os.path.join(root, domain, 'labels', name)
                _save(path, toy_label_rgb(ids))
                truth[path] = ids
    with open(os.path.join(root, 'map.yaml'), 'w') as f:
        f.write(TOY_MAP)
    return truth


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

import convert_labels  # noqa: E402  (after the sys.path set-up above)
import mic_config  # noqa: E402
import mic_data  # noqa: E402
import mic_eval  # noqa: E402
import mic_report  # noqa: E402
import mic_train  # noqa: E402
from mic_config import ConfigError, dump_yaml, load_config, merge  # noqa: E402
from mic_data import DataError  # noqa: E402


def run_cli(main, argv, expect_error=True):
    """Run a script's main(argv) in-process: (error line, stdout, stderr) for an expected error
    (exit status 2, one line 'error: ...', no traceback), else (result, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = main([str(a) for a in argv])
        except SystemExit as e:
            errors = [line for line in err.getvalue().splitlines() if line.startswith('error: ')]
            assert e.code == 2 and len(errors) == 1, (e.code, err.getvalue())
            assert 'Traceback' not in err.getvalue()
            if expect_error:
                return errors[0], out.getvalue(), err.getvalue()
            raise AssertionError(f'unexpected error: {errors[0]}')
    assert not expect_error, f'no error; stdout: {out.getvalue()}'
    return result, out.getvalue(), err.getvalue()


def readme_section():
    text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
    start = text.index('\n## Your own data\n')
    end = text.find('\n## ', start + 1)
    return text[start:end if end > 0 else None]


def readme_blocks(kind):
    return re.findall(rf'```{kind}\n(.*?)```', readme_section(), re.S)


def readme_config():
    (block,) = [b for b in readme_blocks('yaml') if b.startswith('data:')]
    return block


def readme_commands():
    """The README section's shell lines: (the TOY overrides, the python commands in order)."""
    lines = [line.split('  #')[0].strip()
             for b in readme_blocks('bash') for line in b.replace('\\\n', ' ').splitlines()]
    toy = next(line for line in lines if line.startswith('TOY='))
    return toy[len('TOY='):].strip('"'), [line for line in lines if line.startswith('python ')]


def png(path):
    with Image.open(path) as img:
        return img.mode, np.asarray(img)


def stats_files(root):
    return {n: json.load(open(os.path.join(root, n))) for n in
            ('sample_class_stats.json', 'sample_class_stats_dict.json', 'samples_with_class.json')}


def convert_toy(root, *extra):
    for domain in ('source', 'target_val'):
        run_cli(convert_labels.main, ['folder', f'{root}/{domain}', '--img-dir', 'images', '--label-dir', 'labels',
                                      '--label-suffix', '.png', '--id-map', f'{root}/map.yaml', '--quiet', *extra],
                expect_error=False)


# --------------------------------------------------------------------------
# Nothing changes for the Cityscapes benchmarks
# --------------------------------------------------------------------------

def test_cityscapes_outputs_are_unchanged():
    """Resolved configs of configs/*.yaml byte for byte, convert_labels' GTA / Cityscapes / Synthia
    outputs and statistics, training samples, RCS, evaluation items, colour predictions, exports and
    metrics: as written by the code before data.classes (tests/cityscapes_pins.py)."""
    import glob

    import cityscapes_pins
    dumps, pins = cityscapes_pins.compute()
    fixture = cityscapes_pins.FIXTURE
    shipped = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, 'configs', '*.yaml')))
    pinned = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(fixture, 'configs', '*.yaml')))
    assert set(pinned) - {'defaults'} <= set(shipped)
    for name in pinned:
        with open(os.path.join(fixture, 'configs', name + '.yaml')) as f:
            assert dumps[name] == f.read(), f'the resolved config of {name} changed'
    with open(os.path.join(fixture, 'pins.json')) as f:
        expected = json.load(f)
    got = json.loads(json.dumps(pins, sort_keys=True))
    for key in expected:
        assert got[key] == expected[key], key
    assert list(pins['metrics']['IoU']) == list(mic_data.CLASSES)  # the order of the table, too


def test_cityscapes_tables_and_defaults():
    cfg = load_config()
    assert cfg.data.classes == 'cityscapes' and cfg.model.num_classes == 19
    assert 'classes' not in mic_config.stored(cfg)['data']  # stored configs stay as they were
    assert cfg.uda.fd_classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    table = mic_data.class_table(cfg.data)
    assert table.names == mic_data.CLASSES and table.palette == mic_data.PALETTE and table.ignore_index == 255
    assert table.things == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    # the preset named explicitly is the default, and resolves to the same config
    assert load_config(None, ['data.classes=cityscapes']) == cfg
    # configs stored before data.classes (our old checkpoints) resolve as they did
    assert merge(mic_config.defaults(), mic_config.stored(cfg)) == cfg
    # a config without data.classes but another num_classes (written before data.classes): classes '0'..'K-1'
    old = load_config(None, ['model.num_classes=7', 'uda.fd_lambda=0'])
    t7 = mic_data.class_table(old.data, old.model.num_classes)
    assert t7.names == tuple(str(i) for i in range(7)) and t7.palette == mic_data.PALETTE[:7]
    assert mic_eval.compute_metrics(np.eye(7))['IoU'] == {str(i): 100.0 for i in range(7)}


# --------------------------------------------------------------------------
# data.classes: the schema
# --------------------------------------------------------------------------

def test_classes_schema_and_what_follows_from_it(tmp_path):
    path = tmp_path / 'task.yaml'
    path.write_text(readme_config())
    cfg = load_config(str(path))
    assert cfg.data.classes == {'names': TOY_NAMES, 'palette': [list(c) for c in TOY_COLOURS], 'ignore_index': 255,
                                'things': ['car']}
    assert cfg.model.num_classes == 5 and cfg.uda.fd_classes == [4]
    assert cfg.data.source.img_dir == 'images' and cfg.data.source.label_dir == 'labels'
    assert 'label_dir' not in mic_config.stored(cfg)['data']['target']  # optional keys at their default: not stored
    assert cfg.data.target.label_dir is None  # (in memory every key is there)
    # the resolved config round-trips, and is what a checkpoint stores and mic_eval reads back
    (tmp_path / 'resolved.yaml').write_text(dump_yaml(cfg))
    assert load_config(str(tmp_path / 'resolved.yaml')) == cfg
    assert merge(mic_config.defaults(), mic_config.stored(cfg)) == cfg
    # a mapping with names is a class table of its own: the other keys take their defaults
    (tmp_path / 'names.yaml').write_text('data:\n  classes:\n    names: [sea, ship]\nuda:\n  fd_lambda: 0\n')
    alone = load_config(str(tmp_path / 'names.yaml'))
    assert alone.data.classes == {'names': ['sea', 'ship'], 'palette': None, 'ignore_index': 255, 'things': []}
    assert load_config(str(path), ['data.classes.names=[a, b]', 'uda.fd_lambda=0']).data.classes.palette is None
    # a list of names is the short form; things by train id become names; fd_classes follows
    short = load_config(None, ['data.classes=[sky, sea, ship]', 'data.classes.things=[2]'])
    assert short.data.classes == {'names': ['sky', 'sea', 'ship'], 'palette': None, 'ignore_index': 255,
                                  'things': ['ship']}
    assert short.model.num_classes == 3 and short.uda.fd_classes == [2]
    table = mic_data.class_table(short.data)
    assert table.palette == ((128, 0, 0), (0, 128, 0), (128, 128, 0))  # generated (PASCAL VOC's, black skipped)
    # a merged update of the classes makes num_classes and fd_classes follow, unless given
    other = merge(cfg, {'data': {'classes': ['a', 'b']}, 'uda': {'fd_lambda': 0}})
    assert other.model.num_classes == 2 and other.uda.fd_classes == []
    back = merge(cfg, {'data': {'classes': 'cityscapes'}})
    assert back.data.classes == 'cityscapes' and back.model.num_classes == 19 and back.uda.fd_classes[0] == 6
    # an explicit uda.fd_classes takes precedence over the things; one --opt key of the mapping updates it
    assert load_config(str(path), ['uda.fd_classes=[1, 4]']).uda.fd_classes == [1, 4]
    assert load_config(str(path), ['data.classes.palette=null']).data.classes.names == TOY_NAMES
    assert load_config(str(path), ['model.num_classes=5']).model.num_classes == 5


@pytest.mark.parametrize('overrides,message', [
    (['model.num_classes=6'], "config keys 'model.num_classes' (6) and 'data.classes' (5 names) disagree"),
    (['data.classes.palette=[[1, 2, 3]]'], "config key 'data.classes.palette': 1 colours for 5 classes"),
    (['data.classes.palette=[[0,0,0],[0,0,0],[0,0,0],[0,0,0],[0,0,256]]'],
     "config key 'data.classes.palette[4]': expected [r, g, b] with values 0..255 (the colour of 'car')"),
    (['data.classes.palette=[[0,0,0],[0,0,0],[0,0,0],[0,0,0],[0,0]]'], "'data.classes.palette[4]'"),
    (['data.classes.things=[cars]'], "config key 'data.classes.things[0]': 'cars' is not one of "
                                     "data.classes.names (did you mean 'car'?)"),
    (['data.classes.things=[5]'], "config key 'data.classes.things[0]': 5 is not a train id"),
    (['data.classes.ignore_index=2'], "config key 'data.classes.ignore_index': 2 is the train id of class "
                                      "'low vegetation'"),
    (['data.classes.ignore_index=256'], "'data.classes.ignore_index': expected a label value in 0..255"),
    (['data.classes.names=[a, b, a, c, d]'], "config key 'data.classes.names': 'a' is listed twice"),
    (['data.classes.names=[]'], "config key 'data.classes.names': needs at least one class name"),
    (['data.classes.nmes=[a]'], "unknown config key 'data.classes.nmes' (did you mean names?)"),
    (['data.classes=[a, 3]'], "config key 'data.classes[1]': expected str"),
    (['data.classes=mapillary'], "config key 'data.classes': expected 'cityscapes' | list of str | a mapping"),
    (['uda.fd_classes=[6]'], "config key 'uda.fd_classes[0]': 6 is not a train id of the 5 classes"),
    (['data.classes.things=[]', 'uda.fd_lambda=0.005'], "config key 'uda.fd_lambda': the ImageNet feature "
                                                        "distance needs thing classes"),
])
def test_bad_classes_name_the_key(tmp_path, overrides, message):
    path = tmp_path / 'task.yaml'
    path.write_text(readme_config())
    with pytest.raises(ConfigError) as e:
        load_config(str(path), overrides)
    assert message in str(e.value)
    # every script stops on it with one line
    err, _, _ = run_cli(mic_config.main, [path, '--opt', *overrides])
    assert message in err


# --------------------------------------------------------------------------
# convert_labels.py folder
# --------------------------------------------------------------------------

@pytest.fixture
def toy(tmp_path):
    root = str(tmp_path / 'toy')
    return root, write_toy_dataset(root)


def test_rgb_labels_value_by_value_and_statistics(toy):
    root, truth = toy
    _, out, _ = run_cli(convert_labels.main, ['folder', f'{root}/source', '--img-dir', 'images', '--label-dir',
                                              'labels', '--label-suffix', '.png', '--id-map', f'{root}/map.yaml',
                                              '--quiet'], expect_error=False)
    assert '6 label files: 6 converted, 0 already up to date' in out and '5 classes (train ids 0..4)' in out
    labels = sorted(p for p in truth if '/source/' in p)
    expected_stats = []
    for path in labels:
        mode, ids = png(path[:-len('.png')] + '_labelTrainIds.png')
        assert mode == 'L'
        np.testing.assert_array_equal(ids, truth[path])  # every pixel: the colour's train id, clutter 255
        counts = np.bincount(truth[path].ravel(), minlength=256)
        expected_stats.append({**{str(c): int(counts[c]) for c in range(5) if counts[c]},
                               'file': path[:-len('.png')] + '_labelTrainIds.png'})
    # the statistics in the format of the other datasets, which rare class sampling reads
    stats = stats_files(f'{root}/source')
    assert stats['sample_class_stats.json'] == expected_stats
    assert stats['sample_class_stats_dict.json'] == {e['file']: {k: v for k, v in e.items() if k != 'file'}
                                                     for e in expected_stats}
    assert set(stats['samples_with_class.json']) == {'0', '1', '2', '3', '4'}
    assert stats['samples_with_class.json']['4'] == [[e['file'], e['4']] for e in expected_stats if '4' in e]
    classes, probs = mic_data.rcs_class_probs(f'{root}/source/sample_class_stats.json', 0.01)
    assert classes[0] == 4 and sorted(classes) == [0, 1, 2, 3, 4]  # cars are the rarest
    # idempotent: a re-run converts nothing and writes the same statistics; --nproc the same again
    _, out, _ = run_cli(convert_labels.main, ['folder', f'{root}/source', '--img-dir', 'images', '--label-dir',
                                              'labels', '--label-suffix', '.png', '--id-map', f'{root}/map.yaml',
                                              '--quiet', '--nproc', '2'], expect_error=False)
    assert '0 converted, 6 already up to date' in out and stats_files(f'{root}/source') == stats
    # a changed mapping converts everything again
    os.utime(f'{root}/map.yaml')
    assert convert_labels.convert_folder(f'{root}/source', '.png', img_dir='images', label_dir='labels',
                                         id_map=f'{root}/map.yaml', progress=False)['converted'] == 6


def test_id_labels_16_bit_side_by_side_and_train_ids(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / 'ids'
    raw = {}
    for i, (w, h) in enumerate([(40, 30), (50, 20)]):
        ids = rng.choice(np.array([0, 7, 8, 1000, 1001], np.uint16), (h, w))
        _save(str(root / 'a' / f'x{i}.jpg'), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        Image.fromarray(ids).save(root / 'a' / f'x{i}_mask.png')  # 16-bit greyscale
        raw[i] = ids
    (tmp_path / 'map.yaml').write_text('classes:\n  0: [7, 8]\n  1: 1000\n  2: 1001\nignore: 0\n')
    s = convert_labels.convert_folder(str(root), '_mask.png', img_suffix='.jpg', id_map=str(tmp_path / 'map.yaml'),
                                      progress=False)
    assert s['files'] == 2 and s['num_classes'] == 3
    lut = {0: 255, 7: 0, 8: 0, 1000: 1, 1001: 2}
    for i, ids in raw.items():
        _, out = png(root / 'a' / f'x{i}_labelTrainIds.png')
        np.testing.assert_array_equal(out, np.vectorize(lut.get)(ids))
    # the training listing takes the outputs, not the raw masks, as the labels of the images
    samples = mic_data.list_samples({'type': 'folder', 'root': str(root), 'img_suffix': '.jpg',
                                     'label_suffix': '_labelTrainIds.png'})
    assert [os.path.basename(lbl) for _, lbl in samples] == ['x0_labelTrainIds.png', 'x1_labelTrainIds.png']
    # labels that hold train ids already: --num-classes checks and counts them in place
    s = convert_labels.convert_folder(str(root), '_labelTrainIds.png', img_suffix='.jpg', num_classes=3,
                                      progress=False)
    assert s['converted'] == 0 and s['class_pixels'] == [int(np.isin(np.concatenate([r.ravel() for r in raw.values()]),
                                                                     v).sum()) for v in ([7, 8], [1000], [1001])]
    with pytest.raises(DataError, match=r"2 label file\(s\) hold values not in the train ids 0\.\.1 "
                                        r"\(--num-classes 2\) and the ignore value: 2 \("):
        convert_labels.convert_folder(str(root), '_labelTrainIds.png', img_suffix='.jpg', num_classes=2,
                                      progress=False)


def _write_pair(root, name, label, size=None, suffix='.png'):
    h, w = label.shape[:2]
    iw, ih = size or (w, h)
    _save(os.path.join(root, 'images', name + '.png'), np.zeros((ih, iw, 3), np.uint8))
    _save(os.path.join(root, 'labels', name + suffix), label)


def folder_args(root, *extra):
    return ['folder', root, '--img-dir', 'images', '--label-dir', 'labels', '--label-suffix', '.png', '--quiet',
            *extra]


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_folder_conversion_errors_name_the_files(tmp_path, toy):
    root, _ = toy
    src = f'{root}/source'
    before = listing(src)
    # a colour the map does not list: every file and value named, nothing half-written, no statistics
    bad = np.array(Image.open(f'{src}/labels/s002.png'))
    bad[:2, :3] = (12, 34, 56)
    bad[5, 5] = (0, 0, 0)
    _save(f'{src}/labels/s002.png', bad)
    bad4 = np.array(Image.open(f'{src}/labels/s004.png'))
    bad4[0, 0] = (12, 34, 56)
    _save(f'{src}/labels/s004.png', bad4)
    err, _, _ = run_cli(convert_labels.main, folder_args(src, '--id-map', f'{root}/map.yaml'))
    assert err == (f'error: 2 label file(s) hold values not in the mapping file {root}/map.yaml: (12, 34, 56) (7 '
                   f'pixels in 2 file(s), e.g. {src}/labels/s002.png); (0, 0, 0) (1 pixels in 1 file(s), e.g. '
                   f'{src}/labels/s002.png). add each to a class under classes: or to ignore:; no statistics were '
                   f'written (the files converted so far are complete; a re-run converts the rest)')
    after = listing(src)
    assert not [f for f in after if f.endswith('.json') or f.endswith('.tmp')]
    assert sorted(set(after) - set(before)) == [f'labels/s00{i}_labelTrainIds.png' for i in (0, 1, 3, 5)]
    for f in set(after) - set(before):  # each output is complete
        assert png(os.path.join(src, f))[1].shape[0] > 0

    # mapping files that miss a train id, list a value twice, or do not parse
    for text, message in [
        ('format: rgb\nclasses:\n  0: [255, 255, 255]\n  2: [0, 0, 255]\n',
         'classes: train ids run from 0 to 2 without gaps; 1 is missing'),
        ('format: rgb\nclasses:\n  0: [255, 255, 255]\n  1: [255, 255, 255]\n',
         'classes.1: value (255, 255, 255) is listed under classes.0 already'),
        ('format: rgb\nclasses:\n  0: [255, 255]\n', "classes.0: expected an RGB colour [r, g, b] (0..255)"),
        ('classes:\n  0: [255, 255, 255]\n', 'classes.0: a label id is listed twice in [255, 255, 255] '
                                             '(colour-coded labels need format: rgb)'),
        ('classes:\n  0: [1, 2, 70000]\n', 'classes.0: expected a label id 0..65535 or a list of them, got '
                                           '[1, 2, 70000] (colour-coded labels need format: rgb)'),
        ('format: hsv\nclasses: {0: 1}\n', "format: expected id or rgb, got 'hsv'"),
        ('formats: rgb\n', 'formats: unknown key; the keys are format, classes, ignore'),
        ('classes: [1, 2]\n', 'classes: expected a mapping train id -> raw value(s)'),
    ]:
        (tmp_path / 'bad.yaml').write_text(text)
        err, _, _ = run_cli(convert_labels.main, folder_args(src, '--id-map', tmp_path / 'bad.yaml'))
        assert err == f'error: mapping file {tmp_path}/bad.yaml: {message}' or message in err, err
    # colour labels with a map of ids
    (tmp_path / 'ids.yaml').write_text('classes: {0: 1, 1: 2}\n')
    err, _, _ = run_cli(convert_labels.main, folder_args(src, '--id-map', tmp_path / 'ids.yaml'))
    assert err.startswith(f'error: label {src}/labels/s000.png has mode \'RGB\' (a colour image), but '
                          f'{tmp_path}/ids.yaml has format: id; for colour-coded labels write a mapping file with '
                          f'format: rgb')


def test_folder_pairing_and_size_errors(tmp_path):
    root = str(tmp_path / 'd')
    label = np.zeros((8, 10, 3), np.uint8) + 255
    for name in ('a', 'b', 'c'):
        _write_pair(root, name, label)
    (tmp_path / 'map.yaml').write_text('format: rgb\nclasses: {0: "#ffffff"}\n')
    args = folder_args(root, '--id-map', tmp_path / 'map.yaml')
    assert run_cli(convert_labels.main, args, expect_error=False)[1].startswith('3 label files: 3 converted')
    os.remove(f'{root}/sample_class_stats.json')
    # an image without its label
    os.remove(f'{root}/labels/b.png')
    err, _, _ = run_cli(convert_labels.main, args)
    assert err == (f"error: 1 image(s) have no label (3 images ending with '.png' under {root}/images, 2 labels "
                   f"ending with '.png' under {root}/labels), e.g. {root}/images/b.png: expected "
                   f"{root}/labels/b.png")
    # a label without its image
    _write_pair(root, 'b', label)
    os.remove(f'{root}/images/c.png')
    err, _, _ = run_cli(convert_labels.main, args)
    assert err == (f"error: 1 label(s) have no image (2 images ending with '.png' under {root}/images, 3 labels "
                   f"ending with '.png' under {root}/labels), e.g. {root}/labels/c.png: expected "
                   f"{root}/images/c.png")
    # a label of another size than its image
    _write_pair(root, 'c', label, size=(12, 8))
    err, _, _ = run_cli(convert_labels.main, args)
    assert err == (f"error: label {root}/labels/c.png is 10x8 but its image {root}/images/c.png is 12x8; a label "
                   f"must have its image's size")
    assert not os.path.exists(f'{root}/sample_class_stats.json')
    # usage errors
    err, _, _ = run_cli(convert_labels.main, ['folder', tmp_path / 'nowhere', '--label-suffix', '.png',
                                              '--num-classes', '3'])
    assert err == f'error: dataset root {tmp_path}/nowhere does not exist'
    err, _, _ = run_cli(convert_labels.main, ['folder', root, '--label-suffix', '.png', '--num-classes', '3'])
    assert 'labels beside the images need another suffix than the images' in err


def test_convert_cli_usage(capsys):
    for extra in ([], ['--id-map', 'm', '--num-classes', '3']):
        with pytest.raises(SystemExit):
            convert_labels.main(['folder', 'data/x', '--label-suffix', '.png', *extra])
        assert 'folder: give --id-map MAP.yaml (raw ids or colours -> train ids) or --num-classes K' in \
            capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_labels.main(['gta', 'data/gta', '--id-map', 'map.yaml'])
    assert '--id-map belongs to the folder layout' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_labels.main(['folder', 'data/x', '--id-map', 'map.yaml'])
    assert 'folder: --label-suffix is required' in capsys.readouterr().err


# --------------------------------------------------------------------------
# mic_data: the folder layout, label values, rare class sampling with any classes
# --------------------------------------------------------------------------

def _folder_cfg(root, **kw):
    return {'type': 'folder', 'root': str(root), 'img_dir': 'images', 'label_dir': 'labels',
            'label_suffix': '_labelTrainIds.png', **kw}


def _write_train_ids(root, name, ids, size=None):
    h, w = ids.shape
    _save(os.path.join(root, 'images', name + '.png'), np.zeros((h, w, 3), np.uint8) if size is None else
          np.zeros((size[1], size[0], 3), np.uint8))
    os.makedirs(os.path.join(root, 'labels', os.path.dirname(name)), exist_ok=True)
    Image.fromarray(ids).save(os.path.join(root, 'labels', name + '_labelTrainIds.png'))


def test_folder_listing_with_img_dir_and_label_dir(tmp_path):
    root = tmp_path / 'd'
    for name in ('a/1', 'b/1', 'c'):
        _write_train_ids(root, name, np.zeros((8, 8), np.uint8))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'labels' / 'a' / '1.png')  # a raw label: not listed
    samples = mic_data.list_samples(_folder_cfg(root))
    assert [(os.path.relpath(i, root), os.path.relpath(lbl, root)) for i, lbl in samples] == [
        ('images/a/1.png', 'labels/a/1_labelTrainIds.png'), ('images/b/1.png', 'labels/b/1_labelTrainIds.png'),
        ('images/c.png', 'labels/c_labelTrainIds.png')]
    # no img_dir: images anywhere under the root, except in the label folder (raw labels there are no images)
    flat = tmp_path / 'flat'
    _save(str(flat / 'x.png'), np.zeros((8, 8, 3), np.uint8))
    _save(str(flat / 'labels' / 'x.png'), np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / 'labels' / 'x_labelTrainIds.png')
    assert mic_data.list_samples({**_folder_cfg(flat), 'img_dir': None}) == [
        (str(flat / 'x.png'), str(flat / 'labels' / 'x_labelTrainIds.png'))]
    assert mic_data.has_labels(_folder_cfg(root))
    assert not mic_data.has_labels({**_folder_cfg(root), 'label_suffix': None})
    # a label without its image (count mismatch) and an image without its label name the file
    _write_train_ids(root, 'd', np.zeros((8, 8), np.uint8))
    os.remove(root / 'images' / 'd.png')
    with pytest.raises(DataError, match=r"1 label\(s\) under .*/labels have no image \(3 images, 4 labels\), e\.g\. "
                                        r".*labels/d_labelTrainIds\.png: expected its image at .*images/d\.png"):
        mic_data.list_samples(_folder_cfg(root))
    assert len(mic_data.list_samples(_folder_cfg(root), need_labels=False)) == 3  # target images: labels unused
    os.remove(root / 'labels' / 'c_labelTrainIds.png')
    with pytest.raises(DataError, match=r'image .*images/c\.png has no label: expected .*labels/c_labelTrainIds\.png'):
        mic_data.list_samples(_folder_cfg(root))


def _task(root, names, **data):
    return {'classes': {'names': names}, 'source': _folder_cfg(root, img_scale=[16, 16]),
            'target': {'type': 'folder', 'root': str(root), 'img_dir': 'images', 'img_scale': [16, 16]},
            'crop_size': [8, 8], 'rcs': {'min_pixels': 2, 'min_crop_ratio': 0.0}, 'num_workers': 0, **data}


def test_training_labels_outside_the_class_table_name_the_file(tmp_path):
    root = tmp_path / 'd'
    ids = np.zeros((16, 16), np.uint8)
    ids[:4] = 1
    ids[4:6] = 255
    _write_train_ids(root, 'ok', ids)
    bad = ids.copy()
    bad[8:, :3] = 3
    bad[0, 0] = 7
    _write_train_ids(root, 'bad', bad)
    convert_labels.convert_folder(str(root), '_labelTrainIds.png', img_dir='images', label_dir='labels',
                                  num_classes=8, progress=False)  # statistics (values up to 7 are fine for 8)
    ds = mic_data.UDADataset(_task(root, ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']), seed=0)
    ds[0]
    for names, found in ((['ground', 'roof'], '3 (24 pixels), 7 (1 pixels)'), (['a', 'b', 'c', 'd'], '7 (1 pixels)')):
        data = _task(root, names, rcs={'enabled': False})
        ds = mic_data.UDADataset(data, seed=0)
        with pytest.raises(DataError) as e:
            for k in range(20):
                ds[k]
        K = len(names)
        assert str(e.value) == (f'label {root}/labels/bad_labelTrainIds.png holds values outside the train ids '
                                f'0..{K - 1} of the {K} classes (data.classes) and 255 (unlabelled): {found}; convert '
                                f'raw labels to train ids first (python convert_labels.py), or correct data.classes')
    # statistics of other labels: rare class sampling says so
    with pytest.raises(DataError, match=r'sample_class_stats\.json counts pixels of train id 7, but data\.classes has '
                                        r'2 classes \(train ids 0\.\.1\): statistics of other labels\? re-run '
                                        r'`python convert_labels\.py folder'):
        mic_data.UDADataset(_task(root, ['ground', 'roof']), seed=0)
    # a label of another size than its image (folder datasets: exactly its size)
    _write_train_ids(root, 'ok', ids, size=(17, 16))
    ds = mic_data.UDADataset(_task(root, list('abcdefgh'), rcs={'enabled': False}), seed=0)
    with pytest.raises(DataError, match=r'label .*ok_labelTrainIds\.png is 16x16 but its image .*ok\.png is 17x16'):
        for k in range(20):
            ds[k]


def test_ignore_index_of_label_files_reads_as_255(tmp_path):
    root = tmp_path / 'd'
    ids = np.array([[0, 1, 9], [9, 2, 0]], np.uint8)
    _write_train_ids(root, 'x', ids)
    table = mic_data.class_table({'names': ['a', 'b', 'c'], 'ignore_index': 9})
    ev = mic_data.EvalDataset(_folder_cfg(root, img_scale=[3, 2]), classes=table)
    np.testing.assert_array_equal(ev[0]['label'].numpy(), [[0, 1, 255], [255, 2, 0]])
    with pytest.raises(DataError, match=r'holds values outside the train ids 0\.\.2 of the 3 classes '
                                        r'\(data\.classes\) and 255 \(unlabelled\): 9 \(2 pixels\)'):
        mic_data.EvalDataset(_folder_cfg(root, img_scale=[3, 2]), classes=mic_data.class_table(['a', 'b', 'c']))[0]


def test_rcs_with_labels_of_the_same_name_in_subfolders(tmp_path):
    """Folder datasets may repeat file names in subfolders: the statistics are matched on enough of the path."""
    root = tmp_path / 'd'
    rare = np.zeros((16, 16), np.uint8)
    rare[:8, :8] = 1
    _write_train_ids(root, 'x/1', np.zeros((16, 16), np.uint8))
    _write_train_ids(root, 'y/1', rare)
    convert_labels.convert_folder(str(root), '_labelTrainIds.png', img_dir='images', label_dir='labels',
                                  num_classes=2, progress=False)
    ds = mic_data.UDADataset(_task(root, ['ground', 'roof']), seed=0)
    assert ds.rcs_classes == [1, 0]
    assert [os.path.relpath(ds.source[i][1], root) for i in ds.rcs_files[1]] == ['labels/y/1_labelTrainIds.png']


# --------------------------------------------------------------------------
# mic_eval with any classes
# --------------------------------------------------------------------------

def test_metrics_with_class_names_and_synthia_subset_by_name():
    conf = np.diag([3, 0, 5]).astype(np.int64)
    conf[0, 1] = 1
    m = mic_eval.compute_metrics(conf, ['sea', 'ship', 'sky'])
    assert list(m['IoU']) == ['sea', 'ship', 'sky'] and m['IoU']['ship'] == 0.0 and m['IoU']['sky'] == 100.0
    with pytest.raises(ValueError, match="the classes lack \\['road'"):
        mic_eval.compute_metrics(conf, ['sea', 'ship', 'sky'], synthia16=True)
    # the Synthia subset is looked up by name in the class table, in whatever order it comes
    conf19 = np.diag(np.arange(1, 20)).astype(np.int64)
    conf19[9, 9] = conf19[14, 14] = conf19[16, 16] = 0  # terrain, truck, train: absent
    conf19[0, 9] = 5  # road predicted as terrain
    base = mic_eval.compute_metrics(conf19, synthia16=True)
    order = list(range(19))[::-1]
    shuffled = mic_eval.compute_metrics(conf19[np.ix_(order, order)], [mic_data.CLASSES[i] for i in order],
                                        synthia16=True)
    assert shuffled['mIoU16'] == pytest.approx(base['mIoU16']) and shuffled['IoU'] == base['IoU']


def test_evaluate_names_colours_and_no_mIoU16_for_other_classes(tmp_path):
    import torch
    root = tmp_path / 'd'
    ids = np.array([[0, 1, 2, 255]] * 4, np.uint8)
    _write_train_ids(root, 'x', ids)

    class Fixed(torch.nn.Module):  # predicts train id = column index modulo 3
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def inference(self, img, out_size=None):
            cls = torch.arange(img.shape[-1]) % 3
            return torch.nn.functional.one_hot(cls, 3).T[None, :, None, :].float().expand(1, 3, *img.shape[-2:])

    palette = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    classes = {'names': ['sea', 'ship', 'sky'], 'palette': palette}
    m = mic_eval.evaluate(Fixed(), _folder_cfg(root, img_scale=[4, 4]), num_classes=3, classes=classes,
                          pred_dir=str(tmp_path / 'preds'), progress=False, num_workers=0, synthia16=True)
    assert m['IoU'] == {'sea': 100.0, 'ship': 100.0, 'sky': 100.0} and 'mIoU16' not in m
    pred = np.asarray(Image.open(tmp_path / 'preds' / 'x.png'))
    assert [tuple(c) for c in pred[0]] == [(10, 20, 30), (40, 50, 60), (70, 80, 90), (10, 20, 30)]
    with pytest.raises(ValueError, match='3 classes for a model of 4'):
        mic_eval.evaluate(Fixed(), _folder_cfg(root, img_scale=[4, 4]), num_classes=4, classes=classes)


def test_report_keeps_the_order_of_any_classes():
    assert mic_report._class_order(['car', 'building', 'tree']) == ['car', 'building', 'tree']
    assert mic_report._class_order(['car', 'road', 'sky']) == ['road', 'sky', 'car']  # Cityscapes: train-id order


# --------------------------------------------------------------------------
# A 5-class task end to end: the README's commands on the toy data
# --------------------------------------------------------------------------

FAST = ['model.decode_head.embed_dims=32', 'model.hrda.hr_crop_size=[32,32]', 'data.crop_size=[64,64]',
        'data.source.img_scale=[96,96]', 'data.target.img_scale=[96,96]', 'data.val.img_scale=[96,96]',
        'data.rcs.min_pixels=20', 'data.num_workers=0', 'train.max_iters=4', 'train.log_interval=2',
        'train.eval_interval=2', 'train.ckpt_interval=4', 'train.debug_img_interval=2', 'train.device=cpu']
SCRIPTS = {'convert_labels.py': convert_labels.main, 'mic_train.py': mic_train.main, 'mic_eval.py': mic_eval.main}


def run_readme_command(line, base, *extra):
    """A python command of the README section, with data/toy, work_dirs/toy and my_task.yaml under base."""
    import shlex
    toy_opts, _ = readme_commands()
    line = line.replace('$TOY', toy_opts)
    for rel in ('data/toy', 'work_dirs/toy', 'my_task.yaml'):
        line = line.replace(rel, f'{base}/{rel}')
    argv = shlex.split(line)
    assert argv[0] == 'python' and argv[1] in SCRIPTS, line
    args = argv[2:]
    if extra:
        args += list(extra) if '--opt' in args else ['--opt', *extra]
    return run_cli(SCRIPTS[argv[1]], args, expect_error=False)


@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
    """The README's worked example, shortened to 4 iterations: convert, train, (evaluate, predict in the tests)."""
    base = str(tmp_path_factory.mktemp('readme'))
    truth = write_toy_dataset(f'{base}/data/toy')
    with open(f'{base}/my_task.yaml', 'w') as f:
        f.write(readme_config().replace('data/toy', f'{base}/data/toy')
                .replace('work_dirs/toy', f'{base}/work_dirs/toy'))
    _, commands = readme_commands()
    converts = [c for c in commands if c.startswith('python convert_labels.py folder')]
    assert len(converts) == 2
    for line in converts:
        run_readme_command(line, base)
    (train,) = [c for c in commands if c.startswith('python mic_train.py') and '$TOY' in c]
    metrics, out, _ = run_readme_command(train, base, *FAST)
    return {'base': base, 'work': f'{base}/work_dirs/toy', 'metrics': metrics, 'out': out, 'truth': truth,
            'commands': commands}


def colours_of(path):
    return {tuple(c) for c in np.asarray(Image.open(path).convert('RGB')).reshape(-1, 3)}


def test_readme_task_trains_and_evaluates(toy_run):
    work, metrics = toy_run['work'], toy_run['metrics']
    # the class names of data.classes, in train-id order, in metrics.json and the evaluation log
    stored = json.load(open(f'{work}/metrics.json'))
    assert list(stored['IoU']) == TOY_NAMES and stored['mIoU'] == metrics['mIoU'] and 0 <= metrics['mIoU'] <= 100
    assert 'mIoU16' not in stored and stored['num_images'] == 3
    evals = [json.loads(line) for line in open(f'{work}/log.jsonl') if '"eval"' in line]
    assert [e['iteration'] for e in evals] == [2, 4] and all(list(e['IoU']) == TOY_NAMES for e in evals)
    assert 'target mIoU after 4 iterations' in toy_run['out']
    # the predictions at the images' own sizes, in the palette of data.classes
    names = sorted(os.listdir(f'{work}/preds'))
    assert names == ['v000.png', 'v001.png', 'v002.png']
    for name in names:
        img = Image.open(f"{toy_run['base']}/data/toy/target_val/images/{name}")
        assert Image.open(f'{work}/preds/{name}').size == img.size
        assert colours_of(f'{work}/preds/{name}') <= set(TOY_COLOURS)
    # the debug grids draw labels in that palette too: the source label column (the second, 64 pixels
    # wide, below a 14-pixel header) holds its colours and black (unlabelled) only
    grid = np.asarray(Image.open(f'{work}/debug/000000.png').convert('RGB'))
    column = {tuple(c) for c in grid[14:, 64:128].reshape(-1, 3)}
    assert column <= set(TOY_COLOURS) | {(0, 0, 0)} and len(column & set(TOY_COLOURS)) >= 2
    # the checkpoint carries the classes; the model has 5 outputs
    import torch
    ckpt = torch.load(f'{work}/latest.pth', weights_only=True)
    assert ckpt['config']['data']['classes']['names'] == TOY_NAMES and ckpt['config']['model']['num_classes'] == 5
    assert ckpt['modules']['student']['decode_head.head.conv_seg.weight'].shape[0] == 5
    # the report orders the classes as the task does (some share names with Cityscapes: building)
    assert mic_report._class_order(list(stored['IoU'])) == TOY_NAMES


def test_readme_evaluate_and_predict(toy_run):
    base, work = toy_run['base'], toy_run['work']
    evaluate = [c for c in toy_run['commands'] if c.startswith('python mic_eval.py') and '--images' not in c]
    predict = [c for c in toy_run['commands'] if c.startswith('python mic_eval.py') and '--images' in c]
    assert evaluate and predict
    os.remove(f'{work}/metrics.json')
    metrics, out, _ = run_readme_command(evaluate[0], base, 'data.num_workers=0')
    assert re.search(r'^impervious surfaces +\d+\.\d\d$', out, re.M) and re.search(r'^car +\d+\.\d\d$', out, re.M)
    assert list(json.load(open(f'{work}/metrics.json'))['IoU']) == TOY_NAMES
    assert metrics['mIoU'] == pytest.approx(toy_run['metrics']['mIoU'])
    _, out, _ = run_readme_command(predict[0], base)
    images = sorted(os.listdir(f'{base}/data/toy/target/images'))
    out_dir = f'{work}/pred_target'
    assert sorted(os.listdir(out_dir)) == sorted([n[:-4] + '_pred.png' for n in images] +
                                                 [n[:-4] + '_overlay.png' for n in images])
    for n in images:
        assert colours_of(f'{out_dir}/{n[:-4]}_pred.png') <= set(TOY_COLOURS)
        size = Image.open(f'{base}/data/toy/target/images/{n}').size
        assert Image.open(f'{out_dir}/{n[:-4]}_overlay.png').size == size


def test_target_without_labels_trains_and_predicts(toy_run, tmp_path):
    """No labelled target images at all: data.val is the unlabelled target folder. Training runs,
    skips the periodic evaluations, writes the predictions and says it cannot compute the mIoU."""
    base = toy_run['base']
    work = str(tmp_path / 'nolabels')
    argv = ['--cfg', f'{base}/my_task.yaml', '--opt', *readme_commands()[0].split(), *FAST,
            f'data.val={{type: folder, root: {base}/data/toy/target, img_dir: images, label_dir: null, '
            f'label_suffix: null}}',
            f'train.work_dir={work}']
    metrics, out, _ = run_cli(mic_train.main, argv, expect_error=False)
    assert metrics['mIoU'] is None and metrics['num_images'] == 4
    assert 'has no labels: cannot compute mIoU, predictions only' in out
    assert 'no mIoU without labels: predictions in' in out
    assert sorted(os.listdir(f'{work}/preds')) == ['t000.png', 't001.png', 't002.png', 't003.png']
    assert not [line for line in open(f'{work}/log.jsonl') if '"eval"' in line]  # no periodic evaluation
    assert json.load(open(f'{work}/metrics.json'))['mIoU'] is None
    # the same command again reports the finished run; mic_eval predicts and says why there is no mIoU
    assert run_cli(mic_train.main, argv, expect_error=False)[0]['mIoU'] is None
    result, out, _ = run_cli(mic_eval.main, ['--ckpt', f'{work}/latest.pth', '--out', tmp_path / 'ev', '--opt',
                                             'data.num_workers=0'], expect_error=False)
    assert result is None and 'has no labels (no label_suffix): cannot compute mIoU' in out
    assert len(os.listdir(tmp_path / 'ev' / 'preds')) == 4


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: python tests/test_own_data.py OUT_FOLDER   (writes the toy task of the README)')
    write_toy_dataset(sys.argv[1])
    print(f'wrote the toy task to {sys.argv[1]}: source/, target/, target_val/ and map.yaml')
