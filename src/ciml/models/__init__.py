"""Networks: the U-Net backbone, the information gate, CIML and its baselines, one registry."""

from ciml.models.backbone import UNet, deep_supervision_levels, deep_supervision_weights
from ciml.models.ciml import CIMLNet, gate_key
from ciml.models.gate import GateOutput, InformationGate, gaussian_bottleneck_kl
from ciml.models.interface import MissingModalities, SegmentationNetwork
from ciml.models.output import SegmentationOutput
from ciml.models.registry import MODELS, build_model, check_state_dict, model_from_config, model_names

__all__ = [
    "MODELS",
    "CIMLNet",
    "GateOutput",
    "InformationGate",
    "MissingModalities",
    "SegmentationNetwork",
    "SegmentationOutput",
    "UNet",
    "build_model",
    "check_state_dict",
    "deep_supervision_levels",
    "deep_supervision_weights",
    "gate_key",
    "gaussian_bottleneck_kl",
    "model_from_config",
    "model_names",
]
