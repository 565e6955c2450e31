"""The synthetic demo benchmark: street scenes in the raw GTA and Cityscapes on-disk formats.

    python mic_demo.py data/demo [--seed 0] [--nproc 2] [--cfg configs/demo.yaml]
        writes, with the sizes and seed of configs/demo.yaml's data.demo (256x128 scenes), data/demo/gta (GTA-format source: images/*.png, palette labels with Cityscapes ids)
        and data/demo/cityscapes (Cityscapes-format target, train + val, *_gtFine_labelIds.png),
        then converts both halves to train ids (convert_labels.py) and writes their RCS statistics

mic_train.py calls ensure_demo_data(cfg) for configs with data.demo.enabled (configs/demo*.yaml),
so the demo needs no separate step. The defaults (sizes, seed, gap) are mic_config.DemoConfig's.

Both domains share one scene generator (a pinhole camera over a street: road, sidewalks,
facades, backdrop, trees, walls, fences, poles with signs and lights, people, riders, vehicles),
so geometry and layout follow the same distribution; they differ only in appearance:
colours, textures, lighting and the camera (noise, blur, vignetting, an ego-vehicle hood).
The target style is DEMO_SOURCE_STYLE moved towards DEMO_TARGET_STYLE by `gap` (0 = no gap).
"""
import argparse
import json
import math
import os
import time

import numpy as np

from mic_config import ConfigError, DemoConfig
from mic_data import CLASSES, CS_ID_COLOURS, CS_ID_TO_TRAIN_ID, save_png
from mic_runtime import DataError, exit_error, save_json

# Both domains share one scene generator (a pinhole camera over a street: road, sidewalks,
# facades, backdrop, trees, walls, fences, poles with signs and lights, people, riders, vehicles),
# so geometry and layout follow the same distribution; they differ only in appearance:
# colours, textures, lighting and the camera (noise, blur, vignetting, an ego-vehicle hood).
# The target style is DEMO_SOURCE_STYLE moved towards DEMO_TARGET_STYLE by `gap` (0 = no gap).

# painted materials: the 19 train ids, then parts that carry a class label but look different
MATERIALS = CLASSES + ('window', 'tyre', 'lamp', 'marking', 'hood', 'static', 'skin')
M_WINDOW, M_TYRE, M_LAMP, M_MARKING, M_HOOD, M_STATIC, M_SKIN = range(19, 26)
TEXTURE_FIELDS = ('grain', 'blotch', 'hstripe', 'vstripe', 'checker')  # per-pixel patterns, roughly [-1, 1]

_DEFAULTS = DemoConfig()  # sizes, seed and gap: the config schema's defaults, written once there
DEMO_GAP = _DEFAULTS.gap  # strength of the domain gap: the target style = lerp(source, target, gap)

# GTA-like source: saturated colours, sunny light (one facade side lit), crisp patterned textures
DEMO_SOURCE_STYLE = dict(
    colours={  # base RGB per material
        'road': (88, 86, 98), 'sidewalk': (205, 145, 150), 'building': (155, 140, 120),
        'wall': (185, 175, 120), 'fence': (165, 110, 60), 'pole': (135, 135, 140),
        'traffic light': (40, 40, 45), 'traffic sign': (230, 45, 40), 'vegetation': (60, 165, 50),
        'terrain': (150, 195, 80), 'sky': (80, 150, 240), 'person': (200, 70, 70), 'rider': (60, 60, 200),
        'car': (200, 30, 30), 'truck': (225, 200, 40), 'bus': (235, 120, 30), 'train': (200, 35, 35),
        'motorcycle': (40, 40, 170), 'bicycle': (30, 180, 200), 'window': (45, 75, 115), 'tyre': (28, 28, 30),
        'lamp': (255, 235, 90), 'marking': (240, 240, 235), 'hood': (25, 28, 32), 'static': (110, 65, 35),
        'skin': (225, 185, 150)},
    sky_horizon=(175, 210, 250),  # the sky blends from colours['sky'] at the top to this at the horizon
    paints=((200, 30, 30), (30, 60, 200), (240, 240, 240), (20, 20, 20), (230, 200, 30), (40, 160, 60),
            (150, 150, 160), (230, 110, 20)),  # vehicle paints and clothes, picked per instance
    texture={  # amplitudes of TEXTURE_FIELDS per material (unlisted: 'default')
        'default': (0.03, 0.02, 0.0, 0.0, 0.0), 'road': (0.04, 0.02, 0.12, 0.0, 0.0),
        'sidewalk': (0.03, 0.0, 0.0, 0.0, 0.16), 'building': (0.03, 0.04, 0.08, 0.0, 0.0),
        'wall': (0.03, 0.0, 0.14, 0.0, 0.0), 'fence': (0.02, 0.0, 0.0, 0.12, 0.0),
        'vegetation': (0.25, 0.10, 0.0, 0.0, 0.0), 'terrain': (0.12, 0.04, 0.0, 0.12, 0.0),
        'sky': (0.0, 0.04, 0.0, 0.0, 0.0), 'window': (0.02, 0.10, 0.0, 0.0, 0.0)},
    colour_jitter=10.0,  # sd of the per-instance colour offset (0..255 scale)
    brightness=1.0, brightness_jitter=0.05,  # global gain, and its per-image uniform +- range
    cast=(1.0, 1.0, 1.0),  # white balance: per-channel gain
    saturation=1.25,  # 1 = unchanged, < 1 washes colours out
    gamma=1.0,  # > 1 darkens mid-tones
    vignette=0.0,  # darkening at the corners (share of brightness lost)
    blur=0.0,  # Gaussian blur sigma in pixels at 512 px width
    noise=1.0,  # sensor noise sd (0..255 scale)
    sun=0.25,  # facades facing the sun are brighter by this share, the others darker
    hood=0.0,  # ego-vehicle hood height as a share of the image height (label 'ego vehicle' = ignored)
)

# Cityscapes-like target: each class keeps roughly its source hue (moderately shifted, so that no
# class takes on another class's source look), while the camera makes everything darker, greyer,
# overcast, noisy and slightly blurred and the textures change; road and sidewalk share one colour
# and texture, so only their position tells them apart
DEMO_TARGET_STYLE = dict(
    colours={
        'road': (104, 100, 108), 'sidewalk': (104, 100, 108), 'building': (140, 134, 128),
        'wall': (160, 150, 122), 'fence': (140, 112, 82), 'pole': (112, 112, 118),
        'traffic light': (62, 58, 45), 'traffic sign': (190, 62, 52), 'vegetation': (72, 122, 52),
        'terrain': (132, 150, 82), 'sky': (150, 180, 222), 'person': (150, 80, 80), 'rider': (80, 80, 150),
        'car': (150, 50, 50), 'truck': (190, 175, 90), 'bus': (190, 122, 72), 'train': (170, 62, 56),
        'motorcycle': (56, 56, 120), 'bicycle': (62, 130, 140), 'window': (56, 66, 82), 'tyre': (30, 30, 32),
        'lamp': (230, 220, 140), 'marking': (200, 200, 195), 'hood': (25, 28, 32), 'static': (100, 80, 60),
        'skin': (190, 160, 140)},
    sky_horizon=(205, 215, 228),
    paints=((150, 50, 50), (50, 65, 130), (205, 205, 205), (25, 25, 28), (180, 165, 70), (60, 110, 70),
            (135, 135, 140), (170, 100, 50)),  # the source paints, muted (same order)
    texture={
        'default': (0.05, 0.06, 0.0, 0.0, 0.0), 'road': (0.09, 0.14, 0.0, 0.0, 0.0),
        'sidewalk': (0.09, 0.14, 0.0, 0.0, 0.0), 'building': (0.06, 0.16, 0.0, 0.08, 0.0),
        'wall': (0.06, 0.12, 0.0, 0.0, 0.0), 'fence': (0.05, 0.05, 0.0, 0.0, 0.0),
        'vegetation': (0.16, 0.28, 0.0, 0.0, 0.0), 'terrain': (0.16, 0.22, 0.0, 0.0, 0.0),
        'sky': (0.01, 0.03, 0.0, 0.0, 0.0), 'window': (0.03, 0.05, 0.0, 0.0, 0.0)},
    colour_jitter=10.0,
    brightness=0.8, brightness_jitter=0.2,
    cast=(0.93, 1.0, 1.08),
    saturation=0.6,
    gamma=1.15,
    vignette=0.35,
    blur=1.0,
    noise=6.0,
    sun=0.04,
    hood=0.12,
)

DEMO_TRAIN_CITIES = ('aachen', 'bochum', 'bremen', 'cologne', 'darmstadt')
DEMO_VAL_CITIES = ('frankfurt', 'lindau', 'munster')


def _style_arrays(style):
    """A style dict -> numeric arrays (colours [M,3], texture [M,5], ...) that can be interpolated."""
    tex = style['texture']
    return {
        'colours': np.array([style['colours'][m] for m in MATERIALS], np.float64),
        'texture': np.array([tex.get(m, tex['default']) for m in MATERIALS], np.float64),
        **{k: np.array(v, np.float64) for k, v in style.items() if k not in ('colours', 'texture')},
    }


def demo_style(gap):
    """The numeric style of the target domain at a gap strength (0 = the source style)."""
    src, tgt = _style_arrays(DEMO_SOURCE_STYLE), _style_arrays(DEMO_TARGET_STYLE)
    mixed = {k: (1 - gap) * src[k] + gap * tgt[k] for k in src}
    # float32 arrays and Python floats, so that the float32 images are not promoted to float64
    return {k: float(v) if v.ndim == 0 else v.astype(np.float32) for k, v in mixed.items()}


class _Canvas:
    """Label (Cityscapes ids), material and base-colour layers of one scene, painted back to front."""

    def __init__(self, h, w, style, rng):
        self.h, self.w, self.style, self.rng = h, w, style, rng
        self.label = np.zeros((h, w), np.uint8)
        self.mat = np.zeros((h, w), np.uint8)
        self.rgb = np.zeros((h, w, 3), np.float32)

    def colour(self, mat, base=None):
        """An instance colour: the material's colour (or `base`) with a random brightness and tint."""
        c = self.style['colours'][mat] if base is None else np.asarray(base, np.float64)
        c = c * self.rng.uniform(0.85, 1.15) + self.rng.normal(0, self.style['colour_jitter'], 3)
        return np.clip(c, 0, 255).astype(np.float32)

    def paint(self, mask, label_id, mat, colour, box=None):
        """Paint a bool mask (full image, or the window box = (y0, y1, x0, x1)) with one label, one
        material and a colour broadcastable to the window's [n,m,3]."""
        sl = np.s_[:, :] if box is None else np.s_[box[0]:box[1], box[2]:box[3]]
        np.copyto(self.label[sl], label_id, where=mask)
        np.copyto(self.mat[sl], mat, where=mask)
        np.copyto(self.rgb[sl], colour, where=mask[..., None])

    def _window(self, y0, y1, x0, x1):
        """Integer window covering a float box, clipped to the image, and its pixel-centre grids."""
        box = (max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, self.h),
               max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, self.w))
        if box[0] >= box[1] or box[2] >= box[3]:
            return None, None, None
        ys = np.arange(box[0], box[1], dtype=np.float32)[:, None] + 0.5  # (n, 1)
        xs = np.arange(box[2], box[3], dtype=np.float32)[None, :] + 0.5  # (1, m)
        return box, ys, xs

    def rect(self, y0, y1, x0, x1, label_id, mat, colour):
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2  # at least one pixel wide, so thin parts do not vanish
        y0, y1 = min(y0, cy - 0.5), max(y1, cy + 0.5)
        x0, x1 = min(x0, cx - 0.5), max(x1, cx + 0.5)
        box, ys, xs = self._window(y0, y1, x0, x1)
        if box is not None:
            self.paint((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1), label_id, mat, colour, box)

    def ellipse(self, cy, cx, ry, rx, label_id, mat, colour, inner=0.0):
        """Filled ellipse; with inner > 0 a ring whose hole has radii inner * (ry, rx)."""
        ry, rx = max(ry, 0.6), max(rx, 0.6)
        box, ys, xs = self._window(cy - ry, cy + ry, cx - rx, cx + rx)
        if box is not None:
            d = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2
            self.paint((d <= 1) & (d >= inner ** 2), label_id, mat, colour, box)

    def capsule(self, y0, x0, y1, x1, r, label_id, mat, colour):
        """Thick line segment from (y0, x0) to (y1, x1) with radius r (at least ~1 pixel wide)."""
        r = max(r, 0.6)
        box, ys, xs = self._window(min(y0, y1) - r, max(y0, y1) + r, min(x0, x1) - r, max(x0, x1) + r)
        if box is None:
            return
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((ys - y0) * dy + (xs - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        self.paint((ys - y0 - t * dy) ** 2 + (xs - x0 - t * dx) ** 2 <= r * r, label_id, mat, colour, box)

    def polygon(self, pts, label_id, mat, colour):
        """Filled convex polygon, pts = [(y, x), ...] in order."""
        pts = np.asarray(pts, np.float32)
        box, ys, xs = self._window(pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
        if box is None:
            return
        inside_pos = np.ones((len(ys), xs.shape[1]), bool)
        inside_neg = inside_pos.copy()
        for (ya, xa), (yb, xb) in zip(pts, np.roll(pts, -1, axis=0)):
            cross = (xb - xa) * (ys - ya) - (yb - ya) * (xs - xa)
            inside_pos &= cross >= 0
            inside_neg &= cross <= 0
        self.paint(inside_pos | inside_neg, label_id, mat, colour, box)


# Cityscapes label ids used by the demo scenes (void ids become 255 after conversion)
_ID = {name: i for i, name in [(0, 'unlabeled'), (1, 'ego vehicle'), (4, 'static')]}
_ID.update({CLASSES[t]: i for i, t in CS_ID_TO_TRAIN_ID.items()})
_MAT = {name: i for i, name in enumerate(MATERIALS)}


def _lateral_plane(g, w, vx, f, u, z_min, z_max):
    """Where a vertical plane along the street at lateral position u (camera heights) appears between
    depths z_min and z_max: its column range (x0, x1), and per pixel of those columns the depth
    z [1,m] and the height above the ground [h,m]. None if it is outside the image."""
    # a point of the plane at depth z projects to column vx + u * f / z
    lo, hi = sorted((vx + u * f / z_max, vx + u * f / max(z_min, 1e-3)))
    x0, x1 = max(int(math.ceil(lo - 0.5)), 0), min(int(math.floor(hi - 0.5)) + 1, w)
    if x0 >= x1:
        return None
    gp = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - vx) / u  # (1, m): ground line, rows below the horizon
    gp = np.maximum(gp, 1e-3)
    return (x0, x1), f / gp, 1 - g / gp


def _draw_ground(cv, g, xx, vx, f, road, side, garden):
    """Road (with lane markings), sidewalks and, further out, gardens (terrain) or paving."""
    below = g > 0  # (h, 1)
    gd = np.where(below, g, 1.0)
    u = (xx - vx) / gd  # (h, w): lateral ground position in camera heights
    z = f / gd  # (h, 1): depth
    on_road = below & (u >= -road[0]) & (u <= road[1])
    on_side = below & ~on_road & (u >= -road[0] - side[0]) & (u <= road[1] + side[1])
    outer = below & ~on_road & ~on_side
    cv.paint(on_road, _ID['road'], _MAT['road'], cv.colour(_MAT['road']))
    cv.paint(on_side, _ID['sidewalk'], _MAT['sidewalk'], cv.colour(_MAT['sidewalk']))
    for s, has_garden in zip((-1, 1), garden):
        mask = outer & (u * s > 0)
        name = 'terrain' if has_garden else 'sidewalk'
        cv.paint(mask, _ID[name], _MAT[name], cv.colour(_MAT[name]))
    centre = (road[1] - road[0]) / 2
    dash = ((z / 3.0 + cv.rng.uniform()) % 1.0) < 0.5
    edges = (np.abs(u + road[0] - 0.15) < 0.04) | (np.abs(u - road[1] + 0.15) < 0.04)
    lines = (np.abs(u - centre) < 0.05) & dash | edges
    cv.paint(on_road & lines & (z < 60), _ID['road'], M_MARKING, cv.colour(M_MARKING))


def _draw_backdrop(cv, g, xx, vx, f, z_end):
    """Buildings and trees across the far end of the street (a plane facing the camera at depth z_end)."""
    rng = cv.rng
    lateral = (xx - vx) * z_end / f  # (1, w)
    height = 1 - g * z_end / f  # (h, 1)
    lo, hi = float(lateral.min()), float(lateral.max())
    edges = lo + np.cumsum(rng.uniform(2, 7, size=int((hi - lo) / 2) + 2))
    seg = np.searchsorted(edges, lateral)  # (1, w)
    n = len(edges) + 1
    tops = rng.uniform(2, 12, n)
    kind = rng.choice(3, size=n, p=[0.75, 0.15, 0.10])  # building, trees, open sky
    colours = np.stack([cv.colour(_MAT['building']) for _ in range(n)])
    up = (height >= 0) & (height <= tops[seg])
    cv.paint(up & (kind[seg] == 0), _ID['building'], _MAT['building'], colours[seg])
    cv.paint(up & (kind[seg] == 1) & (height <= 0.6 * tops[seg]), _ID['vegetation'], _MAT['vegetation'],
             cv.colour(_MAT['vegetation']))


def _draw_facades(cv, g, vx, f, u, z_end, shade):
    """Building fronts along one side of the street (lateral plane u), in segments of random height,
    some left open, with a grid of windows."""
    rng = cv.rng
    edges = np.cumsum(rng.uniform(6, 25, size=16))
    n = len(edges) + 1
    tops = rng.uniform(3, 16, n)
    is_building = rng.random(n) < 0.82
    period_y, period_z, phase = rng.uniform(1.6, 2.4, n), rng.uniform(1.8, 3.2, n), rng.random(n)
    colours = np.stack([cv.colour(_MAT['building']) * shade for _ in range(n)])
    window_colour = cv.colour(M_WINDOW) * shade
    plane = _lateral_plane(g, cv.w, vx, f, u, 0.0, z_end)
    if plane is None:
        return
    (x0, x1), z, height = plane
    seg = np.searchsorted(edges, z)  # (1, m)
    mask = is_building[seg] & (height >= 0) & (height <= tops[seg])
    box = (0, cv.h, x0, x1)
    cv.paint(mask, _ID['building'], _MAT['building'], colours[seg], box)
    row = (height / period_y[seg]) % 1.0
    col = (z / period_z[seg] + phase[seg]) % 1.0
    windows = (mask & (height > 1.5) & (height < tops[seg] - 0.5) & (z < 45) & (row > 0.35) & (row < 0.8)
               & (col > 0.25) & (col < 0.75))
    cv.paint(windows, _ID['building'], M_WINDOW, window_colour, box)


def _draw_side_plane(cv, g, vx, f, u, z0, z1, top, name):
    """A wall, fence (lattice) or hedge along the street at lateral position u between depths z0 and z1."""
    colour = cv.colour(_MAT[name])
    plane = _lateral_plane(g, cv.w, vx, f, u, z0, z1)
    if plane is None:
        return
    (x0, x1), z, height = plane
    mask = (height >= 0) & (height <= top)
    if name == 'fence':  # posts, rails and a top bar; the gaps show what is behind
        mask &= ((z / 0.3) % 1.0 < 0.3) | ((height / 0.45) % 1.0 < 0.18) | (height > top - 0.08)
    cv.paint(mask, _ID[name], _MAT[name], colour, (0, cv.h, x0, x1))


def _draw_tree(cv, x, y, k):
    trunk = cv.rng.uniform(1.5, 3.0)
    r = cv.rng.uniform(0.9, 2.0)
    col = cv.colour(_MAT['vegetation'])
    cv.capsule(y, x, y - trunk * k, x, 0.09 * k, _ID['vegetation'], _MAT['vegetation'], col * 0.6)
    cy = y - (trunk + 0.6 * r) * k
    cv.ellipse(cy, x, 0.85 * r * k, r * k, _ID['vegetation'], _MAT['vegetation'], col)
    for _ in range(int(cv.rng.integers(1, 4))):
        dy, dx, rr = cv.rng.uniform(-0.6, 0.3), cv.rng.uniform(-0.8, 0.8), cv.rng.uniform(0.4, 0.7)
        cv.ellipse(cy + dy * r * k, x + dx * r * k, rr * r * k, rr * r * k, _ID['vegetation'], _MAT['vegetation'],
                   col * cv.rng.uniform(0.85, 1.15))


def _draw_pole(cv, x, y, k, s):
    """A pole with a traffic sign, a traffic light or a street lamp; s = side (-1 left, 1 right)."""
    rng = cv.rng
    top = y - rng.uniform(2.2, 3.6) * k
    cv.rect(top, y, x - 0.05 * k, x + 0.05 * k, _ID['pole'], _MAT['pole'], cv.colour(_MAT['pole']))
    kind = rng.choice(3, p=[0.45, 0.35, 0.2])
    if kind == 0:  # traffic sign: disc, triangle or panel with a lighter centre
        size, shape = rng.uniform(0.25, 0.4) * k, rng.integers(3)
        col = cv.colour(_MAT['traffic sign'])
        cy = top + size
        if shape == 0:
            cv.ellipse(cy, x, size, size, _ID['traffic sign'], _MAT['traffic sign'], col)
            cv.ellipse(cy, x, 0.6 * size, 0.6 * size, _ID['traffic sign'], _MAT['traffic sign'], 0.4 * col + 150)
        elif shape == 1:
            cv.polygon([(cy - size, x), (cy + size, x - size), (cy + size, x + size)],
                       _ID['traffic sign'], _MAT['traffic sign'], col)
        else:
            cv.rect(cy - size, cy + 0.7 * size, x - 1.2 * size, x + 1.2 * size, _ID['traffic sign'],
                    _MAT['traffic sign'], col)
    elif kind == 1:  # traffic light: housing on an arm towards the road, three lamps, one lit
        ax = x - s * rng.uniform(0.0, 1.2) * k
        cv.rect(top - 0.06 * k, top + 0.06 * k, min(x, ax), max(x, ax), _ID['pole'], _MAT['pole'],
                cv.colour(_MAT['pole']))
        bw, bh = 0.14 * k, 0.34 * k
        cv.rect(top, top + 2 * bh, ax - bw, ax + bw, _ID['traffic light'], _MAT['traffic light'],
                cv.colour(_MAT['traffic light']))
        lit = rng.integers(3)
        for i in range(3):
            mat = M_LAMP if i == lit else M_TYRE
            cv.ellipse(top + (i + 0.5) * 2 * bh / 3, ax, 0.6 * bw, 0.6 * bw, _ID['traffic light'], mat,
                       cv.colour(mat))
    else:  # street lamp: an arm and a head, all pole
        ax = x - s * 0.8 * k
        cv.capsule(top, x, top, ax, 0.04 * k, _ID['pole'], _MAT['pole'], cv.colour(_MAT['pole']))
        cv.rect(top, top + 0.1 * k, ax - 0.2 * k, ax + 0.1 * k, _ID['pole'], _MAT['pole'], cv.colour(_MAT['pole']))


def _draw_person(cv, x, y, k, name='person', seated=None):
    """A standing person, or (seated = (hip_y, hip_x, hand_y, hand_x, foot_y, foot_x)) a rider."""
    rng = cv.rng
    paints = cv.style['paints']
    top_col = cv.colour(_MAT[name], paints[rng.integers(len(paints))])
    leg_col = cv.colour(_MAT[name], paints[rng.integers(len(paints))]) * 0.7
    hgt = rng.uniform(1.05, 1.25) * k
    lid = _ID[name]
    if seated is None:
        hip_y, hip_x = y - 0.5 * hgt, x
        step = rng.uniform(0.0, 0.12) * hgt
        for dx in (-step, step):
            cv.capsule(hip_y, hip_x, y - 0.03 * hgt, x + dx, 0.05 * hgt, lid, _MAT[name], leg_col)
        shoulder_y, shoulder_x = y - 0.82 * hgt, x
    else:
        hip_y, hip_x, hand_y, hand_x, foot_y, foot_x = seated
        cv.capsule(hip_y, hip_x, foot_y, foot_x, 0.05 * hgt, lid, _MAT[name], leg_col)
        shoulder_y, shoulder_x = hip_y - 0.3 * hgt, hip_x + 0.4 * (hand_x - hip_x)
    cv.capsule(hip_y, hip_x, shoulder_y, shoulder_x, 0.11 * hgt, lid, _MAT[name], top_col)
    if seated is None:
        for dx in (-0.12, 0.12):
            cv.capsule(shoulder_y, x + dx * hgt, y - 0.5 * hgt, x + 1.2 * dx * hgt, 0.035 * hgt, lid, _MAT[name],
                       top_col)
    else:
        cv.capsule(shoulder_y, shoulder_x, hand_y, hand_x, 0.035 * hgt, lid, _MAT[name], top_col)
    cv.ellipse(shoulder_y - 0.09 * hgt, shoulder_x, 0.075 * hgt, 0.06 * hgt, lid, M_SKIN, cv.colour(M_SKIN))


def _draw_bike(cv, x, y, k, motor, rider):
    """A bicycle or motorcycle in side view, optionally ridden."""
    rng = cv.rng
    name = 'motorcycle' if motor else 'bicycle'
    lid, mat = _ID[name], _MAT[name]
    d = rng.choice([-1, 1])  # heading left or right
    r = (0.22 if motor else 0.23) * k
    base = 0.75 * k if motor else 0.68 * k
    rear, front = x - d * base / 2, x + d * base / 2
    col = cv.colour(mat, cv.style['paints'][rng.integers(len(cv.style['paints']))] if motor else None)
    seat_y, seat_x = y - (0.62 if motor else 0.66) * k, rear + d * 0.25 * base
    bar_y, bar_x = y - 0.75 * k, front - d * 0.08 * base
    if motor:
        for cx in (rear, front):
            cv.ellipse(y - r, cx, r, r, lid, M_TYRE, cv.colour(M_TYRE))
            cv.ellipse(y - r, cx, 0.45 * r, 0.45 * r, lid, mat, col * 0.8 + 40)
        cv.ellipse(y - 0.45 * k, x, 0.16 * k, 0.38 * k, lid, mat, col)
        cv.capsule(seat_y, seat_x, bar_y, bar_x, 0.05 * k, lid, mat, col)
    else:
        for cx in (rear, front):
            cv.ellipse(y - r, cx, r, r, lid, mat, col * 0.5, inner=0.82)
        hub_y = y - r
        for (ya, xa), (yb, xb) in [((hub_y, rear), (seat_y, seat_x)), ((hub_y, rear), (hub_y, x)),
                                   ((seat_y, seat_x), (hub_y, x)), ((hub_y, x), (bar_y, bar_x)),
                                   ((seat_y, seat_x), (bar_y, bar_x)), ((bar_y, bar_x), (hub_y, front))]:
            cv.capsule(ya, xa, yb, xb, 0.025 * k, lid, mat, col)
    if rider:
        _draw_person(cv, x, y, k, 'rider', seated=(seat_y - 0.04 * k, seat_x, bar_y, bar_x, y - r, x))


def _draw_vehicle(cv, x, y, k, name):
    """A car, truck, bus or tram seen from behind: body, cabin or windows, wheels, lights."""
    rng = cv.rng
    lid, mat = _ID[name], _MAT[name]
    width, height = {'car': (1.2, 1.0), 'truck': (1.65, 2.3), 'bus': (1.7, 2.1), 'train': (1.6, 2.3)}[name]
    w, h = width * k * rng.uniform(0.92, 1.08), height * k * rng.uniform(0.92, 1.08)
    col = cv.colour(mat, cv.style['paints'][rng.integers(len(cv.style['paints']))] if name == 'car' else None)
    tyre = cv.colour(M_TYRE)
    if name != 'train':
        for sx in (-1, 1):
            cv.rect(y - 0.25 * k, y, x + sx * 0.42 * w - 0.08 * w, x + sx * 0.42 * w + 0.08 * w, lid, M_TYRE, tyre)
    if name == 'car':
        cv.rect(y - 0.62 * h, y - 0.12 * h, x - w / 2, x + w / 2, lid, mat, col)
        top, mid = y - h, y - 0.62 * h
        cv.polygon([(mid, x - 0.46 * w), (top, x - 0.33 * w), (top, x + 0.33 * w), (mid, x + 0.46 * w)], lid, mat, col)
        cv.polygon([(mid - 0.04 * h, x - 0.4 * w), (top + 0.06 * h, x - 0.3 * w), (top + 0.06 * h, x + 0.3 * w),
                    (mid - 0.04 * h, x + 0.4 * w)], lid, M_WINDOW, cv.colour(M_WINDOW))
        light_y = y - 0.5 * h
    else:
        cv.rect(y - h, y - (0.02 if name == 'train' else 0.12) * h, x - w / 2, x + w / 2, lid, mat, col)
        if name in ('bus', 'train'):
            cv.rect(y - 0.85 * h, y - 0.5 * h, x - 0.42 * w, x + 0.42 * w, lid, M_WINDOW, cv.colour(M_WINDOW))
        else:
            cv.rect(y - 0.98 * h, y - 0.25 * h, x - 0.005 * w, x + 0.005 * w, lid, mat, col * 0.7)  # door seam
        if name == 'train':  # pantograph
            cv.capsule(y - h, x - 0.1 * w, y - 1.25 * h, x + 0.2 * w, 0.02 * k, lid, M_TYRE, tyre)
            cv.capsule(y - 1.25 * h, x - 0.3 * w, y - 1.25 * h, x + 0.3 * w, 0.02 * k, lid, M_TYRE, tyre)
        light_y = y - 0.22 * h
    cv.rect(y - 0.16 * h if name == 'car' else y - 0.14 * h, y - 0.1 * h, x - w / 2, x + w / 2, lid, M_TYRE, tyre)
    for sx in (-1, 1):
        cv.rect(light_y - 0.05 * h, light_y + 0.03 * h, x + sx * 0.45 * w - 0.05 * w, x + sx * 0.45 * w + 0.05 * w,
                lid, M_LAMP, cv.colour(M_LAMP, (220, 30, 30)))


def _draw_side_structures(cv, rng, g, vx, f, road, side, garden):
    """Structures along the sidewalks: hedges in gardens, then walls and fences at the sidewalk edge."""
    for s in (0, 1):
        sign, edge = (-1, 1)[s], road[s] + side[s]
        if garden[s]:
            z0 = rng.uniform(3, 30)
            _draw_side_plane(cv, g, vx, f, sign * (edge + 0.15), z0, z0 + rng.uniform(5, 30),
                             rng.uniform(0.4, 0.9), 'vegetation')
        for _ in range(int(rng.integers(0, 3))):
            name = ('wall', 'fence')[int(rng.integers(2))]
            z0 = rng.uniform(3, 40)
            top = rng.uniform(0.5, 1.3) if name == 'wall' else rng.uniform(0.7, 1.4)
            _draw_side_plane(cv, g, vx, f, sign * edge, z0, z0 + rng.uniform(4, 25), top, name)


def _scene_objects(cv, rng, road, side, garden, garden_w, z_end):
    """The objects standing on the ground: [(depth, lateral position, draw(x, y, k))], drawn far to near
    by the caller. Placements are drawn from `rng` here; some draw functions draw sizes when called."""
    objects = []

    def add(z, u, draw):
        objects.append((z, u, draw))

    for s in (0, 1):
        sign, edge = (-1, 1)[s], road[s] + side[s]
        for _ in range(int(rng.integers(0, 5))):
            u = sign * (edge + garden_w[s] * rng.uniform(0.2, 0.8)) if garden[s] else sign * (edge - 0.3)
            add(rng.uniform(5, 0.8 * z_end), u, lambda x, y, k: _draw_tree(cv, x, y, k))
        for _ in range(int(rng.integers(1, 4))):
            add(rng.uniform(4, 60), sign * (road[s] + 0.25), lambda x, y, k, sg=sign: _draw_pole(cv, x, y, k, sg))
        for _ in range(int(rng.integers(0, 3))):
            add(rng.uniform(4, 35), sign * (road[s] + side[s] * rng.uniform(0.3, 0.9)),
                lambda x, y, k: cv.rect(y - rng.uniform(0.3, 0.6) * k, y, x - rng.uniform(0.2, 0.5) * k,
                                        x + rng.uniform(0.2, 0.5) * k, _ID['static'], M_STATIC, cv.colour(M_STATIC)))
    for _ in range(int(rng.integers(0, 7))):
        s = int(rng.integers(2))
        add(rng.uniform(3, 40), (-1, 1)[s] * (road[s] + rng.uniform(0.2, 0.9) * side[s]),
            lambda x, y, k: _draw_person(cv, x, y, k))
    for _ in range(int(rng.integers(0, 3))):  # riders in the bike lane
        s, motor = int(rng.integers(2)), bool(rng.random() < 0.35)
        add(rng.uniform(4, 40), (-1, 1)[s] * (road[s] - rng.uniform(0.4, 1.0)),
            lambda x, y, k, m=motor: _draw_bike(cv, x, y, k, m, True))
    for _ in range(int(rng.integers(0, 3))):  # parked bicycles and motorcycles
        s, motor = int(rng.integers(2)), bool(rng.random() < 0.3)
        add(rng.uniform(4, 30), (-1, 1)[s] * (road[s] + (0.5 if motor else side[s] - 0.3)),
            lambda x, y, k, m=motor: _draw_bike(cv, x, y, k, m, False))
    for _ in range(int(rng.integers(2, 9))):
        add(rng.uniform(4, 70), rng.uniform(-road[0] + 0.7, road[1] - 0.7),
            lambda x, y, k: _draw_vehicle(cv, x, y, k, 'car'))
    for name, p in (('truck', 0.35), ('bus', 0.25), ('train', 0.1)):
        if rng.random() < p:
            u = (road[1] - road[0]) / 2 + (0 if name == 'train' else rng.uniform(-1, 1))
            add(rng.uniform(8, 60), u, lambda x, y, k, nm=name: _draw_vehicle(cv, x, y, k, nm))
    return objects


def _draw_scene(rng, h, w, style):
    """One street scene: a _Canvas with label (Cityscapes ids), material and base colour layers."""
    cv = _Canvas(h, w, style, rng)
    yh = h * rng.uniform(0.36, 0.48)  # horizon row
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point column
    f = w * rng.uniform(0.9, 1.2)  # focal length in pixels; world unit = the camera height (~1.5 m)
    road = rng.uniform(1.5, 3.5, 2)  # road edges left/right of the camera (camera heights)
    side = rng.uniform(1.0, 2.5, 2)  # sidewalk widths
    garden = rng.random(2) < 0.5  # a strip of terrain between sidewalk and facade
    garden_w = np.where(garden, rng.uniform(0.8, 2.5, 2), 0.0)
    z_end = rng.uniform(50, 140)  # depth where the street ends in a backdrop
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    g = yy - yh  # (h, 1): pixels below the horizon

    # the sky fills the image, then far to near: ground, backdrop across the street's end, facades
    t = np.clip(yy / yh, 0, 1)[..., None]  # (h, 1, 1)
    sky = (1 - t) * style['colours'][_MAT['sky']] + t * style['sky_horizon']
    cv.label[:], cv.mat[:], cv.rgb[:] = _ID['sky'], _MAT['sky'], sky.astype(np.float32)
    _draw_ground(cv, g, xx, vx, f, road, side, garden)
    _draw_backdrop(cv, g, xx, vx, f, z_end)
    sun = rng.choice([-1, 1]) * style['sun']
    for s in (0, 1):
        u = (-1, 1)[s] * (road[s] + side[s] + garden_w[s])
        _draw_facades(cv, g, vx, f, u, z_end, 1 + (-1, 1)[s] * sun)

    _draw_side_structures(cv, rng, g, vx, f, road, side, garden)

    objects = _scene_objects(cv, rng, road, side, garden, garden_w, z_end)
    for z, u, draw in sorted(objects, key=lambda o: -o[0]):
        k = f / z  # pixels per camera height at this depth
        draw(vx + u * k, yh + k, k)

    if style['hood'] * h >= 1:  # the ego vehicle's hood at the bottom (Cityscapes: 'ego vehicle', ignored)
        top = h - style['hood'] * h * (1 - ((xx - w / 2) / (0.8 * w)) ** 2)
        hood = yy > top
        cv.paint(hood, _ID['ego vehicle'], M_HOOD, cv.colour(M_HOOD))
    return cv


def _smooth_noise(rng, h, w, cell):
    """Blotchy noise [h,w], about unit variance: a coarse Gaussian grid upsampled bilinearly."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32) * 1.6
    ys = (np.arange(h, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(w, dtype=np.float32) + 0.5) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    wy, wx = (ys % 1.0)[:, None], (xs % 1.0)[None, :]  # float32 interpolation weights
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def _blur(img, sigma):
    """Separable Gaussian blur of [h,w,3] float32 (edge padding)."""
    r = int(math.ceil(3 * sigma))
    kernel = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).astype(np.float32)
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode='edge')
    img = sum(kernel[i] * p[i:i + h] for i in range(2 * r + 1))
    p = np.pad(img, ((0, 0), (r, r), (0, 0)), mode='edge')
    return sum(kernel[i] * p[:, i:i + w] for i in range(2 * r + 1))


def _render(rng, cv, style):
    """Base colours x texture, then the camera: gain, colour cast, vignetting, saturation, gamma,
    blur and noise -> uint8 [h,w,3]."""
    h, w = cv.h, cv.w
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    period = max(2.0, w / 128)
    tri = lambda t: 4 * np.abs(t % 1.0 - 0.5) - 1  # triangle wave in [-1, 1]
    checker = ((np.floor(yy / (2 * period)) + np.floor(xx / (2 * period))) % 2) * 2 - 1
    fields = (rng.standard_normal((h, w), dtype=np.float32), _smooth_noise(rng, h, w, max(4, w // 24)),
              np.broadcast_to(tri(yy / period + rng.uniform()), (h, w)),
              np.broadcast_to(tri(xx / (1.5 * period) + rng.uniform()), (h, w)), checker)
    amps = style['texture']  # (materials, fields)
    tex = 1 + sum(amps[:, i][cv.mat] * fields[i] for i in range(len(TEXTURE_FIELDS)) if amps[:, i].any())
    img = cv.rgb * tex[..., None]

    gain = style['brightness'] * (1 + rng.uniform(-1, 1) * style['brightness_jitter'])
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2  # 0 at the centre, 2 at the corners
    img *= gain * style['cast'] * (1 - style['vignette'] * r2 / 2)[..., None]
    grey = ((img[..., 0] + img[..., 1] + img[..., 2]) / 3)[..., None]
    img = grey + style['saturation'] * (img - grey)
    if abs(style['gamma'] - 1) > 1e-3:
        img = 255 * (np.clip(img, 0, 255) / 255) ** style['gamma']
    if style['blur'] > 0.05:
        img = _blur(img, style['blur'] * w / 512)
    img += style['noise'] * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def demo_sample(seed, domain, index, height=256, width=512, gap=DEMO_GAP):
    """One demo image uint8 [h,w,3] and its label uint8 [h,w] (Cityscapes label ids).

    domain: 0 = source (GTA style), 1 = target train, 2 = target val (Cityscapes style at `gap`).
    A pure function of its arguments.
    """
    rng = np.random.default_rng([seed, domain, index])
    style = demo_style(gap if domain else 0.0)
    cv = _draw_scene(rng, height, width, style)
    return _render(rng, cv, style), cv.label


def gta_palette():
    pal = np.zeros((256, 3), np.uint8)
    for i, c in CS_ID_COLOURS.items():
        pal[i] = c
    return pal.ravel().tolist()


def _demo_job(job):
    seed, domain, index, height, width, gap, img_path, label_path = job
    img, label = demo_sample(seed, domain, index, height, width, gap)
    save_png(img_path, img, compress_level=1)  # noisy images barely compress; level 1 is 30% faster
    if domain == 0:  # GTA: palette PNG whose indices are the label ids
        save_png(label_path, label, mode='P', palette=gta_palette())
    else:  # Cityscapes: *_gtFine_labelIds.png, 8-bit grayscale
        save_png(label_path, label, mode='L')


def _demo_jobs(root, seed, num_source, num_target, num_val, width, height, gap):
    jobs = []
    gta = os.path.join(root, 'gta')
    for i in range(num_source):
        name = f'{i + 1:05d}.png'
        jobs.append((seed, 0, i, height, width, gap, os.path.join(gta, 'images', name),
                     os.path.join(gta, 'labels', name)))
    cs = os.path.join(root, 'cityscapes')
    for domain, split, cities, n in ((1, 'train', DEMO_TRAIN_CITIES, num_target), (2, 'val', DEMO_VAL_CITIES, num_val)):
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f'{city}_{i // len(cities):06d}_000019'
            jobs.append((seed, domain, i, height, width, gap,
                         os.path.join(cs, 'leftImg8bit', split, city, f'{stem}_leftImg8bit.png'),
                         os.path.join(cs, 'gtFine', split, city, f'{stem}_gtFine_labelIds.png')))
    return jobs


def make_demo(root, seed=_DEFAULTS.seed, num_source=_DEFAULTS.num_source, num_target=_DEFAULTS.num_target,
              num_val=_DEFAULTS.num_val, width=_DEFAULTS.width, height=_DEFAULTS.height, nproc=1, gap=_DEFAULTS.gap):
    """Write the synthetic demo benchmark under `root` in the raw dataset formats.

    root/gta/images/NNNNN.png + root/gta/labels/NNNNN.png (palette PNGs, index = Cityscapes label id);
    root/cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png +
    root/cityscapes/gtFine/{train,val}/<city>/..._gtFine_labelIds.png (mode L, Cityscapes label ids).
    Labels still need `convert_labels.py`. Files are bit-identical for the same arguments (any nproc);
    root/demo_info.json is written last, so its presence means the generation finished.
    """
    jobs = _demo_jobs(root, seed, num_source, num_target, num_val, width, height, gap)
    for folder in sorted({os.path.dirname(p) for job in jobs for p in job[-2:]}):
        os.makedirs(folder, exist_ok=True)
    if nproc > 1:
        import multiprocessing
        with multiprocessing.get_context('spawn').Pool(nproc) as pool:
            for _ in pool.imap_unordered(_demo_job, jobs, chunksize=8):
                pass
    else:
        for job in jobs:
            _demo_job(job)
    info = dict(seed=seed, num_source=num_source, num_target=num_target, num_val=num_val, width=width,
                height=height, gap=gap)
    save_json(os.path.join(root, 'demo_info.json'), info)


# --------------------------------------------------------------------------
# Preparing the demo for a config
# --------------------------------------------------------------------------

DEMO_KEYS = ('seed', 'num_source', 'num_target', 'num_val', 'width', 'height', 'gap')


def ensure_demo_data(demo_cfg, log=print):
    """Generate and convert the demo benchmark of a config's data.demo section when it is missing.

    make_demo writes demo_info.json last and the conversion is idempotent, so an interrupted
    preparation is completed on the next start; a folder generated with other settings is refused.
    """
    import convert_labels
    wanted = {k: demo_cfg[k] for k in DEMO_KEYS}
    root = demo_cfg['root']
    info_path = os.path.join(root, 'demo_info.json')
    t = time.time()
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if {k: info.get(k) for k in wanted} != wanted:
            raise ConfigError(f'{root} holds demo data generated with {info}, but the config asks for '
                              f'{wanted}: delete {root} or set data.demo.root to another folder')
    else:
        log(f'generating the demo benchmark in {root} (seed {wanted["seed"]}) ...')
        make_demo(root, **wanted)
    for kind, sub in (('gta', 'gta'), ('cityscapes', 'cityscapes')):
        folder = os.path.join(root, sub)
        if not os.path.exists(os.path.join(folder, 'samples_with_class.json')):
            convert_labels.convert_dataset(kind, folder, progress=False)
    if time.time() - t > 1:
        log(f'demo data ready in {root} ({time.time() - t:.0f} s)')


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.yaml')


def _cli_defaults(argv):
    """The data.demo section of --cfg (default configs/demo.yaml), so that the files written here are
    the ones that config trains on (its sizes differ from the schema's defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--cfg', default=DEMO_CONFIG)
    path = pre.parse_known_args(argv)[0].cfg
    if not os.path.isfile(path):
        return _DEFAULTS, path
    from mic_config import load_config
    return DemoConfig(**load_config(path).data.demo), path


def main(argv=None):
    d, cfg_path = _cli_defaults(argv)
    parser = argparse.ArgumentParser(description='Write the synthetic demo benchmark (GTA + Cityscapes formats) '
                                                 'to ROOT and convert its labels to train ids.')
    parser.add_argument('root', help='output folder, e.g. data/demo')
    parser.add_argument('--cfg', default=cfg_path, help='the config whose data.demo section gives the defaults '
                                                        '(default configs/demo.yaml)')
    parser.add_argument('--seed', type=int, default=d.seed, help='the files are a pure function of the seed and sizes')
    parser.add_argument('--num-source', type=int, default=d.num_source, help='source (GTA-format) images')
    parser.add_argument('--num-target', type=int, default=d.num_target, help='target (Cityscapes-format) train images')
    parser.add_argument('--num-val', type=int, default=d.num_val, help='target val images')
    parser.add_argument('--width', type=int, default=d.width, help='image width in pixels')
    parser.add_argument('--height', type=int, default=d.height, help='image height in pixels')
    parser.add_argument('--gap', type=float, default=d.gap, help='domain gap strength (0 = none, 1 = default)')
    parser.add_argument('--nproc', type=int, default=1, help='worker processes')
    parser.add_argument('--no-convert', action='store_true', help='leave the raw label ids (no convert_labels.py)')
    args = parser.parse_args(argv)
    try:
        make_demo(args.root, args.seed, args.num_source, args.num_target, args.num_val, args.width, args.height,
                  args.nproc, args.gap)
        if not args.no_convert:
            import convert_labels
            for kind in ('gta', 'cityscapes'):
                convert_labels.convert_dataset(kind, os.path.join(args.root, kind), nproc=args.nproc, progress=False)
        print(f'wrote the demo benchmark to {args.root}')
    except (DataError, ConfigError) as e:
        exit_error(e)


if __name__ == '__main__':
    main()
