"""Idle polling: while requests come to the mount, idle CPUs poll for work instead of halting.

A request to the daemon costs two wake-ups: the daemon's thread, then the reader waiting
for the answer. Where an idle CPU halts at once — a KVM guest with `guest_halt_poll_ns` 0,
or deep C-states — waking it takes tens of µs (a trip through the host on a VM), and an
open of a cached file pays it twice: 55–95 µs here, against 16–45 µs on CPUs that poll.
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
from pathlib import Path

from kacheryfs.mount.wakeup import round_trip_us

log = logging.getLogger(__name__)

CPU_LATENCY = "/dev/cpu_dma_latency"
HOLD_S = 0.002  # idle CPUs poll this long after the last request
# "auto" asks for polling where a round trip across two CPUs costs this much more than one on
# a single CPU: the difference is the wake-ups (Python's own cost is on both sides).
SLOW_WAKEUP_US = 15.0
_POLL = struct.pack("i", 0)  # µs of wake-up latency allowed: none, so idle CPUs poll
_NO_REQUEST = 2_000_000_000  # the kernel's default: no one asks
_DEFAULT = struct.pack("i", _NO_REQUEST)


class IdlePolling:
    """The daemon's CPU latency request: held while requests come (`on_request`), let go after."""

    def __init__(self) -> None:
        self._on = False  # the hot path's switch
        self._last = 0  # time.monotonic_ns() of the last request
        self._held = False
        self._wanted = threading.Event()
        self._stopped = False
        self._explicit = False  # idle_poll = true
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
        forks, takes ~20–40 ms, and needs the CPUs idle (busy ones do not halt)."""
        if self._fd is not None or self._on:
            raise RuntimeError("idle polling was started already")
        self._stopped = False
        self._explicit = setting is True
        if setting is False:
            self._state = {"on": False, "why": "idle_poll = false"}
            return
        try:
            self._fd = os.open(CPU_LATENCY, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.EPERM, errno.EACCES):
                why = f"the CPU latency request ({CPU_LATENCY}) needs root"
            else:
                why = f"no CPU latency request here ({CPU_LATENCY}: {err.strerror})"
            self._state = {"on": False, "why": why}
            return
        wakeup_us, why = None, "idle_poll = true"
        if setting is None:
            why = self._why_not_measured()
            if why is None:
                wakeup_us = self._measure()
                if wakeup_us is None:
                    return
        self._state = {"on": True, "hold_ms": HOLD_S * 1000, "wakeup_us": wakeup_us, "why": why}
        self._on = True
        threading.Thread(target=self._hold, name="kacheryfs-idle-poll", daemon=True).start()

    def _why_not_measured(self) -> str | None:
        """Why "auto" polls without a measure, if it does: another process asks for wake-ups
        as fast as polling gives (the CPUs poll already: a measure would read fast, and
        whoever asked found wake-ups slow, or wants them fast)."""
        assert self._fd is not None
        value = os.read(self._fd, 4)
        in_effect = struct.unpack("i", value)[0] if len(value) == 4 else _NO_REQUEST
        if in_effect <= SLOW_WAKEUP_US:
            return f"another process asks for wake-ups within {in_effect} µs: not measured"
        return None

    def _measure(self) -> float | None:
        """The wake-up cost across two CPUs; None, with idle polling off, when it is low or
        cannot be measured."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:  # a daemon pinned to one CPU still wakes readers on the others
            cpus = _online_cpus()
        if len(cpus) < 2:
            self._off("one CPU: the reader and the daemon take turns on it")
            return None
        try:
            across, alone = round_trip_us(cpus[0], cpus[-1]), round_trip_us(cpus[0], cpus[0])
        except OSError as err:
            self._off(f"a wake-up across CPUs could not be measured ({err.strerror or err})")
            return None
        wakeup_us = across - alone
        if wakeup_us <= SLOW_WAKEUP_US:
            self._off(f"a wake-up across CPUs costs {wakeup_us:.0f} µs", wakeup_us)
            return None
        return wakeup_us

    def _off(self, why: str, wakeup_us: float | None = None) -> None:
        self._state = {"on": False, "why": why, **({} if wakeup_us is None else {"wakeup_us": wakeup_us})}
        self.stop()

    def describe(self) -> str:
        """One line for the daemon's log, once the mount is up: what was decided, and why."""
        state = self._state
        if not state["on"]:
            return f"idle polling off: {state['why']}"
        if state.get("wakeup_us") is not None:
            return f"idle polling on: a wake-up across CPUs costs {state['wakeup_us']:.0f} µs"
        return f"idle polling on: {state['why']}"

    @property
    def refused(self) -> bool:
        """Asked for (idle_poll = true) and off all the same."""
        return self._explicit and not self._state["on"]

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
        """For `kacheryfs status`: on (hold_ms; wakeup_us, or why not measured) or off (why)."""
        return dict(self._state)


def _online_cpus() -> list[int]:
    """The machine's online CPUs ("0-3,6" in sysfs), whatever this process may run on."""
    try:
        ranges = Path("/sys/devices/system/cpu/online").read_text().strip().split(",")
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for item in filter(None, ranges):
        first, _, last = item.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


POLLING = IdlePolling()  # the daemon's one: every connection's requests tell it
