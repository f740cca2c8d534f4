"""Publish a directory so that readers see all of it or nothing, with many writers on many hosts at once.

A writer builds `<dst>.tmp-<token>` (token: host, pid, random id) while holding an exclusive flock on
`<dst>.lock-<token>`, whose mtime it refreshes every HEARTBEAT_S; the block's success renames the temp into place.
Leftovers are removed only when provably dead: their lock can be taken AND their newest mtime is older than
STALE_AFTER_S. The lock alone is not enough where locks are host-local (NFS mounted `nolock`), the age alone
cannot tell a slow writer from a dead one; no PID is ever compared, since PIDs mean nothing across hosts or
PID namespaces.

Replacing an existing `dst` swaps the two directories in one `renameat2(RENAME_EXCHANGE)` call, so `dst` is
never missing and stays a plain directory (copyable with cp/rsync/tar, unlike a symlink to a version).
Filesystems without that call (NFS, non-Linux) fall back to moving the old one aside and back on failure,
which leaves a window of microseconds without `dst`; a writer killed inside it is repaired by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator

STALE_AFTER_S = 15 * 60
HEARTBEAT_S = 30
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)


def writer_token() -> str:
    """A name part no other writer on any host uses: host, pid and a random id."""
    host = re.sub(r"[^A-Za-z0-9]+", "-", socket.gethostname()).strip("-")[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """renameat2(2); False where the kernel or filesystem lacks it (then the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), dst)


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst`; FileExistsError if `dst` exists (a directory never silently replaces another)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "exists", dst) from e
        raise


def _swap_in(tmp: str, dst: str, token: str) -> None:
    """Put `tmp` at `dst`, which exists; the old `dst` ends up at `tmp` (or is removed in the fallback)."""
    for _ in range(100):  # other writers may be swapping too: last one wins, none fails
        if not os.path.lexists(dst):
            try:
                return _rename_noreplace(tmp, dst)
            except FileExistsError:
                continue
        try:
            if _renameat2(tmp, dst, _RENAME_EXCHANGE):
                return
        except FileNotFoundError:
            continue
        old = f"{os.path.dirname(dst)}/{os.path.basename(dst)}.old-{token}"
        try:
            os.rename(dst, old)
        except FileNotFoundError:
            continue
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        remove_tree(old)
        return
    raise RuntimeError(f"could not replace {dst}: other writers kept replacing it")


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for an instant, in every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return 0o022


def ordinary_permissions(root: str) -> None:
    """Give `root`'s tree the modes a plain write would (0644 files, 0755 directories under umask 022):
    safetensors and tempfile create 0600 / 0700, which other users of a shared model directory cannot read."""
    mask = _umask()
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def remove_tree(path: str, settle_s: float = 0.0, patience_s: float = 10.0) -> None:
    """Remove a file or directory tree. `settle_s`: after a failed write, keep watching that long and remove it
    again if it reappears (TensorStore writes still in flight when Orbax gives up re-create their directories)."""
    deadline = time.monotonic() + patience_s
    while True:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        quiet_until = time.monotonic() + settle_s
        while not os.path.lexists(path) and time.monotonic() < quiet_until:
            time.sleep(0.05)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _try_lock(path: str, create: bool = True) -> int | None:
    """An fd holding an exclusive flock on `path` (created if absent and `create`), or None if someone holds it."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created, kept afterwards), waiting for whoever holds it."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _newest_mtime(paths: list[str]) -> float:
    newest = 0.0
    for path in paths:
        with contextlib.suppress(OSError):
            newest = max(newest, os.lstat(path).st_mtime)
            if os.path.isdir(path) and not os.path.islink(path):
                for entry in os.scandir(path):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def remove_stale_writes(dst: str | os.PathLike, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the temp, moved-aside and lock files of dead writers of `dst`; returns the tokens removed.

    A moved-aside old `dst` (`<dst>.old-<token>`, the fallback swap) is put back if `dst` is missing.
    """
    dst = os.path.abspath(os.fspath(dst))
    parent, base = os.path.split(dst)
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(re.escape(base) + r"\.(tmp|old|lock)-([A-Za-z0-9-]+)")
    tokens = sorted({m.group(2) for m in map(pattern.fullmatch, os.listdir(parent)) if m})
    removed = []
    for token in tokens:
        tmp, old, lock = (os.path.join(parent, f"{base}.{kind}-{token}") for kind in ("tmp", "old", "lock"))
        fd = None
        if time.time() - _newest_mtime([tmp, old, lock]) < stale_after_s:
            continue  # too young to judge; also never probe (and so briefly hold) a live writer's fresh lock
        if os.path.lexists(lock):
            fd = _try_lock(lock, create=False)
            if fd is None:
                continue  # its writer is alive (or just finished and removed its lock)
        try:  # no lock file at all: a writer of an older version, judged by age alone
            if time.time() - _newest_mtime([tmp, old, lock]) < stale_after_s:
                continue  # too young to be sure: locks may not reach across hosts here
            if os.path.isdir(old) and not os.path.lexists(dst):
                os.rename(old, dst)
            remove_tree(tmp)
            remove_tree(old)
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            removed.append(token)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


class _Heartbeat:
    """Refresh `path`'s mtime every HEARTBEAT_S while a write runs, so others see the writer is alive."""

    def __init__(self, path: str):
        self.path, self.stop_event = path, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat {os.path.basename(path)}")

    def _beat(self) -> None:
        while not self.stop_event.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()


class DiskFullError(OSError):
    """ENOSPC, with a message that names the destination (printed without the `[Errno 28]` prefix)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(e: BaseException | None) -> bool:
    """True if `e` or anything in its cause/context chain is ENOSPC (Orbax and TensorStore wrap it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def check_free_space(directory: str, need_bytes: int, what: str) -> None:
    """DiskFullError with the figures before a write of about `need_bytes` that cannot fit."""
    free = shutil.disk_usage(directory).free
    if need_bytes > free:
        raise DiskFullError(f"no space left on device for {what}: it needs about {need_bytes / 2**20:.1f} MiB, "
                            f"{free / 2**20:.1f} MiB are free")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False, need_bytes: int = 0) -> Iterator[str]:
    """Yield an empty temp directory beside `dst` that becomes `dst` when the block succeeds.

    On an exception the temp directory is removed and `dst` is untouched. An existing `dst` is an error
    (FileExistsError) unless `overwrite`, in which case it is swapped out only once the new one is complete.
    `need_bytes`: the size of what will be written, checked against the free space first.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale_writes(dst)
    check_free_space(parent, need_bytes, dst)
    token = writer_token()
    tmp, lock = f"{dst}.tmp-{token}", f"{dst}.lock-{token}"
    fd = None
    for _ in range(50):  # a fresh name: at most a stale-write sweep probes it, for an instant
        fd = _try_lock(lock)
        if fd is not None:
            break
        time.sleep(0.01)
    if fd is None:
        raise OSError(f"cannot create the lock file {lock}")
    published = False
    try:
        with _Heartbeat(lock):
            os.makedirs(tmp)
            yield tmp
            ordinary_permissions(tmp)
            if overwrite and os.path.lexists(dst):
                _swap_in(tmp, dst, token)
            else:
                try:
                    _rename_noreplace(tmp, dst)
                except FileExistsError as e:
                    if not overwrite:
                        raise FileExistsError(f"{dst} was created by someone else while this write ran") from e
                    _swap_in(tmp, dst, token)
            published = True
    finally:
        remove_tree(tmp, settle_s=0.0 if published else 2.0)  # after a swap: the old dst
        remove_tree(f"{dst}.old-{token}")
        with contextlib.suppress(OSError):
            os.remove(lock)
        os.close(fd)
