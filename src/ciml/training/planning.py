"""Memory-aware planning of a training run's widths, patch and batch, as nnU-Net plans to a VRAM target.

:func:`plan_training` starts from the GPU defaults (the task's patch, else 128^3; batch 2; nnU-Net's
widths 32..320 for the joint U-Net, and for the networks with one segmentor per modality the widths
whose forward FLOPs equal that joint U-Net's, :func:`match_widths`), and shrinks the patch (the largest
edge first, keeping it divisible by 2^(levels-1)) and then the batch (2, then 1) until the step's
estimated peak fits the budget less a safety margin. Estimates are exact counts of one training step on
the ``meta`` device (:mod:`ciml.training.memory`) at the dtype the step will run in: activation memory
is linear in batch x voxels, so a line through one count predicts the candidates and only the predicted
fit (and, rarely, its next smaller neighbour) is counted. Explicit choices are kept; one that cannot fit
is refused with a :class:`~ciml.errors.ParameterError` naming what would fit.

Example:
    >>> plan = plan_training("joint", "brats2020", 64 * 2**20, widths=(4, 8), start_patch=(32, 32, 32))
    >>> plan.peak_bytes <= 0.9 * plan.budget_bytes, plan.widths
    (True, (4, 8))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ciml.errors import ParameterError
from ciml.losses import DEFAULT_BETA
from ciml.models import CIMLNet, build_model
from ciml.tasks import TaskSpec, load_task
from ciml.training.memory import GIB, step_memory

#: nnU-Net's 3D full-resolution widths, the joint U-Net's default on a GPU.
NNUNET_WIDTHS = (32, 64, 128, 256, 320)
DEFAULT_PATCH = (128, 128, 128)
DEFAULT_BATCH = 2
#: Share of the budget kept free for what the count leaves out (CUDA context, cuDNN workspaces,
#: allocator fragmentation, validation).
SAFETY_MARGIN = 0.10
#: Width multipliers tried for per-modality segmentors (a half-width segmentor per modality is about equal).
WIDTH_FACTORS = tuple(round(0.30 + 0.01 * i, 2) for i in range(46))
#: Exact counts one plan may make at most (each takes a few seconds at 128^3).
MAX_COUNTS = 6


@dataclass(frozen=True)
class TrainingPlan:
    """Sizes of a training step that fit a memory budget, the step's estimated peak, and why.

    Attributes:
        peak_bytes: the counted peak of one training step (tensors only; see :mod:`ciml.training.memory`).
        budget_bytes: the device memory planned for; the plan keeps ``margin`` of it free.
        dtype: the activation dtype the step was counted in (bfloat16 under AMP on CUDA).
        reason: how the sizes were chosen, in one phrase.
    """

    widths: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    peak_bytes: int
    budget_bytes: int
    dtype: str
    margin: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update({k: list(v) for k, v in out.items() if isinstance(v, tuple)})
        return out

    def summary(self) -> str:
        """One line: the sizes, the estimated peak and the budget."""
        patch = "x".join(map(str, self.patch_size))
        return (
            f"plan: patch {patch}, batch {self.batch_size}, widths {'/'.join(map(str, self.widths))}; "
            f"estimated peak {self.peak_bytes / GIB:.2f} GiB ({self.dtype}) of {self.budget_bytes / GIB:.2f} "
            f"GiB ({self.reason})"
        )


# ---------------------------------------------------------------------------------------- FLOPs
def forward_flops(build: Callable[[], nn.Module], input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass, counted on the meta device: shapes only, no memory, no arithmetic."""
    with torch.device("meta"):
        model = build()
        x = torch.empty(*input_shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def scaled_widths(widths: Sequence[int], factor: float, quantum: int) -> tuple[int, ...]:
    """``widths * factor``, each rounded to a multiple of ``quantum`` (at least ``quantum``)."""
    return tuple(max(quantum, round(w * factor / quantum) * quantum) for w in widths)


def match_widths(
    spec: TaskSpec | str | dict[str, Any],
    joint_widths: Sequence[int],
    input_shape: Sequence[int],
    model: str = "ciml",
) -> tuple[tuple[int, ...], int, int]:
    """Widths of ``model`` whose forward FLOPs are closest to the joint U-Net's at ``joint_widths``.

    FLOPs grow with the width multiplier, so a bisection over the candidates finds the first one at or
    above the joint's; it or its predecessor is the closest. Convolution FLOPs are proportional to the
    voxels at every level, so the match is the same at any patch the network takes.

    Returns:
        (widths, their forward FLOPs, the joint's forward FLOPs), both counted at ``input_shape``.
    """
    spec = load_task(spec)
    joint = forward_flops(lambda: build_model("joint", spec, widths=joint_widths), input_shape)
    quantum = 8 if min(joint_widths) >= 32 else 4 if min(joint_widths) >= 8 else 2
    candidates = list(dict.fromkeys(scaled_widths(joint_widths, f, quantum) for f in WIDTH_FACTORS))

    @functools.cache
    def flops(index: int) -> int:
        return forward_flops(lambda: build_model(model, spec, widths=candidates[index]), input_shape)

    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if flops(middle) < joint:
            low = middle + 1
        else:
            high = middle
    best = min({low, max(low - 1, 0)}, key=lambda i: abs(flops(i) - joint))
    return candidates[best], flops(best), joint


def has_segmentor_per_modality(model: str, spec: TaskSpec | str | dict[str, Any]) -> bool:
    """Whether ``model`` runs one segmentor per modality (CIML and its ablations): its default widths
    are then the equal-FLOPs ones, not the joint U-Net's."""
    return isinstance(build_model(model, load_task(spec), widths=(2, 4)), CIMLNet)


def default_widths(model: str, spec: TaskSpec | str | dict[str, Any], joint_widths=NNUNET_WIDTHS):
    """``joint_widths`` for a network on stacked modalities; the equal-FLOPs widths for per-modality ones."""
    spec = load_task(spec)
    if not has_segmentor_per_modality(model, spec):
        return tuple(joint_widths)
    edge = 2 ** len(joint_widths)  # the smallest patch every level takes: FLOPs scale exactly from it
    shape = (1, len(spec.modality_names), edge, edge, edge)
    return match_widths(spec, joint_widths, shape, model)[0]


# -------------------------------------------------------------------------------------- planning
def smaller_patches(patch: Sequence[int], divisor: int, smallest: int) -> list[tuple[int, ...]]:
    """``patch`` and the patches it shrinks to, largest edge first by ``divisor``, down to ``smallest``.

    Example:
        >>> smaller_patches((32, 32, 16), 8, 16)
        [(32, 32, 16), (24, 32, 16), (24, 24, 16), (16, 24, 16), (16, 16, 16)]
    """
    current = tuple(patch)
    out = [current]
    while True:
        axis = max(range(len(current)), key=lambda i: (current[i], -i))
        if current[axis] - divisor < smallest:
            return out
        current = tuple(e - divisor if i == axis else e for i, e in enumerate(current))
        out.append(current)


def _voxels(patch: Sequence[int]) -> int:
    out = 1
    for edge in patch:
        out *= edge
    return out


class _Counter:
    """Exact peaks of candidate steps, each counted once, with a linear predictor through the first."""

    def __init__(self, count: Callable[[tuple[int, ...], int], tuple[int, int]]) -> None:
        self._count = count
        self.peaks: dict[tuple[tuple[int, ...], int], int] = {}
        self._line: tuple[int, float] | None = None  # (fixed bytes, bytes per batch voxel)

    def __call__(self, patch: tuple[int, ...], batch: int) -> int:
        key = (patch, batch)
        if key not in self.peaks:
            if len(self.peaks) >= MAX_COUNTS:
                return self.predict(patch, batch)
            peak, fixed = self._count(patch, batch)
            self.peaks[key] = peak
            if self._line is None:
                self._line = (fixed, (peak - fixed) / (batch * _voxels(patch)))
        return self.peaks[key]

    def predict(self, patch: tuple[int, ...], batch: int) -> int:
        if (patch, batch) in self.peaks:
            return self.peaks[(patch, batch)]
        assert self._line is not None
        fixed, per_voxel = self._line
        return int(fixed + per_voxel * batch * _voxels(patch))


def _largest_fitting(
    counter: _Counter, patches: Sequence[tuple[int, ...]], batch: int, limit: float
) -> tuple[tuple[int, ...], int] | None:
    """The largest of ``patches`` (largest first) whose counted peak at ``batch`` fits ``limit``."""
    counter(patches[0], batch)
    index = next((i for i, p in enumerate(patches) if counter.predict(p, batch) <= limit), None)
    while index is not None and index < len(patches):
        peak = counter(patches[index], batch)
        if peak <= limit:
            return patches[index], peak
        index += 1
    return None


def plan_training(
    model: str,
    spec: TaskSpec | str | dict[str, Any],
    budget_bytes: int,
    *,
    widths: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    start_patch: Sequence[int] | None = None,
    start_batch: int = DEFAULT_BATCH,
    dtype: torch.dtype = torch.bfloat16,
    margin: float = SAFETY_MARGIN,
    optimizer: str = "adamw",
    beta: float = DEFAULT_BETA,
    checkpoint_activations: bool = False,
    count: Callable[[tuple[int, ...], int], tuple[int, int]] | None = None,
) -> TrainingPlan:
    """The widths, patch and batch of ``model`` on ``spec`` whose training step fits ``budget_bytes``.

    Args:
        widths, patch_size, batch_size: the user's explicit choices (None: planned). Kept as given.
        start_patch: the patch to shrink from (default: the task's ``training.patch_size``, else 128^3).
        start_batch: the batch tried first; 1 is tried next (nnU-Net keeps 2 unless nothing fits).
        dtype: the activation dtype of the step (bfloat16 under AMP on CUDA, else float32).
        margin: share of the budget left free.
        count: ``(patch, batch) -> (peak bytes, weights and state bytes)``; default: the exact meta count.

    Raises:
        ParameterError: an explicit choice (or, with none, the budget) that no plan fits; the message
            names the sizes that would fit.
    """
    spec = load_task(spec)
    explicit_widths = widths is not None
    widths = tuple(widths) if explicit_widths else default_widths(model, spec)
    divisor = 2 ** (len(widths) - 1)
    start = tuple(patch_size or start_patch or spec.training.get("patch_size") or DEFAULT_PATCH)
    start = tuple(int(e) for e in start)
    if len(start) != 3 or any(e % divisor for e in start):
        raise ParameterError("patch_size", f"{start}: need 3 sizes divisible by {divisor} (2^(levels-1))")
    smallest = min(min(start), 2 * divisor)
    limit = budget_bytes * (1 - margin)

    def exact(patch: tuple[int, ...], batch: int) -> tuple[int, int]:
        def build() -> nn.Module:
            net = build_model(model, spec, widths=widths)
            if checkpoint_activations:
                net.checkpoint_activations = True
            return net

        memory = step_memory(build, spec, patch, batch, beta, optimizer, activation_dtype=dtype)
        return memory.peak_bytes, memory.weights_and_state_bytes

    counter = _Counter(count or exact)
    patches = [start] if patch_size is not None else smaller_patches(start, divisor, smallest)
    default_batches = list(dict.fromkeys([start_batch, 1]))
    batches = [batch_size] if batch_size is not None else default_batches
    gib = f"{budget_bytes / GIB:.2f} GiB"

    def plan(patch: tuple[int, ...], batch: int, peak: int, reason: str) -> TrainingPlan:
        name = str(dtype).removeprefix("torch.")
        return TrainingPlan(widths, patch, batch, peak, budget_bytes, name, margin, reason)

    for batch in batches:
        found = _largest_fitting(counter, patches, batch, limit)
        if found is not None:
            patch, peak = found
            reasons = []
            if batch != batches[0]:
                reasons.append(f"batch {batch}: no patch fits at batch {batches[0]}")
            if patch != start:
                reasons.append(f"patch shrunk from {'x'.join(map(str, start))} to fit")
            chosen = patch_size is not None and batch_size is not None
            reason = "; ".join(reasons) or ("as chosen" if chosen else "defaults fit")
            return plan(patch, batch, peak, reason)

    # nothing fits the explicit choices: say what would, and refuse
    needed = counter(patches[0], batches[0])
    over = (
        f"needs an estimated {needed / GIB:.2f} GiB at patch {'x'.join(map(str, patches[0]))}, batch "
        f"{batches[0]}, widths {'/'.join(map(str, widths))}, over {1 - margin:.0%} of the {gib} budget"
    )
    free = smaller_patches(start, divisor, smallest)
    for batch in batches:
        if patch_size is None:
            break
        found = _largest_fitting(counter, free, batch, limit)
        if found is not None:
            fits = f"{{patch_size}} {' '.join(map(str, found[0]))} would fit at batch {batch}"
            return _refuse("patch_size", f"{' '.join(map(str, start))} {over}; {fits}")
    for batch in default_batches:
        if batch_size is None or batch >= batch_size:
            continue
        found = _largest_fitting(counter, free if patch_size is None else [start], batch, limit)
        if found is not None:
            fits = f"batch {batch} at {{patch_size}} {' '.join(map(str, found[0]))} would fit"
            return _refuse("batch_size", f"{batch_size} {over}; {fits}")
    advice = "use {checkpoint_activations}, smaller {widths} or a larger {gpu_memory}"
    parameter = "patch_size" if patch_size is not None else "batch_size" if batch_size is not None else None
    parameter = parameter or ("widths" if explicit_widths else "gpu_memory")
    return _refuse(parameter, f"no patch down to {smallest}^3 fits: {over}; {advice}")


def _refuse(parameter: str, problem: str) -> TrainingPlan:
    raise ParameterError(parameter, problem)
