"""Helpers the config modules share: validation of choices and counts, the usable CPUs."""

from __future__ import annotations

import operator
import os
from typing import SupportsIndex

import numpy as np

from shardkit.errors import ConfigError

__all__ = ["as_integer", "check_choice", "check_count", "check_local_file", "usable_cpus"]


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def as_integer(value: object) -> int | None:
    """`value` as a Python int when it is an integer (a numpy integer too), else None (a
    bool, a float, a string, a type that says it is an integer and is not): the one test
    of "an integer" that every option and argument goes through."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, SupportsIndex):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_count(name: str, value: object, low: int) -> int:
    """`value` as an int >= `low` (numpy integers taken); ConfigError naming `name` for
    anything else."""
    number = as_integer(value)
    if number is None or number < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    return number


def check_local_file(name: str, path: str | os.PathLike[str]) -> str:
    """`path` as a local file to write: ConfigError naming `name` for a URL, a folder, or a
    place whose folder does not exist (before any work is done)."""
    text = os.fspath(path)
    if "://" in text:
        raise ConfigError(f"{name} {text}: writes a local file, not a URL")
    if os.path.isdir(text):
        raise ConfigError(f"{name} {text}: is a folder; name the file to write")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise ConfigError(f"{name} {text}: the folder {folder} does not exist")
    return text


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
