"""Training on real volumes: dataset -> integrity check -> splits -> preprocessing cache -> patches -> run.

`train(settings)` is what `ciml train` runs. It writes a run folder (:mod:`ciml.runs.folder`) with a
5-fold patient-level split, the preprocessing plan, and per fold the last and best checkpoints, a
JSONL log of every loss term and validation, ``progress.png``, and ``postprocessing.json``: the
postprocessing chosen on the final validation's masks with the comparison behind it
(:mod:`ciml.training.postprocessing`; prediction applies it). Runs resume exactly (`resume=True`) and
scale over GPUs or nodes with PyTorch DDP launched by ``torchrun``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ciml import __version__
from ciml.data.augmentation import Augmentation, augmentation_config
from ciml.data.cases import Case
from ciml.data.integrity import ensure_dataset_ok
from ciml.data.layouts import read_dataset, resolve_task
from ciml.data.preprocessing import PreprocessedCache, PreprocessedCase, PreprocessingPlan, plan_preprocessing
from ciml.data.sampling import sample_patches
from ciml.devices import resolve_device
from ciml.errors import CimlError, ParameterError
from ciml.files import write_json_atomic
from ciml.inferers import Postprocessing, sliding_window_probabilities
from ciml.locks import folder_lock
from ciml.metrics import dice
from ciml.models import MissingModalities, SegmentationNetwork, build_model
from ciml.runs import RunFolder
from ciml.runs.log import RunLogger
from ciml.tasks import REGION_THRESHOLD, TaskSpec
from ciml.training.loading import BackgroundBatches, default_workers
from ciml.training.loop import Batch, StepCallback, TrainConfig, Trainer
from ciml.training.memory import GIB
from ciml.training.planning import TrainingPlan, plan_training
from ciml.training.postprocessing import ValidationMasks, choose_postprocessing, mean_dice
from ciml.training.tiles import choose_tile, tile_candidates

CPU_DEFAULTS = {"patch_size": (64, 64, 64), "batch_size": 2, "widths": (16, 32, 64, 128)}
GPU_DEFAULTS = {"patch_size": (128, 128, 128), "batch_size": 2, "widths": (32, 64, 128, 256, 320)}


@dataclass(frozen=True)
class TrainSettings:
    """Everything `ciml train` takes, with the one set of defaults (the loop's own come from TrainConfig).

    Unset sizes (None) fall back to the task's and then the device's defaults when the settings are
    resolved (:func:`resolve_settings`), which returns new settings and never changes these.

    ``augment`` selects the augmentation ("default", "none", names such as "default,elastic"; None: the
    task spec's ``training.augmentation``, else the default) and ``augment_probability`` overrides
    probabilities of selected transforms, as (name, p) pairs (:mod:`ciml.data.augmentation`).
    ``workers`` is the number of background loader processes (0: batches are made in the training
    process; None: :func:`~ciml.training.loading.default_workers`). ``deep_supervision`` trains with
    nnU-Net's weighted multi-scale loss (auxiliary decoder heads; off by default, refused by models
    without it, e.g. segresnet). ``choose_tile`` scores the final validation with the training patch and
    twice it and stores the better tile for prediction (:mod:`ciml.training.tiles`; off: prediction uses
    the training patch, as nnU-Net). ``memory_format`` is the layout the network trains in (``auto``:
    channels_last_3d for 3D networks on a CPU, :func:`~ciml.devices.resolve_memory_format`).
    ``gpu_memory`` is the device memory in GiB to plan widths, patch and batch for (None: the CUDA
    device's total memory; on a CPU no planning). ``plan`` is set by :func:`resolve_settings` when it
    planned (:mod:`ciml.training.planning`), never by the caller.
    """

    task: str | None
    data: Path
    out: Path
    model: str = "ciml"
    fold: int = 0
    folds: int = 5
    iterations: int | None = None
    epochs: int | None = None
    iterations_per_epoch: int = 250
    patch_size: tuple[int, ...] | None = None
    validation_patch: tuple[int, ...] | None = None
    batch_size: int | None = None
    widths: tuple[int, ...] | None = None
    target_spacing: tuple[float, ...] | None = None
    beta: float = TrainConfig.beta
    lr: float = TrainConfig.lr
    optimizer: str = TrainConfig.optimizer
    seed: int = TrainConfig.seed
    device: str = TrainConfig.device
    layout: str = "auto"
    modality_dropout: float = 0.0
    foreground_fraction: float = 1 / 3
    augment: str | None = None
    augment_probability: tuple[tuple[str, float], ...] = ()
    workers: int | None = None
    validate_every: int | None = None
    max_validation_cases: int | None = None
    amp: bool = TrainConfig.amp
    compile: bool = TrainConfig.compile
    memory_format: str = TrainConfig.memory_format
    checkpoint_activations: bool = False
    deep_supervision: bool = False
    choose_tile: bool = True
    resume: bool = False
    tensorboard: bool = False
    progress: bool = True
    channels: dict[str, int] | None = None
    gpu_memory: float | None = None
    plan: TrainingPlan | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- splits
def make_splits(cases: Sequence[Case], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net-style k-fold split by patient: studies of one patient never straddle train and val."""
    patients = sorted({c.patient for c in cases})
    if len(patients) < 2:
        raise CimlError(f"need cases from at least 2 patients to split into train/val, found {len(patients)}")
    folds = min(folds, len(patients))
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[i]: rank % folds for rank, i in enumerate(order)}
    return [
        {
            "train": sorted(c.case_id for c in cases if fold_of[c.patient] != k),
            "val": sorted(c.case_id for c in cases if fold_of[c.patient] == k),
        }
        for k in range(folds)
    ]


def _load_or_make_splits(
    run: RunFolder, cases: Sequence[Case], settings: TrainSettings
) -> dict[str, list[str]]:
    if run.splits_path.is_file():
        splits = json.loads(run.splits_path.read_text(encoding="utf-8"))
    else:
        splits = make_splits(cases, settings.folds, settings.seed)
        if _is_main():
            write_json_atomic(run.splits_path, splits)
    if not 0 <= settings.fold < len(splits):
        raise ParameterError("fold", f"{settings.fold} not in {run.splits_path} (folds 0..{len(splits) - 1})")
    split = splits[settings.fold]
    known = {c.case_id for c in cases}
    unknown = sorted((set(split["train"]) | set(split["val"])) - known)
    if unknown:
        raise CimlError(
            f"{run.splits_path}: fold {settings.fold} names cases not in the dataset: {unknown[:5]}"
        )
    return split


# ------------------------------------------------------------------------------------ distributed
def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when launched by it; returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------------------------------- batches
class PatchStream:
    """Training batches from preprocessed cases: the batch of an iteration is a function of (seed, it, rank).

    With ``modality_dropout`` > 0 a batch may hide a random proper subset of modalities: CIML skips
    those segmentors (``Batch.present``); stacked-channel models see those channels zeroed instead.
    """

    def __init__(
        self,
        cases: list[PreprocessedCase],
        spec: TaskSpec,
        settings: TrainSettings,
        rank: int,
        missing_modalities: MissingModalities,
    ) -> None:
        self.pairs = [(c.image, c.regions(spec)) for c in cases]
        self.spec, self.settings, self.rank = spec, settings, rank
        self.skips_segmentors = missing_modalities is MissingModalities.SKIP_SEGMENTOR
        self.augment = Augmentation(_augmentation(settings, spec), spatial_dims=len(settings.patch_size))

    def __call__(self, iteration: int) -> Batch:
        rng = np.random.default_rng([self.settings.seed, iteration, self.rank])
        image, target = sample_patches(
            self.pairs,
            self.settings.patch_size,
            self.settings.batch_size,
            rng,
            foreground_fraction=self.settings.foreground_fraction,
            augment=self.augment,
        )
        image_t, target_t = (
            torch.from_numpy(np.ascontiguousarray(image)),
            torch.from_numpy(target.astype(np.float32)),
        )
        present = self._dropout(rng)
        if present is not None and not self.skips_segmentors:
            missing = [i for i, m in enumerate(self.spec.modality_names) if m not in present]
            image_t[:, missing] = 0.0
            present = None
        return Batch(image_t, target_t, present)

    def _dropout(self, rng: np.random.Generator) -> tuple[str, ...] | None:
        modalities = self.spec.modality_names
        if (
            self.settings.modality_dropout <= 0
            or len(modalities) < 2
            or rng.random() >= self.settings.modality_dropout
        ):
            return None
        keep = int(rng.integers(1, len(modalities)))
        return tuple(sorted(rng.choice(modalities, size=keep, replace=False), key=modalities.index))


# ------------------------------------------------------------------------------------- validation
def validation_dice(
    model: torch.nn.Module,
    cases: list[PreprocessedCase],
    spec: TaskSpec,
    patch_size: Sequence[int],
    device: torch.device,
    keep: list[ValidationMasks] | None = None,
) -> dict[str, float]:
    """Mean Dice per region over whole validation cases with Gaussian sliding-window inference.

    ``keep``, when given, is emptied and then holds every case's thresholded and reference masks (cropped):
    the final validation's are what postprocessing is chosen on, with no second inference pass.
    """
    regions = spec.region_names
    scores: dict[str, list[float]] = {r: [] for r in regions}
    if keep is not None:
        keep.clear()
    for case in cases:
        image = torch.from_numpy(np.array(case.image, dtype=np.float32))[None]
        probabilities = sliding_window_probabilities(model, image, regions, patch_size, device=device)
        predicted = (probabilities[0] > REGION_THRESHOLD).cpu().numpy()
        reference = case.regions(spec).astype(bool)
        for i, region in enumerate(regions):
            scores[region].append(dice(predicted[i], reference[i]))
        if keep is not None:
            keep.append(ValidationMasks.cropped(predicted, reference))
    result = {f"dice/{r}": float(np.mean(v)) for r, v in scores.items()}
    result["dice/mean"] = float(np.mean(list(result.values())))
    return result


# ----------------------------------------------------------------------------------------- train
def resolve_settings(settings: TrainSettings, spec: TaskSpec, device: torch.device) -> TrainSettings:
    """``settings`` with every unset size and schedule filled in, validated (a new value).

    On CUDA, or with ``gpu_memory`` set, the widths, patch and batch not given are planned to fit the
    device's memory (:func:`~ciml.training.planning.plan_training`; the plan is in ``plan``).

    Raises:
        CimlError: a patch size the network cannot take, or a modality dropout outside [0, 1).
        ParameterError: explicit sizes whose training step cannot fit the device's memory.
    """
    defaults = dict(CPU_DEFAULTS)
    budget = memory_budget(settings, device)
    if device.type == "cuda" or budget is not None:  # the task's sizes are GPU sizes
        defaults.update(GPU_DEFAULTS)
        defaults.update({k: tuple(v) if isinstance(v, list) else v for k, v in spec.training.items()})
    sizes = {
        key: getattr(settings, key) if getattr(settings, key) is not None else defaults.get(key)
        for key in ("patch_size", "batch_size", "widths", "target_spacing")
    }
    sizes["patch_size"] = tuple(int(p) for p in sizes["patch_size"])
    divisor = 2 ** (len(sizes["widths"]) - 1)
    if len(sizes["patch_size"]) != 3 or any(p % divisor for p in sizes["patch_size"]):
        raise ParameterError(
            "patch_size", f"{sizes['patch_size']}: need 3 sizes divisible by {divisor} (2^(levels-1))"
        )
    plan = None
    if budget is not None and settings.plan is None:
        task_widths = "widths" in spec.training  # the task's widths are a choice, as --widths is
        plan = plan_training(
            settings.model,
            spec,
            budget,
            widths=sizes["widths"] if settings.widths is not None or task_widths else None,
            patch_size=settings.patch_size,
            batch_size=settings.batch_size,
            start_patch=sizes["patch_size"],
            start_batch=sizes["batch_size"],
            dtype=torch.bfloat16 if settings.amp and device.type == "cuda" else torch.float32,
            optimizer=settings.optimizer,
            beta=settings.beta,
            checkpoint_activations=settings.checkpoint_activations,
        )
        sizes.update(widths=plan.widths, patch_size=plan.patch_size, batch_size=plan.batch_size)
    iterations = settings.iterations
    if iterations is None:
        iterations = (settings.epochs or 1000) * settings.iterations_per_epoch
    validate_every = (
        settings.iterations_per_epoch if settings.validate_every is None else settings.validate_every
    )
    if not 0.0 <= settings.modality_dropout < 1.0:
        raise ParameterError("modality_dropout", f"must be in [0, 1), got {settings.modality_dropout}")
    _augmentation(settings, spec)  # refuse a bad augmentation before any work
    workers = default_workers() if settings.workers is None else settings.workers
    if workers < 0:
        raise ParameterError("workers", f"must be 0 (load in the training process) or more, got {workers}")
    return dataclasses.replace(
        settings,
        **sizes,
        iterations=iterations,
        validate_every=validate_every,
        workers=workers,
        plan=plan or settings.plan,
    )


def memory_budget(settings: TrainSettings, device: torch.device) -> int | None:
    """Bytes to plan a step for: ``gpu_memory`` GiB, else the CUDA device's total memory (None on a CPU)."""
    if settings.gpu_memory is not None:
        if settings.gpu_memory <= 0:
            raise ParameterError("gpu_memory", f"must be a positive size in GiB, got {settings.gpu_memory}")
        return int(settings.gpu_memory * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def _augmentation(settings: TrainSettings, spec: TaskSpec) -> dict[str, dict[str, Any]]:
    """The run's augmentation (transform -> parameters), the same for every model."""
    return augmentation_config(settings.augment, settings.augment_probability, spec)


def _run_info(
    settings: TrainSettings, spec: TaskSpec, model: SegmentationNetwork, plan: PreprocessingPlan
) -> dict[str, Any]:
    """run.json: what rebuilds the network, what it declares, and the settings the run really used."""
    effective = dataclasses.replace(settings, beta=model.loss_beta(settings.beta))
    return {
        "ciml_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "task": spec.to_dict(),
        "model": model.config,
        "network": model.describe(),
        "preprocessing": plan.to_dict(),
        "patch_size": list(settings.patch_size),
        **({"plan": settings.plan.as_dict()} if settings.plan is not None else {}),
        "augmentation": _augmentation(settings, spec),
        "data": {"path": str(settings.data), "layout": settings.layout},
        "train": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                  for k, v in asdict(effective).items() if k not in ("resume", "progress", "extra", "plan")},
    }  # fmt: skip


def _check_run_folder(run: RunFolder, settings: TrainSettings) -> None:
    fold_dir = run.fold_dir(settings.fold)
    has_checkpoint = run.checkpoint(settings.fold, "last").is_file()
    if settings.resume and not has_checkpoint:
        raise ParameterError("resume", f"no checkpoint to resume from in {fold_dir}")
    if (
        not settings.resume
        and fold_dir.exists()
        and any(not p.name.startswith(".") for p in fold_dir.iterdir())
    ):
        raise ParameterError(
            "resume",
            f"{fold_dir} already holds a training run; set resume to continue it, or train elsewhere",
        )


def train(settings: TrainSettings, callbacks: Sequence[StepCallback] = ()) -> RunFolder:
    """Train one fold; returns the run folder. See the module docstring for what it writes.

    The fold's folder is locked while training (a second process gets a clear message), taken only
    after the dataset passed its integrity check, so a refused dataset leaves nothing behind.
    ``callbacks`` run after every step, after the run's own (logging, checkpoints).
    """
    rank, world, device = _init_distributed(settings.device)
    spec = resolve_task(settings.task, settings.data, settings.layout)
    run = RunFolder(settings.out)
    # bad settings (an augmentation, sizes that cannot fit the device) are refused before any work
    settings = resolve_settings(_planned_sizes(run, settings), spec, device)
    if settings.plan is not None and rank == 0:
        print(settings.plan.summary(), flush=True)
    _check_run_folder(run, settings)
    cases = read_dataset(settings.data, spec, settings.layout, channels=settings.channels)
    refuse_unlabelled(cases, settings.data)
    ensure_dataset_ok(
        cases, spec, source=settings.data, require_labels=True, progress=settings.progress and rank == 0
    )
    lock = folder_lock(run.fold_dir(settings.fold)) if rank == 0 else contextlib.nullcontext()
    with lock:
        return _train_checked(settings, spec, run, cases, rank, world, device, callbacks)


def _planned_sizes(run: RunFolder, settings: TrainSettings) -> TrainSettings:
    """``settings`` with the sizes not given taken from the run's recorded plan, if it has one.

    Folds and resumes of a planned run keep its widths, patch and batch (run.json's model and patch
    must match), on whatever device they run; the planner then only checks that they fit.
    """
    if not run.info_path.is_file():
        return settings
    plan = run.read_info().get("plan")
    if not plan:
        return settings
    recorded = {
        "widths": tuple(plan["widths"]),
        "patch_size": tuple(plan["patch_size"]),
        "batch_size": plan["batch_size"],
    }
    given = {k: v for k, v in recorded.items() if getattr(settings, k) is None}
    return dataclasses.replace(settings, **given)


def refuse_unlabelled(cases: Sequence[Case], data: Path, shown: int = 10) -> None:
    """Training needs a label for every case: name the ones without, before anything is written."""
    unlabelled = [c.case_id for c in cases if c.label is None or not Path(c.label).exists()]
    if unlabelled:
        more = f", ... ({len(unlabelled) - shown} more)" if len(unlabelled) > shown else ""
        raise CimlError(
            f"{data}: {len(unlabelled)} of {len(cases)} cases have no label file, and training needs one for "
            f"every case: {', '.join(unlabelled[:shown])}{more}. Point data at the labelled cases only "
            "(e.g. the training folder, not its validation sibling), or list them in a CSV"
        )


def _train_checked(
    settings: TrainSettings,
    spec: TaskSpec,
    run: RunFolder,
    cases: list[Case],
    rank: int,
    world: int,
    device: torch.device,
    callbacks: Sequence[StepCallback],
) -> RunFolder:
    split = _load_or_make_splits(run, cases, settings)
    by_id = {c.case_id: c for c in cases}

    torch.manual_seed(settings.seed)
    # dropped channels are zeroed in the batches of stacked-channel models: they then run zero-filled
    model = build_model(
        settings.model,
        spec,
        widths=settings.widths,
        spatial_dims=3,
        zero_fill_missing=settings.modality_dropout > 0,
        deep_supervision=settings.deep_supervision,
    )
    if settings.checkpoint_activations:
        model.checkpoint_activations = True  # networks that cannot recompute their stages refuse it
    plan = _load_or_make_plan(run, cases, spec, settings)
    cache = PreprocessedCache(run.path / "preprocessed", spec, plan)
    if rank == 0:
        cache.prepare([by_id[i] for i in split["train"] + split["val"]], progress=settings.progress)
        info = _run_info(settings, spec, model, plan)
        if run.info_path.is_file():
            _check_compatible(run, info)
        else:
            run.write_info(info)
    if world > 1:
        dist.barrier()
    train_cases = [cache.load(i) for i in split["train"]]
    val_cases = [cache.load(i) for i in split["val"]][: settings.max_validation_cases]

    config = TrainConfig(
        iterations=settings.iterations,
        optimizer=settings.optimizer,
        lr=settings.lr,
        beta=settings.beta,
        seed=settings.seed,
        validate_every=settings.validate_every,
        region_names=list(spec.region_names),
        device=str(device),
        amp=settings.amp,
        compile=settings.compile,
        memory_format=settings.memory_format,
    )
    stream = BackgroundBatches(
        PatchStream(train_cases, spec, settings, rank, model.missing_modalities),
        stop=settings.iterations,
        workers=settings.workers,
        pin_memory=device.type == "cuda",
    )

    final: list[ValidationMasks] = []  # the latest validation's masks: the final one once training ends

    def validate(network: torch.nn.Module) -> dict[str, float]:
        tile = settings.validation_patch or settings.patch_size
        return validation_dice(network, val_cases, spec, tile, device, keep=final) if val_cases else {}

    def masks_with(tile: Sequence[int]) -> list[ValidationMasks]:
        kept: list[ValidationMasks] = []
        trainer.run_validation(lambda network: validation_dice(network, val_cases, spec, tile, device, kept))
        return kept

    trainer = Trainer(model, config, stream, validate if rank == 0 else None, distributed=world > 1)
    fold_dir = run.fold_dir(settings.fold)
    logger = RunLogger(fold_dir, enabled=rank == 0, tensorboard=settings.tensorboard)
    if settings.resume:
        trainer.resume(run.checkpoint(settings.fold, "last"))
        logger.truncate_after(trainer.iteration)
    checkpoint_every = max(1, min(settings.validate_every, 50))
    steps = [logger.on_step, _checkpointer(run, settings.fold, checkpoint_every, rank), *callbacks]
    try:
        trainer.fit(
            progress=settings.progress and rank == 0,
            callbacks=steps,
            desc=f"{settings.model} fold {settings.fold}",
        )
        logger.record_rank_checksums(trainer.parameter_checksums())
        logger.plot()
        if rank == 0:
            _store_choices(run, settings, trainer, final, val_cases, masks_with, spec, plan)
    finally:
        stream.close()
        logger.close()
    if world > 1:
        dist.barrier()
    return run


def _store_choices(
    run: RunFolder,
    settings: TrainSettings,
    trainer: Trainer,
    final: list[ValidationMasks],
    val_cases: Sequence[PreprocessedCase],
    masks_with: Callable[[Sequence[int]], list[ValidationMasks]],
    spec: TaskSpec,
    plan: PreprocessingPlan,
) -> None:
    """Choose the fold's inference tile, then its postprocessing on that tile's final validation masks.

    Writes ``fold_K/tile.json`` (unless ``settings.choose_tile`` is off: prediction then uses the
    training patch) and ``fold_K/postprocessing.json``. A resumed fold that had already finished ran no
    validation in this process: its files stay (the weights did not change), or, from before they were
    written, it is validated once more.
    """
    fold, patch = settings.fold, tuple(settings.patch_size)
    wanted = [run.postprocessing_path(fold)] + ([run.tile_path(fold)] if settings.choose_tile else [])
    if val_cases and not final:
        if all(path.is_file() for path in wanted):
            return
        trainer.run_validation()  # fills ``final``
    masks = final
    if settings.choose_tile:
        validated = tuple(settings.validation_patch or patch)
        by_tile = {validated: list(final)}
        if val_cases:
            shapes = [case.image.shape[1:] for case in val_cases]
            divisor = trainer.model.size_divisor
            for tile in tile_candidates(patch, divisor, shapes, extra=[validated]):
                if tile not in by_tile:  # the final validation's tile is scored already
                    by_tile[tile] = masks_with(tile)
        clean = Postprocessing()
        dice = {tile: mean_dice(m, spec, clean) for tile, m in by_tile.items()} if val_cases else {}
        choice = choose_tile(dice, patch, len(val_cases))
        masks = by_tile.get(choice.tile, final)
        write_json_atomic(run.tile_path(fold), {**choice.to_dict(), "iteration": trainer.iteration})
    chosen = choose_postprocessing(masks, spec, plan.target_spacing)
    write_json_atomic(
        run.postprocessing_path(fold),
        {**chosen.to_dict(), "iteration": trainer.iteration, "checkpoint": "last"},
    )


def _load_or_make_plan(run: RunFolder, cases, spec: TaskSpec, settings: TrainSettings) -> PreprocessingPlan:
    """Folds of one run share one plan: the first fold plans, later folds and resumes reuse it."""
    if run.info_path.is_file():
        return PreprocessingPlan.from_dict(run.read_info()["preprocessing"], source=str(run.info_path))
    return plan_preprocessing(cases, spec, settings.target_spacing, seed=settings.seed)


def _check_compatible(run: RunFolder, info: dict[str, Any]) -> None:
    existing = run.read_info()
    for key in ("task", "model", "patch_size", "augmentation"):
        if key == "augmentation" and key not in existing:
            continue  # a run from before run.json recorded its augmentation
        if existing.get(key) != info[key]:
            raise CimlError(
                f"{run.info_path}: this run was made with another {key}; train it with the same settings "
                "or choose another output folder"
            )


def _checkpointer(run: RunFolder, fold: int, every: int, rank: int):
    """Callback writing the last checkpoint every ``every`` iterations and the best on validation Dice."""

    def on_step(trainer: Trainer, record: dict[str, float]) -> None:
        if rank != 0:
            return
        if "val/dice/mean" in record and record["val/dice/mean"] > trainer.best_metric:
            trainer.best_metric = record["val/dice/mean"]
            trainer.save(run.checkpoint(fold, "best"))
        if trainer.iteration % every == 0 or trainer.iteration == trainer.config.iterations:
            trainer.save(run.checkpoint(fold, "last"))

    return on_step
