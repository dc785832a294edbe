"""Contiguous block placement: runs of consecutive blocks, reservations, no leaks."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import numpy as np
import pytest

from ragcache.engine.block_manager import NO_OWNER, BlockManager
from ragcache.engine.block_placement import best_fit, longest_run, place_run, runs
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import Sequence
from tests.engine.test_engine_batching import make_engine, random_prompts

BLOCK = 4


def mask(text: str) -> np.ndarray:
    return np.array([c == "1" for c in text], dtype=bool)


def test_runs_best_fit_and_longest_run_on_hand_made_masks() -> None:
    starts, lengths = runs(mask("0110111001"))
    assert starts.tolist() == [1, 4, 9]
    assert lengths.tolist() == [2, 3, 1]
    assert best_fit(mask("0110111001"), 2) == 1  # the shortest run that fits
    assert best_fit(mask("0110111001"), 3) == 4
    assert best_fit(mask("0110111001"), 4) is None
    assert longest_run(mask("0110111001")) == (4, 3)
    assert longest_run(mask("000")) == (0, 0)
    assert runs(mask(""))[0].size == 0


def test_place_run_tries_every_mask_for_a_length_before_a_shorter_length() -> None:
    preferred, fallback = mask("1100000000"), mask("1101111000")
    assert place_run([preferred, fallback], [4, 2]) == (3, 4)
    assert place_run([preferred, fallback], [5, 2]) == (0, 2)
    assert place_run([preferred, fallback], [5]) is None


def sequence(num_prompt: int, max_tokens: int, first_token: int = 3) -> Sequence:
    prompt = list(range(first_token, first_token + num_prompt))
    return Sequence(prompt, SamplingParams(max_tokens=max_tokens))


def grow(manager: BlockManager, seq: Sequence, tokens: int) -> None:
    for _ in range(tokens):
        seq.token_ids.append(7)
        manager.may_append(seq)


def is_consecutive(table: list[int]) -> bool:
    return all(b - a == 1 for a, b in itertools.pairwise(table))


def test_sequences_grow_in_consecutive_blocks_up_to_max_tokens() -> None:
    manager = BlockManager(64, BLOCK)
    seqs = [sequence(10, 12), sequence(5, 20), sequence(13, 3)]
    for seq in seqs:
        manager.allocate(seq)
    for _ in range(20):
        for seq in seqs:
            if seq.num_output_tokens < seq.params.max_tokens:
                grow(manager, seq, 1)
    for seq in seqs:
        assert is_consecutive(seq.block_table), seq.block_table
        assert len(seq.block_table) == manager.blocks_needed(len(seq))
    used = [b for seq in seqs for b in seq.block_table]
    assert len(used) == len(set(used))


def test_fifo_placement_interleaves_growing_sequences() -> None:
    manager = BlockManager(64, BLOCK, placement="fifo")
    first, second = sequence(4, 8), sequence(4, 8)
    manager.allocate(first)
    manager.allocate(second)
    grow(manager, first, 8)
    assert not is_consecutive(first.block_table)


def test_reserved_blocks_are_kept_until_nothing_else_is_free() -> None:
    manager = BlockManager(8, BLOCK)
    first = sequence(4, 12)  # 1 block now, 3 more reserved
    manager.allocate(first)
    assert int((manager.reserved_for == first.seq_id).sum()) == 3
    second = sequence(16, 1)  # 4 blocks (+1 for its one token): fits outside the reservation
    manager.allocate(second)
    assert set(second.block_table).isdisjoint(range(1, 4))
    third = sequence(4, 1)  # only reserved blocks are left: it takes the far end of them
    manager.allocate(third)
    assert third.block_table == [3]
    grow(manager, first, 8)
    assert first.block_table[:3] == [0, 1, 2]
    assert manager.num_free_blocks == 8 - 3 - 4 - 1


def test_a_finished_sequence_gives_back_its_reservation() -> None:
    manager = BlockManager(16, BLOCK)
    seq = sequence(4, 40)
    manager.allocate(seq)
    assert (manager.reserved_for == seq.seq_id).any()
    manager.free(seq)
    assert (manager.reserved_for == NO_OWNER).all()
    assert manager.num_free_blocks == manager.num_blocks


def test_free_blocks_without_a_cached_prefix_are_used_first() -> None:
    manager = BlockManager(12, BLOCK)
    cached = sequence(9, 1)
    manager.allocate(cached)
    manager.register_full_blocks(cached, len(cached))
    manager.free(cached)
    assert manager.num_cached_free_blocks == 2
    manager.allocate(sequence(8, 1, first_token=100))
    assert manager.num_cached_free_blocks == 2


@pytest.mark.parametrize("placement", ["contiguous", "fifo"])
def test_random_storm_keeps_the_free_list_and_masks_in_step(placement: str) -> None:
    rng = random.Random(3)
    manager = BlockManager(48, BLOCK, placement=placement)
    live: list[Sequence] = []
    for _ in range(2000):
        action = rng.random()
        if action < 0.3:
            seq = sequence(rng.randint(1, 30), rng.randint(1, 30))
            if manager.can_allocate(seq):
                manager.allocate(seq)
                live.append(seq)
        elif action < 0.8 and live:
            seq = rng.choice(live)
            seq.token_ids.append(7)
            if manager.can_append(seq):
                manager.may_append(seq)
            else:
                seq.token_ids.pop()
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            manager.register_full_blocks(seq, len(seq))
            manager.free(seq)
        held = Counter(b for seq in live for b in seq.block_table)
        assert all(manager.blocks[b].ref_count == n for b, n in held.items())
        assert set(np.flatnonzero(manager.free_mask).tolist()) == set(manager.free_ids)
        assert set(held).isdisjoint(manager.free_ids)
        assert not manager.free_mask[list(held)].any()
        assert (manager.reserved_for[~manager.free_mask] == NO_OWNER).all()
    for seq in live:
        manager.free(seq)
    assert manager.num_free_blocks == manager.num_blocks
    assert (manager.reserved_for == NO_OWNER).all()


def test_unknown_placement_names_the_option() -> None:
    with pytest.raises(ValueError, match=r"engine\.block_placement='buddy'"):
        BlockManager(8, BLOCK, placement="buddy")


def decode_plans_in_place(engine: Engine) -> bool:
    """Whether every decoding sequence's KV is one slice of the pool."""
    running = [s for s in engine.scheduler.running if not s.in_prefill]
    return all(is_consecutive(s.block_table) for s in running)


def test_engine_outputs_match_under_both_placements(engine_model: LoadedModel) -> None:
    prompts = random_prompts(8, seed=11, low=10, high=70)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    outputs = {}
    for placement in ("contiguous", "fifo"):
        engine = make_engine(engine_model, block_placement=placement, max_num_batched_tokens=64)
        for prompt in prompts:
            engine.add_request(prompt, params)
        in_place = []
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            in_place.append(decode_plans_in_place(engine))
        outputs[placement] = [done[k] for k in sorted(done, key=lambda r: int(r.split("-")[1]))]
        if placement == "contiguous":
            assert all(in_place)
        else:
            assert not all(in_place)
    assert outputs["contiguous"] == outputs["fifo"]
