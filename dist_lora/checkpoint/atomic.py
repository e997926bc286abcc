"""Directories that appear whole or not at all: write into a temporary sibling, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def fsync_tree(path: Path) -> None:
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")


def temporary_sibling(path: Path) -> Path:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def recover(path: Path) -> None:
    """After a crash between the two renames of ``publish`` the previous directory sits at
    ``.<name>.old-*``: put it back. (Temporary ``.tmp-*`` siblings are incomplete: ignored.)"""
    path = Path(path)
    if path.exists():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if len(olds) == 1:
        try:
            olds[0].rename(path)
        except FileNotFoundError:  # another rank put it back first
            pass


def publish(tmp: Path, path: Path) -> None:
    """Make ``tmp`` (complete, fsynced) the directory ``path``; an old ``path`` is replaced.

    The old directory is renamed aside before ``tmp`` takes its name; a crash in between leaves
    it complete under ``.<name>.old-*``, where ``recover`` finds it."""
    fsync_tree(tmp)
    if path.exists():
        # ``path`` is complete, so any ``.old-*`` sibling is the remains of an interrupted
        # clean-up; clear them so a crash below leaves exactly one for ``recover``.
        for stale in path.parent.glob(f".{path.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    parent = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Single-process: yield a temporary directory that becomes ``path`` if the block succeeds."""
    path = Path(path)
    check_target(path, overwrite)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
