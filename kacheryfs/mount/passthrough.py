"""Kernel passthrough for the hash views: the kernel reads and maps a blob's own file itself.

Since Linux 6.9 a FUSE daemon may answer an open with a "backing file" (FUSE_PASSTHROUGH):
the kernel then serves that file's reads, splices and mmaps from the backing file, with its
page cache and readahead, and no byte and no read request passes through the daemon. For
a blob that is the store's own file, so a mounted path reads as fast as the store does.

libfuse 3.14 (Debian 12's) cannot ask for it, and no Python binding exposes the
passthrough API of later libfuse versions. Both things it needs are on the wire, though,
and libfuse 3.14–3.16 lets a session send its replies through a custom I/O hook
(`fuse_session_custom_io`), so this module does it there: the INIT reply gets the
FUSE_PASSTHROUGH flag and a stack depth, and each OPEN reply the operations mark gets
FOPEN_PASSTHROUGH and the id of a backing file registered with
`ioctl(FUSE_DEV_IOC_BACKING_OPEN)`. The hook is only in the way while such a reply is
pending; otherwise libfuse writes through libc's writev as before.

The INIT reply also gets FUSE_PARALLEL_DIROPS, with or without passthrough: libfuse 3.14
leaves it out although `conn.want` asks for it, and without it the kernel sends one lookup
per directory at a time, so a name waiting on a slow channel would hold up every other name
in `sha1/`. A mount without passthrough installs the hook for that alone (`passthrough=False`).

Registering a backing file needs CAP_SYS_ADMIN. Without it, on a kernel without
passthrough, or on a libfuse whose session is not the known one, nothing is installed or the
first open finds out, and the mount serves reads from the daemon as before.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import itertools
import logging
import os
import struct
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import mfusepy

from kacheryfs.mount.session import Session, pin_thread_state

log = logging.getLogger(__name__)

# include/uapi/linux/fuse.h
_FUSE_PARALLEL_DIROPS = 1 << 18  # fuse_init_out.flags: lookups and readdirs of a directory run side by side
_FUSE_INIT_EXT = 1 << 30  # fuse_init_out.flags: flags2 is read
_FUSE_PASSTHROUGH_FLAGS2 = 1 << (37 - 32)  # FUSE_PASSTHROUGH, in fuse_init_out.flags2
_FOPEN_NOFLUSH, _FOPEN_PASSTHROUGH = 1 << 5, 1 << 7
# A passthrough open's flags: whatever else libfuse set (keep_cache, say) the kernel refuses
# with passthrough, and a blob has nothing to flush at close.
_OPEN_FLAGS = _FOPEN_PASSTHROUGH | _FOPEN_NOFLUSH
_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map): {int32 fd, uint32 flags, uint64 padding}
_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t backing id)
_INIT_OUT = struct.Struct("<4I2H2IHHII")  # fuse_init_out up to max_stack_depth (40 bytes)
_OPEN_OUT = struct.Struct("<QIi")  # fuse_open_out: fh, open_flags, backing_id
_OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
# How deep the store's filesystem may be stacked: 2, the kernel's most, so that a store on
# overlayfs (root in a container) can back files too. The mount itself can then not be a
# layer of another overlay, which nothing asks of it.
_STACK_DEPTH = 2
_CAP_SYS_ADMIN = 21
# Backing files stay registered after their last close (a re-open is then answered from the
# inode alone), the last opened first, up to this many files and bytes. Each holds its blob's
# lock against eviction, so the bytes are bounded; many small files cost a few MiB of kernel memory.
_KEPT_FILES, KEPT_BYTES = 16_384, 1 << 30


class Unavailable(Exception):
    """The kernel refused the first backing file: this mount has no passthrough."""


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _CustomIo(ctypes.Structure):  # struct fuse_custom_io, libfuse 3.14–3.16
    _fields_ = [("writev", ctypes.c_void_p), ("read", ctypes.c_void_p),
                ("splice_receive", ctypes.c_void_p), ("splice_send", ctypes.c_void_p)]  # fmt: skip


_libc = ctypes.CDLL(None, use_errno=True)
# Called with the GIL held (PyDLL): writing a reply never waits, and letting the GIL go for it
# made every reply queue to take it back behind the daemon's other threads.
_libc_writev = ctypes.PyDLL(None, use_errno=True).writev
_libc_writev.restype, _libc_writev.argtypes = ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_LIBC_WRITEV = ctypes.cast(_libc.writev, ctypes.c_void_p).value
# The hook's read is libc's own (libfuse's extra userdata argument is ignored).
_LIBC_READ = ctypes.cast(_libc.read, ctypes.c_void_p).value
# use_errno on both sides: a failed writev's errno reaches libfuse (ENOENT: the request was interrupted).
_WritevHook = ctypes.CFUNCTYPE(
    ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, use_errno=True
)


def may_register_backing_files() -> bool:
    """Whether this process has CAP_SYS_ADMIN, which the kernel asks of a backing file's registration."""
    try:
        with open("/proc/self/status", "rb") as status:
            return has_cap_sys_admin(status.read())
    except OSError:
        return False


def _why_refused(err: OSError) -> str:
    """What the kernel's refusal of the first backing file means, for the log and `kacheryfs status`."""
    if err.errno == errno.EPERM:
        return "the kernel refused a backing file (EPERM): it needs Linux >= 6.9, and CAP_SYS_ADMIN outside containers"
    if err.errno == errno.ELOOP:
        return "the store is on a filesystem stacked too deep for a backing file"
    if err.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
        return f"this kernel has no FUSE passthrough ({err.strerror}): it needs Linux >= 6.9"
    return f"the kernel refused a backing file: {err.strerror}"


def has_cap_sys_admin(proc_status: bytes) -> bool:
    """Whether a /proc/PID/status text gives its process CAP_SYS_ADMIN (among its effective capabilities)."""
    for line in proc_status.splitlines():
        if line.startswith(b"CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    return False


@dataclass
class _Backing:
    backing_id: int
    size: int
    file: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the store's file it holds
    opens: int = 0  # open handles naming it: while any, the kernel's inode holds it and it must stay
    replaced: bool = False  # the store's file is another now: no new open names it; let go of at its last close


class Passthrough:
    """The hash views' backing files, registered with the kernel, and the replies that name them.

    One backing file per blob, shared by every path that names the blob: the kernel refuses a
    second backing file for an inode that still has one open. A backing file holds the
    store's descriptor, and with it the shared lock that keeps the blob from eviction, until
    it is unregistered: when it is not open and older than the last `kept_files` or
    `kept_bytes` of those that are not.
    """

    def __init__(self, session: Session, *, kept_files: int = _KEPT_FILES, kept_bytes: int = KEPT_BYTES) -> None:
        self._fd = session.fd
        self._kept_files, self._kept_bytes = kept_files, kept_bytes
        self._hook = _WritevHook(self._writev)  # the C callback libfuse calls: kept alive as long as the mount
        self._hook_address = ctypes.cast(self._hook, ctypes.c_void_p).value
        self._io: _CustomIo | None = None  # libfuse's copy of the hook, once installed
        self._init_pending = True
        self._passthrough = True  # the INIT reply asks for it (else only for parallel lookups)
        self._replies: dict[int, tuple[int, int]] = {}  # thread → (fh, backing id) of its coming OPEN reply
        self._lock = threading.Lock()
        self._backing: dict[Hashable, _Backing] = {}
        self._idle: collections.OrderedDict[Hashable, _Backing] = collections.OrderedDict()  # not open, oldest first
        self._idle_bytes = 0
        # open handle → the blob it names and the backing file its reply named (a replaced one
        # is no longer the blob's: it lives on through its handles alone)
        self._handles: dict[int, tuple[Hashable, _Backing]] = {}
        self._next_handle = itertools.count(1)
        self.working = False  # a backing file was registered: the kernel does passthrough
        self._refused = False  # the first one was refused: never any passthrough on this mount

    @classmethod
    def install(cls, session: Session, *, kept_bytes: int = KEPT_BYTES, passthrough: bool = True) -> Passthrough | None:
        """Route the session's replies through the hook, during INIT (before its reply); None if it cannot be.

        `passthrough=False`: only the INIT reply is amended (parallel lookups), then the hook
        steps aside for good.
        """
        if session.head.io:
            return None  # someone else's custom I/O: not ours to wrap
        lib = mfusepy._libfuse
        lib.fuse_session_custom_io.restype = ctypes.c_int
        lib.fuse_session_custom_io.argtypes = [ctypes.c_void_p, ctypes.POINTER(_CustomIo), ctypes.c_int]
        hook = cls(session, kept_bytes=kept_bytes)
        hook._passthrough = passthrough
        wanted = _CustomIo(hook._hook_address, _LIBC_READ, None, None)
        if lib.fuse_session_custom_io(session.address, ctypes.byref(wanted), session.fd) != 0:
            return None
        # libfuse keeps its own copy: that copy's writev is switched between the hook and libc's.
        hook._io = _CustomIo.from_address(session.head.io)
        return hook

    # -- opens and closes ---------------------------------------------------------------
    def open(self, blob: Hashable, open_blob: Callable[[], int]) -> int:
        """A handle for an open of `blob`, whose reply will name its backing file.

        `open_blob` gives a new descriptor on the blob (fetching it first if need be); it is
        called only when the blob has no backing file registered. Raises `Unavailable` if the
        kernel refuses the mount's first backing file.
        """
        with self._lock:
            backing = self._backing.get(blob)
            if backing is not None:
                self._opened(blob, backing)
        if backing is None:
            backing = self._register(blob, open_blob)
        handle = next(self._next_handle)
        with self._lock:
            self._handles[handle] = (blob, backing)
            self._replies[threading.get_ident()] = (handle, backing.backing_id)
            self._set_writev(self._hook_address)  # libfuse's next write of this thread is the reply
        return handle

    def reopen(self, blob: Hashable) -> tuple[int, bytes] | None:
        """A new handle and the whole OPEN reply (fuse_open_out) naming it, for one more open of a
        blob whose backing file is registered.

        None when it is not (any more): the open then takes the way of a first one.
        """
        with self._lock:
            backing = self._backing.get(blob)
            if backing is None:
                return None
            self._opened(blob, backing)
            handle = next(self._next_handle)
            self._handles[handle] = (blob, backing)
        return handle, _OPEN_OUT.pack(handle, _OPEN_FLAGS, backing.backing_id)

    def blob_of(self, handle: int) -> Hashable | None:
        """The blob an open handle names."""
        named = self._handles.get(handle)
        return None if named is None else named[0]

    def release(self, handle: int) -> None:
        """The kernel closed `handle`: its backing file may now be let go."""
        with self._lock:
            blob, backing = self._handles.pop(handle, (None, None))
            if backing is None:
                return
            backing.opens -= 1
            if backing.opens == 0 and backing.replaced:
                self._unregister(backing.backing_id)
            elif backing.opens == 0:
                self._idle[blob] = backing
                self._idle_bytes += backing.size
                self._trim()

    def let_go_of_replaced(self, replaced: Callable[[Hashable, tuple[int, int]], bool]) -> int:
        """Let go of the backing files whose blob's file in the store is no longer theirs, by
        `replaced(blob, (st_dev, st_ino))`: idle ones now, open ones at their last close (the
        kernel keeps an inode's backing file while it is open). How many.

        A blob quarantined by `kacheryfs fsck --repair` is one: its next open registers the
        store's file anew (fetching it again). An inode the kernel still reads through the old
        file cannot take the new one until that is closed: such an open fails, where serving
        the quarantined bytes would be worse.
        """
        with self._lock:
            gone = [(blob, b) for blob, b in self._backing.items() if replaced(blob, b.file)]
            for blob, backing in gone:
                backing.replaced = True
                del self._backing[blob]
                if backing.opens == 0:
                    if self._idle.pop(blob, None) is not None:
                        self._idle_bytes -= backing.size
                    self._unregister(backing.backing_id)
        return len(gone)

    def _opened(self, blob: Hashable, backing: _Backing) -> None:
        """Count one more open of a registered backing file (under the lock)."""
        if backing.opens == 0 and self._idle.pop(blob, None) is not None:
            self._idle_bytes -= backing.size
        backing.opens += 1

    def _register(self, blob: Hashable, open_blob: Callable[[], int]) -> _Backing:
        fd = open_blob()  # outside the lock: it may wait for a download
        try:
            st = os.fstat(fd)
            try:
                backing_id = fcntl.ioctl(self._fd, _BACKING_OPEN, bytearray(struct.pack("<iIQ", fd, 0, 0)), True)
            except OSError as err:
                with self._lock:
                    first = not self.working
                    self._refused = self._refused or first
                if first:
                    self.stop()
                    raise Unavailable(_why_refused(err)) from err
                raise
        finally:
            os.close(fd)  # the kernel holds the file now, and with it the blob's lock
        with self._lock:
            if self._refused:  # another thread's first registration failed: the mount went without
                self._unregister(backing_id)
                raise Unavailable("the kernel refused another backing file first")
            if not self.working:
                self.working = True
                log.info("kernel passthrough on: blobs are read by the kernel from the store's own files")
            backing = self._backing.get(blob)
            if backing is None:
                backing = self._backing[blob] = _Backing(backing_id, st.st_size, (st.st_dev, st.st_ino))
            else:
                self._unregister(backing_id)  # another thread registered it meanwhile: one per blob
            self._opened(blob, backing)
            return backing

    def _trim(self) -> None:
        """Let go of the oldest backing files not open, past the last kept_files or kept_bytes (under the lock)."""
        while self._idle and (len(self._idle) > self._kept_files or self._idle_bytes > self._kept_bytes):
            blob, backing = self._idle.popitem(last=False)
            self._idle_bytes -= backing.size
            del self._backing[blob]
            self._unregister(backing.backing_id)

    def _unregister(self, backing_id: int) -> None:
        try:
            fcntl.ioctl(self._fd, _BACKING_CLOSE, struct.pack("<I", backing_id))
        except OSError as err:
            log.warning("could not let go of backing file %d: %s", backing_id, err.strerror)

    def __len__(self) -> int:
        """Blobs with a backing file registered."""
        return len(self._backing)

    def stop(self) -> None:
        """Write replies through libc again, the hook out of the way for good (no passthrough)."""
        with self._lock:
            self._init_pending = False
            self._replies.clear()
            self._set_writev(_LIBC_WRITEV)

    # -- the hook ------------------------------------------------------------------------
    def _set_writev(self, address: int | None) -> None:
        if self._io is not None:
            self._io.writev = address  # one aligned pointer store: libfuse threads see the old or the new

    def _writev(self, fd: int, iov: int, count: int, _userdata: int | None) -> int:
        """libfuse's writev of a reply: the INIT reply and marked OPEN replies are amended first."""
        pin_thread_state()
        try:
            if self._init_pending:
                self._init_pending = False
                if not _amend_init(iov, count, self._passthrough):
                    if self._passthrough:
                        log.info("kernel passthrough off: the INIT reply is not one known")
                    self.stop()
                elif not self._replies:
                    self._set_writev(_LIBC_WRITEV)
            reply = self._replies.pop(threading.get_ident(), None) if self._replies else None
            if reply is not None:
                _amend_open(iov, count, *reply)
                with self._lock:
                    if not self._replies:
                        self._set_writev(_LIBC_WRITEV)
        except Exception:  # the reply must go out whatever happened: a lost reply hangs its caller
            log.exception("amending a FUSE reply failed")
        return _libc_writev(fd, iov, count)


def _payload(iov: int, count: int, size: int) -> ctypes.Array[ctypes.c_char] | None:
    """A successful reply's payload if it is `size` bytes or more, as writable memory; None otherwise."""
    if count < 2:
        return None
    vec = (_IoVec * count).from_address(iov)
    if vec[0].len != _OUT_HEADER.size or vec[1].len < size:
        return None
    _len, error, _unique = _OUT_HEADER.unpack(ctypes.string_at(vec[0].base, _OUT_HEADER.size))
    if error != 0:
        return None
    return (ctypes.c_char * vec[1].len).from_address(vec[1].base)


def _amend_init(iov: int, count: int, passthrough: bool) -> bool:
    """Ask for parallel lookups in the INIT reply, and for passthrough if `passthrough`; True
    if passthrough was asked for (False: not wanted, or a reply this does not know)."""
    payload = _payload(iov, count, _INIT_OUT.size)
    if payload is None:
        return False
    fields = list(_INIT_OUT.unpack_from(payload))
    major, flags = fields[0], fields[3]
    if major != 7:
        return False
    fields[3] |= _FUSE_PARALLEL_DIROPS
    asked = passthrough and bool(flags & _FUSE_INIT_EXT)  # an old kernel: no flags2, no passthrough
    if asked:
        fields[-2] |= _FUSE_PASSTHROUGH_FLAGS2
        fields[-1] = _STACK_DEPTH
    _INIT_OUT.pack_into(payload, 0, *fields)
    return asked


def _amend_open(iov: int, count: int, handle: int, backing_id: int) -> None:
    """Name the backing file in the OPEN reply of `handle` (any other reply is left as it is)."""
    payload = _payload(iov, count, _OPEN_OUT.size)
    if payload is None or len(payload) != _OPEN_OUT.size:
        return
    fh, _open_flags, _ = _OPEN_OUT.unpack_from(payload)
    if fh == handle:
        _OPEN_OUT.pack_into(payload, 0, fh, _OPEN_FLAGS, backing_id)
