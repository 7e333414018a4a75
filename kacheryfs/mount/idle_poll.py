"""Idle polling: while requests come to the mount, idle CPUs poll for work instead of halting.

A request to the daemon costs two wake-ups: the daemon's thread, then the reader waiting
for the answer. Where an idle CPU halts at once — a KVM guest with `guest_halt_poll_ns` 0,
or deep C-states — waking it takes tens of µs (a trip through the host on a VM), and an
open of a cached file pays it twice: 70–90 µs here, against 16–35 µs on CPUs that poll.
The kernel's CPU latency request (/dev/cpu_dma_latency, PM QoS) of 0 µs makes idle CPUs
poll; the daemon holds it from a request until `HOLD_S` after the last one and lets go
when requests stop, so an idle mount costs nothing. Needs root (the device is 0600).
"auto" asks for it only where a wake-up across CPUs measures slow.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time

from kacheryfs.mount.wakeup import round_trip_us

log = logging.getLogger(__name__)

CPU_LATENCY = "/dev/cpu_dma_latency"
HOLD_S = 0.002  # idle CPUs poll this long after the last request
# "auto" asks for polling where a round trip across two CPUs costs this much more than one on
# a single CPU: the difference is the wake-ups (Python's own cost is on both sides).
SLOW_WAKEUP_US = 15.0
_POLL = struct.pack("i", 0)  # µs of wake-up latency allowed: none, so idle CPUs poll
_DEFAULT = struct.pack("i", 2_000_000_000)  # the kernel's default: no request


class IdlePolling:
    """The daemon's CPU latency request: held while requests come (`on_request`), let go after."""

    def __init__(self) -> None:
        self._on = False  # the hot path's switch
        self._last = 0  # time.monotonic_ns() of the last request
        self._held = False
        self._wanted = threading.Event()
        self._stopped = False
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # a write never meets a closed (and perhaps reused) descriptor
        self._state: dict[str, object] = {"on": False, "why": "not started"}

    def on_request(self) -> None:
        """A request came: idle CPUs poll from now until HOLD_S after the last one."""
        if self._on:
            self._last = time.monotonic_ns()
            if not self._held:
                self._wanted.set()

    def start(self, setting: bool | None) -> None:
        """Poll while requests come: True always, False never; None ("auto") where a wake-up
        across CPUs measures slow. Called before the mount starts any thread: the measure
        forks, takes ~30 ms, and needs the CPUs idle (busy ones do not halt)."""
        self._stopped = False
        if setting is False:
            self._state = {"on": False, "why": "idle_poll = false"}
            return
        cpus = sorted(os.sched_getaffinity(0))
        if setting is None and len(cpus) < 2:
            self._state = {"on": False, "why": "one CPU: the reader and the daemon take turns on it"}
            return
        try:
            self._fd = os.open(CPU_LATENCY, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.EPERM, errno.EACCES):
                why = f"the CPU latency request ({CPU_LATENCY}) needs root"
            else:
                why = f"no CPU latency request here ({CPU_LATENCY}: {err.strerror})"
            self._state = {"on": False, "why": why}
            return
        wakeup_us = None
        if setting is None:
            across, alone = round_trip_us(cpus[0], cpus[-1]), round_trip_us(cpus[0], cpus[0])
            wakeup_us = across - alone
            if wakeup_us <= SLOW_WAKEUP_US:
                log.info("idle polling off: a wake-up across CPUs costs %.1f µs (round trip %.1f µs, on one CPU %.1f)",
                         wakeup_us, across, alone)  # fmt: skip
                self._state = {"on": False, "why": f"a wake-up across CPUs costs {wakeup_us:.0f} µs",
                               "wakeup_us": wakeup_us}  # fmt: skip
                self.stop()
                return
        self._state = {"on": True, "hold_ms": HOLD_S * 1000, "wakeup_us": wakeup_us}
        how = "" if wakeup_us is None else f" (a wake-up across CPUs costs {wakeup_us:.1f} µs)"
        log.info("idle polling on: idle CPUs poll while requests come%s", how)
        self._on = True
        threading.Thread(target=self._hold, name="kacheryfs-idle-poll", daemon=True).start()

    def _hold(self) -> None:
        """The holder thread: the request held from a request until HOLD_S after the last."""
        while True:
            self._wanted.wait()
            if self._stopped:
                return
            self._held = True  # before the clear: requests from now on need not set _wanted
            self._wanted.clear()
            self._ask(_POLL)
            while not self._stopped:
                rest = HOLD_S - (time.monotonic_ns() - self._last) / 1e9
                if rest > 0:
                    time.sleep(rest)
                    continue
                self._held = False
                if time.monotonic_ns() - self._last < HOLD_S * 1e9:  # one came as it was let go: go on
                    self._held = True
                    continue
                break
            self._ask(_DEFAULT)

    def _ask(self, latency: bytes) -> None:
        with self._fd_lock:
            if self._fd is not None:
                try:
                    os.write(self._fd, latency)
                except OSError as err:
                    log.warning("idle polling: the CPU latency request failed: %s", err.strerror)

    def stop(self) -> None:
        """Let go of the request for good (closing the device ends it; so does the daemon's end)."""
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
