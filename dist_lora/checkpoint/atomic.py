"""Directories and file sets that appear whole or not at all.

* :func:`atomic_directory`: a directory written into a temporary sibling, fsynced and renamed
  into place (the previous one is renamed aside first; :func:`recover` undoes a crash between).
* :func:`atomic_files`: a few files that replace their namesakes in a directory *shared with
  other entries* (PEFT keeps the default adapter's two files beside the other adapters'
  sub-folders): the new files are written into a temporary folder inside the directory; a
  journal folder records which old files exist, the old files move into it, the new ones move
  in, and deleting the journal's list is the commit point. :func:`recover_files` rolls an
  interrupted replacement back to the old files; nothing else in the directory is touched.
"""

from __future__ import annotations

import contextlib
import json
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


_JOURNAL = "replaced.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_files(directory: str | Path, names: tuple[str, ...], label: str) -> None:
    """Undo a :func:`publish_files` of ``names`` that a crash interrupted before its commit
    point (the old files come back, new ones are removed); clear journals of completed ones.
    Several processes may recover the same directory at once (every rank reading an adapter):
    each step is skipped where another process already did it."""
    directory = Path(directory)
    for journal in sorted(directory.glob(f".{label}.old-*")):
        try:
            old = set(json.loads((journal / _JOURNAL).read_text()))
        except FileNotFoundError:  # committed, or recovered by another process
            old = None
        if old is not None:  # not committed: roll back
            for name in names:
                with contextlib.suppress(FileNotFoundError):  # another process got there first
                    if name in old:
                        os.replace(journal / name, directory / name)  # put the old one back over the new
                    else:
                        (directory / name).unlink()  # a new file without an old one
            _fsync_dir(directory)
        shutil.rmtree(journal, ignore_errors=True)


def publish_files(tmp: Path, directory: Path, names: tuple[str, ...], label: str) -> None:
    """Move the complete files ``names`` of ``tmp`` into ``directory``, replacing old ones as a
    set (see the module docstring); other entries of ``directory`` stay as they are."""
    fsync_tree(tmp)
    journal = directory / f".{label}.old-{uuid.uuid4().hex[:8]}"
    journal.mkdir()
    old = [n for n in names if (directory / n).exists()]
    staged = journal / f"{_JOURNAL}.tmp"
    staged.write_text(json.dumps(old))
    fsync_tree(journal)
    staged.rename(journal / _JOURNAL)
    _fsync_dir(journal)
    for name in old:
        (directory / name).rename(journal / name)
    for name in names:
        (tmp / name).rename(directory / name)
    _fsync_dir(directory)
    (journal / _JOURNAL).unlink()  # the commit point
    _fsync_dir(journal)
    shutil.rmtree(journal)


@contextlib.contextmanager
def atomic_files(directory: str | Path, names: tuple[str, ...], overwrite: bool = False,
                 label: str = "files") -> Iterator[Path]:
    """Single-process: yield a temporary folder; if the block succeeds, the files ``names`` it
    wrote replace those of ``directory`` together. Other entries of ``directory`` are kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover_files(directory, names, label)
    present = [n for n in names if (directory / n).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{directory / present[0]} exists; pass overwrite=True (--overwrite) to replace it "
                              f"(only {', '.join(names)} are replaced; other entries of {directory} are kept)")
    tmp = directory / f".{label}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        missing = [n for n in names if not (tmp / n).is_file()]
        if missing:
            raise RuntimeError(f"atomic_files: the block did not write {missing}")
        try:
            publish_files(tmp, directory, names, label)
        except BaseException:
            recover_files(directory, names, label)  # an error half-way: the old files come back now
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
