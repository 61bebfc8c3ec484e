"""Explanations of a trained run on one case (``ciml explain``): who contributed where, and how much.

Two views per case:

- **Grad-CAM** (:mod:`ciml.explain.gradcam`): for every segmentor and region, a map of each modality's
  contribution (the seed's view) and its share (how much the region's score drops without that
  modality's spatial information).
- **Information maps** (:mod:`ciml.explain.information`): for every message m<-n, the KL the gate charged,
  nats per voxel, summed over levels; CIML's exact view of what each modality told each sub-task.

The explanation runs on the case as the run preprocesses it, in one piece (no sliding window): the whole
preprocessed case when it holds at most ``max_voxels`` voxels (default :func:`default_max_voxels`: what
fits in about 4 GB, since the gradients of every segmentor need the whole forward graph), else a window
of the run's patch size centred on the tumour the network predicts (located in one pass without
gradients, or by tiles without overlap for very large cases); ``explanation.json`` says which. Sizes are
zero-padded to the network's size divisor, as sliding-window inference pads. Maps are written as NIfTI
on the case's original grid (zero outside the explained window) with the reference modality's header,
to overlay in any viewer, plus PNG slices through the tumour and a bar chart of the shares
(:mod:`ciml.explain.figures`).

Files in ``OUT/<case_id>/``: ``gradcam_<segmentor>_<region>_from_<modality>.nii.gz``,
``info_<receiver>_from_<sender>.nii.gz``, ``gradcam.png``, ``information.png`` (CIML networks with
messages), ``contributions.png`` and ``explanation.json``.

Example:
    >>> explain_cases("runs/brats", ["BraTS20_Training_001"], "explanations")  # doctest: +SKIP
    >>> explainer = Explainer.from_run("runs/brats")                          # doctest: +SKIP
    >>> explanation = explainer.explain(case)                                  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ciml.data.cases import Case
from ciml.data.layouts import read_dataset
from ciml.data.preprocessing import PreprocessedCase, PreprocessingPlan, invert_to_original, preprocess_case
from ciml.errors import CimlError
from ciml.explain.figures import contributions_png, fractions_png, information_png, tumour_slice
from ciml.explain.gradcam import (
    CAMS,
    GRADCAM,
    HIRESCAM,
    INPUT_GRADIENT,
    Contribution,
    GradCamResult,
    default_level,
    explain_contributions,
    grad_cam,
    gradcam_contributions,
    hires_cam,
    input_gradient_contributions,
)
from ciml.explain.information import (
    information_maps,
    information_maps_of,
    information_totals,
    message_name,
    parse_gate_key,
    upsample_replicate,
)
from ciml.files import write_bytes_atomic, write_json_atomic
from ciml.inference.predict import resolve_device
from ciml.inference.sliding import sliding_window_probabilities
from ciml.inference.writing import reference_nifti, save_nifti_atomic, to_nifti
from ciml.models import size_divisor
from ciml.tasks import TaskSpec
from ciml.training.run import RunFolder

EXTENTS = ("auto", "case", "patch")
#: Peak memory of an explanation per voxel, per full-resolution channel (``widths[0]``) and per modality:
#: measured ~240 bytes on the demo (4 modalities, widths 8/16/32, 76x88x76 voxels, 4.5 GB peak on CPU).
BYTES_PER_VOXEL = 256
#: ``extent="auto"`` explains the whole case when its estimated memory stays below this.
DEFAULT_MEMORY_BYTES = 4 * 2**30
#: A window's tumour is located by one pass without gradients when the case is at most this many times the
#: explanation budget (measured: such a pass needs ~1/10 of the memory), else by tiles.
LOCATE_FACTOR = 8
SUMMARY_FILE = "explanation.json"
Window = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass
class CaseExplanation:
    """Everything explained for one case, on its preprocessed grid.

    Attributes:
        case_id: the case.
        model: the run's model name (ciml, ensemble, joint, ...).
        modalities: channel order of ``image``.
        regions: channel order of ``probabilities``.
        image: preprocessed modalities [M, X, Y, Z].
        probabilities: the model's region probabilities [R, X, Y, Z]: from the explanation's own forward
            pass for the whole case, from the pass that located the tumour when a window was explained.
        gradcam: contributions; their maps and masks fill the whole grid (zero outside the window).
        information: message ``receiver<-sender`` -> KL map [X, Y, Z] in nats per voxel (zero outside).
        information_totals: message -> mean of its map over the window: its share of the loss's KL term
            there (exactly so when the window needed no padding).
        kl: the sum of ``information_totals``.
        extent: ``case`` (the whole case) or ``patch`` (a window of the run's patch size).
        window: start and end (exclusive) of the explained window on the grid.
        meta: the preprocessing meta data (to map back to the original grid).
        seconds: time spent explaining.
    """

    case_id: str
    model: str
    modalities: tuple[str, ...]
    regions: tuple[str, ...]
    image: np.ndarray
    probabilities: np.ndarray
    gradcam: GradCamResult
    information: dict[str, np.ndarray]
    information_totals: dict[str, float]
    kl: float
    extent: str
    window: Window
    meta: dict[str, Any]
    seconds: float = 0.0

    @property
    def notes(self) -> list[str]:
        """What was explained, how, and what the method cannot say for this network."""
        start, end = self.window
        where = (
            "the whole preprocessed case"
            if self.extent == "case"
            else f"a window of the run's patch size centred on the predicted tumour, voxels {list(start)} to "
            f"{list(end)} of the preprocessed grid (the whole case exceeded the voxel budget)"
        )
        notes = [f"Explained {where}, in one forward pass (no sliding window)."]
        notes += self.gradcam.notes
        if not self.information:
            notes.append("This network has no information gates: there are no information maps.")
        return notes

    def tumour_slice(self) -> int:
        """Axial slice with the most predicted tumour (any region) inside the window."""
        predicted = np.nan_to_num(self.probabilities) > 0.5
        return tumour_slice(predicted.any(0))

    def images(self) -> dict[str, np.ndarray]:
        return {m: self.image[i] for i, m in enumerate(self.modalities)}

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: settings, notes, shares per contribution, information per message."""
        start, end = self.window
        return {
            "case_id": self.case_id,
            "model": self.model,
            "method": self.gradcam.method,
            "level": self.gradcam.level,
            "extent": self.extent,
            "window": {"start": list(start), "end": list(end)},
            "notes": self.notes,
            "contributions": [
                {
                    "segmentor": c.segmentor,
                    "region": c.region,
                    "fractions": c.fractions,
                    "effect": c.effect,
                    "mass": c.mass,
                    "mask_voxels": c.mask_voxels,
                }
                for c in self.gradcam.contributions
            ],
            "information_nats_per_voxel": self.information_totals,
            "kl_nats_per_voxel": self.kl,
            "seconds": round(self.seconds, 2),
        }

    def figures(self) -> dict[str, bytes]:
        """PNG name -> bytes: ``gradcam.png``, ``contributions.png`` and ``information.png`` (if any)."""
        index, images = self.tumour_slice(), self.images()
        label = f"{self.case_id}, axial slice {index}"
        out = {
            "gradcam.png": contributions_png(
                images, self.gradcam.contributions, index, f"{self.gradcam.method}: {label}"
            ),
            "contributions.png": fractions_png(
                self.gradcam.contributions, self.modalities, f"share of each modality ({self.case_id})"
            ),
        }
        if self.information:
            out["information.png"] = information_png(
                images, self.information, self.information_totals, index, f"information sent: {label}"
            )
        return out


# ---------------------------------------------------------------------------------------- explainer


def default_max_voxels(model: nn.Module, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> int:
    """Voxels one explanation of ``model`` can cover within ``memory_bytes`` (see :data:`BYTES_PER_VOXEL`)."""
    config = getattr(model, "config", {})
    width = int(config.get("widths", [32])[0])
    modalities = len(config.get("task", {}).get("modalities", ())) or 1
    return int(memory_bytes // (BYTES_PER_VOXEL * width * modalities))


def _window_around(centre: Sequence[float], size: Sequence[int], shape: Sequence[int]) -> Window:
    """A window of ``size`` (at most ``shape``) centred on ``centre`` and moved inside the grid."""
    start, end = [], []
    for c, s, n in zip(centre, size, shape, strict=True):
        s = min(int(s), int(n))
        lo = int(round(c - s / 2))
        lo = min(max(lo, 0), n - s)
        start.append(lo)
        end.append(lo + s)
    return tuple(start), tuple(end)


def _pad_to(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad the spatial dimensions of [1, M, *spatial] at their ends to multiples of ``divisor``."""
    pad: list[int] = []
    for size in reversed(x.shape[2:]):
        pad += [0, (-size) % divisor]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def _paste(values: np.ndarray, shape: Sequence[int], window: Window) -> np.ndarray:
    """``values`` [..., *window size] placed into zeros of [..., *shape]."""
    out = np.zeros((*values.shape[:-3], *shape), dtype=values.dtype)
    start, end = window
    out[(..., *[slice(s, e) for s, e in zip(start, end, strict=True)])] = values
    return out


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
        model: nn.Module,
        spec: TaskSpec,
        plan: PreprocessingPlan,
        patch_size: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec, self.plan = spec, plan
        self.patch_size = tuple(int(p) for p in patch_size)
        self.model_name = getattr(model, "config", {}).get("name", type(model).__name__)

    @classmethod
    def from_run(
        cls,
        run: RunFolder | str | Path,
        fold: int | None = None,
        checkpoint: str = "last",
        device: str = "auto",
    ) -> Explainer:
        """Load one fold (default: the first with a checkpoint) of a run folder.

        Raises:
            CimlError: not a run folder, no trained fold, no preprocessing plan or patch size in run.json.
        """
        run = run if isinstance(run, RunFolder) else RunFolder(run)
        info = run.read_info()
        for key in ("preprocessing", "patch_size"):
            if key not in info:
                raise CimlError(f"{run.info_path}: missing '{key}' (needed to explain cases)")
        folds = run.folds()
        if fold is None:
            if not folds:
                raise CimlError(f"{run.path}: no trained fold (no fold_K/checkpoint_last.pt)")
            fold = folds[0]
        torch_device = resolve_device(device)
        model, _ = run.load_model(fold, checkpoint, map_location=torch_device)
        if model.config["spatial_dims"] != 3:
            raise CimlError(f"{run.info_path}: a {model.config['spatial_dims']}D model; cases need a 3D run")
        plan = PreprocessingPlan.from_dict(info["preprocessing"], source=f"{run.info_path}: preprocessing")
        return cls(model, run.spec(), plan, info["patch_size"], torch_device)

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
            raise CimlError(f"--extent must be one of {', '.join(EXTENTS)}, got {extent!r}")
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
            window = _window_around(self._tumour_centre(probabilities, shape), self.patch_size, shape)
        size = tuple(e - s for s, e in zip(*window, strict=True))
        inside = tuple(slice(0, n) for n in size)  # the window without its padding
        crop = tuple(slice(s, e) for s, e in zip(*window, strict=True))
        x = _pad_to(image[(slice(None), slice(None), *crop)], size_divisor(self.model)).to(self.device)
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
            gradcam=_placed(gradcam, size, shape, window),
            information={name: _paste(values, shape, window) for name, values in maps.items()},
            information_totals=totals,
            kl=float(sum(totals.values())),
            extent="case" if whole else "patch",
            window=window,
            meta=pre.meta,
            seconds=time.perf_counter() - started,
        )

    def _padded_voxels(self, shape: Sequence[int]) -> int:
        divisor = size_divisor(self.model)
        return math.prod(-(-int(n) // divisor) * divisor for n in shape)

    def _locating_probabilities(self, image: torch.Tensor, budget: int) -> np.ndarray:
        """Region probabilities of the whole case, only to find the tumour the window is centred on.

        One pass without gradients when the case holds at most :data:`LOCATE_FACTOR` x ``budget``
        voxels (no graph is kept: ~1/10 of an explanation's memory, measured), else tiles without
        overlap (step 1), an eighth of a full sliding-window prediction's cost.
        """
        shape = tuple(image.shape[2:])
        if self._padded_voxels(shape) <= LOCATE_FACTOR * budget:
            x = _pad_to(image, size_divisor(self.model)).to(self.device)
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
        predicted = np.nan_to_num(probabilities) > 0.5
        found = np.argwhere(predicted.any(0))
        if not found.size:
            return tuple(n / 2 for n in shape)
        return tuple((found.min(0) + found.max(0) + 1) / 2)


def _placed(
    result: GradCamResult, size: Sequence[int], shape: Sequence[int], window: Window
) -> GradCamResult:
    """The contributions with maps and masks cropped to ``size`` and placed on the full grid."""
    inside = tuple(slice(0, n) for n in size)

    def place(tensor: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_paste(tensor[inside].numpy(), shape, window))

    contributions = [
        dataclasses.replace(c, maps={m: place(v) for m, v in c.maps.items()}, mask=place(c.mask))
        for c in result.contributions
    ]
    return dataclasses.replace(result, contributions=contributions)


# ------------------------------------------------------------------------------------------ writing


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", name)


def nifti_names(explanation: CaseExplanation) -> dict[str, np.ndarray]:
    """File name -> map on the preprocessed grid, for every Grad-CAM map and information map."""
    names = {}
    for c in explanation.gradcam.contributions:
        for modality, values in c.maps.items():
            file = f"gradcam_{_safe(c.segmentor)}_{_safe(c.region)}_from_{_safe(modality)}.nii.gz"
            names[file] = values.numpy()
    for message, values in explanation.information.items():
        receiver, sender = message.split("<-")
        names[f"info_{_safe(receiver)}_from_{_safe(sender)}.nii.gz"] = values
    return names


def write_explanation(
    explanation: CaseExplanation, folder: str | Path, overwrite: bool = False
) -> list[Path]:
    """Write the case's NIfTI maps (original grid), PNG figures and ``explanation.json`` into ``folder``.

    The JSON is written last, so its presence marks a complete explanation; an existing one is kept
    unless ``overwrite``.

    Raises:
        CimlError: ``folder`` already holds an explanation and ``overwrite`` is false.
    """
    folder = Path(folder)
    summary_path = folder / SUMMARY_FILE
    if summary_path.exists() and not overwrite:
        raise CimlError(f"{summary_path}: already exists (pass --overwrite / overwrite=True to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    meta = explanation.meta
    reference = reference_nifti(meta["sources"].get(meta["reference_modality"]))
    affine = np.asarray(meta["original_affine"], dtype=np.float64)
    maps = nifti_names(explanation)
    written = []
    if maps:
        stacked = invert_to_original(np.stack(list(maps.values())).astype(np.float32), meta, mode="linear")
        for name, values in zip(maps, stacked, strict=True):
            written.append(
                save_nifti_atomic(to_nifti(values.astype(np.float32), affine, reference), folder / name)
            )
    for name, png in explanation.figures().items():
        written.append(write_bytes_atomic(folder / name, png))
    summary = {**explanation.summary(), "files": [p.name for p in written]}
    written.append(write_json_atomic(summary_path, summary))
    return written


def explain_cases(
    run: RunFolder | str | Path,
    case_ids: Iterable[str] | None,
    out: str | Path,
    *,
    data: str | Path | None = None,
    layout: str | None = None,
    fold: int | None = None,
    checkpoint: str = "last",
    device: str = "auto",
    level: int | None = None,
    cam: str = GRADCAM,
    extent: str = "auto",
    max_voxels: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Explain cases of a dataset with a run and write each into ``out/<case_id>/``.

    Args:
        run: the run folder.
        case_ids: cases to explain (None: every case of ``data``).
        out: output folder.
        data: the cases' dataset in any layout (default: the run's training data, from run.json).
        layout: the dataset's layout (default: auto, or the run's for its own data).
        fold, checkpoint, device: which network and where (float32 even on CUDA).
        level, cam, extent, max_voxels: see :meth:`Explainer.explain_preprocessed`.
        overwrite: replace existing explanations (default: refuse before any work).
        progress: progress bar and per-case times.

    Returns:
        Each case's ``explanation.json`` content, with ``folder`` added.
    """
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    spec = run.spec()
    if data is None:
        source = run.read_info().get("data") or {}
        if "path" not in source:
            raise CimlError(f"{run.info_path}: no 'data.path'; name the cases' dataset with --data")
        data, layout = source["path"], layout or source.get("layout", "auto")
    cases = {c.case_id: c for c in read_dataset(data, spec, layout or "auto")}
    wanted = list(cases) if case_ids is None else list(dict.fromkeys(case_ids))
    unknown = [c for c in wanted if c not in cases]
    if unknown:
        raise CimlError(f"{data}: no case {', '.join(unknown)} (it has {_listing(cases)})")
    folders = {c: Path(out) / _safe(c) for c in wanted}
    existing = [str(f / SUMMARY_FILE) for f in folders.values() if (f / SUMMARY_FILE).exists()]
    if existing and not overwrite:
        raise CimlError(f"{', '.join(existing)}: already exists (pass --overwrite to replace)")
    explainer = Explainer.from_run(run, fold, checkpoint, device)
    summaries = []
    bar = tqdm(wanted, desc="explain", unit="case", disable=not progress)
    for case_id in bar:
        explanation = explainer.explain(
            cases[case_id], level=level, cam=cam, extent=extent, max_voxels=max_voxels
        )
        write_explanation(explanation, folders[case_id], overwrite=overwrite)
        summaries.append({**explanation.summary(), "folder": str(folders[case_id])})
        if progress:
            bar.write(f"{case_id}: {explanation.extent}, {explanation.seconds:.1f} s -> {folders[case_id]}")
    return summaries


def _listing(cases: dict[str, Case], limit: int = 5) -> str:
    names = list(cases)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


__all__ = [
    "CAMS",
    "EXTENTS",
    "GRADCAM",
    "HIRESCAM",
    "INPUT_GRADIENT",
    "CaseExplanation",
    "Contribution",
    "Explainer",
    "GradCamResult",
    "default_level",
    "default_max_voxels",
    "explain_cases",
    "explain_contributions",
    "grad_cam",
    "gradcam_contributions",
    "hires_cam",
    "information_maps",
    "information_maps_of",
    "information_totals",
    "input_gradient_contributions",
    "message_name",
    "parse_gate_key",
    "upsample_replicate",
    "write_explanation",
]
