"""One `shardkit bench` configuration, measured in the process that runs this module
(``python -m shardkit.tools.bench_run`` reads its spec as JSON on stdin and prints the figures
as JSON): the loader (ShardLoader, or the PIL folder baseline), samples and bytes delivered,
CPU of the process and its workers, time to first batch, peak RSS.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from shardkit.tools.monitor import cpu_seconds

__all__ = ["FolderDataset", "Staging", "measure_here"]


class Staging:
    """What a training loop does with a batch before its model sees it: one copy into a
    tensor it reuses (the host side of ``.to(device)`` from pageable memory). The benchmarks
    pass every batch's images through it, so that a loader which hands out views of its
    shards (a stored-order read) is measured with the bytes delivered, not skipped."""

    def __init__(self) -> None:
        self._flat: Any = None

    def __call__(self, images: Any) -> None:
        import numpy as np
        import torch

        for piece in images if isinstance(images, list) else [images]:
            tensor = piece if isinstance(piece, torch.Tensor) else torch.from_numpy(np.asarray(piece))
            size = tensor.nelement() * tensor.element_size()
            if self._flat is None or len(self._flat) < size:
                self._flat = torch.empty(size, dtype=torch.uint8)
            self._flat[:size].view(tensor.dtype).view(tensor.shape).copy_(tensor)


class FolderDataset:
    """The naive baseline: PIL decode + center crop of one image per ``__getitem__``."""

    def __init__(self, files: list[tuple[str, int]], shape: Sequence[int]) -> None:
        self.files, self.shape = files, tuple(shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        height, width, channels = self.shape
        path, label = self.files[i]
        with Image.open(path) as im:
            # Bilinear: torchvision's Resize default, and shardkit's.
            fitted = ImageOps.fit(im.convert("RGB" if channels == 3 else "L"), (width, height),
                                  Image.Resampling.BILINEAR)
        pixels = np.array(fitted).reshape(height, width, channels)
        return torch.from_numpy(pixels), label


class _RssSampler:
    """Peak summed RSS of this process's descendants (the workers): sampled every 0.1 s, and
    whenever `sample` is called (at each epoch's first batch, when the workers are alive)."""

    def __init__(self) -> None:
        import psutil

        self.me, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._lock = threading.Lock()  # two threads sample: keep the larger peak
        self._thread = threading.Thread(target=self._run, name="shardkit-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        import psutil

        total = 0
        for child in self.me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
        with self._lock:
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _loader(spec: dict[str, Any]) -> Any:
    import torch

    if spec["loader"] == "shards":
        from shardkit.config import ReadOptions
        from shardkit.reader.torch_dataset import ShardDataset, ShardLoader

        where = ReadOptions(storage_options=spec.get("storage_options"), cache_dir=spec.get("cache_dir"))
        if not spec["workers"]:
            return ShardLoader(spec["path"], spec["batch_size"], where, shuffle=spec["shuffle"],
                               seed=spec["seed"])
        # ShardLoader reads with threads whatever num_workers says: worker processes are a
        # DataLoader over a ShardDataset, as a user builds it by hand.
        shards = ShardDataset(spec["path"], spec["batch_size"], where, shuffle=spec["shuffle"],
                              seed=spec["seed"])
        return torch.utils.data.DataLoader(shards, batch_size=None, num_workers=spec["workers"])
    files = [(str(f), int(label)) for f, label in spec["files"]]
    generator = torch.Generator().manual_seed(spec["seed"])
    dataset: Any = FolderDataset(files, spec["shape"])  # map-style: torch asks for nothing more
    return torch.utils.data.DataLoader(dataset, batch_size=spec["batch_size"],
                                       shuffle=spec["shuffle"], num_workers=spec["workers"],
                                       generator=generator)


def measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; the figures of a `LoaderRun` as a dict."""
    import resource

    import torch  # noqa: F401  (imported before the clock starts: its import is not the loader's)

    created = time.perf_counter()
    loader = _loader(spec)
    sampler = _RssSampler()
    staging = Staging()
    first: float | None = None
    samples = nbytes = 0
    epoch_seconds = []
    cpu_before, started = cpu_seconds(), time.perf_counter()
    for _ in range(spec["epochs"]):
        began = time.perf_counter()
        for number, batch in enumerate(loader):
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            if first is None:
                first = time.perf_counter() - created
            if number == 0:
                sampler.sample()
            staging(images)
            pieces = images if isinstance(images, list) else [images]
            samples += len(images)
            nbytes += sum(p.nelement() * p.element_size() for p in pieces)
        epoch_seconds.append(time.perf_counter() - began)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    workers_peak = sampler.stop()
    return {"loader": spec["loader"], "workers": spec["workers"], "epochs": spec["epochs"],
            "samples": samples, "bytes": nbytes, "seconds": seconds, "cpu_seconds": cpu,
            "first_batch_seconds": first if first is not None else seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "workers_peak_rss_bytes": workers_peak, "epoch_seconds": epoch_seconds}


def _main() -> int:
    """Figures as one JSON line; a shardkit error as one JSON line naming its class, and that
    error's exit code (`shardkit.tools.bench` raises it again in the parent)."""
    from shardkit.errors import ShardkitError

    try:
        print(json.dumps(measure_here(json.loads(sys.stdin.read()))))
    except ShardkitError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_main())
