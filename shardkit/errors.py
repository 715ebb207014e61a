"""The shardkit error tree and the command line's exit codes.

::

    ShardkitError                         exit 1  anything shardkit raises on purpose
    ├── ConfigError (ValueError)          exit 2  bad option or option combination
    ├── InputError (ValueError)           exit 3  SRC missing, unreadable or holding no inputs
    ├── OutputExistsError (FileExistsError) exit 4  OUT is not empty and --overwrite was not given
    ├── TooManyFailuresError              exit 5  more inputs failed than --max-errors allows
    │                                             (everything else was still written)
    ├── DatasetError (ValueError)         exit 6  not a shardkit dataset, or index.json invalid
    │   └── CorruptShardError             exit 6  a shard disagrees with index.json
    ├── UnsafeContentError (ValueError)   exit 6  a shard holds links, unsafe names or unknown fields
    ├── WorkerError                       exit 7  a conversion task crashed (not a bad input: a bug,
    │                                             a killed worker, a full disk)
    ├── MissingExtraError (ImportError)   exit 8  an optional dependency is not installed
    └── RemoteError                       exit 9  object storage / HTTP failed past the retry
                                                  budget (names the URL and the last cause)

    KeyboardInterrupt / SIGTERM           exit 130 nothing half-written is published

Per-input failures (a truncated JPEG, a missing file) are *not* exceptions: they are
:class:`shardkit.conversion.images.ImageFailure` exceptions inside a task, turned into
:class:`shardkit.conversion.report.FailureRecord` records, written to ``errors.jsonl`` and counted.
"""

from __future__ import annotations

__all__ = [
    "EXIT_INTERRUPTED",
    "ConfigError",
    "CorruptShardError",
    "DatasetError",
    "InputError",
    "MissingExtraError",
    "OutputExistsError",
    "RemoteError",
    "ShardkitError",
    "TooManyFailuresError",
    "UnsafeContentError",
    "WorkerError",
]

EXIT_INTERRUPTED = 130


class ShardkitError(Exception):
    """Base class of every error shardkit raises on purpose."""

    exit_code = 1


class ConfigError(ShardkitError, ValueError):
    """An option is invalid, or two options contradict each other."""

    exit_code = 2


class InputError(ShardkitError, ValueError):
    """The source is missing, unreadable or holds nothing to convert."""

    exit_code = 3


class OutputExistsError(ShardkitError, FileExistsError):
    """The output directory is not empty and overwriting was not asked for."""

    exit_code = 4


class TooManyFailuresError(ShardkitError):
    """More inputs failed than the error budget allows; the rest was written.

    ``summary`` carries the run's summary (a ConvertSummary) for the caller to print.
    """

    exit_code = 5

    def __init__(self, message: str, *, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class DatasetError(ShardkitError, ValueError):
    """A directory is not a valid shardkit dataset."""

    exit_code = 6


class CorruptShardError(DatasetError):
    """A shard's size, hash, sample count or content disagrees with index.json."""


class UnsafeContentError(ShardkitError, ValueError):
    """A shard holds something a reader must refuse (links, unsafe names, unknown fields)."""

    exit_code = 6


class WorkerError(ShardkitError):
    """A conversion task failed as a whole (not one bad input)."""

    exit_code = 7


class MissingExtraError(ShardkitError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""

    exit_code = 8


class RemoteError(ShardkitError):
    """A request to object storage or an HTTP server kept failing (connection errors, timeouts,
    429/5xx answers) past the retry budget, or failed in a way no retry mends (403, a bucket
    that does not exist). The message names the URL and the last cause."""

    exit_code = 9


def require(module: str, extra: str) -> object:
    """Import an optional module, or raise MissingExtraError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and exc.name in (top, module):
            raise MissingExtraError(
                f"{module} is not installed; install it with: pip install 'shardkit[{extra}]'"
            ) from exc
        # installed, and broken (a library it loads, a version clash): say what broke
        raise MissingExtraError(
            f"{module} is installed but does not import ({type(exc).__name__}: {exc}); "
            f"reinstall it, e.g. pip install --force-reinstall 'shardkit[{extra}]'"
        ) from exc
