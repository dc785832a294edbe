import pytest
import torch

from ragcache.chunkstore.codecs import get_codec


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_raw_is_exact(dtype):
    codec = get_codec("raw")
    tensor = (torch.randn(33, 3, 64) * 7).to(dtype)
    data = codec.encode(tensor)
    assert len(data) == codec.encoded_size((33, 3, 64), dtype)
    decoded = codec.decode(data, dtype, (33, 3, 64))
    assert decoded.dtype == dtype and torch.equal(decoded, tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_stays_within_its_bound(dtype):
    codec = get_codec("int8")
    tensor = (torch.randn(40, 3, 64) * torch.linspace(0.01, 30, 40)[:, None, None]).to(dtype)
    data = codec.encode(tensor)
    assert len(data) == codec.encoded_size((40, 3, 64), dtype)
    decoded = codec.decode(data, dtype, (40, 3, 64))
    assert decoded.dtype == dtype
    exact = tensor.float()
    bound = exact.abs().amax(dim=-1, keepdim=True) / 254
    output_rounding = exact.abs() * torch.finfo(dtype).eps
    error = (decoded.float() - exact).abs()
    assert (error <= bound * 1.0001 + output_rounding + 1e-12).all()
    assert error.max() > 0


def test_int8_halves_fp16_bytes_and_handles_zero_rows():
    codec = get_codec("int8")
    tensor = torch.zeros(8, 3, 64, dtype=torch.float16)
    decoded = codec.decode(codec.encode(tensor), torch.float16, (8, 3, 64))
    assert torch.equal(decoded, tensor)
    ratio = codec.encoded_size((600, 3, 64), torch.float16) / (600 * 3 * 64 * 2)
    assert ratio == pytest.approx((64 + 4) / 128)


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match="raw, int8"):
        get_codec("zstd")
