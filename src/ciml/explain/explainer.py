"""The explainer: one fold's network with the run's task, plan and patch, applied to cases."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ciml.data.cases import Case
from ciml.data.preprocessing import PreprocessedCase, PreprocessingPlan, preprocess_case
from ciml.errors import ParameterError
from ciml.explain.case import CaseExplanation
from ciml.explain.gradcam import (
    GRADCAM,
    explain_contributions,
)
from ciml.explain.information import (
    information_maps,
)
from ciml.explain.window import (
    EXTENTS,
    LOCATE_FACTOR,
    Window,
    default_max_voxels,
    pad_to,
    paste,
    placed,
    window_around,
)
from ciml.inference import InferenceSettings
from ciml.inferers import sliding_window_probabilities
from ciml.models import SegmentationNetwork
from ciml.runs import RunFolder, load_trained_run
from ciml.tasks import REGION_THRESHOLD, TaskSpec


class Explainer:
    """One fold's network with the run's task, preprocessing plan and patch size, ready to explain cases.

    Args:
        model: the network (eval mode is set).
        spec: the run's task spec.
        plan: the run's preprocessing plan.
        patch_size: the run's patch size (window size when the whole case is too large).
        device: where the network runs (float32; explanations need exact gradients).
    """

    def __init__(
        self,
        model: SegmentationNetwork,
        spec: TaskSpec,
        plan: PreprocessingPlan,
        patch_size: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec, self.plan = spec, plan
        self.patch_size = tuple(int(p) for p in patch_size)
        self.model_name = model.name

    @classmethod
    def from_run(
        cls,
        run: RunFolder | str | Path,
        settings: InferenceSettings | None = None,
    ) -> Explainer:
        """Load one fold of a run folder: the first of ``settings.folds``, else the first trained.

        ``settings`` chooses the network as for prediction (checkpoint, folds, device); explanations
        always run in float32, since their gradients must be exact.

        Raises:
            CimlError: not a run folder, no trained fold, no preprocessing plan or patch size in run.json.
        """
        run = run if isinstance(run, RunFolder) else RunFolder(run)
        settings = settings or InferenceSettings()
        folds = list(settings.folds[:1]) if settings.folds else run.folds()[:1]
        trained = load_trained_run(run, folds=folds, checkpoint=settings.checkpoint, device=settings.device)
        return cls(trained.network, trained.spec, trained.plan, trained.patch_size, trained.device)

    def explain(self, case: Case, **options: Any) -> CaseExplanation:
        """Preprocess ``case`` (its label is not read) and explain it; see :meth:`explain_preprocessed`."""
        pre = preprocess_case(dataclasses.replace(case, label=None), self.spec, self.plan)
        return self.explain_preprocessed(pre, **options)

    def explain_preprocessed(
        self,
        pre: PreprocessedCase,
        *,
        level: int | None = None,
        cam: str = GRADCAM,
        extent: str = "auto",
        max_voxels: int | None = None,
    ) -> CaseExplanation:
        """Grad-CAM and information maps of one preprocessed case.

        Args:
            pre: the case on the run's grid.
            level: Grad-CAM encoder level (default :func:`~ciml.explain.gradcam.default_level`).
            cam: ``gradcam`` or ``hirescam``.
            extent: ``case`` (whole case), ``patch`` (window of the patch size around the predicted tumour)
                or ``auto`` (whole case when it holds at most ``max_voxels`` voxels).
            max_voxels: budget for ``auto``, counted after padding (default :func:`default_max_voxels`).
        """
        if extent not in EXTENTS:
            raise ParameterError("extent", f"must be one of {', '.join(EXTENTS)}, got {extent!r}")
        started = time.perf_counter()
        shape = tuple(pre.image.shape[1:])
        image = torch.from_numpy(np.array(pre.image, dtype=np.float32))[None]
        budget = default_max_voxels(self.model) if max_voxels is None else int(max_voxels)
        whole = extent == "case" or (extent == "auto" and self._padded_voxels(shape) <= budget)
        if whole:
            window: Window = ((0, 0, 0), shape)
            probabilities = None  # the explanation's own forward pass predicts the whole case
        else:
            probabilities = self._locating_probabilities(image, budget)
            window = window_around(self._tumour_centre(probabilities, shape), self.patch_size, shape)
        size = tuple(e - s for s, e in zip(*window, strict=True))
        inside = tuple(slice(0, n) for n in size)  # the window without its padding
        crop = tuple(slice(s, e) for s, e in zip(*window, strict=True))
        x = pad_to(image[(slice(None), slice(None), *crop)], self.model.size_divisor).to(self.device)
        gradcam = explain_contributions(self.model, x, level=level, cam=cam, return_maps=True)
        maps = {
            k: v[0, 0].cpu().numpy()[inside] for k, v in information_maps(gradcam.output, x.shape[2:]).items()
        }
        totals = {name: float(values.mean()) for name, values in maps.items()}
        if probabilities is None:
            regions = self.spec.region_names
            probabilities = (
                gradcam.output.region_probabilities(regions)[0].float().cpu().numpy()[(slice(None), *inside)]
            )
        return CaseExplanation(
            case_id=pre.case_id,
            model=self.model_name,
            modalities=self.spec.modality_names,
            regions=self.spec.region_names,
            image=np.asarray(pre.image, dtype=np.float32),
            probabilities=probabilities,
            gradcam=placed(gradcam, size, shape, window),
            information={name: paste(values, shape, window) for name, values in maps.items()},
            information_totals=totals,
            kl=float(sum(totals.values())),
            extent="case" if whole else "patch",
            window=window,
            meta=pre.meta,
            seconds=time.perf_counter() - started,
        )

    def _padded_voxels(self, shape: Sequence[int]) -> int:
        divisor = self.model.size_divisor
        return math.prod(-(-int(n) // divisor) * divisor for n in shape)

    def _locating_probabilities(self, image: torch.Tensor, budget: int) -> np.ndarray:
        """Region probabilities of the whole case, only to find the tumour the window is centred on.

        One pass without gradients when the case holds at most :data:`LOCATE_FACTOR` x ``budget``
        voxels (no graph is kept: ~1/10 of an explanation's memory, measured), else tiles without
        overlap (step 1), an eighth of a full sliding-window prediction's cost.
        """
        shape = tuple(image.shape[2:])
        if self._padded_voxels(shape) <= LOCATE_FACTOR * budget:
            x = pad_to(image, self.model.size_divisor).to(self.device)
            with torch.inference_mode():
                probabilities = self.model(x).region_probabilities(self.spec.region_names)
            return probabilities[(0, slice(None), *[slice(0, n) for n in shape])].float().cpu().numpy()
        probabilities = sliding_window_probabilities(
            self.model, image, self.spec.region_names, self.patch_size, step=1.0, device=self.device
        )
        return probabilities[0].cpu().numpy()

    @staticmethod
    def _tumour_centre(probabilities: np.ndarray, shape: Sequence[int]) -> tuple[float, ...]:
        """Centre of the bounding box of the predicted tumour (any region), or of the grid if none."""
        predicted = np.nan_to_num(probabilities) > REGION_THRESHOLD
        found = np.argwhere(predicted.any(0))
        if not found.size:
            return tuple(n / 2 for n in shape)
        return tuple((found.min(0) + found.max(0) + 1) / 2)
