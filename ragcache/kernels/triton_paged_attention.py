"""Triton attention over the paged KV pool: a decode kernel and a prefill kernel.

Both stream one KV block per step through an online softmax with fp32 accumulation.
A tile's rows are (query token, query head) pairs that share one KV head, so every
head of a GQA group reuses each loaded K and V block. Causality is by slot, as in
``paged_attention.paged_attention_ref``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREFILL_ROWS = 64
_DECODE_MIN_ROWS = 16  # tl.dot needs at least 16 rows


@triton.jit
def _attend_blocks(
    q,
    row_last_slot,
    kv_len,
    block_table_ptr,
    k_cache_ptr,
    v_cache_ptr,
    kv_head,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_vd,
    qk_scale_log2,
    ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Softmax-weighted V [ROWS, BLOCK_D] of q over slots [0, kv_len), row r seeing
    slots <= row_last_slot[r]. Every row must see slot 0, so no row stays at -inf."""
    offs_o = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for j in range(tl.cdiv(kv_len, BLOCK_SIZE)):
        block = tl.load(block_table_ptr + j).to(tl.int64)
        slots = j * BLOCK_SIZE + offs_o
        # Unwritten pool slots may hold NaN; zero them so 0 * NaN never reaches acc.
        kv_mask = (slots < kv_len)[:, None] & d_mask[None, :]
        k = tl.load(
            k_cache_ptr
            + block * stride_kb
            + offs_o[:, None] * stride_ko
            + kv_head * stride_kh
            + offs_d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_cache_ptr
            + block * stride_vb
            + offs_o[:, None] * stride_vo
            + kv_head * stride_vh
            + offs_d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = slots[None, :] <= row_last_slot[:, None]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc / l_i[:, None]


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qk_scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_vd,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_g = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask,
        other=0.0,
    )
    seq_len = tl.load(seq_lens_ptr + seq)
    row_last_slot = tl.zeros([ROWS], tl.int32) + (seq_len - 1)
    out = _attend_blocks(
        q,
        row_last_slot,
        seq_len,
        block_tables_ptr + seq.to(tl.int64) * stride_bt,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        stride_kb,
        stride_ko,
        stride_kh,
        stride_kd,
        stride_vb,
        stride_vo,
        stride_vh,
        stride_vd,
        qk_scale_log2,
        ROWS,
        BLOCK_SIZE,
        HEAD_DIM,
        BLOCK_D,
        DOT_PRECISION,
    )
    tl.store(
        out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    query_slots_ptr,
    qk_scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vo,
    stride_vh,
    stride_vd,
    GROUP: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_end = tl.load(query_start_loc_ptr + seq + 1)
    tile_start = query_start + tl.program_id(1) * TILE_TOKENS
    if tile_start < query_end:
        rows = tl.arange(0, ROWS)
        tokens = tile_start + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        row_valid = (rows < TILE_TOKENS * GROUP) & (tokens < query_end)
        offs_d = tl.arange(0, BLOCK_D)
        mask = row_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(
            q_ptr
            + tokens[:, None] * stride_qt
            + heads[:, None] * stride_qh
            + offs_d[None, :] * stride_qd,
            mask=mask,
            other=0.0,
        )
        # Padding rows see slot 0 only, which keeps their softmax finite.
        row_last_slot = tl.load(query_slots_ptr + tokens, mask=row_valid, other=0)
        out = _attend_blocks(
            q,
            row_last_slot,
            tl.max(row_last_slot, 0) + 1,
            block_tables_ptr + seq.to(tl.int64) * stride_bt,
            k_cache_ptr,
            v_cache_ptr,
            kv_head,
            stride_kb,
            stride_ko,
            stride_kh,
            stride_kd,
            stride_vb,
            stride_vo,
            stride_vh,
            stride_vd,
            qk_scale_log2,
            ROWS,
            BLOCK_SIZE,
            HEAD_DIM,
            BLOCK_D,
            DOT_PRECISION,
        )
        tl.store(
            out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence at its last slot: q [S, Hq, D] -> [S, Hq, D]."""
    group = _check_common(q, k_cache, v_cache, block_tables, seq_lens)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"decode takes one query per sequence: q has {q.shape[0]} tokens "
            f"for {seq_lens.shape[0]} sequences"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    block_tables = block_tables.contiguous()
    grid = (q.shape[0], num_kv_heads)
    _paged_decode_kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens.contiguous(),
        scale * math.log2(math.e),
        *q.stride(),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        *k_cache.stride(),
        *v_cache.stride(),
        GROUP=group,
        ROWS=max(_DECODE_MIN_ROWS, triton.next_power_of_2(group)),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over each sequence's paged KV, causal by slot.

    Arguments as in ``paged_attention_ref``. ``max_query_len`` (the most query tokens of
    any one sequence) sizes the grid; without it, it is read from ``query_start_loc``.
    """
    group = _check_common(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.is_floating_point():
        raise ValueError(
            f"query_start_loc must be an integer tensor of shape [{num_seqs + 1}], "
            f"got {query_start_loc.dtype} {tuple(query_start_loc.shape)}"
        )
    if query_slots.shape != (q.shape[0],) or query_slots.is_floating_point():
        raise ValueError(
            f"query_slots must be an integer tensor of shape [{q.shape[0]}], "
            f"got {query_slots.dtype} {tuple(query_slots.shape)}"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return out
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    block_tables = block_tables.contiguous()
    rows = max(_PREFILL_ROWS, triton.next_power_of_2(group))
    tile_tokens = rows // group
    grid = (num_seqs, triton.cdiv(max_query_len, tile_tokens), num_kv_heads)
    _paged_prefill_kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc.contiguous(),
        query_slots.contiguous(),
        scale * math.log2(math.e),
        *q.stride(),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        *k_cache.stride(),
        *v_cache.stride(),
        GROUP=group,
        TILE_TOKENS=tile_tokens,
        ROWS=rows,
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise be rounded to tf32 on tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_common(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> int:
    """Validate the shared arguments and return the GQA group size Hq // Hkv."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} differs from the cache's {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if q.dtype not in _SUPPORTED_DTYPES or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(
            "q, k_cache and v_cache must share one dtype of float16, bfloat16 or float32, "
            f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            "block_tables must be [num_seqs, max_blocks] and seq_lens [num_seqs], "
            f"got {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}"
        )
    if block_tables.is_floating_point() or seq_lens.is_floating_point():
        raise ValueError("block_tables and seq_lens must be integer tensors")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return num_q_heads // num_kv_heads
