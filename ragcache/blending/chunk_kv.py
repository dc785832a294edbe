"""Per-chunk KV: computed once after the root prompt, stored with its positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.model import LlamaModel


@dataclass(slots=True)
class ChunkKV:
    """K (rotated to ``positions``) and V per layer, each [num_tokens, Hkv, D].

    ``exact`` is False when the KV may differ from what the encoder computes (it went
    through a lossy codec): such KV is never handed on as an exact prefix.
    """

    token_ids: list[int]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    positions: torch.Tensor
    exact: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class ChunkEncoder:
    """Prefills chunks after a fixed root prompt, many chunks in one forward call.

    Each chunk attends to the root and to itself only, which is what makes its KV
    position-independent up to one rotation, and reusable in any prompt.
    """

    def __init__(self, model: LlamaModel, root_ids: list[int], block_size: int = 16) -> None:
        self.model = model
        self.root_ids = list(root_ids)
        self.block_size = block_size
        if root_ids:
            self.root = self._encode_batch([[]], include_root=True)[0]
        else:
            empty = [
                torch.empty(0, model.spec.num_kv_heads, model.spec.head_dim, dtype=model.dtype)
            ]
            self.root = ChunkKV(
                [],
                empty * model.spec.num_layers,
                empty * model.spec.num_layers,
                torch.empty(0, dtype=torch.long),
            )

    @torch.inference_mode()
    def _encode_batch(self, chunks: list[list[int]], include_root: bool = False) -> list[ChunkKV]:
        model, bs = self.model, self.block_size
        root_len = len(self.root_ids)
        spec = model.spec
        lengths = [root_len + len(c) for c in chunks]
        device = model.device
        meta = contiguous_metadata(lengths, bs, device)
        num_blocks = int(meta.block_tables.max()) + 1
        pool = KVPool(spec, num_blocks, bs, model.dtype, device)
        bases = (meta.block_tables[:, 0].to(torch.long) * bs).tolist()
        # The root is recomputed per chunk: bit-identical to its own prefill, and far
        # cheaper than the chunk itself.
        ids = [t for chunk in chunks for t in (*self.root_ids, *chunk)]
        positions = [p for n in lengths for p in range(n)]
        model(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            meta,
            pool,
        )
        out: list[ChunkKV] = []
        for row, chunk in enumerate(chunks):
            begin = 0 if include_root else root_len
            chunk_slots = torch.arange(
                bases[row] + begin, bases[row] + lengths[row], dtype=torch.long, device=device
            )
            ks, vs = [], []
            for layer in range(spec.num_layers):
                k, v = pool.read_slots(layer, chunk_slots)
                ks.append(k)
                vs.append(v)
            token_ids = (self.root_ids if include_root else []) + list(chunk)
            out.append(
                ChunkKV(token_ids, ks, vs, torch.arange(begin, lengths[row], dtype=torch.long))
            )
        return out

    def encode(self, chunks: list[list[int]], max_batch_tokens: int = 4096) -> list[ChunkKV]:
        """KV of each chunk as computed right after the root prompt."""
        out: list[ChunkKV] = []
        batch: list[list[int]] = []
        tokens = 0
        for chunk in chunks:
            if not chunk:
                raise ValueError("a chunk must have at least one token")
            if batch and tokens + len(chunk) > max_batch_tokens:
                out.extend(self._encode_batch(batch))
                batch, tokens = [], 0
            batch.append(chunk)
            tokens += len(chunk) + len(self.root_ids)
        if batch:
            out.extend(self._encode_batch(batch))
        return out
