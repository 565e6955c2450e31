"""Evaluate MIC models: mIoU on a labelled split, colour predictions, test-set exports for the
benchmark servers, and predictions on any folder of images.

    python mic_eval.py --ckpt work_dirs/gta2cs/latest.pth
        evaluates a finished run with the config stored in its checkpoint, on data.val (Cityscapes
        val): prints the per-class IoU table and the mIoU, writes work_dirs/gta2cs/metrics.json and
        colour predictions work_dirs/gta2cs/preds/<image stem>.png (original size, in the colours of
        data.classes: the Cityscapes palette unless the config names its own classes)
    python mic_eval.py --ckpt mic_hrda_gta2cs.pth --cfg configs/gta2cs.yaml --data-root data/cityscapes
        a released MIC checkpoint (it holds no config: --cfg is required); outputs beside the checkpoint
    python mic_eval.py --ckpt work_dirs/synthia2cs_mic_hrda/latest.pth
        Synthia -> Cityscapes: also prints and stores mIoU16 (the 16 Synthia classes)
    python mic_eval.py --ckpt work_dirs/cs2acdc_mic_hrda/latest.pth --split test --format trainids
        ACDC / Dark Zurich test set: OUT/labelTrainIds/<image stem>.png, 8-bit train ids 0..18 and
        nothing else; zip that folder's files and upload them to the benchmark server
    python mic_eval.py --ckpt work_dirs/gta2cs/latest.pth --split test --format labelids
        Cityscapes test set: OUT/labelIds/<city>_<seq>_<frame>_leftImg8bit.png, 8-bit Cityscapes label
        ids (cityscapesscripts' evalPixelLevelSemanticLabeling accepts the folder as it is)
    python mic_eval.py --ckpt work_dirs/gta2cs/latest.pth --images photos/ --out photos_pred/
        any folder of images (png/jpg/bmp/tif, any size, 8 or 16 bits): OUT/<stem>_pred.png (colour
        prediction) and OUT/<stem>_overlay.png (prediction blended over the image); no labels needed.
        Other files in the folder are listed and skipped; an unreadable image stops the run unless
        --skip-unreadable is given (then such images are skipped and listed at the end)
    python mic_eval.py --ckpt work_dirs/toy/latest.pth --images photos/ --out photos_pred/ --format ids \
            [--id-map data/toy/map.yaml] [--save-confidence]
        --format color|overlay|ids|all: OUT/<stem>_pred.png, _overlay.png, _ids.png (8-bit train ids, or
        the label values of a convert_labels.py mapping file with --id-map); --save-confidence adds
        OUT/<stem>_conf.png (top class probability x 255). Memory stays bounded on large photos: the
        scores stay at the test scale and the ids are upsampled in strips of rows
    torchrun --standalone --nproc_per_node=4 mic_eval.py --ckpt work_dirs/gta2cs/latest.pth
        the same on 4 GPUs: rank r evaluates images r, r+4, ...; the confusion matrices are summed
    python mic_eval.py --ckpt ... --amp bf16 --opt model.test.stride=[768,768]
        bf16 autocast, and any config override (`--opt key.sub=value`, YAML values)
    python mic_eval.py --summary 'work_dirs/gta2cs_s*' [--summary-json summary.json]
        mean ± sample std (n - 1) over finished runs (seeds) of mIoU and per-class IoU, from their
        metrics.json: a markdown table (mic_summary.py); folders without metrics.json are listed

Classes: the names in the IoU table and metrics.json, the colours of predictions and overlays and
the allowed label values come from the config's data.classes (README "Your own data"). A data.val
without labels (a folder dataset without label_suffix) gets predictions and no mIoU.
--out defaults to the checkpoint's folder (for --images: <checkpoint folder>/pred_<images folder name>);
it is checked for writing before the model runs. Errors end the program with one line 'error: ...'
on stderr and exit status 2.
metrics.json (written atomically, only after the whole split was evaluated) holds mIoU, the
per-class IoU (null for classes absent from both labels and predictions), aAcc and mIoU16, all in
percent, and num_images, num_pixels, checkpoint, config, split, dataset_type, dataset_root.

Python inference (the same computation as --images; ids equal its _ids.png; defined in mic_predict.py
and re-exported here):

    model = load_model('work_dirs/toy/latest.pth')        # config from the checkpoint (or cfg=...)
    ids = predict(model, 'photo.jpg')                     # numpy [H,W] uint8; also PIL, arrays, tensors
    ids, probs = predict(model, img, return_probs=True, flip=True, scales=[0.75, 1.0])

Test-time augmentation (model.test.flip, model.test.scales) applies to evaluation and prediction:
probabilities averaged over the passes (model_scores).

Library use (mic_train.py's periodic evaluation):

    metrics = evaluate(model, cfg.data.val, num_classes=cfg.model.num_classes, amp='bf16', synthia16=False,
                       classes=cfg.data)
    metrics['mIoU'], metrics['IoU']['road']   # IoU by the names of data.classes

evaluate() evaluates the whole split in this process, unless a torch.distributed process group
is initialised: then it is called on EVERY rank, each rank evaluates its share and all ranks get
the summed result. A caller that runs it on rank 0 only passes distributed=False.

This file holds the metrics, the evaluation loop (run_inference, evaluate) and the command line;
the per-image computation, the PNG writers and the config of a checkpoint are in mic_predict.py.
Imports: torch, mic_runtime, mic_config, mic_data, mic_layouts, mic_model, mic_predict, mic_report (progress
bars) and mic_summary (--summary); mic_train imports this, none of these import it.
"""
import argparse
import collections
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

import mic_data
import mic_layouts
import mic_report
import mic_runtime
from mic_config import ConfigError
from mic_data import CLASSES, IGNORE_INDEX, SYNTHIA_CLASS_NAMES, DataError
from mic_model import CheckpointError
from mic_predict import EvalError, IdValues, ImageFolder, load_model, predict_tensor, resolve_config, save_outputs
from mic_predict import predict  # noqa: F401 (unused here: re-exported, documented as mic_eval.predict)
from mic_runtime import exit_error, print0, setup_distributed

EXPORT_FOLDERS = {'trainids': 'labelTrainIds', 'labelids': 'labelIds'}  # --format -> folder under OUT
# --images --format: what is written per image, OUT/<name>_<suffix>.png (default: color and overlay)
IMAGES_FORMATS = {'color': ('color',), 'overlay': ('overlay',), 'ids': ('ids',), 'all': ('color', 'overlay', 'ids')}
IMAGES_SUFFIXES = {'color': '_pred.png', 'overlay': '_overlay.png', 'ids': '_ids.png', 'confidence': '_conf.png'}
IMAGES_WORDS = {'color': 'colour predictions', 'overlay': 'overlays', 'ids': 'id masks', 'confidence': 'confidences'}


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

def confusion_matrix(pred, label, num_classes, ignore_index=IGNORE_INDEX):
    """[K*K] int64 counts of (label, pred) pairs over the pixels whose label is not ignored.

    pred, label: integer tensors of the same shape on the same device; entry label * K + pred.
    Uses scatter_add (no host synchronisation, unlike bincount on CUDA).
    """
    K = num_classes
    valid = label != ignore_index
    index = torch.where(valid, label.long() * K + pred.long(), K * K)  # ignored pixels -> an extra bin
    counts = torch.zeros(K * K + 1, dtype=torch.int64, device=pred.device)
    counts.scatter_add_(0, index.flatten(), torch.ones_like(index.flatten()))
    return counts[:K * K]


def _nan_to_none(x):
    x = float(x)
    return None if x != x else x


def compute_metrics(conf_matrix, class_names=None, synthia16=False):
    """Benchmark metrics of a confusion matrix accumulated over a whole split.

    conf_matrix: [K,K] counts (tensor or array), rows = label, columns = prediction, ignored
        pixels already excluded.
    class_names: one per class (data.classes; default: the Cityscapes names for 19 classes, else
        '0', '1', ...).
    IoU_c = TP / (TP + FP + FN); classes with an empty union (neither in the labels nor predicted)
    are excluded from the mean (None), a class only predicted scores 0. mIoU = mean over the
    others, aAcc = correct / labelled pixels, mIoU16 (synthia16) = mean over the 16 classes of
    SYNTHIA_CLASS_NAMES (looked up by name).
    Returns {'mIoU', 'IoU': {name: IoU}, 'aAcc', ['mIoU16'], 'num_pixels'}: percent, None for NaN.
    """
    if torch.is_tensor(conf_matrix):
        conf = conf_matrix.detach().cpu().double()
    else:
        conf = torch.as_tensor(np.asarray(conf_matrix), dtype=torch.float64)
    K = conf.shape[0]
    if conf.shape != (K, K):
        raise ValueError(f'the confusion matrix must be square, got {tuple(conf.shape)}')
    if class_names is None:
        class_names = CLASSES if K == len(CLASSES) else [str(c) for c in range(K)]
    if len(class_names) != K:
        raise ValueError(f'{len(class_names)} class names for a {K}x{K} confusion matrix')
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union  # NaN where the union is empty (0 / 0)
    total = conf.sum()
    out = {
        'mIoU': _nan_to_none(iou.nanmean() * 100),
        'IoU': {name: _nan_to_none(v * 100) for name, v in zip(class_names, iou)},
        'aAcc': _nan_to_none(tp.sum() / total * 100) if total > 0 else None,
    }
    if synthia16:
        missing = [n for n in SYNTHIA_CLASS_NAMES if n not in class_names]
        if missing:
            raise ValueError(f'mIoU16 needs the 16 Synthia classes of Cityscapes; the classes lack {missing}')
        subset = [list(class_names).index(n) for n in SYNTHIA_CLASS_NAMES]
        out['mIoU16'] = _nan_to_none(iou[subset].nanmean() * 100)
    out['num_pixels'] = int(total)
    return out


def _fmt(v):
    return '  n/a' if v is None else f'{v:5.2f}'


def format_table(metrics):
    """Per-class IoU table and the summary line, as printed by the CLI."""
    width = max(len(n) for n in metrics['IoU'])
    lines = [f'{"class":<{width}}   IoU (%)', '-' * (width + 10)]
    lines += [f'{name:<{width}}   {_fmt(v)}' for name, v in metrics['IoU'].items()]
    lines.append('-' * (width + 10))
    summary = f'mIoU {_fmt(metrics["mIoU"])}'
    if 'mIoU16' in metrics:
        summary += f'   mIoU16 {_fmt(metrics["mIoU16"])} (16 Synthia classes)'
    summary += f'   aAcc {_fmt(metrics["aAcc"])}   ({metrics.get("num_images", "?")} images)'
    lines.append(summary)
    return '\n'.join(lines)


# --------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------

class _CheckedItems(torch.utils.data.Dataset):
    """The items of `dataset` at `indices`, label values checked; data errors come back as values,
    so that a DataLoader worker's error reaches the user as one clean message."""

    def __init__(self, dataset, indices, num_classes):
        self.dataset, self.indices, self.num_classes = dataset, list(indices), num_classes

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        try:
            item = self.dataset[self.indices[i]]
            label = item['label']
            if label is not None:
                bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
                if bool(bad.any()):
                    raise DataError(f'label {item["label_path"]} holds values {sorted(set(label[bad].tolist()))[:8]} '
                                    f'outside the train ids 0..{self.num_classes - 1} and {IGNORE_INDEX} (ignore); '
                                    f'labels must be converted to train ids (python convert_labels.py)')
            return item
        except DataError as e:
            return {'error': str(e), 'img_path': self.dataset.samples[self.indices[i]][0]}


def output_names(paths, suffix='.png'):
    """Output file names: image stem + suffix; DataError if two images would share one."""
    names = [os.path.splitext(os.path.basename(p))[0] + suffix for p in paths]
    seen = {}
    for p, n in zip(paths, names):
        if n in seen:
            raise DataError(f'images {seen[n]} and {p} would both be written as {n}; '
                            f'rename one of them (outputs are named after the image file)')
        seen[n] = p
    return names


def _images_names(folder, paths):
    """--images outputs: relative path under `folder` without extension (the extension is kept
    where two images differ only in it)."""
    rel = [os.path.relpath(p, folder) for p in paths]
    stems = [os.path.splitext(r)[0] for r in rel]
    count = collections.Counter(stems)
    return [s if count[s] == 1 else os.path.join(os.path.dirname(r), os.path.basename(r).replace('.', '_'))
            for s, r in zip(stems, rel)]


def _check_export_folder(folder, names):
    """The export folder must end up holding one PNG per image and nothing else."""
    if not os.path.isdir(folder):
        return
    expected = set(names)
    other = sorted(n for n in os.listdir(folder) if n not in expected and not mic_runtime.is_temp_file(n))
    if other:
        raise EvalError(f'the export folder {folder} already holds {len(other)} other file(s) '
                        f'({", ".join(other[:3])}{", ..." if len(other) > 3 else ""}); benchmark servers '
                        f'want exactly one PNG per test image: remove the folder or choose another --out')


class _Writer:
    """Writes PNGs on background threads while the model works; errors surface at close()."""

    def __init__(self, threads=2, max_pending=16):
        self.pool = ThreadPoolExecutor(threads)
        self.pending = collections.deque()
        self.max_pending = max_pending

    def submit(self, fn, *args):
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.max_pending:
            self.pending.popleft().result()

    def close(self, raise_errors=True):
        """Wait for every write; raise the first error (raise_errors=False: on an error path, where
        the writes' own errors, e.g. the same full disk, would only hide the first one)."""
        try:
            while self.pending:
                future = self.pending.popleft()
                if raise_errors:
                    future.result()
                else:
                    future.exception()
        finally:
            self.pool.shutdown(wait=True)


# --------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------

def _dist_rank_world(distributed):
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised and dist.get_world_size() > 1
    if distributed and not initialised:
        raise RuntimeError('evaluate(distributed=True) needs an initialised torch.distributed process group')
    return (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)


def _output_paths(pred_dir, export_dir, outputs, i):
    """{kind: path} of image i: outputs {kind: names} under pred_dir, 'export' under export_dir."""
    paths = {kind: os.path.join(pred_dir, names[i]) for kind, names in outputs.items() if kind != 'export'}
    if export_dir:
        paths['export'] = os.path.join(export_dir, outputs['export'][i])
    return paths


def _broadcast(values):
    dist.broadcast_object_list(values, src=0)
    return values


def _infer_item(net, item, device, amp, confidence, conf, counts):
    """Predict one EvalDataset item: (ids [H0,W0], confidence or None); adds its labelled pixels to the
    confusion matrix `conf` and to `counts` (images, labelled images)."""
    img = item['img'].to(device, non_blocking=True)[None]
    pred, top = predict_tensor(net, img, item['ori_size'], confidence=confidence, amp=amp)
    counts[0] += 1
    if item['label'] is not None:
        K = int(round(conf.numel() ** 0.5))
        conf += confusion_matrix(pred, item['label'].to(device, non_blocking=True), K)
        counts[1] += 1
    return pred, top


def _eval_loader(dataset, rank, world, num_classes, num_workers):
    """This rank's share of the images (i = rank, rank + world, ...), one at a time."""
    workers = mic_data.loader_workers(num_workers)
    return torch.utils.data.DataLoader(
        _CheckedItems(dataset, range(rank, len(dataset), world), num_classes), batch_size=1, shuffle=False,
        num_workers=workers, collate_fn=mic_data.eval_collate,
        worker_init_fn=mic_data.worker_init_fn if workers > 0 else None)


def _output_names(pred_dir, export_dir, names, overlay_names, outputs, dataset):
    """run_inference's {kind: names}: `outputs` as given, else colour predictions (names, default the
    image stems), overlays and exports."""
    outputs = dict(outputs or {})
    if not outputs and (pred_dir or export_dir):
        names = names if names is not None else output_names([s[0] for s in dataset.samples])
        outputs = {'color': names, **({'overlay': overlay_names} if overlay_names else {})}
    if export_dir:
        outputs['export'] = outputs.pop('color') if not pred_dir else outputs['color']
    elif not pred_dir:
        outputs = {}
    return outputs


def _prepare_folders(pred_dir, export_dir, outputs, rank, world):
    """Create the output folders and clean their temporary files (rank 0); refuse an export folder
    that holds other files."""
    for folder in (pred_dir, export_dir):
        if folder:
            mic_runtime.make_dirs(folder)
            if rank == 0:
                mic_runtime.remove_temp_files(folder)
    if export_dir:
        _check_export_folder(export_dir, outputs['export'])
    if world > 1:
        dist.barrier()  # no rank writes before rank 0 has cleaned the output folders


@torch.no_grad()
def run_inference(model, dataset, num_classes=19, device=None, amp='none', pred_dir=None, export_dir=None,
                  export_format='trainids', names=None, overlay_names=None, progress=True, distributed=None,
                  num_workers=2, desc='eval', skipped=None, error_hint='', palette=None, outputs=None,
                  id_values=None, bands=None):
    """Predict every image of `dataset` (EvalDataset-like items), accumulate the confusion matrix
    of the labelled ones and write the requested PNGs.

    pred_dir: colour predictions pred_dir/names[i] in `palette` (an [r, g, b] per class; default
    the Cityscapes colours); export_dir: train-id or label-id PNGs
    export_dir/names[i] (export_format); overlay_names: also the prediction blended over the image,
    pred_dir/overlay_names[i]. names default to the image stem + '.png'. outputs: instead, {kind: names
    under pred_dir}, kinds color, overlay, ids (ids_image with id_values), confidence. bands: how the
    overlays read the images. Test-time augmentation: the model's model.test.flip / .scales.
    An unreadable image (or label) raises DataError with its message + error_hint; unless `skipped`
    is a list: then such images are skipped (nothing written for them) and (path, message) pairs of
    all ranks are appended to it.
    Returns (conf [K,K] int64 on `device`, num_images, num_labelled), summed over ranks.
    """
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    device = torch.device(device) if device is not None else next(net.parameters()).device
    if amp not in ('none', 'bf16', 'fp16'):
        raise ValueError(f'amp must be none, bf16 or fp16, got {amp!r}')
    rank, world = _dist_rank_world(distributed)
    if world > 1:  # rank 0's output folders count (a caller may pass them on rank 0 only)
        pred_dir, export_dir = _broadcast([pred_dir, export_dir])
    outputs = _output_names(pred_dir, export_dir, names, overlay_names, outputs, dataset)
    _prepare_folders(pred_dir, export_dir, outputs, rank, world)
    loader = _eval_loader(dataset, rank, world, num_classes, num_workers)
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # images, labelled images
    writer = _Writer() if outputs else None
    was_training = net.training
    net.eval()
    failed = []  # this rank's skipped images
    ok = False
    bar = mic_report.progress_bar(loader, desc=desc, disable=not progress or rank != 0)
    try:
        for j, item in enumerate(bar):
            if 'error' in item:
                if skipped is None:
                    raise DataError(item['error'] + error_hint)
                failed.append((item['img_path'], item['error']))
                continue
            pred, confidence = _infer_item(net, item, device, amp, 'confidence' in outputs, conf, counts)
            if writer is not None:
                paths = _output_paths(pred_dir, export_dir, outputs, rank + j * world)
                writer.submit(save_outputs, pred.cpu().numpy(), paths, item['img_path'], palette, export_format,
                              None if confidence is None else confidence.cpu().numpy(), bands, id_values)
        ok = True
    finally:
        bar.close()  # ends the bar's line, so that an error message starts on its own
        if writer is not None:
            writer.close(raise_errors=ok)
        net.train(was_training)
    return _gather_results(conf, counts, failed, skipped, num_classes, world)


def _gather_results(conf, counts, failed, skipped, K, world):
    if world > 1:
        dist.all_reduce(conf)
        dist.all_reduce(counts)
        if skipped is not None:
            gathered = [None] * world
            dist.all_gather_object(gathered, failed)
            failed = sorted(f for part in gathered for f in part)
    if skipped is not None:
        skipped.extend(failed)
    n_images, n_labelled = counts.tolist()
    return conf.view(K, K), n_images, n_labelled


def evaluate(model, ds_cfg, num_classes=19, device=None, amp='none', pred_dir=None, progress=True,
             synthia16=False, distributed=None, num_workers=2, export_dir=None, export_format='trainids',
             need_labels=None, classes=None, bands=None):
    """mIoU of `model` (built and loaded) on the dataset `ds_cfg` (e.g. cfg.data.val).

    Switches the model to eval mode and restores its previous mode. Writes nothing unless
    pred_dir (colour predictions <image stem>.png) or export_dir (train-id / label-id PNGs for
    the benchmark servers, export_format 'trainids' or 'labelids') is given.
    amp: 'none', 'bf16' or 'fp16' autocast around inference.
    distributed: None = auto (shard over the ranks and sum when a process group with more than
        one rank is initialised: call it on every rank); False = this process evaluates everything
        (e.g. called on rank 0 only); True = shard (the group must be initialised). When sharded,
        rank 0's pred_dir / export_dir apply to all ranks (each writes its own images' files).
    need_labels: False evaluates images without labels too (test split): metrics are computed
        only when every image has a label and some pixel is labelled. None: whether the dataset has
        labels (mic_data.has_labels: not for a test split or a folder dataset without label_suffix).
    classes: the classes (cfg.data, a data.classes value or a mic_data.ClassTable; None: Cityscapes'
        for 19 classes): the names in the metrics, the colours of the predictions, the label values.
        synthia16 applies when they hold the 16 Synthia classes.
    bands: the image bands (cfg.data or a mic_data.Bands; None: RGB with ImageNet's statistics).
    Test-time augmentation: model.test.flip and model.test.scales of the model's config.
    Returns {'mIoU', 'IoU', 'aAcc', ['mIoU16'], 'num_pixels', 'num_images'} (percent; see
    compute_metrics), the same on every rank; without labels only {'num_images': n}.
    """
    table = mic_data.class_table(classes, num_classes)
    if table.num_classes != num_classes:
        raise ValueError(f'{table.num_classes} classes for a model of {num_classes}')
    if need_labels is None:
        need_labels = mic_data.has_labels(ds_cfg)
    dataset = mic_data.EvalDataset(ds_cfg, need_labels=need_labels, classes=table, bands=bands)
    conf, n_images, n_labelled = run_inference(
        model, dataset, num_classes, device, amp, pred_dir=pred_dir, export_dir=export_dir,
        export_format=export_format, progress=progress, distributed=distributed, num_workers=num_workers,
        palette=table.palette, bands=dataset.bands)
    if n_labelled == 0 or n_labelled < n_images or int(conf.sum()) == 0:
        if n_labelled and _dist_rank_world(distributed)[0] == 0:
            print(f'warning: {n_labelled} of {n_images} images have labels, {int(conf.sum())} labelled pixels: '
                  f'no metrics computed')
        return {'num_images': n_images}
    metrics = compute_metrics(conf, table.names, synthia16 and set(SYNTHIA_CLASS_NAMES) <= set(table.names))
    metrics['num_images'] = n_images
    return metrics


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _format_choice(text):
    if text not in EXPORT_FOLDERS and text not in IMAGES_FORMATS:
        raise argparse.ArgumentTypeError(f'invalid choice: {text!r} (a split: {", ".join(EXPORT_FOLDERS)}; '
                                         f'--images: {", ".join(IMAGES_FORMATS)})')
    return text


def _add_images_args(parser):
    """The options of --images DIR (prediction on a folder of images), in the order --help lists them."""
    parser.add_argument('--images', default=None, metavar='DIR',
                        help='predict every image under DIR instead of a dataset split (see --format)')
    parser.add_argument('--id-map', default=None, metavar='MAP',
                        help='--images --format ids|all: write label values instead of train ids: the mapping file '
                             'given to convert_labels.py (the first value listed per class: ids, or colours for '
                             'format rgb), or cityscapes (Cityscapes label ids)')
    parser.add_argument('--save-confidence', action='store_true',
                        help='--images: also OUT/<name>_conf.png, the top class probability x 255 (8-bit)')
    parser.add_argument('--skip-unreadable', action='store_true',
                        help='with --images: skip images that cannot be read (listed at the end) instead of stopping')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Evaluate a MIC checkpoint: mIoU and colour predictions on a labelled split, '
                    'test-set exports for the benchmark servers, predictions on any folder of images.',
        epilog='examples:\n'
               '  python mic_eval.py --ckpt work_dirs/gta2cs/latest.pth\n'
               '  python mic_eval.py --ckpt mic_gta2cs.pth --cfg configs/gta2cs.yaml --data-root data/cityscapes\n'
               '  python mic_eval.py --ckpt work_dirs/cs2acdc/latest.pth --split test --format trainids\n'
               '  python mic_eval.py --ckpt work_dirs/gta2cs/latest.pth --split test --format labelids\n'
               '  python mic_eval.py --ckpt work_dirs/gta2cs/latest.pth --images photos/ --out photos_pred/\n'
               '  torchrun --standalone --nproc_per_node=4 mic_eval.py --ckpt work_dirs/gta2cs/latest.pth\n'
               "  python mic_eval.py --summary 'work_dirs/gta2cs_s*'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default=None,
                        help='checkpoint: ours (work_dirs/RUN/latest.pth, config inside) or a released MIC one')
    parser.add_argument('--cfg', default=None,
                        help='YAML config; required for released checkpoints, replaces the stored config of ours')
    parser.add_argument('--data-root', default=None, help='dataset folder of the evaluated split (data.val.root)')
    parser.add_argument('--split', default=None, choices=['val', 'test', 'train'],
                        help='split to evaluate (data.val.split; default: the config\'s, val); '
                             'the test split has no labels and needs --format')
    parser.add_argument('--out', default=None,
                        help='output folder (default: the checkpoint\'s folder; for --images: '
                             '<checkpoint folder>/pred_<images folder name>)')
    parser.add_argument('--format', default=None, type=_format_choice,
                        metavar='{' + ','.join(EXPORT_FOLDERS) + '}|{' + ','.join(IMAGES_FORMATS) + '}',
                        help='a split: also export predictions for a benchmark server: trainids -> OUT/labelTrainIds/ '
                             '(ACDC, Dark Zurich), labelids -> OUT/labelIds/ (Cityscapes); one PNG per image. '
                             '--images: color (OUT/<name>_pred.png), overlay (<name>_overlay.png), ids '
                             '(<name>_ids.png: train ids, 8-bit; see --id-map) or all; default color and overlay')
    _add_images_args(parser)
    parser.add_argument('--no-preds', action='store_true', help='do not write colour predictions (OUT/preds/)')
    parser.add_argument('--amp', default='none', choices=['none', 'bf16'], help='autocast precision of inference')
    parser.add_argument('--opt', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. model.test.mode=whole data.num_workers=0')
    parser.add_argument('--summary', nargs='+', default=None, metavar='RUN',
                        help="instead of evaluating: mean ± std over finished run folders (folders or quoted "
                             "globs, e.g. 'work_dirs/gta2cs_s*') of mIoU and per-class IoU, a markdown table")
    parser.add_argument('--summary-json', default=None, metavar='FILE', help='--summary: also write it as JSON')
    parser.add_argument('--summary-of', default='last', choices=['last', 'best'],
                        help="--summary: each run's last evaluation (default, as the paper reports) or its best one "
                             '(chosen on the evaluated split itself, so optimistic)')
    args = parser.parse_args(argv)
    if args.summary is None and args.ckpt is None:
        parser.error('the following arguments are required: --ckpt (or --summary RUN ...)')
    if args.summary is not None and args.ckpt is not None:
        parser.error('--summary summarises the metrics.json of finished runs: it takes no --ckpt')
    _check_format_args(parser, args)
    if args.skip_unreadable and not args.images:
        parser.error('--skip-unreadable applies to --images only: a dataset split is evaluated whole '
                     '(a skipped image would change the mIoU)')
    return args


def _check_format_args(parser, args):
    """--format, --id-map and --save-confidence against --images: each applies to one of the two."""
    if args.images and (args.split or args.data_root):
        parser.error('--images predicts a folder of images: it takes no --split or --data-root')
    if args.images and args.format in EXPORT_FOLDERS:
        parser.error(f'--format {args.format} exports a dataset split; with --images choose '
                     f'{", ".join(IMAGES_FORMATS)} (ids: train ids, or label values with --id-map)')
    if not args.images and args.format in IMAGES_FORMATS:
        parser.error(f'--format {args.format} applies to --images DIR; a split exports {" or ".join(EXPORT_FOLDERS)}')
    if (args.id_map or args.save_confidence) and not args.images:
        parser.error('--id-map and --save-confidence apply to --images DIR')
    if args.id_map and args.format not in ('ids', 'all'):
        parser.error('--id-map sets the values of the ids PNGs: add --format ids (or all)')


def check_path_kinds(args):
    """A folder where a file is expected (--ckpt) or a file where a folder is (--images), named as such."""
    if os.path.isdir(args.ckpt):
        latest = os.path.join(args.ckpt, 'latest.pth')
        hint = f'pass {latest}' if os.path.isfile(latest) else 'pass a checkpoint file (a run folder holds latest.pth)'
        raise EvalError(f'--ckpt {args.ckpt} is a folder, not a checkpoint file: {hint}')
    if args.images and os.path.exists(args.images) and not os.path.isdir(args.images):
        raise EvalError(f'--images {args.images} is a file; --images takes a folder (every image under it is '
                        f'predicted): put the image in a folder of its own and pass that folder')


def run(args, rank=0, world=1, device=None):
    """The CLI's work; returns the metrics dict (None when nothing was measured)."""
    device = device or torch.device('cpu')
    check_path_kinds(args)
    cfg, cfg_source = resolve_config(args.ckpt, args.cfg, args.opt, args.data_root, args.split)
    val = cfg['data']['val']
    if not args.images and val['split'] == 'test' and not args.format:
        fmt = 'labelids' if val['type'] == 'cityscapes' else 'trainids'
        raise EvalError(f'the test split has no labels, so no mIoU can be computed here; export the predictions '
                        f'for the benchmark server instead: python mic_eval.py --ckpt {args.ckpt} --split test '
                        f'--format {fmt}' + (f' --cfg {args.cfg}' if args.cfg else ''))
    ckpt_dir = os.path.dirname(os.path.abspath(args.ckpt))
    if args.images:
        folder = args.images.rstrip('/') or '/'
        out = args.out or os.path.join(ckpt_dir, 'pred_' + os.path.basename(os.path.abspath(folder)))
        if os.path.commonpath([os.path.abspath(out), os.path.abspath(folder)]) == os.path.abspath(folder):
            raise EvalError(f'--out {out} lies inside the images folder {folder}; choose another --out')
        dataset = ImageFolder(folder, val['img_scale'], mic_data.Bands.of(cfg['data']))
    else:
        out = args.out or ckpt_dir
    created = not os.path.exists(out)
    if rank == 0:
        mic_runtime.check_writable(out)  # a read-only or forbidden --out fails now, not after the evaluation
    try:
        model = load_model(args.ckpt, device, cfg)
        if args.images:
            return _predict_folder(args, cfg, model, dataset, folder, out, device, world)
        return _evaluate_split(args, cfg, cfg_source, model, out, device, rank, world)
    except BaseException:
        if args.images and created and rank == 0:
            _remove_empty_folders(out)  # a failed prediction run leaves no empty output folder behind
        raise


def _remove_empty_folders(folder):
    """Remove `folder` and its sub-folders where they hold no file (bottom-up)."""
    for path, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(path)
        except OSError:  # not empty (or already gone)
            pass


def _predict_folder(args, cfg, model, dataset, folder, out, device, world):
    """--images: the chosen PNGs of every image under `folder`, written to `out`."""
    K = cfg['model']['num_classes']
    classes = mic_data.class_table(cfg['data'], K)
    kinds = IMAGES_FORMATS[args.format] if args.format else ('color', 'overlay')
    kinds = (*kinds, 'confidence') if args.save_confidence else kinds
    id_values = IdValues.load(args.id_map, K) if args.id_map else None
    if dataset.skipped:
        print0(_skipped_files_note(dataset.skipped, folder))
    stems = _images_names(folder, [s[0] for s in dataset.samples])
    for sub in sorted({os.path.dirname(os.path.join(out, stem)) for stem in stems}):
        mic_runtime.make_dirs(sub)
    unreadable = [] if args.skip_unreadable else None
    run_inference(model, dataset, K, device, args.amp, pred_dir=out, distributed=world > 1,
                  num_workers=cfg['data']['num_workers'], desc='predict', skipped=unreadable,
                  error_hint='. To skip unreadable images and list them at the end, run again with '
                             '--skip-unreadable', palette=classes.palette, id_values=id_values,
                  outputs={k: [s + IMAGES_SUFFIXES[k] for s in stems] for k in kinds}, bands=dataset.bands)
    done = len(dataset) - len(unreadable or [])
    words = [IMAGES_WORDS[k] for k in kinds]
    what = ', '.join(words[:-1]) + ' and ' + words[-1] if len(words) > 1 else words[0]
    print0(f'wrote {what} of {done} images to {out}' + (f' (ids: {id_values.source})' if id_values else ''))
    if dataset.skipped:
        print0(f'skipped {len(dataset.skipped)} file(s) that are not images (listed above)')
    if unreadable:
        print0(f'skipped {len(unreadable)} unreadable image(s), no prediction written for them:')
        for path, message in unreadable:
            print0(f'  {path}: {message}')
    return None


def _evaluate_split(args, cfg, cfg_source, model, out, device, rank, world):
    """A dataset split (data.val): the mIoU table and metrics.json, colour predictions, exports."""
    val, K = cfg['data']['val'], cfg['model']['num_classes']
    export_dir = os.path.join(out, EXPORT_FOLDERS[args.format]) if args.format else None
    metrics = evaluate(model, val, K, device, args.amp, pred_dir=None if args.no_preds else os.path.join(out, 'preds'),
                       synthia16=cfg['data']['source']['type'] == 'synthia', distributed=world > 1,
                       num_workers=cfg['data']['num_workers'], export_dir=export_dir,
                       export_format=args.format or 'trainids', need_labels=False if args.format else None,
                       classes=mic_data.class_table(cfg['data'], K), bands=cfg['data'])
    if 'mIoU' in metrics:
        metrics.update(checkpoint=os.path.abspath(args.ckpt), config=cfg_source, split=val['split'],
                       dataset_type=val['type'], dataset_root=os.path.abspath(val['root']))
        if rank == 0:
            print(format_table(metrics))
            mic_runtime.make_dirs(out)
            path = os.path.join(out, 'metrics.json')
            mic_runtime.save_json(path, metrics)
            print(f'wrote {path}')
    elif not mic_data.has_labels(val):
        print0(f'{val["type"]} dataset {val["root"]} has no labels (no label_suffix): cannot compute mIoU, '
               f'predictions only')
    else:
        print0(f'{val["type"]} {val["split"]} under {val["root"]} is not fully labelled: no metrics computed')
    if export_dir:
        print0(f'exported {metrics["num_images"]} {args.format} PNGs for the benchmark server to {export_dir}')
    if not args.no_preds:
        print0(f'colour predictions in {os.path.join(out, "preds")}')
    return metrics if 'mIoU' in metrics else None


def _skipped_files_note(paths, folder, show=20):
    names = [os.path.relpath(p, folder) for p in paths]
    listed = ', '.join(names[:show]) + (f', ... ({len(names) - show} more)' if len(names) > show else '')
    return (f'skipping {len(names)} file(s) under {folder} that are not images '
            f'({", ".join(mic_layouts.IMAGE_EXTENSIONS)}): {listed}')


def main(argv=None):
    args = parse_args(argv)
    if args.summary:  # no model, no device: reads the runs' metrics.json
        import mic_summary
        return mic_summary.summary_main(args.summary, args.summary_json, which=args.summary_of)
    mic_runtime.limit_threads()
    rank, world, device = setup_distributed()
    try:
        return run(args, rank, world, device)
    except (DataError, CheckpointError, ConfigError, EvalError, FileNotFoundError) as e:
        exit_error(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
