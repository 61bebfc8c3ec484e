"""Predict label maps for new cases with a trained run (``ciml predict``).

For each case: the run's own preprocessing (the plan in ``run.json``), sliding-window inference with
Gaussian weighting and optional mirroring TTA (:mod:`ciml.inferers.sliding`), the mean of the region
probabilities over the run's folds, the inversion back onto the input's own grid, and a label map in the
dataset's label values (regions with probability above ``REGION_THRESHOLD``, postprocessed with the rule
the run chose on its validation folds, painted in the spec's assembly order), written with the input's
affine and header (:mod:`ciml.inference.writing`).

**Postprocessing.** Training stores per fold the rule that raised its validation Dice
(``fold_K/postprocessing.json``, :mod:`ciml.inferers.postprocessing`): e.g. a small BraTS ET removed,
so it is written as necrosis. Prediction applies the rule of the folds it ensembles when they agree, else
the first fold's with a printed note; ``InferenceSettings(postprocessing=False)`` (``--no-postprocessing``)
applies none, and runs from before these files predict as they always did.

**Missing modalities.** A CIML run predicts from any non-empty subset of its modalities: the missing
modalities' segmentors are skipped and their messages sit at the gates' "no information" state
(DESIGN section 4), and their files are never read. A region whose owning segmentors are all missing is
predicted by the present fallback owners the spec names (``fallback_owners``: those segmentors have extra
output channels for it); with none present either it is not predictable, and prediction stops with a
message naming it and its owners instead of inventing a mask. Networks on stacked modalities (joint,
segresnet) trained with modality dropout run with the absent channels zero-filled; otherwise they need
every modality and say so.

**Case folders with files missing** (as in BraSyn's test data, where each case lacks one MRI contrast).
Before the first case, every case's modality files are looked for. A missing file stops prediction with
one line naming the files and the ``modalities`` that every case has; with ``allow_missing`` each case
is predicted from the modalities it has (within ``modalities``), and ``<case_id>_modalities.json``
beside its label map records which were used and which were missing.

Example:
    >>> results = predict_folder("runs/brats", "BraTS2020_ValidationData", "preds")  # doctest: +SKIP
    >>> predictor = Predictor.from_run("runs/brats", InferenceSettings(tta=True))  # doctest: +SKIP
    >>> predict_case(predictor, case, "preds", modalities=["flair", "t1ce"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ciml.data.cases import Case
from ciml.data.io import strip_image_suffix
from ciml.data.layouts import CHANNEL_LAYOUTS, detect_layout, read_dataset
from ciml.data.preprocessing import PreprocessingPlan, invert_to_original, preprocess_case
from ciml.devices import resolve_device, resolve_memory_format
from ciml.errors import CimlError, ParameterError
from ciml.files import write_json_atomic
from ciml.inference.writing import (
    LABEL_SUFFIX,
    PROBABILITIES_SUFFIX,
    reference_nifti,
    write_label_map,
    write_probabilities,
)
from ciml.inferers import DEFAULT_STEP, Postprocessing, check_step, sliding_window_probabilities, tile_text
from ciml.locks import folder_lock
from ciml.models import SegmentationNetwork
from ciml.runs import RunFolder, load_trained_run
from ciml.tasks import REGION_THRESHOLD, TaskSpec

MODALITIES_SUFFIX = "_modalities.json"
#: Missing files named in full in the one-line message before it summarises the rest.
_LISTED_MISSING = 3


@dataclass(frozen=True)
class InferenceSettings:
    """How a run's networks are applied (what ``ciml predict`` and ``ciml robustness`` share).

    Attributes:
        checkpoint: ``last`` or ``best`` checkpoint of each fold.
        folds: folds to ensemble; None: every fold that has a checkpoint.
        tta: average over every mirroring of each tile (8x the work in 3D).
        step: tile step as a fraction of the patch size (nnU-Net's 0.5).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        sw_batch_size: tiles per forward pass (None: 2 on a CPU, 1 on CUDA; see
            :func:`ciml.inferers.sliding_window_probabilities`).
        patch_size: tile size (default: the tile the run chose on its validation cases,
            ``fold_K/tile.json``: its training patch, as nnU-Net, or twice it when that scored better;
            runs trained before the choice use the training patch). The tile changes the InstanceNorm
            statistics the network sees (the share of background per tile), and so the scores, either
            way: a CIML trained on 24^3 patches at 3 mm scored held-out mean Dice 0.84 with 24^3
            tiles, 0.85 with 48^3 and 0.65 with 72^3; the demo's CIML (32^3 patches at 2 mm) 0.80 with
            32^3 tiles and 0.89 with 64^3 (:mod:`ciml.training.tiles`).
        postprocessing: apply the postprocessing the run chose on its validation folds (if it has one).
        memory_format: the networks' tensor layout (``auto``: channels_last_3d on a CPU, where whole
            cases are predicted in about 0.75 of the time; :func:`ciml.devices.resolve_memory_format`).
    """

    checkpoint: str = "last"
    folds: tuple[int, ...] | None = None
    tta: bool = False
    step: float = DEFAULT_STEP
    device: str = "auto"
    sw_batch_size: int | None = None
    patch_size: tuple[int, int, int] | None = None
    postprocessing: bool = True
    memory_format: str = "auto"


@dataclass(frozen=True)
class PredictionCallbacks:
    """Points where a caller may act while cases are predicted (interruption tests kill the process there).

    Attributes:
        before_label: called with the case id after its probabilities are written, before its label map.
        after_case: called with each case's result once its files are complete.
    """

    before_label: Callable[[str], None] | None = None
    after_case: Callable[[CaseResult], None] | None = None


@dataclass(frozen=True)
class CaseResult:
    """What predicting one case did.

    Attributes:
        case_id: the case.
        outputs: the files it has in the output folder (label map first).
        seconds: wall time spent on it (0 when skipped).
        skipped: its outputs existed already and were kept.
    """

    case_id: str
    outputs: tuple[Path, ...]
    seconds: float
    skipped: bool = False


class Predictor:
    """A run's fold networks with its task spec, preprocessing plan and patch size, ready for any case.

    Build it with :meth:`from_run`; it loads every fold once, so predicting many cases (or many modality
    subsets of one case) costs no reloading. ``postprocessing`` is the run's rule for label maps; the
    attribute :attr:`postprocessing` is what is applied (none when ``settings.postprocessing`` is off).
    """

    def __init__(
        self,
        spec: TaskSpec,
        plan: PreprocessingPlan,
        models: Sequence[nn.Module],
        patch_size: Sequence[int],
        settings: InferenceSettings | None = None,
        run_info: Mapping[str, Any] | None = None,
        postprocessing: Postprocessing | None = None,
        tile_source: str = "given",
    ) -> None:
        if not models:
            raise CimlError("a predictor needs at least one network")
        self.spec, self.plan, self.models = spec, plan, list(models)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.tile_source = tile_source
        self.settings = settings or InferenceSettings()
        wanted = self.settings.postprocessing and postprocessing is not None
        self.postprocessing = postprocessing if wanted else Postprocessing()
        self.run_info = dict(run_info or {})
        check_step(self.settings.step)
        self.device = resolve_device(self.settings.device)
        layout = resolve_memory_format(self.settings.memory_format, self.device, spatial_dims=3)  # volumes
        for model in self.models:
            model.to(self.device, memory_format=layout).eval()

    @classmethod
    def from_run(cls, run: RunFolder | str | Path, settings: InferenceSettings | None = None) -> Predictor:
        """Load a run folder's folds (all found, or ``settings.folds``) on ``settings.device``.

        Raises:
            CimlError: not a run folder, no trained fold, a missing or mismatched checkpoint, a run.json
                without a preprocessing plan or a valid patch size, or a 2D run.
        """
        settings = settings or InferenceSettings()
        trained = load_trained_run(
            run, settings.folds, settings.checkpoint, settings.device, settings.patch_size
        )
        rule = run_postprocessing(trained.folder, trained.folds) if settings.postprocessing else None
        return cls(
            trained.spec,
            trained.plan,
            trained.models,
            trained.inference_tile,
            settings,
            trained.info,
            rule,
            trained.tile_source,
        )

    # ------------------------------------------------------------------------------- modality subsets

    def present_modalities(self, modalities: Iterable[str] | None = None) -> tuple[str, ...]:
        """The given modalities in the spec's channel order (all when None), validated."""
        names = self.spec.modality_names
        if modalities is None:
            return names
        given = [str(m) for m in modalities]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ParameterError(
                "modalities", f"unknown {', '.join(unknown)}; task {self.spec.name} has {', '.join(names)}"
            )
        if not given:
            raise ParameterError("modalities", f"name at least one of {', '.join(names)}")
        return tuple(m for m in names if m in given)

    @property
    def network(self) -> SegmentationNetwork:
        """The run's architecture (every fold has the same)."""
        return self.models[0]

    def region_owners(self) -> dict[str, tuple[str, ...]]:
        """Region -> modalities whose segmentors predict it in this run's network.

        The network's own decomposition counts (an ensemble run's segmentors own every region); networks
        on stacked modalities need all of them together.
        """
        inputs = self.network.primary_inputs
        return {
            r: tuple(dict.fromkeys(m for s in self.network.owners[r] for m in inputs[s]))
            for r in self.spec.region_names
        }

    def fallback_owners(self) -> dict[str, tuple[str, ...]]:
        """Region -> modalities whose segmentors have a fallback channel for it in this run's network."""
        inputs = self.network.primary_inputs
        return {
            r: tuple(dict.fromkeys(m for s in stand_ins for m in inputs[s]))
            for r, stand_ins in self.network.fallback_owners.items()
        }

    def unpredictable_regions(self, present: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Region -> its owners, for each region none of whose owners or fallback owners is present."""
        unpredictable = self.network.unpredictable_regions(present)
        owners = self.region_owners()
        return {r: owners[r] for r in self.spec.region_names if r in unpredictable}

    def missing_modality_error(self, present: Sequence[str]) -> CimlError | None:
        """Why this run's network cannot run on ``present`` at all (None when it can)."""
        try:
            self.network.check_present(present)
        except CimlError as exc:
            return exc
        return None

    def check(self, present: Sequence[str]) -> None:
        """Raise unless ``present`` gives a full label map (network runs on it, every region predictable)."""
        error = self.missing_modality_error(present)
        if error is not None:
            raise error
        unpredictable = self.unpredictable_regions(present)
        if not unpredictable:
            return
        missing = [m for m in self.spec.modality_names if m not in present]
        fallback = self.fallback_owners()
        details = "; ".join(
            f"{r} (owners {', '.join(o)}"
            + (f"; fallback owners {', '.join(fallback[r])}" if r in fallback else "")
            + ": all missing)"
            for r, o in unpredictable.items()
        )
        raise ParameterError(
            "modalities",
            f"without {', '.join(missing)} these regions are not predictable: {details}. ciml does not "
            "invent masks; choose {modalities} that include an owner (or fallback owner) of every region, or "
            "run a robustness sweep to score the regions that are predictable.",
        )

    # ------------------------------------------------------------------------------------ prediction

    def probabilities(
        self, image: np.ndarray, present: Iterable[str] | None = None, *, partial: bool = False
    ) -> np.ndarray:
        """Fold-averaged region probabilities ``[R, *spatial]`` (float32) of a preprocessed image.

        Args:
            image: ``[M, *spatial]`` on the plan's grid; channels of absent modalities are ignored (zeroed).
            present: available modalities (default: all).
            partial: allow unpredictable regions and return them as NaN (``ciml robustness``); otherwise
                they raise, as does a network that cannot run on ``present``.
        """
        present = self.present_modalities(present)
        if partial:
            error = self.missing_modality_error(present)
            if error is not None:
                raise error
        else:
            self.check(present)
        return self.checked_probabilities(image, present)

    def checked_probabilities(self, image: np.ndarray, present: Sequence[str]) -> np.ndarray:
        """:meth:`probabilities` for ``present`` already validated (spec order) and checked."""
        unpredictable = self.unpredictable_regions(present)
        regions = [r for r in self.spec.region_names if r not in unpredictable]
        out = np.full((len(self.spec.region_names), *image.shape[1:]), np.nan, dtype=np.float32)
        if not regions:
            return out
        x = torch.from_numpy(np.array(image, dtype=np.float32, copy=True))[None]
        for i, m in enumerate(self.spec.modality_names):
            if m not in present:
                x[:, i] = 0.0  # never seen by a CIML network (its encoder is skipped); zeros make that plain
        x = x.to(self.device)
        full = len(present) == len(self.spec.modality_names)
        total = None
        for model in self.models:
            p = sliding_window_probabilities(
                model,
                x,
                regions,
                self.patch_size,
                present=None if full else present,
                step=self.settings.step,
                tta=self.settings.tta,
                device=self.device,
                sw_batch_size=self.settings.sw_batch_size,
            )
            total = p if total is None else total + p
        mean = (total / len(self.models))[0].cpu().numpy()
        index = [self.spec.region_names.index(r) for r in regions]
        out[index] = mean
        return out


def run_postprocessing(folder: RunFolder, folds: Sequence[int]) -> Postprocessing:
    """The postprocessing of the ensembled ``folds``: theirs when they agree, else the first fold's (noted).

    A fold without ``postprocessing.json`` (trained before it was written) counts as no postprocessing.
    """
    rules = {fold: folder.read_postprocessing(fold) or Postprocessing() for fold in folds}
    first = rules[folds[0]]
    if any(not rule.same_as(first) for rule in rules.values()):
        chosen = "; ".join(f"fold {f}: {r.describe()}" for f, r in rules.items())
        print(
            f"note: the folds chose different postprocessing ({chosen}); applying fold {folds[0]}'s",
            flush=True,
        )
    return first


# ------------------------------------------------------------------------------------------ per case


def output_paths(output_dir: str | Path, case_id: str) -> tuple[Path, Path]:
    """``<case_id>.nii.gz`` and ``<case_id>_probabilities.nii.gz`` in ``output_dir``."""
    if not case_id or Path(case_id).name != case_id or case_id.startswith("."):
        raise CimlError(f"case id {case_id!r} cannot name an output file")
    folder = Path(output_dir)
    return folder / f"{case_id}{LABEL_SUFFIX}", folder / f"{case_id}{PROBABILITIES_SUFFIX}"


def modalities_path(output_dir: str | Path, case_id: str) -> Path:
    """``<case_id>_modalities.json``: which modalities predicted the case (``allow_missing`` runs)."""
    return output_paths(output_dir, case_id)[0].with_name(f"{case_id}{MODALITIES_SUFFIX}")


def available_modalities(case: Case, wanted: Sequence[str]) -> tuple[str, ...]:
    """The modalities of ``wanted`` whose file (or DICOM folder) exists for ``case``, in ``wanted`` order."""
    return tuple(m for m in wanted if m in case.images and Path(case.images[m]).exists())


def _missing_files_error(
    predictor: Predictor,
    cases: Sequence[Case],
    present: Sequence[str],
    available: Mapping[str, Sequence[str]],
) -> ParameterError:
    """One line: the missing files, then the ``modalities`` every case has (if it predicts every region)."""
    lacking = [(c, [m for m in present if m not in available[c.case_id]]) for c in cases]
    lacking = [(c, ms) for c, ms in lacking if ms]
    files = [f"{c.images[m]}" if m in c.images else f"{c.case_id}: {m}" for c, ms in lacking for m in ms]
    listed = ", ".join(files[:_LISTED_MISSING]) + (
        f" and {len(files) - _LISTED_MISSING} more" if len(files) > _LISTED_MISSING else ""
    )
    common = [m for m in present if all(m in available[c.case_id] for c in cases)]
    usable = bool(common) and predictor.missing_modality_error(common) is None
    usable = usable and not predictor.unpredictable_regions(common)
    advice = (
        f"predict every case without them with {{modalities}} {','.join(common)}, or each case from the "
        "modalities it has with {allow_missing}"
        if usable
        else "no one {modalities} fits every case; predict each case from the modalities it has "
        "with {allow_missing}"
    )
    return ParameterError(
        "modalities",
        f"{len(lacking)} of {len(cases)} case(s) lack modality files ({len(files)} missing: {listed}); "
        + advice,
    )


@dataclass(frozen=True)
class _Writing:
    """What prediction writes for every case, and where callers act (one value instead of five arguments)."""

    output_dir: Path
    save_probabilities: bool = False
    overwrite: bool = False
    record_modalities: bool = False
    callbacks: PredictionCallbacks | None = None


def _restricted(case: Case, present: Sequence[str]) -> Case:
    """The case with only the present modalities' files and no label (prediction reads nothing else)."""
    lacking = [m for m in present if m not in case.images]
    if lacking:
        raise ParameterError(
            "modalities",
            f"case {case.case_id} has no file for {', '.join(lacking)} "
            f"(has {', '.join(case.images) or 'none'}); leave it out of the modalities",
        )
    return dataclasses.replace(case, images={m: case.images[m] for m in present}, label=None)


def predict_case(
    predictor: Predictor,
    case: Case,
    output_dir: str | Path,
    *,
    modalities: Iterable[str] | None = None,
    save_probabilities: bool = False,
    overwrite: bool = False,
    record_modalities: bool = False,
    callbacks: PredictionCallbacks | None = None,
) -> CaseResult:
    """Predict one case and write ``<case_id>.nii.gz`` (and its probabilities) into ``output_dir``.

    Outputs that exist are kept unless ``overwrite``; a case whose outputs all exist is skipped. The label
    map is written last, so its presence marks a finished case. ``record_modalities`` also writes
    ``<case_id>_modalities.json`` (the modalities used and those missing) before the label map.

    Raises:
        CimlError: unreadable inputs, a modality subset the run cannot predict every region from, or a
            case id that cannot name a file.
    """
    present = predictor.present_modalities(modalities)
    predictor.check(present)
    writing = _Writing(Path(output_dir), save_probabilities, overwrite, record_modalities, callbacks)
    return _predict_checked(predictor, case, present, writing)


def _predict_checked(
    predictor: Predictor, case: Case, present: Sequence[str], writing: _Writing
) -> CaseResult:
    """:func:`predict_case` for a modality subset already checked against the run."""
    start = time.perf_counter()
    spec = predictor.spec
    label_path, probabilities_path = output_paths(writing.output_dir, case.case_id)
    sidecar = modalities_path(writing.output_dir, case.case_id)
    wanted = [label_path] + ([probabilities_path] if writing.save_probabilities else [])
    wanted += [sidecar] if writing.record_modalities else []
    todo = [p for p in wanted if writing.overwrite or not p.exists()]
    if not todo:
        return CaseResult(case.case_id, tuple(wanted), 0.0, skipped=True)
    pre = preprocess_case(
        _restricted(case, present), spec, predictor.plan, allow_missing=len(present) < len(spec.modalities)
    )
    probabilities = invert_to_original(
        predictor.checked_probabilities(pre.image, present), pre.meta, mode="linear"
    )
    reference = reference_nifti(case.images[pre.meta["reference_modality"]])
    affine = np.asarray(pre.meta["original_affine"], dtype=np.float64)
    spacing = pre.meta["original_spacing"]
    del pre
    if probabilities_path in todo:
        write_probabilities(probabilities, probabilities_path, affine, reference)
    rule = predictor.postprocessing
    if sidecar in todo:
        missing = [m for m in spec.modality_names if m not in present]
        record = {"case_id": case.case_id, "modalities": list(present), "missing": missing}
        record["tile"] = {"size": list(predictor.patch_size), "source": predictor.tile_source}
        write_json_atomic(sidecar, record | ({} if rule.is_identity else {"postprocessing": rule.to_dict()}))
    if writing.callbacks and writing.callbacks.before_label:
        writing.callbacks.before_label(case.case_id)
    if label_path in todo:
        masks = rule.apply(probabilities > REGION_THRESHOLD, spec, spacing=spacing)
        write_label_map(spec.regions_to_labels(masks), label_path, affine, reference)
    return CaseResult(case.case_id, tuple(wanted), time.perf_counter() - start)


def predict_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    output_dir: str | Path,
    *,
    modalities: Iterable[str] | None = None,
    save_probabilities: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing: bool = False,
    callbacks: PredictionCallbacks | None = None,
) -> list[CaseResult]:
    """Predict every case into ``output_dir`` (created if needed), printing each case's time.

    Args:
        modalities: predict from these (default: all the task's).
        allow_missing: predict each case from those of ``modalities`` whose files it has, and record them
            in ``<case_id>_modalities.json``; otherwise a missing file stops everything before the first
            case, naming the ``modalities`` that every case has.
        callbacks: see :class:`PredictionCallbacks`.

    Raises:
        CimlError: before any case is predicted: missing files (without ``allow_missing``), a case with
            none of the modalities, or a subset the run cannot predict every region from.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ParameterError("output_dir", f"{output_dir} exists and is not a folder")
    present = predictor.present_modalities(modalities)
    for case in cases:
        output_paths(output_dir, case.case_id)
    subsets = _case_subsets(predictor, cases, present, allow_missing)  # fail before the first case
    writing = _Writing(output_dir, save_probabilities, overwrite, allow_missing, callbacks)
    with folder_lock(output_dir):
        return _predict_locked(predictor, cases, subsets, writing, progress)


def _case_subsets(
    predictor: Predictor, cases: Sequence[Case], present: Sequence[str], allow_missing: bool
) -> dict[str, tuple[str, ...]]:
    """Each case's modalities: ``present`` for all, or (``allow_missing``) those it has files for, checked."""
    available = {c.case_id: available_modalities(c, present) for c in cases}
    if not allow_missing:
        predictor.check(present)
        if any(len(a) < len(present) for a in available.values()):
            raise _missing_files_error(predictor, cases, present, available)
        return {c.case_id: tuple(present) for c in cases}
    for case in cases:
        if not available[case.case_id]:
            raise CimlError(f"case {case.case_id}: none of {', '.join(present)} has a file")
        try:
            predictor.check(available[case.case_id])
        except ParameterError as exc:
            raise ParameterError(exc.parameter, f"case {case.case_id}: {exc.problem}") from None
        except CimlError as exc:
            raise CimlError(f"case {case.case_id}: {exc}") from None
    return available


def _predict_locked(
    predictor: Predictor,
    cases: Sequence[Case],
    subsets: Mapping[str, Sequence[str]],
    writing: _Writing,
    progress: bool,
) -> list[CaseResult]:
    """The loop of :func:`predict_cases`, run while holding the output folder's lock."""
    results = []
    bar = tqdm(cases, desc="predict", unit="case", disable=not progress)
    if progress:
        bar.write(f"tile {tile_text(predictor.patch_size)} ({predictor.tile_source})")
    if progress and not predictor.postprocessing.is_identity:
        bar.write(
            f"postprocessing (chosen on the run's validation folds): {predictor.postprocessing.describe()}"
        )
    for case in bar:
        result = _predict_checked(predictor, case, subsets[case.case_id], writing)
        results.append(result)
        if writing.callbacks and writing.callbacks.after_case and not result.skipped:
            writing.callbacks.after_case(result)
        if progress:
            done = (
                "skipped (outputs exist; --overwrite replaces them)"
                if result.skipped
                else f"{result.seconds:.1f} s"
            )
            used = f" from {'+'.join(subsets[case.case_id])}" if writing.record_modalities else ""
            bar.write(f"{case.case_id}: {done}{used}")
    return results


def predict_folder(
    run: RunFolder | str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    layout: str = "auto",
    settings: InferenceSettings | None = None,
    modalities: Iterable[str] | None = None,
    save_probabilities: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing: bool = False,
    callbacks: PredictionCallbacks | None = None,
    channels: Mapping[str, int] | None = None,
) -> list[CaseResult]:
    """Predict every case of a dataset folder (or CSV list) in any supported layout.

    Args:
        run: the run folder (``run.json`` and ``fold_K/checkpoint_*.pt``).
        input_path: cases in a layout :func:`~ciml.data.layouts.read_dataset` reads; labels are ignored.
        output_dir: where ``<case_id>.nii.gz`` (and ``<case_id>_probabilities.nii.gz``) go.
        layout: the input's layout, or ``auto``.
        settings: checkpoint, folds, TTA, step, device.
        modalities: predict from this subset only (their files alone are read); default: all.
        save_probabilities: also write float32 region probabilities ``[X, Y, Z, R]``.
        overwrite: replace existing outputs (default: keep them and skip finished cases).
        progress: progress bar and per-case times.
        allow_missing: predict each case from the modalities whose files it has (see
            :func:`predict_cases`).
        callbacks: see :class:`PredictionCallbacks`.
        channels: modality -> channel id of an nnU-Net/MSD input whose channel names do not say it;
            default: the mapping the run was trained with, if any.
    """
    predictor = Predictor.from_run(run, settings)
    if channels is None and (layout if layout != "auto" else detect_layout(input_path)) in CHANNEL_LAYOUTS:
        channels = predictor.run_info.get("train", {}).get("channels")
    cases = read_dataset(input_path, predictor.spec, layout, channels=channels)
    return predict_cases(
        predictor,
        cases,
        output_dir,
        modalities=modalities,
        save_probabilities=save_probabilities,
        overwrite=overwrite,
        progress=progress,
        allow_missing=allow_missing,
        callbacks=callbacks,
    )


def predict_files(
    run: RunFolder | str | Path,
    files: Mapping[str, str | Path],
    output_dir: str | Path,
    *,
    case_id: str | None = None,
    settings: InferenceSettings | None = None,
    modalities: Iterable[str] | None = None,
    save_probabilities: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing: bool = False,
) -> CaseResult:
    """Predict one case given as modality -> file; modalities without a file are treated as missing.

    Args:
        case_id: names the output (default: the first file's name without its extension).
        modalities: default: those that have a file.
    """
    predictor = Predictor.from_run(run, settings)
    spec = predictor.spec
    unknown = sorted(set(files) - set(spec.modality_names))
    if unknown or not files:
        raise ParameterError(
            "files",
            f"unknown modality {', '.join(unknown) or '(none given)'}; "
            f"task {spec.name} has {', '.join(spec.modality_names)}",
        )
    images = {m: Path(files[m]) for m in spec.modality_names if m in files}
    case = Case(case_id or strip_image_suffix(next(iter(images.values()))), images)
    chosen = list(images) if modalities is None else modalities
    return predict_cases(
        predictor,
        [case],
        output_dir,
        modalities=chosen,
        save_probabilities=save_probabilities,
        overwrite=overwrite,
        progress=progress,
        allow_missing=allow_missing,
    )[0]
