"""Idle polling: the mount's CPU latency request, held while requests come and let go after."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from kacheryfs.config import load_config
from kacheryfs.errors import ConfigError
from kacheryfs.mount import idle_poll
from kacheryfs.mount.idle_poll import IdlePolling, measure_wakeup_us
from kacheryfs.store import LocalStore
from tests.fixtures_mount import mounted_at, store_tree, wait_until, write_sample_tree

POLL, DEFAULT = struct.pack("i", 0), struct.pack("i", 2_000_000_000)


@pytest.fixture
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file standing in for /dev/cpu_dma_latency: it keeps every value written to it, in order."""
    path = tmp_path / "cpu_dma_latency"
    path.write_bytes(b"")
    monkeypatch.setattr(idle_poll, "CPU_LATENCY", str(path))
    return path


def _need_two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        if os.environ.get("CI"):
            pytest.fail("CI machines have two CPUs")
        pytest.skip("one CPU: idle polling is off by design")


@pytest.mark.parametrize(("text", "expected"), [('"auto"', None), ("true", True), ("false", False)])
def test_idle_poll_is_auto_true_or_false_in_the_config(tmp_path: Path, text: str, expected: bool | None) -> None:
    (tmp_path / "c.toml").write_text(f"[mount]\nidle_poll = {text}\n")
    assert load_config(tmp_path / "c.toml", env={}).idle_poll is expected


@pytest.mark.parametrize("text", ['"yes"', "1", "200"])
def test_idle_poll_refuses_anything_else(tmp_path: Path, text: str) -> None:
    (tmp_path / "c.toml").write_text(f"[mount]\nidle_poll = {text}\n")
    with pytest.raises(ConfigError, match='idle_poll.*"auto", true or false'):
        load_config(tmp_path / "c.toml", env={})


def test_the_request_is_held_from_a_request_until_shortly_after_the_last(device: Path) -> None:
    _need_two_cpus()
    polling = IdlePolling()
    polling.start(True)
    try:
        wait_until(lambda: polling.status()["on"], what="idle polling on")
        time.sleep(0.05)
        assert device.read_bytes() == b""  # nothing asked before a request
        polling.request()
        wait_until(lambda: device.read_bytes() == POLL + DEFAULT, what="the request held, then let go")
        ends = time.monotonic() + 0.05
        while time.monotonic() < ends:  # requests closer together than HOLD_S: held once, throughout
            polling.request()
            time.sleep(idle_poll.HOLD_S / 4)
        wait_until(lambda: len(device.read_bytes()) == 16, what="a second hold, let go")
        assert device.read_bytes() == (POLL + DEFAULT) * 2
    finally:
        polling.stop()
    polling.request()
    time.sleep(0.05)
    assert device.read_bytes() == (POLL + DEFAULT) * 2  # stopped: nothing more asked
    assert polling.status()["on"] is False


def test_false_never_opens_the_device(device: Path) -> None:
    device.unlink()  # an open would fail: it must not be tried
    polling = IdlePolling()
    polling.start(False)
    polling.request()
    assert polling.status() == {"on": False, "why": "idle_poll = false"}


def test_a_device_that_cannot_be_opened_leaves_idle_polling_off_and_says_why(device: Path) -> None:
    _need_two_cpus()
    device.unlink()
    polling = IdlePolling()
    polling.start(True)
    status = polling.status()
    assert status["on"] is False and "needs root" in str(status["why"])


@pytest.mark.parametrize(("slow_us", "on"), [(1e9, False), (0.0, True)])
def test_auto_polls_only_where_a_wake_up_across_cpus_is_slow(
    device: Path, monkeypatch: pytest.MonkeyPatch, slow_us: float, on: bool
) -> None:
    _need_two_cpus()
    monkeypatch.setattr(idle_poll, "SLOW_WAKEUP_US", slow_us)
    polling = IdlePolling()
    polling.start(None)
    try:
        status = polling.status()
        assert status["on"] is on and float(status["wakeup_us"]) > 0  # type: ignore[arg-type]
        if not on:
            assert "a wake-up across CPUs takes" in str(status["why"])
    finally:
        polling.stop()


def test_a_wake_up_round_trip_across_two_cpus_is_measured() -> None:
    _need_two_cpus()
    cpus = sorted(os.sched_getaffinity(0))
    assert 0.5 < measure_wakeup_us(cpus[0], cpus[1]) < 100_000


def _latency_asked() -> int:
    fd = os.open(idle_poll.CPU_LATENCY, os.O_RDONLY)
    try:
        return struct.unpack("i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


def test_a_mount_asks_idle_cpus_to_poll_while_files_are_read_and_lets_go_after(tmp_path: Path) -> None:
    """The real device, as root: the kernel's effective CPU latency request is 0 during reads."""
    _need_two_cpus()
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root")
        pytest.skip("the CPU latency request needs root")
    if _latency_asked() != 2_000_000_000:
        reason = "another process holds a CPU latency request: the mount's cannot be told apart"
        if os.environ.get("CI"):
            pytest.fail(f"CI machines run nothing else: {reason}")
        pytest.skip(reason)
    url = store_tree(LocalStore(tmp_path / "storage"), write_sample_tree(tmp_path / "ds001"))
    with mounted_at(tmp_path, tmp_path / "storage", "[mount]\nidle_poll = true\n") as mount:
        wait_until(lambda: mount.status()["idle_poll"]["on"], what="idle polling on")  # type: ignore[index]
        time.sleep(0.05)
        assert _latency_asked() == 2_000_000_000  # the status request was let go of already
        seen: list[int] = []
        files = [p for p in mount.path(url).rglob("*") if p.is_file()]
        ends = time.monotonic() + 0.3
        while time.monotonic() < ends:
            for path in files:
                path.read_bytes()
            seen.append(_latency_asked())
        assert 0 in seen
        wait_until(lambda: _latency_asked() == 2_000_000_000, timeout=2, what="the request let go of")
        text = mount.cli("status", str(mount.mountpoint)).stdout
        assert "idle polling    on: idle CPUs poll until 2 ms after a request" in text
