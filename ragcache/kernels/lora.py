"""Batched LoRA: every token adds its own adapter's low-rank update to a projection.

Adapters sit in stacked slot buffers, ``a`` [slots, in, rank] and ``b`` [slots, rank,
out] (zero-padded to one rank, scaling folded into ``b``; slot 0 is all zeros, the base
model). A token in slot s gets ``y += (x @ a[s]) @ b[s]``, so one batch mixes adapters.

``add_lora_ref`` gathers each token's A and B (the BGMV formulation) and is the
reference the Triton kernel is tested against. ``add_lora_grouped`` is the CPU serving
path: tokens of one slot form a group, and each group is two dense matmuls (the SGMV
formulation), which reads each adapter's weights once instead of once per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SlotGroup:
    """The tokens of one adapter slot: ``index`` into the batch, or None for all of them."""

    slot: int
    rank: int
    index: torch.Tensor | None


def check_lora_args(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor
) -> None:
    tokens, features = x.shape
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(
            f"a and b must be [slots, in, rank] and [slots, rank, out], got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[1] != features or y.shape != (tokens, b.shape[2]):
        raise ValueError(
            f"x {tuple(x.shape)}, y {tuple(y.shape)} do not fit a {tuple(a.shape)} "
            f"and b {tuple(b.shape)}"
        )
    if token_slots.shape != (tokens,) or token_slots.is_floating_point():
        raise ValueError(
            f"token_slots must be an integer tensor of shape [{tokens}], "
            f"got {token_slots.dtype} {tuple(token_slots.shape)}"
        )


def add_lora_ref(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor
) -> None:
    """y[t] += (x[t] @ a[slot[t]]) @ b[slot[t]], in fp32, through per-token gathers."""
    check_lora_args(y, x, a, b, token_slots)
    slots = token_slots.to(torch.long)
    shrunk = torch.bmm(x.float().unsqueeze(1), a.index_select(0, slots).float())
    delta = torch.bmm(shrunk, b.index_select(0, slots).float()).squeeze(1)
    y.add_(delta.to(y.dtype))


def slot_groups(token_slots: torch.Tensor, ranks: list[int]) -> list[SlotGroup]:
    """Tokens grouped by adapter slot, skipping slot 0 (the base model adds nothing)."""
    present = torch.unique(token_slots).tolist()
    if present == [0]:
        return []
    if len(present) == 1:
        return [SlotGroup(present[0], ranks[present[0]], None)]
    return [
        SlotGroup(slot, ranks[slot], (token_slots == slot).nonzero().squeeze(1))
        for slot in present
        if slot != 0
    ]


def add_lora_grouped(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: list[SlotGroup]
) -> None:
    """The same sum as ``add_lora_ref``, one pair of dense matmuls per slot group, each
    cut to its adapter's own rank."""
    for group in groups:
        a_slot = a[group.slot, :, : group.rank]
        b_slot = b[group.slot, : group.rank]
        if group.index is None:
            y.addmm_(x @ a_slot, b_slot)
        else:
            rows = x.index_select(0, group.index)
            y.index_add_(0, group.index, (rows @ a_slot) @ b_slot)
