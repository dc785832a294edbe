"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeds and logprobs.

Logprobs report the model's own distribution (log-softmax of the raw logits), as
OpenAI's API does, not the distribution after penalties and truncation.
"""

from __future__ import annotations

import torch

from ragcache.engine.guided import GuidedDecoding
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import Sequence, TokenLogprob


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            values = logits[row, seen]
            logits[row, seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_ids, dtype=torch.long)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts
            logits[row] -= p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncation_mask(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """True where a token stays allowed; rows of probs [S, V] are already normalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[1], device=probs.device)[None, :]
    keep_sorted = (top_k[:, None] <= 0) | (ranks < top_k[:, None])
    cumulative = sorted_probs.cumsum(dim=-1)
    keep_sorted &= (cumulative - sorted_probs) < top_p[:, None]
    keep_sorted &= sorted_probs >= min_p[:, None] * sorted_probs[:, :1]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution one request samples from: rows of logits [n, V] tempered and truncated."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    count = probs.shape[0]
    keep = truncation_mask(
        probs,
        torch.full((count,), params.top_k),
        torch.full((count,), params.top_p),
        torch.full((count,), params.min_p),
    )
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


def top_logprobs(raw_logprobs: torch.Tensor, top_n: int) -> list[tuple[int, float]]:
    """The ``top_n`` most likely tokens of one row with their log-probabilities."""
    if top_n <= 0:
        return []
    top = raw_logprobs.topk(top_n)
    return list(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def token_logprob(raw_logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's log-probability and the ``top_n`` most likely, from one row."""
    return TokenLogprob(token, float(raw_logprobs[token]), top_logprobs(raw_logprobs, top_n))


class Sampler:
    def __init__(self) -> None:
        self.shared_generator = torch.Generator().manual_seed(0)
        self.generators: dict[int, torch.Generator] = {}
        self.guided = GuidedDecoding()

    def forget(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
        self.guided.forget(seq)

    def generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.shared_generator
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seq.params.seed)
            self.generators[seq.seq_id] = gen
        return gen

    def sample_each(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | Exception]:
        """``sample``, except that a row whose request breaks sampling gets the error it
        raised and every other row its token.

        The batch runs first; only when it raises does each row run alone. ``sample`` does
        every row's fallible work before its first draw, so a seeded row draws the same
        tokens beside a row whose parameters fail.
        """
        try:
            return list(self.sample(logits, seqs))
        except Exception as error:
            if len(seqs) == 1:
                return [error]
        out: list[int | Exception] = []
        for row, seq in enumerate(seqs):
            try:
                out.append(self.sample(logits[row : row + 1], [seq])[0])
            except Exception as error:
                out.append(error)
        return out

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        logits = logits.float()
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        # Every row's fallible work (top logprobs, truncation tensors, generators) comes
        # before the first draw, so a failing row costs no other row its draws.
        tops: dict[int, list[tuple[int, float]]] = {}
        if raw_logprobs is not None:
            for row, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    tops[row] = top_logprobs(raw_logprobs[row], seq.params.logprobs)
        logits = self.guided.mask(apply_penalties(logits.clone(), seqs), seqs)
        greedy = [s.params.greedy for s in seqs]
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, g in enumerate(greedy) if not g]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            temps = torch.tensor([seqs[i].params.temperature for i in sampled_rows])
            probs = torch.softmax(logits[rows] / temps[:, None], dim=-1)
            keep = truncation_mask(
                probs,
                torch.tensor([seqs[i].params.top_k for i in sampled_rows]),
                torch.tensor([seqs[i].params.top_p for i in sampled_rows]),
                torch.tensor([seqs[i].params.min_p for i in sampled_rows]),
            )
            probs = probs * keep
            probs = probs / probs.sum(dim=-1, keepdim=True)
            generators = [self.generator(seqs[row]) for row in sampled_rows]
            for j, row in enumerate(sampled_rows):
                draw = torch.multinomial(probs[j], 1, generator=generators[j])
                tokens[row] = draw[0]
        chosen = tokens.tolist()
        if raw_logprobs is not None:
            for row, top in tops.items():
                token = chosen[row]
                seqs[row].logprobs.append(TokenLogprob(token, float(raw_logprobs[row, token]), top))
        self.guided.advance(seqs, chosen)
        return chosen
