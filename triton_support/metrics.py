"""Prometheus metrics on Triton's metrics port, published from their own thread.

Serving loops only update plain numbers; a publisher thread reads them a few times a second and passes
them to Triton, so no hot loop ever calls into the Triton parent process."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

log = logging.getLogger("triton_support")
# Seconds of audio a listener still had when a chunk was sent.
LEAD_BUCKETS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0]


class MetricsPublisher:
    """``families`` maps each metric name to (kind, description, label name or None, read), where ``read``
    takes ``source()`` and returns the value (a {label value: value} dict for a labelled family; a list of
    new observations for a histogram). Counters are published as increments of the total, gauges as set.
    ``labels``: labels every series carries (model processes that publish the same families, such as the talkers of
    several served models, must tell theirs apart: a metric with the same labels is one metric across processes,
    and their gauges would overwrite each other)."""

    def __init__(self, pb_utils, families: dict, source: Callable[[], object], interval_s: float = 0.25,
                 before_publish: Optional[Callable[[], None]] = None, buckets: Optional[list] = None,
                 labels: Optional[dict] = None):
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE,
                 "histogram": pb_utils.MetricFamily.HISTOGRAM}
        self._families = {name: (kind, label, read, pb_utils.MetricFamily(name=name, description=description,
                                                                          kind=kinds[kind]))
                          for name, (kind, description, label, read) in families.items()}
        self._buckets = buckets or [0.1, 0.5, 1.0]
        self._labels = dict(labels or {})
        self._metrics: dict = {}
        self._reported: dict = {}
        self._source, self._before = source, before_publish
        self._interval = interval_s
        self._stop = threading.Event()
        self.publish()
        self._thread = threading.Thread(target=self._run, name="metrics-publisher", daemon=True)
        self._thread.start()

    def _metric(self, name: str, label_value):
        key = (name, label_value)
        if key not in self._metrics:
            kind, label, _, family = self._families[name]
            labels = {**self._labels, **({label: label_value} if label else {})}
            self._metrics[key] = family.Metric(labels=labels, buckets=self._buckets) if kind == "histogram" \
                else family.Metric(labels=labels)
        return self._metrics[key]

    def publish(self) -> None:
        source = self._source()
        for name, (kind, label, read, _) in self._families.items():
            value = read(source)
            for label_value, number in (value.items() if label else [(None, value)]):
                metric = self._metric(name, label_value)
                if kind == "gauge":
                    metric.set(number)
                elif kind == "histogram":
                    for observation in number:
                        metric.observe(observation)
                else:
                    delta = number - self._reported.get((name, label_value), 0)
                    if delta:
                        metric.increment(delta)
                        self._reported[(name, label_value)] = number

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
