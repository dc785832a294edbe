"""Iteration-level scheduling with chunked prefill, preemption and two policies.

Every step takes decodes first (one token each), then continues or admits prefills
until the step's token budget is spent. When a decode finds no free block, the
lowest-priority running sequence is preempted: its blocks are freed and, later, its
KV is either recomputed from its kept tokens or copied back from host memory where
it was swapped; both give the same output.

Policies order the candidates: FCFS by arrival; the skip-join multi-level feedback
queue (FastServe) starts a request at the level its prompt length earns, demotes it
after a quantum of steps, and promotes anything that waited too long; cache-aware
(RAGCache) runs first the requests with the most cached KV per token to compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

from ragcache.engine.block_manager import BlockManager, chain_hash
from ragcache.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    token_indices: list[int]
    # Speculative tokens computed after the last one, at the next positions (speculate.py).
    draft_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token, so a new one is sampled."""
        return self.token_indices[-1] == len(self.seq) - 1

    @property
    def computed_indices(self) -> list[int]:
        """Positions computed this step: the scheduled tokens, then one per draft token."""
        if not self.draft_ids:
            return self.token_indices
        end = len(self.seq)
        return [*self.token_indices, *range(end, end + len(self.draft_ids))]

    @property
    def input_ids(self) -> list[int]:
        return [self.seq.token_ids[i] for i in self.token_indices] + self.draft_ids


class FCFSPolicy:
    name = "fcfs"

    def priority(self, seq: Sequence) -> tuple[float, ...]:
        return (seq.arrival_time, seq.seq_id)

    def admit(self, seq: Sequence) -> None:
        return None

    def after_step(self, seq: Sequence) -> None:
        return None


class SkipJoinMLFQPolicy:
    """Levels with quanta growing by ``base``; prompt length picks the first level."""

    name = "mlfq"

    def __init__(
        self,
        levels: int = 4,
        quantum_steps: int = 8,
        base: int = 2,
        tokens_per_level: int = 256,
        starvation_s: float = 5.0,
    ) -> None:
        self.levels = levels
        self.quantum_steps = quantum_steps
        self.base = base
        self.tokens_per_level = tokens_per_level
        self.starvation_s = starvation_s

    def admit(self, seq: Sequence) -> None:
        level = 0
        threshold = self.tokens_per_level
        while level < self.levels - 1 and seq.num_prompt_tokens > threshold:
            level += 1
            threshold *= self.base
        seq.queue_level = level
        seq.steps_at_level = 0

    def after_step(self, seq: Sequence) -> None:
        seq.steps_at_level += 1
        quantum = self.quantum_steps * self.base**seq.queue_level
        if seq.steps_at_level >= quantum and seq.queue_level < self.levels - 1:
            seq.queue_level += 1
            seq.steps_at_level = 0

    def priority(self, seq: Sequence) -> tuple[float, ...]:
        waited = time.perf_counter() - seq.arrival_time
        level = 0 if waited > self.starvation_s * (seq.queue_level + 1) else seq.queue_level
        return (level, seq.arrival_time, seq.seq_id)


class CacheAwarePolicy:
    """RAGCache's cache-aware reordering: most reused KV per token to compute first.

    A prompt token is reused when the engine will not compute it: it lies in the blocks
    the prefix cache holds for the prompt's start, or in placed chunk KV that fusion
    does not recompute. Ordering by reused / to-compute runs the prefills that end soonest
    first, which lowers the mean time to first token; a request that has waited past
    ``starvation_s`` goes before every one that has not, oldest first, so none waits
    for ever behind a stream of better-cached requests.
    """

    name = "cache_aware"

    def __init__(self, blocks: BlockManager | None = None, starvation_s: float = 2.0) -> None:
        if not starvation_s >= 0:
            raise ValueError(f"starvation_s={starvation_s} must be >= 0 seconds")
        self.blocks = blocks
        self.starvation_s = starvation_s
        # Block hashes of each waiting prompt, computed once: they depend on its tokens only.
        self._prompt_hashes: WeakKeyDictionary[Sequence, list[bytes]] = WeakKeyDictionary()

    def admit(self, seq: Sequence) -> None:
        return None

    def after_step(self, seq: Sequence) -> None:
        return None

    def priority(self, seq: Sequence) -> tuple[float, ...]:
        if time.perf_counter() - seq.arrival_time > self.starvation_s:
            return (0, seq.arrival_time, seq.seq_id)
        reused = self.reused_tokens(seq)
        compute = max(1, len(seq) - reused)
        return (1, -reused / compute, seq.arrival_time, seq.seq_id)

    def reused_tokens(self, seq: Sequence) -> int:
        """Tokens of ``seq`` whose KV comes from a cache instead of this engine's compute."""
        prefix = seq.num_cached_tokens if seq.block_table else self.prefix_hit_tokens(seq)
        if seq.placed is None:
            return prefix
        end = seq.placed.num_tokens
        recomputed = sum(1 for i in set(seq.placed.recompute) if prefix <= i < end)
        return prefix + max(0, end - prefix) - recomputed

    def prefix_hit_tokens(self, seq: Sequence) -> int:
        """Leading prompt tokens the prefix cache holds now (what allocation would share)."""
        blocks = self.blocks
        if (
            blocks is None
            or not blocks.enable_prefix_caching
            or not seq.use_prefix_cache
            or seq.params.prompt_logprobs
        ):
            return 0
        hashes = self._prompt_hashes.get(seq)
        if hashes is None:
            hashes = prompt_block_hashes(seq, blocks.block_size)
            self._prompt_hashes[seq] = hashes
        # A priority needs no token comparison: a hash collision would only misorder.
        hits = 0
        for block_hash in hashes:
            if block_hash not in blocks.hash_to_block:
                break
            hits += 1
        return hits * blocks.block_size


def prompt_block_hashes(seq: Sequence, block_size: int) -> list[bytes]:
    """Chain hashes of the prompt's full blocks that a prefix match may share (never the
    block holding the last prompt token, as in ``BlockManager.match_prefix``)."""
    hashes: list[bytes] = []
    previous: bytes | None = None
    for b in range((seq.num_prompt_tokens - 1) // block_size):
        tokens = seq.token_ids[b * block_size : (b + 1) * block_size]
        previous = chain_hash(previous, seq.cache_salt, tokens)
        hashes.append(previous)
    return hashes


Policy = FCFSPolicy | SkipJoinMLFQPolicy | CacheAwarePolicy
POLICY_NAMES = ("fcfs", "mlfq", "cache_aware")


def make_policy(name: str, blocks: BlockManager | None = None, starvation_s: float = 2.0) -> Policy:
    """The named policy; ``blocks`` lets cache_aware see prefix-cache hits of waiting
    requests, ``starvation_s`` is its waiting bound."""
    if name == "fcfs":
        return FCFSPolicy()
    if name == "mlfq":
        return SkipJoinMLFQPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(blocks, starvation_s)
    raise ValueError(f"scheduling policy {name!r} is unknown; use {', '.join(POLICY_NAMES)}")


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: Policy,
        on_admit: Callable[[Sequence], None] | None = None,
        on_preempt: Callable[[Sequence], None] | None = None,
        can_admit: Callable[[Sequence], bool] | None = None,
    ) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.on_admit = on_admit
        self.on_preempt = on_preempt
        self.can_admit = can_admit
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        # Sequences whose admission (on_admit) raised, with the error, for the engine to fail.
        self.failed: list[tuple[Sequence, Exception]] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.policy.admit(seq)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        if self.on_preempt is not None:
            self.on_preempt(seq)
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        self.running.sort(key=self.policy.priority)
        decodes = [s for s in self.running if not s.in_prefill]
        for seq in decodes:
            if budget <= 0 or len(out) >= self.max_num_seqs or seq not in self.running:
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.may_append(seq)
            out.append(ScheduledSeq(seq, [len(seq) - 1]))
            budget -= 1
        for seq in [s for s in self.running if s.in_prefill]:
            if budget <= 0 or len(out) >= self.max_num_seqs:
                break
            chunk = seq.remaining_plan[:budget]
            out.append(ScheduledSeq(seq, chunk))
            budget -= len(chunk)
        self.waiting.sort(key=self.policy.priority)
        held_back: list[Sequence] = []
        while self.waiting and budget > 0 and len(out) < self.max_num_seqs:
            seq = self.waiting[0]
            if len(self.running) >= self.max_num_seqs:
                break
            if self.can_admit is not None and not self.can_admit(seq):
                # e.g. its LoRA adapter has no free slot yet: later requests may go first.
                held_back.append(self.waiting.pop(0))
                continue
            if not self.blocks.can_allocate(seq, reserve=len(self.running) > 0):
                break
            self.waiting.pop(0)
            self.blocks.allocate(seq)
            if self.on_admit is not None:
                try:
                    self.on_admit(seq)
                except Exception as error:
                    # Its set-up (placed KV, adapter, swap-in) fails this request alone.
                    self.blocks.free(seq)
                    self.failed.append((seq, error))
                    continue
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunk = seq.remaining_plan[:budget]
            out.append(ScheduledSeq(seq, chunk))
            budget -= len(chunk)
        self.waiting[:0] = held_back
        return out

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        failed, self.failed = self.failed, []
        return failed

    def advance(self, scheduled: list[ScheduledSeq]) -> None:
        for item in scheduled:
            seq = item.seq
            if seq.in_prefill:
                seq.num_planned_done += len(item.token_indices)
            self.policy.after_step(seq)
            self.blocks.register_full_blocks(seq, item.token_indices[-1] + 1)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq)
