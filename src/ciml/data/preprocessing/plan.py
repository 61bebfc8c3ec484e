"""The preprocessing plan: what every case of a dataset goes through, stored with a run as JSON.

A plan is plain data (target spacing, per-modality normalisation and its numbers), validated when
read back, so a run preprocesses prediction inputs exactly as it preprocessed its training cases.
:func:`ciml.data.preprocessing.plan_preprocessing` computes one from a dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ciml.errors import CimlError

PLAN_VERSION = 1
ORIENTATION = "RAS"
SCHEMES = {"mri": "zscore_nonzero", "ct": "ct_clip_zscore", "pet": "pet_clip_scale", "synthetic": "zscore"}
DEFAULT_CT_BODY_THRESHOLD = -500.0


class PreprocessingError(CimlError):
    """A case or a plan cannot be preprocessed; the message names the file or key."""


@dataclass(frozen=True)
class ModalityNormalization:
    """How one modality is normalised.

    Attributes:
        scheme: ``zscore_nonzero`` (MRI), ``zscore`` (synthetic), ``ct_clip_zscore`` (CT) or
            ``pet_clip_scale`` (PET).
        params: the numbers the scheme applies; empty for the per-case schemes. CT: clip_low and
            clip_high (foreground 0.5/99.5 percentiles), mean and std (foreground, as nnU-Net). PET:
            clip_high (foreground 99.5 percentile) and scale (foreground SUV standard deviation, so
            values are of order 1 while SUV 0 stays 0). Users may edit them in a saved plan.
        statistics: the dataset's foreground intensity statistics they came from (for the record).
    """

    scheme: str
    params: dict[str, float] = field(default_factory=dict)
    statistics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "params": dict(self.params), "statistics": dict(self.statistics)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> ModalityNormalization:
        scheme = data.get("scheme") if isinstance(data, Mapping) else None
        if scheme not in SCHEMES.values():
            raise PreprocessingError(
                f"{source}: 'scheme' must be one of {', '.join(SCHEMES.values())}, got {scheme!r}"
            )
        required = {
            "ct_clip_zscore": ("clip_low", "clip_high", "mean", "std"),
            "pet_clip_scale": ("clip_high", "scale"),
        }
        params = {str(k): float(v) for k, v in (data.get("params") or {}).items()}
        for key in required.get(scheme, ()):
            if key not in params:
                raise PreprocessingError(f"{source}: 'params.{key}' is required by scheme {scheme}")
        stats = {str(k): float(v) for k, v in (data.get("statistics") or {}).items()}
        return cls(str(scheme), params, stats)


@dataclass(frozen=True)
class PreprocessingPlan:
    """Everything needed to preprocess any case of a dataset the same way (stored with a run).

    Attributes:
        modalities: modality name -> type, in channel order (the task spec's).
        target_spacing: voxel size in mm along the RAS axes after resampling.
        normalization: modality name -> its normalisation.
        orientation: axis codes every case is reoriented to.
        median_spacing: the dataset's median RAS spacing (the default target, as in nnU-Net).
        median_shape: the dataset's median RAS shape before cropping, at its own spacing.
        num_cases: how many cases the plan was computed from.
        statistics_from: where intensity statistics came from: ``label`` (labelled voxels, as nnU-Net),
            ``body`` (nonzero / CT body voxels, when no case has a labelled voxel) or ``none``.
        ct_body_threshold: HU above which a CT voxel belongs to the body (for the crop box).
        version: preprocessing code version; a new one invalidates caches.
    """

    modalities: dict[str, str]
    target_spacing: tuple[float, float, float]
    normalization: dict[str, ModalityNormalization]
    orientation: str = ORIENTATION
    median_spacing: tuple[float, float, float] | None = None
    median_shape: tuple[int, int, int] | None = None
    num_cases: int = 0
    statistics_from: str = "none"
    ct_body_threshold: float = DEFAULT_CT_BODY_THRESHOLD
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; :meth:`from_dict` reads it back to an equal plan."""
        return {
            "version": self.version,
            "modalities": dict(self.modalities),
            "target_spacing": list(self.target_spacing),
            "orientation": self.orientation,
            "normalization": {m: n.to_dict() for m, n in self.normalization.items()},
            "median_spacing": None if self.median_spacing is None else list(self.median_spacing),
            "median_shape": None if self.median_shape is None else list(self.median_shape),
            "num_cases": self.num_cases,
            "statistics_from": self.statistics_from,
            "ct_body_threshold": self.ct_body_threshold,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "preprocessing plan") -> PreprocessingPlan:
        """Validate ``data`` (as written by :meth:`to_dict`); errors name ``source`` and the key."""
        if not isinstance(data, Mapping):
            raise PreprocessingError(f"{source}: expected a mapping")
        for key in ("modalities", "target_spacing", "normalization"):
            if key not in data:
                raise PreprocessingError(f"{source}: '{key}': missing required key")
        if data.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise PreprocessingError(
                f"{source}: 'version' is {data.get('version')!r}, this ciml reads version {PLAN_VERSION}; "
                "plan again"
            )
        modalities = {str(k): str(v) for k, v in data["modalities"].items()}
        normalization = {}
        for m in modalities:
            if m not in data["normalization"]:
                raise PreprocessingError(f"{source}: 'normalization.{m}': missing")
            normalization[m] = ModalityNormalization.from_dict(
                data["normalization"][m], f"{source}: normalization.{m}"
            )
        if data.get("orientation", ORIENTATION) != ORIENTATION:
            raise PreprocessingError(f"{source}: 'orientation' must be {ORIENTATION}")
        return cls(
            modalities=modalities,
            target_spacing=spacing_triple(data["target_spacing"], f"{source}: 'target_spacing'"),
            normalization=normalization,
            median_spacing=_optional_tuple(data.get("median_spacing"), float),
            median_shape=_optional_tuple(data.get("median_shape"), int),
            num_cases=int(data.get("num_cases", 0)),
            statistics_from=str(data.get("statistics_from", "none")),
            ct_body_threshold=float(data.get("ct_body_threshold", DEFAULT_CT_BODY_THRESHOLD)),
        )

    def plan_hash(self) -> str:
        """Short stable hash of the plan: caches keyed by it never mix two plans."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def spacing_triple(value: Any, where: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise PreprocessingError(f"{where}: expected 3 positive numbers, got {value!r}") from None
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise PreprocessingError(f"{where}: expected 3 positive numbers, got {value!r}")
    return out  # type: ignore[return-value]


def _optional_tuple(value: Any, kind: type) -> tuple | None:
    return None if value is None else tuple(kind(v) for v in value)
