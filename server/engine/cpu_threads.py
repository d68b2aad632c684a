"""The engine's share of the CPU: how many threads a step's torch ops may use.

On CPU every core the engine's OpenMP team spans must be free: a team of N threads waits at each
op's barrier for its slowest member, so one core taken by other work (an adapter being parsed, a
fine-tune) turns a 20 ms step into a second (measured: 18 ms -> 980 ms with two adapter loads
running beside a 2-thread engine on 2 cores). So the team shrinks while others hold cores:
`reserved` threads for long-running work (training), and one per adapter load being parsed right
now. Set on the engine thread before each step: the count is per thread, and a new thread starts
with the count the last one set (a loader's 1), so the first step always sets it. On other devices
the count is left alone.
"""

from __future__ import annotations

from typing import Callable

import torch


class CpuThreads:
    def __init__(self, configured: int, busy_loaders: Callable[[], int] = lambda: 0, enabled: bool = True) -> None:
        self.configured = configured  # the `threads` setting, as torch had it when the engine was built
        self.busy_loaders = busy_loaders  # adapter loads on CPU right now (the store's count)
        self.enabled = enabled
        self.reserved = 0  # threads left to long-running work beside the engine
        # None until the engine thread's first step sets its count: a thread starts with whatever
        # count the last thread to set one left (a loader's 1), not with the configured one
        self.current: int | None = None

    def wanted(self) -> int:
        return max(1, self.configured - self.reserved - self.busy_loaders())

    def apply(self) -> None:
        """On the engine thread: resize the team if the share changed since the last step."""
        if not self.enabled:
            return
        wanted = self.wanted()
        if wanted != self.current:
            torch.set_num_threads(wanted)
            self.current = wanted
