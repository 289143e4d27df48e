"""`bench_train.py --profile`: torch.profiler over a path's timed steps, summed up as how much of the wall
time the GPU was running kernels and which kernels took that time.

`GpuProfile` is started and stopped by the benchmark's step clock (after the untimed warm-up steps, at the
end of training), and its `summary()` goes into the path's row of the table (`profile` in the JSON);
`summary_line` is the one line printed for it as the path ends.
"""

from __future__ import annotations

import time


class GpuProfile:
    """torch.profiler over the timed steps: how much of the wall time the GPU was running kernels, and
    which kernels took it (`--profile`)."""

    def __init__(self):
        self.prof, self.wall = None, None  # wall: when the running profile started

    def start(self):
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.prof.__enter__()
        self.wall = time.perf_counter()

    def stop(self):
        if self.prof is not None and self.wall is not None:
            self.prof.__exit__(None, None, None)
            self.wall, self.seconds = None, time.perf_counter() - self.wall

    def summary(self, top: int = 8) -> dict | None:
        if self.prof is None:
            return None
        from torch.autograd import DeviceType

        spans, by_name = [], {}
        for evt in self.prof.events():
            if evt.device_type == DeviceType.CUDA and evt.time_range.elapsed_us() > 0:
                spans.append((evt.time_range.start, evt.time_range.end))
                by_name[evt.name] = by_name.get(evt.name, 0) + evt.time_range.elapsed_us()
        busy, end = 0, None
        for start, stop in sorted(spans):  # union of kernel intervals: overlapping streams count once
            if end is None or start > end:
                busy += stop - start
                end = stop
            elif stop > end:
                busy += stop - end
                end = stop
        total = sum(by_name.values()) or 1
        kernels = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
        return {"gpu_busy_%": 100 * busy / 1e6 / self.seconds, "profiled_s": self.seconds,
                "top_kernels": [{"name": k[:90], "%": 100 * v / total} for k, v in kernels]}


def summary_line(name: str, prof: dict) -> str:
    """Path `name`'s profile `summary()` in one line: GPU busy share, then each top kernel's share."""
    return (f"{name} profile: GPU busy {prof['gpu_busy_%']:.1f}% of {prof['profiled_s']:.1f} s; "
            + "; ".join(f"{k['%']:.1f}% {k['name']}" for k in prof["top_kernels"]))
