"""Files that are never left half-written: every writer in varctl goes through ``atomic_path`` (a folder of
files through ``atomic_dir``).

A run killed while saving leaves the previous file in place (or no file), never a truncated one, so a
checkpoint, a model file or a predicted image is either the old one or the complete new one. The torch files
a user names (checkpoints, model files, weights) are read through ``torch_load``: tensors and plain values
only, and a file that is not one (empty, cut short, a pickle of objects, text) is refused with the reason in
words.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: when the block succeeds it is fsynced and renamed over
    ``path``, when it fails it is deleted, so ``path`` never holds a partial file. Its name,
    ``.<name>.<pid>@<host>.<random>.tmp``, names the writer: a run that starts can tell a killed save's file
    from one that another live process is writing (``temporary_in_use``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_id()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files: give the file the permissions open() would
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # the writer may have closed its own handle: sync through a new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill: when the block succeeds its files are fsynced and it is
    renamed to ``path``, when it fails it is deleted. An existing ``path`` is refused (FileExistsError) unless
    ``overwrite``: then it is renamed aside, the new folder renamed in and the old one deleted, so ``path``
    holds the old folder or the complete new one (for a moment between the two renames, nothing)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders: give it the permissions mkdir would
    try:
        yield tmp
        publish_dir(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Move the filled folder ``tmp`` to ``path`` (beside it): its files are fsynced, then it is renamed in.
    An existing ``path`` is refused (FileExistsError) unless ``overwrite``: then it is renamed aside, ``tmp``
    renamed in and the old one deleted."""
    tmp, path = Path(tmp), Path(path)
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    if path.exists() and not overwrite:  # made by someone else meanwhile
        raise FileExistsError(f"{path} exists; pass overwrite to replace it")
    old = path.with_name(f"{tmp.name}.old") if path.exists() else None
    if old is not None:
        os.replace(path, old)  # a folder cannot be renamed over a non-empty one
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)
    return path


class UnreadableFile(ValueError):
    """A file ``torch_load`` cannot read: ``reason`` says why, in words (the message adds the path)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.path, self.reason = path, reason


def torch_load(path: str | os.PathLike, what: str = "file", map_location: Any = "cpu", mmap: bool = False):
    """``torch.load(path, weights_only=True)``: tensors and plain values only, so a pickle that would run code
    is never run. A path that is not a readable torch file of ``what`` (a "checkpoint", a "model file")
    raises ``UnreadableFile`` saying why: a directory, empty, an archive cut short, a pickle of objects, or
    neither an archive nor a pickle (torch's own messages for these are a KeyError of a byte value, or advice
    to switch ``weights_only`` off); a missing file raises ``FileNotFoundError``."""
    path = Path(path)
    if path.is_dir():
        raise UnreadableFile(path, f"is a directory, expected a {what}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise UnreadableFile(path, "is empty (0 bytes): the save or copy that wrote it was interrupted")
    try:
        with warnings.catch_warnings():  # torch's advice on a pickle's protocol: the refusal says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        with open(path, "rb") as f:
            head = f.read(2)
        text = str(e)
        if head == b"PK":  # a torch.save archive (zip)
            first = text.split(". ")[0].strip()[:160] or type(e).__name__
            raise UnreadableFile(path, f"is damaged or not a {what} (a torch archive cut short or corrupted: "
                                       f"{first})") from None  # fmt: skip
        if head[:1] == b"\x80" and "Weights only load failed" in text:  # a bare pickle (PROTO opcode)
            raise UnreadableFile(path, "is a pickle of objects other than tensors and plain values, refused "
                                       "unread (loading it could run code)") from None  # fmt: skip
        if head[:1] == b"\x80":
            raise UnreadableFile(path, f"is damaged or not a {what} (an unreadable pickle: "
                                       f"{type(e).__name__} {text[:120]})") from None  # fmt: skip
        raise UnreadableFile(path, f"is damaged or not a {what} (neither a torch.save archive nor a "
                                   "pickle)") from None  # fmt: skip


def writer_id() -> str:
    """``<pid>@<host>``: the process that writes a temporary file (the host stripped to [A-Za-z0-9.-])."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9.-]', '-', socket.gethostname())}"


def writer_running(writer: str) -> bool:
    """Whether the process ``<pid>@<host>`` (``writer_id``) runs: False on another host or for a bad name."""
    pid, _, host = writer.partition("@")
    if host != writer_id().partition("@")[2] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def temporary_in_use(path: str | os.PathLike, idle_s: float = 600.0) -> bool:
    """Whether the temporary file ``path`` (of ``atomic_path``) may still be written: its writer, on this
    host, is alive; or, written on another host (or by a varctl that did not name writers), it changed in
    the last ``idle_s`` seconds (a save in progress keeps writing)."""
    path = Path(path)
    m = re.search(r"\.(\d+@[A-Za-z0-9.-]+)\.[^.]+\.tmp$", path.name)
    if m and m[1].split("@", 1)[1] == writer_id().split("@", 1)[1]:
        return writer_running(m[1])
    try:
        return path.stat().st_mtime > time.time() - idle_s
    except FileNotFoundError:
        return False


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask
