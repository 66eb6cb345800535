"""Localisation benchmark: does a model's explanation point at the tumour? Measured against expert tumour boxes.

For every slice of BOXES_CSV (``file,class,x_center,y_center,width,height``, fractions of the side, origin top-left;
see ../shared/data/figshare-boxes/README.md) and every explanation method (``explain_batch``), the map of the
slice's true class is compared with its box:

  pointing game   hit when the map's maximum lies inside the box grown by 15/512 of the side on every edge (15 px
                  at 512 px, Zhang et al. 2016); a plateau of equal maxima (e.g. a CAM's clamped border) points at
                  its centroid; a map that is zero everywhere points nowhere (a miss)
  mass in box     the share of the map's total mass inside the (ungrown) box (the "energy" pointing game of
                  Score-CAM); a zero map has none

with the same for two baselines: ``centre`` (a Gaussian centred on the image, sigma 1/4 of the side: points at the
centre) and ``random`` (i.i.d. uniform noise, seeded: the chance level). 95 % intervals: Wilson for hit rates,
percentile bootstrap (2,000 resamples, seeded) for mean mass. ``--faithfulness`` adds deletion and insertion AUC
(Petsiuk et al. 2018): the explained class's probability as the map's pixels, most important first, are
replaced by black (deletion, lower is better) or put onto a black image (insertion, higher is better), in 16 steps,
for the baselines too (a random order is the reference: on MRI slices it scores the best deletion of all, because
scattered black pixels alone make a model fail, so read deletion against it). ``--diagnose`` adds masking tests,
where each map's maximum sits and how far it lies from the box (in box sides, against the image centre's).

    python benchmarks/localization.py ../shared/data/figshare-boxes/boxes.csv --checkpoint reference \\
        [--methods gradcam occlusion ...] [--layers layer3 layer4] [--limit 60] [--json out.json] \\
        [--save-maps maps.npz] [--image-size 256] [--faithfulness] [--mirror on|off|both]
    python benchmarks/localization.py BOXES_CSV --average a.npz b.npz ... [--methods gradcampp --layers layer3]

Results (a Markdown table, or JSON with --json -) go to stdout, progress to stderr. Boxes are for measuring only:
never train on them or choose weights with them.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from braintumor.data.transforms import resize_batch
from braintumor.errors import UserError
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import emit_report
from braintumor.utils.outputs import refuse_overwrites
from braintumor.visualize.explain import (CAM_METHODS, DEFAULT_LAYER, DEFAULT_MIRROR, METHODS, explain_batch,
                                          explain_cam_batch)

GROW = 15 / 512  # pointing-game tolerance, as a share of the side
BASELINES = ("centre", "random")
CENTRE_SIGMA = 0.25  # the centre baseline's Gaussian sigma, as a share of the side
BOOTSTRAP_RESAMPLES = 2000
FAITHFULNESS_STEPS = 16


@dataclass(frozen=True)
class Box:
    """One slice's tumour box in fractions of the side (origin top-left, x to the right)."""

    file: str
    label: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)


def read_boxes(path: str | Path) -> list[Box]:
    """The boxes of a ``file,class,x_center,y_center,width,height`` CSV; a ValueError names a bad row."""
    path = Path(path)
    boxes = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"file", "class", "x_center", "y_center", "width", "height"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            try:
                x, y, w, h = (float(row[key]) for key in ("x_center", "y_center", "width", "height"))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: box values must be numbers") from None
            # Published boxes are rounded to 2 decimals: an edge may stick out of the image by that much.
            if not (all(np.isfinite((x, y, w, h))) and w > 0 and h > 0 and x - w / 2 >= -0.01
                    and x + w / 2 <= 1.01 and y - h / 2 >= -0.01 and y + h / 2 <= 1.01):
                raise ValueError(f"{path}:{line}: the box must lie inside the image (fractions 0-1)")
            boxes.append(Box(row["file"], row["class"], max(0.0, x - w / 2), max(0.0, y - h / 2),
                             min(1.0, x + w / 2), min(1.0, y + h / 2)))
    return boxes


def box_mask(box: Box, size: int, grow: float = 0.0) -> np.ndarray:
    """(size, size) bool: the pixels whose centres lie in the box grown by ``grow`` (share of the side)."""
    centres = (np.arange(size) + 0.5) / size
    cols = (centres >= box.x0 - grow) & (centres <= box.x1 + grow)
    rows = (centres >= box.y0 - grow) & (centres <= box.y1 + grow)
    return rows[:, None] & cols[None, :]


def peak(heatmap: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the map's maximum in fractions of the side: the centroid of a plateau of equal maxima; None for a
    map that is zero everywhere."""
    top = float(heatmap.max())
    if not top > 0:
        return None
    rows, cols = np.nonzero(heatmap >= top - 1e-6 * top)
    height, width = heatmap.shape
    return (cols.mean() + 0.5) / width, (rows.mean() + 0.5) / height


def pointing_hit(heatmap: np.ndarray, box: Box, grow: float = GROW) -> bool:
    """Whether the map's maximum lies in the box grown by ``grow`` on every edge."""
    point = peak(heatmap)
    return point is not None and (box.x0 - grow <= point[0] <= box.x1 + grow
                                  and box.y0 - grow <= point[1] <= box.y1 + grow)


def mass_in_box(heatmap: np.ndarray, box: Box) -> float:
    """The share of the map's (non-negative) mass inside the box; 0 for a zero map."""
    total = float(heatmap.sum())
    return float(heatmap[box_mask(box, heatmap.shape[0])].sum()) / total if total > 0 else 0.0


def centre_map(size: int) -> np.ndarray:
    """The centre baseline: a Gaussian on the image centre, sigma CENTRE_SIGMA of the side, max 1."""
    centres = (np.arange(size) + 0.5) / size - 0.5
    return np.exp(-(centres[:, None] ** 2 + centres[None, :] ** 2) / (2 * CENTRE_SIGMA ** 2)).astype(np.float32)


def random_maps(count: int, size: int, seed: int = 0) -> np.ndarray:
    """The random baseline: i.i.d. uniform noise maps (count, size, size), seeded."""
    return np.random.default_rng(seed).random((count, size, size), dtype=np.float32)


def wilson_interval(hits: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate (scipy's binomtest); (nan, nan) for no trials."""
    if total == 0:
        return float("nan"), float("nan")
    interval = stats.binomtest(int(hits), int(total)).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (BOOTSTRAP_RESAMPLES resamples, seeded)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1 or np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(hits: Sequence[bool], masses: Sequence[float]) -> dict:
    """Hit rate and mean mass with their 95 % intervals."""
    hits, masses = np.asarray(hits, dtype=bool), np.asarray(masses, dtype=float)
    return {"n": int(len(hits)), "pointing": float(hits.mean()) if len(hits) else float("nan"),
            "pointing_ci": wilson_interval(int(hits.sum()), len(hits)),
            "mass": float(masses.mean()) if len(masses) else float("nan"),
            "mass_ci": bootstrap_interval(masses)}


def score_maps(maps: np.ndarray, boxes: Sequence[Box], grow: float = GROW) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice pointing hits (bool) and mass in box (float) of maps (N, S, S) against their boxes."""
    hits = np.array([pointing_hit(m, b, grow) for m, b in zip(maps, boxes)], dtype=bool)
    masses = np.array([mass_in_box(m, b) for m, b in zip(maps, boxes)], dtype=float)
    return hits, masses


def baseline_maps(name: str, count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` maps of a baseline ("centre" or "random")."""
    if name == "centre":
        return np.broadcast_to(centre_map(size), (count, size, size))
    if name == "random":
        return random_maps(count, size, seed)
    raise ValueError(f"unknown baseline {name!r}; choose one of: {', '.join(BASELINES)}")


def report(per_slice: dict[str, tuple[np.ndarray, np.ndarray]], labels: Sequence[str]) -> dict:
    """{row name: {"all": summary, class: summary, ...}} from per-slice hits and masses of each row."""
    labels = np.asarray(labels)
    table = {}
    for name, (hits, masses) in per_slice.items():
        row = {"all": summarize(hits, masses)}
        for label in sorted(set(labels.tolist())):
            chosen = labels == label
            row[label] = summarize(hits[chosen], masses[chosen])
        table[name] = row
    return table


def faithfulness(model: torch.nn.Module, batch: torch.Tensor, maps: np.ndarray, targets: Sequence[int],
                 steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC per image: the area under the explained class's probability over the shares
    0, 1/steps, ..., 1 of the pixels removed (inserted), most important first (steps None: FAITHFULNESS_STEPS)."""
    steps = FAITHFULNESS_STEPS if steps is None else steps
    size = batch.shape[-1]
    black = batch.amin(dim=(2, 3), keepdim=True).expand_as(batch)
    order = torch.from_numpy(np.argsort(-maps.reshape(len(maps), -1), axis=1, kind="stable").copy())
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(size * size).expand_as(order))
    ranks = ranks.view(len(maps), 1, size, size).to(batch.device)
    index = torch.as_tensor(targets, device=batch.device)
    deletion, insertion = [], []
    with torch.no_grad():
        for step in range(steps + 1):
            shown = ranks < round(step / steps * size * size)  # the most important pixels so far
            for curve, images in ((deletion, torch.where(shown, black, batch)),
                                  (insertion, torch.where(shown, batch, black))):
                probabilities = torch.softmax(model(images).float(), dim=1)
                curve.append(probabilities[torch.arange(len(batch)), index].cpu().numpy())
    deletion, insertion = np.stack(deletion, axis=1), np.stack(insertion, axis=1)
    # Trapezoid rule over the fractions 0..1.
    area = lambda curve: (curve[:, 1:] + curve[:, :-1]).sum(axis=1) / (2 * steps)  # noqa: E731
    return area(deletion), area(insertion)


def baseline_faithfulness(classifier, boxes_csv: Path, boxes: Sequence[Box], batch_size: int, size: int,
                          log: Callable[[str], None]) -> dict[str, dict]:
    """Deletion and insertion AUC of the baseline maps (centre, random), as ``run`` reports a method's: the
    reference a method's AUCs are read against."""
    maps = {name: baseline_maps(name, len(boxes), size) for name in BASELINES}
    curves = {name: ([], []) for name in BASELINES}
    started, done = time.perf_counter(), 0
    for chunk, batch, targets in load_batches(classifier, boxes_csv.parent, boxes, batch_size):
        for name, (deletion, insertion) in curves.items():
            d, i = faithfulness(classifier.model, batch, np.ascontiguousarray(maps[name][done:done + len(chunk)]),
                                targets)
            deletion.extend(d.tolist())
            insertion.extend(i.tolist())
        done += len(chunk)
        log(f"baselines' deletion and insertion: {done}/{len(boxes)} slices ({time.perf_counter() - started:.0f} s)")
    seconds = round(time.perf_counter() - started, 1)
    return {name: {"seconds": seconds, "method": name, "layer": None, "mirror": None,
                   "deletion": float(np.mean(deletion)), "deletion_ci": bootstrap_interval(deletion),
                   "insertion": float(np.mean(insertion)), "insertion_ci": bootstrap_interval(insertion)}
            for name, (deletion, insertion) in curves.items()}


MIRRORS = {"on": (True,), "off": (False,), "both": (False, True)}


def method_runs(methods: Sequence[str], layers: Sequence[str],
                mirrors: Sequence[bool] = (DEFAULT_MIRROR,)) -> list[tuple[str, str, str | None, bool]]:
    """(row name, method, layer, mirror) for every method; CAM methods once per layer; each once per mirror
    setting. Mirror-averaged rows end in "+mirror" ("gradcampp@layer3+mirror"), single-view rows do not."""
    runs = []
    for mirror in mirrors:
        suffix = "+mirror" if mirror else ""
        for method in methods:
            if method not in METHODS:
                raise UserError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
            if method in CAM_METHODS:
                runs.extend((f"{method}@{layer}{suffix}", method, layer, mirror) for layer in layers)
            else:
                runs.append((f"{method}{suffix}", method, None, mirror))
    return runs


def balanced(boxes: Sequence[Box], limit: int | None) -> list[Box]:
    """The first ``limit`` boxes taken class by class in turn (all when limit is None)."""
    if limit is None:
        return list(boxes)
    by_class: dict[str, list[Box]] = {}
    for box in boxes:
        by_class.setdefault(box.label, []).append(box)
    queues = [list(v) for _, v in sorted(by_class.items())]
    chosen = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def load_batches(classifier, root: Path, boxes: Sequence[Box], batch_size: int):
    """(boxes, preprocessed batch, true-class indices) per chunk of ``batch_size`` slices."""
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        batch = torch.stack([classifier.preprocess(classifier.load(str(root / b.file))) for b in chunk])
        yield chunk, batch.to(classifier.device), [classifier.classes.index(b.label) for b in chunk]


def run(boxes_csv: Path, checkpoint: str, methods: Sequence[str], layers: Sequence[str], limit: int | None,
        batch_size: int, image_size: int | None, with_faithfulness: bool, save_maps: Path | None,
        log: Callable[[str], None], mirrors: Sequence[bool] = (DEFAULT_MIRROR,)) -> dict:
    """Explain every box slice with every method; the report as a dict (see ``report``)."""
    from braintumor.inference.classifier import Classifier

    classifier = Classifier.from_checkpoint(checkpoint)
    if classifier.model is None:
        raise UserError("the localisation benchmark needs a PyTorch checkpoint (.pt)")
    if image_size:
        classifier.set_image_size(image_size)
    boxes = balanced(read_boxes(boxes_csv), limit)
    unknown = sorted({b.label for b in boxes} - set(classifier.classes))
    if unknown:
        raise UserError(f"box classes {', '.join(unknown)} are not among the model's: {', '.join(classifier.classes)}")
    size, labels = classifier.image_size, [b.label for b in boxes]
    runs = method_runs(methods, layers, mirrors)
    # The CAM methods at every layer come from one backward pass per batch and view (explain_cam_batch), per mirror
    # setting; the others one by one.
    groups = [group for mirror in mirrors
              if (group := [r for r in runs if r[1] in CAM_METHODS and r[3] == mirror])]
    groups += [[r] for r in runs if r[1] not in CAM_METHODS]
    per_slice, extra, saved, correct = {}, {}, {}, []
    for group in groups:
        maps = {row: [] for row, *_ in group}
        deletion = {row: [] for row, *_ in group}
        insertion = {row: [] for row, *_ in group}
        cam_methods = sorted({m for _, m, _, _ in group}, key=METHODS.index)
        cam_layers = sorted({layer for _, _, layer, _ in group if layer is not None})
        mirror = group[0][3]
        started = time.perf_counter()
        for chunk, batch, targets in load_batches(classifier, boxes_csv.parent, boxes, batch_size):
            if group[0][1] in CAM_METHODS:
                probabilities, cams = explain_cam_batch(classifier.model, batch, cam_methods, cam_layers, targets,
                                                        mirror=mirror)
                chunk_maps = {row: cams[method, cam_layers.index(layer)] for row, method, layer, _ in group}
            else:
                (row, method, _, _), = group
                probabilities, single = explain_batch(classifier.model, batch, method, targets=targets, mirror=mirror)
                chunk_maps = {row: single}
            if not correct or len(correct) < len(boxes):
                correct.extend((probabilities.argmax(axis=1) == np.asarray(targets)).tolist())
            for row in maps:
                maps[row].append(chunk_maps[row])
                if with_faithfulness:
                    d, i = faithfulness(classifier.model, batch, chunk_maps[row], targets)
                    deletion[row].extend(d.tolist())
                    insertion[row].extend(i.tolist())
            done = sum(len(m) for m in next(iter(maps.values())))
            log(f"{', '.join(maps)}: {done}/{len(boxes)} slices ({time.perf_counter() - started:.0f} s)")
        seconds = round(time.perf_counter() - started, 1)  # shared by the rows of one group
        for row, method, layer, mirror in group:
            row_maps = np.concatenate(maps[row])
            per_slice[row] = score_maps(row_maps, boxes)
            extra[row] = {"seconds": seconds, "method": method, "layer": layer, "mirror": mirror}
            if with_faithfulness:
                extra[row].update(deletion=float(np.mean(deletion[row])),
                                  deletion_ci=bootstrap_interval(deletion[row]),
                                  insertion=float(np.mean(insertion[row])),
                                  insertion_ci=bootstrap_interval(insertion[row]))
            if save_maps:
                saved[row] = row_maps.astype(np.float16)
    per_slice = {row: per_slice[row] for row, *_ in runs}  # the rows in the order asked for
    for name in BASELINES:
        per_slice[name] = score_maps(baseline_maps(name, len(boxes), size), boxes)
    if with_faithfulness:  # the baselines' curves: what deleting pixels in the centre's or a random order does
        extra.update(baseline_faithfulness(classifier, boxes_csv, boxes, batch_size, size, log))
    result = {"checkpoint": str(checkpoint), "boxes": str(boxes_csv), "slices": len(boxes), "image_size": size,
              "grow": GROW, "accuracy": float(np.mean(correct)) if correct else None,
              "rows": report(per_slice, labels),
              "runs": {row: extra[row] for row in [r for r, *_ in runs] + list(BASELINES) if row in extra},
              "uniform_mass": float(np.mean([b.area for b in boxes]))}
    if save_maps:  # whole or not at all, like every file the project writes
        atomic_write(save_maps, lambda handle: np.savez_compressed(handle, files=np.array([b.file for b in boxes]),
                                                                   **saved))
    return result


# ------------------------------------------------------------------------------------------ diagnosis (--diagnose)

RIM = 24 / 512  # scalp + skull band inside the head outline, as a share of the side
MARGIN = 1 / 8  # the image margin band (one cell of a 128 px model's 4 x 4 last block is 1/4 of the side)
MASKINGS = ("original", "no-background", "no-margin", "no-tumour", "tumour-only")


def head_mask(gray: np.ndarray) -> np.ndarray:
    """(S, S) bool: inside the head's outline (smoothed intensity above 10 % of its 99th percentile, holes filled,
    largest component)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(gray.astype(np.float32), 1.0)
    mask = ndimage.binary_fill_holes(smooth > 0.1 * np.percentile(smooth, 99))
    labels, count = ndimage.label(mask)
    if count > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return mask


def peak_region(heatmap: np.ndarray, head: np.ndarray, box: Box) -> str:
    """What a map's maximum sits on: "box" (grown), "background" (outside the head), "rim" (scalp/skull band),
    "brain" (elsewhere inside), or "none" (a zero map)."""
    from scipy import ndimage

    point = peak(heatmap)
    if point is None:
        return "none"
    size = heatmap.shape[0]
    if pointing_hit(heatmap, box):
        return "box"
    row, col = min(int(point[1] * size), size - 1), min(int(point[0] * size), size - 1)
    if not head[row, col]:
        return "background"
    inner = ndimage.binary_erosion(head, iterations=max(1, round(RIM * size)))
    return "brain" if inner[row, col] else "rim"


def box_distance(point: tuple[float, float] | None, box: Box) -> float:
    """How far ``point`` (x, y in fractions of the side; None: a zero map's missing maximum, infinitely far) lies
    from ``box``, in box sides (the square root of its area): 0 inside the box, 1 one box side away from its edge."""
    if point is None:
        return math.inf
    dx = max(box.x0 - point[0], 0.0, point[0] - box.x1)
    dy = max(box.y0 - point[1], 0.0, point[1] - box.y1)
    return math.hypot(dx, dy) / math.sqrt(box.area)


def distance_summary(distances: Sequence[float], labels: Sequence[str]) -> dict:
    """Per class and over all: the median distance (box sides) and the share within one box side of the box."""
    distances, labels = np.asarray(distances, dtype=np.float64), np.asarray(labels)
    groups = {"all": np.ones(len(labels), bool), **{c: labels == c for c in sorted(set(labels))}}
    return {name: {"median": float(np.median(distances[chosen])),
                   "within_one_side": float(np.mean(distances[chosen] <= 1))} for name, chosen in groups.items()}


def in_margin(heatmap: np.ndarray) -> bool:
    """Whether the map's maximum lies within MARGIN of an image edge."""
    point = peak(heatmap)
    return point is not None and min(point[0], point[1], 1 - point[0], 1 - point[1]) < MARGIN


def masked(batch: torch.Tensor, heads: np.ndarray, chunk: Sequence[Box], kind: str) -> torch.Tensor:
    """The batch with one part replaced: background / margin / grown box by black (each image's minimum),
    the box by the mean of the head outside it (no-tumour), or everything but the box by black (tumour-only)."""
    if kind == "original":
        return batch
    size = batch.shape[-1]
    black = batch.amin(dim=(2, 3), keepdim=True).expand_as(batch)
    out = batch.clone()
    centres = (torch.arange(size) + 0.5) / size
    margin = ((centres[:, None] < MARGIN) | (centres[:, None] > 1 - MARGIN)
              | (centres[None, :] < MARGIN) | (centres[None, :] > 1 - MARGIN))
    for k, box in enumerate(chunk):
        inside = torch.from_numpy(box_mask(box, size, GROW))
        head = torch.from_numpy(heads[k])
        if kind == "no-background":
            region, fill = ~head, black[k]
        elif kind == "no-margin":
            region, fill = margin, black[k]
        elif kind == "no-tumour":
            fill = batch[k][:, head & ~inside].mean(dim=1)[:, None, None].expand_as(batch[k])
            region = inside
        elif kind == "tumour-only":
            region, fill = ~inside, black[k]
        else:
            raise ValueError(f"unknown masking {kind!r}")
        out[k] = torch.where(region.to(batch.device), fill, batch[k])
    return out


def diagnose(classifier, boxes_csv: Path, boxes: Sequence[Box], maps: dict[str, np.ndarray], batch_size: int,
             log: Callable[[str], None]) -> dict:
    """Masking tests (accuracy and mean probability of the true class with parts of the slice removed) and, per
    map row, what the maximum sits on and how often it lies in the image margin."""
    heads, probabilities = [], {kind: [] for kind in MASKINGS}
    targets_all = []
    for chunk, batch, targets in load_batches(classifier, boxes_csv.parent, boxes, batch_size):
        gray = batch.mean(dim=1).cpu().numpy()
        chunk_heads = np.stack([head_mask(g - g.min()) for g in gray])
        heads.append(chunk_heads)
        targets_all.extend(targets)
        with torch.no_grad():
            for kind in MASKINGS:
                images = masked(batch, chunk_heads, chunk, kind)
                probabilities[kind].append(torch.softmax(classifier.model(images).float(), dim=1).cpu().numpy())
        log(f"diagnosis: {len(targets_all)}/{len(boxes)} slices")
    heads = np.concatenate(heads)
    targets_all = np.asarray(targets_all)
    labels = np.asarray([b.label for b in boxes])
    masking = {}
    for kind in MASKINGS:
        p = np.concatenate(probabilities[kind])
        right = p.argmax(axis=1) == targets_all
        true_p = p[np.arange(len(p)), targets_all]
        masking[kind] = {"accuracy": float(right.mean()), "accuracy_ci": wilson_interval(int(right.sum()), len(right)),
                         "p_true": float(true_p.mean()),
                         "per_class": {c: float(right[labels == c].mean()) for c in sorted(set(labels))}}
    peaks, distance = {}, {}
    for row, row_maps in maps.items():
        row_maps = np.asarray(row_maps, dtype=np.float32)
        regions = [peak_region(m, h, b) for m, h, b in zip(row_maps, heads, boxes)]
        counts = {name: regions.count(name) / len(regions) for name in ("box", "brain", "rim", "background", "none")}
        points = [peak(m) for m in row_maps]
        peaks[row] = {**counts, "margin": float(np.mean([in_margin(m) for m in row_maps])),
                      "left_half": float(np.mean([p is not None and p[0] < 0.5 for p in points]))}
        # How far the maxima lie from the tumour, against the centre point's distance below: are the misses next
        # to the box (around the tumour) or elsewhere?
        distance[row] = distance_summary([box_distance(p, b) for p, b in zip(points, boxes)], labels)
    distance["centre"] = distance_summary([box_distance((0.5, 0.5), b) for b in boxes], labels)
    return {"masking": masking, "peaks": peaks, "distance": distance, "head_share": float(heads.mean())}


def diagnosis_markdown(result: dict) -> str:
    lines = ["| slice shown to the model | accuracy [95 % CI] | mean p(true class) | " +
             " | ".join(f"acc. {c}" for c in next(iter(result["masking"].values()))["per_class"]) + " |"]
    lines.append("|" + "---|" * (3 + len(next(iter(result["masking"].values()))["per_class"])))
    for kind, row in result["masking"].items():
        low, high = row["accuracy_ci"]
        lines.append(f"| {kind} | {100 * row['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | "
                     f"{row['p_true']:.3f} | " + " | ".join(f"{100 * v:.1f}" for v in row["per_class"].values()) + " |")
    lines += ["", "| map | max in box | on brain | on scalp/skull rim | on background | zero map | in image margin "
              "(1/8) | in left half |", "|---|---|---|---|---|---|---|---|"]
    for row, counts in result["peaks"].items():
        lines.append(f"| {row} | " + " | ".join(f"{100 * counts[k]:.1f}" for k in
                                                ("box", "brain", "rim", "background", "none", "margin", "left_half"))
                     + " |")
    groups = list(next(iter(result["distance"].values())))
    lines += ["", "Distance of the maximum from the (ungrown) box, in box sides: median, and % within one box side",
              "", "| map | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for row, summary in result["distance"].items():
        cells = [f"{summary[g]['median']:.2f} ({100 * summary[g]['within_one_side']:.0f} %)" for g in groups]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The report as a Markdown table: pointing game and mass in box per class, with 95 % intervals."""
    classes = [key for key in next(iter(result["rows"].values())) if key != "all"]
    faithful = any("deletion" in run for run in result["runs"].values())
    timed = bool(result["runs"])  # --average scores saved maps: nothing was timed
    header = ["explanation", "pointing (all)", "mass in box (all)"] + [f"pointing {c}" for c in classes] + \
             [f"mass {c}" for c in classes] + (["deletion AUC ↓", "insertion AUC ↑"] if faithful else []) + \
             (["s"] if timed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pct(value, interval=None):
        text = f"{100 * value:.1f}"
        return text + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")

    for name, row in result["rows"].items():
        run = result["runs"].get(name, {})
        cells = [name, pct(row["all"]["pointing"], row["all"]["pointing_ci"]),
                 pct(row["all"]["mass"], row["all"]["mass_ci"])]
        cells += [pct(row[c]["pointing"]) for c in classes] + [pct(row[c]["mass"]) for c in classes]
        if faithful:
            cells += [f"{run['deletion']:.3f}" if "deletion" in run else "",
                      f"{run['insertion']:.3f}" if "insertion" in run else ""]
        if timed:
            cells.append(f"{run['seconds']:.0f}" if run else "")
        lines.append("| " + " | ".join(cells) + " |")
    accuracy = result["accuracy"]
    lines.append("")
    lines.append(f"{result['slices']} slices at {result['image_size']} px; pointing tolerance {result['grow']:.4f} of "
                 f"the side; uniform-map mass in box {100 * result['uniform_mass']:.1f} %"
                 + (f"; accuracy on these slices {100 * accuracy:.1f} %" if accuracy is not None else "")
                 + ". Percent, 95 % intervals in brackets (Wilson; bootstrap for mass).")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("boxes", type=Path, help="boxes.csv (file,class,x_center,y_center,width,height)")
    parser.add_argument("--checkpoint", default="reference", help="model (.pt, run folder or 'reference')")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"from {', '.join(METHODS)}")
    parser.add_argument("--layers", nargs="+", default=[DEFAULT_LAYER], help="CAM layers (e.g. layer2 layer3 layer4)")
    parser.add_argument("--mirror", choices=tuple(MIRRORS), default="on" if DEFAULT_MIRROR else "off",
                        help="maps averaged with the mirrored slice's (rows '...+mirror', the default of explain), "
                             "single-view maps, or both")
    parser.add_argument("--limit", type=int, help="at most this many slices, classes in turn")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, help="run the network at this input size instead of its own")
    parser.add_argument("--faithfulness", action="store_true",
                        help="add deletion/insertion AUC (17 x 2 passes per map and slice), baselines included")
    parser.add_argument("--save-maps", type=Path, help="write every map (float16) to this .npz")
    parser.add_argument("--json", help="write the report as JSON to this file ('-': stdout instead of Markdown)")
    parser.add_argument("--montage", type=Path, metavar="PNG",
                        help="with --diagnose: draw 8 slices (classes in turn) with their box and the first row's map")
    parser.add_argument("--mean-maps", type=Path, metavar="PNG",
                        help="with --diagnose: per-class mean maps of the chosen rows beside the box frequency")
    parser.add_argument("--diagnose", type=Path, metavar="MAPS_NPZ",
                        help="instead of explaining: masking tests on the slices, and where the maxima of the maps "
                             "saved by --save-maps sit and how far from the box (the rows named by --methods / "
                             "--layers, if in the file)")
    parser.add_argument("--average", type=Path, nargs="+", metavar="MAPS_NPZ",
                        help="instead of explaining: score the maps of several models saved by --save-maps on the same "
                             "slices, each and their mean (each map min-max normalized, at the first file's size)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing --json/--save-maps/--montage/--mean-maps files (default: refuse)")
    args = parser.parse_args(argv)
    try:
        refuse_overwrites({"--json": args.json, "--save-maps": args.save_maps, "--montage": args.montage,
                           "--mean-maps": args.mean_maps}, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.diagnose:
        return run_diagnosis(args)
    if args.average:
        return run_average(args)
    try:
        result = run(args.boxes, args.checkpoint, args.methods, args.layers, args.limit, args.batch_size,
                     args.image_size, args.faithfulness, args.save_maps, lambda line: print(line, file=sys.stderr),
                     MIRRORS[args.mirror])
    except (UserError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return emit_report(result, args.json, markdown)


def write_montage(classifier, root: Path, boxes: Sequence[Box], maps: dict[str, np.ndarray], path: Path,
                  columns: int = 8) -> int:
    """A box-overlay montage of ``columns`` slices (spread over the set, classes in turn) for the first map row."""
    from braintumor.visualize.explain import METHOD_LABELS
    from braintumor.visualize.figures import box_overlay_montage

    row, row_maps = next(iter(maps.items()))
    step = max(1, len(boxes) // columns)
    chosen = list(range(0, len(boxes), step))[:columns]
    hits = [pointing_hit(np.asarray(row_maps[k], dtype=np.float32), boxes[k]) for k in chosen]
    method = row.split("@")[0]
    picture = box_overlay_montage(
        [classifier.load(str(root / boxes[k].file)) for k in chosen],
        [np.asarray(row_maps[k], dtype=np.float32) for k in chosen],
        [(boxes[k].x0, boxes[k].y0, boxes[k].x1, boxes[k].y1) for k in chosen],
        [f"{boxes[k].label}: {'hit' if hit else 'miss'}" for k, hit in zip(chosen, hits)],
        f"{row} of {Path(str(classifier.source_path or 'the model')).name} at {classifier.image_size} px on "
        f"{len(chosen)} box slices: green = expert box (dashed: +15/512 tolerance), x = the map's maximum",
        METHOD_LABELS.get(method, method), grow=GROW)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def write_mean_maps(boxes: Sequence[Box], maps: dict[str, np.ndarray], path: Path, model_name: str) -> int:
    """Per-class mean maps of every row beside the per-class frequency of box pixels."""
    from braintumor.visualize.figures import mean_maps_figure

    labels = np.asarray([b.label for b in boxes])
    classes = sorted(set(labels.tolist()))
    size = next(iter(maps.values())).shape[-1]
    rows = {row: {c: np.asarray(m, dtype=np.float32)[labels == c].mean(axis=0) for c in classes}
            for row, m in maps.items()}
    frequency = {c: np.mean([box_mask(b, size) for b in boxes if b.label == c], axis=0) for c in classes}
    picture = mean_maps_figure(rows, frequency, f"Mean maps per class ({model_name}, {len(boxes)} box slices), "
                                                f"each panel scaled to its maximum")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    for row, by_class in rows.items():
        for c, mean in by_class.items():
            if not mean.sum() > 0:
                print(f"{row} {c}: every map is zero (no centroid)")
                continue
            cy, cx = np.array(np.nonzero(np.ones_like(mean))).reshape(2, -1) / size
            weights = mean.ravel() / mean.sum()
            print(f"{row} {c}: mean-map centroid x {100 * (weights * cx).sum() + 50 / size:.1f} % "
                  f"y {100 * (weights * cy).sum() + 50 / size:.1f} % of the side; "
                  f"left half {100 * mean[:, :size // 2].sum() / mean.sum():.1f} % of the mass")
    return 0


def averaged_rows(paths: Sequence[Path], row: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """The slice files and {model: maps} of ``row`` in each saved-maps file, plus "mean of N": every map resized
    (antialiased bilinear, as the model's inputs) to the first file's size and min-max normalized, then averaged
    over the models."""
    files, maps = None, {}
    for path in paths:
        try:
            with np.load(path) as saved:
                if "files" not in saved.files or row not in saved.files:
                    raise UserError(f"{path} has no row {row}; it has: "
                                    f"{', '.join(r for r in saved.files if r != 'files') or 'no maps'}")
                slices, row_maps = list(saved["files"]), saved[row].astype(np.float32)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise UserError(f"cannot read {path} as maps saved by --save-maps ({err})") from None
        if files is not None and slices != files:
            raise UserError(f"{path} holds other slices than {paths[0]}: save the maps of every model on one box file")
        files = slices
        maps[path.stem if path.stem not in maps else str(path)] = row_maps
    size = next(iter(maps.values())).shape[-1]
    for name, row_maps in maps.items():
        resized = resize_batch(torch.from_numpy(row_maps)[:, None], size)[:, 0].numpy()
        low = resized.min(axis=(1, 2), keepdims=True)
        maps[name] = (resized - low) / np.maximum(resized.max(axis=(1, 2), keepdims=True) - low, 1e-12)
    maps[f"mean of {len(paths)}"] = np.mean(list(maps.values()), axis=0)
    return files, maps


def run_average(args) -> int:
    """--average: one row per model and one for the mean map, scored like a benchmark run (Markdown or JSON)."""
    (row, *_), *others = method_runs(args.methods, args.layers, MIRRORS[args.mirror])
    try:
        if others:
            raise UserError("--average scores one map row: give one method, one layer and --mirror on or off")
        files, maps = averaged_rows(args.average, row)
        by_file = {b.file: b for b in read_boxes(args.boxes)}
        missing = [f for f in files if f not in by_file]
        if missing:
            raise UserError(f"{len(missing)} saved slices have no box in {args.boxes}, e.g. {missing[0]}")
    except (UserError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    boxes = [by_file[f] for f in files]
    size = next(iter(maps.values())).shape[-1]
    per_slice = {name: score_maps(row_maps, boxes) for name, row_maps in maps.items()}
    per_slice.update({name: score_maps(baseline_maps(name, len(boxes), size), boxes) for name in BASELINES})
    result = {"row": row, "maps": [str(path) for path in args.average], "boxes": str(args.boxes),
              "slices": len(boxes), "image_size": size, "grow": GROW, "accuracy": None,
              "rows": report(per_slice, [b.label for b in boxes]), "runs": {},
              "uniform_mass": float(np.mean([b.area for b in boxes]))}
    return emit_report(result, args.json,
                       lambda scored: f"{row} of each model and of their mean map\n\n{markdown(scored)}")


def run_diagnosis(args) -> int:
    """--diagnose: masking tests and peak regions of saved maps, Markdown (or JSON) on stdout."""
    from braintumor.inference.classifier import Classifier

    try:
        classifier = Classifier.from_checkpoint(args.checkpoint)
        if args.image_size:
            classifier.set_image_size(args.image_size)
        saved = np.load(args.diagnose)
        files = list(saved["files"])
        by_file = {b.file: b for b in read_boxes(args.boxes)}
        missing = [f for f in files if f not in by_file]
        if missing:
            raise UserError(f"{len(missing)} saved slices have no box in {args.boxes}, e.g. {missing[0]}")
    except (UserError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    boxes = balanced([by_file[f] for f in files], args.limit)
    keep = [files.index(b.file) for b in boxes]
    wanted = {row for row, *_ in method_runs(args.methods, args.layers, MIRRORS[args.mirror])}
    maps = {row: saved[row][keep] for row in saved.files if row != "files" and row in wanted}
    if args.montage:
        return write_montage(classifier, args.boxes.parent, boxes, maps, args.montage)
    if args.mean_maps:
        return write_mean_maps(boxes, maps, args.mean_maps, Path(str(classifier.source_path)).name)
    result = diagnose(classifier, args.boxes, boxes, maps, args.batch_size, lambda line: print(line, file=sys.stderr))
    result.update(checkpoint=str(args.checkpoint), slices=len(boxes), image_size=classifier.image_size)
    return emit_report(result, args.json, diagnosis_markdown)


if __name__ == "__main__":
    sys.exit(main())
