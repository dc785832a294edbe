"""The measured cost model: timing the real forward, fitting, caching by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ragcache.chunkstore import cost_calibration
from ragcache.chunkstore.cost_calibration import (
    calibrated_cost_model,
    calibration_key,
    cost_model_for,
    measure_prefill_seconds,
)
from ragcache.chunkstore.policy import CostModel
from ragcache.engine.attention_metadata import contiguous_metadata, step_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import LoadedModel

POINTS = ((8, 0), (32, 0), (96, 0), (32, 64))


def test_measured_points_time_the_forward_at_each_length_and_offset(
    engine_model: LoadedModel,
) -> None:
    samples = measure_prefill_seconds(engine_model.model, POINTS, repeats=1)
    assert [(n, p) for n, p, _ in samples] == list(POINTS)
    assert all(seconds > 0 for _, _, seconds in samples)


def test_offset_chunk_attends_to_the_cached_prefix(engine_model: LoadedModel) -> None:
    """The timed call at an offset is a real continuation: its last logits equal those of
    one prefill of prefix + chunk."""
    model = engine_model.model
    generator = torch.Generator().manual_seed(0)
    total = 96
    ids = torch.randint(0, model.spec.vocab_size, (total,), generator=generator)
    pool = KVPool(model.spec, 8, 16, model.dtype)
    with torch.inference_mode():
        whole = model.compute_logits(
            model(ids, torch.arange(total), contiguous_metadata([total], 16), pool)[-1:]
        )
        model(ids[:64], torch.arange(64), contiguous_metadata([64], 16), pool)
        meta = step_metadata([list(range(8))], [64], [32], 16, torch.device("cpu"))
        tail = model.compute_logits(model(ids[64:], torch.arange(64, total), meta, pool)[-1:])
    torch.testing.assert_close(tail, whole, atol=1e-4, rtol=1e-4)


def test_bad_points_are_refused(engine_model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="points"):
        measure_prefill_seconds(engine_model.model, ((0, 0),))
    with pytest.raises(ValueError, match="repeats"):
        measure_prefill_seconds(engine_model.model, POINTS, repeats=0)


def test_calibration_is_measured_once_and_read_back(
    engine_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = cost_calibration.measure_prefill_seconds

    def counting(model, points=cost_calibration.DEFAULT_POINTS, repeats=3):
        calls.append(points)
        return real(model, POINTS, 1)

    monkeypatch.setattr(cost_calibration, "measure_prefill_seconds", counting)
    first = calibrated_cost_model(engine_model, tmp_path)
    second = calibrated_cost_model(engine_model, tmp_path)
    assert len(calls) == 1
    assert first == second
    (record_path,) = tmp_path.glob("cost-*.json")
    record = json.loads(record_path.read_text())
    assert record["fingerprint"] == engine_model.fingerprint
    assert len(record["samples"]) == len(POINTS)
    assert CostModel(**record["cost_model"]) == first
    assert calibration_key(engine_model) in record_path.name


def test_unreadable_calibration_is_measured_again(
    engine_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cost_calibration.measure_prefill_seconds
    monkeypatch.setattr(
        cost_calibration,
        "measure_prefill_seconds",
        lambda model, points=POINTS, repeats=1: real(model, POINTS, 1),
    )
    path = tmp_path / f"cost-{calibration_key(engine_model)}.json"
    path.write_text("{not json")
    model = calibrated_cost_model(engine_model, tmp_path)
    assert CostModel(**json.loads(path.read_text())["cost_model"]) == model


def test_cost_model_names(engine_model: LoadedModel, tmp_path: Path) -> None:
    assert cost_model_for("default", engine_model, tmp_path) == CostModel()
    with pytest.raises(ValueError, match=r"chunkstore\.cost_model"):
        cost_model_for("guess", engine_model, tmp_path)
