"""What a reader would run instead: plain `transformers` generate with full prefill.

The same checkpoint, dtype and prompt token ids as the ragcache settings, so its row in
a report shows where ragcache's engine and fusion stand against the usual tool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BASELINE_LABEL = "transformers"


class _FirstTokenClock:
    """A generate streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1  # the first call carries the prompt, the second the first token
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass(slots=True)
class BaselineRun:
    answer_ids: list[int]
    ttft_s: float
    e2e_s: float
    reference_logprobs: list[float]


class TransformersBaseline:
    def __init__(self, source: Path, dtype: torch.dtype, eos_ids: set[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        self.eos_ids = sorted(eos_ids)

    @torch.inference_mode()
    def run(
        self, prompt_ids: list[int], reference_ids: list[int], max_new_tokens: int
    ) -> BaselineRun:
        prompt = torch.tensor([prompt_ids])
        clock = _FirstTokenClock()
        began = time.perf_counter()
        generated = self.model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=clock,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.eos_ids[0] if self.eos_ids else 0,
        )
        finished = time.perf_counter()
        answer = generated.sequences[0, len(prompt_ids) :].tolist()
        if answer[: len(reference_ids)] == reference_ids:
            # It generated the reference: the logits it saw are the teacher-forced ones.
            logits = torch.cat([step[:1] for step in generated.logits])[: len(reference_ids)]
        else:
            full = torch.tensor([prompt_ids + reference_ids])
            logits = self.model(full).logits[0, len(prompt_ids) - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(1, torch.tensor(reference_ids)[:, None])
        return BaselineRun(
            answer_ids=answer,
            ttft_s=(clock.first or finished) - began,
            e2e_s=finished - began,
            reference_logprobs=picked[:, 0].tolist(),
        )
