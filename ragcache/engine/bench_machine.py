"""The machine record every engine benchmark report carries."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def machine_record(load_average_at_start: list[float] | None = None) -> dict[str, Any]:
    """Platform, torch version and threads, and the load average when the run began."""
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load_average_at_start or list(os.getloadavg()),
    }
