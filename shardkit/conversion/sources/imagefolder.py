"""Image folders: class-per-folder trees (ImageFolder / flow_from_directory) or flat folders.

* If SRC holds at least one visible sub-folder, every visible sub-folder is a class: class
  names are the sorted folder names, labels their indices 0..K-1, and images are found
  recursively inside each class folder. An image lying directly in SRC next to class
  folders has no label: it is reported as a failure (``outside_class_folder``), not dropped.
* Otherwise SRC is a flat folder of images and the dataset has no label field.
* Candidates are files whose extension (any case) is in `IMAGE_EXTENSIONS`; hidden files and
  folders (name starting with ".") are skipped; other files are not inputs.
* Order: folders and files sorted by name at every level, so the list never depends on the
  filesystem. Symbolic links are followed: a folder linked from two places is listed under
  each path (as torchvision's ImageFolder lists it), and a link to a folder above it (a
  loop) is not followed.
* FIFOs, sockets and devices named like images are reported (``not_a_file``), never opened.
* Names below SRC must be valid UTF-8 (the dataset stores them as text): a candidate whose
  path below SRC is not (its own name, or a folder's on the way) is reported (``bad_name``)
  under that path with the bad bytes escaped (``\\xff``); a class folder named so is an
  InputError naming it, raised before anything is written (its name would be a class name).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from shardkit.conversion.images import IMAGE_EXTENSIONS
from shardkit.conversion.report import FailureRecord
from shardkit.conversion.sources.records import InputRecord, RecordSpool, plan_failure
from shardkit.errors import InputError
from shardkit.format.storage import Storage

__all__ = ["InputRecord", "Listing", "list_image_folder"]


@dataclass(slots=True)
class Listing:
    records: RecordSpool
    classes: list[str] | None
    failures: list[FailureRecord] = field(default_factory=list)
    #: CSV inputs: the metadata columns and their types (int64, float64, string, bool).
    meta_types: tuple[tuple[str, str], ...] = ()
    #: What fingerprints the source itself beyond the images (the CSV: path, size, mtime).
    extra_inputs: tuple[tuple[str, int, int], ...] = ()
    #: A Hugging Face source: the column holding the images in its data files.
    image_col: str | None = None
    #: A remote source: the storage its inputs (records' paths are URLs) are read through.
    source: Storage | None = None


def list_image_folder(src: str | os.PathLike[str], *,
                      spill_dir: str | os.PathLike[str] | None = None) -> Listing:
    """List the images under `src` (see the module docstring); past `records.CHUNK` inputs
    the list spills to an unnamed file in `spill_dir` (default: the system's temporary
    folder). Raises InputError."""
    root = Path(src)
    try:
        entries = _sorted_entries(root)
    except FileNotFoundError:
        raise InputError(f"{root}: source folder does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{root}: source is not a folder") from None
    except PermissionError:
        raise InputError(f"{root}: permission denied") from None
    class_dirs = [e for e in entries if _is_dir(e)]
    for entry in class_dirs:
        if not _is_utf8(entry.name):
            raise InputError(f"{_printable(os.fspath(root))}: the class folder "
                             f"'{_printable(entry.name)}' has a name that is not valid UTF-8, so it "
                             "cannot be a class name; rename it")
    listing = Listing(records=RecordSpool(spill_dir),
                      classes=[e.name for e in class_dirs] if class_dirs else None)
    above = frozenset({_dir_id(root)})
    if class_dirs:
        for entry in entries:
            if not _is_dir(entry) and _is_candidate(entry.name):
                listing.failures.append(plan_failure(
                    _printable(entry.name), "outside_class_folder",
                    "image lies directly in SRC next to class folders, so it has no label",
                ))
        for label, entry in enumerate(class_dirs):
            _walk(root, Path(entry.path), label, listing, above)
    else:
        _walk(root, root, None, listing, frozenset())
    if not listing.records and not listing.failures:
        raise InputError(f"{root}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return listing


def _walk(root: Path, folder: Path, label: int | None, listing: Listing,
          above: frozenset[tuple[int, int]]) -> None:
    """List `folder`'s images into `listing`; `above` holds the folders on the way to it
    (one of them again is a symlink loop). A folder seen elsewhere is listed again: a set of
    every folder seen would skip a class folder linked into another class, its images then
    labelled as that class, with nothing reported."""
    ident = _dir_id(folder)
    if ident in above:
        return
    above = above | {ident}
    for entry in _sorted_entries(folder):
        if _is_dir(entry):
            _walk(root, Path(entry.path), label, listing, above)
        elif not _is_candidate(entry.name):
            continue  # not named like an image
        elif not _is_utf8(relative := _relative(root, entry)):
            listing.failures.append(plan_failure(
                _printable(relative), "bad_name",
                "the file name is not valid UTF-8" if not _is_utf8(entry.name)
                else "a folder name in its path is not valid UTF-8",
            ))
        elif _is_special(entry):
            listing.failures.append(plan_failure(
                _relative(root, entry), "not_a_file",
                "a FIFO, socket or device named like an image; it is not read",
            ))
        else:
            listing.records.append(_record(entry, relative, label))


def _relative(root: Path, entry: os.DirEntry[str]) -> str:
    """The entry's path relative to SRC, with "/" separators (its ``source``)."""
    # Strings, not Path objects: pathlib interns every path component it parses, which would
    # keep every file name of a huge tree in memory for the life of the process.
    base = str(root)
    relative = entry.path[len(base):].lstrip(os.sep) if entry.path.startswith(base + os.sep) \
        else os.path.relpath(entry.path, base)
    return relative.replace(os.sep, "/")


def _record(entry: os.DirEntry[str], relative: str, label: int | None) -> InputRecord:
    try:
        st = entry.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # a dangling link or a vanished file: the worker reports it
        size, mtime = -1, 0
    return InputRecord(
        path=os.path.abspath(entry.path),
        source=relative,
        label=label,
        size=size,
        mtime_ns=mtime,
    )


def _sorted_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _is_special(entry: os.DirEntry[str]) -> bool:
    """True for FIFOs, sockets and devices, which opening could block on or misread.
    Dangling links are not special: the worker reports them as missing files."""
    try:
        return not stat.S_ISREG(entry.stat(follow_symlinks=True).st_mode)
    except OSError:
        return False


def _is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python decodes them as lone
    surrogates, which no text encoding takes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """`name` as text, its non-UTF-8 bytes escaped (``b"\\xff.png"`` → ``"\\\\xff.png"``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_candidate(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _dir_id(folder: Path) -> tuple[int, int]:
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{folder}: not a folder")
    return (st.st_dev, st.st_ino)

