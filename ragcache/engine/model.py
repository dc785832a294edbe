"""The Llama-family forward pass (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV pool.

``forward(input_ids, positions, meta, pool)`` computes flat tokens of many sequences at
once. ``run_layers`` lets a caller compute a subset of tokens in a layer range against
the cached KV of the rest, and a ``LayerHook`` sees each layer's rotated queries and
the pre-RoPE keys and values of the computed tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ragcache.engine.attention_metadata import AttentionMetadata
from ragcache.engine.fused_decode import FusedDecoder
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.linear import Projection, linear
from ragcache.engine.packed_weights import PackedWeight
from ragcache.engine.spec import ModelSpec
from ragcache.kernels import dispatch
from ragcache.kernels.paged_attention import causal_attention_ref, paged_attention_planned
from ragcache.kernels.rope import (
    apply_rope_full_width,
    apply_rope_ref,
    rope_cos_sin,
    rope_full_width,
    rope_inv_freq,
)

LayerHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One op for the formula below (no casts in fp32): a decode step runs 61.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RopeState:
    """cos/sin of one forward call's positions, computed once and shared by all layers."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
        self.positions = positions
        self.inv_freq = inv_freq
        self.cos, self.sin = rope_cos_sin(positions, inv_freq)
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    def subset(self, index: torch.Tensor) -> RopeState:
        state = RopeState.__new__(RopeState)
        state.positions = self.positions[index]
        state.inv_freq = self.inv_freq
        state.cos, state.sin = self.cos[index], self.sin[index]
        state._full = None
        return state

    def full_width(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin over the whole head [T, 1, D], built once per forward."""
        if self._full is None:
            self._full = rope_full_width(self.cos, self.sin)
        return self._full

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_triton(x):
            return dispatch.rotate(x, self.positions, self.inv_freq)
        if x.dtype == torch.float32:
            return apply_rope_full_width(x, *self.full_width())
        return apply_rope_ref(x, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = Projection(spec.hidden_size, self.q_size + 2 * self.kv_size, spec.qkv_bias)
        self.o_proj = Projection(self.q_size, spec.hidden_size, bias=False)
        self.scale = spec.head_dim**-0.5

    def forward(
        self,
        layer: int,
        x: torch.Tensor,
        rope: RopeState,
        meta: AttentionMetadata,
        pool: KVPool,
        hook: LayerHook | None,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.forward_parts(x, (self.q_size, self.kv_size, self.kv_size))
        q = rope.apply(q.view(-1, self.num_heads, self.head_dim))
        k_pre = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k = rope.apply(k_pre)
        if hook is not None:
            hook(layer, q, k_pre, v)
        k_cache, v_cache = pool.layer(layer)
        dispatch.write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        if meta.fresh and not q.is_cuda:
            out = self._fresh_attention(q, k, v, meta)
        elif not dispatch.use_triton(q):
            plans = meta.cpu_plans(k_cache.shape[1])
            out = paged_attention_planned(q, k_cache, v_cache, plans, self.scale)
        else:
            out = dispatch.paged_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                meta.query_slots,
                self.scale,
                meta.max_query_len,
            )
        return self.o_proj(out.reshape(-1, self.q_size))

    def _fresh_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        starts = meta.query_start_loc.tolist()
        if len(starts) == 2:
            return causal_attention_ref(q, k, v, self.scale)
        out = torch.empty_like(q)
        for a, b in itertools.pairwise(starts):
            if b > a:
                out[a:b] = causal_attention_ref(q[a:b], k[a:b], v[a:b], self.scale)
        return out


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.intermediate = spec.intermediate_size
        self.gate_up_proj = Projection(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = Projection(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.forward_parts(x, (self.intermediate, self.intermediate))
        # gate is this call's own product (or a slice of it): it takes the result in place.
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head: nn.Linear | None = None
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # A plain attribute, not a buffer: it must stay fp32 when the weights are cast.
        self.inv_freq = self.rope_inv_freq_for(spec)
        self.output_packed: PackedWeight | None = None
        self.fused_decoder: FusedDecoder | None = None

    @staticmethod
    def rope_inv_freq_for(spec: ModelSpec) -> torch.Tensor:
        return rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling, device="cpu")

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rope(self, positions: torch.Tensor) -> RopeState:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return RopeState(positions, self.inv_freq)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def run_layers(
        self,
        hidden: torch.Tensor,
        rope: RopeState,
        meta: AttentionMetadata,
        pool: KVPool,
        layers: range | None = None,
        hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """Run decoder layers (all, or a range) on the computed tokens' hidden states."""
        for index in layers if layers is not None else range(self.spec.num_layers):
            layer = self.layers[index]
            # Residual sums land in each block's fresh output (a + b is b + a exactly), so
            # the caller's hidden states are never written.
            attn_in = layer.input_layernorm(hidden)
            hidden = layer.self_attn(index, attn_in, rope, meta, pool, hook).add_(hidden)
            hidden = layer.mlp(layer.post_attention_layernorm(hidden)).add_(hidden)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        pool: KVPool,
        hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """Hidden states after all layers (before the final norm) of the computed tokens."""
        fused = self.fused_decoder
        if hook is None and fused is not None and fused.serves(input_ids.shape[0], pool):
            return fused(input_ids, positions, meta, pool)
        return self.run_layers(self.embed(input_ids), self.rope(positions), meta, pool, None, hook)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden)
        fused = self.fused_decoder
        logits = fused.logits(normed) if fused is not None else None
        if logits is not None:
            return logits
        return linear(normed, self.output_weight(), packed=self.output_packed).float()

    def pack_weights(self, mode: str = "int4_bf16") -> int:
        """Give each projection and the output layer a block copy (``mode`` of
        ``packed_weights``) where its weight is made of exact blocks; returns the bytes
        the copies take."""
        added = 0
        for module in self.modules():
            if isinstance(module, Projection):
                module.packed = PackedWeight.of(module.weight, mode)
                added += module.packed.nbytes if module.packed is not None else 0
        self.output_packed = PackedWeight.of(self.output_weight(), mode)
        return added + (self.output_packed.nbytes if self.output_packed is not None else 0)

    def use_fused_decode(self, enabled: bool = True) -> bool:
        """Let forward calls of a few tokens take the compiled step where it applies;
        returns whether it does."""
        self.fused_decoder = FusedDecoder.of(self) if enabled else None
        return self.fused_decoder is not None


def hf_state_dict_to_ours(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, Any]:
    """Rename transformers' Llama-family weights and fuse q/k/v and gate/up projections."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = name.removeprefix("model.")
        if key.startswith("layers.") and any(
            part in key for part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        ):
            continue
        if key == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        if "rotary_emb" in key:
            continue
        out[key] = tensor
    for i in range(spec.num_layers):
        prefix = (
            f"model.layers.{i}."
            if f"model.layers.{i}.self_attn.q_proj.weight" in state
            else (f"layers.{i}.")
        )
        attn = prefix + "self_attn."
        try:
            out[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [state[attn + f"{p}_proj.weight"] for p in ("q", "k", "v")]
            )
            if spec.qkv_bias:
                out[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                    [state[attn + f"{p}_proj.bias"] for p in ("q", "k", "v")]
                )
            mlp = prefix + "mlp."
            out[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]]
            )
        except KeyError as missing:
            raise ValueError(f"checkpoint lacks tensor {missing.args[0]!r}") from None
    return out
