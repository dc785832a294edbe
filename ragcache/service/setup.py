"""What a service is built on, checked before anything is opened: its engine (a model
with a tokenizer, adapter names that do not shadow a served model) and its data
directory (a manifest that matches this model and embedder)."""

from __future__ import annotations

from pathlib import Path

from ragcache.config import KV_PRECOMPUTE_MODES, TREE_PATH_MODES, Config
from ragcache.corpus.manifest import Manifest, open_manifest
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.lora import LoraLoadError
from ragcache.errors import InvalidParameterError
from ragcache.retriever.embedder import Embedder


def check_service_config(config: Config) -> None:
    mode = config.service.kv_precompute
    if mode not in KV_PRECOMPUTE_MODES:
        raise InvalidParameterError(
            f"service.kv_precompute={mode!r}; use one of {', '.join(KV_PRECOMPUTE_MODES)}",
            "service.kv_precompute",
        )
    paths = config.service.tree_paths
    if paths not in TREE_PATH_MODES:
        raise InvalidParameterError(
            f"service.tree_paths={paths!r}; use one of {', '.join(TREE_PATH_MODES)}",
            "service.tree_paths",
        )


def served_model_names(config: Config, loaded: LoadedModel) -> set[str]:
    return {loaded.name, config.retriever.embedder}


def open_engine(config: Config, loaded: LoadedModel | None, engine: Engine | None) -> Engine:
    """The given engine, or one built from ``loaded`` (or the configured model)."""
    if engine is None:
        try:
            engine = Engine(loaded or load_model(config.model), config.engine, config.lora)
        except LoraLoadError as error:
            raise InvalidParameterError(str(error), "lora.adapters") from None
    if engine.loaded.tokenizer is None:
        raise InvalidParameterError("the model has no tokenizer; RAG needs one", "model.path")
    taken = served_model_names(config, engine.loaded) & set(engine.lora.infos)
    if taken:
        raise InvalidParameterError(
            f"adapter name {sorted(taken)[0]!r} is the name of a served model; rename it",
            "lora.adapters",
        )
    return engine


def open_data_dir(config: Config, loaded: LoadedModel, embedder: Embedder) -> Path:
    """The data directory, its manifest written or checked against this model and embedder."""
    data_dir = config.data_path
    manifest = Manifest(loaded.name, loaded.fingerprint, config.retriever.embedder, embedder.dim)
    open_manifest(data_dir, manifest)
    return data_dir
