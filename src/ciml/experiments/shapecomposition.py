"""The ShapeComposition verification experiment: CIML against its baselines at equal budget.

Every method trains on the same on-the-fly batches (same seeds, iterations, batch size, optimizer) and
is scored on the same held-out samples: Dice of the composite target, the Dice of each unimodal
segmentor (the ensemble's members, each trained on one modality alone), and for CIML variants the
*selectivity* of every message into the composite owner (mean KL inside shapes only the sender shows /
inside shapes both show) and the *silence* of messages into self-sufficient segmentors.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ciml.data.shapecomposition import SelectivityMeter, composite_dice, make_batch, validate_spec
from ciml.errors import CimlError
from ciml.files import atomic_path, write_json_atomic
from ciml.losses import DEFAULT_BETA
from ciml.models import build_model
from ciml.tasks import REGION_THRESHOLD, TaskSpec, load_task
from ciml.training import Batch, TrainConfig, Trainer

COMPOSITE = "composite"
DEMO_METHODS = ("ciml", "ciml-beta0", "joint", "ensemble")


@dataclass
class ShapeExperimentConfig:
    """Settings shared by every method of one experiment (equal budget).

    The defaults are the demo's: 2D 64x64, widths 8/16/32, 600 steps of batch 16 (DESIGN section 9).
    ``beta`` = 1e-3 was chosen by ``benchmarks/beta_sweep.py`` (see benchmarks/results/).
    """

    task: str = "shapecomposition"
    size: tuple[int, ...] = (64, 64)
    widths: tuple[int, ...] = (8, 16, 32)
    batch_size: int = 16
    iterations: int = 600
    lr: float = 3e-3
    beta: float = DEFAULT_BETA
    seed: int = 0
    validation_samples: int = 256
    methods: tuple[str, ...] = DEMO_METHODS
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodResult:
    """Scores of one trained method on the held-out samples."""

    method: str
    composite_dice: float
    region_dice: dict[str, float]
    train_seconds: float
    parameters: int
    unimodal_dice: dict[str, float] = field(default_factory=dict)
    selectivity: dict[str, dict[str, float]] = field(default_factory=dict)
    silence: dict[str, float] = field(default_factory=dict)


def _batch(spec: TaskSpec, seed: Sequence[int], config: ShapeExperimentConfig) -> dict[str, torch.Tensor]:
    return make_batch(spec, np.random.default_rng(list(seed)), config.batch_size, config.size)


def training_stream(spec: TaskSpec, config: ShapeExperimentConfig) -> Callable[[int], Batch]:
    """Batch of iteration ``i``: a fixed function of (seed, i), identical for every method."""

    def batch_at(iteration: int) -> Batch:
        data = _batch(spec, (config.seed, 0, iteration), config)
        return Batch(data["image"], data["regions"])

    return batch_at


def validation_set(spec: TaskSpec, config: ShapeExperimentConfig) -> list[dict[str, torch.Tensor]]:
    """Held-out batches, drawn from a seed stream the training batches never use."""
    count = -(-config.validation_samples // config.batch_size)
    return [_batch(spec, (config.seed, 1, i), config) for i in range(count)]


def train_method(
    method: str, spec: TaskSpec, config: ShapeExperimentConfig, progress: bool = True
) -> tuple[nn.Module, Trainer]:
    """Build and train one method with the experiment's shared budget."""
    torch.manual_seed(config.seed)
    model = build_model(method, spec, widths=config.widths, spatial_dims=len(config.size))
    train_config = TrainConfig(
        iterations=config.iterations,
        lr=config.lr,
        beta=config.beta,
        seed=config.seed,
        region_names=list(spec.region_names),
        device=config.device,
    )
    trainer = Trainer(model, train_config, training_stream(spec, config))
    trainer.fit(progress=progress, desc=f"{method:>10s}")
    return model.cpu().eval(), trainer


def _information_into(output, receiver: str, sender: str, size: Sequence[int]) -> torch.Tensor:
    """KL map of receiver <- sender summed over levels, at full resolution [B, *size]."""
    total = torch.zeros(())
    for key, kl_map in output.kl_maps.items():
        if key.split("/", 1)[1] == f"{receiver}<-{sender}":
            total = total + F.interpolate(kl_map, size=tuple(size), mode="nearest")[:, 0]
    return total


@torch.no_grad()
def evaluate_method(
    method: str, model: nn.Module, spec: TaskSpec, batches: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """Composite and region Dice; unimodal Dice of ensemble members; selectivity and silence of gates."""
    regions = list(spec.region_names)
    composite_index = regions.index(COMPOSITE)
    modalities = list(spec.modality_names)
    gated = bool(model.message_levels)
    dice: dict[str, list[np.ndarray]] = {r: [] for r in regions}
    unimodal: dict[str, list[np.ndarray]] = {}
    receivers = spec.owners(COMPOSITE)
    meters = {
        (r, s): SelectivityMeter(modalities.index(r), modalities.index(s))
        for r in receivers
        for s in modalities
        if s != r
    }
    silence: dict[str, list[float]] = {}
    for batch in batches:
        output = model(batch["image"], return_maps=gated)
        predicted = (output.region_probabilities(regions) > REGION_THRESHOLD).numpy()
        target = batch["regions"].bool().numpy()
        for i, region in enumerate(regions):
            dice[region].append(composite_dice(predicted[:, i], target[:, i]))
        if model.is_ensemble:
            for segmentor, logits in output.logits.items():
                member = (logits[:, output.owned[segmentor].index(COMPOSITE)] > 0).numpy()
                unimodal.setdefault(segmentor, []).append(composite_dice(member, target[:, composite_index]))
        if gated:
            size = batch["image"].shape[2:]
            for (receiver, sender), meter in meters.items():
                meter.update(_information_into(output, receiver, sender, size), batch["visibility"])
            for receiver in set(model.segmentors) - set(receivers):
                for sender in modalities:
                    if sender != receiver:
                        info = _information_into(output, receiver, sender, size)
                        silence.setdefault(f"{receiver}<-{sender}", []).append(float(info.mean()))
    result: dict[str, Any] = {
        "composite_dice": float(np.concatenate(dice[COMPOSITE]).mean()),
        "region_dice": {r: float(np.concatenate(v).mean()) for r, v in dice.items()},
        "unimodal_dice": {m: float(np.concatenate(v).mean()) for m, v in unimodal.items()},
    }
    if gated:
        result["selectivity"] = {f"{r}<-{s}": meter.result() for (r, s), meter in meters.items()}
        result["silence"] = {k: float(np.mean(v)) for k, v in silence.items()}
    return result


def _train_and_score(
    method: str, config: ShapeExperimentConfig, progress: bool, threads: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One method, start to end: its scores and trained weights (picklable, for worker processes)."""
    if threads:
        torch.set_num_threads(threads)
    spec = load_task(config.task)
    started = time.perf_counter()
    model, _ = train_method(method, spec, config, progress=progress)
    seconds = time.perf_counter() - started
    scores = evaluate_method(method, model, spec, validation_set(spec, config))
    result = MethodResult(
        method=method,
        train_seconds=round(seconds, 1),
        parameters=sum(p.numel() for p in model.parameters()),
        **scores,
    )
    return asdict(result), model.state_dict()


def run_experiment(
    config: ShapeExperimentConfig, progress: bool = True, log: Callable[[str], None] = print, jobs: int = 1
) -> dict[str, Any]:
    """Train and evaluate every method of ``config``; returns a JSON-ready results dict.

    With ``jobs`` > 1 the methods train in that many worker processes (one torch thread each): the
    results are the same, the wall time shorter on a multi-core machine.
    """
    spec = load_task(config.task)
    validate_spec(spec)
    if len(config.size) not in (2, 3):
        raise CimlError(f"size must have 2 or 3 entries, got {config.size}")
    if jobs > 1:
        arguments = [(method, config, False, 1) for method in config.methods]
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            outcomes = pool.starmap(_train_and_score, arguments)
    else:
        outcomes = [_train_and_score(method, config, progress) for method in config.methods]
    results: dict[str, Any] = {"config": asdict(config), "task": spec.to_dict(), "methods": {}}
    models: dict[str, nn.Module] = {}
    for method, (result, weights) in zip(config.methods, outcomes, strict=True):
        model = build_model(method, spec, widths=config.widths, spatial_dims=len(config.size))
        model.load_state_dict(weights)
        results["methods"][method] = result
        models[method] = model.eval()
        log(f"{method:>12s}: composite Dice {result['composite_dice']:.4f} ({result['train_seconds']:.0f} s)")
    results["_models"] = models
    results["_validation"] = validation_set(spec, config)
    return results


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` as JSON atomically (keys starting with '_' are in-memory only and skipped)."""
    write_json_atomic(path, {k: v for k, v in data.items() if not k.startswith("_")})


def results_table(results: dict[str, Any]) -> str:
    """Markdown table: Dice per method (and per unimodal segmentor), selectivity and silence of gates."""
    lines = [
        "| method | composite Dice | other regions Dice | selectivity (specific/redundant) | "
        "specific/background | silence (nats/voxel) | params | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results["methods"].items():
        others = ", ".join(f"{k} {v:.3f}" for k, v in r["region_dice"].items() if k != COMPOSITE) or "-"
        selectivity = "; ".join(f"{k}: {v['selectivity']:.1f}" for k, v in r["selectivity"].items()) or "-"
        background = (
            "; ".join(f"{k}: {v['specific_over_background']:.1f}" for k, v in r["selectivity"].items()) or "-"
        )
        silence = "; ".join(f"{k}: {v:.3g}" for k, v in r["silence"].items()) or "-"
        lines.append(
            f"| {method} | {r['composite_dice']:.4f} | {others} | {selectivity} | {background} | {silence} | "
            f"{r['parameters']:,} | {r['train_seconds']:.0f} |"
        )
        for modality, dice in r["unimodal_dice"].items():
            lines.append(f"| unimodal {modality} (ensemble member) | {dice:.4f} | - | - | - | - | - | - |")
    return "\n".join(lines)


def plot_examples(results: dict[str, Any], path: Path, samples: int = 3) -> None:
    """Figure: inputs, target, each method's composite prediction and CIML's information maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = TaskSpec.from_dict(results["task"])
    batch = results["_validation"][0]
    models = results["_models"]
    composite = list(spec.region_names).index(COMPOSITE)
    receiver = spec.owners(COMPOSITE)[0]
    senders = [m for m in spec.modality_names if m != receiver]
    image = batch["image"][:samples]
    columns: list[tuple[str, np.ndarray, str]] = [
        (f"input {m}", image[:, i].numpy(), "gray") for i, m in enumerate(spec.modality_names)
    ]
    columns.append(("target composite", batch["regions"][:samples, composite].numpy(), "magma"))
    info_maps = []
    with torch.no_grad():
        for method, model in models.items():
            output = model(image, return_maps=bool(model.message_levels))
            probabilities = output.region_probabilities(spec.region_names)[:, composite].numpy()
            columns.append((method, probabilities > REGION_THRESHOLD, "magma"))
            if model.message_levels and not info_maps:  # the first gated method's information
                size = image.shape[2:]
                for sender in senders:
                    info = _information_into(output, receiver, sender, size).numpy()
                    info_maps.append((f"{method} info {receiver}<-{sender}\n(nats/voxel)", info, "viridis"))
    columns += info_maps
    figure, axes = plt.subplots(
        samples, len(columns), figsize=(1.9 * len(columns), 2.0 * samples), squeeze=False
    )
    for col, (title, data, cmap) in enumerate(columns):
        for row in range(samples):
            ax = axes[row, col]
            ax.imshow(_middle_slice(data[row]), cmap=cmap, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)


def _middle_slice(volume: np.ndarray) -> np.ndarray:
    return volume if volume.ndim == 2 else volume[..., volume.shape[-1] // 2]
