"""The file and directory settings of a recipe: made absolute when it is read, checked before any rank starts.

A relative path written in a recipe file is relative to that file's directory (so a recipe means
the same files whatever the working directory of each rank, and a job started from another
directory, or by ``sbatch`` on another node, finds them); a relative path given on the command
line (``output.dir=runs/x``) or left at its default is relative to the working directory, as shell
arguments are. :func:`check` then refuses, on every rank and before any process group starts, an
input that does not exist and an output that cannot be created, naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path

INPUT_FILES = ("model.demo_config", "data.path", "data.eval_path", "deepspeed.config")
INPUT_DIRS = ("model.hf_dir",)
OUTPUT_DIRS = ("output.dir", "checkpoint.dir", "data.cache_dir")
KEYS = INPUT_FILES + INPUT_DIRS + OUTPUT_DIRS


def _get(config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _set(config, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)


def in_file(data: dict, key: str) -> bool:
    section, name = key.split(".")
    return isinstance(data.get(section), dict) and name in data[section]


def resolve(config, written_in_file: set[str], recipe_dir: Path, cwd: Path | None = None) -> None:
    """Make every path setting of ``config`` (its own, freshly built) absolute, in place: keys in
    ``written_in_file`` against ``recipe_dir``, the others against ``cwd`` (the working directory)."""
    cwd = cwd or Path.cwd()
    for key in KEYS:
        value = _get(config, key)
        if value is None:
            continue
        path = Path(os.path.expanduser(value))
        base = recipe_dir if key in written_in_file else cwd
        _set(config, key, str(path if path.is_absolute() else (base / path).resolve()))


def check(config) -> None:
    """``ValueError`` naming the first path setting whose input is missing or whose output cannot be created."""
    for key in INPUT_FILES + INPUT_DIRS:
        value = _get(config, key)
        if value is None:
            continue
        wanted_dir = key in INPUT_DIRS
        if not (Path(value).is_dir() if wanted_dir else Path(value).is_file()):
            kind = "directory" if wanted_dir else "file"
            raise ValueError(f"{key}={value}: no such {kind} (a relative path in the recipe is relative to the "
                             f"recipe's directory, one on the command line to the working directory)")
    for key in OUTPUT_DIRS:
        if _get(config, key) is None:  # optional (data.cache_dir: beside the data)
            continue
        path = Path(_get(config, key))
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{key}={path}: {existing} exists and is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{key}={path}: {existing} is not writable by this user")
