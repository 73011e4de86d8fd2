"""A bounded mapping for facts kept in the process between requests."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Kept(Generic[K, V]):
    """A mapping that keeps its ``size`` most recently added entries.

    Each read and each addition is one operation on the dict (atomic in CPython);
    callers that add from several threads do it under a lock of their own.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def update(self, items: Mapping[K, V]) -> None:
        self._entries.update(items)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
