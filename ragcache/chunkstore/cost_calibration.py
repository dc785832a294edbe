"""A chunk's recompute cost on this machine: prefill timed once per model and fitted.

PGDSF weighs every cached chunk by what a miss would cost, the prefill time of its
tokens after the tokens before it. The store's ``CostModel`` is a three-term formula
(per token, per attended token pair, fixed per call); this module times the loaded
model's own forward pass over chunks of several lengths at several offsets, fits the
formula to those times, and keeps the fit in a small JSON file keyed by the model
fingerprint, dtype, device, thread count and processor, so later starts read it back
instead of timing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ragcache.chunkstore.policy import CostModel
from ragcache.engine.attention_metadata import step_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import LoadedModel
from ragcache.engine.model import LlamaModel

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 2
# (tokens, offset) points: three lengths fix the per-call, per-token and per-pair terms,
# the offset point checks the pair term against a cached prefix.
DEFAULT_POINTS = ((32, 0), (256, 0), (1024, 0), (256, 1024))
BLOCK_SIZE = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_prefill_seconds(
    model: LlamaModel,
    points: tuple[tuple[int, int], ...] = DEFAULT_POINTS,
    repeats: int = 3,
) -> list[tuple[int, int, float]]:
    """(tokens, offset, seconds) of the model computing a chunk of ``tokens`` after
    ``offset`` cached tokens, through the same forward the engine calls: the fastest of
    ``repeats`` sweeps over the points, after one untimed warm-up call."""
    if not points or repeats < 1 or any(n < 1 or p < 0 for n, p in points):
        raise ValueError(
            f"calibration needs (tokens >= 1, offset >= 0) points and repeats >= 1; got "
            f"points={points}, repeats={repeats}"
        )
    device = model.device
    longest_prefix = max(offset for _, offset in points)
    total = max(n + offset for n, offset in points)
    num_blocks = (total + BLOCK_SIZE - 1) // BLOCK_SIZE
    pool = KVPool(model.spec, num_blocks, BLOCK_SIZE, model.dtype, device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.spec.vocab_size, (total,), generator=generator).to(device)
    table = list(range(num_blocks))

    def run(length: int, offset: int) -> float:
        meta = step_metadata([table], [offset], [length], BLOCK_SIZE, device)
        meta.fresh = offset == 0  # a chunk from slot 0 takes the engine's fresh path
        positions = torch.arange(offset, offset + length, device=device)
        _sync(device)
        start = time.perf_counter()
        hidden = model(ids[offset : offset + length], positions, meta, pool)
        model.compute_logits(hidden[-1:])
        _sync(device)
        return time.perf_counter() - start

    best = [float("inf")] * len(points)
    with torch.inference_mode():
        run(min(n for n, _ in points), 0)  # warm-up
        if longest_prefix > 0:
            run(longest_prefix, 0)  # the prefix the offset points attend to
        # Whole sweeps, repeated: a burst of load from elsewhere slows one sweep's
        # points, not every repeat of one point, and the minimum drops it.
        for _ in range(repeats):
            for index, (length, offset) in enumerate(points):
                best[index] = min(best[index], run(length, offset))
    return [(length, offset, best[i]) for i, (length, offset) in enumerate(points)]


def calibration_key(loaded: LoadedModel) -> str:
    parts = [
        f"v{CALIBRATION_VERSION}",
        loaded.fingerprint,
        str(loaded.dtype),
        str(loaded.model.device),
        str(torch.get_num_threads()),
        platform.machine(),
        platform.processor() or _cpu_model_name(),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def calibration_record(loaded: LoadedModel, directory: str | Path) -> dict[str, Any]:
    """This model's calibration on this machine: read from ``directory`` when one with
    the same key is there, else measured (seconds on a CPU) and written there."""
    path = Path(directory) / f"cost-{calibration_key(loaded)}.json"
    if path.exists():
        try:
            record = json.loads(path.read_text())
            CostModel(**record["cost_model"])
            return record
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("unreadable cost calibration %s (%s); measuring again", path, error)
    log.info("timing this machine's prefill once so PGDSF weighs chunks by their real cost")
    samples = measure_prefill_seconds(loaded.model)
    record = {
        "version": CALIBRATION_VERSION,
        "fingerprint": loaded.fingerprint,
        "dtype": str(loaded.dtype),
        "device": str(loaded.model.device),
        "threads": torch.get_num_threads(),
        "samples": [list(sample) for sample in samples],
        "cost_model": asdict(CostModel.fit(samples)),
    }
    log.info(
        "prefill cost model %s, from (tokens, offset, seconds) %s", record["cost_model"], samples
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)
    return record


def calibrated_cost_model(loaded: LoadedModel, directory: str | Path) -> CostModel:
    """The cost model fitted to this model's measured prefill times on this machine."""
    return CostModel(**calibration_record(loaded, directory)["cost_model"])


COST_MODELS = ("measured", "default")


def cost_model_for(name: str, loaded: LoadedModel, directory: str | Path) -> CostModel:
    """``chunkstore.cost_model``: "measured" (``calibrated_cost_model``) or "default"."""
    if name == "measured":
        return calibrated_cost_model(loaded, directory)
    if name == "default":
        return CostModel()
    raise ValueError(f"chunkstore.cost_model must be one of {', '.join(COST_MODELS)}; got {name!r}")
