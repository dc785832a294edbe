"""LoRA in the forward pass: the model's projections wrapped to add adapter updates.

Every wrapped projection reads one shared ``LoraState``. During an engine step it holds
a ``LoraBatch`` (each computed token's adapter slot), so one call mixes adapters;
around a fusion or chunk-encoding call it holds one adapter's weights for every token,
whatever subset of tokens a layer computes. With neither, the projections are the base
model's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ragcache.engine.lora import TARGET_MODULES, target_slice
from ragcache.engine.lora_slots import LoraSlots
from ragcache.engine.model import LlamaModel
from ragcache.kernels import dispatch
from ragcache.kernels.lora import SlotGroup, slot_groups

WRAPPED_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
AdapterWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class LoraBatch:
    """The adapter slot [T] of each computed token of one forward call."""

    token_slots: torch.Tensor
    ranks: list[int]
    _groups: list[SlotGroup] | None = field(default=None, repr=False)

    @property
    def groups(self) -> list[SlotGroup]:
        """Tokens grouped by slot (the CPU path), found once and shared by all layers."""
        if self._groups is None:
            self._groups = slot_groups(self.token_slots, self.ranks)
        return self._groups


@dataclass(slots=True)
class LoraState:
    slots: LoraSlots
    batch: LoraBatch | None = None
    uniform: AdapterWeights | None = None


class LoraLinear(nn.Module):
    """A base projection plus the active adapters' updates on its output slices."""

    def __init__(
        self, base: nn.Linear, layer: int, targets: list[tuple[str, int, int]], state: LoraState
    ) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.targets = targets
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        state = self.state
        if state.uniform is not None:
            for target, offset, size in self.targets:
                pair = state.uniform.get((self.layer, target))
                if pair is not None:
                    y[:, offset : offset + size].addmm_(x @ pair[0], pair[1])
        elif state.batch is not None:
            batch = state.batch
            if batch.token_slots.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"{x.shape[0]} tokens reached a LoRA projection whose batch names "
                    f"{batch.token_slots.shape[0]}; a subset of tokens needs a uniform adapter"
                )
            for target, offset, size in self.targets:
                buffers = state.slots.buffers.get((self.layer, target))
                if buffers is not None:
                    window = y[:, offset : offset + size]
                    groups = [] if dispatch.use_triton(x) else batch.groups
                    dispatch.add_lora(window, x, *buffers, batch.token_slots, groups)
        return y

    def forward_parts(self, x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
        return self(x).split(list(sizes), dim=-1)


def install_lora_layers(model: LlamaModel, state: LoraState) -> None:
    """Wrap every adaptable projection of ``model`` once; a second state is refused."""
    spec = model.spec
    for index, layer in enumerate(model.layers):
        for path in WRAPPED_MODULES:
            owner_name, attr = path.split(".")
            owner = getattr(layer, owner_name)
            current = getattr(owner, attr)
            if isinstance(current, LoraLinear):
                if current.state is not state:
                    raise ValueError("this model already serves LoRA adapters for another engine")
                continue
            targets = [
                (t, target_slice(spec, t).offset, target_slice(spec, t).out_features)
                for t in TARGET_MODULES
                if target_slice(spec, t).module == path
            ]
            setattr(owner, attr, LoraLinear(current, index, targets, state))
