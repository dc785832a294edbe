"""LoRA serving: outputs equal the merged-weights model, mixed batches equal requests run
alone, KV never crosses adapters, and adapters that do not fit are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import LoadedModel
from ragcache.engine.lora import LoraLoadError, read_lora_adapter
from ragcache.engine.lora_config import LoraConfig
from ragcache.engine.model import LlamaModel
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.conftest import loaded_from_hf, random_hf_model
from tests.lora_helpers import PeftAdapter, make_peft_adapter

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [[(7 * i + 3 * j) % 500 + 3 for j in range(9 + 5 * i)] for i in range(10)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeftAdapter]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all": make_peft_adapter(root / "all", seed=1),
        "qv": make_peft_adapter(root / "qv", seed=2, targets=["q_proj", "v_proj"], r=4),
        "mlp": make_peft_adapter(
            root / "mlp", seed=3, targets=["gate_proj", "up_proj", "down_proj"], use_rslora=True
        ),
        "patterns": make_peft_adapter(
            root / "patterns",
            seed=4,
            r=16,
            lora_alpha=8,
            rank_pattern={"o_proj": 4},
            alpha_pattern={"down_proj": 3},
        ),
    }


def base_model() -> LoadedModel:
    # A fresh copy per engine: serving adapters wraps the model's projections.
    return loaded_from_hf(random_hf_model())


def lora_engine(adapters: dict[str, PeftAdapter], **lora: object) -> Engine:
    config = LoraConfig(adapters=[f"{name}={a.path}" for name, a in adapters.items()], **lora)
    return Engine(base_model(), EngineConfig(kv_cache_bytes=8 << 20, block_size=8), config)


def prefill_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    pool = KVPool(model.spec, len(ids) // 8 + 1, 8, model.dtype)
    meta = contiguous_metadata([len(ids)], 8)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), meta, pool)
        return model.compute_logits(hidden)


def test_uniform_adapter_logits_equal_the_merged_model(adapters: dict[str, PeftAdapter]) -> None:
    engine = lora_engine(adapters)
    ids = PROMPTS[6]
    base = prefill_logits(engine.model, ids)
    for name, adapter in adapters.items():
        with engine.lora.uniform(name):
            ours = prefill_logits(engine.model, ids)
        merged = prefill_logits(adapter.merged.model, ids)
        assert (ours - merged).abs().max() <= 1e-4, name
        assert (ours - base).abs().max() > 1e-2, f"{name} changes nothing"
    assert torch.equal(prefill_logits(engine.model, ids), base)


def test_one_step_mixing_adapters_gives_each_merged_models_logits(
    adapters: dict[str, PeftAdapter],
) -> None:
    engine = lora_engine(adapters)
    order = ["all", None, "qv", "patterns", "mlp", "all"]
    for prompt, name in zip(PROMPTS, order, strict=False):
        engine.add_request(prompt, GREEDY, adapter=name)
    scheduled = engine.scheduler.schedule()
    assert len(scheduled) == len(order)
    logits = engine.runner.execute(scheduled)
    assert logits is not None
    plain = base_model().model
    for row, (prompt, name) in enumerate(zip(PROMPTS, order, strict=False)):
        reference = plain if name is None else adapters[name].merged.model
        expected = prefill_logits(reference, prompt)[-1]
        assert (logits[row] - expected).abs().max() <= 1e-4, name


def test_mixed_batch_of_four_adapters_and_base_matches_each_alone(
    adapters: dict[str, PeftAdapter],
) -> None:
    names = [None, "all", "qv", "mlp", "patterns"] * 2
    engine = lora_engine(adapters)
    mixed = [o.token_ids for o in engine.generate(PROMPTS, GREEDY, adapter=names)]
    alone = [
        engine.generate([prompt], GREEDY, adapter=name)[0].token_ids
        for prompt, name in zip(PROMPTS, names, strict=True)
    ]
    assert mixed == alone
    merged = {
        name: Engine(a.merged, EngineConfig(kv_cache_bytes=8 << 20, block_size=8))
        for name, a in adapters.items()
    }
    for prompt, name, tokens in zip(PROMPTS[:5], names, mixed, strict=False):
        if name is not None:
            assert merged[name].generate([prompt], GREEDY)[0].token_ids == tokens, name
    assert len({tuple(t) for t in mixed[:5]}) == 5


def test_two_slots_serve_four_adapters_evicting_only_idle_ones(
    adapters: dict[str, PeftAdapter],
) -> None:
    names = ["all", "qv", "mlp", "patterns", None, "qv", "all", "patterns"]
    wide = lora_engine(adapters)
    expected = [o.token_ids for o in wide.generate(PROMPTS[:8], GREEDY, adapter=names)]
    narrow = lora_engine(adapters, max_loras=2)
    assert [o.token_ids for o in narrow.generate(PROMPTS[:8], GREEDY, adapter=names)] == expected
    stats = narrow.stats()
    assert stats["lora_slot_evictions"] >= 2 and stats["lora_adapters_resident"] == 2


def test_slots_never_evict_an_adapter_in_use(adapters: dict[str, PeftAdapter]) -> None:
    engine = lora_engine(adapters, max_loras=2)
    slots = engine.lora.slots
    first, second, third = (engine.lora.get(n) for n in ("all", "qv", "mlp"))
    slots.load(first, set())
    slots.load(second, set())
    assert not slots.can_load(third.id, {first.id, second.id})
    slots.load(third, {first.id})
    assert slots.slot_of(first.id) is not None and slots.slot_of(second.id) is None
    slots.load(second, set())  # the least recently used is now the first
    assert slots.slot_of(first.id) is None and slots.slot_of(third.id) is not None


def test_prefix_cache_never_crosses_adapters(adapters: dict[str, PeftAdapter]) -> None:
    engine = lora_engine(adapters)
    prompt = PROMPTS[9]
    one = SamplingParams(max_tokens=1)
    assert engine.generate([prompt], one, adapter="all")[0].num_cached_tokens == 0
    assert engine.generate([prompt], one, adapter="all")[0].num_cached_tokens > 0
    assert engine.generate([prompt], one, adapter="qv")[0].num_cached_tokens == 0
    assert engine.generate([prompt], one)[0].num_cached_tokens == 0
    assert engine.generate([prompt], one)[0].num_cached_tokens > 0


def test_host_copies_are_bounded_and_read_again(adapters: dict[str, PeftAdapter]) -> None:
    engine = lora_engine(adapters, max_cpu_loras=1)
    assert list(engine.lora.host) == ["patterns"]
    expected = lora_engine(adapters).generate([PROMPTS[0]], GREEDY, adapter="qv")
    assert engine.generate([PROMPTS[0]], GREEDY, adapter="qv")[0].token_ids == expected[0].token_ids
    assert engine.stats()["lora_host_reads"] == 1 and list(engine.lora.host) == ["qv"]


def test_changed_files_and_unknown_names_are_refused(
    adapters: dict[str, PeftAdapter], tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    make_peft_adapter(copy, seed=5)
    engine = Engine(base_model(), EngineConfig(kv_cache_bytes=4 << 20), LoraConfig(max_cpu_loras=1))
    engine.add_lora("copy", str(copy))
    engine.add_lora("qv", str(adapters["qv"].path))
    make_peft_adapter(copy, seed=6)
    with pytest.raises(InvalidRequestError, match="changed since it was loaded"):
        engine.add_request(PROMPTS[0], GREEDY, adapter="copy")
    with pytest.raises(
        InvalidRequestError, match=r"adapter 'nope' is not loaded \(loaded: copy, qv"
    ):
        engine.add_request(PROMPTS[0], GREEDY, adapter="nope")
    with pytest.raises(LoraLoadError, match="already loaded"):
        engine.add_lora("qv", str(adapters["qv"].path))


def test_unload_waits_for_requests_using_the_adapter(adapters: dict[str, PeftAdapter]) -> None:
    engine = lora_engine({"qv": adapters["qv"]})
    seq = engine.add_request(PROMPTS[0], GREEDY, adapter="qv")
    with pytest.raises(InvalidRequestError, match="in use by 1 unfinished"):
        engine.remove_lora("qv")
    engine.abort(seq.request_id)
    assert engine.remove_lora("qv").name == "qv"
    assert engine.stats()["lora_adapters"] == 0


def test_adapter_of_another_base_model_is_refused(tmp_path: Path) -> None:
    spec = base_model().spec
    make_peft_adapter(tmp_path / "wide", seed=1, model={"hidden_size": 96})
    with pytest.raises(LoraLoadError, match=r"does not fit this base model: layer 0 q_proj"):
        read_lora_adapter(tmp_path / "wide", spec)
    make_peft_adapter(tmp_path / "deep", seed=1, model={"num_hidden_layers": 4})
    with pytest.raises(LoraLoadError, match="adapts layer 3, the base model has 3 layers"):
        read_lora_adapter(tmp_path / "deep", spec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA adapters are not supported"),
        ({"target_modules": ["q_proj", "lm_head"]}, r"target modules \['lm_head'\]"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"lora_alpha": 0}, "lora_alpha=0 must be a positive number"),
    ],
)
def test_unsupported_settings_are_named(
    adapters: dict[str, PeftAdapter], tmp_path: Path, change: dict, message: str
) -> None:
    source = adapters["qv"].path
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        (source / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((source / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(LoraLoadError, match=message):
        read_lora_adapter(folder, base_model().spec)


def test_missing_files_and_large_ranks_are_named(
    adapters: dict[str, PeftAdapter], tmp_path: Path
) -> None:
    spec = base_model().spec
    with pytest.raises(LoraLoadError, match=r"has no adapter_config\.json"):
        read_lora_adapter(tmp_path, spec, name="empty")
    (tmp_path / "adapter_config.json").write_text(
        (adapters["qv"].path / "adapter_config.json").read_text()
    )
    with pytest.raises(LoraLoadError, match=r"has no adapter_model\.safetensors"):
        read_lora_adapter(tmp_path, spec, name="empty")
    with pytest.raises(LoraLoadError, match=r"rank 16 .* exceeds lora.max_rank=8"):
        read_lora_adapter(adapters["patterns"].path, spec, max_rank=8)
    with pytest.raises(LoraLoadError, match="adapter name 'a b' is invalid"):
        read_lora_adapter(adapters["qv"].path, spec, name="a b")


def test_benchmark_adapters_are_peft_folders_that_peft_itself_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    from ragcache.bench.lora import write_peft_adapter

    engine = Engine(base_model(), EngineConfig(kv_cache_bytes=4 << 20))
    write_peft_adapter(tmp_path / "bench", engine.spec, 0, 4, 8.0, ["q_proj", "v_proj"])
    engine.add_lora("bench", str(tmp_path / "bench"))
    merged = PeftModel.from_pretrained(random_hf_model(), tmp_path / "bench").merge_and_unload()
    with engine.lora.uniform("bench"):
        ours = prefill_logits(engine.model, PROMPTS[3])
    expected = prefill_logits(loaded_from_hf(merged).model, PROMPTS[3])
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - prefill_logits(engine.model, PROMPTS[3])).abs().max() > 1e-3
