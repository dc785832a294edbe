"""Every projection product (oneDNN, weight-major, per slice) equals F.linear, with and
without bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ragcache.engine.linear import (
    _ONEDNN_LINEAR,
    ONEDNN_MAX_ROWS,
    SKINNY_MAX_ROWS,
    Projection,
    linear,
    onednn_serves,
)


@pytest.mark.parametrize(
    "rows", [1, 2, 5, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 40, ONEDNN_MAX_ROWS + 1, 200]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear(rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=generator)
    weight = torch.randn(80, 48, generator=generator)
    bias = torch.randn(80, generator=generator) if with_bias else None
    out = linear(x, weight, bias)
    assert out.is_contiguous() and out.shape == (rows, 80)
    torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, ONEDNN_MAX_ROWS, ONEDNN_MAX_ROWS + 1, 150])
@pytest.mark.parametrize("with_bias", [False, True])
def test_parts_equal_the_split_product(rows: int, with_bias: bool) -> None:
    projection = Projection(48, 96, bias=with_bias)
    x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        parts = projection.forward_parts(x, (32, 16, 48))
        expected = F.linear(x, projection.weight, projection.bias).split([32, 16, 48], dim=-1)
    assert [p.shape for p in parts] == [(rows, 32), (rows, 16), (rows, 48)]
    # Many rows: one product per slice, each part contiguous for what follows.
    assert all(p.is_contiguous() for p in parts) == (rows > ONEDNN_MAX_ROWS)
    for part, want in zip(parts, expected, strict=True):
        torch.testing.assert_close(part, want, atol=1e-4, rtol=1e-5)


def test_float32_cpu_products_take_onednn_where_torch_has_it() -> None:
    x, weight = torch.randn(40, 48), torch.randn(80, 48)
    assert onednn_serves(x, weight) == (_ONEDNN_LINEAR is not None)
    assert not onednn_serves(x.bfloat16(), weight.bfloat16())
    assert not onednn_serves(x[None], weight)


def test_empty_and_strided_inputs_match_f_linear() -> None:
    weight = torch.randn(80, 48)
    empty = linear(torch.randn(0, 48), weight)
    assert empty.shape == (0, 80)
    strided = torch.randn(48, 40).t()
    torch.testing.assert_close(linear(strided, weight), F.linear(strided, weight))
