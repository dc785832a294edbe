"""Generation: a prepared prompt decoded on the engine, its usage and timings filled in,
and a GenerationRecord handed to every observer once it finishes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.outputs import RequestOutput
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from ragcache.errors import InvalidInputError, PromptTooLongError
from ragcache.service.results import GenerationRecord, PreparedQuery

Observer = Callable[[GenerationRecord], None]


class Generator:
    def __init__(
        self,
        async_engine: AsyncEngine,
        tenant: str,
        adapter_id: str | None,
        observers: list[Observer],
    ) -> None:
        self.async_engine = async_engine
        self.tenant = tenant
        self.adapter_id = adapter_id
        self.observers = observers

    async def generate(
        self, prepared: PreparedQuery, sampling: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of a prepared prompt as they decode (``sampling`` overrides the
        prepared one, e.g. another seed per choice)."""
        fused = prepared.fused
        submitted = time.perf_counter()
        first: float | None = None
        last: RequestOutput | None = None
        try:
            async for out in self.async_engine.stream(
                fused.prompt_ids,
                sampling or prepared.sampling,
                placed=fused.placed,
                cache_salt=self.tenant,
                use_prefix_cache=fused.use_prefix_cache,
                adapter=self.adapter_id,
            ):
                if out.finish_reason == "error":
                    raise PromptTooLongError(
                        out.error or "the engine refused the prompt", prepared.length_param
                    )
                if first is None and out.token_ids:
                    first = time.perf_counter()
                last = out
                yield out
        except InvalidRequestError as error:
            raise InvalidInputError(str(error), error.param) from None
        finished = time.perf_counter()
        assert last is not None
        self._record(prepared, last, submitted, first, finished)

    def _record(
        self,
        prepared: PreparedQuery,
        last: RequestOutput,
        submitted: float,
        first: float | None,
        finished: float,
    ) -> None:
        prepared.usage.engine_cached_tokens = last.num_cached_tokens
        timings = prepared.timings
        timings["prefill"] = None if first is None else first - submitted
        timings["decode"] = None if first is None else finished - first
        timings["ttft"] = None if first is None else first - prepared.received
        timings["total"] = finished - prepared.received
        report = prepared.fused.report
        record = GenerationRecord(
            self.tenant,
            submitted - prepared.received,
            timings["ttft"],
            finished - prepared.received,
            len(prepared.fused.prompt_ids),
            len(last.token_ids),
            prepared.cached_tokens(last.num_cached_tokens),
            report.recompute_fraction if report.context_tokens else None,
            last.finish_reason,
            prepared.usage,
        )
        for observer in list(self.observers):
            observer(record)
