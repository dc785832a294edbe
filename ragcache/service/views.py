"""The tenant and adapter views of one service: made once per (tenant, adapter id) and
shared by every caller until the adapter is unloaded or the service closes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

View = TypeVar("View")
ViewKey = tuple[str, str | None]  # (tenant, adapter id or None for the base model)


class Views(Generic[View]):
    def __init__(self, release: Callable[[View], None]) -> None:
        self._release = release
        self._views: dict[ViewKey, View] = {}
        self._lock = threading.Lock()

    def get(self, key: ViewKey, make: Callable[[], View]) -> View:
        with self._lock:
            view = self._views.get(key)
            if view is None:
                view = self._views[key] = make()
        return view

    def drop_adapter(self, adapter_id: str) -> None:
        with self._lock:
            for key in [key for key in self._views if key[1] == adapter_id]:
                self._release(self._views.pop(key))

    def release_all(self) -> None:
        with self._lock:
            for view in self._views.values():
                self._release(view)
