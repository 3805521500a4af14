"""Device choice, device names and synchronised timing: the one copy the eval, bench, server and training use."""

from __future__ import annotations

import platform

import torch


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What a result was measured on: the GPU's name, or the CPU with its torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a wall-clock timer measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

