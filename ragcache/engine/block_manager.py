"""Allocates, shares and frees KV blocks; exact prefix caching by a hash chain.

A full block's hash covers the hash of the block before it, the request's cache salt
(tenant and adapter) and its token ids, so equal hashes mean equal prefixes. A hit
also compares token ids, so a hash collision is a miss. Freed blocks that hold a
registered prefix stay findable until they are reused, oldest first.

With ``placement="contiguous"`` (the default) a sequence's blocks are taken as runs of
consecutive blocks (``ragcache.engine.block_placement``): a new sequence starts a run
long enough for its prompt and its ``max_tokens``, the blocks after its prompt are
reserved for its decode steps, and free blocks without a registered prefix are used
before those that hold one. ``placement="fifo"`` takes the oldest free block each time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ragcache.engine.block_placement import PLACEMENTS, longest_run, place_run
from ragcache.engine.sequence import Sequence

NO_OWNER = -1


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(previous: bytes | None, salt: str, token_ids: list[int]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(previous or b"root")
    digest.update(salt.encode())
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        placement: str = "contiguous",
    ):
        if placement not in PLACEMENTS:
            raise ValueError(
                f"engine.block_placement={placement!r}; use one of {', '.join(PLACEMENTS)}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.contiguous = placement == "contiguous"
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.free_mask = np.ones(num_blocks, dtype=bool)
        self.hashed_mask = np.zeros(num_blocks, dtype=bool)
        # The sequence a free block is kept for (its next decode blocks), or NO_OWNER.
        self.reserved_for = np.full(num_blocks, NO_OWNER, dtype=np.int64)
        self.hash_to_block: dict[bytes, int] = {}
        self.prefix_hits = 0
        self.prefix_queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a registered prefix (reusable until overwritten)."""
        return sum(1 for i in self.free_ids if self.blocks[i].block_hash is not None)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take_free(self) -> int:
        return self._claim(next(iter(self.free_ids)))

    def _claim(self, block_id: int) -> int:
        """Take a free block for one sequence, dropping any prefix it held."""
        del self.free_ids[block_id]
        self.free_mask[block_id] = False
        self.reserved_for[block_id] = NO_OWNER
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
            self.hashed_mask[block_id] = False
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        self.free_ids[block_id] = None
        self.free_mask[block_id] = True

    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
            self.free_mask[block_id] = False
            self.reserved_for[block_id] = NO_OWNER
        block.ref_count += 1

    def _unreserved_free(self) -> list[np.ndarray]:
        """Masks of free blocks nobody has reserved, in order of preference: those that
        hold no cached prefix first."""
        open_free = self.free_mask & (self.reserved_for == NO_OWNER)
        return [open_free & ~self.hashed_mask, open_free]

    def _take_run(self, seq: Sequence, count: int, reserve: int) -> list[int]:
        """``count`` blocks for the sequence, consecutive where free space allows, with up
        to ``reserve`` more right after them kept for its later tokens."""
        candidates = self._unreserved_free()
        lengths = [count + reserve, count] if reserve else [count]
        placed = place_run(candidates, lengths)
        if placed is None:
            # Every free block is kept for some sequence: take the far end of the
            # longest free run, away from the sequence that run was kept for.
            start, length = longest_run(self.free_mask)
            taken = min(length, count)
            placed = (start + length - taken, taken)
        start, length = placed
        taken = min(length, count)
        blocks = [self._claim(b) for b in range(start, start + taken)]
        blocks.extend(self._take_free() for _ in range(count - taken))
        kept = slice(start + taken, start + length)
        open_blocks = self.free_mask[kept] & (self.reserved_for[kept] == NO_OWNER)
        self.reserved_for[kept][open_blocks] = seq.seq_id
        return blocks

    def _take_next(self, seq: Sequence) -> int:
        """One more block for a growing sequence: the one after its last if it is free
        and not kept for another sequence, else the start of a new run."""
        if not self.contiguous:
            return self._take_free()
        if seq.block_table:
            after = seq.block_table[-1] + 1
            if (
                after < self.num_blocks
                and self.free_mask[after]
                and self.reserved_for[after] in (NO_OWNER, seq.seq_id)
            ):
                return self._claim(after)
        return self._take_run(seq, 1, self._growth_blocks(seq, len(seq.block_table) + 1))[0]

    def _growth_blocks(self, seq: Sequence, held: int) -> int:
        """Blocks the sequence will still need past ``held`` if it runs to max_tokens."""
        remaining = max(0, seq.params.max_tokens - seq.num_output_tokens)
        return max(0, self.blocks_needed(len(seq) + remaining) - held)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of the prompt (never the whole prompt).

        A request asking for prompt logprobs matches nothing: cached tokens are not
        recomputed, so their logprobs would be missing.
        """
        if not self.enable_prefix_caching or not seq.use_prefix_cache or seq.params.prompt_logprobs:
            return []
        limit = (seq.num_prompt_tokens - 1) // self.block_size
        matched: list[int] = []
        previous: bytes | None = None
        for b in range(limit):
            tokens = seq.token_ids[b * self.block_size : (b + 1) * self.block_size]
            block_hash = chain_hash(previous, seq.cache_salt, tokens)
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            matched.append(block_id)
            previous = block_hash
        return matched

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        matched = self.match_prefix(seq)
        seq.prefix_match = matched
        reusable_free = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(len(seq)) - len(matched)
        return needed + reusable_free + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing a cached prefix."""
        assert not seq.block_table, "sequence already holds blocks"
        # can_allocate just hashed the prompt; nothing changed the cache in between.
        matched = seq.prefix_match if seq.prefix_match is not None else self.match_prefix(seq)
        seq.prefix_match = None
        self.prefix_queries += 1
        for block_id in matched:
            self._share(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(self.blocks[block_id].block_hash or b"")
        if matched:
            self.prefix_hits += 1
        seq.num_cached_tokens = len(matched) * self.block_size
        seq.num_registered_blocks = len(matched)
        needed = self.blocks_needed(len(seq)) - len(seq.block_table)
        if needed <= 0:
            return
        if self.contiguous:
            growth = self._growth_blocks(seq, len(seq.block_table) + needed)
            seq.block_table.extend(self._take_run(seq, needed, growth))
        else:
            seq.block_table.extend(self._take_free() for _ in range(needed))

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) * self.block_size > len(seq) - 1 or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        """Make room for the token at index len(seq) - 1 (the one about to be computed)."""
        if len(seq.block_table) * self.block_size < len(seq):
            seq.block_table.append(self._take_next(seq))

    def reserve_lookahead(self, seq: Sequence, num_tokens: int) -> int:
        """Take free blocks for up to ``num_tokens`` slots past the sequence's end.

        Speculative drafts live there until verified; returns how many slots are covered.
        """
        end = len(seq) + num_tokens
        while len(seq.block_table) * self.block_size < end and self.free_ids:
            seq.block_table.append(self._take_next(seq))
        return min(num_tokens, len(seq.block_table) * self.block_size - len(seq))

    def release_lookahead(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` slots (they held rejected drafts)."""
        keep = max(self.blocks_needed(num_tokens), seq.num_registered_blocks)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._release(block.block_id)
                if self.contiguous:
                    self.reserved_for[block.block_id] = seq.seq_id

    def register_full_blocks(self, seq: Sequence, num_computed: int) -> None:
        """Publish the hashes of blocks whose every token's KV is now computed."""
        if not self.enable_prefix_caching:
            return
        full = min(num_computed, len(seq), seq.cacheable_tokens) // self.block_size
        while seq.num_registered_blocks < full:
            b = seq.num_registered_blocks
            tokens = seq.token_ids[b * self.block_size : (b + 1) * self.block_size]
            previous = seq.block_hashes[b - 1] if b > 0 else None
            block_hash = chain_hash(previous, seq.cache_salt, tokens)
            block = self.blocks[seq.block_table[b]]
            if block.block_hash is None and block_hash not in self.hash_to_block:
                block.block_hash = block_hash
                block.token_ids = tuple(tokens)
                self.hash_to_block[block_hash] = block.block_id
                self.hashed_mask[block.block_id] = True
            seq.block_hashes.append(block_hash)
            seq.num_registered_blocks += 1

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._release(block_id)
        seq.block_table = []
        if self.contiguous:
            self.reserved_for[self.reserved_for == seq.seq_id] = NO_OWNER

    def stats(self) -> dict[str, float]:
        return {
            "num_blocks": self.num_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_cached_free_blocks": self.num_cached_free_blocks,
            "usage": self.usage(),
            "num_reserved_blocks": int((self.reserved_for != NO_OWNER).sum()),
            "prefix_cache_queries": self.prefix_queries,
            "prefix_cache_hits": self.prefix_hits,
        }
