"""Atomic, durable writes: every file fastunet produces appears complete or not at all.

    with atomic_write("out/x_mask.png") as f:        # a binary file object
        Image.fromarray(mask).save(f, format="PNG")
    atomic_copy("work/iter_8.pth", "work/latest.pth")  # its own file, not a hard link
    with atomic_directory("data/DRIVE") as tmp:      # a folder built beside, then renamed
        ...
    remove_stale_temp_files(folder)                  # what killed writers left behind

Each write goes to a temporary name in the target's folder, ``.NAME.<pid>.<8 hex>.tmp``, created
like any new file (mode 0666 minus the umask), then is flushed, fsynced, renamed over the target
and the folder is fsynced, so that the rename survives a power cut. Whatever goes wrong, the
temporary file is removed and the previous target is untouched; when the disk (or the quota) is
full the error is a :class:`DiskFullError` naming the target. The writer's pid in the name lets a
later run delete exactly the temporary files and folders of writers that were killed (SIGKILL,
power loss) and not those of writers still running: :func:`remove_stale_temp_files`.
"""
import contextlib
import errno
import os
import re
import secrets
import shutil

__all__ = ["atomic_write", "atomic_path", "atomic_copy", "atomic_directory", "remove_stale_temp_files",
           "temp_path", "fsync_folder", "raise_if_disk_full", "DiskFullError"]

_TEMP_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")
_FULL = {errno.ENOSPC: "disk full (no space left on device)",
         errno.EDQUOT: "disk full (disk quota exceeded)"}
# below this much free space a failed write is taken for a full disk even when the library that
# wrote (torch's zip writer, Pillow's encoder) replaced the OSError by its own message
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(OSError):
    """A write failed because the disk or the quota is full; ``filename`` is the target."""

    def __init__(self, path, code=errno.ENOSPC):
        super().__init__(code, _FULL.get(code, _FULL[errno.ENOSPC]), os.fspath(path))

    def __str__(self):
        return f"{self.filename}: {self.strerror}"


def raise_if_disk_full(exc, path):
    """Raise DiskFullError naming ``path`` when ``exc`` says the disk or quota is full (for
    writes that cannot be atomic, such as appending a log line)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        raise DiskFullError(path, exc.errno) from exc


def temp_path(path):
    """A fresh temporary name beside ``path`` (the one scheme :func:`remove_stale_temp_files`
    knows)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


class _File:
    """The writer's file object; remembers an OSError that the calling library may re-raise as
    something else (torch.save reports a failed write as 'unexpected pos')."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _full_code(exc, folder):
    """errno.ENOSPC/EDQUOT when ``exc`` (or its cause) says the disk is full, or when a write
    failed on a disk with (almost) no space left; else None."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, (OSError, RuntimeError)):
        try:
            st = os.statvfs(folder)
        except (OSError, AttributeError):
            return None
        if min(st.f_bavail, st.f_bfree) * st.f_frsize < _NEARLY_FULL_BYTES:
            return errno.ENOSPC
    return None


def fsync_folder(folder):
    """Make renames in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None):
    """Open a temporary file beside ``path`` for writing ('wb' or 'w'); when the block ends
    without an error it replaces ``path`` (flushed, fsynced, renamed, folder fsynced)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    # os.open with 0o666 honours the umask (tempfile.mkstemp would leave the file 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    f = _File(os.fdopen(fd, mode, encoding=encoding if mode == "w" else None))
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        os.replace(tmp, path)
    except BaseException as exc:
        _discard(tmp, path, folder, exc, f.error)
        raise
    fsync_folder(folder)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside ``path`` for writers that take a file name (ONNX,
    TorchScript); when the block ends without an error the file there replaces ``path``
    (fsynced, renamed, folder fsynced). The writer must create the file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        _discard(tmp, path, folder, exc)
        raise
    fsync_folder(folder)


def _discard(tmp, path, folder, exc, write_error=None):
    """Remove a failed write's temporary file; a full disk becomes a DiskFullError."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    code = None if isinstance(exc, DiskFullError) else (
        write_error.errno if write_error is not None and write_error.errno in _FULL
        else _full_code(exc, folder))
    if code is not None:
        raise DiskFullError(path, code) from exc


def atomic_copy(src, dst):
    """Copy ``src`` to ``dst`` atomically: a file of its own (a hard link would share any later
    damage), complete or absent."""
    with open(src, "rb") as fin, atomic_write(dst) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return dst


@contextlib.contextmanager
def atomic_directory(path, replace=False):
    """Yield a temporary folder beside ``path``; when the block ends without an error it is
    renamed to ``path``. An existing ``path`` (empty, or any with ``replace``) is replaced only
    then: moved aside under a temporary name, the new folder renamed in, the old one deleted."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    tmp = temp_path(path)
    os.mkdir(tmp, 0o777)  # the umask applies, as to any new folder
    try:
        yield tmp
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        old = None
        if os.path.exists(path):
            if not replace:
                raise FileExistsError(errno.EEXIST, "exists and is not empty", path)
            old = temp_path(path)
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)  # put the previous folder back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_folder(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_files(folder, recursive=True):
    """Delete the temporary files and folders (``.NAME.<pid>.<hex>.tmp``) in ``folder`` whose
    writer no longer runs on this machine: what a killed writer left. Returns their paths;
    those of running writers, and everything else, are left alone."""
    from .runtime import pid_alive

    removed = []
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            m = _TEMP_NAME.fullmatch(name)
            if not m or pid_alive(int(m.group(1))):
                continue
            p = os.path.join(root, name)
            try:
                if name in dirs:
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
                removed.append(p)
            except OSError:
                pass
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in removed] if recursive else []
    return removed
