"""Shared test settings: one torch thread so the suite behaves on busy 2-core machines."""

import torch

torch.set_num_threads(1)  # tiny tensors gain nothing from more; avoids oversubscription
