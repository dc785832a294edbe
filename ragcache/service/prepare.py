"""Query preparation: a RAG prompt from retrieved or given chunks with their KV fused, or
a plain prompt, checked against the engine's limits before any model work."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ragcache.blending.focus import CacheFocus
from ragcache.blending.fuser import FusedRequest, FusionReport
from ragcache.blending.methods import FusionMethod, MethodParam
from ragcache.blending.prompt import PromptBuilder
from ragcache.blending.registry import MethodParameterError, method_for_request
from ragcache.config import Config
from ragcache.engine.engine import Engine
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from ragcache.errors import InvalidInputError, InvalidParameterError, PromptTooLongError
from ragcache.service.chunk_gather import Hit
from ragcache.service.corpora import TenantCorpora
from ragcache.service.kv_source import ChunkKVSource
from ragcache.service.results import CacheUsage, PreparedQuery, SourceChunk


class QueryPreparer:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        prompts: PromptBuilder,
        corpora: TenantCorpora,
        kv: ChunkKVSource,
    ) -> None:
        self.config = config
        self.engine = engine
        self.prompts = prompts
        self.corpora = corpora
        self.kv = kv

    def sampling(self, sampling: SamplingParams | None) -> SamplingParams:
        sampling = sampling or SamplingParams(max_tokens=self.config.service.max_tokens)
        try:
            return sampling.validate(self.engine.loaded.spec.vocab_size)
        except InvalidRequestError as error:
            raise InvalidParameterError(str(error), error.param) from None

    def method(
        self, name: str | None, params: dict[str, MethodParam]
    ) -> tuple[FusionMethod, dict[str, MethodParam]]:
        try:
            return method_for_request(
                name,
                params,
                self.config.fusion,
                self.engine.loaded.spec.num_layers,
                self.engine.max_model_len - 1,
            )
        except MethodParameterError as error:
            raise InvalidParameterError(str(error), error.param) from None

    def split_deterministic(
        self, params: dict[str, MethodParam]
    ) -> tuple[dict[str, MethodParam], bool]:
        """The method parameters without ``deterministic``, and whether the request is
        deterministic (service.deterministic when it does not say)."""
        rest = dict(params)
        value = rest.pop("deterministic", None)
        if value is None:
            return rest, self.config.service.deterministic
        if not isinstance(value, bool):
            raise InvalidParameterError(
                f"deterministic={value!r} must be true or false", "deterministic"
            )
        return rest, value

    def prepare_corpus(
        self,
        text: str,
        corpus: str,
        k: int | None,
        method_name: str | None,
        method_params: dict[str, MethodParam],
        sampling: SamplingParams | None,
        conversation: Sequence[tuple[str, str]] = (),
    ) -> PreparedQuery:
        """A RAG prompt over the ``k`` chunks of ``corpus`` that best match ``text``;
        ``conversation`` holds (role, content) turns asked before it (see PromptBuilder)."""
        received = time.perf_counter()
        sampling = self.sampling(sampling)
        method_params, deterministic = self.split_deterministic(method_params)
        method, params = self.method(method_name, method_params)
        sources, records = self.corpora.retrieve(text, corpus, self.corpora.check_k(k))
        chunks = [record.token_ids + self.prompts.separator_ids for record in records]
        hint = f"{len(chunks)} retrieved chunks and the question", "lower k or shorten the question"
        prepared = self._prepare_chunks(
            chunks, text, sources, method, params, sampling, "k", hint, conversation, deterministic
        )
        prepared.timings["retrieval"] = prepared.received - received
        prepared.received = received
        return prepared

    def prepare_documents(
        self,
        documents: Sequence[str],
        question: str,
        method_name: str | None = None,
        method_params: dict[str, MethodParam] | None = None,
        sampling: SamplingParams | None = None,
        param: str = "documents",
        conversation: Sequence[tuple[str, str]] = (),
    ) -> PreparedQuery:
        """A RAG prompt over documents the caller retrieved: each text is one chunk, its
        KV cached by content (under this tenant), then fused before the question (and
        the ``conversation`` turns asked before it)."""
        sampling = self.sampling(sampling)
        method_params, deterministic = self.split_deterministic(method_params or {})
        method, params = self.method(method_name, method_params)
        limit = self.config.service.max_k
        if not 1 <= len(documents) <= limit:
            raise InvalidParameterError(
                f"{param} holds {len(documents)} documents; send 1 to {limit}", param
            )
        for number, text in enumerate(documents):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(
                    f"{param}[{number}] is empty; every document must be non-empty text", param
                )
        chunks = [self.prompts.chunk_ids(text) for text in documents]
        sources = [
            SourceChunk(number, f"{param}[{number}]", text, 0.0, 0, len(text), "request")
            for number, text in enumerate(documents)
        ]
        hint = f"{len(chunks)} documents and the question", "send fewer or shorter documents"
        prepared = self._prepare_chunks(
            chunks,
            question,
            sources,
            method,
            params,
            sampling,
            param,
            hint,
            conversation,
            deterministic,
        )
        prepared.timings["retrieval"] = 0.0
        return prepared

    def prepare_prompt(
        self, prompt_ids: list[int], sampling: SamplingParams | None = None, param: str = "prompt"
    ) -> PreparedQuery:
        """A plain prompt, without chunks: the engine's prefix cache alone applies."""
        received = time.perf_counter()
        sampling = self.sampling(sampling)
        if not prompt_ids:
            raise InvalidInputError(f"{param} is empty; send at least one token", param)
        limit = self.engine.max_model_len
        if len(prompt_ids) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; this model and KV pool accept at "
                f"most {limit - 1}: shorten it",
                param,
            )
        report = FusionReport("none", 0, 0, 0, 0.0)
        prefix_cache = not self.config.service.deterministic
        fused = FusedRequest(list(prompt_ids), None, prefix_cache, report)
        return PreparedQuery(
            list(prompt_ids), fused, [], CacheUsage("none"), sampling, {}, received, [], param
        )

    def chat_prompt_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of (role, content) messages through the model's chat template, ending
        with the assistant's turn; a plain "Role: content" layout without a template."""
        tokenizer = self.engine.loaded.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        else:
            turns = [f"{role.capitalize()}: {content}" for role, content in messages]
            text = "\n\n".join([*turns, "Assistant:"])
        return self.prompts.encode(text)

    def _prepare_chunks(
        self,
        chunks: list[list[int]],
        question: str,
        sources: list[SourceChunk],
        method: FusionMethod,
        params: dict[str, MethodParam],
        sampling: SamplingParams,
        length_param: str,
        hint: tuple[str, str],
        conversation: Sequence[tuple[str, str]] = (),
        deterministic: bool = False,
    ) -> PreparedQuery:
        """Deterministic requests reuse only what a cold run would compute bit for bit:
        chunk KV kept without loss, never a tree path, engine prefix blocks or what
        Cache-Craft learnt from earlier requests (they may still store paths)."""
        received = time.perf_counter()
        layout = self.prompts.layout(chunks, question, conversation)
        limit = self.engine.max_model_len
        shortest, pruned = len(layout), ""
        if isinstance(method, CacheFocus) and chunks:
            # CacheFocus prunes to fit; it needs room for one chunk at least.
            shortest = len(layout.root_ids) + len(layout.query_ids) + min(map(len, chunks))
            pruned = "even pruned to its shortest chunk, "
        if shortest >= limit:
            what, remedy = hint
            raise PromptTooLongError(
                f"{pruned}the prompt has {shortest} tokens ({what}); this model and KV pool "
                f"accept at most {limit - 1}: {remedy}",
                length_param,
            )
        usage = CacheUsage(method.name)
        spans: list[tuple[int, int]] = []
        timings: dict[str, float | None] = {"cache_fetch": 0.0, "kv_compute": 0.0}
        paths = self.config.service.tree_paths
        on_path = paths != "off" and self.kv.stores and not isinstance(method, CacheFocus)
        exact_compute = on_path and (method.name == "full_prefill" or paths == "always")
        if method.name == "full_prefill" and not exact_compute:
            context = layout.context_end - len(layout.root_ids)
            report = FusionReport(method.name, context, 0, context, 0.0, params)
            fused = FusedRequest(layout.prompt_ids, None, False, report)
        else:
            cost = self.kv.query_cost(chunks, layout, received)
            began = time.perf_counter()
            # A full prefill is the reference: it reuses nothing, but stores its path.
            reuse_path = on_path and method.name != "full_prefill" and not deterministic
            # A path of one chunk is a root child, which fusion has always placed
            # unrepaired in front; only a deeper path changes what is repaired.
            shortest = 1 if exact_compute else 2
            path = self.kv.match_path(chunks, shortest) if reuse_path else []
            prefix = [kv for kv, _ in path]
            rest = chunks[len(path) :]
            hits: list[Hit | None] = list(path)
            timings["cache_fetch"] = time.perf_counter() - began
            if exact_compute:
                began = time.perf_counter()
                computed = self.kv.encode_path(prefix, rest, cost)
                timings["kv_compute"] = time.perf_counter() - began
                self.kv.store_path(chunks, len(path), computed)
                kvs, hits, exact = prefix + computed, hits + [None] * len(rest), len(chunks)
            else:
                gathered = self.kv.gather(rest, cost, lossless_only=deterministic)
                timings["cache_fetch"] = (timings["cache_fetch"] or 0.0) + gathered.fetch_s
                timings["kv_compute"] = gathered.compute_s
                kvs, hits, exact = prefix + gathered.kvs, hits + gathered.hits, len(path)
                if self.kv.stores:
                    for kv in gathered.computed:
                        self.kv.chunk_cache.put(kv)
            for source, hit, ids in zip(sources, hits, chunks, strict=True):
                if hit is not None:
                    source.cache_tier = hit[1]
                    usage.tokens_by_tier[hit[1]] = usage.tokens_by_tier.get(hit[1], 0) + len(ids)
                else:
                    usage.computed_tokens += len(ids)
            fused = self.kv.fuse(layout, kvs, method, params, cost, exact, not deterministic)
            fused.use_prefix_cache = fused.use_prefix_cache and not deterministic
            if exact_compute:  # computed now, exactly: reused only what the path held
                report = fused.report
                report.reused_tokens = sum(kv.num_tokens for kv in prefix)
                report.recomputed_tokens = report.context_tokens - report.reused_tokens
            start = len(layout.root_ids)
            for index in fused.report.chunk_order:
                end = start + len(chunks[index])
                if hits[index] is not None:
                    spans.append((start, end))
                start = end
            for index in fused.report.pruned_chunks:
                sources[index].pruned = True
        usage.reused_tokens = fused.report.reused_tokens
        usage.recomputed_tokens = fused.report.recomputed_tokens
        usage.pruned_chunks = len(fused.report.pruned_chunks)
        usage.pruned_tokens = fused.report.pruned_tokens
        usage.selection_fraction = fused.report.selection_fraction
        usage.exact_tokens = fused.report.exact_tokens
        timings["fusion"] = fused.report.prepare_s
        return PreparedQuery(
            fused.prompt_ids,
            fused,
            sources,
            usage,
            sampling,
            timings,
            received,
            spans,
            length_param,
        )
