"""A minimal, real training loop: seeded, AdamW or SGD with poly LR, validation, exact resume.

Batches come from a function of the iteration number, so the data stream after a resume is the one
the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ciml.devices import resolve_device, resolve_memory_format
from ciml.errors import CimlError
from ciml.losses import DEFAULT_BETA, CIMLLoss
from ciml.models import SegmentationNetwork
from ciml.runs import load_checkpoint, save_checkpoint


@dataclass
class Batch:
    """Images [B, M, *spatial] (modality order of the task) and binary region targets [B, R, *spatial].

    ``present`` names the modalities this batch may use (None: all), for missing-modality training.
    """

    image: torch.Tensor
    target: torch.Tensor
    present: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (stored in its checkpoints).

    Attributes:
        iterations: optimizer steps in total.
        optimizer: "adamw" or "sgd" (SGD uses Nesterov momentum 0.99 like nnU-Net).
        lr: initial learning rate, decayed by the poly schedule (1 - t/T)^0.9.
        beta: weight of the KL term; a model with a fixed beta (ciml-beta0) overrides it.
        grad_clip: gradient-norm clip (nnU-Net: 12).
        validate_every: iterations between validations (0: only at the end).
        device: "auto", "cpu", "cuda" or "cuda:N".
        amp: bf16 autocast on CUDA (ignored on CPU).
        compile: wrap the network in torch.compile.
        memory_format: "auto", "contiguous" or "channels_last" (:func:`ciml.devices.resolve_memory_format`).
    """

    iterations: int = 600
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    beta: float = DEFAULT_BETA
    seed: int = 0
    grad_clip: float = 12.0
    validate_every: int = 0
    region_names: list[str] = field(default_factory=list)
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    memory_format: str = "auto"


def poly_lr(iteration: int, total: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay factor at ``iteration`` of ``total``."""
    return (1.0 - min(iteration, total) / total) ** exponent


FUSED_DEVICES = ("cpu", "cuda")  # where PyTorch has fused AdamW and SGD kernels


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s parameters (on their device already).

    Fused (one kernel for all parameters) where PyTorch has it: the per-parameter loop otherwise costs
    a few kernels per tensor, and CIML has ten times the joint U-Net's tensors (a gate has eight), so
    on a CPU the loop was a few per cent of its training step. Same updates up to float rounding.
    """
    parameters = list(model.parameters())
    fused = bool(parameters) and all(p.device.type in FUSED_DEVICES for p in parameters)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.lr,
            momentum=0.99,
            nesterov=True,
            weight_decay=config.weight_decay,
            fused=fused,
        )
    raise CimlError(f"unknown optimizer {config.optimizer!r}; choose adamw or sgd")


StepCallback = Callable[["Trainer", dict[str, float]], None]


class Trainer:
    """Trains one model on batches from ``batch_at(iteration)``.

    Args:
        model: a network from :func:`ciml.models.build_model` (its ``config`` goes into checkpoints, and
            :meth:`~ciml.models.SegmentationNetwork.loss_beta` decides the bottleneck weight).
        config: the run's settings; ``config.region_names`` orders the target channels.
        batch_at: returns the training batch of an iteration (deterministic in the iteration number).
        validate: optional callable(model) -> dict of validation metrics (called in eval mode).
        distributed: wrap the network in DistributedDataParallel (the process group must exist).
    """

    def __init__(
        self,
        model: SegmentationNetwork,
        config: TrainConfig,
        batch_at: Callable[[int], Batch],
        validate: Callable[[nn.Module], dict[str, float]] | None = None,
        distributed: bool = False,
    ) -> None:
        self.device = resolve_device(config.device)
        self.memory_format = resolve_memory_format(config.memory_format, self.device, model.spatial_dims)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.config = config
        self.batch_at = batch_at
        self.validate = validate
        self.loss = CIMLLoss(config.region_names, model.loss_beta(config.beta))
        torch.manual_seed(config.seed)
        self.optimizer = make_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: poly_lr(it, config.iterations)
        )
        self.network = self._wrap(model, distributed)
        self.iteration = 0
        self.best_metric = -math.inf
        self.history: list[dict[str, float]] = []

    def _wrap(self, model: nn.Module, distributed: bool) -> nn.Module:
        """The callable used for training steps: optionally compiled, optionally DDP-wrapped."""
        network = model
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.config.compile:
            network = torch.compile(network)
        if distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # segmentors of modalities a batch drops get no gradient: let DDP expect that
            network = nn.parallel.DistributedDataParallel(
                network, device_ids=ids, find_unused_parameters=True
            )
        return network

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step; returns the logged loss terms."""
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        image = batch.image.to(self.device, memory_format=self.memory_format)
        target = batch.target.to(self.device)
        with self._autocast():
            output = (
                self.network(image) if batch.present is None else self.network(image, present=batch.present)
            )
        terms = self.loss(output, target)
        terms.total.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        record = {"iteration": self.iteration, "lr": self.scheduler.get_last_lr()[0], **terms.as_dict()}
        if batch.present is not None:
            record["present"] = ",".join(batch.present)
        return record

    def fit(
        self,
        until: int | None = None,
        progress: bool = True,
        checkpoint: str | Path | None = None,
        desc: str = "train",
        callbacks: Iterable[StepCallback] = (),
    ) -> list[dict[str, float]]:
        """Train up to iteration ``until`` (default: the configured total).

        After each step every callback gets (trainer, record); ``checkpoint`` is written at the end.
        """
        until = self.config.iterations if until is None else min(until, self.config.iterations)
        started = time.perf_counter()
        bar = tqdm(total=until, initial=self.iteration, desc=desc, disable=not progress, dynamic_ncols=True)
        while self.iteration < until:
            record = self.step(self.batch_at(self.iteration))
            if self._due_for_validation():
                record.update({f"val/{k}": v for k, v in self.run_validation().items()})
                record["seconds"] = round(time.perf_counter() - started, 2)
            self.history.append(record)
            for callback in callbacks:
                callback(self, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kl=f"{record['kl']:.2f}", lr=f"{record['lr']:.1e}")
            bar.update(1)
        bar.close()
        self.elapsed = time.perf_counter() - started
        if checkpoint is not None:
            self.save(checkpoint)
        return self.history

    def run_validation(self, validate: Callable[[nn.Module], Any] | None = None) -> Any:
        """``validate`` (default: the trainer's own) on the network in eval mode, as validation runs."""
        validate = validate or self.validate
        if validate is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self._autocast():
            return validate(self.model)

    def _due_for_validation(self) -> bool:
        every = self.config.validate_every
        return self.validate is not None and (
            (every and self.iteration % every == 0) or self.iteration == self.config.iterations
        )

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(self.state_dict(), path)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedule, RNG, iteration."""
        state = {
            "model": self.model.state_dict(),
            "config": self.model.config,
            "train_config": asdict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            "best_metric": self.best_metric,
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != self.model.config:
            raise CimlError("the checkpoint was made for another model or task than this run's")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._lay_out_optimizer_state()
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.best_metric = float(state.get("best_metric", -math.inf))
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = list(state.get("history", []))

    def _lay_out_optimizer_state(self) -> None:
        """Give each optimizer state tensor its parameter's strides.

        A fused optimizer reads a parameter and its state element by element in memory order, so a
        checkpoint written in another memory format (a contiguous run resumed in channels_last) would
        update the wrong elements without an error.
        """
        for parameter, state in self.optimizer.state.items():
            for key, value in state.items():
                misplaced = torch.is_tensor(value) and value.shape == parameter.shape
                if misplaced and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)

    def resume(self, path: str | Path) -> None:
        self.load_state_dict(load_checkpoint(path, map_location=self.device))

    def parameter_checksums(self) -> list[float]:
        """Sum of all parameters on every rank (one entry without DDP): equal entries mean ranks agree."""
        local = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
        if not (dist.is_available() and dist.is_initialized()):
            return [float(local)]
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.to(self.device) if dist.get_backend() == "nccl" else local.cpu())
        return [float(g) for g in gathered]
