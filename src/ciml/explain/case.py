"""One case's explanation on its preprocessed grid: maps, shares, figures and summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ciml.explain.figures import contributions_png, fractions_png, information_png, tumour_slice
from ciml.explain.gradcam import (
    GradCamResult,
)
from ciml.explain.window import Window
from ciml.tasks import REGION_THRESHOLD


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
        predicted = np.nan_to_num(self.probabilities) > REGION_THRESHOLD
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
