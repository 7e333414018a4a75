"""Measure what waking a sleeping process costs: a round trip over pipes between two CPUs.

The mount's daemon measures before it starts any thread (the child of a fork runs only
reads and writes); the benchmark reports it.
"""

from __future__ import annotations

import os
import statistics
import time


def round_trip_us(cpu_a: int, cpu_b: int, trips: int = 20, runs: int = 3) -> float:
    """Microseconds per round trip of one byte over pipes between this process, on `cpu_a`,
    and a child on `cpu_b`: the median of `runs` runs of `trips` (after one to warm up), the
    CPUs left idle a moment between runs so that they may halt, as between requests."""
    ping_r, ping_w = os.pipe()
    pong_r, pong_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child answers every byte, then leaves without running any cleanup of the parent's
        try:
            os.close(ping_w)
            os.close(pong_r)  # each side holds only its own ends: one that dies ends the other's read
            os.sched_setaffinity(0, {cpu_b})
            while os.read(ping_r, 1):
                os.write(pong_w, b"x")
        finally:
            os._exit(0)
    os.close(ping_r)
    os.close(pong_w)
    cpus = os.sched_getaffinity(0)
    times = []
    try:
        os.sched_setaffinity(0, {cpu_a})
        for _ in range(runs + 1):
            started = time.perf_counter()
            for _ in range(trips):
                os.write(ping_w, b"x")
                if not os.read(pong_r, 1):
                    raise OSError("the round-trip child ended early")
            times.append((time.perf_counter() - started) / trips * 1e6)
            time.sleep(0.001)
    finally:
        os.sched_setaffinity(0, cpus)
        os.close(ping_w)  # a child still reading sees the end and leaves
        os.close(pong_r)
        os.waitpid(pid, 0)
    return statistics.median(times[1:])
