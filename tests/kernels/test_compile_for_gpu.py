"""The Triton kernels compile for a GPU, checked on the CPU in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO_ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason=f"this triton install has no ptxas at {PTXAS}")
def test_kernels_compile_for_sm90() -> None:
    # Kernels decorated under the interpreter cannot be compiled, hence a new process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_for_gpu"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(result.stdout.split()) == 18
    assert "_paged_prefill_kernel[fp16]" in result.stdout
    assert "_lora_expand_kernel[bf16]" in result.stdout
