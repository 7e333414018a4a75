"""Idle polling: the mount's CPU latency request, held while requests come and let go after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_mount import Mount, mounted_at, store_tree, wait_until, write_sample_tree

from kacheryfs.config import load_config
from kacheryfs.errors import ConfigError
from kacheryfs.mount import idle_poll
from kacheryfs.mount.idle_poll import IdlePolling
from kacheryfs.mount.wakeup import round_trip_us
from kacheryfs.store import LocalStore

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


def _requests(polling: IdlePolling, seconds: float, every: float) -> None:
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        polling.on_request()
        time.sleep(every)


def test_the_request_is_held_from_a_request_until_shortly_after_the_last(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idle_poll, "HOLD_S", 0.05)
    polling = IdlePolling()
    polling.start(True)
    try:
        time.sleep(0.1)
        assert device.read_bytes() == b""  # nothing asked before a request
        _requests(polling, 0.3, 0.005)  # closer together than HOLD_S: held throughout
        assert device.read_bytes() == POLL  # held, not let go of yet
        wait_until(lambda: device.read_bytes() == POLL + DEFAULT, what="the request let go of after the last")
        _requests(polling, 0.1, 0.005)
        wait_until(lambda: device.read_bytes() == (POLL + DEFAULT) * 2, what="a second hold, let go of")
    finally:
        polling.stop()
    polling.on_request()
    time.sleep(0.1)
    assert device.read_bytes() == (POLL + DEFAULT) * 2  # stopped: nothing more asked
    assert polling.status()["on"] is False


def test_stop_while_held_closes_the_device(device: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idle_poll, "HOLD_S", 10.0)
    polling = IdlePolling()
    polling.start(True)
    polling.on_request()
    wait_until(lambda: device.read_bytes() == POLL, what="the request held")
    fd = polling._fd
    polling.stop()  # the kernel drops a request when its descriptor closes
    with pytest.raises(OSError):
        os.fstat(fd)  # type: ignore[arg-type]
    assert polling.status()["on"] is False


def test_false_never_opens_the_device(device: Path) -> None:
    device.unlink()  # an open would fail: it must not be tried
    polling = IdlePolling()
    polling.start(False)
    polling.on_request()
    assert polling.status() == {"on": False, "why": "idle_poll = false"}


def test_a_missing_device_leaves_idle_polling_off_and_says_why(device: Path) -> None:
    device.unlink()
    polling = IdlePolling()
    polling.start(True)
    assert polling.status() == {
        "on": False,
        "why": f"no CPU latency request here ({device}: No such file or directory)",
    }


def _started_as_nobody(device: str) -> dict[str, object]:
    """IdlePolling().start(True)'s status in a child running as nobody, as a user's daemon."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            idle_poll.CPU_LATENCY = device
            polling = IdlePolling()
            polling.start(True)
            os.write(write, json.dumps(polling.status()).encode())
            polling.stop()
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        out = answer.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def test_a_device_only_root_may_open_leaves_idle_polling_off_and_says_so() -> None:
    _need_root()
    folder = Path(tempfile.mkdtemp(prefix="kacheryfs-latency-"))  # one nobody may reach
    try:
        folder.chmod(0o755)
        device = folder / "cpu_dma_latency"
        device.write_bytes(b"")
        device.chmod(0o666)
        assert _started_as_nobody(str(device))["on"] is True  # the control: open to all, it is used
        device.chmod(0o600)
        assert _started_as_nobody(str(device)) == {"on": False, "why": f"the CPU latency request ({device}) needs root"}
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize(("slow_us", "on"), [(1e9, False), (-1e9, True)])
def test_auto_polls_only_where_a_wake_up_across_cpus_is_slow(
    device: Path, monkeypatch: pytest.MonkeyPatch, slow_us: float, on: bool
) -> None:
    _need_two_cpus()
    monkeypatch.setattr(idle_poll, "SLOW_WAKEUP_US", slow_us)
    polling = IdlePolling()
    polling.start(None)
    try:
        status = polling.status()
        assert status["on"] is on and isinstance(status["wakeup_us"], float)
        if not on:
            assert "a wake-up across CPUs costs" in str(status["why"])
    finally:
        polling.stop()


def test_auto_polls_unmeasured_where_another_process_asks_for_low_latency(device: Path) -> None:
    """The CPUs poll already (another mount, a tuned profile): a measure would read fast."""
    device.write_bytes(struct.pack("i", 0))  # what the device reads: the request in effect
    polling = IdlePolling()
    polling.start(None)
    try:
        status = polling.status()
        assert status["on"] is True and status["wakeup_us"] is None
        assert status["why"] == "another process asks for wake-ups within 0 µs: not measured"
        assert polling.describe() == "idle polling on: another process asks for wake-ups within 0 µs: not measured"
    finally:
        polling.stop()


def test_auto_measures_across_the_machines_cpus_when_the_daemon_is_pinned_to_one(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_two_cpus()
    monkeypatch.setattr(idle_poll, "SLOW_WAKEUP_US", -1e9)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    polling = IdlePolling()
    try:
        polling.start(None)
        assert isinstance(polling.status()["wakeup_us"], float)  # measured, not "one CPU"
        assert os.sched_getaffinity(0) == {min(cpus)}  # the measure put the pin back
    finally:
        polling.stop()
        os.sched_setaffinity(0, cpus)


def test_a_wake_up_round_trip_is_measured_across_two_cpus_and_on_one() -> None:
    _need_two_cpus()
    cpus = sorted(os.sched_getaffinity(0))
    assert 0.5 < round_trip_us(cpus[0], cpus[-1]) < 100_000
    assert 0.5 < round_trip_us(cpus[0], cpus[0]) < 100_000
    assert os.sched_getaffinity(0) == set(cpus)  # put back


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root")
        pytest.skip("needs root")


def _latency_asked() -> int:
    fd = os.open(idle_poll.CPU_LATENCY, os.O_RDONLY)
    try:
        return struct.unpack("i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


@pytest.fixture
def polling_mount(tmp_path: Path) -> Iterator[tuple[Mount, list[Path]]]:
    """A real mount with idle_poll = true, as root, and the files of a sample tree through it."""
    _need_two_cpus()
    _need_root()
    if _latency_asked() != 2_000_000_000:
        reason = "another process holds a CPU latency request: the mount's cannot be told apart"
        if os.environ.get("CI"):
            pytest.fail(f"CI machines run nothing else: {reason}")
        pytest.skip(reason)
    url = store_tree(LocalStore(tmp_path / "storage"), write_sample_tree(tmp_path / "ds001"))
    with mounted_at(tmp_path, tmp_path / "storage", "[mount]\nidle_poll = true\n") as mount:
        yield mount, [p for p in mount.path(url).rglob("*") if p.is_file()]


def test_a_mount_asks_idle_cpus_to_poll_while_files_are_read_and_lets_go_after(
    polling_mount: tuple[Mount, list[Path]],
) -> None:
    """The real device: the kernel's effective CPU latency request is 0 during reads."""
    mount, files = polling_mount
    wait_until(lambda: mount.status()["idle_poll"]["on"], what="idle polling on")  # type: ignore[index]
    time.sleep(0.05)
    assert _latency_asked() == 2_000_000_000  # the status request was let go of already
    seen: list[int] = []
    ends = time.monotonic() + 0.3
    while time.monotonic() < ends:
        for path in files:
            path.read_bytes()
            os.getxattr(path, "user.kachery.sha1")  # a request whatever the kernel keeps
        seen.append(_latency_asked())
    assert 0 in seen
    wait_until(lambda: _latency_asked() == 2_000_000_000, timeout=2, what="the request let go of")
    text = mount.cli("status", str(mount.mountpoint)).stdout
    assert "idle polling    on: idle CPUs poll until 2 ms after a request (idle_poll = true)" in text
    assert "INFO kacheryfs.mount.daemon: idle polling on: idle_poll = true" in mount.log_text()


def test_a_daemon_killed_while_it_holds_the_request_lets_go_of_it(polling_mount: tuple[Mount, list[Path]]) -> None:
    mount, files = polling_mount
    pid = int(mount.status()["pid"])  # type: ignore[call-overload]
    for _ in range(50):  # stopped at a moment it holds the request (it lets go 2 ms after the last)
        for path in files:
            path.read_bytes()
            os.getxattr(path, "user.kachery.sha1")  # a request whatever the kernel keeps
        os.kill(pid, signal.SIGSTOP)
        if _latency_asked() == 0:
            break
        os.kill(pid, signal.SIGCONT)
    else:
        pytest.fail("the request was never seen held")
    try:
        time.sleep(0.05)
        assert _latency_asked() == 0  # held by the stopped daemon
    finally:
        os.kill(pid, signal.SIGKILL)  # never left stopped, whatever the assert says
    wait_until(
        lambda: _latency_asked() == 2_000_000_000, timeout=5, what="the kernel to drop the dead daemon's request"
    )
    mount.unmount()  # the stale mount cleared
