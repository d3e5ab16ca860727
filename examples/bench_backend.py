"""Benchmark: OnnxModule against the native torch ResNet-18 it was exported from.

Forward + backward (gradient w.r.t. the input, weights frozen, as when projections are
trained) at 224x224, alternating repetitions so both see the same machine state.
Prints throughput and peak memory (CPU: sampled RSS above the pre-step baseline; CUDA:
torch.cuda.max_memory_allocated above the pre-step allocation).

    python examples/bench_backend.py                 # batch 16 on CPU
    python examples/bench_backend.py --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.fx.experimental.optimization import fuse

from fmcompress.backend import OnnxModule
from fmcompress.frontend import export_module
from fmcompress.models import get_model

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident bytes of this process (Linux /proc; no psutil needed)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRss:
    """Samples this process's RSS in a thread; `peak - baseline` is the step's extra memory."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def step(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()


def measure(model: Callable, x: torch.Tensor, device: str) -> tuple[float, int]:
    """Seconds and peak extra bytes of one forward+backward."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step(model, x)
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
    with PeakRss() as rss:
        start = time.perf_counter()
        step(model, x)
        seconds = time.perf_counter() - start
    return seconds, rss.extra


def frozen(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    console = Console()

    native = frozen(get_model("resnet18"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resnet18.onnx"
        export_module(native, (1, 3, args.size, args.size), path)  # the same module, BN folded
        executor = OnnxModule(path).eval()
    fused = frozen(fuse(native))  # native with BN folded too
    models = {"native torch": native, "native, BN folded": fused, "OnnxModule": executor}
    for model in models.values():
        model.to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)

    for model in models.values():  # warm-up: allocator, kernels, first-call overheads
        step(model, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, list[int]] = {name: [] for name in models}
    for _ in range(args.reps):
        for name, model in models.items():  # alternate, so drift hits all alike
            seconds, peak = measure(model, x, args.device)
            times[name].append(seconds)
            peaks[name].append(peak)
    report(console, args, times, peaks)


def report(console: Console, args, times: dict[str, list[float]], peaks: dict[str, list[int]]) -> None:
    table = Table(title=f"ResNet-18 {args.size}x{args.size}, batch {args.batch}, forward+backward, "
                        f"{args.device}, {torch.get_num_threads()} threads, median of {args.reps}")
    for column in ("model", "s/iter", "img/s", "throughput vs native", "peak MiB", "memory vs native"):
        table.add_column(column, justify="right" if column != "model" else "left")
    base_time = statistics.median(times["native torch"])
    base_peak = statistics.median(peaks["native torch"])
    for name in times:
        seconds, peak = statistics.median(times[name]), statistics.median(peaks[name])
        table.add_row(name, f"{seconds:.3f}", f"{args.batch / seconds:.1f}", f"{base_time / seconds:.2f}",
                      f"{peak / 2**20:.0f}", f"{peak / base_peak:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
