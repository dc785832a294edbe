"""Times each Triton kernel against its torch reference on a CUDA GPU.

    python -m ragcache.bench.kernels --dtype float16 --out bench_kernels.json

Prints one table row per case and writes the rows, with the device and versions, as JSON.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ragcache.bench.report import write_json
from ragcache.kernels import paged_attention, rope

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(slots=True)
class BenchRow:
    kernel: str
    shape: str
    reference_ms: float
    triton_ms: float
    max_abs_diff: float

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.triton_ms


@dataclass(slots=True)
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    query_slots: torch.Tensor
    max_query_len: int
    scale: float


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_batch(
    seq_len: int,
    query_slots: list[list[int]],
    dtype: torch.dtype,
    block_size: int,
    num_q_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
) -> PagedBatch:
    """Sequences of ``seq_len`` cached slots on shuffled blocks, querying ``query_slots``."""
    num_seqs = len(query_slots)
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = num_seqs * blocks_per_seq
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    counts = [len(slots) for slots in query_slots]
    starts = torch.tensor([0, *counts]).cumsum(0)
    return PagedBatch(
        q=torch.randn(sum(counts), num_q_heads, head_dim, dtype=dtype, device="cuda"),
        k_cache=torch.randn(cache_shape, dtype=dtype, device="cuda"),
        v_cache=torch.randn(cache_shape, dtype=dtype, device="cuda"),
        block_tables=torch.randperm(num_blocks, device="cuda")
        .view(num_seqs, blocks_per_seq)
        .to(torch.int32),
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda"),
        query_start_loc=starts.to(torch.int32).cuda(),
        query_slots=torch.tensor(
            [s for slots in query_slots for s in slots], dtype=torch.int32, device="cuda"
        ),
        max_query_len=max(counts),
        scale=head_dim**-0.5,
    )


def compare(
    kernel: str,
    shape: str,
    reference: Callable[[], torch.Tensor],
    triton_fn: Callable[[], torch.Tensor],
    warmup: int,
    iters: int,
) -> BenchRow:
    diff = (reference().float() - triton_fn().float()).abs().max().item()
    return BenchRow(
        kernel=kernel,
        shape=shape,
        reference_ms=median_ms(reference, warmup, iters),
        triton_ms=median_ms(triton_fn, warmup, iters),
        max_abs_diff=diff,
    )


def bench_all(dtype: torch.dtype, block_size: int, warmup: int, iters: int) -> list[BenchRow]:
    from ragcache.kernels.triton_paged_attention import (
        paged_decode_attention_triton,
        paged_prefill_attention_triton,
    )
    from ragcache.kernels.triton_rope import rotate_triton
    from ragcache.kernels.triton_write_kv import write_kv_triton

    rows = []
    keys = torch.randn(8192, 8, 128, dtype=dtype, device="cuda")
    deltas = torch.randint(-4096, 4096, (8192,), device="cuda")
    inv_freq = rope.rope_inv_freq(128, 500000.0, device=torch.device("cuda"))
    rows.append(
        compare(
            "rope",
            "T=8192 H=8 D=128",
            lambda: rope.rotate_ref(keys, deltas, inv_freq),
            lambda: rotate_triton(keys, deltas, inv_freq),
            warmup,
            iters,
        )
    )

    ref_pool = make_batch(4096, [[0]] * 4, dtype, block_size)
    triton_pool = make_batch(4096, [[0]] * 4, dtype, block_size)
    slots = torch.randperm(ref_pool.k_cache.shape[0] * block_size, device="cuda")[:4096]
    new_k, new_v = keys[:4096], keys[4096:]

    def write(fn: Callable[..., None], pool: PagedBatch) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            fn(pool.k_cache, pool.v_cache, slots, new_k, new_v)
            return pool.k_cache.view(-1, *pool.k_cache.shape[2:])[slots]

        return run

    rows.append(
        compare(
            "write_kv",
            "T=4096 Hkv=8 D=128",
            write(paged_attention.write_kv_ref, ref_pool),
            write(write_kv_triton, triton_pool),
            warmup,
            iters,
        )
    )

    for num_seqs, seq_len in [(32, 1024), (8, 8192)]:
        batch = make_batch(seq_len, [[seq_len - 1]] * num_seqs, dtype, block_size)
        decode_args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables)
        rows.append(
            compare(
                "decode",
                f"S={num_seqs} L={seq_len} Hq=32 Hkv=8 D=128",
                lambda a=decode_args, b=batch: paged_attention.paged_decode_attention_ref(
                    *a, b.seq_lens, b.scale
                ),
                lambda a=decode_args, b=batch: paged_decode_attention_triton(
                    *a, b.seq_lens, b.scale
                ),
                warmup,
                iters,
            )
        )

    prefill_cases = {
        "prefill after 2048 cached": [list(range(2048, 2560))] * 4,
        "blend every 7th of 2560": [list(range(0, 2560, 7))] * 4,
    }
    for name, query_slots in prefill_cases.items():
        batch = make_batch(2560, query_slots, dtype, block_size)
        args = (
            batch.q,
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.query_slots,
            batch.scale,
        )
        rows.append(
            compare(
                name,
                f"S=4 Q={batch.max_query_len} L=2560 Hq=32 Hkv=8 D=128",
                lambda a=args: paged_attention.paged_attention_ref(*a),
                lambda a=args, b=batch: paged_prefill_attention_triton(
                    *a, max_query_len=b.max_query_len
                ),
                warmup,
                iters,
            )
        )
    return rows


def print_table(rows: list[BenchRow]) -> None:
    header = (
        f"{'kernel':<28}{'shape':<34}{'torch ms':>10}{'triton ms':>11}"
        f"{'speedup':>9}{'max diff':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.kernel:<28}{row.shape:<34}{row.reference_ms:>10.3f}{row.triton_ms:>11.3f}"
            f"{row.speedup:>8.2f}x{row.max_abs_diff:>10.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ragcache bench kernels", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per case")
    parser.add_argument("--iters", type=int, default=30, help="timed runs per case")
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_kernels needs a CUDA GPU, and torch sees none "
            "(torch.cuda.is_available() is False); the kernels' CPU tests are in tests/kernels"
        )
    import triton

    torch.manual_seed(0)
    rows = bench_all(DTYPES[args.dtype], args.block_size, args.warmup, args.iters)
    print(f"{torch.cuda.get_device_name()}  {args.dtype}  block_size={args.block_size}")
    print_table(rows)
    if args.out:
        report = {
            "device": torch.cuda.get_device_name(),
            "dtype": args.dtype,
            "block_size": args.block_size,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "rows": [asdict(row) | {"speedup": row.speedup} for row in rows],
        }
        write_json(args.out, report)


if __name__ == "__main__":
    main()
