"""OpenAI response bodies and stream chunks built from engine outputs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from ragcache.engine.outputs import RequestOutput
from ragcache.engine.sequence import TokenLogprob
from ragcache.service import PreparedQuery

FINISH_REASONS = {"stop": "stop", "length": "length"}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def finish_reason(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return FINISH_REASONS.get(out.finish_reason or "", "stop")


def usage(
    prompts: list[PreparedQuery], finals: list[RequestOutput | None], n: int
) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice); cached tokens come from each
    prompt's first choice: its engine prefix-cache hit plus its chunk-cache hits."""
    prompt_tokens = sum(len(p.prompt_ids) for p in prompts)
    completion_tokens = sum(len(out.token_ids) for out in finals if out is not None)
    cached = 0
    for number, prepared in enumerate(prompts):
        first = finals[number * n]
        cached += prepared.cached_tokens(first.num_cached_tokens if first is not None else 0)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def rag_details(prompts: list[PreparedQuery]) -> list[dict[str, Any]] | None:
    """Sources and chunk-cache use of each RAG prompt; None when no prompt had chunks."""
    if not any(p.sources or p.usage.method != "none" for p in prompts):
        return None
    return [{"sources": [asdict(s) for s in p.sources], "cache": asdict(p.usage)} for p in prompts]


class LogprobFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        return {
            "content": [
                {
                    **self._entry(e.token_id, e.logprob),
                    "top_logprobs": [self._entry(t, lp) for t, lp in e.top],
                }
                for e in entries
            ]
        }

    def completion(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.text(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


class ResponseBuilder:
    """Bodies of one chat or text completion request, whole or as stream chunks."""

    def __init__(
        self, chat: bool, model: str, request_id: str, fingerprint: str, logprobs: LogprobFormatter
    ) -> None:
        self.chat = chat
        self.model = model
        self.request_id = request_id
        self.fingerprint = fingerprint
        self.logprobs = logprobs
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }

    def _logprobs(self, entries: list[TokenLogprob], offset: int, wanted: bool) -> Any:
        if not wanted:
            return None
        return (
            self.logprobs.chat(entries) if self.chat else self.logprobs.completion(entries, offset)
        )

    def whole(
        self,
        finals: list[RequestOutput],
        usage_body: dict[str, Any],
        logprobs: bool,
        rag: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        choices = []
        for index, out in enumerate(finals):
            choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason(out)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": out.text}
            else:
                choice["text"] = out.text
            choice["logprobs"] = self._logprobs(out.logprobs, 0, logprobs)
            choices.append(choice)
        body = self._envelope(self.object, choices)
        body["usage"] = usage_body
        if rag is not None:
            body["ragcache"] = rag
        return body

    def role_chunk(self, index: int) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._envelope("chat.completion.chunk", [choice])

    def piece_chunk(
        self, index: int, out: RequestOutput, logprobs_from: int, text_offset: int, logprobs: bool
    ) -> dict[str, Any]:
        entries = out.logprobs[logprobs_from:]
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"content": out.new_text} if out.new_text else {}
        else:
            choice["text"] = out.new_text
        choice["logprobs"] = self._logprobs(entries, text_offset, logprobs)
        choice["finish_reason"] = finish_reason(out)
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [choice])

    def usage_chunk(self, usage_body: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage_body
        return body
