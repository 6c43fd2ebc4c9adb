"""Files written as one unit, and the cache folder: the only place lorabook writes files from.

A crash or an error half-way never leaves a half-written file (or a folder with new and old files mixed) under
the final name:

    write_file(path, write)       ``write(tmp)`` into a temp file beside ``path``, then ``os.replace`` it over path
    write_text(path, text)        the same for a str
    write_folder(folder, files)   every file into a sibling temp folder, then the folder swapped in at once
    build_folder(folder, build)   the same for a folder that ``build(tmp_folder)`` fills (save_pretrained, ...)

``write_folder`` keeps the files (and subfolders) of an existing folder that it does not rewrite (a README beside
an adapter), so it behaves like writing the files one by one, except that a failure at any point leaves the old
folder as it was. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call; elsewhere it is two renames, and a
crash between them leaves the old folder under a ``.name.old-*`` sibling.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

__all__ = ["cache_dir", "write_file", "write_text", "write_folder", "build_folder"]


def cache_dir() -> Path:
    """Where lorabook keeps what it builds once per machine (the converted model, the compiled kernel):
    ``$LORABOOK_CACHE``, else ``~/.cache/lorabook`` (never inside the git checkout)."""
    return Path(os.environ.get("LORABOOK_CACHE") or Path.home() / ".cache" / "lorabook")


def write_file(path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, then rename it over ``path`` in one step."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path, text: str) -> Path:
    """``text`` (UTF-8) into ``path``, atomically."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder(folder, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write ``files`` ({name: write(tmp_path)}) into ``folder`` as one unit; returns the folder.

    The old folder's other files are kept (hard-linked or copied into the new one). If anything fails,
    ``folder`` is as it was and no temp folder is left behind."""
    def build(tmp: Path) -> None:
        for name, write in files.items():
            write(tmp / name)
    return build_folder(folder, build, keep=lambda name: name not in files)


def build_folder(folder, build: Callable[[Path], None], keep: Callable[[str], bool] = lambda name: False) -> Path:
    """``build(tmp)`` fills a temp folder beside ``folder``, which then replaces ``folder`` at once.

    keep: which files and subfolders of an existing ``folder`` to carry over (by name) before ``build`` runs."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        if folder.is_dir():
            for old in folder.iterdir():
                if keep(old.name) and old.is_dir():  # a subfolder (a README's images) comes along whole
                    shutil.copytree(old, tmp / old.name, copy_function=_link_or_copy)
                elif keep(old.name) and old.is_file():
                    _link_or_copy(old, tmp / old.name)
        build(tmp)
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_RENAME_EXCHANGE = 2  # linux/fs.h


@lru_cache(maxsize=None)
def _renameat2():
    """libc's renameat2 (Linux), looked up once; None where the system has none."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # the process's own libc


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux's renameat2); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(new: Path, folder: Path) -> None:
    """Put ``new`` at ``folder``; the old folder (if any) ends up at ``new`` (the caller removes it)."""
    if not folder.exists():
        os.rename(new, folder)
        new.mkdir()  # so the caller's cleanup finds a folder, as after an exchange
        return
    if _exchange(new, folder):
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.rmdir(old)
    os.rename(folder, old)
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(new, ignore_errors=True)
    os.rename(old, new)
