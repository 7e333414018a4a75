"""Kernel passthrough: the wire amendments, on replies built as libfuse builds them, and which backing files stay.

The real thing runs in tests/test_mount.py against real mounts; here the kernel's two ioctls
are stood in for, to check the bookkeeping exactly.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from kacheryfs.mount import passthrough
from kacheryfs.mount.passthrough import _amend_init, _amend_open, _IoVec

INIT_OUT_SIZE = 64  # sizeof(struct fuse_init_out)
FUSE_INIT_EXT = 1 << 30
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_PASSTHROUGH = 1 << 37
FOPEN_KEEP_CACHE, FOPEN_NOFLUSH, FOPEN_PASSTHROUGH = 1 << 1, 1 << 5, 1 << 7


class Reply:
    """A reply as libfuse hands it to writev: a fuse_out_header and one payload, in two iovecs."""

    def __init__(self, payload: bytes, error: int = 0) -> None:
        self.header = ctypes.create_string_buffer(struct.pack("<IiQ", 16 + len(payload), error, 42), 16)
        self.payload = ctypes.create_string_buffer(payload, len(payload))
        self.iov = (_IoVec * 2)(
            _IoVec(ctypes.addressof(self.header), 16), _IoVec(ctypes.addressof(self.payload), len(payload))
        )

    def args(self) -> tuple[int, int]:
        return ctypes.addressof(self.iov), 2

    def bytes(self) -> bytes:
        return self.payload.raw


def init_out(flags: int, major: int = 7) -> bytes:
    body = struct.pack("<4I2H2IHHI", major, 31, 1 << 20, flags & 0xFFFFFFFF, 12, 9, 1 << 20, 1, 256, 0, flags >> 32)
    return body.ljust(INIT_OUT_SIZE, b"\0")


def flags_and_depth(payload: bytes) -> tuple[int, int]:
    flags, flags2, depth = struct.unpack_from("<I", payload, 12)[0], *struct.unpack_from("<II", payload, 32)
    return flags | flags2 << 32, depth


def test_the_init_reply_asks_for_passthrough_with_a_stack_depth_of_two() -> None:
    reply = Reply(init_out(FUSE_INIT_EXT | 0xF039))
    assert _amend_init(*reply.args(), True)
    flags, depth = flags_and_depth(reply.bytes())
    assert flags == FUSE_INIT_EXT | 0xF039 | FUSE_PARALLEL_DIROPS | FUSE_PASSTHROUGH
    assert depth == 2  # a store on overlayfs may back files
    assert reply.bytes()[:12] == init_out(0)[:12]  # version and readahead untouched


@pytest.mark.parametrize("flags", [FUSE_INIT_EXT | 0xF039, 0xF039], ids=["passthrough not wanted", "no flags2"])
def test_an_init_reply_without_passthrough_still_asks_for_parallel_lookups(flags: int) -> None:
    reply = Reply(init_out(flags))
    assert not _amend_init(*reply.args(), flags == 0xF039)
    assert flags_and_depth(reply.bytes()) == (flags | FUSE_PARALLEL_DIROPS, 0)


@pytest.mark.parametrize(
    "payload, error",
    [(init_out(FUSE_INIT_EXT, major=8), 0), (init_out(FUSE_INIT_EXT)[:24], 0), (b"", -71)],
    ids=["unknown major", "short reply of an old kernel", "error reply"],
)
def test_an_init_reply_not_known_is_left_as_it_is(payload: bytes, error: int) -> None:
    reply = Reply(payload, error)
    assert not _amend_init(*reply.args(), True)
    assert reply.bytes() == payload


def test_the_marked_open_reply_names_its_backing_file_and_drops_flags_the_kernel_refuses() -> None:
    reply = Reply(struct.pack("<QIi", 7, FOPEN_KEEP_CACHE, 0))
    _amend_open(*reply.args(), 7, 3)
    assert struct.unpack("<QIi", reply.bytes()) == (7, FOPEN_PASSTHROUGH | FOPEN_NOFLUSH, 3)


@pytest.mark.parametrize(
    "payload",
    [struct.pack("<QIi", 8, FOPEN_KEEP_CACHE, 0), b"x" * 16 + b"y", b"x" * 8],
    ids=["another handle's open", "a read of 17 bytes", "a short reply"],
)
def test_any_other_reply_is_left_as_it_is(payload: bytes) -> None:
    reply = Reply(payload)
    _amend_open(*reply.args(), 7, 3)
    assert reply.bytes() == payload


@pytest.mark.parametrize(
    "cap_eff, allowed",
    [("000001fffeffffff", True), ("0000000000200000", True), ("0000000000000000", False), ("000001fffedfffff", False)],
    ids=["root here", "CAP_SYS_ADMIN alone", "an ordinary user", "root without CAP_SYS_ADMIN"],
)
def test_registering_backing_files_needs_cap_sys_admin(cap_eff: str, allowed: bool) -> None:
    assert passthrough.has_cap_sys_admin(f"Name:\tpython\nCapPrm:\t{cap_eff}\nCapEff:\t{cap_eff}\n".encode()) is allowed


class FakeKernel:
    """The backing-file ioctls of /dev/fuse: ids handed out, and the ones registered now."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.ids = itertools.count(1)
        self.registered: dict[int, int] = {}  # backing id → size of the file

    def ioctl(self, fd: int, request: int, arg: bytes | bytearray, mutate: bool = False) -> int:
        if request == passthrough._BACKING_OPEN:
            if self.refuse:
                raise PermissionError(1, "Operation not permitted")
            backing_id = next(self.ids)
            self.registered[backing_id] = os.fstat(struct.unpack_from("<i", arg)[0]).st_size
            return backing_id
        assert request == passthrough._BACKING_CLOSE
        del self.registered[struct.unpack("<I", arg)[0]]
        return 0


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(passthrough.fcntl, "ioctl", fake.ioctl)
    return fake


def blobs(tmp_path: Path, *sizes: int) -> list[Path]:
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"blob{i}"
        path.write_bytes(b"x" * size)
        paths.append(path)
    return paths


def opener(path: Path):
    return lambda: os.open(path, os.O_RDONLY)


def test_every_open_of_a_blob_names_its_one_backing_file(kernel: FakeKernel, tmp_path: Path) -> None:
    pt = passthrough.Passthrough(SimpleNamespace(fd=-1))
    (blob,) = blobs(tmp_path, 10)
    first = pt.open("b", opener(blob))
    handle, reply = pt.reopen("b")
    again = struct.unpack("<QIi", reply)
    assert pt.working and len(kernel.registered) == 1
    assert again[0] == handle != first
    assert again[1:] == (FOPEN_PASSTHROUGH | FOPEN_NOFLUSH, next(iter(kernel.registered)))
    assert pt.blob_of(first) == pt.blob_of(again[0]) == "b"


def test_idle_backing_files_are_let_go_oldest_first_past_the_file_and_byte_bounds(
    kernel: FakeKernel, tmp_path: Path
) -> None:
    pt = passthrough.Passthrough(SimpleNamespace(fd=-1), kept_files=3, kept_bytes=250)
    paths = blobs(tmp_path, 100, 100, 100, 100, 10, 10, 100, 200)
    handles = {name: pt.open(name, opener(path)) for name, path in zip("abcdef", paths[:6], strict=True)}
    assert len(kernel.registered) == 6  # all open: none may go
    for name in "abcd":
        pt.release(handles[name])
    assert sorted(kernel.registered.values()) == [10, 10, 100, 100]  # idle c, d: 200 bytes, two files
    assert pt.reopen("a") is None and pt.reopen("b") is None and pt.reopen("c") is not None
    for name in "ef":
        pt.release(handles[name])
    assert len(pt) == len(kernel.registered) == 4  # c (open again), d, e, f
    assert pt.reopen("d") is not None  # open again: idle are e and f
    pt.release(pt.open("g", opener(paths[6])))  # idle e, f, g: three files, 120 bytes
    assert len(kernel.registered) == 5
    pt.release(pt.open("h", opener(paths[7])))  # 320 bytes: e, f and g go, oldest first, h stays
    assert [pt.reopen(name) is not None for name in "efgh"] == [False, False, False, True]
    assert sorted(kernel.registered.values()) == [100, 100, 200]  # c and d, open all along, and h


def test_a_kernel_without_passthrough_refuses_the_first_backing_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(passthrough.fcntl, "ioctl", FakeKernel(refuse=True).ioctl)
    pt = passthrough.Passthrough(SimpleNamespace(fd=-1))
    (blob,) = blobs(tmp_path, 10)
    with pytest.raises(passthrough.Unavailable, match="refused"):
        pt.open("b", opener(blob))
    assert not pt.working and pt.reopen("b") is None


def _written(pt: passthrough.Passthrough, reply: Reply) -> bytes:
    """What the hook writes to a pipe for `reply`: the header and the payload, as the kernel reads them."""
    read_end, write_end = os.pipe()
    try:
        assert pt._writev(write_end, *reply.args(), None) == 16 + len(reply.bytes())
        return os.read(read_end, 4096)[16:]
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_hook_amends_the_init_reply_once_and_only_the_open_reply_of_the_thread_that_marked_it(
    kernel: FakeKernel, tmp_path: Path
) -> None:
    pt = passthrough.Passthrough(SimpleNamespace(fd=-1))
    assert flags_and_depth(_written(pt, Reply(init_out(FUSE_INIT_EXT))))[0] & FUSE_PASSTHROUGH
    assert not flags_and_depth(_written(pt, Reply(init_out(FUSE_INIT_EXT))))[0] & FUSE_PASSTHROUGH
    (blob,) = blobs(tmp_path, 10)
    handle = pt.open("b", opener(blob))  # this thread's next reply is the open's
    others: list[bytes] = []
    thread = threading.Thread(target=lambda: others.append(_written(pt, Reply(struct.pack("<QIi", handle, 0, 0)))))
    thread.start()
    thread.join()
    assert struct.unpack("<QIi", others[0]) == (handle, 0, 0)  # another thread's reply: left as it is
    assert (
        struct.unpack("<QIi", _written(pt, Reply(struct.pack("<QIi", handle, 0, 0))))[1]
        == FOPEN_PASSTHROUGH | FOPEN_NOFLUSH
    )
    assert struct.unpack("<QIi", _written(pt, Reply(struct.pack("<QIi", handle, 0, 0))))[1] == 0  # once


def test_two_first_opens_of_one_blob_at_once_end_with_one_backing_file(kernel: FakeKernel, tmp_path: Path) -> None:
    pt = passthrough.Passthrough(SimpleNamespace(fd=-1))
    (blob,) = blobs(tmp_path, 10)
    both_opened = threading.Barrier(2)

    def open_blob() -> int:  # each open finds the blob unregistered, then both register
        fd = os.open(blob, os.O_RDONLY)
        both_opened.wait(timeout=10)
        return fd

    handles: list[int] = []
    threads = [threading.Thread(target=lambda: handles.append(pt.open("b", open_blob))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(handles) == 2 and len(kernel.registered) == 1 == len(pt)  # the second one let go of its own
    for handle in handles:
        pt.release(handle)
    assert len(kernel.registered) == 1 and pt.reopen("b") is not None  # idle now, and kept


def test_a_replaced_blob_is_never_named_again_and_its_old_file_goes_at_its_last_close(
    kernel: FakeKernel, tmp_path: Path
) -> None:
    pt = passthrough.Passthrough(SimpleNamespace(fd=-1))
    old, new = blobs(tmp_path, 10, 20)
    held = pt.open("b", opener(old))  # a program keeps the old file open across the repair
    assert pt.let_go_of_replaced(lambda blob, file: True) == 1
    assert pt.reopen("b") is None and len(kernel.registered) == 1  # open: the kernel still reads it
    fetched: list[Path] = []
    again = pt.open("b", lambda: (fetched.append(new), os.open(new, os.O_RDONLY))[1])
    assert fetched == [new] and sorted(kernel.registered.values()) == [10, 20]  # the store's file anew
    pt.release(held)
    assert sorted(kernel.registered.values()) == [20]  # the old one went at its last close
    pt.release(again)
    assert pt.reopen("b") is not None  # the new one is kept idle, as any other
