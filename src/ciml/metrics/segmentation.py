"""Challenge-exact segmentation metrics on binary numpy masks (DESIGN section 8).

Library defaults (MONAI, nnU-Net) return NaN when a mask is empty and then drop the case from the mean,
which rewards missed structures (ANCHORS B.4). These functions follow the challenges instead:

* BraTS (ANCHORS E.3): both masks empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 373.13 mm
  (the diagonal of a 240x240x155 mm volume). Sensitivity and specificity as in the BraTS 2023
  evaluation (GaNDLF/CaPTk): sensitivity is 1 when both masks are empty and 0 when only the reference
  is; specificity is the sensitivity of the complements, so the same rule holds for background.
* autoPET (ANCHORS D.1, ``lab-midas/autoPET:val_script.py``): Dice, false-positive and false-negative
  volume in ml from connected components (cc3d connectivity 18 in the challenge script).
* HECKTOR 2022 (ANCHORS D.2): Dice aggregated over the whole set per class from volumes in mm^3
  (cases differ in voxel size), then averaged over classes.

Masks are indexed like the image array and ``spacing`` gives the voxel size in mm along each array axis
(nibabel's ``header.get_zooms()`` for an array from ``img.dataobj``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ciml.tasks.spec import TaskSpec

#: BraTS penalty for HD95 when exactly one mask is empty: the diagonal of the 240x240x155 mm volume.
HD95_EMPTY_PENALTY = math.hypot(240.0, 240.0, 155.0)  # 373.12866...

#: Connectivity of the autoPET challenge script (``cc3d.connected_components(..., connectivity=18)``).
AUTOPET_CONNECTIVITY = 18

# Neighbour count -> rank for scipy's generate_binary_structure, per number of dimensions.
_CONNECTIVITY_RANK = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {ref.shape}")
    return pred, ref


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must give {ndim} positive voxel sizes in mm, got {spacing}")
    return spacing


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice ``2|P&G| / (|P|+|G|)``; BraTS convention: both empty -> 1.0, exactly one empty -> 0.0."""
    pred, ref = _pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """True-positive rate ``TP / |G|``.

    With an empty reference there is nothing to find: 1.0 if the prediction is empty too, else 0.0
    (the BraTS 2023 evaluation, which took it from GaNDLF/CaPTk).
    """
    pred, ref = _pair(pred, ref)
    n_ref = int(ref.sum())
    if n_ref == 0:
        return 0.0 if pred.any() else 1.0
    return int(np.logical_and(pred, ref).sum()) / n_ref


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """True-negative rate ``TN / |~G|``: the sensitivity of the complements.

    So when the reference has no background (it fills the volume), the result is 1.0 if the prediction
    fills it too and 0.0 otherwise, mirroring :func:`sensitivity`.
    """
    pred, ref = _pair(pred, ref)
    return sensitivity(~pred, ~ref)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Tight box around ``mask``; everything outside it is background, so erosion there is exact."""
    return tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(mask))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (MONAI's and medpy's edge definition).

    Space beyond the array counts as background (``binary_erosion``'s ``border_value=0``), so an
    object cut by the field of view has its surface on the last voxel layer, as in MONAI and medpy.
    """
    return mask & ~ndimage.binary_erosion(mask)


def _directed_distances(src: np.ndarray, dst: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance in mm from every ``src`` voxel to the nearest ``dst`` voxel (``dst`` non-empty).

    A k-d tree over the sparse surface voxels gives the exact Euclidean distances of a distance
    transform of the box, several times faster on BraTS-sized regions.
    """
    scale = np.asarray(spacing, dtype=np.float64)
    return cKDTree(np.argwhere(dst) * scale).query(np.argwhere(src) * scale, k=1)[0]


def hd95(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    penalty: float = HD95_EMPTY_PENALTY,
) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces, in mm.

    Same definition as MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two
    directed 95th percentiles (linear interpolation) of surface-to-surface distances. Note that medpy's
    ``hd95`` instead takes the percentile of both directions pooled. BraTS convention for empty masks:
    both empty -> 0.0, exactly one empty -> :data:`HD95_EMPTY_PENALTY` (373.13 mm).

    Args:
        pred: predicted binary mask.
        ref: reference binary mask of the same shape.
        spacing: voxel size in mm along each array axis; None means 1 mm.
        penalty: value when exactly one mask is empty.
    """
    pred, ref = _pair(pred, ref)
    spacing = _spacing(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not (has_pred or has_ref):
        return 0.0
    if has_pred != has_ref:
        return float(penalty)
    box = _bounding_box(pred | ref)
    pred_surface, ref_surface = _surface(pred[box]), _surface(ref[box])
    forward = _directed_distances(pred_surface, ref_surface, spacing)
    backward = _directed_distances(ref_surface, pred_surface, spacing)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


BRATS_METRICS = ("dice", "hd95", "sensitivity", "specificity")


HD95Function = Callable[[np.ndarray, np.ndarray, Sequence[float] | None], float]


def brats_region_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    hd95_fn: HD95Function | None = None,
) -> dict[str, float]:
    """Dice, HD95 (mm), sensitivity and specificity of one binary region, BraTS conventions.

    ``hd95_fn(pred, ref, spacing)`` replaces :func:`hd95` (e.g. the BraTS 2023+ surface HD95).
    """
    return {
        "dice": dice(pred, ref),
        "hd95": (hd95_fn or hd95)(pred, ref, spacing),
        "sensitivity": sensitivity(pred, ref),
        "specificity": specificity(pred, ref),
    }


def brats_case_metrics(
    pred_labels: np.ndarray, ref_labels: np.ndarray, spec: TaskSpec, spacing: Sequence[float] | None = None
) -> dict[str, dict[str, float]]:
    """BraTS metrics for every region of ``spec`` (WT, TC, ET for brats2020) of one case.

    Args:
        pred_labels: predicted label map in the dataset's label values (BraTS: 0, 1, 2, 4).
        ref_labels: reference label map, same shape.
        spec: the :class:`~ciml.tasks.TaskSpec` whose ``regions`` map region -> label values.
        spacing: voxel size in mm along each array axis.

    Returns:
        region -> {"dice", "hd95", "sensitivity", "specificity"}.
    """
    return per_region(brats_region_metrics, pred_labels, ref_labels, spec, spacing)


def per_region(
    region_metrics: Callable[[np.ndarray, np.ndarray, Sequence[float] | None], dict[str, float]],
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spec: TaskSpec,
    spacing: Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Apply ``region_metrics(pred_mask, ref_mask, spacing)`` to every region of ``spec``.

    Regions come from ``spec.labels_to_regions``, so overlapping regions (BraTS WT/TC/ET) are scored
    as the challenges score them, not label by label.
    """
    pred_regions, ref_regions = spec.labels_to_regions(pred_labels), spec.labels_to_regions(ref_labels)
    if pred_regions.shape != ref_regions.shape:
        raise ValueError(
            f"prediction and reference shapes differ: {pred_regions.shape[1:]} vs {ref_regions.shape[1:]}"
        )
    return {
        region: region_metrics(pred_regions[i], ref_regions[i], spacing)
        for i, region in enumerate(spec.regions)
    }


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in ml (mm^3 / 1000), as autoPET computes it from pixdim."""
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    ranks = _CONNECTIVITY_RANK.get(mask.ndim, {})
    if connectivity not in ranks:
        raise ValueError(
            f"connectivity {connectivity} is not defined for {mask.ndim}D masks (use {sorted(ranks)})"
        )
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, ranks[connectivity]))


def missed_component_voxels(
    mask: np.ndarray, other: np.ndarray, connectivity: int = AUTOPET_CONNECTIVITY
) -> int:
    """Voxels of the connected components of ``mask`` that share no voxel with ``other``.

    With ``mask`` the prediction this counts false-positive components; with ``mask`` the reference,
    false-negative (missed) lesions.
    """
    mask, other = _pair(mask, other)
    labels, n = _components(mask, connectivity)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    touched = np.zeros(n + 1, dtype=bool)
    touched[np.unique(labels[other])] = True
    touched[0] = True  # background is not a component
    return int(sizes[~touched].sum())


AUTOPET_METRICS = ("dice", "fp_volume_ml", "fn_volume_ml")


def autopet_case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], connectivity: int = AUTOPET_CONNECTIVITY
) -> dict[str, float]:
    """autoPET metrics of one case: Dice, false-positive and false-negative volume in ml.

    False-positive volume is the volume of predicted connected components that overlap no reference
    voxel; false-negative volume that of reference components the prediction does not touch.

    On a negative case (empty reference) the challenge ranks FPV only, so Dice is NaN there (summaries
    skip it) and FNV is 0.

    Args:
        pred: predicted binary lesion mask.
        ref: reference binary lesion mask.
        spacing: voxel size in mm along each array axis (the voxel volume comes from it).
        connectivity: neighbourhood for connected components: 6, 18 (the challenge's) or 26 in 3D.
    """
    pred, ref = _pair(pred, ref)
    ml = voxel_volume_ml(_spacing(spacing, pred.ndim))
    return {
        "dice": dice(pred, ref) if ref.any() else math.nan,
        "fp_volume_ml": missed_component_voxels(pred, ref, connectivity) * ml,
        "fn_volume_ml": missed_component_voxels(ref, pred, connectivity) * ml,
    }


HECKTOR_METRICS = ("dice", "intersection_mm3", "pred_mm3", "ref_mm3")


def overlap_counts(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """Per-case Dice (BraTS convention, for inspection) and the volumes (mm^3) aggregated Dice sums.

    Volumes, not voxel counts: HECKTOR 2022 cases come at different voxel sizes, and the official
    evaluation sums ``count * voxel volume`` (SimpleITK spacing) over the cases.
    """
    pred, ref = _pair(pred, ref)
    mm3 = float(np.prod(_spacing(spacing, pred.ndim)))
    return {
        "dice": dice(pred, ref),
        "intersection_mm3": int(np.logical_and(pred, ref).sum()) * mm3,
        "pred_mm3": int(pred.sum()) * mm3,
        "ref_mm3": int(ref.sum()) * mm3,
    }


@dataclass
class AggregatedDice:
    """HECKTOR 2022 aggregated Dice: ``2 sum_i |P_i & G_i| / sum_i (|P_i| + |G_i|)`` per class, in mm^3.

    Accumulates volumes case by case, so a case without a class adds nothing instead of scoring
    Dice 0. A class that is empty in every prediction and reference has no aggregated Dice: it is
    NaN, listed by :meth:`not_computable`, and makes :meth:`mean` NaN (as the official
    ``np.mean`` over the classes), so a partial mean is never reported as the ranking score.

    Example:
        >>> agg = AggregatedDice()
        >>> agg.update("GTVp", np.array([1, 1, 0]), np.array([1, 0, 0]), spacing=(2.0,))
        >>> agg.per_class()
        {'GTVp': 0.6666666666666666}
    """

    intersections: dict[str, float] = field(default_factory=dict)
    volumes: dict[str, float] = field(default_factory=dict)

    def add_volumes(self, cls: str, intersection_mm3: float, pred_mm3: float, ref_mm3: float) -> None:
        """Add one case's volumes for ``cls`` (what :func:`overlap_counts` returns)."""
        self.intersections[cls] = self.intersections.get(cls, 0.0) + float(intersection_mm3)
        self.volumes[cls] = self.volumes.get(cls, 0.0) + float(pred_mm3) + float(ref_mm3)

    def update(
        self, cls: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
    ) -> None:
        """Add one case's binary masks for ``cls``; ``spacing`` in mm per array axis (None: 1 mm)."""
        counts = overlap_counts(pred, ref, spacing)
        self.add_volumes(cls, counts["intersection_mm3"], counts["pred_mm3"], counts["ref_mm3"])

    def per_class(self) -> dict[str, float]:
        return {
            cls: (2.0 * self.intersections[cls] / volume if volume else math.nan)
            for cls, volume in self.volumes.items()
        }

    def not_computable(self) -> list[str]:
        """Classes with no voxel in any prediction or reference (0/0)."""
        return [cls for cls, value in self.per_class().items() if math.isnan(value)]

    def mean(self) -> float:
        """Mean over classes (the HECKTOR 2022 ranking score); NaN if any class is not computable."""
        values = list(self.per_class().values())
        if not values or any(math.isnan(v) for v in values):
            return math.nan
        return float(np.mean(values))
