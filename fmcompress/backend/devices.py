"""Where training runs: the torch device and, under torchrun, the rank and the world.

Rules:

a. `--device auto` is CUDA when torch sees a device, else the CPU; `cuda` without one
   is a usage error (`train_config.check_device`).
b. Distributed: under torchrun (WORLD_SIZE > 1) the process group is initialised (gloo
   on CPU, nccl on CUDA) and the student is wrapped in DistributedDataParallel. Each
   rank takes its share (`rank::world`) of every global batch (the trainer slices it),
   so gradients average to the single-process ones.
c. `--block-precision auto` is bfloat16 where the device computes it natively (a CUDA
   device that supports it; a CPU with AVX-512 BF16 or AMX), else float32: emulated,
   bfloat16 is slower than float32.
d. `available_memory(device)`: what a stage may still allocate there: the free memory of a
   CUDA device, else the host's MemAvailable (Linux; free physical pages elsewhere); None
   where neither is known, and callers then assume enough.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fmcompress.train_config import check_device


def resolve_device(name: str) -> torch.device:
    """Rule a: the device `--device name` trains on."""
    check_device(name)
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """Rule c: the arithmetic `--block-precision name` runs in on `device`."""
    if name != "auto":
        return name
    return "bfloat16" if native_bfloat16(device) else "float32"


def native_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch's own probes of the CPU (private, hence looked up): absent means unknown, so no
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def available_memory(device: torch.device | None = None) -> int | None:
    """Rule d: bytes free to allocate on `device` (the host where None or the CPU)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def setup_ranks(device: torch.device) -> tuple[int, int]:
    """Rule b: (rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap_for_ranks(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Rule b: `module` itself in one process, else wrapped in DistributedDataParallel."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index or 0] if device.type == "cuda" else None
    # maps outside a greedy stage are bypassed, so their projections get no gradient
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
