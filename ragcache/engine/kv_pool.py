"""The paged KV block pool: per layer, K and V of [num_blocks, block_size, Hkv, D]."""

from __future__ import annotations

import torch

from ragcache.engine.spec import ModelSpec


class KVPool:
    def __init__(
        self,
        spec: ModelSpec,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def blocks_for_bytes(
        spec: ModelSpec, budget_bytes: int, block_size: int, dtype: torch.dtype
    ) -> int:
        per_block = spec.kv_bytes_per_token * block_size * torch.finfo(dtype).bits // 8
        return budget_bytes // per_block

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index, 0], self.data[index, 1]

    def read_slots(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [n, Hkv, D] stored at flat slots of one layer."""
        k, v = self.layer(layer)
        flat_k = k.view(-1, *k.shape[2:])
        flat_v = v.view(-1, *v.shape[2:])
        return flat_k.index_select(0, slots), flat_v.index_select(0, slots)

    def write_slots(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        kc, vc = self.layer(layer)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k.to(self.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v.to(self.dtype))
