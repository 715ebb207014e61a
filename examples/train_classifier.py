"""Train a small CNN from a converted dataset, and see whether it waits for data.

    shardkit convert data/train shards --size 72 --shuffle     # stored a little larger than the crop
    python examples/train_classifier.py shards --crop 64 --epochs 5
    python examples/train_classifier.py shards --steps 3          # a smoke run, as CI does

The loop is the whole recipe: `ShardLoader` yields uint8 batches (no decoding, no per-sample
Python) with every sample's augmentation drawn (`Augment.imagenet`: RandomResizedCrop to
`--crop` and a horizontal flip, new each epoch), `to_device` sends them over the bus as uint8,
crops, flips and normalises them on the device in one pass, and
`shardkit.monitor` measures how much of the wall time the loop spent waiting for the next
batch. It uses CUDA when available, the CPU otherwise, and prints the loss and, at the end,
the stall fraction. ``--metrics FILE`` writes the figures as JSON (atomically, so a Makefile
can use the file as a target).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shardkit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def small_cnn(channels: int, classes: int) -> nn.Module:
    def block(inp: int, out: int) -> list[nn.Module]:
        return [nn.Conv2d(inp, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(channels, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, classes),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a dataset folder written by `shardkit convert`")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps in all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop", type=int, default=None,
                        help="training crop (default: the stored size); 0: no augmentation")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    parser.add_argument("--tensorboard", default=None, help="also log the loader figures here")
    parser.add_argument("--metrics", default=None, help="write the final figures to this JSON file")
    return parser.parse_args(argv)


def write_json(path: str, value: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, target)  # all or nothing: Make never sees half a file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manifest = shardkit.open(args.data).manifest
    shape = manifest.image_shape
    crop = args.crop if args.crop is not None else (shape[0] if shape else 0)
    augment = shardkit.Augment.imagenet(crop) if crop and shape else None
    loader = shardkit.ShardLoader(args.data, args.batch_size, shuffle=True, seed=args.seed,
                                  pin_memory=device.type == "cuda", augment=augment)
    classes = manifest.classes
    if not classes:
        print(f"{args.data}: no classes; convert a class-per-folder tree to train a classifier",
              file=sys.stderr)
        return 2
    channels = shape[2] if shape else 3
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    model = small_cnn(channels, len(classes)).to(device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"{args.data}: {len(manifest.shards)} shards, {manifest.samples:,} samples, "
          f"{len(classes)} classes; training on {device}"
          + (f", random {crop}x{crop} crops and flips" if augment else ""), flush=True)

    monitor = shardkit.monitor(loader, tensorboard=args.tensorboard)
    step, loss_value, started = 0, float("nan"), time.perf_counter()
    for epoch in range(args.epochs):
        for batch in monitor:
            x = shardkit.to_device(batch, device, mean=mean, std=std)  # uint8 over the bus
            loss = nn.functional.cross_entropy(model(x["image"]), x["label"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if step == 1 or step % args.log_every == 0:
                loss_value = loss.item()
                print(f"epoch {epoch} step {step}: loss {loss_value:.4f}", flush=True)
            if args.steps is not None and step >= args.steps:
                break
        if args.steps is not None and step >= args.steps:
            break
    loss_value = loss.item() if step else loss_value
    total = monitor.total()
    monitor.close()
    print(f"final loss {loss_value:.4f} after {step} steps in {time.perf_counter() - started:.1f} s")
    print(f"stall fraction: {total.stall_fraction:.1%} of the time waiting for data "
          f"({total.samples_per_second:,.0f} samples/s, CPU {total.cpu_cores:.2f} cores)")
    if args.metrics:
        write_json(args.metrics, {"device": str(device), "steps": step, "loss": loss_value,
                                  "stall_fraction": total.stall_fraction,
                                  "samples": total.samples, "epochs": [e.to_json() for e in monitor.epochs]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
