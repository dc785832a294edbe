"""The timed passes the model benchmark compares: prefill and greedy decode of the
engine's own forward and of transformers, on the same weights and token ids."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ragcache.engine.attention_metadata import AttentionMetadata, contiguous_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.model import LlamaModel

MUSIQUE = Path("/work/shared/data/musique_dev.json")
BLOCK_SIZE = 16


def corpus_token_ids(tokenizer: Any, length: int) -> list[int]:
    """``length`` token ids of real MuSiQue passages (as many records as it takes)."""
    ids: list[int] = []
    for record in json.loads(MUSIQUE.read_text()):
        text = "\n\n".join(f"{c['title']}\n{c['text']}".strip() for c in record["ctxs"])
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= length:
            return ids[:length]
    raise ValueError(f"the corpus holds fewer than {length} tokens")


def pool_for(model: LlamaModel, tokens: int) -> KVPool:
    return KVPool(model.spec, (tokens + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCK_SIZE, model.dtype)


def ours_prefill(model: LlamaModel, pool: KVPool, ids: torch.Tensor) -> torch.Tensor:
    meta = contiguous_metadata([ids.shape[0]], BLOCK_SIZE)
    hidden = model(ids, torch.arange(ids.shape[0]), meta, pool)
    return model.compute_logits(hidden[-1:])


def ours_greedy(model: LlamaModel, pool: KVPool, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Prefill, then one token per step over the paged pool, with no host sync per step."""
    return ours_greedy_timed(model, pool, ids, new_tokens)[0]


def ours_greedy_timed(
    model: LlamaModel, pool: KVPool, ids: torch.Tensor, new_tokens: int
) -> tuple[list[int], float]:
    """``ours_greedy``'s tokens and the seconds from the first token to the last."""
    prompt_len = ids.shape[0]
    token = ours_prefill(model, pool, ids).argmax(-1)
    first = time.perf_counter()
    generated = [token]
    slot = torch.tensor([prompt_len])
    meta = AttentionMetadata(
        slot_mapping=slot,
        query_slots=torch.zeros(1, dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.zeros(1, dtype=torch.int32),
        block_tables=torch.arange(pool.num_blocks, dtype=torch.int32)[None, :],
        max_query_len=1,
        fresh=False,
    )
    for _ in range(new_tokens - 1):
        meta.query_slots.copy_(slot)
        meta.seq_lens.copy_(slot + 1)
        meta.plans = None  # resolved from seq_lens, which changed
        token = model.compute_logits(model(token, slot, meta, pool)).argmax(-1)
        generated.append(token)
        slot += 1
    tokens = torch.cat(generated).tolist()
    return tokens, time.perf_counter() - first


def transformers_prefill(reference: Any, ids: torch.Tensor) -> torch.Tensor:
    return reference(ids[None], use_cache=True, logits_to_keep=1).logits[0].float()


class FirstAndLastToken:
    """A transformers streamer that stamps when the first and the last new token arrive."""

    def __init__(self) -> None:
        self.calls = 0
        self.first = self.last = 0.0

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = now
        self.last = now

    def end(self) -> None:
        return None


def transformers_greedy_timed(
    reference: Any, ids: torch.Tensor, new_tokens: int
) -> tuple[list[int], float]:
    """``generate``'s greedy tokens and the seconds from the first token to the last."""
    clock = FirstAndLastToken()
    out = reference.generate(
        ids[None],
        attention_mask=torch.ones(1, ids.shape[0], dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=reference.generation_config.pad_token_id or 0,
        streamer=clock,
    )
    return out[0, ids.shape[0] :].tolist(), clock.last - clock.first


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int):
    """Seconds of each implementation, alternating, after one untimed warm-up each."""
    ours()
    theirs()
    ours_s, theirs_s = [], []
    for _ in range(repeats):
        ours_s.append(timed(ours))
        theirs_s.append(timed(theirs))
    return ours_s, theirs_s
