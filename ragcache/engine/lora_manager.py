"""The engine's adapters: registered by name, warm ones on the host, hot ones in slots.

Registering reads and checks an adapter once. Host copies are kept for the
``max_cpu_loras`` most recently used adapters; a colder one is read again from its
folder when a request needs it (and must still have the same content). A request is
admitted only when its adapter has a device slot or can get one, and its slot cannot
be taken while it runs. The model is wrapped for LoRA when the first adapter arrives,
so an engine that never serves one runs the base projections untouched.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ragcache.engine.lora import (
    LoraAdapter,
    LoraLoadError,
    UnknownAdapterError,
    check_adapter_name,
    parse_adapter_spec,
    read_lora_adapter,
)
from ragcache.engine.lora_config import LoraConfig
from ragcache.engine.lora_layers import LoraBatch, LoraState, install_lora_layers
from ragcache.engine.lora_slots import LoraSlots
from ragcache.engine.model import LlamaModel
from ragcache.engine.scheduler import ScheduledSeq
from ragcache.engine.sequence import Sequence
from ragcache.engine.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    path: Path
    fingerprint: str
    rank: int
    targets: tuple[str, ...]
    nbytes: int

    @property
    def id(self) -> str:
        return f"{self.name}@{self.fingerprint}"


class LoraManager:
    def __init__(
        self,
        model: LlamaModel,
        spec: ModelSpec,
        config: LoraConfig,
        running: Callable[[], Iterable[Sequence]],
    ) -> None:
        for name, value, low in (
            ("max_loras", config.max_loras, 1),
            ("max_cpu_loras", config.max_cpu_loras, 1),
            ("max_rank", config.max_rank, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"lora.{name}={value!r} must be an integer >= {low}")
        self.model = model
        self.spec = spec
        self.config = config
        self.running = running
        self.infos: dict[str, AdapterInfo] = {}
        self.host: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.slots = LoraSlots(spec, config.max_loras, model.dtype, model.device)
        self.state = LoraState(self.slots)
        self.installed = False
        self.num_host_reads = 0
        for item in config.adapters:
            name, path = parse_adapter_spec(item)
            self.add(self.read(path, name))

    # ---- registry ------------------------------------------------------------------

    def read(self, path: str | Path, name: str) -> LoraAdapter:
        """Read and check an adapter folder; safe on any thread (touches no engine state)."""
        return read_lora_adapter(path, self.spec, name, self.config.max_rank)

    def add(self, adapter: LoraAdapter) -> AdapterInfo:
        if adapter.name in self.infos:
            raise LoraLoadError(f"adapter {adapter.name!r} is already loaded; unload it first")
        info = AdapterInfo(
            adapter.name,
            adapter.path,
            adapter.fingerprint,
            adapter.rank,
            tuple(adapter.targets),
            adapter.nbytes,
        )
        self.infos[adapter.name] = info
        self._keep_on_host(adapter)
        return info

    def remove(self, name: str) -> AdapterInfo:
        info = self.info(name)
        del self.infos[name]
        self.host.pop(name, None)
        self.slots.drop(info.id)
        return info

    def info(self, name: str) -> AdapterInfo:
        info = self.infos.get(name)
        if info is None:
            known = ", ".join(sorted(self.infos)) or "none"
            raise UnknownAdapterError(f"adapter {name!r} is not loaded (loaded: {known})")
        return info

    def get(self, key: str) -> LoraAdapter:
        """The host copy of adapter ``name`` (or ``name@fingerprint``, which must still be
        the loaded content), read again from its folder if it was dropped."""
        name, _, fingerprint = key.partition("@")
        info = self.info(check_adapter_name(name))
        if fingerprint and fingerprint != info.fingerprint:
            raise UnknownAdapterError(
                f"adapter {name!r} was replaced by other weights since this request began"
            )
        adapter = self.host.get(name)
        if adapter is not None:
            self.host.move_to_end(name)
            return adapter
        adapter = self.read(info.path, name)
        self.num_host_reads += 1
        if adapter.fingerprint != info.fingerprint:
            raise LoraLoadError(
                f"adapter {name!r}: the files in {info.path} changed since it was loaded; "
                "unload it and load it again"
            )
        self._keep_on_host(adapter)
        return adapter

    def _keep_on_host(self, adapter: LoraAdapter) -> None:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.config.max_cpu_loras:
            self.host.popitem(last=False)

    # ---- scheduling and the forward pass -------------------------------------------

    def _in_use(self) -> set[str]:
        return {seq.lora.id for seq in self.running() if seq.lora is not None}

    def can_admit(self, seq: Sequence) -> bool:
        return seq.lora is None or self.slots.can_load(seq.lora.id, self._in_use())

    def make_resident(self, seq: Sequence) -> None:
        if seq.lora is None:
            return
        self._install()
        self.slots.load(seq.lora, self._in_use())

    def _install(self) -> None:
        if not self.installed:
            install_lora_layers(self.model, self.state)
            self.installed = True

    @contextmanager
    def activate(self, scheduled: list[ScheduledSeq]) -> Iterator[None]:
        """Tell the wrapped projections each scheduled token's adapter slot."""
        seq_slots = [0] * len(scheduled)
        for row, item in enumerate(scheduled):
            adapter = item.seq.lora
            if adapter is not None:
                slot = self.slots.slot_of(adapter.id)
                if slot is None:
                    raise RuntimeError(f"adapter {adapter.name!r} is scheduled but not resident")
                self.slots.touch(adapter.id)
                seq_slots[row] = slot
        if not any(seq_slots):
            yield
            return
        counts = torch.tensor([len(item.computed_indices) for item in scheduled])
        token_slots = torch.repeat_interleave(torch.tensor(seq_slots, dtype=torch.int32), counts)
        self.state.batch = LoraBatch(token_slots.to(self.slots.device), list(self.slots.ranks))
        try:
            yield
        finally:
            self.state.batch = None

    @contextmanager
    def uniform(self, key: str | None) -> Iterator[None]:
        """Every forward call inside uses adapter ``key`` as ``get`` takes it (None: the
        base model)."""
        if key is None:
            yield
            return
        if self.state.uniform is not None:
            raise RuntimeError("uniform adapter scopes do not nest")
        adapter = self.get(key)
        self._install()
        options = {"dtype": self.model.dtype, "device": self.model.device}
        self.state.uniform = {
            key: (a.to(**options), b.to(**options)) for key, (a, b) in adapter.weights.items()
        }
        try:
            yield
        finally:
            self.state.uniform = None

    def stats(self) -> dict[str, float]:
        return {
            "lora_adapters": len(self.infos),
            "lora_adapters_on_host": len(self.host),
            "lora_adapters_resident": len(self.slots.resident),
            "lora_slot_loads": self.slots.num_loads,
            "lora_slot_evictions": self.slots.num_evictions,
            "lora_host_reads": self.num_host_reads,
            "lora_slot_bytes": self.slots.nbytes,
        }
