"""Lesion-wise BraTS metrics (ranked since 2023), following the challenges' own evaluation code.

Sources: ``rachitsaluja/BraTS-2023-Metrics:eval.py`` (2023: GLI, SSA, MEN, PED, MET) and
``rachitsaluja/BraTS-2024-Metrics:metrics_GLI.py`` (2024 GLI post-treatment), which the Synapse
scoring (``Sage-Bionetworks-Challenges/brats2023:evaluation/lesionwise/score.py``) imports. For each
tissue (a set of label values):

1. reference lesions are the 26-connected components of the tissue mask, where components that fall
   into one component of the mask dilated ``dilation`` times (``generate_binary_structure(3, 2)``)
   are one lesion;
2. predicted lesions are the 26-connected components of the predicted mask (2024: merged by dilation
   like the reference, then lesions of at most ``min_volume`` *voxels* dropped);
3. 2024 only: lesions of NETC, SNFH, ET and RC that touch (18-neighbourhood) the same lesion of
   another of these tissues are merged (:data:`BRATS2024_CROSS_TISSUE`);
4. a predicted lesion is a true positive when it overlaps a reference lesion dilated ``dilation``
   times; each reference lesion scores the Dice and HD95 (area-weighted, :mod:`.surface`) of the
   union of its true-positive predicted lesions against it; no match gives Dice 0, HD95 = penalty;
5. reference lesions of at most ``min_volume`` mm^3 are left out of the score (their matches are
   still true positives, not false positives);
6. score = (sum of lesion scores + penalty x #FP) / (#lesions + #FP), with Dice's penalty 0; 0/0
   (nothing in either mask) gives Dice 1 and HD95 0.

The "legacy" per-tissue Dice / HD95 / sensitivity / specificity of the same code are computed next
to them (2024: on the prediction after step 2, as the official code does).

Known differences from the official scripts, all where the scripts are in error: their 2024 legacy
HD95 passes component labels (not a binary mask) to ``surface_distance``, whose uint8 neighbour
codes then wrap around for any case with two or more lesions; we use the binary mask. Their
``"SFNH"`` typo gives SNFH the default dilation 3 instead of 5; we keep 3, as scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ciml.metrics.segmentation import HD95Function, dice, sensitivity, specificity
from ciml.metrics.surface import hd95_surface, robust_hausdorff, surface_distances

_CONNECTED_26 = ndimage.generate_binary_structure(3, 3)
_DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)

LESIONWISE_METRICS = ("lesionwise_dice", "lesionwise_hd95", "n_tp", "n_fp", "n_fn")
LEGACY_METRICS = ("dice", "hd95", "sensitivity", "specificity")


@dataclass(frozen=True)
class Tissue:
    """One scored tissue: its label values and its lesion rules.

    Attributes:
        name: WT, TC, ET, ... as the challenge reports it.
        labels: label values that make up the tissue.
        dilation: dilation iterations for merging lesions and matching predictions to them.
        min_volume: reference lesions of at most this volume (mm^3) are not scored; with
            ``LesionwiseRules.merge_predictions``, predicted lesions of at most this many voxels
            are dropped.
    """

    name: str
    labels: tuple[int, ...]
    dilation: int
    min_volume: float


@dataclass(frozen=True)
class LesionwiseRules:
    """A challenge's lesion-wise protocol.

    Attributes:
        name: the challenge (e.g. ``brats2023``).
        tissues: scored tissues, in report order.
        hd95_penalty: HD95 (mm) of a missed lesion, a false-positive lesion, or an empty mask.
        merge_predictions: 2024: predicted lesions merged by dilation and small ones dropped.
        cross_tissue: tissue -> tissues whose touching lesions merge its lesions, applied in order.
    """

    name: str
    tissues: tuple[Tissue, ...]
    hd95_penalty: float
    merge_predictions: bool = False
    cross_tissue: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(sorted({v for t in self.tissues for v in t.labels}))


def _brats2023(name: str, dilation: int, min_volume: float) -> LesionwiseRules:
    tissues = (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,)))
    return LesionwiseRules(
        name, tuple(Tissue(t, labels, dilation, min_volume) for t, labels in tissues), hd95_penalty=374.0
    )


#: 2024 GLI: lesions of these tissues that touch the same lesion of the listed ones are merged.
BRATS2024_CROSS_TISSUE = {
    "NETC": ("ET", "RC"),
    "ET": ("NETC", "RC"),
    "RC": ("ET", "NETC"),
    "SNFH": ("ET", "RC", "NETC"),
}

BRATS2024_GLI = LesionwiseRules(
    "brats2024",
    (
        Tissue("WT", (1, 2, 3), 3, 20.0),
        Tissue("TC", (1, 3), 3, 20.0),
        Tissue("NETC", (1,), 5, 20.0),
        Tissue("SNFH", (2,), 3, 20.0),
        Tissue("ET", (3,), 3, 10.0),
        Tissue("RC", (4,), 5, 20.0),
    ),
    hd95_penalty=337.0,
    merge_predictions=True,
    cross_tissue=BRATS2024_CROSS_TISSUE,
)

#: Rules by name: the 2023 sub-challenges differ in dilation and lesion size threshold only.
LESIONWISE_RULES: dict[str, LesionwiseRules] = {
    "brats2023": _brats2023("brats2023", 3, 50.0),
    "brats2023-ssa": _brats2023("brats2023-ssa", 3, 50.0),
    "brats2023-ped": _brats2023("brats2023-ped", 3, 50.0),
    "brats2023-men": _brats2023("brats2023-men", 1, 50.0),
    "brats2023-met": _brats2023("brats2023-met", 1, 2.0),
    "brats2024": BRATS2024_GLI,
}


# --------------------------------------------------------------------------------------- lesions


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels, clipped to the array."""
    return tuple(
        slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, size))
        for i, size in zip(np.nonzero(mask), mask.shape, strict=True)
    )


def merged_lesions(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Lesion ids (0 = background): components that share a component of the dilated mask are one."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.int32)
    if mask.any():
        box = _box(mask, dilation)  # the dilation cannot reach beyond it
        inner = mask[box]
        grown = inner
        if dilation:
            grown = ndimage.binary_dilation(inner, _DILATION_STRUCTURE, iterations=dilation)
        labels, _ = ndimage.label(grown, structure=_CONNECTED_26)
        out[box] = np.where(inner, labels, 0)
    return out


def connected_lesions(mask: np.ndarray) -> np.ndarray:
    """26-connected components (``cc3d.connected_components(connectivity=26)``)."""
    return merged_lesions(mask, 0)


def drop_small(lesions: np.ndarray, max_voxels: float) -> np.ndarray:
    """Remove lesions of at most ``max_voxels`` voxels (2024 predictions)."""
    keep = np.bincount(lesions.ravel()) > max_voxels
    keep[0] = False
    return np.where(keep[lesions], lesions, 0).astype(np.int32)


def _ids(lesions: np.ndarray) -> list[int]:
    """Lesion ids present (ascending, no background); a histogram is far faster than ``np.unique``."""
    if lesions.size == 0:
        return []
    return [int(i) for i in np.flatnonzero(np.bincount(lesions.ravel())) if i != 0]


Box = tuple[slice, ...]


def _grow(box: Box, margin: int, shape: tuple[int, ...]) -> Box:
    return tuple(
        slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, shape, strict=True)
    )


def _cover(boxes: Sequence[Box]) -> Box:
    """Smallest box holding all of ``boxes``."""
    return tuple(
        slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0]))
    )


def _boxes(lesions: np.ndarray) -> dict[int, Box]:
    """Lesion id -> bounding box (``ndimage.find_objects``)."""
    return {i + 1: box for i, box in enumerate(ndimage.find_objects(lesions)) if box is not None}


def _touched(lesions: np.ndarray, lesion: int, box: Box, iterations: int, other: np.ndarray) -> list[int]:
    """Ids of ``other`` inside ``lesion`` dilated ``iterations`` times (18-neighbourhood)."""
    grown = _grow(box, iterations, lesions.shape)
    own = lesions[grown] == lesion
    dilated = ndimage.binary_dilation(own, _DILATION_STRUCTURE, iterations=iterations) if iterations else own
    return _ids(other[grown][dilated])


def merge_touching(lesions: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Merge lesions that touch the same lesion of ``other`` (2024 ``relabel_nifti_image``).

    A lesion touches another when its one-step 18-neighbourhood dilation overlaps it. Each lesion
    takes the id of the lowest-numbered ``other`` lesion it touches, so two lesions merge when that
    lowest touched lesion is the same; lesions touching nothing keep their own id.
    """
    first_touched: dict[int, int] = {}
    for lesion, box in _boxes(lesions).items():
        touched = _touched(lesions, lesion, box, 1, other)
        if touched:
            first_touched[lesion] = touched[0]
    if not first_touched:
        return lesions
    offset = int(lesions.max())  # new ids above every existing one, as the official relabelling
    new_ids = np.arange(offset + 1, dtype=np.int32)
    for lesion, touched in first_touched.items():
        new_ids[lesion] = offset + touched
    return new_ids[lesions]


# --------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class LesionMatch:
    """One reference lesion and the predicted lesions that hit it."""

    volume_mm3: float
    matched: tuple[int, ...]
    dice: float
    hd95: float


def match_lesions(
    pred_lesions: np.ndarray,
    ref_lesions: np.ndarray,
    dilation: int,
    spacing: tuple[float, float, float],
    penalty: float,
) -> list[LesionMatch]:
    """Per reference lesion: its volume, the predicted lesions touching its dilation, Dice and HD95.

    Works inside bounding boxes (the lesion dilated, and its matched predicted lesions), which hold
    every voxel of both masks, so the scores equal the whole-volume ones at a fraction of the cost.
    """
    voxel_mm3 = float(np.prod(spacing))
    pred_boxes = _boxes(pred_lesions)
    matches = []
    for lesion, box in _boxes(ref_lesions).items():
        hit = tuple(_touched(ref_lesions, lesion, box, dilation, pred_lesions))
        joint = _cover([box, *(pred_boxes[i] for i in hit)])
        own = ref_lesions[joint] == lesion
        union = np.isin(pred_lesions[joint], hit) if hit else np.zeros_like(own)
        hd = robust_hausdorff(surface_distances(union, own, spacing)) if hit else math.inf
        matches.append(
            LesionMatch(
                volume_mm3=int(own.sum()) * voxel_mm3,
                matched=hit,
                dice=dice(union, own),
                hd95=penalty if math.isinf(hd) else hd,
            )
        )
    return matches


def lesionwise_score(
    matches: Sequence[LesionMatch], n_fp: int, min_volume: float, penalty: float
) -> dict[str, float]:
    """Lesion-wise Dice and HD95 with the lesion counts, from the matches and the false positives."""
    kept = [m for m in matches if m.volume_mm3 > min_volume]
    n = len(kept) + n_fp
    return {
        "lesionwise_dice": sum(m.dice for m in kept) / n if n else 1.0,
        "lesionwise_hd95": (sum(m.hd95 for m in kept) + penalty * n_fp) / n if n else 0.0,
        "n_tp": sum(1 for m in kept if m.matched),
        "n_fp": n_fp,
        "n_fn": sum(1 for m in kept if not m.matched),
    }


def _legacy(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], hd95_fn: HD95Function
) -> dict[str, float]:
    return {
        "dice": dice(pred, ref),
        "hd95": hd95_fn(pred, ref, spacing),
        "sensitivity": sensitivity(pred, ref),
        "specificity": specificity(pred, ref),
    }


def _lesion_box(pred_labels: np.ndarray, ref_labels: np.ndarray, rules: LesionwiseRules) -> Box:
    """Box around every scored voxel of both maps, grown beyond the widest dilation and touch test."""
    foreground = np.isin(pred_labels, rules.label_values) | np.isin(ref_labels, rules.label_values)
    if not foreground.any():
        return tuple(slice(0, min(1, n)) for n in foreground.shape)
    return _box(foreground, max(t.dilation for t in rules.tissues) + 2)


def _tissue_lesions(labels: np.ndarray, rules: LesionwiseRules, is_prediction: bool) -> dict[str, np.ndarray]:
    """Lesion maps of every tissue of one label map (steps 1-3 of the module docstring)."""
    lesions = {}
    for tissue in rules.tissues:
        mask = np.isin(labels, tissue.labels)
        if is_prediction and not rules.merge_predictions:
            lesions[tissue.name] = connected_lesions(mask)
        elif is_prediction:
            lesions[tissue.name] = drop_small(merged_lesions(mask, tissue.dilation), tissue.min_volume)
        else:
            lesions[tissue.name] = merged_lesions(mask, tissue.dilation)
    merged = dict(lesions)
    for name, others in rules.cross_tissue.items():
        for other in others:
            merged[name] = merge_touching(merged[name], lesions[other])
    return merged


def lesionwise_case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    rules: LesionwiseRules,
    spacing: Sequence[float] | None = None,
    metrics: str = "all",
    hd95_fn: HD95Function | None = None,
) -> dict[str, dict[str, float]]:
    """Lesion-wise and/or legacy metrics of one case, per tissue of ``rules``.

    Args:
        pred_labels: predicted label map in the challenge's label values.
        ref_labels: reference label map, same shape.
        rules: the challenge's protocol, e.g. ``LESIONWISE_RULES["brats2023"]``.
        spacing: voxel size in mm along each array axis; None means 1 mm.
        metrics: ``lesionwise`` (:data:`LESIONWISE_METRICS`), ``legacy`` (per-tissue Dice, HD95,
            sensitivity, specificity: :data:`LEGACY_METRICS`) or ``all``.
        hd95_fn: ``(pred, ref, spacing) -> mm`` for the legacy HD95; default the challenge's
            (:func:`~ciml.metrics.surface.hd95_surface` with the rules' penalty).

    Returns:
        tissue -> metric -> value.
    """
    if metrics not in ("legacy", "lesionwise", "all"):
        raise ValueError(f"metrics must be legacy, lesionwise or all, got {metrics!r}")
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred_labels.shape} vs {ref_labels.shape}")
    if pred_labels.ndim != 3:
        raise ValueError(f"lesion-wise metrics need 3D label maps, got {pred_labels.ndim}D")
    spacing3 = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
    if len(spacing3) != 3 or any(not s > 0 for s in spacing3):
        raise ValueError(f"spacing must give 3 positive voxel sizes in mm, got {spacing}")
    penalty = rules.hd95_penalty
    legacy_hd95 = hd95_fn or (lambda p, r, s: hd95_surface(p, r, s, penalty=penalty))
    box = _lesion_box(pred_labels, ref_labels, rules)
    need_lesions = metrics != "legacy" or rules.merge_predictions
    if need_lesions:  # lesion work is local: a box around all foreground gives the same lesions
        pred_lesions = _tissue_lesions(pred_labels[box], rules, is_prediction=True)
        ref_lesions = _tissue_lesions(ref_labels[box], rules, is_prediction=False)
    result = {}
    for tissue in rules.tissues:
        row: dict[str, float] = {}
        if metrics != "legacy":
            pred, ref = pred_lesions[tissue.name], ref_lesions[tissue.name]
            matches = match_lesions(pred, ref, tissue.dilation, spacing3, penalty)  # type: ignore[arg-type]
            hit = {i for m in matches for i in m.matched}
            n_fp = sum(1 for i in _ids(pred) if i not in hit)
            row.update(lesionwise_score(matches, n_fp, tissue.min_volume, penalty))
        if metrics != "lesionwise":  # on the whole volume: specificity counts all background
            pred_mask = np.isin(pred_labels, tissue.labels)
            if rules.merge_predictions:  # 2024: the size-filtered prediction, as the official code
                pred_mask[box] &= pred_lesions[tissue.name] > 0
            ref_mask = np.isin(ref_labels, tissue.labels)
            row.update(_legacy(pred_mask, ref_mask, spacing3, legacy_hd95))  # type: ignore[arg-type]
        result[tissue.name] = row
    return result
