"""Projection products on CPU: MKL's ``F.linear`` against oneDNN, the weight-major product,
exact block copies and one product per output slice.

    python -m ragcache.bench.linear --out eval/reports/bench_linear.json

Times one decoder layer's projections of SmolLM2-135M's shape (fused q/k/v 960 x 576,
o 576 x 576, fused gate/up 3072 x 576, down 576 x 1536) for a range of token rows, in
float32, over 30 layers' worth of distinct random weights so that small products
stream their weights from memory as a real forward does. The weights are made of Q4_1
blocks, as the embedded SmolLM2's are, so the exact block copy (``block_weights``) can
be timed on them; "per slice" multiplies the fused q/k/v and gate/up weights one output
slice at a time (``Projection.forward_parts``). Each product is timed in the
same run, best of ``--repeats``; the table gives milliseconds per layer and each
product's speed relative to ``F.linear``. ``ragcache.engine.linear`` picks its product
per row count from these figures.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ragcache.bench.report import (
    add_threads,
    bench_parser,
    report_header,
    set_threads,
    write_report,
)
from ragcache.engine.block_weights import Q41Blocks, exact_blocks
from ragcache.engine.linear import (
    _ONEDNN_LINEAR,
    ONEDNN_MAX_ROWS,
    SKINNY_MAX_ROWS,
    sliced_linear,
)
from ragcache.engine.packed_weights import MAX_ROWS
from ragcache.kernels.block_gemv import block_kernels

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
# Output slices of the fused weights: q, k, v and gate, up.
SLICES = {(960, 576): (576, 192, 192), (3072, 576): (1536, 1536)}
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


def per_slice(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return sliced_linear(x, weight, None, SLICES.get(tuple(weight.shape), (weight.shape[0],)))


def products(rows: int, copies: dict[int, Q41Blocks]) -> dict[str, Product]:
    out: dict[str, Product] = {"F.linear (MKL)": lambda x, w: F.linear(x, w)}
    if _ONEDNN_LINEAR is not None:
        onednn = _ONEDNN_LINEAR
        out["oneDNN"] = lambda x, w: onednn(x, w, None, "none", [], "")
    if rows <= SKINNY_MAX_ROWS:
        out["weight-major"] = lambda x, w: torch.mm(w, x.t()).t().contiguous()
    if copies and rows <= MAX_ROWS["exact_blocks"]:
        out["exact blocks"] = lambda x, w: copies[id(w)].matmul(x)
    if rows > ONEDNN_MAX_ROWS:
        out["per slice (MKL)"] = per_slice
    return out


def q4_1_weight(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A random weight made of Q4_1 blocks: ``q * d + m`` with fp16 ``d`` and ``m``."""
    rows, cols = shape
    codes = torch.randint(0, 16, (rows, cols // 32, 32), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 15  # as GGUF's quantiser gives: the range is used
    step = (torch.rand(rows, cols // 32, 1, generator=generator) * 0.02).half().float()
    low = (-torch.rand(rows, cols // 32, 1, generator=generator) * 0.15).half().float()
    return (codes * step + low).reshape(rows, cols)


def time_layer(
    product: Product, layers: list[list[torch.Tensor]], inputs: dict[tuple[int, int], Any]
) -> float:
    start = time.perf_counter()
    for weights in layers:
        for weight in weights:
            product(inputs[tuple(weight.shape)], weight)
    return (time.perf_counter() - start) / len(layers)


def run(rows_list: list[int], num_layers: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    layers = [[q4_1_weight(shape, generator) for shape in LAYER_SHAPES] for _ in range(num_layers)]
    copies: dict[int, Q41Blocks] = {}
    if block_kernels() is not None:
        for weight in (w for layer in layers for w in layer):
            found = exact_blocks(weight)
            assert isinstance(found, Q41Blocks)
            copies[id(weight)] = found
    results = []
    for rows in rows_list:
        inputs = {s: torch.randn(rows, s[1], generator=generator) for s in LAYER_SHAPES}
        # Large products are compute-bound: a few layers give the same per-layer time.
        timed_layers = layers if rows <= 128 else layers[:4]
        candidates = products(rows, copies)
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(repeats):
            for name, product in candidates.items():
                best[name] = min(best[name], time_layer(product, timed_layers, inputs))
        baseline = best["F.linear (MKL)"]
        for name, seconds in best.items():
            results.append(
                {
                    "rows": rows,
                    "product": name,
                    "ms_per_layer": seconds * 1e3,
                    "speedup_vs_f_linear": baseline / seconds,
                }
            )
            print(f"rows {rows:5d}  {name:18s} {seconds * 1e3:8.2f} ms  {baseline / seconds:5.2f}x")
    return results


def markdown_page(report: dict[str, Any]) -> list[str]:
    names = list(dict.fromkeys(r["product"] for r in report["results"]))
    lines = [
        "# bench_linear: projection products on CPU (one SmolLM2 layer, float32)",
        "",
        f"    {report['command']}",
        "",
        f"torch {report['machine']['torch']}, {report['machine']['threads']} threads, load "
        f"average at start {report['machine']['load_average_at_start']}. Milliseconds per "
        "layer (fused q/k/v, o, fused gate/up, down; Q4_1-block weights), best of the "
        "repeats; in brackets the speed relative to `F.linear` in the same run.",
        "",
        "| rows | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for rows in dict.fromkeys(r["rows"] for r in report["results"]):
        cells = []
        for name in names:
            match = [r for r in report["results"] if r["rows"] == rows and r["product"] == name]
            cells.append(
                f"{match[0]['ms_per_layer']:.2f} ({match[0]['speedup_vs_f_linear']:.2f}x)"
                if match
                else ""
            )
        lines.append(f"| {rows} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser("linear", __doc__, "eval/reports/bench_linear.json")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 128, 512, 2048])
    parser.add_argument("--layers", type=int, default=30, help="distinct weight sets (layers)")
    parser.add_argument("--repeats", type=int, default=3)
    add_threads(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or args.layers < 1 or args.repeats < 1:
        parser.error("--rows, --layers and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    header = report_header("linear")
    with torch.inference_mode():
        results = run(args.rows, args.layers, args.repeats, args.seed)
    report = {**header, "results": results}
    write_report(args.out, report, markdown_page(report))


if __name__ == "__main__":
    main()
