"""Fixtures that write tiny datasets in the real on-disk formats (used by test_data, test_convert_labels)."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # plain `pytest` as well as `python -m pytest` from the repository root
    sys.path.insert(0, REPO)


def _save(path, array, mode=None, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(array), mode=mode)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)


@pytest.fixture
def save_png():
    """save_png(path, array, mode=None, palette=None): write a PNG, creating its folder."""
    return _save


@pytest.fixture
def write_gta():
    """write_gta(root, labels, images=None) -> label paths: GTA layout, labels as palette PNGs of label ids."""
    def write(root, labels, images=None):
        palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]  # colours unrelated to the ids
        paths = []
        for i, label in enumerate(labels):
            name = f'{i + 1:05d}.png'
            img = images[i] if images is not None else np.full(label.shape + (3,), 40 * i % 256, np.uint8)
            _save(os.path.join(root, 'images', name), img)
            paths.append(os.path.join(root, 'labels', name))
            _save(paths[-1], label, mode='P', palette=palette)
        return paths
    return write


@pytest.fixture
def write_cityscapes():
    """write_cityscapes(root, split, city, labels, images=None, train_ids=False) -> label paths.

    Cityscapes layout; labels are *_gtFine_labelIds.png (mode L), or *_gtFine_labelTrainIds.png
    when train_ids is True.
    """
    def write(root, split, city, labels, images=None, train_ids=False):
        paths = []
        for i, label in enumerate(labels):
            stem = f'{city}_{i:06d}_000019'
            img = images[i] if images is not None else np.full(label.shape + (3,), 30 * i % 256, np.uint8)
            _save(os.path.join(root, 'leftImg8bit', split, city, f'{stem}_leftImg8bit.png'), img)
            suffix = '_gtFine_labelTrainIds.png' if train_ids else '_gtFine_labelIds.png'
            paths.append(os.path.join(root, 'gtFine', split, city, stem + suffix))
            _save(paths[-1], label, mode='L')
        return paths
    return write


def pytest_configure(config):
    config.addinivalue_line('markers', 'soak: repeated stop and resume cycles of a tiny training run (part of the '
                                       'default run; -m "not soak" leaves them out)')


@pytest.fixture(scope='module')
def one_thread():
    """Small convolutions on a shared machine: one thread is faster than two competing for the cores.
    A module uses it with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
