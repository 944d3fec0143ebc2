"""A decoupled model's requests, queued by ``execute`` and drained in batches by one worker thread."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)


class BatchingWorker:
    """Calls ``handle(requests)`` with everything queued (up to ``max_batch``) whenever anything is; under
    load requests pile up while a batch is handled, so batches grow with the load. A failing batch is
    passed to ``fail(requests, error)``; the worker goes on. ``on_start`` runs first, in the worker's thread
    (per-thread settings such as torch's thread count)."""

    def __init__(self, handle: Callable[[list], None], fail: Callable[[list, BaseException], None],
                 max_batch: int, name: str, on_start: Optional[Callable[[], None]] = None):
        self._handle, self._fail, self.max_batch, self._on_start = handle, fail, max_batch, on_start
        self._pending: "queue.Queue" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, request) -> None:
        self._pending.put(request)

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while not self._stop.is_set():
            try:
                batch = [self._pending.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self._handle(batch)
            except Exception as exc:  # a bug must fail this batch's requests, never the worker
                log.exception("batch of %d requests failed", len(batch))
                try:
                    self._fail(batch, exc)
                except Exception:
                    log.exception("could not fail the batch's requests")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
