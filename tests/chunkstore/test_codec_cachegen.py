"""The CacheGen-style codec: error bounds, layer plan, deltas, and the tiers using it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragcache.chunkstore import ChunkStoreConfig, CorruptEntryError, get_codec
from ragcache.chunkstore.codec_cachegen import CacheGenPlan, channel_steps, encode
from ragcache.chunkstore.lmdb_tier import LMDBTier
from tests.chunkstore.helpers import make_entry


def kv_like(tokens: int = 64, heads: int = 2, head_dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Channels with their own offsets and spreads, some smooth along the tokens."""
    generator = torch.Generator().manual_seed(seed)
    shape = (tokens, heads * head_dim)
    offsets = torch.randn(shape[1], generator=generator) * 3
    spreads = torch.rand(shape[1], generator=generator) * 2 + 0.1
    noise = torch.randn(shape, generator=generator)
    walk = torch.cumsum(torch.randn(shape, generator=generator) * 0.1, dim=0)
    smooth = torch.arange(shape[1]) % 2 == 0
    values = torch.where(smooth, walk, noise) * spreads + offsets
    return values.reshape(tokens, heads, head_dim)


def decode(blob: bytes, like: torch.Tensor) -> torch.Tensor:
    return get_codec("cachegen").decode(blob, like.dtype, tuple(like.shape))


@pytest.mark.parametrize("step", [0.25, 0.7, 2.0])
def test_every_value_decodes_within_half_its_channel_step(step: float) -> None:
    tensor = kv_like()
    blob = encode(tensor, step)
    got = decode(blob, tensor)
    bound = torch.from_numpy(channel_steps(blob)).reshape(tensor.shape[1:]) / 2
    assert ((got - tensor).abs() <= bound * 1.001 + 1e-6).all()


def test_the_plan_sets_steps_per_layer_group_for_k_and_v() -> None:
    plan = CacheGenPlan((1 / 3, 2 / 3, 1.0), (0.4, 0.7, 1.0), (1.5, 1.0, 2.0))
    assert [plan.step_for(layer, 30, "k") for layer in (0, 9, 10, 19, 20, 29)] == [
        0.4, 0.4, 0.7, 0.7, 1.0, 1.0,
    ]  # fmt: skip
    assert [plan.step_for(layer, 30, "v") for layer in (0, 10, 29)] == [1.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="one of value_steps per layer group"):
        CacheGenPlan((0.5, 1.0), (0.4, 0.7), (1.0,))


def test_finer_steps_spend_more_bytes_for_less_error() -> None:
    codec = get_codec("cachegen")
    tensor = kv_like(tokens=128)
    fine = codec.encode_for_layer(tensor, 15, 30, "k")  # the default plan's finest
    coarse = codec.encode_for_layer(tensor, 29, 30, "v")  # and its coarsest
    assert len(fine) > len(coarse)
    fine_error = (decode(fine, tensor) - tensor).abs().mean()
    coarse_error = (decode(coarse, tensor) - tensor).abs().mean()
    assert fine_error < coarse_error


def test_smooth_channels_are_coded_as_token_deltas() -> None:
    walk = torch.cumsum(torch.randn(256, 2, 8, generator=torch.Generator().manual_seed(1)), 0)
    shuffled = walk[torch.randperm(256, generator=torch.Generator().manual_seed(2))]
    smooth_blob, shuffled_blob = encode(walk, 0.05), encode(shuffled, 0.05)
    assert len(smooth_blob) < 0.8 * len(shuffled_blob)
    assert torch.allclose(decode(smooth_blob, walk), walk, atol=float(walk.std()))


def test_several_times_smaller_than_int8() -> None:
    tensor = kv_like(tokens=512, heads=3, head_dim=64)
    int8 = get_codec("int8").encoded_size(tuple(tensor.shape), tensor.dtype)
    assert len(encode(tensor, 0.7)) * 2.5 < int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decodes_into_the_stored_dtype(dtype: torch.dtype) -> None:
    tensor = kv_like(tokens=17).to(dtype)
    got = decode(encode(tensor, 0.5), tensor)
    assert got.dtype == dtype
    assert (got.float() - tensor.float()).abs().max() < tensor.float().abs().max() / 4


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(5, 2, 4), torch.full((3, 1, 4), 7.5), torch.randn(1, 2, 4)],
    ids=["zeros", "constant", "one-token"],
)
def test_degenerate_tensors_round_trip(tensor: torch.Tensor) -> None:
    got = decode(encode(tensor, 0.5), tensor)
    assert torch.allclose(got, tensor, atol=1e-2)


def test_a_damaged_stream_is_reported_as_corrupt() -> None:
    tensor = kv_like()
    blob = bytearray(encode(tensor, 0.5))
    blob[-9] ^= 0x5A
    with pytest.raises(CorruptEntryError):
        decode(bytes(blob), tensor)
    with pytest.raises(CorruptEntryError):
        decode(bytes(blob[:1]) + b"\x07" + bytes(blob[2:]), tensor)


def test_disk_tier_reads_cachegen_records_layer_by_layer(tmp_path: Path) -> None:
    config = ChunkStoreConfig(disk_codec="cachegen", disk_initial_map_bytes=1 << 20)
    tier = LMDBTier(tmp_path, config)
    entry = make_entry(3, num_tokens=40, num_layers=6, head_dim=16, dtype=torch.float32)
    prepared = tier.prepare(entry)
    assert prepared.nbytes < get_codec("int8").encoded_size((40, 2, 16), torch.float32) * 12
    tier.put(prepared)
    layers = list(tier.iter_layers(entry.key, [5, 0]))
    assert [layer for layer, _ in layers] == [5, 0]
    for layer, (k, v) in layers:
        k_ref, v_ref = entry.layers[layer]
        assert k.dtype == torch.float32
        assert (k - k_ref).abs().max() < 0.5 * k_ref.abs().max()
        assert (v - v_ref).abs().max() < 0.5 * v_ref.abs().max()
    whole = tier.get(entry.key)
    assert whole is not None and whole.num_layers == 6
    k_errors = [
        float((k - r).abs().mean())
        for (k, _), (r, _) in zip(whole.layers, entry.layers, strict=True)
    ]
    v_errors = [
        float((v - r).abs().mean())
        for (_, v), (_, r) in zip(whole.layers, entry.layers, strict=True)
    ]
    assert k_errors[2] < k_errors[0]  # the default plan's middle K is its finest
    assert v_errors[0] < v_errors[-1]
    tier.close()
