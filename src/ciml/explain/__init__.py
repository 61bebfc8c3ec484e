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

from ciml.explain.case import CaseExplanation
from ciml.explain.explainer import Explainer
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
from ciml.explain.run import explain_cases
from ciml.explain.window import EXTENTS, default_max_voxels
from ciml.explain.writing import SUMMARY_FILE, write_explanation

__all__ = [
    "CAMS",
    "EXTENTS",
    "SUMMARY_FILE",
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
