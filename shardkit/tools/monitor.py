"""Is the training loop waiting for data? A stall monitor around any batch iterable.

::

    mon = shardkit.monitor(loader)            # any iterable of batches; a ShardLoader, a DataLoader
    for epoch in range(epochs):
        for batch in mon:                     # one pass of the loader = one epoch
            step(batch)
    mon.epochs[-1].stall_fraction             # the numbers are returned, not only printed

Time spent inside ``next(loader)`` is *waiting*; time between handing a batch over and being
asked for the next one is the *step*. When the step used CUDA, the monitor synchronises the
device before it stops the step's clock, so queued kernels count as step time and the waiting
time is time the GPU had nothing to do. CPU utilisation covers this process and every process
below it (DataLoader workers, alive or already reaped). GPU utilisation and memory come from
NVML (``pip install 'shardkit[gpu]'``) and are absent, not zero, without a GPU or NVML.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, TextIO

from shardkit.errors import ConfigError, require

__all__ = ["EpochStats", "Monitor", "cpu_seconds", "monitor"]


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and all its descendants.

    Each live process in the tree contributes its own time plus that of its children that
    have exited and been waited for (``children_*``: reaped DataLoader workers, or workers a
    forkserver reaped). A process that exits and is reaped while this runs may be missed
    once; at an epoch boundary, after the DataLoader joined its workers, the figure is exact.
    """
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    # This process's own time from the scheduler's exact clock (psutil's figures come in
    # 10 ms ticks, which a short in-process run may not reach).
    total = time.process_time() + float(own.children_user + own.children_system)
    for process in me.children(recursive=True):
        try:
            times = process.cpu_times()
        except psutil.Error:  # it exited between listing and reading
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return float(total)


@dataclass(frozen=True, kw_only=True)
class EpochStats:
    """One pass of the loader (or a window of it, or the running total).

    wall = seconds from asking for the first batch to the end of the pass; wait = seconds
    inside ``next(loader)``; step = seconds in the loop body (CUDA synchronised);
    cpu_cores = CPU seconds of the process tree / wall; gpu_* are None when unmeasured.
    """

    epoch: int
    batches: int
    samples: int
    wall: float
    wait: float
    step: float
    cpu_seconds: float
    complete: bool = True  # False for a window of a pass, or a pass left early
    gpu_utilization: float | None = None
    gpu_memory_bytes: int | None = None

    @property
    def stall_fraction(self) -> float:
        """Share of the wall time the loop spent waiting for the next batch."""
        return self.wait / self.wall if self.wall > 0 else 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_cores(self) -> float:
        return self.cpu_seconds / self.wall if self.wall > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stall_fraction": self.stall_fraction,
                "samples_per_second": self.samples_per_second, "cpu_cores": self.cpu_cores}

    def line(self, label: str | None = None) -> str:
        """One compact line for people."""
        name = label or (f"epoch {self.epoch}" + ("" if self.complete else " (partial)"))
        text = (f"{name}: {self.samples:,} samples in {self.batches:,} batches, {self.wall:.2f} s, "
                f"{self.samples_per_second:,.0f} samples/s; waiting for data "
                f"{self.stall_fraction:.0%} ({self.wait:.2f} s), step {self.step:.2f} s; "
                f"CPU {self.cpu_cores:.2f} cores of {os.cpu_count()}")
        if self.gpu_utilization is not None:
            text += f"; GPU {self.gpu_utilization:.0f}% busy"
        if self.gpu_memory_bytes is not None:
            text += f", {self.gpu_memory_bytes / 2**30:.1f} GiB used"
        return text


def _batch_samples(batch: Any) -> int:
    """Samples in a batch: a dict's ``image`` (or first value), a tuple's first item, or it."""
    if isinstance(batch, dict):
        first = batch["image"] if "image" in batch else next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], "__len__"):
        first = batch[0]
    else:
        first = batch
    return len(first)


def _uses_cuda(batch: Any) -> bool:
    """Whether CUDA is in play: available, initialised by this process, or holding the batch."""
    torch = sys.modules.get("torch")  # never import torch just to find out
    if torch is None or not torch.cuda.is_available():
        return False
    if torch.cuda.is_initialized():
        return True
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) \
        else [batch]
    return any(getattr(v, "is_cuda", False) for v in values)


class _GpuSampler:
    """Mean NVML utilisation and peak memory of the current CUDA device, sampled in a thread."""

    def __init__(self, nvml: Any, handle: Any, interval: float = 0.2) -> None:
        self.nvml, self.handle, self.interval = nvml, handle, interval
        self.utilization: list[float] = []
        self.memory = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardkit-gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            self.utilization.append(float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            self.memory = max(self.memory, int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used))
        except self.nvml.NVMLError:
            pass  # a sample lost is a sample lost; the figures are means and peaks

    def stop(self) -> tuple[float | None, int | None]:
        self._stop.set()
        self._thread.join()
        self._sample()
        if not self.utilization:
            return None, None
        return sum(self.utilization) / len(self.utilization), self.memory


def _nvml_handle() -> tuple[Any, Any] | None:
    """(pynvml, handle of the current CUDA device), or None without torch CUDA or NVML."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    try:
        import pynvml
    except ImportError:
        print("shardkit.monitor: a CUDA device is in use but nvidia-ml-py is not installed; "
              "GPU utilisation and memory are left out (pip install 'shardkit[gpu]')",
              file=sys.stderr)
        return None
    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        uuid = str(getattr(props, "uuid", ""))
        if uuid:
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except pynvml.NVMLError:
        return None


class Monitor:
    """Wraps an iterable of batches; each pass over it is one epoch, measured.

    every: also report a running line every that many batches. sync: synchronise CUDA at the
    end of each step (None: when CUDA is in use). out: where lines are printed (default: the
    current ``sys.stdout``); quiet: print nothing.
    tensorboard: a log directory or a ``torch.utils.tensorboard.SummaryWriter`` to write the
    figures to (needs the ``tensorboard`` package: ``pip install 'shardkit[tensorboard]'``).
    """

    def __init__(self, loader: Iterable[Any], *, every: int | None = None, sync: bool | None = None,
                 out: TextIO | None = None, quiet: bool = False, tensorboard: Any = None) -> None:
        if every is not None and (not isinstance(every, int) or every <= 0):
            raise ConfigError(f"every must be a positive number of batches; got {every!r}")
        if sync:
            torch: Any = require("torch", "torch")
            if not torch.cuda.is_available():
                raise ConfigError("sync=True synchronises CUDA, and CUDA is not available here")
        self.loader, self.every, self.sync, self.out, self.quiet = loader, every, sync, out, quiet
        self.epochs: list[EpochStats] = []
        self.windows: list[EpochStats] = []
        self._writer = _summary_writer(tensorboard)
        self._steps = 0
        self._gpu: tuple[Any, Any] | None = None
        self._gpu_checked = False

    def __iter__(self) -> Iterator[Any]:
        epoch = len(self.epochs)
        if not self._gpu_checked:  # at the first pass, when the model is likely on its device
            self._gpu, self._gpu_checked = _nvml_handle(), True
        clock = _Clock(epoch, self._gpu)
        window = _Clock(epoch, None)
        began = time.perf_counter()
        iterator = iter(self.loader)  # a DataLoader starts its worker processes here: waiting too
        for c in (clock, window):
            c.wait += time.perf_counter() - began
        complete = False
        try:
            while True:
                began = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:  # learning that the pass ended (workers joined) is waiting too
                    clock.wait += time.perf_counter() - began
                    complete = True
                    break
                handed = time.perf_counter()
                try:
                    yield batch
                finally:  # also when the loop breaks out: that step happened too
                    if self.sync is True or (self.sync is None and _uses_cuda(batch)):
                        sys.modules["torch"].cuda.synchronize()
                    done = time.perf_counter()
                    samples = _batch_samples(batch)
                    for c in (clock, window):
                        c.add(wait=handed - began, step=done - handed, samples=samples)
                    self._steps += 1
                if self.every and clock.batches % self.every == 0:
                    self._report_window(window.finish(complete=False))
                    window = _Clock(epoch, None)
        finally:
            stats = clock.finish(complete=complete)
            self.epochs.append(stats)
            self._emit(stats, "epoch", stats.epoch)

    def _report_window(self, stats: EpochStats) -> None:
        self.windows.append(stats)
        self._emit(stats, "running", self._steps, label=f"  step {self._steps:,}")

    def _emit(self, stats: EpochStats, tag: str, step: int, label: str | None = None) -> None:
        if not self.quiet:
            print(stats.line(label), file=self.out or sys.stdout, flush=True)
        if self._writer is not None:
            figures = {"stall_fraction": stats.stall_fraction, "samples_per_second":
                       stats.samples_per_second, "cpu_cores": stats.cpu_cores,
                       "gpu_utilization": stats.gpu_utilization, "gpu_memory_bytes":
                       stats.gpu_memory_bytes}
            for name, value in figures.items():
                if value is not None:
                    self._writer.add_scalar(f"loader/{tag}/{name}", value, step)
            self._writer.flush()

    def total(self) -> EpochStats:
        """All passes so far, added up (GPU figures: mean utilisation, peak memory)."""
        if not self.epochs:
            return EpochStats(epoch=-1, batches=0, samples=0, wall=0.0, wait=0.0, step=0.0,
                              cpu_seconds=0.0)
        utils = [e.gpu_utilization for e in self.epochs if e.gpu_utilization is not None]
        memory = [e.gpu_memory_bytes for e in self.epochs if e.gpu_memory_bytes is not None]
        first = self.epochs[0]
        return replace(
            first, epoch=-1, complete=all(e.complete for e in self.epochs),
            batches=sum(e.batches for e in self.epochs), samples=sum(e.samples for e in self.epochs),
            wall=sum(e.wall for e in self.epochs), wait=sum(e.wait for e in self.epochs),
            step=sum(e.step for e in self.epochs),
            cpu_seconds=sum(e.cpu_seconds for e in self.epochs),
            gpu_utilization=sum(utils) / len(utils) if utils else None,
            gpu_memory_bytes=max(memory) if memory else None,
        )

    def summary(self) -> str:
        """The epochs' lines and the running total."""
        lines = [e.line() for e in self.epochs]
        return "\n".join([*lines, self.total().line("total")])

    def close(self) -> None:
        """Close the TensorBoard writer the monitor opened."""
        if self._writer is not None:
            self._writer.close()


class _Clock:
    """Adds up one epoch's (or window's) waits, steps and samples, and its CPU and GPU use."""

    def __init__(self, epoch: int, gpu: tuple[Any, Any] | None) -> None:
        self.epoch = epoch
        self.batches = self.samples = 0
        self.wait = self.step = 0.0
        self.cpu = cpu_seconds()
        self.gpu = _GpuSampler(*gpu) if gpu is not None else None
        self.started = time.perf_counter()  # after the bookkeeping above, which is neither

    def add(self, *, wait: float, step: float, samples: int) -> None:
        self.batches += 1
        self.samples += samples
        self.wait += wait
        self.step += step

    def finish(self, *, complete: bool) -> EpochStats:
        wall = time.perf_counter() - self.started
        utilization, memory = self.gpu.stop() if self.gpu is not None else (None, None)
        return EpochStats(epoch=self.epoch, batches=self.batches, samples=self.samples,
                          wall=wall, wait=self.wait, step=self.step,
                          cpu_seconds=cpu_seconds() - self.cpu, gpu_utilization=utilization,
                          gpu_memory_bytes=memory, complete=complete)


def _summary_writer(tensorboard: Any) -> Any:
    if tensorboard is None or hasattr(tensorboard, "add_scalar"):
        return tensorboard
    require("tensorboard", "tensorboard")
    module: Any = require("torch.utils.tensorboard", "torch")
    return module.SummaryWriter(log_dir=os.fspath(tensorboard))


def monitor(loader: Iterable[Any], *, every: int | None = None, sync: bool | None = None,
            out: TextIO | None = None, quiet: bool = False, tensorboard: Any = None) -> Monitor:
    """Measure how long the loop waits for `loader`; see `Monitor` and the module docstring."""
    return Monitor(loader, every=every, sync=sync, out=out, quiet=quiet, tensorboard=tensorboard)
