"""Speculative decoding inside continuous batching: propose, verify in one pass, roll back.

Each step, a decoding sequence may carry draft tokens from a proposer (prompt lookup,
a draft model, or the target's own first layers). The target computes the sequence's
last token and all its drafts in the same forward over the paged KV, so one step
yields the logits that judge every draft. Acceptance keeps the output distribution
the target's (Leviathan et al., 2023, "Fast Inference from Transformers via
Speculative Decoding"):

- greedy: keep drafts while they equal the target's argmax, then add the target's token;
- sampling: keep draft x with probability min(1, p(x) / q(x)); at the first rejection
  draw from max(0, p - q) renormalised; if all are kept, draw one more token from p.

KV of rejected drafts is rolled back: their slots are overwritten by the next step, and
lookahead blocks past the kept tokens go back to the pool. Draft lengths differ per
sequence and follow each one's running acceptance rate; a sequence whose drafts do not
pay for their verification stops drafting until its estimate recovers.
"""

from __future__ import annotations

import torch

from ragcache.engine.block_manager import BlockManager
from ragcache.engine.config import ModelConfig, SpeculativeConfig
from ragcache.engine.draft_model import DraftModelProposer, EarlyExitProposer
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.prompt_lookup import PromptLookupProposer
from ragcache.engine.proposer import Draft, Proposer
from ragcache.engine.sampler import Sampler, sampling_probs, token_logprob
from ragcache.engine.sampling_params import (
    MAX_SPECULATIVE_TOKENS,
    InvalidRequestError,
    SamplingParams,
)
from ragcache.engine.scheduler import ScheduledSeq
from ragcache.engine.sequence import Sequence

SPECULATIVE_METHODS = ("off", "ngram", "early_exit", "draft_model")


def accept_greedy(draft: list[int], target: list[int]) -> list[int]:
    """Drafts equal to the target's argmax, then the target's token after them.

    ``target`` holds the argmax at each of the len(draft) + 1 verified positions.
    """
    kept = 0
    while kept < len(draft) and draft[kept] == target[kept]:
        kept += 1
    return [*draft[:kept], target[kept]]


def accept_sampled(
    draft: list[int],
    p: torch.Tensor,
    q: torch.Tensor | None,
    generator: torch.Generator,
) -> list[int]:
    """Leviathan et al.'s rejection rule: the emitted tokens are distributed as p.

    ``p`` [len(draft) + 1, V] is the target's distribution at each verified position;
    ``q`` [len(draft), V] the draft's, or None when each draft was a point mass.
    """
    out: list[int] = []
    for j, token in enumerate(draft):
        q_token = 1.0 if q is None else float(q[j, token])
        u = float(torch.rand((), generator=generator))
        if u * q_token < float(p[j, token]):
            out.append(token)
            continue
        if q is None:
            residual = p[j].clone()
            residual[token] = 0.0
        else:
            residual = (p[j] - q[j]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:
            residual = p[j]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[len(draft)], 1, generator=generator)))
    return out


def expected_tokens(alpha: float, draft_len: int) -> float:
    """Tokens one verification yields when each draft is kept with probability alpha."""
    if alpha >= 1.0:
        return draft_len + 1.0
    return (1.0 - alpha ** (draft_len + 1)) / (1.0 - alpha)


class DraftLengthController:
    """Per sequence: a decayed Beta estimate of the chance a draft token is kept, and the
    draft length that maximises expected tokens per unit of step cost.

    A step with k drafts costs 1 + k * (draft_cost + verify_cost) decode steps and yields
    expected_tokens(alpha, k); k = 0 (no speculation) yields one token for one step.
    Every step decays the counts, so a paused sequence drifts back to the prior and
    tries again later.
    """

    def __init__(
        self,
        draft_cost: float,
        verify_cost: float,
        adaptive: bool = True,
        prior: tuple[float, float] = (1.0, 1.0),
        decay: float = 0.9,
    ) -> None:
        self.step_cost = draft_cost + verify_cost
        self.adaptive = adaptive
        self.prior = prior
        self.decay = decay
        self.counts: dict[int, tuple[float, float]] = {}

    def acceptance(self, seq_id: int) -> float:
        kept, rejected = self.counts.get(seq_id, (0.0, 0.0))
        a, b = self.prior
        return (kept + a) / (kept + rejected + a + b)

    def length(self, seq_id: int, limit: int) -> int:
        if not self.adaptive or limit <= 0:
            return max(limit, 0)
        alpha = self.acceptance(seq_id)
        best, best_rate = 0, 1.0
        for k in range(1, limit + 1):
            rate = expected_tokens(alpha, k) / (1.0 + k * self.step_cost)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def observe(self, seq_id: int, drafted: int, accepted: int) -> None:
        kept, rejected = self.counts.get(seq_id, (0.0, 0.0))
        self.counts[seq_id] = (
            self.decay * kept + accepted,
            self.decay * rejected + (1.0 if accepted < drafted else 0.0),
        )

    def idle(self, seq_id: int) -> None:
        counts = self.counts.get(seq_id)
        if counts is not None:
            self.counts[seq_id] = (self.decay * counts[0], self.decay * counts[1])

    def forget(self, seq_id: int) -> None:
        self.counts.pop(seq_id, None)


def uses_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


class Speculator:
    """Adds drafts to a scheduled step and turns its logits into the tokens each sequence keeps."""

    def __init__(
        self,
        config: SpeculativeConfig,
        proposer: Proposer | None,
        blocks: BlockManager,
        sampler: Sampler,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.proposer = proposer
        self.blocks = blocks
        self.sampler = sampler
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        draft_cost = proposer.draft_cost if proposer is not None else 0.0
        self.controller = DraftLengthController(draft_cost, config.verify_cost, config.adaptive)
        self.pending: dict[int, Draft] = {}
        self.decoding: set[int] = set()
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_decode_steps = 0
        self.num_decode_tokens = 0

    def validate(self, params: SamplingParams) -> None:
        asked = params.num_speculative_tokens
        if not asked:
            return
        if self.proposer is None:
            raise InvalidRequestError(
                f"num_speculative_tokens={asked} asks for speculative decoding, which this "
                "engine runs without (engine.speculative.method=off); send 0 or leave it unset",
                "num_speculative_tokens",
            )
        if uses_penalties(params):
            raise InvalidRequestError(
                f"num_speculative_tokens={asked} cannot be combined with repetition, presence "
                "or frequency penalties; send 0 or drop the penalties",
                "num_speculative_tokens",
            )

    def draft_limit(self, seq: Sequence) -> int:
        """Most drafts this sequence may carry now (its request, its budget, the model)."""
        params = seq.params
        asked = params.num_speculative_tokens
        limit = self.config.num_speculative_tokens if asked is None else asked
        if limit <= 0 or uses_penalties(params):
            return 0
        return min(
            limit,
            MAX_SPECULATIVE_TOKENS,
            params.max_tokens - seq.num_output_tokens - 1,
            self.max_model_len - len(seq) - 1,
        )

    def propose(self, scheduled: list[ScheduledSeq]) -> None:
        """Attach drafts to the step's decoding sequences and reserve slots for them."""
        self.pending.clear()
        decodes = [item for item in scheduled if item.samples and not item.seq.in_prefill]
        self.decoding = {item.seq.seq_id for item in decodes}
        if self.proposer is None or not decodes:
            return
        batch_limit = self.config.disable_by_batch_size
        budget = self.max_num_batched_tokens - sum(len(i.token_indices) for i in scheduled)
        chosen: list[ScheduledSeq] = []
        lengths: list[int] = []
        for item in decodes:
            seq = item.seq
            length = 0
            if not batch_limit or len(decodes) <= batch_limit:
                length = min(self.controller.length(seq.seq_id, self.draft_limit(seq)), budget)
            if length > 0:
                length = self.blocks.reserve_lookahead(seq, length)
            if length <= 0:
                self.controller.idle(seq.seq_id)
                continue
            budget -= length
            chosen.append(item)
            lengths.append(length)
        if not chosen:
            return
        drafts = self.proposer.propose([item.seq for item in chosen], lengths)
        for item, length, draft in zip(chosen, lengths, drafts, strict=True):
            seq = item.seq
            if len(draft) > length:
                probs = None if draft.probs is None else draft.probs[:length]
                draft = Draft(draft.token_ids[:length], probs)
            self.blocks.release_lookahead(seq, len(seq) + len(draft))
            if not draft:
                self.controller.idle(seq.seq_id)
                continue
            item.draft_ids = list(draft.token_ids)
            self.pending[seq.seq_id] = draft

    def verify(
        self, logits: torch.Tensor, sampling: list[ScheduledSeq]
    ) -> list[list[int] | Exception]:
        """Tokens each sampling sequence keeps, or the error its sampling raised (the other
        sequences keep theirs); ``logits`` has 1 + len(drafts) rows per item."""
        kept: list[list[int] | Exception]
        if not self.pending:
            tokens = self.sampler.sample_each(logits, [item.seq for item in sampling])
            kept = [token if isinstance(token, Exception) else [token] for token in tokens]
        else:
            kept = self._verify_drafts(logits, sampling)
        for item, tokens in zip(sampling, kept, strict=True):
            if item.seq.seq_id in self.decoding and not isinstance(tokens, Exception):
                self.num_decode_steps += 1
                self.num_decode_tokens += len(tokens)
        return kept

    def _verify_drafts(
        self, logits: torch.Tensor, sampling: list[ScheduledSeq]
    ) -> list[list[int] | Exception]:
        offsets = [0]
        for item in sampling:
            offsets.append(offsets[-1] + 1 + len(item.draft_ids))
        kept: list[list[int] | Exception] = [[] for _ in sampling]
        plain = [i for i, item in enumerate(sampling) if not item.draft_ids]
        if plain:
            rows = torch.tensor([offsets[i] for i in plain], device=logits.device)
            tokens = self.sampler.sample_each(logits[rows], [sampling[i].seq for i in plain])
            for i, token in zip(plain, tokens, strict=True):
                kept[i] = token if isinstance(token, Exception) else [token]
        for i, item in enumerate(sampling):
            if item.draft_ids:
                try:
                    kept[i] = self._verify_one(item.seq, logits[offsets[i] : offsets[i + 1]])
                except Exception as error:
                    kept[i] = error
        self.pending.clear()
        return kept

    def _verify_one(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        draft = self.pending[seq.seq_id]
        params = seq.params
        logits = logits.float()
        if params.greedy:
            emitted = accept_greedy(draft.token_ids, logits.argmax(dim=-1).tolist())
        else:
            p = sampling_probs(logits, params)
            q = None if draft.probs is None else draft.probs.to(p.device, p.dtype)
            emitted = accept_sampled(draft.token_ids, p, q, self.sampler.generator(seq))
        if params.logprobs is not None:
            raw = torch.log_softmax(logits, dim=-1)
            seq.logprobs.extend(
                [token_logprob(raw[j], token, params.logprobs) for j, token in enumerate(emitted)]
            )
        accepted = len(emitted) - 1
        self.blocks.release_lookahead(seq, len(seq) + len(emitted))
        self.controller.observe(seq.seq_id, len(draft), accepted)
        assert self.proposer is not None
        self.proposer.accepted(seq, accepted)
        self.num_drafts += 1
        self.num_draft_tokens += len(draft)
        self.num_accepted_tokens += accepted
        return emitted

    def forget(self, seq: Sequence) -> None:
        self.pending.pop(seq.seq_id, None)
        self.controller.forget(seq.seq_id)
        if self.proposer is not None:
            self.proposer.forget(seq)

    def stats(self) -> dict[str, float]:
        drafted, accepted = self.num_draft_tokens, self.num_accepted_tokens
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": drafted,
            "spec_num_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / drafted if drafted else 0.0,
            "spec_mean_accepted_tokens": accepted / self.num_drafts if self.num_drafts else 0.0,
            "num_decode_steps": self.num_decode_steps,
            "num_decode_tokens": self.num_decode_tokens,
            "decode_tokens_per_step": (
                self.num_decode_tokens / self.num_decode_steps if self.num_decode_steps else 0.0
            ),
        }


def build_proposer(
    config: SpeculativeConfig,
    loaded: LoadedModel,
    pool: KVPool,
    sampler: Sampler,
    draft: LoadedModel | None = None,
) -> Proposer | None:
    """The proposer that ``config.method`` names; None when speculation is off."""
    method = config.method
    if method not in SPECULATIVE_METHODS:
        raise ValueError(
            f"engine.speculative.method={method!r} is unknown; use {', '.join(SPECULATIVE_METHODS)}"
        )
    if not 0 <= config.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(
            f"engine.speculative.num_speculative_tokens={config.num_speculative_tokens} must lie "
            f"in [0, {MAX_SPECULATIVE_TOKENS}]"
        )
    if method == "off":
        return None
    if method == "ngram":
        return PromptLookupProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if method == "early_exit":
        return EarlyExitProposer(loaded.model, pool, config.draft_layers, sampler)
    if draft is None:
        if not config.draft_model:
            raise ValueError(
                "engine.speculative.method=draft_model needs engine.speculative.draft_model, "
                "the local folder of a smaller model with the same tokenizer"
            )
        dtype = str(loaded.dtype).removeprefix("torch.")
        draft = load_model(ModelConfig(config.draft_model, dtype, str(loaded.device)))
    return DraftModelProposer(draft.model, loaded.model, pool.num_blocks, pool.block_size, sampler)
