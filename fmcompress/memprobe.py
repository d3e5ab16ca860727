"""Measure the memory one onnxruntime inference really takes: the process's peak growth.

Rules:

a. A fresh Python process (so nothing else's memory counts) loads the model exactly as
   it is or will be written (value_info, metadata and all: onnxruntime plans its buffers
   from the shapes the file states), with onnxruntime's CPU provider, its memory arena
   and memory patterns off (every tensor is a separate allocation, freed after its last
   use) and one thread, at the graph optimisation level asked for (`all` by default: what
   a session a user opens runs). Only inputs with symbolic dims are pinned, to the shapes
   the runtime view pins (a symbolic H or W would keep onnxruntime from folding shape
   arithmetic such as a detector's anchor grid); a model whose inputs are static is
   measured from its own bytes.
b. glibc's mmap threshold is pinned at one page, 4 KiB (MALLOC_MMAP_THRESHOLD_), so that
   freed tensors go back to the system at once instead of staying in the heap: the
   resident set then follows the live tensors. At 16 KiB (before 2-D patches) the many
   small tensors of a patched region came from the heap, whose high-water mark sat above
   what was alive (MobileNetV2-224 at `--peak 512KB`, 486 KiB computed: 578-737 KiB a
   round at 16 KiB, 446-536 KiB at 4 KiB).
b'. Tensors under that threshold still come from the heap; before each round its free pages
   are handed back (`malloc_trim(0)`), so those tensors fault their pages in again and are
   counted instead of hiding in memory the set-up left behind (MobileNetV2-224 compiled
   `--int8 --peak lossless`: 4 KiB measured without it, against a computed 327 KiB).
b''. The probe runs on one CPU from its first instruction: it pins itself
   (`sched_setaffinity`) and starts again (`exec`) before anything else. Linux keeps a
   process's resident-set count per CPU and folds each CPU's share into the total only in
   batches (32 pages here), so VmHWM lags by whatever the CPUs the process ran on had not
   folded in yet; a process that moves between CPUs lags by a different amount each run.
   The same tiled file measured 1436-1544 KiB in eight fresh processes, 1544 KiB on every
   run pinned from the start; pinned only after start-up, 1476-1652 KiB.
c. One warm-up run (lazy initialisation, weight prepacking); then per round the peak
   resident set is reset (`/proc/self/clear_refs`, Linux), one inference runs on a
   random input created before the reset, and the peak growth over the resident set
   just before the run is the figure. The input is the caller's and is not counted; the
   outputs are. The median over rounds is returned.
d. Where the platform cannot reset the peak (not Linux, no /proc access), the
   measurement is unavailable: `measure_peak` returns None and says why in `reason`.
e. `compile` measures only where `measurement_enabled()`: CompileOptions.measure_memory,
   and not switched off by the environment (FMCOMPRESS_MEASURE_MEMORY=0, which the test
   suite sets in tests/conftest.py: a probe is a subprocess of 1-3 s per model).
f. A median growth below the probe's resolution is not a measurement: below the bytes of the
   outputs (which one inference allocates in any case: tensors under the mmap threshold
   came from memory the heap already held), or below one batch of the kernel's per-CPU
   resident-set count (`resolution_bytes`: max(32, 2 x CPUs) pages, 128 KiB here), by which
   VmHWM may lag even on one CPU (rule b''). A model holding 96 KiB read 0, 80 or 88 KiB
   in three processes, one holding 48 KiB 0-4 KiB; MobileNetV2-224 at `--ceiling 64KB --runtime ort
   --int8` read 0 B, and the trained demo's original 0-12 KiB. `measure_peak` returns None
   and says why in `reason`.

Entry point: `measure_peak(model, input_shapes, level="all") -> PeakMeasurement`.
The probe runs as `python -m fmcompress.memprobe MODEL --shape NAME=DIMS ... --level L`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

MMAP_THRESHOLD = 4 * 1024
DEFAULT_LEVEL = "all"  # onnxruntime's default (ORT_ENABLE_ALL): what a user's session runs
SWITCH = "FMCOMPRESS_MEASURE_MEMORY"  # rule e: 0 switches compile's measurement off


@dataclass(frozen=True)
class PeakMeasurement:
    bytes: int | None  # median peak growth of one inference; None when it cannot be measured
    rounds: list[int]
    reason: str = ""


def measurement_enabled(asked: bool = True) -> bool:
    """Rule e: whether compile measures (asked for, and not switched off by the environment)."""
    return asked and os.environ.get(SWITCH, "1").strip() not in ("0", "false", "no", "off")


def measure_peak(model: onnx.ModelProto | str | os.PathLike, input_shapes: dict[str, tuple[int, ...]], *,
                 level: str = DEFAULT_LEVEL, rounds: int = 3, timeout: float = 600) -> PeakMeasurement:
    """Rules a-d, in a subprocess; `model` is a path (measured as it is on disk) or a
    ModelProto (measured as `SerializeToString` writes it)."""
    if not _can_reset_peak():
        return PeakMeasurement(None, [], "the peak resident set cannot be reset here (needs Linux /proc)")
    with tempfile.TemporaryDirectory(prefix="fmcompress-probe-") as folder:
        path = probe_file(model, dict(input_shapes), Path(folder) / "model.onnx")
        shapes = [f"{name}={','.join(map(str, dims))}" for name, dims in input_shapes.items()]
        command = [sys.executable, "-m", "fmcompress.memprobe", str(path), "--level", level, "--rounds", str(rounds)]
        command += [arg for shape in shapes for arg in ("--shape", shape)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return PeakMeasurement(None, [], f"the probe failed: {lines[-1] if lines else done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    values, median = result["rounds"], int(statistics.median(result["rounds"]))
    outputs, lag = result["output_bytes"], resolution_bytes()
    if median < max(outputs, lag):  # rule f
        why = (f"the outputs' {outputs} B (small tensors came from memory the heap already held)" if outputs > lag
               else f"the {lag // 1024} KiB by which the kernel's resident-set count may lag")
        return PeakMeasurement(None, values, f"below the probe's resolution: the process grew by {median} B, "
                                             f"less than {why}")
    return PeakMeasurement(median, values)


def resolution_bytes() -> int:
    """Rule f: one batch of the kernel's per-CPU resident-set counter (percpu_counter_batch,
    max(32, 2 x online CPUs) pages), the most VmHWM lags behind on the one CPU the probe runs on."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    return max(32, 2 * (os.cpu_count() or 1)) * page


def probe_file(model: onnx.ModelProto | str | os.PathLike, shapes: dict[str, tuple[int, ...]],
               spare: Path) -> Path:
    """Rule a: the file the probe loads. A path whose inputs are all static is used as it is;
    otherwise the model's bytes, its symbolic inputs pinned and nothing else changed, go to `spare`."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        proto = onnx.load(str(model), load_external_data=False)
    pinned = pin_symbolic_inputs(proto, shapes)
    if pinned is proto and not isinstance(model, onnx.ModelProto):
        return Path(model)
    if pinned is not proto and not isinstance(model, onnx.ModelProto):  # keep external data reachable
        onnx.load_external_data_for_model(pinned, str(Path(model).parent))
    spare.write_bytes(pinned.SerializeToString())
    return spare


def pin_symbolic_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """`model` itself when no input has a symbolic dim; else a copy whose symbolic input dims
    are set from `shapes` (value_info, outputs, metadata untouched)."""
    from .shapes import declared_dims, graph_inputs

    symbolic = [inp for inp in graph_inputs(model) if inp.name in shapes
                and (not inp.type.tensor_type.HasField("shape")
                     or any(not isinstance(d, int) for d in declared_dims(inp)))]
    if not symbolic:
        return model
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    names = {inp.name for inp in symbolic}
    for inp in pinned.graph.input:
        if inp.name in names:
            shape = inp.type.tensor_type.shape
            del shape.dim[:]
            for size in shapes[inp.name]:
                shape.dim.add().dim_value = int(size)
    return pinned


def _can_reset_peak() -> bool:
    return sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_free_heap() -> None:
    """Rule b': glibc's `malloc_trim(0)` hands the heap's free pages back to the system, so that a
    tensor under the mmap threshold placed in memory the heap already held (freed by the session's
    set-up or the warm-up) faults its pages in again and counts. No glibc: nothing to do."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _start_on_one_cpu(argv: list[str]) -> None:
    """Rule b'': where this process may run on several CPUs, pin it to the first and start
    again, so that the new image runs on that CPU alone (no-op where the platform cannot pin)."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) == 1:
        return
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "fmcompress.memprobe", *argv])


def _probe(path: str, shapes: dict[str, tuple[int, ...]], level: str, rounds: int) -> list[int]:
    """Rules a and c, inside the probe process."""
    import numpy as np
    import onnxruntime as ort

    from fmcompress.ortrun import ort_level

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort_level(level)
    options.log_severity_level = 4  # fatal only: a refusal is said in our own one line
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for meta in session.get_inputs():
        dims = shapes.get(meta.name) or tuple(d if isinstance(d, int) else 1 for d in meta.shape)
        dtype = np.float16 if "float16" in meta.type else np.float32 if "float" in meta.type else np.int64
        feeds[meta.name] = rng.random(dims).astype(dtype)
    output_bytes = sum(np.asarray(out).nbytes for out in session.run(None, feeds))
    growth = []
    for _ in range(rounds):
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident set
        base = _status_bytes("VmRSS")
        session.run(None, feeds)
        growth.append(_status_bytes("VmHWM") - base)
    return growth, output_bytes


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _start_on_one_cpu(argv)
    parser = argparse.ArgumentParser(prog="python -m fmcompress.memprobe", description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--shape", action="append", default=[], help="NAME=DIMS, e.g. x=1,3,224,224")
    parser.add_argument("--level", default=DEFAULT_LEVEL)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    shapes = {}
    for text in args.shape:
        name, _, dims = text.partition("=")
        shapes[name] = tuple(int(d) for d in dims.split(","))
    rounds, output_bytes = _probe(args.model, shapes, args.level, args.rounds)
    print(json.dumps({"rounds": rounds, "output_bytes": output_bytes}))


if __name__ == "__main__":
    main()
