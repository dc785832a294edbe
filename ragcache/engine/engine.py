"""The base engine: requests in, tokens out, one scheduler step at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

from ragcache.engine.block_manager import BlockManager
from ragcache.engine.config import EngineConfig
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import LoadedModel
from ragcache.engine.lora import UnknownAdapterError, adapter_salt
from ragcache.engine.lora_config import LoraConfig
from ragcache.engine.lora_manager import AdapterInfo, LoraManager
from ragcache.engine.model_runner import ModelRunner
from ragcache.engine.outputs import RequestOutput
from ragcache.engine.runtime_choice import CpuFacts, choose_threads
from ragcache.engine.sampler import Sampler
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from ragcache.engine.scheduler import ScheduledSeq, Scheduler, make_policy
from ragcache.engine.sequence import PlacedKV, Sequence
from ragcache.engine.speculate import Speculator, build_proposer
from ragcache.engine.stopping import request_output, stop_reason
from ragcache.engine.swap import swap_in, swap_out

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        lora: LoraConfig | None = None,
        draft: LoadedModel | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.loaded = loaded
        self.spec = loaded.spec
        self.tokenizer = loaded.tokenizer
        if loaded.device.type == "cpu":
            torch.set_num_threads(choose_threads(self.config.threads, CpuFacts.of_this_machine()))
        num_blocks = KVPool.blocks_for_bytes(
            self.spec, self.config.kv_cache_bytes, self.config.block_size, loaded.dtype
        )
        if num_blocks < 2:
            raise ValueError(
                f"engine.kv_cache_bytes={self.config.kv_cache_bytes} holds {num_blocks} blocks "
                f"of {self.config.block_size} tokens; raise it"
            )
        self.pool = KVPool(
            self.spec, num_blocks, self.config.block_size, loaded.dtype, loaded.device
        )
        self.block_manager = BlockManager(
            num_blocks,
            self.config.block_size,
            self.config.enable_prefix_caching,
            self.config.block_placement,
        )
        self.lora = LoraManager(
            loaded.model, self.spec, lora or LoraConfig(), lambda: self.scheduler.running
        )
        self.runner = ModelRunner(loaded.model, self.pool, self.lora)
        self.scheduler = Scheduler(
            self.block_manager,
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            make_policy(
                self.config.scheduling_policy, self.block_manager, self.config.starvation_s
            ),
            on_admit=self._plan,
            on_preempt=self._swap_out if self.config.preemption_mode == "swap" else None,
            can_admit=self.lora.can_admit,
        )
        if self.config.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"engine.preemption_mode={self.config.preemption_mode!r}; use recompute or swap"
            )
        self.sampler = Sampler()
        self.requests: dict[str, Sequence] = {}
        self.eos_ids = set(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.max_model_len = min(self.spec.max_position, num_blocks * self.config.block_size)
        speculative = self.config.speculative
        self.speculator = Speculator(
            speculative,
            build_proposer(speculative, loaded, self.pool, self.sampler, draft),
            self.block_manager,
            self.sampler,
            self.config.max_num_batched_tokens,
            self.max_model_len,
        )
        self.num_steps = 0
        self.num_swapped_out = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0

    @property
    def model(self) -> Any:
        return self.loaded.model

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer; pass token ids", "prompt")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        placed: PlacedKV | None = None,
        cache_salt: str = "",
        use_prefix_cache: bool = True,
        adapter: str | None = None,
    ) -> Sequence:
        """Queue a prompt; ``adapter`` names a loaded LoRA adapter (None: the base model)."""
        params = (params or SamplingParams()).validate(self.spec.vocab_size)
        self.speculator.validate(params)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty; send at least one token", "prompt")
        if any(not 0 <= t < self.spec.vocab_size for t in ids):
            raise InvalidRequestError(
                f"prompt has token ids outside [0, {self.spec.vocab_size})", "prompt"
            )
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; this model and KV pool accept at most "
                f"{self.max_model_len - 1}",
                "prompt",
            )
        room = self.max_model_len - len(ids)
        if params.strict_max_tokens and params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={params.max_tokens} is more than the {room} tokens this prompt "
                f"leaves: this model and KV pool hold {self.max_model_len} tokens and the prompt "
                f"takes {len(ids)}; send max_tokens <= {room} or shorten the prompt",
                "max_tokens",
            )
        if placed is not None:
            self._validate_placed(placed, len(ids))
        if request_id is not None and request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        try:
            lora = None if adapter is None else self.lora.get(adapter)
        except (UnknownAdapterError, ValueError) as error:
            raise InvalidRequestError(str(error), "adapter") from None
        salt = cache_salt if lora is None else adapter_salt(cache_salt, lora.id)
        seq = Sequence(ids, params, request_id, placed, salt, use_prefix_cache, lora)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def _validate_placed(self, placed: PlacedKV, prompt_len: int) -> None:
        spec = self.spec
        if len(placed.k) != spec.num_layers or len(placed.v) != spec.num_layers:
            raise InvalidRequestError(f"placed KV must have {spec.num_layers} layers", "placed")
        shape = (placed.num_tokens, spec.num_kv_heads, spec.head_dim)
        if placed.num_tokens > prompt_len or any(got != shape for got in placed.shapes()):
            raise InvalidRequestError(
                f"placed KV tensors must be {shape} with N <= prompt length", "placed"
            )
        resume = placed.resume
        if resume is not None and not (
            0 < resume.layer <= spec.num_layers
            and placed.num_tokens <= resume.hidden.shape[0] <= prompt_len
            and resume.hidden.shape[-1] == spec.hidden_size
            and len(resume.tail_k) == len(resume.tail_v) == resume.layer
            and all(
                tuple(t.shape) == (resume.hidden.shape[0] - placed.num_tokens, *shape[1:])
                for t in (*resume.tail_k, *resume.tail_v)
            )
        ):
            raise InvalidRequestError(
                "placed.resume must name a layer inside the model, hidden states for the "
                "placed tokens and up to the whole prompt, and KV of its first layers for "
                "the prompt tokens after the placed ones",
                "placed",
            )
        if any(not 0 <= i < placed.num_tokens for i in placed.recompute):
            raise InvalidRequestError(
                "placed.recompute indices must lie below its token count", "placed"
            )

    def _swap_out(self, seq: Sequence) -> None:
        """Copy a decoding sequence's KV to host memory before its blocks are freed."""
        if swap_out(self.pool, seq):
            self.num_swapped_out += 1

    def _plan(self, seq: Sequence) -> None:
        self.lora.make_resident(seq)
        if seq.swapped is not None:
            swap_in(self.pool, seq)
            return
        start = seq.num_cached_tokens
        if seq.placed is None:
            seq.plan = list(range(start, len(seq)))
        else:
            placed_end = seq.placed.num_tokens
            chosen = {i for i in seq.placed.recompute if i >= start}
            chosen.update(range(max(placed_end, start), len(seq)))
            chosen.add(len(seq) - 1)
            seq.plan = sorted(chosen)
            self.runner.write_placed_kv(seq)
        seq.num_planned_done = 0

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it is unknown or finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self.sampler.forget(seq)
        self.speculator.forget(seq)
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One scheduler step. A sequence whose part of the step raises (its admission,
        its forward pass when run alone, its sampling, its bookkeeping) finishes with
        finish_reason "error" and its ``failure``; the other sequences go on."""
        scheduled = self.scheduler.schedule()
        failed = [self._fail(seq, error) for seq, error in self.scheduler.take_failed()]
        if not scheduled:
            if self.scheduler.waiting and not self.scheduler.running and not failed:
                return self._reject_unschedulable()
            return failed
        self.speculator.propose(scheduled)
        logits, scheduled, broken = self._execute(scheduled)
        failed.extend(self._fail(item.seq, error) for item, error in broken)
        self.scheduler.advance(scheduled)
        self.num_steps += 1
        self.num_prompt_tokens_computed += sum(
            len(s.token_indices) for s in scheduled if not s.samples or len(s.token_indices) > 1
        )
        sampling = [item for item in scheduled if item.samples]
        if logits is None:
            return failed
        kept = self.speculator.verify(logits, sampling)
        now = time.perf_counter()
        outputs = failed
        for item, tokens in zip(sampling, kept, strict=True):
            if isinstance(tokens, Exception):
                outputs.append(self._fail(item.seq, tokens))
                continue
            try:
                outputs.append(self._append(item, tokens, now))
            except Exception as error:
                outputs.append(self._fail(item.seq, error))
        return outputs

    def _execute(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[torch.Tensor | None, list[ScheduledSeq], list[tuple[ScheduledSeq, Exception]]]:
        """The step's logits, the items they cover and the items that failed.

        When the batch raises, each item runs alone (rewriting the same KV slots, as nothing
        has advanced yet), so a fault of one request fails that request alone.
        """
        try:
            return self.runner.execute(scheduled), scheduled, []
        except Exception as error:
            if len(scheduled) == 1:
                return None, [], [(scheduled[0], error)]
            log.warning("a batch of %d sequences failed; running each alone", len(scheduled))
        kept: list[ScheduledSeq] = []
        broken: list[tuple[ScheduledSeq, Exception]] = []
        rows: list[torch.Tensor] = []
        for item in scheduled:
            try:
                logits = self.runner.execute([item])
            except Exception as error:
                broken.append((item, error))
                continue
            kept.append(item)
            if logits is not None:
                rows.append(logits)
        return (torch.cat(rows) if rows else None), kept, broken

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        log.error(
            "request %s failed in the engine; the others go on", seq.request_id, exc_info=error
        )
        seq.finish_reason = "error"
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        self.sampler.forget(seq)
        self.speculator.forget(seq)
        self.requests.pop(seq.request_id, None)
        output = self._output(seq, [])
        output.error = f"the engine failed on this request: {type(error).__name__}: {error}"
        output.failure = error
        return output

    def _reject_unschedulable(self) -> list[RequestOutput]:
        seq = self.scheduler.waiting.pop(0)
        self.requests.pop(seq.request_id, None)
        output = self._output(seq, [])
        output.finished = True
        output.finish_reason = "error"
        output.error = f"request needs {len(seq)} tokens of KV; the pool cannot hold it"
        return [output]

    def _append(self, item: ScheduledSeq, tokens: list[int], now: float) -> RequestOutput:
        """Append a step's kept tokens (several when drafts were accepted) until one stops it."""
        seq = item.seq
        if seq.first_token_time is None:
            seq.first_token_time = now
        first_text = seq.output_text
        appended: list[int] = []
        for token in tokens:
            seq.token_ids.append(token)
            appended.append(token)
            self.num_generated_tokens += 1
            if self._check_stop(seq, token, now):
                break
        del seq.logprobs[seq.num_output_tokens :]
        new_text = seq.output_text[len(first_text) :]
        return self._output(seq, appended, new_text)

    def _check_stop(self, seq: Sequence, token: int, now: float) -> bool:
        """Update the text after one new token; finish the request if it should stop."""
        reason = stop_reason(seq, token, self.eos_ids, self.tokenizer, self.max_model_len)
        if reason is None:
            return False
        seq.finish_reason = reason
        seq.finish_time = now
        self.scheduler.finish(seq)
        self.sampler.forget(seq)
        self.speculator.forget(seq)
        self.requests.pop(seq.request_id, None)
        return True

    def _output(self, seq: Sequence, new_tokens: list[int], new_text: str = "") -> RequestOutput:
        return request_output(seq, new_tokens, new_text)

    def generate(
        self,
        prompts: Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapter: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch of prompts to completion; outputs in the order of the prompts.

        ``adapter`` is one LoRA adapter name for every prompt or one per prompt (None:
        the base model); prompts under different adapters share every step."""
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
        if adapter is None or isinstance(adapter, str):
            adapters: list[str | None] = [adapter] * len(prompts)
        else:
            adapters = list(adapter)
        ids = [
            self.add_request(p, sp, adapter=a).request_id
            for p, sp, a in zip(prompts, params_list, adapters, strict=True)
        ]
        finished: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for output in self.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]

    def add_lora(self, name: str, path: str) -> AdapterInfo:
        """Load a PEFT LoRA adapter folder under ``name`` (reads the disk on this thread)."""
        return self.lora.add(self.lora.read(path, name))

    def remove_lora(self, name: str) -> AdapterInfo:
        """Unload an adapter; refused while a queued or running request uses it."""
        users = [s for s in self.requests.values() if s.lora is not None and s.lora.name == name]
        if users:
            raise InvalidRequestError(
                f"adapter {name!r} is in use by {len(users)} unfinished requests; "
                "unload it once they finish",
                "adapter",
            )
        return self.lora.remove(name)

    def stats(self) -> dict[str, float]:
        return {
            **self.block_manager.stats(),
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_swapped_out": self.num_swapped_out,
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            **self.lora.stats(),
            **self.speculator.stats(),
        }
