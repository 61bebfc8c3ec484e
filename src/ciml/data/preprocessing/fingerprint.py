"""Fingerprint a dataset and choose its preprocessing plan (nnU-Net's defaults, per modality type).

The target spacing is the dataset's median; CT and PET get clipping and scaling numbers from a random
subsample of foreground intensities over the whole dataset; MRI and synthetic data are z-scored per
case and need none.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ciml.data.cases import Case
from ciml.data.preprocessing.load import load_case, present_modalities, read_geometry
from ciml.data.preprocessing.plan import (
    DEFAULT_CT_BODY_THRESHOLD,
    SCHEMES,
    ModalityNormalization,
    PreprocessingError,
    PreprocessingPlan,
    spacing_triple,
)
from ciml.tasks.spec import TaskSpec

_PERCENTILES = (0.5, 50.0, 99.5)


def plan_preprocessing(
    cases: Sequence[Case],
    spec: TaskSpec,
    target_spacing: Sequence[float] | None = None,
    *,
    max_stat_voxels: int = 10_000_000,
    seed: int = 0,
    progress: bool = False,
) -> PreprocessingPlan:
    """Fingerprint a dataset and choose how to preprocess it.

    The target spacing defaults to the median RAS spacing of the cases' first modality (nnU-Net's
    default, without its anisotropy rule). CT and PET statistics come from a random subsample of at most
    ``max_stat_voxels`` foreground voxels over the whole dataset (labelled voxels when there are any).

    Raises:
        PreprocessingError: no cases, a case missing a modality, unreadable or malformed files.
    """
    cases = list(cases)
    if not cases:
        raise PreprocessingError(f"{spec.name}: no cases to plan preprocessing from")
    geometries = [_case_geometry(case, spec) for case in cases]
    spacings = np.array([g[0] for g in geometries])
    shapes = np.array([g[1] for g in geometries])
    median_spacing = tuple(float(v) for v in np.median(spacings, axis=0))
    median_shape = tuple(int(v) for v in np.median(shapes, axis=0))
    target = median_spacing if target_spacing is None else spacing_triple(target_spacing, "target_spacing")
    stats, stats_from = _dataset_statistics(cases, spec, max_stat_voxels, seed, progress)
    normalization = {m: _normalization_for(m, kind, stats.get(m)) for m, kind in spec.modalities.items()}
    return PreprocessingPlan(
        modalities=dict(spec.modalities),
        target_spacing=target,  # type: ignore[arg-type]
        normalization=normalization,
        median_spacing=median_spacing,  # type: ignore[arg-type]
        median_shape=median_shape,  # type: ignore[arg-type]
        num_cases=len(cases),
        statistics_from=stats_from,
    )


def _case_geometry(case: Case, spec: TaskSpec) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """RAS spacing and RAS shape of the case's reference (first) modality, from the header only."""
    path = case.images.get(present_modalities(case, spec, allow_missing=True)[0])
    affine, shape = read_geometry(path)
    ornt = nib.io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing, ras_shape = [0.0] * 3, [0] * 3
    for axis, (world, _) in enumerate(ornt):
        spacing[int(world)], ras_shape[int(world)] = float(zooms[axis]), int(shape[axis])
    return tuple(spacing), tuple(ras_shape)


def _dataset_statistics(
    cases: list[Case], spec: TaskSpec, max_voxels: int, seed: int, progress: bool
) -> tuple[dict[str, dict[str, float]], str]:
    """Foreground intensity statistics of the CT and PET modalities (the others need none)."""
    wanted = [m for m, kind in spec.modalities.items() if kind in ("ct", "pet")]
    if not wanted:
        return {}, "none"
    rng = np.random.default_rng(seed)
    per_case = max(1, max_voxels // len(cases))
    samples: dict[str, dict[str, list[np.ndarray]]] = {
        "label": {m: [] for m in wanted},
        "body": {m: [] for m in wanted},
    }
    for case in tqdm(cases, desc="intensity statistics", disable=not progress):
        loaded = load_case(case, spec, DEFAULT_CT_BODY_THRESHOLD, allow_missing=True)
        label = None if loaded.label is None else loaded.label.as_tensor()[0].numpy() > 0
        for i, m in enumerate(spec.modalities):
            if m not in wanted or m in loaded.missing:
                continue
            values = loaded.image.as_tensor()[i].numpy()
            samples["body"][m].append(_subsample(values[loaded.bodies[m]], per_case, rng))
            if label is not None and label.any():
                samples["label"][m].append(_subsample(values[label], per_case, rng))
    source = "label" if any(len(s) for s in samples["label"].values()) else "body"
    stats = {}
    for m in wanted:
        values = np.concatenate(samples[source][m]) if samples[source][m] else np.zeros(0, np.float32)
        stats[m] = _summarise(values)
    return stats, source


def _subsample(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if values.size <= n:
        return values.astype(np.float64)
    return values[rng.integers(0, values.size, n)].astype(np.float64)


def _summarise(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n_voxels": 0.0}
    p_low, median, p_high = np.percentile(values, _PERCENTILES)
    return {
        "n_voxels": float(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "median": float(median),
        "percentile_00_5": float(p_low),
        "percentile_99_5": float(p_high),
    }


def _normalization_for(modality: str, kind: str, stats: dict[str, float] | None) -> ModalityNormalization:
    scheme = SCHEMES[kind]
    if kind not in ("ct", "pet"):
        return ModalityNormalization(scheme)
    if not stats or not stats.get("n_voxels"):
        raise PreprocessingError(
            f"modality '{modality}' ({kind}): no foreground voxels to compute statistics from"
        )
    std = stats["std"] if stats["std"] > 1e-8 else 1.0
    if kind == "ct":
        low, high = stats["percentile_00_5"], stats["percentile_99_5"]
        params = {"clip_low": low, "clip_high": max(high, low + 1e-3), "mean": stats["mean"], "std": std}
    else:
        params = {"clip_high": max(stats["percentile_99_5"], 1e-3), "scale": std}
    return ModalityNormalization(scheme, params, dict(stats))
