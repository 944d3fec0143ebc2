"""Client cancellation, watched off the stepping thread: ``request.is_cancelled()`` is a call into the Triton
parent process, so one thread asks it for every watched request a few times a second and turns a cancellation into
the engine's one cancel command (by stream id).

No lock is ever held across that call, and the stepping thread never touches this watcher: a parent that hangs
blocks this thread alone. A request must not be asked about once its final response is sent (Triton frees it:
asking then crashes the stub), so the final response goes through ``release``: at once, or, if the watcher is
asking about that very request right now, by the watcher as soon as its call returns.

Requests that come through the `tts` ensemble never report a cancellation here (Triton 2.51 does not cancel an
ensemble's in-flight step; the codec decoder sends the `cancel` command instead); clients of the `talker` model
itself do. Each call costs the stub a round trip to the parent, so the watcher asks at most ``max_checks_per_s``
times a second in all: with many streams, each is asked less often.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("triton_support")


@dataclass(eq=False)
class _Watched:
    request: object
    asking: bool = False  # the watcher is inside request.is_cancelled() now
    final: Optional[Callable[[], None]] = None  # released meanwhile: the final send, left to the watcher


class CancellationWatcher:
    """``on_cancelled(stream_id)`` is called (on this watcher's thread) once for each watched request that Triton
    reports cancelled."""

    def __init__(self, on_cancelled: Callable[[int], None], interval_s: float = 0.05, max_checks_per_s: float = 500):
        self._on_cancelled = on_cancelled
        self._max_checks_per_s = max_checks_per_s
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()  # guards the table only; never held across a call into Triton
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancellation-watcher", daemon=True)
        self._thread.start()

    def watch(self, stream_id: int, request) -> None:
        with self._lock:
            self._watched[stream_id] = _Watched(request)

    def release(self, stream_id: int, send_final: Callable[[], None]) -> None:
        """Stop watching a stream and send its final response (``send_final``), never while its request is being
        asked about."""
        with self._lock:
            watched = self._watched.pop(stream_id, None)
            if watched is not None and watched.asking:
                watched.final = send_final
                return
        send_final()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        pause = self._interval
        while not self._stop.wait(pause):
            with self._lock:
                stream_ids = list(self._watched)
            for stream_id in stream_ids:
                self._ask(stream_id)
            pause = max(self._interval, len(stream_ids) / self._max_checks_per_s)

    def _ask(self, stream_id: int) -> None:
        with self._lock:
            watched = self._watched.get(stream_id)
            if watched is None:
                return
            watched.asking = True
        try:
            cancelled = watched.request.is_cancelled()
        except Exception as exc:  # a request Triton no longer knows: stop asking about it
            log.warning("cannot ask Triton whether stream %x was cancelled: %s", stream_id, exc)
            cancelled = None
        with self._lock:
            watched.asking = False
            final = watched.final
            if final is None and cancelled is not False:
                self._watched.pop(stream_id, None)
        if final is not None:  # its stream ended while we asked: its final response goes now
            _send(final, stream_id)
        elif cancelled:
            self._on_cancelled(stream_id)


def _send(final: Callable[[], None], stream_id: int) -> None:
    try:
        final()
    except Exception:
        log.exception("stream %x: could not send its final response", stream_id)
