"""Runs the Triton kernels on the CPU through the interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set before any kernel
module is imported; a kernel module that an earlier test imported is reloaded.
"""

import importlib
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

_KERNEL_MODULES = (
    "ragcache.kernels.triton_rope",
    "ragcache.kernels.triton_paged_attention",
    "ragcache.kernels.triton_write_kv",
    "ragcache.kernels.triton_lora",
)

for _name in _KERNEL_MODULES:
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
