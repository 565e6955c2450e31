"""The inference API and the per-image computation of mic_eval: a checkpoint's config and model
(resolve_config, load_model), predict() on one image, the scores of the test-time augmentation
(model_scores), class ids and confidences upsampled to the original size in strips of rows
(scores_to_ids), the --images input folder (ImageFolder) and the PNG writers of predictions,
overlays, id masks and confidences (save_outputs, IdValues).

    model = load_model('work_dirs/toy/latest.pth')        # config from the checkpoint (or cfg=...)
    ids = predict(model, 'photo.jpg')                     # numpy [H,W] uint8; also PIL, arrays, tensors

mic_eval re-exports load_model and predict (documented as mic_eval.load_model, mic_eval.predict) and
runs the loop over a dataset or an --images folder with these pieces. Imports: numpy, torch,
mic_config, mic_data, mic_layouts and mic_model (convert_labels where an --id-map file is read); never mic_eval,
which imports this.
"""
import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F

import mic_config
import mic_data
import mic_layouts
import mic_model
from mic_data import DataError

OVERLAY_ALPHA = 0.5  # weight of the colour prediction in --images overlays


class EvalError(Exception):
    """A usage error of mic_eval (wrong combination of arguments); the message says what to do."""


# --------------------------------------------------------------------------
# The config of a checkpoint
# --------------------------------------------------------------------------

def read_stored_config(path):
    """The config stored in one of our checkpoints, or None (released checkpoints hold none)."""
    ckpt = mic_model.read_checkpoint(path, mmap=True)  # mapped: only the small config is read
    config = ckpt.get('config') if isinstance(ckpt, dict) else None
    return config if isinstance(config, dict) else None


def _nest(key, value):
    out = value
    for part in reversed(key.split('.')):
        out = {part: out}
    return out


def resolve_config(ckpt_path, cfg_path=None, overrides=(), data_root=None, split=None):
    """(config, description): --cfg, else the checkpoint's stored config; then --opt, --data-root, --split."""
    stored = read_stored_config(ckpt_path)
    if cfg_path is not None:
        cfg, source = mic_config.load_config(cfg_path), cfg_path
    elif stored is not None:
        cfg, source = mic_config.merge(mic_config.defaults(), stored), f'stored in {ckpt_path}'
    else:
        raise EvalError(f'checkpoint {ckpt_path} holds no config (a released MIC checkpoint?): pass the config '
                        f'it was trained with, e.g. --cfg configs/gta2cs.yaml (GTA->Cityscapes), '
                        f'configs/synthia2cs.yaml, configs/cs2acdc.yaml or configs/cs2darkzurich.yaml')
    updates = [_nest(*mic_config.parse_override(text)) for text in overrides]
    if data_root is not None:
        updates.append({'data': {'val': {'root': data_root}}})
    if split is not None:
        updates.append({'data': {'val': {'split': split}}})
    if updates:  # all at once: keys that must fit together (checked on the result) may change together
        cfg = mic_config.merge(cfg, *updates)
    return cfg, source


# --------------------------------------------------------------------------
# Inputs and outputs of --images
# --------------------------------------------------------------------------

class ImageFolder(torch.utils.data.Dataset):
    """Any images (png/jpg/bmp/tif/npy, RGB, grayscale or RGBA, 8 or 16 bits) with the test transform of
    EvalDataset (mic_data.eval_input): resize keeping the ratio to fit img_scale, normalise. Items
    like EvalDataset's, label None. `skipped`: the other files of the folder (not images by their
    extension). bands: mic_data.Bands (None: RGB)."""

    def __init__(self, folder, img_scale, bands=None):
        images, self.skipped = mic_layouts.scan_images(folder)
        self.samples = [(p, None) for p in images]
        self.img_scale = img_scale
        self.bands = mic_data.Bands.of(bands)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path = self.samples[i][0]
        img = self.bands.read(path)
        return {'img': mic_data.eval_input(img, self.img_scale, self.bands), 'label': None,
                'ori_size': img.shape[:2], 'img_path': path, 'label_path': None}


def _train_id_to_label_id_lut():
    lut = np.zeros(256, np.uint8)  # ids the model cannot predict -> 0 'unlabeled'
    for train_id, cs_id in mic_data.TRAIN_ID_TO_CS_ID.items():
        lut[train_id] = cs_id
    return lut


def overlay(img, color, rows=256):
    """The colour prediction blended over the image (OVERLAY_ALPHA), uint8 [H,W,3]; computed in strips
    of rows, so that a large photo needs no float copies of itself."""
    out = np.empty_like(color)
    for y in range(0, color.shape[0], rows):
        blend = (1 - OVERLAY_ALPHA) * img[y:y + rows].astype(np.float32) + \
            OVERLAY_ALPHA * color[y:y + rows].astype(np.float32)
        out[y:y + rows] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def ids_image(pred, id_values=None):
    """Class ids [H,W] -> the array of an ids PNG: the train ids (uint8; uint16 beyond 256 classes), or
    id_values[train id] (an IdValues: label ids, or RGB colours for colour-coded labels)."""
    if id_values is None:
        return pred.astype(np.uint8 if pred.max(initial=0) < 256 else np.uint16)
    return id_values.table[pred]


def save_outputs(pred, paths, img_path, palette=None, export_format='trainids', confidence=None, bands=None,
                  id_values=None):
    """pred [H,W] train ids -> the PNGs of `paths` ({kind: path}; kinds color, overlay, export, ids,
    confidence), each written atomically. Colours from `palette` (default: Cityscapes'); the overlay
    reads the image again with `bands` (its first three are shown); confidence uint8 [H,W]."""
    color = mic_data.colorize(pred, palette) if 'color' in paths or 'overlay' in paths else None
    if 'color' in paths:
        mic_data.save_png(paths['color'], color)
    if 'overlay' in paths:
        img = mic_data.display_rgb(mic_data.Bands.of(bands).read(img_path))
        mic_data.save_png(paths['overlay'], overlay(img, color))
    if 'export' in paths:
        out = _train_id_to_label_id_lut()[pred] if export_format == 'labelids' else pred
        mic_data.save_png(paths['export'], out, mode='L')
    if 'ids' in paths:
        mic_data.save_png(paths['ids'], ids_image(pred, id_values))
    if 'confidence' in paths:
        mic_data.save_png(paths['confidence'], confidence, mode='L')


@dataclasses.dataclass(frozen=True)
class IdValues:
    """What an ids PNG holds per train id: table [K] (label ids, uint8 or uint16) or [K,3] (RGB colours)."""
    table: np.ndarray
    source: str

    @classmethod
    def load(cls, spec, num_classes):
        """--id-map: 'cityscapes' (Cityscapes label ids) or the mapping file of convert_labels.py
        (each train id -> the first raw value listed for it: a label id, or a colour)."""
        if spec == 'cityscapes':
            if num_classes != len(mic_data.CLASSES):
                raise EvalError(f'--id-map cityscapes needs the 19 Cityscapes classes; this model has {num_classes}')
            return cls(_train_id_to_label_id_lut()[:num_classes], 'Cityscapes label ids')
        import convert_labels  # the mapping files are its format
        id_map = convert_labels.read_id_map(spec)
        if id_map.num_classes != num_classes:
            raise EvalError(f'the mapping file {spec} has {id_map.num_classes} classes, the model {num_classes}')
        first = {}
        for value, train_id in id_map.values.items():  # (in the file's order: the first value of each class)
            first.setdefault(train_id, value)
        raw = np.array([first[c] for c in range(num_classes)], np.int64)
        if id_map.format == 'rgb':
            return cls(np.stack([raw >> 16, (raw >> 8) & 255, raw & 255], 1).astype(np.uint8), f'colours of {spec}')
        return cls(raw.astype(np.uint8 if raw.max() < 256 else np.uint16), f'label ids of {spec}')


# --------------------------------------------------------------------------
# Prediction: scores at the test scale, class ids at the original size (in strips)
# --------------------------------------------------------------------------

STRIP_ELEMENTS = 1 << 22  # scores upsampled at once: classes x rows x width (16 MB in float32)


def test_time_options(net, flip=None, scales=None):
    """(flip, scales) of the test-time augmentation: the arguments, else model.test.flip / .scales."""
    test = getattr(net, 'test_cfg', None) or {}
    flip = bool(test.get('flip', False)) if flip is None else bool(flip)
    scales = [float(v) for v in (test.get('scales', [1.0]) if scales is None else scales)]
    return flip, scales


def model_scores(net, img, flip=False, scales=(1.0,)):
    """Normalised images [B,C,h,w] at the test scale -> (scores [B,K,h,w] float32, are_probs).

    One pass (no flip, scales [1.0]): the logits of net.inference (are_probs False). Test-time
    augmentation: the softmax probabilities averaged over the passes: the input resized by each
    scale and, with flip, also mirrored left-right; each pass's probabilities are mirrored back and
    resized to h x w (bilinear) before the mean.
    """
    size = tuple(img.shape[2:])
    if not flip and list(scales) == [1.0]:
        return net.inference(img, out_size=size).float(), False
    total, passes = None, 0
    for scale in scales:
        x = img if scale == 1.0 else F.interpolate(
            img, size=tuple(max(1, round(v * scale)) for v in size), mode='bilinear', align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            xi = x.flip(3) if mirrored else x
            probs = net.inference(xi, out_size=tuple(xi.shape[2:])).float().softmax(1)
            probs = probs.flip(3) if mirrored else probs
            if tuple(probs.shape[2:]) != size:
                probs = F.interpolate(probs, size=size, mode='bilinear', align_corners=False)
            total = probs if total is None else total + probs
            passes += 1
    return total / passes, True


def _source_index(n_in, n_out, start, stop, device):
    """Bilinear (align_corners=False) source indices and weights of output positions start..stop-1:
    (i0, i1, w0, w1), as F.interpolate computes them."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    src = (scale * (torch.arange(start, stop, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = (src - i0.float()).clamp(0, 1)
    return i0.to(device), i1.to(device), (1 - w1).to(device), w1.to(device)


def resize_rows(scores, size, start, stop):
    """Rows start..stop-1 of scores [K,h,w] resized (bilinear) to size (H, W): [K,stop-start,W].
    The same values as F.interpolate of the whole map up to float rounding, without holding [K,H,W]."""
    h0, h1, a0, a1 = _source_index(scores.shape[1], size[0], start, stop, scores.device)
    w0, w1, b0, b1 = _source_index(scores.shape[2], size[1], 0, size[1], scores.device)

    def line(rows):
        x = scores[:, rows]  # [K,n,w]
        return x[:, :, w0] * b0 + x[:, :, w1] * b1
    return line(h0) * a0[:, None] + line(h1) * a1[:, None]


def scores_to_ids(scores, are_probs, size, confidence=False):
    """Scores [K,h,w] at the test scale -> (ids [H,W] uint8 (int32 beyond 256 classes), confidence [H,W]
    uint8 = round(255 * max probability) or None) at size (H, W), upsampled in strips of rows so
    that memory stays that of the scores plus the outputs, whatever the size."""
    K, (H, W) = scores.shape[0], tuple(size)
    ids = torch.empty((H, W), dtype=torch.uint8 if K <= 256 else torch.int32, device=scores.device)
    conf = torch.empty((H, W), dtype=torch.uint8, device=scores.device) if confidence else None
    same = tuple(scores.shape[1:]) == (H, W)
    rows = H if same else max(1, STRIP_ELEMENTS // max(1, K * W))
    for y in range(0, H, rows):
        strip = scores[:, y:y + rows] if same else resize_rows(scores, (H, W), y, min(y + rows, H))
        ids[y:y + rows] = strip.argmax(0).to(ids.dtype)
        if confidence:
            top = strip.max(0).values if are_probs else strip.softmax(0).max(0).values
            conf[y:y + rows] = (top * 255).round().to(torch.uint8)
    return ids, conf


def predict_tensor(net, img, size, flip=None, scales=None, confidence=False, amp='none'):
    """One normalised image [1,C,h,w] at the test scale -> (ids [H,W], confidence or None) at size."""
    flip, scales = test_time_options(net, flip, scales)
    with torch.autocast(img.device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16,
                        enabled=amp != 'none'):
        scores, are_probs = model_scores(net, img, flip, scales)
    return scores_to_ids(scores[0], are_probs, size, confidence)


# --------------------------------------------------------------------------
# Python API: load_model, predict
# --------------------------------------------------------------------------

def load_model(ckpt, device=None, cfg=None):
    """A checkpoint's model, loaded and in eval mode on `device` (default: cuda if available, else cpu).

    cfg: the config (a YAML path, or a config from mic_config.load_config); default: the one stored in
    the checkpoint (released checkpoints hold none: pass the YAML they were trained with). The model
    keeps it as model.run_config: predict() reads the test scale, the bands and the test-time
    augmentation from it.
    """
    if cfg is None or isinstance(cfg, (str, os.PathLike)):
        cfg = resolve_config(ckpt, cfg)[0]
    device = torch.device(device) if device is not None else \
        torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = mic_model.build_model(cfg['model'], load_pretrained=False)
    mic_model.load_checkpoint(model, ckpt)
    model.run_config = cfg
    return model.to(device).eval()


def as_image(image, bands):
    """predict()'s input -> uint8 [H,W,C]: a path (mic_data.read_image), a PIL image, a numpy array [H,W,C]
    or [H,W] uint8, or a tensor [C,H,W] (uint8, or float on 0..255). The bands must be the model's."""
    if isinstance(image, (str, os.PathLike)):
        return bands.read(os.fspath(image))
    if hasattr(image, 'getbands'):  # a PIL image: as read_image reads a file
        return mic_data.image_bands(mic_data._pil_bands(mic_data._exif_upright(image), 'the PIL image'),
                                    bands.channels, 'the PIL image')
    if torch.is_tensor(image):
        image = image.detach().cpu()
        image = (image if image.dtype == torch.uint8 else image.round().clamp(0, 255).to(torch.uint8))
        image = (image[None] if image.dim() == 2 else image).permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise DataError(f'predict() takes uint8 images [H,W,C] (or [H,W]); got {array.dtype} {array.shape}')
    return mic_data.image_bands(array[..., None] if array.ndim == 2 else array, bands.channels, 'the array')


@torch.no_grad()
def predict(model, image, return_probs=False, flip=None, scales=None, img_scale=None, amp='none'):
    """Class ids of one image: numpy [H,W] (uint8) at the image's own size.

    model: from load_model (or any built model; then img_scale defaults to the image's own size).
    image: a path, a PIL image, a numpy array [H,W,C] uint8, or a tensor [C,H,W] (see as_image).
    flip, scales: test-time augmentation (default: the model's model.test.flip / model.test.scales);
    img_scale: the test scale (long, short side; default data.val.img_scale of the model's config).
    return_probs: also the class probabilities, float32 [K,H,W] (at the image's size: large).
    The same computation as `mic_eval.py --images`, so the ids equal its <name>_ids.png.
    """
    cfg = getattr(model, 'run_config', None)
    bands = mic_data.Bands.of(cfg['data'] if cfg is not None else None)
    img = as_image(image, bands)
    if img_scale is None:
        img_scale = cfg['data']['val']['img_scale'] if cfg is not None else (max(img.shape[:2]), min(img.shape[:2]))
    device = next(model.parameters()).device
    x = mic_data.eval_input(img, img_scale, bands).to(device)[None]
    model.eval()
    ids, _ = predict_tensor(model, x, img.shape[:2], flip, scales, amp=amp)
    if not return_probs:
        return ids.cpu().numpy()
    scores, are_probs = model_scores(model, x, *test_time_options(model, flip, scales))
    probs = scores[0] if are_probs else scores[0].softmax(0)
    probs = F.interpolate(probs[None], size=tuple(img.shape[:2]), mode='bilinear', align_corners=False)[0]
    return ids.cpu().numpy(), probs.cpu().numpy()
