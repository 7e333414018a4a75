"""Idle polling: while requests come to the mount, idle CPUs poll for work instead of halting.

A request to the daemon costs two wake-ups: the daemon's thread, then the reader waiting
for the answer. Where an idle CPU halts at once — a KVM guest with `guest_halt_poll_ns` 0,
or deep C-states — waking it takes tens of µs (a trip through the host on a VM), and an
open of a cached file pays it twice: 70–90 µs here, against ~35 µs on CPUs that poll.
The kernel's CPU latency request (/dev/cpu_dma_latency, PM QoS) of 0 µs makes idle CPUs
poll; the daemon holds it from a request until `HOLD_S` after the last one, and lets go
when requests stop, so an idle mount costs nothing. Needs root (the device is 0600).
"auto" asks for it only where a wake-up round trip across CPUs measures slow.

This file is also the measuring program, run as a script: it imports nothing of kacheryfs,
so it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

CPU_LATENCY = "/dev/cpu_dma_latency"
HOLD_S = 0.002  # idle CPUs poll this long after the last request (the kernel's halt-poll is 0.0002 per halt)
SLOW_WAKEUP_US = 20.0  # "auto" asks for polling where a wake-up round trip across CPUs takes longer
_POLL = struct.pack("i", 0)  # µs of wake-up latency allowed: none, so idle CPUs poll
_DEFAULT = struct.pack("i", 2_000_000_000)  # the kernel's default: no request


class IdlePolling:
    """The daemon's CPU latency request: held while requests come (`request`), let go after."""

    def __init__(self) -> None:
        self._on = False  # the hot path's switch
        self._last = 0  # time.monotonic_ns() of the last request
        self._held = False
        self._wanted = threading.Event()
        self._stopped = False
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # a write never meets a closed (and perhaps reused) descriptor
        self._state: dict[str, object] = {"on": False, "why": "not started"}

    def request(self) -> None:
        """A request came: idle CPUs poll from now until HOLD_S after the last one."""
        if self._on:
            self._last = time.monotonic_ns()
            if not self._held:
                self._wanted.set()

    def start(self, setting: bool | None) -> None:
        """Poll while requests come: True always, False never; None ("auto") where a wake-up
        across CPUs measures slow. Called before the mount starts: the measure takes ~20–60 ms
        and needs the CPUs idle (busy ones do not halt)."""
        if setting is False:
            self._state = {"on": False, "why": "idle_poll = false"}
            return
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            self._state = {"on": False, "why": "one CPU: the reader and the daemon take turns on it"}
            return
        try:
            self._fd = os.open(CPU_LATENCY, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            why = "not root" if err.errno in (errno.EPERM, errno.EACCES) else err.strerror
            self._state = {"on": False, "why": f"the CPU latency request ({CPU_LATENCY}) needs root: {why}"}
            return
        wakeup_us = None
        if setting is None:
            try:
                wakeup_us = measure_wakeup_us(cpus[0], cpus[1])
            except (OSError, subprocess.SubprocessError, ValueError) as err:
                log.warning("idle polling off: a wake-up across CPUs could not be measured (%s)", err)
                self._off(f"a wake-up across CPUs could not be measured ({err})")
                return
            if wakeup_us <= SLOW_WAKEUP_US:
                log.info("idle polling off: a wake-up round trip across CPUs takes %.1f µs", wakeup_us)
                self._off(f"a wake-up across CPUs takes {wakeup_us:.0f} µs", wakeup_us)
                return
        self._state = {"on": True, "hold_ms": HOLD_S * 1000, "wakeup_us": wakeup_us}
        how = "" if wakeup_us is None else f" (a wake-up round trip across CPUs took {wakeup_us:.1f} µs)"
        log.info("idle polling on: idle CPUs poll while requests come%s", how)
        self._on = True
        threading.Thread(target=self._hold, name="kacheryfs-idle-poll", daemon=True).start()

    def _hold(self) -> None:
        """The holder thread: the request held from a request until HOLD_S after the last."""
        while self._wait_for_requests():
            self._ask(_POLL)
            self._held = True
            while time.monotonic_ns() - self._last < HOLD_S * 1e9 and not self._stopped:
                time.sleep(HOLD_S / 2)
            self._held = False
            self._ask(_DEFAULT)

    def _wait_for_requests(self) -> bool:
        self._wanted.wait()
        self._wanted.clear()
        return not self._stopped

    def _ask(self, latency: bytes) -> None:
        with self._fd_lock:
            if self._fd is not None:
                try:
                    os.write(self._fd, latency)
                except OSError as err:
                    log.warning("idle polling: the CPU latency request failed: %s", err.strerror)

    def _off(self, why: str, wakeup_us: float | None = None) -> None:
        self._state = {"on": False, "why": why, **({"wakeup_us": wakeup_us} if wakeup_us is not None else {})}
        self.stop()

    def stop(self) -> None:
        """Let go of the request for good (closing the device ends it, also when the daemon dies)."""
        self._on = False
        self._stopped = True
        self._wanted.set()
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._state.get("on"):
            self._state = {**self._state, "on": False, "why": "stopped"}

    def status(self) -> dict[str, object]:
        """For `kacheryfs status`: on (hold_ms, wakeup_us) or off (why)."""
        return dict(self._state)


POLLING = IdlePolling()  # the daemon's one: every connection's requests tell it


def measure_wakeup_us(cpu_a: int, cpu_b: int) -> float:
    """Microseconds of a wake-up round trip between two processes on these CPUs (a child runs it)."""
    cmd = [sys.executable, "-I", "-S", __file__, str(cpu_a), str(cpu_b)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    return float(out)


def _round_trips_us(cpu_a: int, cpu_b: int, trips: int = 100) -> float:
    """The median of three runs of `trips` round trips of one byte over pipes, this process on
    `cpu_a` and a child on `cpu_b`, in µs per trip (a fourth, first, warms up)."""
    ping_r, ping_w = os.pipe()
    pong_r, pong_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ping_w)
            os.close(pong_r)
            os.sched_setaffinity(0, {cpu_b})
            while os.read(ping_r, 1):
                os.write(pong_w, b"x")
        finally:
            os._exit(0)
    os.close(ping_r)
    os.close(pong_w)
    os.sched_setaffinity(0, {cpu_a})
    runs = []
    try:
        for _ in range(4):
            started = time.perf_counter()
            for _ in range(trips):
                os.write(ping_w, b"x")
                if not os.read(pong_r, 1):
                    raise OSError("the round-trip child ended early")
            runs.append((time.perf_counter() - started) / trips * 1e6)
            time.sleep(0.002)  # both CPUs idle again before the next run
    finally:
        os.close(ping_w)
        os.close(pong_r)
        os.waitpid(pid, 0)
    return statistics.median(runs[1:])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="print a wake-up round trip between two CPUs, in µs")
    parser.add_argument("cpus", nargs=2, type=int, metavar="CPU")
    args = parser.parse_args(argv)
    print(f"{_round_trips_us(*args.cpus):.2f}")


if __name__ == "__main__":
    main()
