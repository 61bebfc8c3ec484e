"""Exact memory of one training step, counted on PyTorch's ``meta`` device (no memory, no arithmetic).

A training step's memory is the weights, their gradients, the optimiser's state and, above all, what
autograd saves for the backward pass. All of it follows from shapes alone: build the network and a batch
on the ``meta`` device and run one forward (with the CIML loss) and backward there. This counts

* **saved**: the bytes autograd saves for backward, counted in
  :func:`torch.autograd.graph.saved_tensors_hooks` during the forward, each storage once (a tensor saved
  by several ops, or views of one storage, count once) and without the parameters' own storages;
* **live after forward**: the bytes of every tensor storage alive when the loss is ready, minus the
  weights, buffers and batch. Equal to *saved* plus the loss' few scalars, except under activation
  checkpointing, whose recomputation keeps its inputs alive outside the hooks (so this is the figure
  to compare across networks with and without checkpointing);
* **peak**: the largest sum of live storages at any op of forward and backward, plus the optimiser
  state (Adam: two tensors per parameter), counted op by op (:class:`LiveTensorBytes`). What a CUDA
  allocator adds on top (fragmentation, cuDNN workspaces, the CUDA context) is not in it.

The same hooks on real CPU tensors give the same bytes (a test checks it), and the counts agree with
the H200's peaks (DESIGN section 12). It takes seconds on a CPU for a 128^3 BraTS step.

Example:
    >>> from ciml.models import build_model
    >>> m = step_memory(lambda: build_model("joint", "brats2020", widths=(4, 8)), "brats2020", (16, 16, 16))
    >>> m.saved_bytes > 0 and m.peak_bytes > m.saved_bytes
    True
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ciml.losses import DEFAULT_BETA, CIMLLoss
from ciml.models import SegmentationOutput
from ciml.tasks import TaskSpec, load_task

GIB = 2**30
#: Adam and AdamW keep two tensors per parameter (first and second moments), SGD with momentum one.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive while the mode is on, and their peak.

    The CPU allocator keeps no peak counter like CUDA's, and the resident set is blurred by malloc's
    caching; this counts what ``torch.cuda.max_memory_allocated`` would, at op granularity (the same
    figures as torch.distributed._tools.mem_tracker.MemTracker, at a fraction of its cost). Works on
    the meta device, where storages have sizes but no memory.

    Args:
        existing: tensors alive before the block that count towards the peak (weights, optimiser state).
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._tracked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        for tensor in existing:
            self._track(tensor)
        self.peak = self.live

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._tracked:
            return
        nbytes = storage.nbytes()
        self._tracked[storage] = nbytes
        self.live += nbytes
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        self.peak = max(self.peak, self.live)
        return out


class SavedTensorBytes:
    """Bytes autograd saves for backward inside the block, each storage once.

    Args:
        exclude: tensors whose storages are not counted (the parameters: they are counted as weights).

    Example:
        >>> w = torch.randn(3, requires_grad=True)
        >>> with SavedTensorBytes(exclude=[w]) as saved:
        ...     y = (w * torch.ones(3)).exp()
        >>> saved.nbytes  # the ones (saved by mul) and exp's output; w itself is excluded
        24
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {id(t.untyped_storage()) for t in exclude}
        self._keep: list[torch.UntypedStorage] = []  # keeps ids unique while counting
        self._seen: set[int] = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self._keep.append(storage)
            self.nbytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._keep.clear()


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step (see the module docstring for what each figure counts)."""

    saved_bytes: int
    live_after_forward_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    peak_bytes: int

    @property
    def weights_and_state_bytes(self) -> int:
        """Weights, gradients and optimiser state: what the step holds besides activations."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def gib(self) -> dict[str, float]:
        return {k.removesuffix("_bytes"): v / GIB for k, v in asdict(self).items()}


def _as_output(out: torch.Tensor | SegmentationOutput, regions: Sequence[str]) -> SegmentationOutput:
    """A plain network's logits as a SegmentationOutput, so every network trains on the same loss."""
    if isinstance(out, SegmentationOutput):
        return out
    return SegmentationOutput(
        logits={"net": out}, owned={"net": tuple(regions)}, kl=out.new_zeros((), dtype=torch.float32)
    )


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with parameters in ``dtype`` and float32 buffers (running statistics), as autocast has."""
    model = model.to(dtype)
    for buffer in model.buffers():
        buffer.data = buffer.data.float()
    return model


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def count_step(
    model: nn.Module,
    batch: torch.Tensor,
    target: torch.Tensor,
    regions: Sequence[str],
    beta: float = DEFAULT_BETA,
    optimizer: str = "adamw",
    activation_dtype: torch.dtype | None = None,
) -> StepMemory:
    """Count one training step of ``model`` on ``batch`` (any device: meta counts without computing).

    Args:
        model: in training mode; its parameters are the float32 master weights.
        batch, target: the input [B, M, *spatial] and binary region targets [B, R, *spatial].
        regions: the target's channel order.
        optimizer: ``adamw``/``adam`` (two states per parameter) or ``sgd`` (one).
        activation_dtype: run the forward in this dtype (e.g. bfloat16, to estimate an autocast step:
            weights, gradients and optimiser state stay float32). Default: the parameters' dtype.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZER_STATES)}")
    params = [p for p in model.parameters() if p.requires_grad]
    parameter_bytes = _storage_bytes(params)
    optimizer_bytes = OPTIMIZER_STATES[optimizer] * parameter_bytes
    gradient_bytes = parameter_bytes
    loss_fn = CIMLLoss(regions, beta=beta)
    masters = None
    if activation_dtype is not None and activation_dtype != params[0].dtype:
        # autocast's casts of the weights are a few MB; the forward runs on low-precision copies
        masters = {name: p.detach().clone() for name, p in model.named_parameters()}
        model = in_dtype(model, activation_dtype)
        batch = batch.to(activation_dtype)
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    buffers = list(model.buffers())
    with LiveTensorBytes([*params, *buffers, batch, target]) as live:
        baseline = live.live
        with SavedTensorBytes(exclude=[*params, *buffers]) as saved:
            loss = loss_fn(_as_output(model(batch), regions), target).total
        live_after_forward = live.live - baseline
        loss.backward()
        del loss
    peak = live.peak + optimizer_bytes
    if masters is not None:  # float32 masters and float32 gradients, not the low-precision copies
        low = _storage_bytes(params)
        peak += parameter_bytes - low + (gradient_bytes - low)
    for p in params:
        p.grad = None
    return StepMemory(
        saved_bytes=saved.nbytes,
        live_after_forward_bytes=live_after_forward,
        parameter_bytes=parameter_bytes,
        gradient_bytes=gradient_bytes,
        optimizer_bytes=optimizer_bytes,
        batch_bytes=_storage_bytes([batch, target]),
        peak_bytes=peak,
    )


def step_memory(
    build: Callable[[], nn.Module],
    task: TaskSpec | str | dict[str, Any],
    patch: Sequence[int],
    batch: int = 2,
    beta: float = DEFAULT_BETA,
    optimizer: str = "adamw",
    activation_dtype: torch.dtype | None = None,
    device: str | torch.device = "meta",
) -> StepMemory:
    """Count one training step of the network ``build()`` makes, at ``patch`` and ``batch``, for ``task``.

    On ``meta`` (the default) nothing is allocated or computed: a 128^3 BraTS step counts in seconds.

    Example:
        >>> from ciml.models import build_model
        >>> net = lambda: build_model("ciml", "brats2020", widths=(4, 8))
        >>> step_memory(net, "brats2020", (16, 16, 16)).saved_bytes > 0
        True
    """
    spec = load_task(task)
    shape = (batch, len(spec.modality_names), *patch)
    with torch.device(device):
        model = build()
        x = torch.empty(shape) if str(device) == "meta" else torch.randn(shape)
        target = torch.zeros((batch, len(spec.region_names), *patch))
    return count_step(model, x, target, spec.region_names, beta, optimizer, activation_dtype)
