"""Which device a round, an embedding job or an evaluation runs on: CUDA when torch sees a GPU,
else the CPU, unchanged. ``VIGIL_DEVICE`` (``auto`` | ``cpu`` | ``cuda``) overrides; asking for
``cuda`` where there is none falls back to the CPU with a warning (nothing requires a GPU)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CHOICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """True when torch was built with CUDA and sees at least one GPU. Without an NVIDIA device
    node or driver there is none, known without importing torch (an embedding job need not)."""
    if "torch" not in sys.modules and not (Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists()):
        return False
    import torch

    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver is no GPU
        return False


def select(preference: str | None = None) -> str:
    """``"cuda"`` or ``"cpu"``: ``preference`` (None: ``VIGIL_DEVICE``, else ``auto``) resolved
    against what this machine has."""
    pref = (preference or os.environ.get("VIGIL_DEVICE") or "auto").strip().lower()
    if pref not in CHOICES:
        raise ValueError(f"unknown device {pref!r}; use one of {CHOICES} (VIGIL_DEVICE or the round's config)")
    if pref == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if pref == "cuda":
        log.warning("CUDA was asked for but torch sees no GPU here: running on the CPU")
    return "cpu"


def describe(device: str) -> str:
    """Words for the Train page and the round report: ``"cpu (2 cores)"`` or the GPU's name
    (torch is imported only where there is a GPU: on a CPU machine the import was most of the
    Train page's first render)."""
    if device == "cuda" and cuda_available():
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({len(os.sched_getaffinity(0))} cores)"
