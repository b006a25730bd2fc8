"""Small file helpers every layer uses: atomic writes, output-path checks and content hashes.

No mpqkit imports at module level (``mpqkit.errors`` is imported inside the checks), and torch is
imported only by the tensor hashes, so any module can use this one without an import cycle.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "check_output_dir", "check_output_file", "current_umask",
    "json_text", "sha256_json", "writer_lock", "state_dict_sha256", "tensor_sha256",
]

_UMASK_LOCK = threading.Lock()


# --------------------------------------------------------------------------- atomic writes
def current_umask() -> int:
    """The process umask: from /proc/self/status on Linux, else set-and-restored under a lock."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # briefly the strictest sensible mask, never a looser one
        os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    """Write via a temp file in the same directory and rename: never a half-written file."""
    atomic_write_bytes(path, text.encode(), durable)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically, with the mode a plain ``open(path, "w")`` would give.

    That is ``0o666 & ~umask`` for a new file and the old mode when ``path`` already is a file
    (``tempfile.mkstemp`` alone would leave every result file at 0600). ``durable``: the data is
    fsync'ed before the rename, so a power cut leaves the old file or the new one, never an empty one
    (off for checksummed cache entries, which are recomputed when torn).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~current_umask()
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                os.fchmod(f.fileno(), mode)
            except OSError:  # a file system without modes (some network/FAT mounts): keep its default
                pass
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a write/fsync failure (e.g. "No space left on device") names no file: name it
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- output-path checks
def _probe_writable(folder: Path) -> str | None:
    """None when a file can be created and removed in ``folder``, else the reason."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".mpqkit-write-check.", suffix=".tmp")
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return None


def _first_non_dir_ancestor(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` that exists as something other than a directory."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _make_dir(folder: Path, what: str, err: type) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise err(f"cannot create the folder {folder} for {what} ({e.strerror or type(e).__name__}): "
                  f"choose another location") from None


def check_output_file(path: str | Path, what: str = "the output file") -> Path:
    """Fail early, with one line naming ``path``, if ``what`` cannot be written at ``path``.

    Refused: an existing directory at ``path``; a parent that exists as a file; a parent folder
    where no file can be created. Missing parent folders are created. Returns ``path`` as a Path.
    """
    from .errors import MpqkitError  # lazy: fileutil is a leaf (no mpqkit or torch import at module level)

    path = Path(path).expanduser()
    if path.is_dir():
        raise MpqkitError(f"{what} {path} is an existing directory: give a file path (e.g. a new file "
                          f"inside it, {path / ('file' + (path.suffix or '.out'))})")
    blocker = _first_non_dir_ancestor(path)
    if blocker is not None:
        raise MpqkitError(f"cannot write {what} {path}: {blocker} is a file, not a folder; choose another path")
    _make_dir(path.parent, what, MpqkitError)
    reason = _probe_writable(path.parent)
    if reason is not None:
        raise MpqkitError(f"cannot write {what} {path}: folder {path.parent} is not writable ({reason}); "
                          f"choose a writable location")
    return path


def check_output_dir(path: str | Path, what: str = "the output folder") -> Path:
    """Fail early, with one line naming ``path``, if ``what`` cannot be written in folder ``path``.

    Refused: ``path`` (or an ancestor) exists as a file; a folder where no file can be created.
    The folder is created if missing. Returns ``path`` as a Path.
    """
    from .errors import MpqkitError  # lazy: fileutil is a leaf (no mpqkit or torch import at module level)

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise MpqkitError(f"{what} {path} is an existing file, not a folder: give a folder path")
    blocker = _first_non_dir_ancestor(path)
    if blocker is not None:
        raise MpqkitError(f"cannot create {what} {path}: {blocker} is a file, not a folder; choose another path")
    _make_dir(path, what, MpqkitError)
    reason = _probe_writable(path)
    if reason is not None:
        raise MpqkitError(f"{what} {path} is not writable ({reason}): choose a writable location")
    return path


# --------------------------------------------------------------------------- hashes
def json_text(obj: Any, what: str, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and ±Infinity (strict JSON readers reject them): a
    non-finite number raises ``MpqkitError`` naming ``what`` and the key path where it sits."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        from .errors import MpqkitError  # lazy: fileutil is a leaf (no mpqkit or torch import at module level)

        raise MpqkitError(f"{what} holds a non-finite number at {_non_finite_path(obj) or '?'}; JSON has no "
                          "NaN or Infinity (was an option or a measurement NaN?)") from None


def _non_finite_path(obj: Any, path: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "(top level)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite_path(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


LOCK_NAME = ".mpqkit.lock"


@contextlib.contextmanager
def writer_lock(folder: Path, what: str, remove_if_empty: bool = False) -> Iterator[None]:
    """Hold ``folder`` for this process while writing it: a second mpqkit run into the same folder
    stops at once with one line naming the holder (two writers would append every row twice).

    The lock is a file ``.mpqkit.lock`` created exclusively, holding the holder's host and pid; a
    lock whose process is gone (a killed run on this host) is stale and taken over with a warning.
    ``remove_if_empty``: the folder was made for this run; if nothing was written into it (the run
    failed first), it is removed again.
    """
    from .errors import MpqkitError  # lazy: fileutil is a leaf (no mpqkit or torch import at module level)

    lock = Path(folder) / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and _alive(holder):
                raise MpqkitError(f"another mpqkit run (pid {holder['pid']} on {holder['host']}) is writing {what} "
                                  f"{folder}: wait for it to finish, or use another --out (if no such run exists, remove {lock})") from None
            logging.getLogger("mpqkit").warning("%s %s: removing the stale lock of a run that is gone (%s)",
                                                what, folder, holder or "unreadable")
            lock.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:  # e.g. no space left: name the file, leave no lock and no folder made for this run
            lock.unlink(missing_ok=True)
            if remove_if_empty:
                with contextlib.suppress(OSError):
                    Path(folder).rmdir()
            raise OSError(e.errno, e.strerror or str(e), str(lock)) from e
        break
    else:
        raise MpqkitError(f"cannot lock {what} {folder}: {lock} keeps reappearing (another run?)")
    try:
        yield
    finally:
        if _lock_holder(lock) == me:
            lock.unlink(missing_ok=True)
        if remove_if_empty:
            with contextlib.suppress(OSError):
                Path(folder).rmdir()  # only succeeds when empty


def _lock_holder(lock: Path) -> dict | None:
    try:
        d = json.loads(lock.read_text())
        return d if isinstance(d, dict) and isinstance(d.get("pid"), int) and isinstance(d.get("host"), str) else None
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """The holder may still run: another host (cannot tell: assume so), or a live pid on this one."""
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensor_sha256(*tensors: "torch.Tensor") -> str:
    """sha256 of the dtype, shape and bytes of each tensor, in order."""
    import torch  # lazy: fileutil is a leaf (no mpqkit or torch import at module level)

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


def state_dict_sha256(model: "nn.Module") -> str:
    """Deterministic hash of the state-dict: key names, dtypes, shapes and tensor bytes, in key order."""
    import torch  # lazy: fileutil is a leaf (no mpqkit or torch import at module level)

    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
