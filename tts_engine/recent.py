"""A bounded, thread-safe set of recently seen ids (the oldest are forgotten first)."""
from __future__ import annotations

import threading
from collections import OrderedDict


class RecentIds:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: "OrderedDict[int, None]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, item: int) -> bool:
        """Remember ``item``; True when it was not already remembered."""
        with self._lock:
            if item in self._ids:
                return False
            self._ids[item] = None
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
            return True

    def __contains__(self, item: int) -> bool:
        return item in self._ids
