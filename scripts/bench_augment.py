"""Augmentation benchmark: per-sample random crop + flip + affine + colour on one batch.

Input: a uint8 batch [B, S, S, 3] already on the device (B=256, S=256 by default: images
stored at 256 for 224 crops). Output: normalised float32 [B, 3, 224, 224]. The same
operations, each sample drawing its own parameters, three ways, alternated round by round:

* shardkit: `Augment` rows drawn on the CPU (counted), one ``grid_sample`` pass + per-sample
  colour broadcasts + normalisation on the device (``apply_augment``);
* torchvision.transforms.v2, one call per image in a Python loop (v2 on a batch tensor
  would give every image the same parameters);
* kornia.augmentation on the batch with ``same_on_batch=False``.

Ops: RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3), horizontal flip p=0.5,
RandomAffine(±15°, translate 0.1, scale 0.9-1.1, shear ±10°), ColorJitter(brightness,
contrast, saturation 0.4), Normalize. Prints samples/s and ms per batch (medians of the
rounds, with ranges) and the ratios to shardkit.

Usage: python scripts/bench_augment.py [--device cpu|cuda] [--batch 256] [--rounds 5]
       [--threads N] [--write-doc docs/performance.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from docblock import write_block

from shardkit import Augment
from shardkit.reader.augment_apply import apply_augment
from shardkit.reader.augment_params import draw_params

BEGIN, END = "<!-- augment:begin -->", "<!-- augment:end -->"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP, DEGREES, TRANSLATE, ZOOM, SHEAR, JITTER = 224, 15.0, 0.1, (0.9, 1.1), 10.0, 0.4


def shardkit_path(device: torch.device) -> Callable[[Any, int], Any]:
    augment = Augment(size=CROP, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, degrees=DEGREES,
                      translate=(TRANSLATE, TRANSLATE), zoom=ZOOM, shear=SHEAR,
                      brightness=(1 - JITTER, 1 + JITTER), contrast=(1 - JITTER, 1 + JITTER),
                      saturation=(1 - JITTER, 1 + JITTER))

    def run(images: Any, step: int) -> Any:
        index = np.arange(step * len(images), (step + 1) * len(images))
        rows = torch.from_numpy(draw_params(augment, seed=0, epoch=0, index=index,
                                            stored=tuple(images.shape[1:3])))
        return apply_augment(images, rows, mean=MEAN, std=STD)
    return run


def torchvision_path(device: torch.device) -> Callable[[Any, int], Any]:
    from torchvision.transforms import v2

    per_image = v2.Compose([
        v2.RandomResizedCrop(CROP, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomAffine(degrees=DEGREES, translate=(TRANSLATE, TRANSLATE), scale=ZOOM, shear=SHEAR,
                        interpolation=v2.InterpolationMode.BILINEAR),
        v2.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])

    def run(images: Any, step: int) -> Any:
        chw = images.permute(0, 3, 1, 2)
        return torch.stack([per_image(chw[i]) for i in range(len(chw))])
    return run


def kornia_path(device: torch.device) -> Callable[[Any, int], Any]:
    import kornia.augmentation as K

    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop((CROP, CROP), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=DEGREES, translate=(TRANSLATE, TRANSLATE), scale=ZOOM, shear=SHEAR, p=1.0),
        K.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER, p=1.0),
        K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)),
        same_on_batch=False,
    ).to(device)

    def run(images: Any, step: int) -> Any:
        return pipeline(images.permute(0, 3, 1, 2).float().div_(255))
    return run


def timed(fn: Callable[[Any, int], Any], images: Any, step: int,
          device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one batch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(images, step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out.shape == (len(images), 3, CROP, CROP), out.shape
    return seconds, cpu


def report(args: argparse.Namespace, seconds: dict[str, list[float]], cpu: dict[str, list[float]]) -> str:
    base = statistics.median(seconds["shardkit"])
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {threads} torch thread(s)"
    lines = [
        f"## Augmentation, {args.device} (`scripts/bench_augment.py`)",
        "",
        f"One batch of {args.batch} × {args.stored}² uint8 → RandomResizedCrop {CROP} + flip + "
        f"RandomAffine + ColorJitter + Normalize → float32 [{args.batch}, 3, {CROP}, {CROP}], every sample "
        f"its own parameters; {where}; median of {args.rounds} alternated rounds (range). "
        f"Command: `python scripts/bench_augment.py --device {args.device} --rounds {args.rounds}"
        + (f" --threads {args.threads}" if args.threads else "") + "`.",
        "",
        "| path | samples/s | ms per batch | time vs shardkit | CPU ms per batch |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"shardkit": "shardkit (`Augment`, one `grid_sample` pass)",
             "torchvision": "torchvision.transforms.v2, per sample in a loop",
             "kornia": "kornia.augmentation, `same_on_batch=False`"}
    for name, runs in seconds.items():
        med = statistics.median(runs)
        lines.append(f"| {names[name]} | {args.batch / med:,.0f} ({args.batch / max(runs):,.0f}–"
                     f"{args.batch / min(runs):,.0f}) | {med * 1e3:,.1f} ({min(runs) * 1e3:,.1f}–"
                     f"{max(runs) * 1e3:,.1f}) | {med / base:.1f}× | "
                     f"{statistics.median(cpu[name]) * 1e3:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--stored", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=["shardkit", "torchvision", "kornia"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write-doc", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (args.batch, args.stored, args.stored, 3),
                                           dtype=np.uint8)).to(device)
    paths = {"shardkit": shardkit_path, "torchvision": torchvision_path, "kornia": kornia_path}
    runs = {name: paths[name](device) for name in args.only}
    for fn in runs.values():  # warm-up: kernels, caches, lazy imports
        timed(fn, images, 0, device)
    if device.type != "cpu" and "shardkit" in runs:
        # The same rows on the CPU and on the device: the two must agree to float tolerance.
        on_device = runs["shardkit"](images[:16], 0).cpu()
        on_cpu = shardkit_path(torch.device("cpu"))(images[:16].cpu(), 0)
        print(f"shardkit {device.type} vs cpu, 16 samples: max |difference| "
              f"{(on_device - on_cpu).abs().max().item():.2e} (normalised units)")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(1, args.rounds + 1):
        for name, fn in runs.items():
            wall, used = timed(fn, images, step, device)
            seconds[name].append(wall)
            cpu[name].append(used)
            print(f"round {step} {name}: {wall * 1e3:.1f} ms, CPU {used * 1e3:.0f} ms", flush=True)
    block = report(args, seconds, cpu)
    print(block)
    if args.write_doc is not None:
        # One block per device, so a CPU run and a GPU run both stay in the document.
        begin, end = (marker.replace("augment", f"augment-{args.device}") for marker in (BEGIN, END))
        write_block(args.write_doc, begin, end, f"{begin}\n{block}\n{end}")


if __name__ == "__main__":
    main()
