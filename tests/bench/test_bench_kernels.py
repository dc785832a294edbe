"""The kernel benchmark refuses to run without a GPU, with a message that says why."""

import pytest
import torch

from ragcache.bench import kernels as bench_kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present; the benchmark would run")
def test_benchmark_without_gpu_exits_with_a_message() -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_kernels.main(["--dtype", "float32"])
