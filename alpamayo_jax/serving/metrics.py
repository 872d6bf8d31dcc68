"""The server's counters, gauges and latency histograms, rendered in Prometheus' text exposition
format (version 0.0.4) for `GET /v1/metrics`. Thread-safe; no dependency.

Every family is declared in `FAMILIES` (name, kind, help, label names); recording into an
undeclared family or with other labels is an error, so the exposition stays well formed.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a fast host stage to a first request that compiles the 10B model.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

FAMILIES = {
    "alpamayo_http_requests_total": ("counter", "HTTP requests answered, by path and status code",
                                     ("path", "status")),
    "alpamayo_http_request_seconds": ("histogram", "HTTP request latency, receipt to response, by path",
                                      ("path",)),
    "alpamayo_inference_requests_total": ("counter", "Inference jobs finished, by source and outcome",
                                          ("source", "outcome")),
    "alpamayo_stage_seconds": ("histogram", ("Seconds per stage of an inference request (decode_images, "
                                             "ego_history, prepare_inputs, queue_wait, generate, flow_matching, "
                                             "rollout, decode_text, total), by source"), ("source", "stage")),
    "alpamayo_inference_batches_total": ("counter", "Batches the inference worker ran, by the number of requests "
                                         "in them", ("clips",)),
    "alpamayo_alpasim_drives_total": ("counter", "AlpaSim drive calls answered, by outcome (plan, hold, error)",
                                      ("outcome",)),
    "alpamayo_alpasim_sessions": ("gauge", "AlpaSim sessions open", ()),
    "alpamayo_queue_depth": ("gauge", "Inference jobs waiting for the worker", ()),
    "alpamayo_ready": ("gauge", "1 once the model is loaded and warm, 0 before and while stopping", ()),
}


class Metrics:
    """Counters and histograms recorded by the endpoints; gauges read from callbacks at render."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self._lock = threading.Lock()
        self._buckets = tuple(buckets)
        self._counters: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, dict[tuple, list]] = {}  # labels -> [bucket counts..., sum, count]
        self._gauges: dict[str, Callable[[], float]] = {}

    def _labels(self, name: str, kind: str, labels: dict[str, str]) -> tuple:
        declared = FAMILIES.get(name)
        if declared is None or declared[0] != kind:
            raise KeyError(f"{name} is not a declared {kind}")
        if set(labels) != set(declared[2]):
            raise KeyError(f"{name} takes labels {declared[2]}, got {sorted(labels)}")
        return tuple(str(labels[key]) for key in declared[2])

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = self._labels(name, "counter", labels)
        with self._lock:
            family = self._counters.setdefault(name, {})
            family[key] = family.get(key, 0.0) + value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = self._labels(name, "histogram", labels)
        with self._lock:
            series = self._histograms.setdefault(name, {}).get(key)
            if series is None:
                series = self._histograms[name][key] = [0] * len(self._buckets) + [0.0, 0]
            index = bisect.bisect_left(self._buckets, seconds)
            for i in range(index, len(self._buckets)):
                series[i] += 1
            series[-2] += seconds
            series[-1] += 1

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Reads gauge `name` (no labels) from `read()` at each render."""
        self._labels(name, "gauge", {})
        self._gauges[name] = read

    def count(self, name: str, **labels: str) -> float:
        """A counter's value (0 before the first increment); for tests and logs."""
        key = self._labels(name, "counter", labels)
        with self._lock:
            return self._counters.get(name, {}).get(key, 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text, label_names) in FAMILIES.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for key, value in sorted(self._counters.get(name, {}).items()):
                        lines.append(f"{name}{_format_labels(label_names, key)} {_number(value)}")
                elif kind == "histogram":
                    for key, series in sorted(self._histograms.get(name, {}).items()):
                        for bound, count in zip(self._buckets, series, strict=False):
                            labels = _format_labels((*label_names, "le"), (*key, _number(bound)))
                            lines.append(f"{name}_bucket{labels} {count}")
                        lines.append(f"{name}_bucket{_format_labels((*label_names, 'le'), (*key, '+Inf'))} "
                                     f"{series[-1]}")
                        lines.append(f"{name}_sum{_format_labels(label_names, key)} {_number(series[-2])}")
                        lines.append(f"{name}_count{_format_labels(label_names, key)} {series[-1]}")
                elif name in self._gauges:
                    lines.append(f"{name} {_number(float(self._gauges[name]()))}")
        return "\n".join(lines) + "\n"


def _format_labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))
