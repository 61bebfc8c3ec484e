"""The interface every registered network declares about itself, so that no consumer guesses.

Prediction, training, explanation and the report need a few facts about a network: which segmentor
predicts which region (and who stands in when its owners are missing), where messages flow, whether
and how it runs without a modality, what its input sizes must divide by, and which bottleneck weight
its loss really uses. Each network states them once, here, instead of consumers branching on its
class or its registry name.

Example:
    >>> from ciml.models import build_model
    >>> net = build_model("ciml-beta0", "brats2020", widths=(4, 8))
    >>> net.owners["ET"], net.missing_modalities.value, net.loss_beta(1e-3)
    (('t1ce',), 'skip-segmentor', 0.0)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ciml.errors import CimlError, ParameterError


class MissingModalities(enum.StrEnum):
    """How a network runs when some modalities are absent."""

    SKIP_SEGMENTOR = "skip-segmentor"
    """The absent modality's segmentor is skipped and its messages sit at the prior mean (CIML's exact
    "no information" state); regions whose owners are all absent come from fallback owners, if any."""
    ZERO_FILL = "zero-fill"
    """The absent channels are filled with zeros (meaningful only for a network trained that way)."""
    UNSUPPORTED = "unsupported"
    """Every modality is required."""


class SegmentationNetwork(nn.Module):
    """Base class of every registered network: the facts consumers may rely on.

    Args:
        modalities: modality names in input channel order.
        config: what rebuilds the network (:func:`ciml.models.model_from_config`); set by the registry.
        fixed_beta: the bottleneck weight its loss always uses whatever is requested (ciml-beta0: 0),
            or None to use the requested one.
        deep_supervision: train with auxiliary heads at coarser decoder scales (nnU-Net's deep
            supervision); refused by networks whose ``supports_deep_supervision`` is False.

    Raises:
        ParameterError: ``deep_supervision`` asked of a network that does not support it.
    """

    missing_modalities: MissingModalities = MissingModalities.UNSUPPORTED
    #: Whether the network can be built with deep supervision (auxiliary heads on its decoder scales,
    #: their logits in ``SegmentationOutput.deep_logits`` in training mode).
    supports_deep_supervision: bool = False

    def __init__(
        self,
        modalities: Iterable[str],
        config: Mapping[str, Any] | None = None,
        fixed_beta: float | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self._config = dict(config) if config is not None else None
        self.fixed_beta = fixed_beta
        if deep_supervision and not self.supports_deep_supervision:
            raise ParameterError(
                "deep_supervision",
                f"not supported by the {self.name} model (it has no per-scale decoder outputs to "
                "supervise); leave {deep_supervision} off, or use joint or a CIML model",
            )
        self.deep_supervision = bool(deep_supervision)

    # ------------------------------------------------------------------------------ declared by networks
    @property
    def owners(self) -> dict[str, tuple[str, ...]]:
        """Region -> the segmentors whose outputs are averaged into its probability."""
        raise NotImplementedError

    @property
    def fallback_owners(self) -> dict[str, tuple[str, ...]]:
        """Region -> segmentors that stand in for it when all its owners' modalities are absent."""
        return {}

    @property
    def primary_inputs(self) -> dict[str, tuple[str, ...]]:
        """Segmentor -> the modalities its encoder reads (one each for private encoders)."""
        raise NotImplementedError

    @property
    def message_levels(self) -> tuple[int, ...]:
        """Levels at which segmentors exchange messages (empty: none)."""
        return ()

    @property
    def size_divisor(self) -> int:
        """Every spatial input size must be divisible by this."""
        raise NotImplementedError

    @property
    def checkpoint_activations(self) -> bool:
        """Whether the network recomputes its stages in backward instead of keeping their activations."""
        return False

    @checkpoint_activations.setter
    def checkpoint_activations(self, enabled: bool) -> None:
        if enabled:
            raise ParameterError("checkpoint_activations", f"not supported by the {self.name} model")

    # ------------------------------------------------------------------------------------- derived facts
    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds this network; only networks built by the registry have one."""
        if self._config is None:
            raise CimlError(
                f"this {type(self).__name__} was not built by ciml.models.build_model (no config)"
            )
        return self._config

    @property
    def name(self) -> str:
        return self._config["name"] if self._config else type(self).__name__

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the rank of the images the network reads (from its config)."""
        return int(self.config["spatial_dims"])

    @property
    def segmentors(self) -> tuple[str, ...]:
        """Segmentor names, as keys of the network's output logits."""
        return tuple(self.primary_inputs)

    @property
    def private_encoders(self) -> bool:
        """Whether each segmentor reads exactly one modality (what per-modality Grad-CAM needs)."""
        return all(len(inputs) == 1 for inputs in self.primary_inputs.values())

    @property
    def is_ensemble(self) -> bool:
        """Several segmentors predicting the same regions without messages, averaged."""
        owned = [{r for r, o in self.owners.items() if s in o} for s in self.segmentors]
        return not self.message_levels and len(owned) > 1 and all(o == owned[0] for o in owned)

    def loss_beta(self, requested: float) -> float:
        """The bottleneck weight this network's loss uses when ``requested`` is asked for."""
        return requested if self.fixed_beta is None else self.fixed_beta

    def check_present(self, present: Iterable[str] | None) -> None:
        """Refuse a modality subset this network cannot run on (API terms: ``present``)."""
        if present is None:
            return
        present = set(present)
        unknown = sorted(present - set(self.modalities))
        if unknown:
            raise CimlError(f"unknown modalities {unknown}; the model has {', '.join(self.modalities)}")
        if not present:
            raise CimlError("at least one modality must be present")
        missing = [m for m in self.modalities if m not in present]
        if missing and self.missing_modalities is MissingModalities.UNSUPPORTED:
            raise CimlError(
                f"the {self.name} model needs every modality and cannot run without {', '.join(missing)}; "
                "train it with modality dropout (absent channels zero-filled) or use a CIML model for "
                "missing-modality inference"
            )

    def unpredictable_regions(self, present: Iterable[str]) -> dict[str, str]:
        """Regions that cannot be predicted from ``present``, each with the reason."""
        present = set(present)
        if self.missing_modalities is not MissingModalities.SKIP_SEGMENTOR:
            return {}
        out = {}
        for region, owners in self.owners.items():
            available = [s for s in owners if set(self.primary_inputs[s]) <= present]
            stand_ins = [
                s for s in self.fallback_owners.get(region, ()) if set(self.primary_inputs[s]) <= present
            ]
            if not available and not stand_ins:
                out[region] = (
                    f"its owners ({', '.join(owners)}) are all missing and no fallback owner is present"
                )
        return out

    def describe(self) -> dict[str, Any]:
        """The declared facts as plain data (recorded in run.json, read by the report)."""
        return {
            "name": self.name,
            "owners": {r: list(o) for r, o in self.owners.items()},
            "fallback_owners": {r: list(o) for r, o in self.fallback_owners.items()},
            "primary_inputs": {s: list(i) for s, i in self.primary_inputs.items()},
            "message_levels": list(self.message_levels),
            "missing_modalities": self.missing_modalities.value,
            "size_divisor": self.size_divisor,
            "fixed_beta": self.fixed_beta,
            "deep_supervision": self.deep_supervision,
        }
