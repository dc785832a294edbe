"""Device slots: the stacked adapter weights that one forward call reads.

Per adapted (layer, target) there is one pair of buffers, A [1 + max_loras, in, rank]
and B [1 + max_loras, rank, out], in the model's dtype on its device. Slot 0 stays
zero (the base model); an adapter occupies one slot in every buffer, zero-padded to
the buffers' rank and zero where it adapts nothing. Buffers appear when an adapter
first needs them and are re-padded when a larger rank arrives. Residents are evicted
least recently used first, never one that a running request uses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set

import torch

from ragcache.engine.lora import LoraAdapter, target_slice
from ragcache.engine.spec import ModelSpec


class LoraSlots:
    def __init__(
        self, spec: ModelSpec, max_loras: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.spec = spec
        self.max_loras = max_loras
        self.dtype = dtype
        self.device = device
        self.rank = 0
        self.buffers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ranks = [0] * (max_loras + 1)
        self.occupants: list[LoraAdapter | None] = [None] * (max_loras + 1)
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, LRU first
        self.num_loads = 0
        self.num_evictions = 0

    def slot_of(self, adapter_id: str) -> int | None:
        return self.resident.get(adapter_id)

    def touch(self, adapter_id: str) -> None:
        self.resident.move_to_end(adapter_id)

    def _free_slot(self, in_use: Set[str]) -> int | None:
        for slot in range(1, self.max_loras + 1):
            if self.occupants[slot] is None:
                return slot
        for adapter_id, slot in self.resident.items():
            if adapter_id not in in_use:
                return slot
        return None

    def can_load(self, adapter_id: str, in_use: Set[str]) -> bool:
        return adapter_id in self.resident or self._free_slot(in_use) is not None

    def load(self, adapter: LoraAdapter, in_use: Set[str]) -> int:
        """The adapter's slot, copying it in (and evicting an idle resident) if needed."""
        slot = self.slot_of(adapter.id)
        if slot is not None:
            self.touch(adapter.id)
            return slot
        slot = self._free_slot(in_use)
        if slot is None:
            raise RuntimeError(
                f"all {self.max_loras} LoRA slots hold adapters of running requests "
                "(lora.max_loras); the scheduler admits a request only when one is free"
            )
        evicted = self.occupants[slot]
        if evicted is not None:
            del self.resident[evicted.id]
            self.num_evictions += 1
        self._make_room(adapter)
        self._write(slot, adapter)
        self.occupants[slot] = adapter
        self.ranks[slot] = adapter.rank
        self.resident[adapter.id] = slot
        self.num_loads += 1
        return slot

    def drop(self, adapter_id: str) -> None:
        slot = self.resident.pop(adapter_id, None)
        if slot is None:
            return
        for a, b in self.buffers.values():
            a[slot].zero_()
            b[slot].zero_()
        self.occupants[slot] = None
        self.ranks[slot] = 0

    def _make_room(self, adapter: LoraAdapter) -> None:
        if adapter.rank > self.rank:
            self.rank = adapter.rank
            for key, (a, b) in list(self.buffers.items()):
                wider_a, wider_b = self._zeros(key)
                wider_a[:, :, : a.shape[2]] = a
                wider_b[:, : b.shape[1]] = b
                self.buffers[key] = (wider_a, wider_b)
        for key in adapter.weights:
            if key not in self.buffers:
                self.buffers[key] = self._zeros(key)

    def _zeros(self, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        geometry = target_slice(self.spec, key[1])
        slots = self.max_loras + 1
        options = {"dtype": self.dtype, "device": self.device}
        return (
            torch.zeros(slots, geometry.in_features, self.rank, **options),
            torch.zeros(slots, self.rank, geometry.out_features, **options),
        )

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        for key, (a, b) in self.buffers.items():
            a[slot].zero_()
            b[slot].zero_()
            pair = adapter.weights.get(key)
            if pair is not None:
                rank = pair[0].shape[1]
                a[slot, :, :rank].copy_(pair[0])
                b[slot, :rank].copy_(pair[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.buffers.values())
