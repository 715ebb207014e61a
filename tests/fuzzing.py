"""Damage fuzzing of whole datasets (tests/test_damage_fuzz.py runs it; see its docstring for
what is checked): the datasets, the seeded damage, the reads and what they must give, and the
subprocesses that run the cases.

``python tests/fuzzing.py campaign [SCALE [KIND,...]]`` runs a longer campaign (SCALE times
the cases, over `EXTRA_KINDS` too) and prints its findings; ``python tests/fuzzing.py worker
KIND DATASET CASES.json`` runs cases in this process, one JSON line per case.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

#: Cases per file, per kind of damage: index.json gets more (its JSON edits too).
SHARD_CASES = 8
INDEX_CASES = 14
INDEX_EDITS = 22
ERRORS_CASES = 3
BATCH = 4
#: Seconds a kind's subprocess may take for all its cases (a hang fails the test).
TIMEOUT = 240

Case = dict[str, Any]


# --- the datasets ------------------------------------------------------------------------


#: kind -> (source, convert options). Sources: "tree" (3 class folders, 3 bad files), "table"
#: (a tabular CSV, 1 bad row). `make test` runs these; `EXTRA_KINDS` are for longer campaigns
#: (``python tests/test_damage_fuzz.py campaign``).
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "tar-raw": ("tree", {}),
    "tar-jpeg": ("tree", {"codec": "jpeg"}),
    "parquet-raw": ("tree", {"format": "parquet"}),
    "parquet-jpeg": ("tree", {"format": "parquet", "codec": "jpeg"}),
    "parquet-zstd": ("tree", {"format": "parquet", "compression": "zstd"}),
    "parquet-array3d": ("tree", {"format": "parquet", "pixels": "array3d"}),
    "table": ("table", {"label_col": "y"}),
}
EXTRA_KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "tar-png": ("tree", {"codec": "png"}),
    "tar-varying": ("tree", {"resize": "shorter-side", "size": 12}),
    "parquet-varying": ("tree", {"format": "parquet", "resize": "shorter-side", "size": 12}),
    "tar-flat": ("flat", {}),
    "tar-csv": ("images.csv", {"image_col": "path", "label_col": "dx,dy"}),
    "parquet-csv": ("images.csv", {"format": "parquet", "image_col": "path", "label_col": "n"}),
    "table-regression": ("table", {"label_col": "a,b"}),
}


def build_datasets(root: Path, kinds: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Path]:
    """One small dataset of each of `kinds` in `root` (shards of 4 images or 6 rows)."""
    from corpus import add_bad_files, image_tree, small_tree

    import shardkit

    sources = {"tree": small_tree(root / "src", 3), "flat": root / "flat", "table": root / "table.csv",
               "images.csv": root / "images.csv"}
    add_bad_files(root / "src" / "b")  # errors.jsonl holds three lines
    image_tree(root / "flat", classes=(), per_class=7, min_side=20, max_side=40)
    sources["table"].write_text("a,b,c,y\n" + "".join(
        f"{i},{i / 4},{'xyz'[i % 3]},{'pqr'[i % 3]}\n" for i in range(17)) + "oops,1,x,p\n")
    images = sorted((root / "flat").iterdir())
    sources["images.csv"].write_text("path,dx,dy,note,n\n" + "".join(
        f"flat/{p.name},{i / 10},{i / 5},w{i},{i % 3}\n" for i, p in enumerate(images)))
    out = {}
    for kind, (source, options) in kinds.items():
        out[kind] = root / kind
        rows = source == "table"
        shape = {} if rows or "size" in options else {"size": (12, 10)}
        shardkit.convert(sources[source], out[kind], workers=0, max_errors=3,  # type: ignore[arg-type]
                         samples_per_shard=6 if rows else 4, **shape, **options)
    return out


# --- the damage --------------------------------------------------------------------------


def plan_cases(dataset: Path, kind: str, scale: int = 1) -> list[Case]:
    """The seeded cases for one dataset: (file, damage, seed), `scale` times a bounded number
    per file."""
    cases: list[Case] = []
    for path in sorted(dataset.iterdir()):
        count = {"index.json": INDEX_CASES, "errors.jsonl": ERRORS_CASES}.get(path.name, SHARD_CASES)
        for n in range(count * scale):
            damage = ("flip", "truncate", "zeros", "append")[n % 4]
            cases.append({"file": path.name, "damage": damage, "seed": f"{kind}:{path.name}:{n}"})
        if path.name == "index.json":
            cases += [{"file": path.name, "damage": "edit", "seed": f"{kind}:edit:{n}"}
                      for n in range(INDEX_EDITS * scale)]
    return cases


def _spot(rng: random.Random, size: int) -> int:
    """A byte position: anywhere, or where the structure is (tar headers at 512-byte
    boundaries, the Parquet footer and the page headers at the end of the file)."""
    where = rng.random()
    if where < 0.5 or size < 1024:
        return rng.randrange(size)
    if where < 0.75:
        return min(size - 1, rng.randrange(0, size, 512) + rng.randrange(160))
    return rng.randrange(max(0, size - 1024), size)


def damaged(data: bytes, damage: str, seed: str) -> bytes:
    """`data` with `damage` applied, as `seed` decides."""
    rng = random.Random(seed)
    out = bytearray(data)
    if damage == "append" or not out:
        return bytes(out) + rng.randbytes(rng.choice([1, 7, 512, 1100]))
    if damage == "flip":
        for _ in range(rng.choice([1, 1, 2, 3])):
            out[_spot(rng, len(out))] ^= 1 << rng.randrange(8)
    elif damage == "truncate":
        out = out[:rng.choice([0, rng.randrange(len(out)), len(out) - 1,
                               max(0, len(out) - rng.randrange(1, 600))])]
    elif damage == "zeros":
        at = _spot(rng, len(out))
        run = min(len(out) - at, rng.choice([1, 8, 100, 512, 2000]))
        out[at:at + run] = bytes(run)
    elif damage == "edit":
        out = bytearray(_edited(json.loads(data), rng))
    return bytes(out)


def _edited(index: Any, rng: random.Random) -> bytes:
    """index.json with one of its values deleted, its key renamed, or the value replaced by
    one of another type or a nearby value."""
    paths: list[tuple[Any, Any]] = []

    def walk(value: Any) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value) \
            if isinstance(value, list) else ()
        for key, item in items:
            paths.append((value, key))
            walk(item)

    walk(index)
    parent, key = rng.choice(paths)
    value = parent[key]
    how = rng.choice(["delete", "rename", "retype", "nearby", "nearby"])
    if how == "delete":
        del parent[key]
    elif how == "rename" and isinstance(parent, dict):
        parent[key + "_"] = parent.pop(key)
    elif how == "retype" or how == "rename":
        parent[key] = rng.choice([None, "7", 7, -1, 2.5, True, [], {}, [1, 2], {"x": None}])
    elif isinstance(value, bool) or value is None:
        parent[key] = not value
    elif isinstance(value, int):
        parent[key] = value + rng.choice([-1, 1, 16, 512, -512, value, 1 << 40])
    elif isinstance(value, str):
        parent[key] = rng.choice(["", value[:-1], value + "x", value.upper(), "../" + value])
    elif isinstance(value, list) and value:
        parent[key] = rng.choice([value[:-1], [*value, value[0]], list(reversed(value))])
    else:
        parent[key] = type(value)()  # an empty list or object
    return json.dumps(index, sort_keys=True).encode()


# --- the reads (run in the subprocess) ---------------------------------------------------


def _reads(path: Path, table: bool) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, read) for every read of the dataset in `path`; each read returns its values."""
    import shardkit
    from shardkit import cli
    from shardkit.tools.verify import verify_dataset

    fields = () if table else ("key", "source", "orig_width", "orig_height")
    fixed = {"shuffle": True, "seed": 1, "window": 2}

    def shards() -> list[Any]:
        dataset = shardkit.open(path)
        read = dataset.read_table if table else dataset.read_shard
        return [_shard_values(read(k)) for k in range(len(dataset.manifest.shards))]

    def batches(**options: Any) -> Callable[[], Any]:
        return lambda: [_values(b) for b in shardkit.open(path).batches(BATCH, **fixed, **options)]

    def loader(**options: Any) -> Callable[[], Any]:
        return lambda: [_values({k: v.numpy() if hasattr(v, "numpy") else v for k, v in b.items()})
                        for b in shardkit.ShardLoader(path, BATCH, num_workers=0, **fixed, **options)]

    def command(*args: str) -> Callable[[], Any]:
        def run() -> Any:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return cli.main([*args, str(path)])
        return run

    yield "read_shard", shards
    yield "batches", batches(fields=fields)
    yield "batches(verify)", batches(verify=True)
    yield "loader", loader()
    yield "loader(verify)", loader(verify=True)
    yield "verify", lambda: verify_dataset(path)
    yield "verify --quick", lambda: verify_dataset(path, quick=True)
    yield "shardkit verify", command("verify")
    yield "shardkit info", command("info")


def _shard_values(shard: Any) -> dict[str, Any]:
    if hasattr(shard, "features"):
        return _values({"features": shard.features, "label": shard.labels})
    return _values({"image": shard.images, "label": shard.labels, "index": shard.index})


def _values(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch as JSON-ready values: arrays as (dtype, shape, hash of the bytes)."""
    import hashlib

    def one(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
            return {"dtype": str(value.dtype), "shape": list(value.shape), "sha": digest,
                    "values": value.tolist() if value.ndim == 1 and value.dtype != np.uint8 else None}
        if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            return [one(v) for v in value]
        return value

    return {name: one(value) for name, value in batch.items()}


def _mismatch(read: str, got: Any, want: Any, *, strict: bool, pixels: bool,
              classes: int | None) -> str | None:
    """What differs between a read's values and the undamaged dataset's, beyond what the
    damage may change (see the module docstring); None when nothing does."""
    if read.startswith(("verify", "shardkit")):
        return None
    if not isinstance(got, list) or len(got) != len(want):
        return f"{len(got)} batches or shards, expected {len(want)}"
    for number, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.keys() != b.keys():
            return f"item {number}: fields {sorted(a)}, expected {sorted(b)}"
        for name in a:
            problem = _field_mismatch(name, a[name], b[name], strict=strict, pixels=pixels,
                                      classes=classes)
            if problem:
                return f"item {number}, {name}: {problem}"
    return None


def _field_mismatch(name: str, a: Any, b: Any, *, strict: bool, pixels: bool,
                    classes: int | None) -> str | None:
    if isinstance(b, list) and b and isinstance(b[0], dict):  # variable-size images
        if len(a) != len(b):
            return f"{len(a)} images, expected {len(b)}"
        return next((p for x, y in zip(a, b, strict=True)
                     if (p := _field_mismatch(name, x, y, strict=strict, pixels=pixels,
                                              classes=classes))), None)
    if not isinstance(b, dict):  # metadata lists
        return None if a == b or not strict else f"{str(a)[:80]}, expected {str(b)[:80]}"
    if not isinstance(a, dict) or (a["dtype"], a["shape"]) != (b["dtype"], b["shape"]):
        found = (a["dtype"], a["shape"]) if isinstance(a, dict) else a
        return f"{found}, expected {(b['dtype'], b['shape'])}"
    exact = name == "index" or (name == "label" and strict) or (name in ("image", "features") and pixels)
    if exact and a["sha"] != b["sha"]:
        return "values differ"
    if name == "label" and classes is not None and a["values"] is not None \
            and not all(0 <= v < classes for v in a["values"]):
        return f"labels {a['values']} are not all in 0..{classes - 1}"
    return None


def run_cases(kind: str, dataset: Path, cases: list[Case], scratch: Path) -> Iterator[dict[str, Any]]:
    """Run `cases` on copies of `dataset`, yielding one report per case:
    {"case": i, "outcomes": {read: "ok" | error class}, "failures": [...]}."""
    from shardkit.errors import ShardkitError

    table = kind.startswith("table")
    try:
        pristine = {name: read() for name, read in _reads(dataset, table)}
    except Exception:
        yield {"fatal": f"the undamaged dataset does not read: {traceback.format_exc(limit=-3)}"}
        return
    classes = json.loads((dataset / "index.json").read_text())["classes"]
    for number, case in enumerate(cases):
        yield {"start": number}
        work = scratch / f"case{number}"
        shutil.copytree(dataset, work)
        target = work / case["file"]
        before = target.read_bytes()
        after = damaged(before, case["damage"], case["seed"])
        target.write_bytes(after)
        outcomes: dict[str, str] = {}
        failures: list[str] = []
        for name, read in _reads(work, table):
            try:
                got = read()
            except ShardkitError as exc:
                outcomes[name] = type(exc).__name__
                continue
            except Exception:
                failures.append(f"{name}: {traceback.format_exc(limit=-3).strip()}")
                continue
            outcomes[name] = "ok"
            index_only = case["file"] == "index.json"
            # A table's features are codes into index.json's categories: a changed category
            # name changes them, and nothing can tell (the names are the only copy).
            problem = _mismatch(name, got, pristine[name], classes=len(classes) if classes else None,
                                strict=index_only or "verify" in name,
                                pixels="verify" in name and not (table and index_only))
            if problem:
                failures.append(f"{name}: {problem}")
            if name == "verify" and after != before and case["file"].startswith("shard-") \
                    and not any(line.startswith(case["file"]) for line in got):
                failures.append(f"verify: reports nothing about the damaged {case['file']}: {got}")
        shutil.rmtree(work)
        yield {"case": number, "outcomes": outcomes, "failures": failures}


def _worker(argv: list[str]) -> int:
    """``worker KIND DATASET CASES.json``: run the cases, one JSON line per case."""
    kind, dataset, cases_file = argv
    cases = json.loads(Path(cases_file).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        for report in run_cases(kind, Path(dataset), cases, Path(scratch)):
            print(json.dumps(report), flush=True)
    return 0


# --- the test ----------------------------------------------------------------------------


def run_kind(kind: str, dataset: Path, cases: list[Case], workdir: Path,
              timeout: float = TIMEOUT) -> list[str]:
    """Run `cases` in subprocesses; the findings as lines. A subprocess that dies or hangs is
    a finding for the case it was running, and the cases after it are run again."""
    findings: list[str] = []
    todo = list(range(len(cases)))
    while todo:
        spec = workdir / f"{kind}-{todo[0]}.json"
        spec.write_text(json.dumps([cases[i] for i in todo]))
        try:
            result = subprocess.run([sys.executable, __file__, "worker", kind, str(dataset), str(spec)],
                                    capture_output=True, text=True, timeout=timeout)
            stdout, died = result.stdout, f"exit status {result.returncode}: {result.stderr[-1500:]}"
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            stdout = out.decode() if isinstance(out, bytes) else out
            died = f"no end after {timeout} s (a hang)"
        started, finished = None, set()
        for line in stdout.splitlines():
            report = json.loads(line)
            if "fatal" in report:
                return [*findings, f"{kind}: {report['fatal']}"]
            if "start" in report:
                started = report["start"]
                continue
            finished.add(report["case"])
            findings += [f"{kind} {cases[todo[report['case']]]}: {f}" for f in report["failures"]]
        if len(finished) == len(todo):
            break
        crashed = started if started is not None and started not in finished else len(finished)
        findings.append(f"{kind} {cases[todo[crashed]]}: the subprocess died: {died}")
        todo = todo[crashed + 1:]
    return findings


def _campaign(argv: list[str]) -> int:
    """``campaign [SCALE [KIND,...]]``: SCALE times the cases (default 5) over the given kinds
    (default: KINDS and EXTRA_KINDS), in a temporary folder; prints the findings."""
    scale = int(argv[0]) if argv else 5
    every = {**KINDS, **EXTRA_KINDS}
    names = argv[1].split(",") if len(argv) > 1 else list(every)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        found = build_datasets(root / "data", {name: every[name] for name in names})
        with ThreadPoolExecutor(2) as pool:
            results = pool.map(lambda kind: run_kind(kind, found[kind], plan_cases(found[kind], kind, scale),
                                                      root, TIMEOUT * scale), found)
            findings = [line for lines in results for line in lines]
    print("\n".join(findings) or f"no findings ({', '.join(names)}, scale {scale})")
    return 1 if findings else 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    sys.exit(_worker(rest) if command == "worker" else _campaign(rest))
