"""The ``shardkit`` command: maps flags onto config objects and calls the library, nothing else.

Errors print as one line (``shardkit: error: ...``) with the exit code their class carries
(see `shardkit.errors`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from shardkit._version import __version__
from shardkit.config import (
    CODECS,
    COLOR_MODES,
    COMPRESSIONS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PIXELS,
    FILTERS,
    FORMATS,
    PIXELS,
    RESIZE_MODES,
    ReadOptions,
)
from shardkit.conversion.entry import convert
from shardkit.errors import (
    EXIT_INTERRUPTED,
    ConfigError,
    DatasetError,
    ShardkitError,
    TooManyFailuresError,
)
from shardkit.keywords import configs_from_options, parse_storage_options

if TYPE_CHECKING:
    from shardkit.config import ConvertConfig, RunOptions
    from shardkit.conversion.report import ConvertSummary

__all__ = ["main"]


def _rgb(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"a colour is three integers R,G,B (e.g. 255,255,255); got {text!r}") from None
    if len(values) != 3:
        raise ConfigError(f"a colour is three integers R,G,B (e.g. 255,255,255); got {text!r}")
    return values[0], values[1], values[2]


def add_storage_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--storage-option KEY=VALUE`` (repeatable; `parse_storage_options` reads the pairs):
    for every command that takes a URL."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an fsspec storage option for a URL SRC/OUT, on every request "
                             "(endpoint_url=http://host:9000, key=..., client_kwargs={\"region_name\": "
                             "\"eu-west-1\"}); repeatable; see docs/remote.md")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardkit",
        description="Convert image folders into pre-decoded tar/Parquet shards, once.",
    )
    parser.add_argument("--version", action="version", version=f"shardkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = commands.add_parser(
        "convert", help="convert an image folder into shards",
        description="Convert SRC (class-per-folder tree, a flat folder of images, a CSV, or a "
                    "Hugging Face dataset on disk) into a sharded dataset in OUT. SRC (images, "
                    "an image CSV) and OUT may be URLs: s3://bucket/prefix, gs://..., any "
                    "writable fsspec URL.",
    )
    conv.add_argument("src", metavar="SRC")
    conv.add_argument("out", metavar="OUT")
    img = conv.add_argument_group("images")
    img.add_argument("--size", default="224", help="output WxH (150x100) or a square side (224)")
    img.add_argument("--resize", choices=RESIZE_MODES, default="center-crop")
    img.add_argument("--mode", choices=COLOR_MODES, default="RGB")
    img.add_argument("--filter", choices=FILTERS, default="bilinear", help="resampling filter")
    img.add_argument("--background", default="255,255,255",
                     help="R,G,B that transparent pixels are composited on (default white)")
    img.add_argument("--pad-color", default="0,0,0", help="R,G,B of the letterbox in --resize pad")
    img.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="reject images whose header claims more pixels (decompression bombs)")
    img.add_argument("--no-draft", action="store_true",
                     help="decode JPEGs at full size (slower; draft mode is on by default)")
    out = conv.add_argument_group("output")
    out.add_argument("--format", choices=FORMATS, default="tar")
    out.add_argument("--codec", choices=CODECS, default="raw")
    out.add_argument("--quality", type=int, default=90, help="JPEG quality for --codec jpeg")
    out.add_argument("--compression", choices=COMPRESSIONS, default="none",
                     help="Parquet compression of the image column")
    out.add_argument("--pixels", choices=PIXELS, default=DEFAULT_PIXELS,
                     help="how Parquet shards hold raw pixels: bytes (memory-mapped when read; "
                          "default) or array3d (Hugging Face's Array3D, so datasets gives arrays; "
                          "about 1.25x the bytes, read through pyarrow)")
    size = out.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default=None, help="target shard size (default 256MB)")
    size.add_argument("--samples-per-shard", type=int, default=None)
    out.add_argument("--shuffle", action="store_true", help="seeded global shuffle of the inputs")
    out.add_argument("--seed", type=int, default=0, help="seed of --shuffle and --split")
    split = out.add_mutually_exclusive_group()
    split.add_argument("--split", default=None, metavar="NAME=F,...",
                       help="write OUT/NAME/ per part, e.g. train=0.8,val=0.2: stratified per "
                            "class, drawn by --seed")
    split.add_argument("--validation-split", type=float, default=None, metavar="V",
                       help="OUT/train/ and OUT/val/ cut as Keras' ImageDataGenerator("
                            "validation_split=V) cuts them")
    table = conv.add_argument_group("CSV inputs (SRC ending in .csv) and Hugging Face datasets")
    table.add_argument("--image-col", default=None,
                       help="column of image paths (an image CSV; omit for a tabular CSV), or a "
                            "Hugging Face dataset's image column (default image)")
    table.add_argument("--label-col", default=None,
                       help="label column, or several comma-separated (float32 targets); a "
                            "Hugging Face dataset's label column (default label)")
    table.add_argument("--hf-split", default=None, metavar="NAME",
                       help="the split to convert when a Hugging Face folder holds several "
                            "(train-00000-of-00001.parquet, test/..., valid.parquet)")
    table.add_argument("--root", default=None,
                       help="folder relative image paths start from (default: the CSV's folder)")
    table.add_argument("--columns", default=None,
                       help="comma-separated columns to keep (a table's features, an image CSV's metadata)")
    table.add_argument("--exclude", default=None, help="comma-separated columns to leave out")
    table.add_argument("--delimiter", default=",", help="field delimiter (default ,)")
    table.add_argument("--encoding", default="utf8", help="text encoding (default utf8)")
    table.add_argument("--header", choices=("auto", "yes", "no"), default="auto",
                       help="auto: the first row is a header unless it is all numbers")
    table.add_argument("--keep-ints", action="store_true",
                       help="store integer columns as int64 instead of float32")
    run = conv.add_argument_group("run")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: all cores; 0 = in this process)")
    run.add_argument("--max-errors", default="0",
                     help="failed inputs tolerated: a count (5) or a share (1%%); default 0")
    run.add_argument("--overwrite", action="store_true", help="replace a previous conversion in OUT")
    run.add_argument("--dask-scheduler", metavar="tcp://HOST:PORT", default=None,
                     help="run the tasks on this Dask cluster (SRC and OUT on a shared "
                          "filesystem or in object storage; needs shardkit[dask]); see "
                          "docs/scale-out.md")
    run.add_argument("--resume", action="store_true",
                     help="finish an interrupted conversion in OUT, keeping its finished shards")
    add_storage_option(run)
    progress = run.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")

    info = commands.add_parser("info", help="describe a converted dataset")
    info.add_argument("path", metavar="OUT")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    _add_remote(info, cache=False)

    verify = commands.add_parser(
        "verify", help="check a dataset against its index.json",
        description="Check every shard's size, sha256 and sample count against index.json, that "
                    "every sample parses with the schema's dtype and shape, and that samples + "
                    "errors.jsonl account for every input. Prints one line per problem; exits "
                    "non-zero if there is any. OUT may be a URL: each shard is downloaded into "
                    "a temporary folder for its check.",
    )
    verify.add_argument("path", metavar="OUT")
    verify.add_argument("--quick", action="store_true",
                        help="skip the sha256 of each shard and the decoding of jpeg/png pixels")
    add_storage_option(verify)

    preview = commands.add_parser("preview", help="write a contact sheet of samples")
    preview.add_argument("path", metavar="OUT")
    preview.add_argument("-o", "--output", required=True,
                         help="image file to write: PNG, unless its extension names another "
                              "format (.jpg, .webp)")
    preview.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    _add_remote(preview)
    _add_bench(commands)
    return parser


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench", help="measure the loader on this machine (and the raw folder it replaces)",
        description="Measure ShardLoader over OUT for each worker count, each in a fresh process "
                    "with the page cache warm: samples/s, CPU-ms per sample (process + workers), "
                    "MB/s, time to first batch, peak RSS. --baseline SRC measures the naive "
                    "PIL + DataLoader loader on the raw folder side by side.",
    )
    bench.add_argument("path", metavar="OUT")
    bench.add_argument("--batch-size", type=int, default=256)
    bench.add_argument("--workers", default="0,2,4", help="worker counts, comma-separated")
    bench.add_argument("--epochs", type=int, default=2)
    bench.add_argument("--baseline", metavar="SRC", default=None,
                       help="the raw image folder OUT was converted from")
    bench.add_argument("--baseline-limit", type=int, default=2048,
                       help="samples per epoch the raw baseline reads (default 2048)")
    bench.add_argument("--target-rate", type=float, default=3000.0,
                       help="samples/s your model consumes, for the verdict (default 3000)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--plot", metavar="PNG", default=None, help="write a bar chart")
    _add_remote(bench)


def _add_remote(command: argparse.ArgumentParser, *, cache: bool = True) -> None:
    """The flags of a command that reads a dataset at a URL (docs/remote.md)."""
    add_storage_option(command)
    if cache:
        command.add_argument("--cache-dir", default=None,
                             help="the node-local cache of a URL's shards (default: the user's "
                                  "cache folder)")


def _read_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(storage_options=parse_storage_options(args.storage_option) or None,
                       cache_dir=getattr(args, "cache_dir", None))


def _convert(args: argparse.Namespace) -> int:
    config, run = configs_from_options({
        "size": args.size, "resize": args.resize, "mode": args.mode, "filter": args.filter,
        "background": _rgb(args.background), "pad_color": _rgb(args.pad_color),
        "max_pixels": args.max_pixels, "draft": not args.no_draft, "format": args.format,
        "codec": args.codec, "quality": args.quality, "compression": args.compression,
        "pixels": args.pixels,
        "samples_per_shard": args.samples_per_shard, "shuffle": args.shuffle, "seed": args.seed,
        "split": args.split, "validation_split": args.validation_split,
        "workers": args.workers, "overwrite": args.overwrite, "resume": args.resume,
        "max_errors": args.max_errors,
        "image_col": args.image_col, "label_col": args.label_col, "root": args.root,
        "hf_split": args.hf_split,
        "columns": args.columns, "exclude": args.exclude, "delimiter": args.delimiter,
        "encoding": args.encoding, "header": args.header, "keep_ints": args.keep_ints,
        "progress": args.progress, "storage_options": parse_storage_options(args.storage_option) or None,
        **({"shard_size": args.shard_size} if args.shard_size else {}),
    })
    try:
        summary = _run_on_cluster(args, config, run) if args.dask_scheduler else \
            convert(args.src, args.out, config, run)
    except TooManyFailuresError as exc:
        if exc.summary is not None:
            print(exc.summary.line())  # type: ignore[attr-defined]
        raise
    print(summary.line())
    return 0


def _run_on_cluster(args: argparse.Namespace, config: ConvertConfig, run: RunOptions) -> ConvertSummary:
    from shardkit.conversion.executors import dask_executor

    if args.workers is not None:
        raise ConfigError("--workers does not apply with --dask-scheduler: the cluster's workers "
                          "run the tasks")
    with dask_executor(args.dask_scheduler) as executor:
        return convert(args.src, args.out, config, run, executor=executor)


def _info(args: argparse.Namespace) -> int:
    from shardkit.tools.inspect import describe, info_text

    facts = describe(args.path, _read_options(args))
    if args.json:
        import json

        print(json.dumps(facts, indent=1, sort_keys=True))
    else:
        print(info_text(facts))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shardkit.tools.verify import verify_dataset

    problems = verify_dataset(args.path, quick=args.quick,
                              storage_options=parse_storage_options(args.storage_option) or None)
    for problem in problems:
        print(problem)
    if problems:
        print(f"shardkit: {len(problems)} problem(s) in {args.path}", file=sys.stderr)
        return DatasetError.exit_code
    print(f"{args.path}: OK")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from shardkit.config.common import check_local_file
    from shardkit.tools.bench import BenchOptions, plot, run_bench

    if args.plot:
        check_local_file("--plot", args.plot)  # before the measuring, not after
    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        raise ConfigError(f"--workers takes counts like 0,2,4; got {args.workers!r}") from None
    options = BenchOptions(batch_size=args.batch_size, workers=workers, epochs=args.epochs,
                           baseline=args.baseline, baseline_limit=args.baseline_limit,
                           target_rate=args.target_rate,
                           storage_options=parse_storage_options(args.storage_option) or None,
                           cache_dir=args.cache_dir)
    report = run_bench(args.path, options)
    if args.json:
        import json

        print(json.dumps(report.to_json(), indent=1, sort_keys=True))
    else:
        print(report.table())
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _preview(args: argparse.Namespace) -> int:
    from shardkit.tools.inspect import contact_sheet

    shown = contact_sheet(args.path, args.output, n=args.n, options=_read_options(args))
    print(f"wrote {args.output} ({shown} samples)")
    return 0


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    from shardkit.conversion.executors import note_interrupt

    note_interrupt()  # raised again between tasks if the KeyboardInterrupt lands in a __del__
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shardkit`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    handlers = {"convert": _convert, "info": _info, "preview": _preview, "verify": _verify,
                "bench": _bench}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("shardkit: interrupted; nothing incomplete was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if args.debug:
            raise
        # The reader of our output went away (`shardkit info OUT | head`): stop quietly, and
        # keep the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ShardkitError as exc:
        if args.debug:
            raise
        print(f"shardkit: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
