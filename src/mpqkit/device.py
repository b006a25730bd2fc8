"""Device choice for every path: CUDA when available, else CPU; ``--device`` forces one."""
from __future__ import annotations

import torch

from .errors import MpqkitError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": cuda if available, else cpu. An explicit device that is not there is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MpqkitError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MpqkitError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MpqkitError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise MpqkitError(f"device type '{dev.type}' is not supported: use auto, cpu or cuda")
    return dev
