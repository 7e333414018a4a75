"""What the mount reaches inside libfuse 3.12–3.16's private session: its low-level ops and its I/O hook.

libfuse's high-level API hides two things the hash views need: the low-level opendir (to
have the kernel keep listings) and the session's custom I/O (to ask for kernel
passthrough, `kacheryfs.mount.passthrough`). Both live in `struct fuse_session`, whose
layout is private; `Session.current` finds it from inside a callback and checks it against
what the public API says (`fuse_session_fd`, the mountpoint, the shape of the ops table)
before anything is written to it. Anything unknown: None, and nothing is changed.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import mfusepy

# Slots in struct fuse_lowlevel_ops (init, destroy, lookup, …; only ever appended to).
OPEN_SLOT, WRITE_SLOT, FLUSH_SLOT, RELEASE_SLOT, OPENDIR_SLOT = 14, 16, 17, 18, 20
KNOWN_VERSIONS = range(312, 317)  # libfuse versions whose struct fuse_session starts as _SessionHead


class _SessionHead(ctypes.Structure):
    _fields_ = [
        ("mountpoint", ctypes.c_void_p),
        ("exited", ctypes.c_int),
        ("fd", ctypes.c_int),
        ("io", ctypes.c_void_p),  # struct fuse_custom_io *, NULL unless fuse_session_custom_io was called
        ("mo", ctypes.c_void_p),
        ("debug", ctypes.c_int),
        ("deny_others", ctypes.c_int),
        ("op", ctypes.c_void_p * (OPENDIR_SLOT + 2)),
    ]


class Session:
    """The running FUSE session of this thread's request, as far as the mount touches it."""

    def __init__(self, address: int, head: _SessionHead) -> None:
        self.address = address
        self.head = head

    @classmethod
    def current(cls, mountpoint: str) -> Session | None:
        """The session of the current callback, if its layout is the known one and it is mounted at `mountpoint`."""
        lib = mfusepy._libfuse
        if lib.fuse_version() not in KNOWN_VERSIONS:
            return None
        lib.fuse_get_session.restype, lib.fuse_get_session.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
        lib.fuse_session_fd.restype, lib.fuse_session_fd.argtypes = ctypes.c_int, [ctypes.c_void_p]
        address = lib.fuse_get_session(lib.fuse_get_context().contents.fuse)
        if not address:
            return None
        head = _SessionHead.from_address(address)
        mounted_at = ctypes.string_at(head.mountpoint).decode(errors="replace") if head.mountpoint else ""
        if head.fd != lib.fuse_session_fd(address) or mounted_at != mountpoint:
            return None
        ops = head.op
        if not (ops[0] and ops[OPENDIR_SLOT] and ops[OPENDIR_SLOT + 1]) or ops[WRITE_SLOT]:
            return None  # not the high-level API's table: it sets init, opendir and readdir, and write_buf for write
        return cls(address, head)

    @property
    def fd(self) -> int:
        """The session's /dev/fuse descriptor."""
        return self.head.fd

    @property
    def ops(self) -> Any:
        """The session's own copy of the low-level ops table (slots may be replaced during INIT)."""
        return self.head.op


_worker = threading.local()
_keep_thread_state = ctypes.pythonapi.PyGILState_Ensure


def pin_thread_state() -> None:
    """Keep this libfuse thread's Python thread state for all its later callbacks.

    ctypes gives each callback from a libfuse thread a fresh Python thread state and frees it
    on return (an mmap, a munmap and more per request: ~40 % of the time of opening a cached
    file). One extra reference, never released, keeps it; the daemon keeps its threads
    (max_idle_threads).
    """
    if not getattr(_worker, "pinned", False):
        _keep_thread_state()
        _worker.pinned = True
