"""Local files, defensively: regular files only, bounded reads, a walk that survives bad entries.

A collection folder is input from someone else. Whatever sits in it must fail only itself:

* **Regular files only.** A named pipe (FIFO) called ``x.png`` blocks the first ``open()`` until a
  writer appears; a link to ``/dev/zero`` reads until memory runs out; a socket cannot be read at
  all. :func:`open_regular` opens without blocking (``O_NONBLOCK``: a FIFO open returns at once),
  checks the opened descriptor with ``fstat`` — the object actually opened, not a name that could
  change in between — and refuses anything that is not a regular file with :class:`NotARegularFile`.
* **Bounded reads.** :func:`read_regular` reads at most ``max_bytes`` (refusing a larger file
  from its size, before reading it) — :class:`TooLarge`.
* **A walk that reports instead of raising.** :func:`walk` lists a folder recursively (following
  links to folders, like ``os.walk(followlinks=True)``) but never visits a folder twice: a link
  back to a parent is reported as a directory loop, not followed forever. A dangling link, a link
  loop, an unreadable folder, a non-regular file or a name that is not UTF-8 becomes a :class:`WalkEntry` with ``error`` set
  — a named reason — and the walk goes on.

Reasons say what an entry *is not*; they never quote what a file contains.
This module imports no Ray.
"""
from __future__ import annotations

import errno
import os
import stat as stat_mod
from dataclasses import dataclass
from typing import Iterator


class BadEntry(OSError):
    """An entry that cannot be used as a file: the message is its named reason (see the ``*_reason`` helpers)."""


class NotARegularFile(BadEntry):
    """A path that names a FIFO, a device, a socket or a folder where a file was expected."""


class TooLarge(OSError):
    """A file above the size bound of what is being read (refused before it is read)."""


def kind_of(mode: int) -> str:
    """What a file mode names, in words (for reasons)."""
    for test, name in ((stat_mod.S_ISFIFO, "a named pipe (FIFO)"), (stat_mod.S_ISCHR, "a character device"),
                       (stat_mod.S_ISBLK, "a block device"), (stat_mod.S_ISSOCK, "a socket"),
                       (stat_mod.S_ISDIR, "a folder"), (stat_mod.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def not_regular_reason(path: str, mode: int) -> str:
    return (f"not_a_regular_file: {path} is {kind_of(mode)}, not a regular file — only regular files are read; "
            "remove it from the collection")


def stat_error_reason(path: str, exc: OSError) -> str:
    """The named reason for an entry whose ``stat`` failed (after ``lstat`` found it)."""
    if exc.errno == errno.ELOOP:
        return f"symlink_loop: {path} is a symbolic link that resolves to itself — remove or fix the link"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"dangling_symlink: {path} is a symbolic link to something that does not exist — remove or fix the link"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"access_denied: {path} cannot be read by this process — grant read permission or remove it"
    return f"unreadable: {path}: {os.strerror(exc.errno) if exc.errno else type(exc).__name__}"


def open_regular(path: str):
    """A binary file object for ``path`` if it is a regular file (see the module docstring).

    Raises:
        FileNotFoundError, PermissionError: as ``open``.
        NotARegularFile: a FIFO, device, socket or folder — never blocked on, never read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise NotARegularFile(not_regular_reason(path, stat_mod.S_IFDIR)) from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO opened write-side elsewhere
            raise NotARegularFile(not_regular_reason(path, os.stat(path).st_mode)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat_mod.S_ISREG(mode):
            raise NotARegularFile(not_regular_reason(path, mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def too_large_reason(path: str, size: int, max_bytes: int, what: str = "file") -> str:
    return (f"too_large: {path} has {size:,} bytes, above the {what} limit of {max_bytes:,} bytes — "
            "downscale or re-encode it (or raise the limit)")


def read_regular(path: str, max_bytes: int | None = None, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (:class:`TooLarge` otherwise)."""
    with open_regular(path) as f:
        if max_bytes is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise TooLarge(too_large_reason(path, size, max_bytes, what))
        data = f.read(max_bytes + 1)  # a file that grew since fstat is still bounded
        if len(data) > max_bytes:
            raise TooLarge(too_large_reason(path, len(data), max_bytes, what))
        return data


def is_utf8(path: str) -> bool:
    """False for a name with bytes that are not UTF-8 (Python holds them as lone surrogates)."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(path: str) -> str:
    """A name with its non-UTF-8 bytes written as ``\\xNN`` escapes (storable, shown, never opened)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class WalkEntry:
    """One entry of :func:`walk`: a regular file (``size``, ``version`` = mtime_ns) or, with
    ``error`` set, an entry that cannot be used and why (``size`` -1)."""

    path: str
    size: int
    version: str
    error: str | None = None


def stat_entry(path: str) -> WalkEntry:
    """One path as a :class:`WalkEntry` (following links); never raises for a bad entry.

    ``FileNotFoundError`` is raised only when nothing exists at ``path`` at all (not even a link)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path} does not exist") from None
        return WalkEntry(path, -1, "", stat_error_reason(path, exc))
    if not stat_mod.S_ISREG(st.st_mode):
        return WalkEntry(path, -1, "", not_regular_reason(path, st.st_mode))
    return WalkEntry(path, st.st_size, str(st.st_mtime_ns))


def walk(root: str) -> Iterator[WalkEntry]:
    """Every entry under the folder ``root``, recursively, sorted by path; hidden names skipped.

    Links to folders are followed once: a folder already on the walk (by device and inode) is a
    ``directory_loop`` entry. Folders are yielded only as errors; files always (regular ones with
    their size, the rest with their reason).
    """
    out: list[WalkEntry] = []
    seen: set[tuple[int, int]] = set()
    st = os.stat(root)
    stack = [(root, (st.st_dev, st.st_ino))]
    seen.add(stack[0][1])
    while stack:
        folder, _ = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            out.append(WalkEntry(folder, -1, "", f"unreadable_folder: {folder} cannot be listed "
                                                 f"({os.strerror(exc.errno) if exc.errno else type(exc).__name__})"))
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            path = child.path
            if not is_utf8(path):  # the name could not be stored (Parquet and JSON hold UTF-8) nor shown
                shown_path = printable(path)
                out.append(WalkEntry(shown_path, -1, "", f"undecodable_name: {shown_path} has a name that is not valid "
                                                         "UTF-8 — rename it"))
                continue
            try:
                cst = os.stat(path)  # follows links
            except OSError as exc:
                out.append(WalkEntry(path, -1, "", stat_error_reason(path, exc)))
                continue
            if stat_mod.S_ISDIR(cst.st_mode):
                key = (cst.st_dev, cst.st_ino)
                if key in seen:
                    out.append(WalkEntry(path, -1, "", f"directory_loop: {path} leads to a folder already listed "
                                                       "(a parent, or another link to it) — remove the link"))
                    continue
                seen.add(key)
                stack.append((path, key))
            elif stat_mod.S_ISREG(cst.st_mode):
                out.append(WalkEntry(path, cst.st_size, str(cst.st_mtime_ns)))
            else:
                out.append(WalkEntry(path, -1, "", not_regular_reason(path, cst.st_mode)))
    out.sort(key=lambda e: e.path)
    return iter(out)
