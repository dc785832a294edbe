"""The weight-major projection of a few rows equals F.linear, with and without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ragcache.engine.linear import SKINNY_MAX_ROWS, linear


@pytest.mark.parametrize("rows", [1, 2, 5, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=generator)
    weight = torch.randn(80, 48, generator=generator)
    bias = torch.randn(80, generator=generator) if with_bias else None
    out = linear(x, weight, bias)
    assert out.is_contiguous() and out.shape == (rows, 80)
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
