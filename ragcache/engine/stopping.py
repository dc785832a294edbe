"""When a sequence stops, and what a step hands back for it: its text after each new
token (stop strings cut it), the finish reason, and the RequestOutput."""

from __future__ import annotations

from typing import Any

from ragcache.engine.outputs import RequestMetrics, RequestOutput
from ragcache.engine.sequence import Sequence


def stop_reason(
    seq: Sequence, token: int, eos_ids: set[int], tokenizer: Any, max_model_len: int
) -> str | None:
    """Update ``seq``'s text after its new ``token``; why it stops now, or None."""
    params = seq.params
    previous_text = seq.output_text
    reason = None
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
        reason = "stop"
    if tokenizer is not None:
        seq.output_text = tokenizer.decode(
            seq.output_ids[:-1] if reason else seq.output_ids,
            skip_special_tokens=params.skip_special_tokens,
        )
        for stop in params.stop:
            at = seq.output_text.find(stop, max(0, len(previous_text) - len(stop)))
            if at >= 0:
                seq.output_text = seq.output_text[:at]
                reason = "stop"
                break
    if reason is None and (seq.num_output_tokens >= params.max_tokens or len(seq) >= max_model_len):
        reason = "length"
    return reason


def request_output(seq: Sequence, new_tokens: list[int], new_text: str = "") -> RequestOutput:
    return RequestOutput(
        request_id=seq.request_id,
        prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
        token_ids=list(seq.output_ids),
        text=seq.output_text,
        finished=seq.is_finished,
        finish_reason=seq.finish_reason,
        num_cached_tokens=seq.num_cached_tokens,
        metrics=RequestMetrics(
            seq.arrival_time, seq.first_token_time, seq.finish_time, seq.num_preemptions
        ),
        logprobs=list(seq.logprobs),
        prompt_logprobs=dict(seq.prompt_logprobs),
        new_token_ids=new_tokens,
        new_text=new_text,
    )
