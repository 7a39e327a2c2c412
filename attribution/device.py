"""The one place that resolves which device to compute on."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a torch device: "auto" (or None) picks CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for but CUDA is not available here; use --device cpu")
    return dev


def describe_device(device: torch.device) -> str:
    """A one-line human description, e.g. 'CUDA: NVIDIA H100 (79.1 GiB free)' or 'CPU (2 threads)'."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return f"CUDA: {torch.cuda.get_device_name(device)} ({free / 2**30:.1f} GiB free)"
    return f"CPU ({torch.get_num_threads()} threads)"
