"""Preprocessing: plan it from a dataset, apply it to a case, invert it for a prediction, cache it.

One case goes through the same steps at training and at inference time (nnU-Net's order, done with
MONAI transforms):

1. load each modality with :mod:`ciml.data.io` (the reader check-data, evaluation and the writers use:
   NIfTI with nibabel, NRRD, MHA and DICOM folders with SimpleITK) as a MONAI ``MetaTensor``;
2. resample every modality onto the grid of the first one when the grids differ (HECKTOR's PET and CT),
   in physical space (``ResampleToMatch``), the label with nearest neighbour;
3. reorient to RAS (``Orientationd``);
4. crop to the bounding box of the body of all modalities (nonzero voxels; CT: above ``ct_body_threshold``);
5. resample to the plan's target spacing (``Spacingd``: trilinear for images, nearest for labels);
6. normalise each modality by its type (``NormalizeIntensity``'s arithmetic, in numpy): MRI z-score over
   the nonzero voxels of the case; CT clipped to the dataset's foreground 0.5/99.5 percentiles, then
   z-scored with the dataset mean/std (nnU-Net's CT scheme); PET kept in SUV, clipped to
   ``[0, dataset 99.5 percentile]`` and divided by a fixed dataset factor (never a CT-style z-score, the
   nnU-Net autoPET pitfall); synthetic data z-scored per case.

:func:`invert_to_original` undoes steps 5-3 for a prediction so it can be written with the input's own
affine and header. :class:`PreprocessedCache` keeps preprocessed cases on disk as ``.npy`` files.

Modules, by concern: :mod:`.plan` (the plan as data), :mod:`.fingerprint` (computing a plan from a
dataset), :mod:`.load` (steps 1-2, through :mod:`ciml.data.io`), :mod:`.transform` (steps 3-6 and the
inversion), :mod:`.cache` (the on-disk cache).

Example:
    >>> plan = plan_preprocessing(cases, spec)                          # doctest: +SKIP
    >>> pre = preprocess_case(cases[0], spec, plan)                    # doctest: +SKIP
    >>> label_map = invert_to_original(prediction, pre.meta)           # doctest: +SKIP
"""

from ciml.data.preprocessing.cache import PreprocessedCache
from ciml.data.preprocessing.fingerprint import plan_preprocessing
from ciml.data.preprocessing.load import load_volume, read_geometry
from ciml.data.preprocessing.plan import (
    DEFAULT_CT_BODY_THRESHOLD,
    ORIENTATION,
    PLAN_VERSION,
    ModalityNormalization,
    PreprocessingError,
    PreprocessingPlan,
)
from ciml.data.preprocessing.transform import PreprocessedCase, invert_to_original, preprocess_case

__all__ = [
    "DEFAULT_CT_BODY_THRESHOLD",
    "ORIENTATION",
    "PLAN_VERSION",
    "ModalityNormalization",
    "PreprocessedCache",
    "PreprocessedCase",
    "PreprocessingError",
    "PreprocessingPlan",
    "invert_to_original",
    "load_volume",
    "plan_preprocessing",
    "preprocess_case",
    "read_geometry",
]
