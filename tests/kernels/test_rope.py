"""RoPE: the torch reference against complex rotation and transformers, and the
Triton rotation against the reference under the Triton interpreter."""

import pytest
import torch

from ragcache.kernels.rope import (
    apply_rope_full_width,
    apply_rope_ref,
    rope_cos_sin,
    rope_full_width,
    rope_inv_freq,
    rotate_ref,
)
from ragcache.kernels.triton_rope import rotate_triton

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _complex_rotation(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """Rotate-half RoPE as multiplication of (x1 + i x2) by e^(i p w), in float64."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    angles = positions.double()[:, None, None] * inv_freq.double()[None, None, :]
    rotated = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([rotated.real, rotated.imag], dim=-1)


def test_default_inv_freq_is_theta_to_the_minus_two_i_over_d() -> None:
    expected = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)])
    torch.testing.assert_close(rope_inv_freq(64, 10000.0), expected)


def test_linear_scaling_divides_every_frequency() -> None:
    scaled = rope_inv_freq(64, 10000.0, {"type": "linear", "factor": 4.0})
    torch.testing.assert_close(scaled, rope_inv_freq(64, 10000.0) / 4)


def test_unknown_scaling_is_rejected() -> None:
    with pytest.raises(ValueError, match="supported: default, linear, llama3"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_llama3_inv_freq_matches_transformers() -> None:
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    parameters = {"rope_theta": 500000.0, **LLAMA3_SCALING}
    try:
        config = LlamaConfig(
            hidden_size=512,
            num_attention_heads=4,
            head_dim=128,
            max_position_embeddings=131072,
            rope_parameters=parameters,
        )
        expected, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    except (TypeError, KeyError, AttributeError) as error:
        pytest.skip(f"this transformers version takes llama3 rope settings differently: {error}")
    actual = rope_inv_freq(128, 500000.0, LLAMA3_SCALING)
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=0)
    unscaled = rope_inv_freq(128, 500000.0)
    assert torch.equal(actual[:4], unscaled[:4])
    assert (actual[-4:] < unscaled[-4:]).all()


def test_rotate_ref_is_complex_rotation() -> None:
    x = torch.randn(6, 3, 64)
    positions = torch.tensor([0, 1, 7, -3, 1000, -4095])
    inv_freq = rope_inv_freq(64, 10000.0)
    expected = _complex_rotation(x, positions, inv_freq)
    # fp32 angles of |p| ~ 4e3 carry ~1e-4 rad of rounding.
    torch.testing.assert_close(
        rotate_ref(x, positions, inv_freq).double(), expected, atol=2e-3, rtol=0
    )


def test_rotate_ref_composes_additively() -> None:
    x = torch.randn(5, 2, 64)
    p, delta = torch.tensor([0, 3, 50, 200, 900]), torch.tensor([7, -3, 11, -150, 4])
    inv_freq = rope_inv_freq(64, 10000.0, LLAMA3_SCALING)
    twice = rotate_ref(rotate_ref(x, p, inv_freq), delta, inv_freq)
    torch.testing.assert_close(twice, rotate_ref(x, p + delta, inv_freq), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "num_heads", "head_dim", "tol"),
    [
        (torch.float32, 3, 64, 1e-4),
        (torch.float16, 20, 64, 2e-2),
        (torch.float32, 2, 128, 1e-4),
    ],
)
@pytest.mark.parametrize("position_dtype", [torch.int64, torch.int32])
def test_rotate_triton_matches_reference(
    dtype: torch.dtype, num_heads: int, head_dim: int, tol: float, position_dtype: torch.dtype
) -> None:
    x = torch.randn(7, num_heads, head_dim).to(dtype)
    positions = torch.tensor([0, 1, -1, 17, -300, 4096, -8191], dtype=position_dtype)
    inv_freq = rope_inv_freq(head_dim, 10000.0)
    actual = rotate_triton(x, positions, inv_freq)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, rotate_ref(x, positions, inv_freq), atol=tol, rtol=tol)


def test_rotate_triton_reads_non_contiguous_keys() -> None:
    qkv = torch.randn(4, 6, 64)
    keys = qkv[:, 4:]
    positions = torch.tensor([-5, 0, 5, 500])
    inv_freq = rope_inv_freq(64, 500000.0, LLAMA3_SCALING)
    expected = rotate_ref(keys.contiguous(), positions, inv_freq)
    torch.testing.assert_close(rotate_triton(keys, positions, inv_freq), expected)


def test_rotate_triton_there_and_back_is_identity() -> None:
    x = torch.randn(6, 2, 64)
    positions = torch.tensor([0, 1, 33, 512, 2047, 10000])
    inv_freq = rope_inv_freq(64, 10000.0)
    back = rotate_triton(rotate_triton(x, positions, inv_freq), -positions, inv_freq)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_rotate_triton_rejects_bad_inputs() -> None:
    inv_freq = rope_inv_freq(64, 10000.0)
    with pytest.raises(ValueError, match="integer tensor"):
        rotate_triton(torch.randn(2, 1, 64), torch.tensor([0.0, 1.0]), inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        rotate_triton(torch.randn(2, 1, 32), torch.tensor([0, 1]), inv_freq)
    with pytest.raises(ValueError, match="even"):
        rotate_triton(torch.randn(2, 1, 63), torch.tensor([0, 1]), inv_freq)


def test_full_width_rope_is_bit_identical_to_the_reference() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(37, 5, 64, generator=generator) * 4
    positions = torch.randint(0, 8000, (37,), generator=generator)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(64, 10000.0))
    expected = apply_rope_ref(x, cos, sin)
    assert torch.equal(apply_rope_full_width(x, *rope_full_width(cos, sin)), expected)
    # a strided view of a fused projection output rotates the same way
    fused = torch.randn(37, 9 * 64, generator=generator)
    view = fused[:, 64:].view(37, 8, 64)[:, :5]
    assert torch.equal(
        apply_rope_full_width(view, *rope_full_width(cos, sin)), apply_rope_ref(view, cos, sin)
    )
