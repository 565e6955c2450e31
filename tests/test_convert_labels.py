"""convert_labels.py: id -> train id tables, the 16-bit PNG decoder, RCS statistics, re-runs and errors."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import convert_labels
from helpers import write_png
from convert_labels import convert_dataset, read_png
from mic_data import DataError

# the tables of the task statement, written out independently of the code under test
GTA_TABLE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
             26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_TABLE = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def expected_train_ids(ids, table):
    return np.vectorize(lambda v: table.get(int(v), 255), otypes=[np.uint8])(ids)


FILTER_PATTERNS = {
    'none': lambda h, rng: np.zeros(h), 'sub': lambda h, rng: np.full(h, 1), 'up': lambda h, rng: np.full(h, 2),
    'average': lambda h, rng: np.full(h, 3), 'paeth': lambda h, rng: np.full(h, 4),
    'cyclic': lambda h, rng: np.arange(h) % 5, 'random': lambda h, rng: rng.integers(0, 5, h),
    'paeth_after_up': lambda h, rng: np.where(np.arange(h) % 4 == 0, 2, 4),
}


@pytest.mark.parametrize('pattern', sorted(FILTER_PATTERNS))
@pytest.mark.parametrize('dtype,channels', [(np.uint16, 3), (np.uint8, 3), (np.uint8, 1), (np.uint16, 1),
                                            (np.uint8, 4)])
def test_png_decoder_round_trip(tmp_path, pattern, dtype, channels):
    rng = np.random.default_rng(0)
    h, w = 23, 31
    hi = 65536 if dtype == np.uint16 else 256
    arr = rng.integers(0, hi, (h, w, channels)).astype(dtype)
    arr[5:12] = arr[5:12] // 4000 * 4000 if dtype == np.uint16 else arr[5:12] // 50 * 50  # some flat areas
    path = str(tmp_path / 'x.png')
    write_png(path, arr, FILTER_PATTERNS[pattern](h, rng))
    out = read_png(path)
    assert out.dtype == dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(read_png(path, channels=[0]), arr[..., :1])  # lane-subset decoding


def test_png_decoder_matches_pillow_on_pillow_files(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (40, 57, 3)).astype(np.uint8)
    arr[:, :20] = arr[:1, :20]  # vertical stripes: Pillow's adaptive filtering picks several filters
    Image.fromarray(arr).save(tmp_path / 'p.png')
    np.testing.assert_array_equal(read_png(str(tmp_path / 'p.png')), arr)


def test_png_decoder_errors(tmp_path):
    arr = np.zeros((4, 5, 3), np.uint16)
    write_png(str(tmp_path / 'i.png'), arr, np.zeros(4), interlace=1)
    with pytest.raises(DataError, match='interlaced'):
        read_png(str(tmp_path / 'i.png'))
    write_png(str(tmp_path / 'ok.png'), arr, np.zeros(4))
    data = bytearray((tmp_path / 'ok.png').read_bytes())
    (tmp_path / 'trunc.png').write_bytes(bytes(data[:-20]))
    with pytest.raises(DataError, match='truncated'):
        read_png(str(tmp_path / 'trunc.png'))
    data[40] ^= 0xFF  # inside the IDAT body
    (tmp_path / 'crc.png').write_bytes(bytes(data))
    with pytest.raises(DataError, match='CRC'):
        read_png(str(tmp_path / 'crc.png'))
    (tmp_path / 'text.png').write_text('hello')
    with pytest.raises(DataError, match='not a PNG'):
        read_png(str(tmp_path / 'text.png'))


# --------------------------------------------------------------------------
# Id tables
# --------------------------------------------------------------------------

def test_gta_every_id_value(tmp_path, write_gta):
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every possible palette index once
    root = str(tmp_path / 'gta')
    write_gta(root, [ids])
    summary = convert_dataset('gta', root, progress=False)
    out = np.asarray(Image.open(os.path.join(root, 'labels', '00001_labelTrainIds.png')))
    assert Image.open(os.path.join(root, 'labels', '00001_labelTrainIds.png')).mode == 'L'
    np.testing.assert_array_equal(out, expected_train_ids(ids, GTA_TABLE))
    assert summary['unmapped_pixels'] == 256 - 19 and summary['converted'] == 1
    assert summary['class_pixels'] == [1] * 19


def test_gta_reads_palette_indices_not_colours(tmp_path, write_gta):
    ids = np.full((4, 6), 26, np.uint8)  # car
    root = str(tmp_path / 'gta')
    write_gta(root, [ids])  # the fixture's palette maps index 26 to colour (26, 229, 182)
    convert_dataset('gta', root, progress=False)
    assert (np.asarray(Image.open(os.path.join(root, 'labels', '00001_labelTrainIds.png'))) == 13).all()


def test_gta_label_modes(tmp_path, save_png):
    root = tmp_path / 'gta'
    save_png(str(root / 'images' / '00001.png'), np.zeros((4, 4, 3), np.uint8))
    save_png(str(root / 'labels' / '00001.png'), np.full((4, 4), 7, np.uint8), mode='L')  # L is accepted too
    convert_dataset('gta', str(root), progress=False)
    assert (np.asarray(Image.open(root / 'labels' / '00001_labelTrainIds.png')) == 0).all()
    save_png(str(root / 'labels' / '00002.png'), np.zeros((4, 4, 3), np.uint8))  # RGB colour label
    with pytest.raises(DataError, match=r"00002\.png has mode 'RGB'"):
        convert_dataset('gta', str(root), progress=False)


def test_synthia_16bit_labels_all_filters(tmp_path):
    rng = np.random.default_rng(2)
    h, w = 40, 52
    ids = rng.integers(0, 23, (h, w)).astype(np.uint16)
    ids[0, :8] = [0, 13, 14, 22, 255, 256, 300, 65535]  # out of the table, some not representable in 8 bits
    ids[1, :4] = [3 + 256, 3 + 512, 21 + 4096, 3]  # ids whose low byte is in the table: must still be 255
    label = np.stack([ids, rng.integers(0, 65536, (h, w)), np.full((h, w), 9)], axis=-1).astype(np.uint16)
    root = tmp_path / 'synthia'
    write_png(str(root / 'GT' / 'LABELS' / '0000000.png'), label, np.arange(h) % 5)  # all five filters
    os.makedirs(root / 'RGB')
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / 'RGB' / '0000000.png')
    summary = convert_dataset('synthia', str(root), progress=False)
    out = np.asarray(Image.open(root / 'GT' / 'LABELS' / '0000000_labelTrainIds.png'))
    expected = expected_train_ids(ids, SYNTHIA_TABLE)
    np.testing.assert_array_equal(out, expected)
    assert summary['unmapped_pixels'] == int((expected == 255).sum()) > 7


def test_synthia_8bit_rgb_labels(tmp_path):
    ids = np.arange(24, dtype=np.uint8).reshape(4, 6)
    root = tmp_path / 'synthia'
    write_png(str(root / 'GT' / 'LABELS' / 'a.png'), np.stack([ids, ids * 2, ids * 3], -1), [4, 3, 2, 1])
    convert_dataset('synthia', str(root), progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(root / 'GT' / 'LABELS' / 'a_labelTrainIds.png')),
                                  expected_train_ids(ids, SYNTHIA_TABLE))


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

def _cityscapes(root, write_cityscapes, rng):
    """Two train cities and one val city with random label ids (incl. void ids)."""
    pool = np.array([0, 1, 4, 7, 8, 11, 17, 21, 23, 24, 26, 33], np.uint8)
    for split, city, n in (('train', 'bochum', 2), ('train', 'aachen', 2), ('val', 'lindau', 2)):
        write_cityscapes(root, split, city, [pool[rng.integers(0, len(pool), (12, 20))] for _ in range(n)])


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def test_cityscapes_stats_files(tmp_path, write_cityscapes):
    root = str(tmp_path / 'cs') + '/'  # as given, trailing slash included (os.path.join keeps it working)
    _cityscapes(root, write_cityscapes, np.random.default_rng(3))
    summary = convert_dataset('cityscapes', root, progress=False)
    assert summary['files'] == 6 and summary['stats_files'] == 4
    train = sorted(os.path.join(root, 'gtFine', 'train', city, f'{city}_{i:06d}_000019_gtFine_labelTrainIds.png')
                   for city in ('aachen', 'bochum') for i in range(2))
    for split, city in (('train', 'aachen'), ('val', 'lindau')):  # outputs for both splits, same mapping
        src = os.path.join(root, 'gtFine', split, city, f'{city}_000001_000019_gtFine_labelIds.png')
        dst = src.replace('_labelIds.png', '_labelTrainIds.png')
        np.testing.assert_array_equal(np.asarray(Image.open(dst)),
                                      expected_train_ids(np.asarray(Image.open(src)), GTA_TABLE))

    # recount from the written PNGs
    recount = {}
    for path in train:
        counts = np.bincount(np.asarray(Image.open(path)).ravel(), minlength=256)
        recount[path] = {str(c): int(counts[c]) for c in range(19) if counts[c] > 0}

    stats = _read_json(os.path.join(root, 'sample_class_stats.json'))
    assert [e['file'] for e in stats] == train
    for entry in stats:
        keys = list(entry)
        assert keys[-1] == 'file' and keys[:-1] == sorted(keys[:-1], key=int)  # ascending train ids, then file
        assert all(isinstance(v, int) for k, v in entry.items() if k != 'file')
        assert {k: v for k, v in entry.items() if k != 'file'} == recount[entry['file']]

    per_file = _read_json(os.path.join(root, 'sample_class_stats_dict.json'))
    assert list(per_file) == train and per_file == recount

    with_class = _read_json(os.path.join(root, 'samples_with_class.json'))
    expected = {}
    for path in train:  # keys in order of first appearance, entries in file order
        for c, n in recount[path].items():
            expected.setdefault(c, []).append([path, n])
    assert list(with_class) == list(expected) and with_class == expected
    assert summary['class_pixels'] == [sum(r.get(str(c), 0) for r in recount.values()) for c in range(19)]


def test_gta_stats_paths_and_nproc(tmp_path, write_gta):
    rng = np.random.default_rng(4)
    labels = [rng.choice(np.array([7, 8, 26, 0], np.uint8), (10, 14)) for _ in range(5)]
    root = str(tmp_path / 'gta')
    write_gta(root, labels)
    one = convert_dataset('gta', root, progress=False)
    first = {n: (tmp_path / 'gta' / n).read_bytes() for n in ('sample_class_stats.json', 'samples_with_class.json')}
    stats = _read_json(os.path.join(root, 'sample_class_stats.json'))
    assert [e['file'] for e in stats] == [os.path.join(root, 'labels', f'{i:05d}_labelTrainIds.png')
                                          for i in range(1, 6)]
    two = convert_dataset('gta', root, nproc=2, progress=False, force=True)
    assert two['converted'] == 5 and {k: v for k, v in two.items() if k not in ('converted', 'skipped')} == \
        {k: v for k, v in one.items() if k not in ('converted', 'skipped')}
    assert first == {n: (tmp_path / 'gta' / n).read_bytes() for n in first}


# --------------------------------------------------------------------------
# Re-runs
# --------------------------------------------------------------------------

def test_rerun_is_idempotent(tmp_path, write_gta):
    rng = np.random.default_rng(5)
    root = str(tmp_path / 'gta')
    write_gta(root, [rng.integers(0, 40, (9, 11)).astype(np.uint8) for _ in range(3)])
    first = convert_dataset('gta', root, progress=False)
    outputs = sorted((tmp_path / 'gta' / 'labels').glob('*_labelTrainIds.png'))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    stats = (tmp_path / 'gta' / 'samples_with_class.json').read_bytes()
    second = convert_dataset('gta', root, progress=False)
    assert (second['converted'], second['skipped']) == (0, 3)
    assert second['unmapped_pixels'] == first['unmapped_pixels'] > 0  # counted from the kept outputs
    assert second['class_pixels'] == first['class_pixels']
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs} == before  # untouched
    assert (tmp_path / 'gta' / 'samples_with_class.json').read_bytes() == stats
    assert sorted((tmp_path / 'gta' / 'labels').glob('*_labelTrainIds_labelTrainIds.png')) == []


def test_interrupted_run_is_finished_by_a_rerun(tmp_path, write_gta):
    rng = np.random.default_rng(6)
    root = tmp_path / 'gta'
    write_gta(str(root), [rng.integers(0, 40, (9, 11)).astype(np.uint8) for _ in range(6)])
    reference = convert_dataset('gta', str(root), progress=False)
    good = {p.name: p.read_bytes() for p in (root / 'labels').glob('*_labelTrainIds.png')}
    stats = (root / 'sample_class_stats.json').read_bytes()
    labels = root / 'labels'
    # what an interrupted run (or a crashed older tool) leaves behind
    (labels / '00001_labelTrainIds.png').unlink()  # not written yet
    (labels / '.00002_labelTrainIds.png.0123abcd.tmp').write_bytes(b'half a png')  # our temp file
    (labels / '00003_labelTrainIds.png').write_bytes(good['00003_labelTrainIds.png'][:30])  # truncated output
    (root / 'sample_class_stats.json').unlink()
    os.utime(labels / '00004.png', ns=(2 ** 62, 2 ** 62))  # an input newer than its output
    Image.fromarray(np.zeros((9, 10), np.uint8)).save(labels / '00005_labelTrainIds.png')  # wrong size
    Image.fromarray(np.zeros((9, 11, 3), np.uint8)).save(labels / '00006_labelTrainIds.png')  # not mode L
    again = convert_dataset('gta', str(root), progress=False)
    assert (again['converted'], again['skipped']) == (5, 1)
    assert {p.name: p.read_bytes() for p in labels.glob('*_labelTrainIds.png')} == good
    assert not list(labels.glob('.*.tmp'))
    assert (root / 'sample_class_stats.json').read_bytes() == stats
    assert again['class_pixels'] == reference['class_pixels']


# --------------------------------------------------------------------------
# Wrong layouts and the command line
# --------------------------------------------------------------------------

def test_layout_errors(tmp_path, write_gta, save_png):
    with pytest.raises(DataError, match='does not exist'):
        convert_dataset('gta', str(tmp_path / 'nothing'), progress=False)
    (tmp_path / 'gta').mkdir()
    with pytest.raises(DataError, match=r'gta has no labels/ folder; '
                                        r'expected .*gta/images/\*\.png and .*gta/labels/\*\.png'):
        convert_dataset('gta', str(tmp_path / 'gta'), progress=False)
    (tmp_path / 'gta' / 'labels').mkdir()
    with pytest.raises(DataError, match=r'no label files labels/\*\.png'):
        convert_dataset('gta', str(tmp_path / 'gta'), progress=False)
    (tmp_path / 'cs' / 'leftImg8bit').mkdir(parents=True)
    with pytest.raises(DataError, match=r'cs has no gtFine/ folder; expected .*gtFine_labelIds\.png'):
        convert_dataset('cityscapes', str(tmp_path / 'cs'), progress=False)
    (tmp_path / 'syn').mkdir()
    with pytest.raises(DataError, match='GT/LABELS'):
        convert_dataset('synthia', str(tmp_path / 'syn'), progress=False)


def test_command_line(tmp_path, write_gta, capsys):
    root = str(tmp_path / 'gta')
    write_gta(root, [np.full((3, 3), 7, np.uint8), np.full((3, 3), 1, np.uint8)])
    convert_labels.main(['gta', root, '--quiet'])
    out = capsys.readouterr().out
    assert '2 converted' in out and '9 pixels had ids outside the table' in out
    with pytest.raises(SystemExit) as e:
        convert_labels.main(['gta', str(tmp_path / 'missing'), '--quiet'])
    assert e.value.code == 2 and re.fullmatch(r'error: .*missing does not exist.*\n', capsys.readouterr().err)
