"""The server's counters in Prometheus' text format: queue depth, batch sizes, adapter cache, step latency."""

from __future__ import annotations

import threading


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge:g}"}} {count}' for edge, count in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}  # final status -> count
        self.rejected: dict[int, int] = {}  # HTTP status -> count
        self.batch_rows = Histogram((1, 2, 4, 8, 16, 32, 64))
        self.batch_requests = Histogram((1, 2, 3, 4, 6, 8, 12, 16))
        self.step_seconds = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.request_seconds = Histogram((0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def count(self, status: str) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def reject(self, http_status: int) -> None:
        with self.lock:
            self.rejected[http_status] = self.rejected.get(http_status, 0) + 1

    def render(self, gauges: dict[str, float]) -> str:
        """``gauges``: current values (queue depth, running, cache hits...) from the server."""
        with self.lock:
            lines = []
            for name, value in gauges.items():
                lines += [f"# TYPE lora_composer_{name} gauge", f"lora_composer_{name} {value:g}"]
            lines.append("# TYPE lora_composer_requests_total counter")
            lines += [f'lora_composer_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines.append("# TYPE lora_composer_rejected_total counter")
            lines += [f'lora_composer_rejected_total{{code="{c}"}} {n}' for c, n in sorted(self.rejected.items())]
            for name, hist in (
                ("batch_rows", self.batch_rows),
                ("batch_requests", self.batch_requests),
                ("step_seconds", self.step_seconds),
                ("request_seconds", self.request_seconds),
            ):
                lines.append(f"# TYPE lora_composer_{name} histogram")
                lines += hist.lines(f"lora_composer_{name}")
            return "\n".join(lines) + "\n"
