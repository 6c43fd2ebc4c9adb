"""lorabook: parameter-efficient fine-tuning, built for real and taught in notebooks.

One concept per module (see ../shared/DESIGN.md in the project for the map):
``models`` (the base model), ``memory`` (what training costs), ``timing`` (one timer),
``teach`` (show source, exercise checks, student copies), ``bench`` (lorabook vs its peer).
"""
from __future__ import annotations

import torch

__version__ = "0.1.0"


def device() -> torch.device:
    """The best device here: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
