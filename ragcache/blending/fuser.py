"""Turns a prompt layout and its chunks' cached KV into an engine request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.focus import CacheFocus
from ragcache.blending.layer_pipeline import LayerPipeline, Recompute, StreamedChunk
from ragcache.blending.methods import FusionContext, FusionMethod, FusionPlan, MethodParam
from ragcache.blending.placement import PlacedContext
from ragcache.blending.prompt import PromptLayout
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.engine.model import LlamaModel
from ragcache.engine.sequence import PlacedKV, ResumeFrom


@dataclass(slots=True)
class FusionReport:
    """What fusion did with the retrieved context.

    ``context_tokens`` counts every retrieved chunk's tokens: the ones in the prompt are
    reused or recomputed, the ones CacheFocus pruned (``pruned_tokens``, chunks
    ``pruned_chunks``) are neither. ``chunk_order`` lists the retrieved indices of the
    chunks in the prompt, in prompt order.
    """

    method: str
    context_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    prepare_s: float
    params: dict[str, MethodParam] = field(default_factory=dict)
    chunk_order: list[int] = field(default_factory=list)
    pruned_chunks: list[int] = field(default_factory=list)
    pruned_tokens: int = 0
    selection_fraction: float = 0.0  # work spent choosing, as a share of a full prefill
    exact_tokens: int = 0  # context tokens on an exact tree path (reused, never repaired)
    # Layer-pipelined loading: the loader's time (read, decode, move, place) and the part
    # of it fusion waited for; the rest ran while fusion computed.
    load_s: float = 0.0
    load_wait_s: float = 0.0
    lost_chunks: int = 0  # streamed chunks their tier lost mid-read, computed again

    @property
    def recompute_fraction(self) -> float:
        """Share of context tokens computed again (1.0 for a full prefill)."""
        return self.recomputed_tokens / max(1, self.context_tokens)


@dataclass(slots=True)
class FusedRequest:
    prompt_ids: list[int]
    placed: PlacedKV | None
    use_prefix_cache: bool
    report: FusionReport


def check_on_engine(target: EngineTarget, parts: list[ChunkKV]) -> None:
    """Refuse chunk KV that is not on the engine's device and dtype: a tier's copy
    reaches the engine only through ``EngineTarget.move``."""
    for number, part in enumerate(parts):
        for tensor in (*part.k, *part.v):
            if not target.holds(tensor):
                raise ValueError(
                    f"chunk KV {number} is {tensor.dtype} on {tensor.device}; the engine "
                    f"computes in {target.dtype} on {target.device}: pass a tier's copy "
                    "through EngineTarget.move"
                )


def fuse(
    model: LlamaModel,
    layout: PromptLayout,
    root: ChunkKV,
    chunks: Sequence[ChunkKV | StreamedChunk],
    method: FusionMethod,
    params: dict[str, MethodParam] | None = None,
    exact_chunks: int = 0,
    recompute: Recompute | None = None,
) -> FusedRequest:
    """Place the root and chunks at their offsets and let ``method`` choose the repair.

    The first ``exact_chunks`` chunks carry exact path KV (computed after the root and
    the chunks before them): they are reused as they are and enter the exact prefix.
    CacheFocus first drops and reorders chunks; the prompt is then built from the kept
    ones, so ``prompt_ids`` may be shorter than the layout's.

    A ``StreamedChunk`` still arrives from its tier: its layers are placed while the
    method computes (see ``LayerPipeline``), and ``recompute`` computes it again when
    its tier loses it mid-read.
    """
    began = time.perf_counter()
    if len(chunks) != len(layout.chunk_ids):
        raise ValueError(f"layout has {len(layout.chunk_ids)} chunks, {len(chunks)} KV given")
    for chunk, ids in zip(chunks, layout.chunk_ids, strict=True):
        if chunk.token_ids != ids:
            raise ValueError("a chunk's cached token ids differ from the prompt's chunk ids")
    target = EngineTarget.of(model)
    check_on_engine(target, [root, *(c for c in chunks if isinstance(c, ChunkKV))])
    streamed = any(isinstance(c, StreamedChunk) for c in chunks)
    if streamed and recompute is None:
        raise ValueError("chunks streamed from a tier need a recompute for a lost chunk")
    pipelines: list[LayerPipeline] = []
    if streamed and isinstance(method, CacheFocus):
        # CacheFocus scores whole chunks before it places any: read them first.
        pipelines.append(_pipeline(model, root, list(chunks), target, recompute))
        pipelines[-1].finish()
        chunks = pipelines[-1].chunk_kvs()[1:]
    context = layout.context_end - len(layout.root_ids)
    retrieved = len(chunks)
    order = list(range(retrieved))
    focus_work = 0
    if exact_chunks and isinstance(method, CacheFocus):
        raise ValueError("CacheFocus reorders chunks; it cannot keep an exact path")
    if isinstance(method, CacheFocus) and chunks:
        focused = method.focus(model, layout, root, chunks)
        order = focused.chunk_order
        if focused.relevance is not None:
            focus_work = len(layout.query_ids) * method.layers
        layout = PromptLayout(
            layout.root_ids, [layout.chunk_ids[i] for i in order], layout.query_ids
        )
        chunks = [chunks[i] for i in order]
    kept = layout.context_end - len(layout.root_ids)
    exact_tokens = sum(len(ids) for ids in layout.chunk_ids[:exact_chunks])

    def report(reused: int, selection_work: int = 0) -> FusionReport:
        full_prefill = max(1, len(layout) * model.spec.num_layers)
        selection_work += focus_work
        return FusionReport(
            method.name,
            context,
            reused,
            kept - reused,
            time.perf_counter() - began,
            params or {},
            order,
            sorted(set(range(retrieved)) - set(order)),
            context - kept,
            selection_work / full_prefill,
            exact_tokens,
            sum(p.load_s for p in pipelines),
            sum(p.wait_s for p in pipelines),
            sum(len(p.recomputed) for p in pipelines),
        )

    prompt_ids = layout.prompt_ids
    if not chunks:
        return FusedRequest(prompt_ids, None, True, report(0))
    starts = [0, *layout.chunk_starts]
    pipeline: LayerPipeline | None = None
    if any(isinstance(c, StreamedChunk) for c in chunks):
        pipeline = _pipeline(model, root, list(chunks), target, recompute, starts)
        pipelines.append(pipeline)
        placed = pipeline.placed()
    else:
        parts = [root, *(c for c in chunks if isinstance(c, ChunkKV))]
        placed = PlacedContext.of(parts, starts, model.inv_freq)
    ctx = FusionContext(model, layout, placed.k, placed.v, exact_chunks)
    plan = FusionPlan() if exact_chunks >= len(chunks) else method.plan(ctx)
    if pipeline is not None:
        pipeline.finish()
    if not plan.use_cache:
        return FusedRequest(prompt_ids, None, False, report(0))
    end = layout.context_end if plan.reuse_until is None else plan.reuse_until
    fresh = plan.fresh
    repaired_context = placed.repaired(
        end,
        plan.fresh_layers if fresh is not None else 0,
        fresh.k if fresh is not None else [],
        fresh.v if fresh is not None else [],
        plan.layer_kv,
    )
    recompute = [i for i in plan.recompute if i < end]
    repaired = sum(1 for i in plan.repaired if i < end)
    reused = max(0, end - len(layout.root_ids) - len(recompute) - repaired)
    exact = len(layout.root_ids)
    if plan.exact_prefix is not None and (plan.exact_prefix <= exact or chunks[0].exact):
        exact = plan.exact_prefix
    if all(chunk.exact for chunk in chunks[:exact_chunks]):
        exact = max(exact, min(end, ctx.repair_start))
    # The engine builds each layer of the context when it writes it into its blocks.
    handed = PlacedKV(repaired_context.k, repaired_context.v, recompute, exact)
    handed.resume = resume_state(plan, end, len(prompt_ids), layout.context_end)
    return FusedRequest(prompt_ids, handed, True, report(reused, plan.selection_work))


def resume_state(
    plan: FusionPlan, end: int, prompt_len: int, context_end: int
) -> ResumeFrom | None:
    """Where the engine picks up the tokens it computes: after the layers the method's
    fresh pass (and any deeper candidate pass) computed for them. The prompt tokens after
    the placed ones (the query) bring their KV of those layers along."""
    fresh = plan.fresh
    if fresh is None or plan.resume_layer <= 0 or end != context_end:
        return None
    if fresh.hidden.shape[0] != prompt_len:
        return None
    tail_k: list[torch.Tensor] = []
    tail_v: list[torch.Tensor] = []
    for layer in range(plan.resume_layer):
        if layer < plan.fresh_layers:
            # Copies: a view would keep the pass's whole-prompt K and V alive.
            tail_k.append(fresh.k[layer][end:prompt_len].clone())
            tail_v.append(fresh.v[layer][end:prompt_len].clone())
            continue
        indices, k, v = plan.layer_kv[layer]
        tail = indices >= end
        if int(tail.sum()) != prompt_len - end:
            return None  # the deeper pass did not compute every query token
        order = indices[tail].argsort()
        tail_k.append(k[tail][order])
        tail_v.append(v[tail][order])
    return ResumeFrom(plan.resume_layer, fresh.hidden, tail_k, tail_v)


def _pipeline(
    model: LlamaModel,
    root: ChunkKV,
    chunks: list[ChunkKV | StreamedChunk],
    target: EngineTarget,
    recompute: Recompute | None,
    starts: list[int] | None = None,
) -> LayerPipeline:
    assert recompute is not None
    parts: list[ChunkKV | StreamedChunk] = [root, *chunks]
    if starts is None:  # every chunk after the root, in retrieved order
        starts = [0]
        for part in parts[:-1]:
            starts.append(starts[-1] + len(part.token_ids))
    spec = model.spec
    head_shape = (spec.num_kv_heads, spec.head_dim)
    return LayerPipeline(
        parts, starts, model.inv_freq, target, spec.num_layers, head_shape, recompute
    )


__all__ = ["FusedRequest", "FusionReport", "check_on_engine", "fuse"]
