"""Prometheus metrics on Triton's metrics port, published from their own thread.

Serving loops only update plain numbers; a publisher thread reads them a few times a second and passes
them to Triton, so no hot loop ever calls into the Triton parent process."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

log = logging.getLogger("triton_support")


class MetricsPublisher:
    """``read()`` returns {(metric name, label value or None): number}; counters are published as increments
    of the total, gauges as set. ``families`` maps each name to (kind, description, label name or None)."""

    def __init__(self, pb_utils, families: dict, read: Callable[[], dict], interval_s: float = 0.25,
                 before_publish: Optional[Callable[[], None]] = None):
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
        self._families = {name: (kind, label, pb_utils.MetricFamily(name=name, description=description,
                                                                    kind=kinds[kind]))
                          for name, (kind, description, label) in families.items()}
        self._metrics: dict = {}
        self._reported: dict = {}
        self._read, self._before = read, before_publish
        self._interval = interval_s
        self._stop = threading.Event()
        self.publish()
        self._thread = threading.Thread(target=self._run, name="metrics-publisher", daemon=True)
        self._thread.start()

    def _metric(self, name: str, label_value):
        key = (name, label_value)
        if key not in self._metrics:
            kind, label, family = self._families[name]
            self._metrics[key] = family.Metric(labels={label: label_value} if label else {})
        return self._metrics[key]

    def publish(self) -> None:
        for (name, label_value), value in self._read().items():
            metric = self._metric(name, label_value)
            if self._families[name][0] == "gauge":
                metric.set(value)
                continue
            delta = value - self._reported.get((name, label_value), 0)
            if delta:
                metric.increment(delta)
                self._reported[(name, label_value)] = value

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:  # the thread must outlive any failure: ``before_publish`` frees expired decoder state
                if self._before is not None:
                    self._before()
                self.publish()
            except Exception:
                log.exception("metrics publishing failed; trying again")

    def stop(self) -> None:
        self._stop.set()
