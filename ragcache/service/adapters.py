"""LoRA adapters as the service sees them: loaded and unloaded between engine steps, and
the scope in which a view's model calls run under its adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.engine import Engine
from ragcache.engine.lora import LoraLoadError, UnknownAdapterError
from ragcache.engine.lora_manager import AdapterInfo
from ragcache.engine.sampling_params import InvalidRequestError
from ragcache.errors import ConflictError, InvalidInputError, NotFoundError


@contextmanager
def adapter_scope(engine: Engine, adapter_id: str | None) -> Iterator[None]:
    """Model calls inside run under adapter ``adapter_id`` (on the engine's thread)."""
    if adapter_id is not None:
        try:
            engine.lora.get(adapter_id)
        except UnknownAdapterError as error:
            raise NotFoundError(str(error), "model") from None
        except LoraLoadError as error:
            raise ConflictError(str(error), "model") from None
    with engine.lora.uniform(adapter_id):
        yield


class Adapters:
    """The engine's adapter registry under the names clients use."""

    def __init__(self, async_engine: AsyncEngine, model_names: set[str]) -> None:
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.model_names = model_names

    def list(self) -> list[AdapterInfo]:
        # One C-level copy of the engine's registry (atomic under the GIL); infos are frozen.
        infos = list(self.engine.lora.infos.values())
        return sorted(infos, key=lambda info: info.name)

    def info(self, name: str) -> AdapterInfo:
        info = self.engine.lora.infos.get(name)
        if info is None:
            known = ", ".join(a.name for a in self.list()) or "none"
            raise NotFoundError(f"adapter {name!r} is not loaded (adapters: {known})", "model")
        return info

    def load(self, name: str, path: str) -> AdapterInfo:
        """Load a PEFT LoRA adapter folder: read and checked on this thread, registered
        between engine steps."""
        if name in self.model_names or name in self.engine.lora.infos:
            raise ConflictError(f"the name {name!r} is already served; pick another", "lora_name")
        try:
            adapter = self.engine.lora.read(path, name)
            return self.async_engine.run_sync(lambda e: e.lora.add(adapter))
        except LoraLoadError as error:
            raise InvalidInputError(str(error), "lora_path") from None

    def unload(self, name: str) -> AdapterInfo:
        """Unload an adapter once no request uses it."""
        try:
            return self.async_engine.run_sync(lambda e: e.remove_lora(name))
        except UnknownAdapterError as error:
            raise NotFoundError(str(error), "lora_name") from None
        except InvalidRequestError as error:
            raise ConflictError(str(error), "lora_name") from None
