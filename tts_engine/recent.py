"""A bounded, thread-safe set of recently seen ids (the oldest are forgotten first), each with an optional
value."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional


class RecentIds:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: "OrderedDict[int, Any]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: int, value: Any = None) -> bool:
        """Remember ``item`` (with ``value``); True when it was not already remembered."""
        with self._lock:
            if item in self._ids:
                return False
            self._ids[item] = value
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
            return True

    def pop(self, item: int) -> Optional[Any]:
        """Forget ``item``; its value (None when it was not remembered)."""
        with self._lock:
            return self._ids.pop(item, None)

    def __contains__(self, item: int) -> bool:
        return item in self._ids
