"""Ranks: the process group, each rank's device and precision, its randomness, the collectives, FSDP2 wrapping.

One process (`python`) or one per GPU (`torchrun`); the same code runs in both. Every collective of the project goes
through the helpers below, and each moves its tensors to the rank's device first: nccl cannot send CPU tensors, and
CI (gloo on CPU) would never notice one that slipped through.
"""

import atexit
import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from gr import transformer_blocks
from loading import fail


# ----------------------------------------------------------------------------- process group and device

def rank_device() -> torch.device:
    """This process's device: its GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU. GRPO_DEVICE=cpu forces
    the CPU, e.g. for more torchrun ranks than GPUs (the tests do that); GRPO_DEVICE=cuda insists on a GPU."""
    want = os.environ.get("GRPO_DEVICE", "")
    if want not in ("", "cpu", "cuda"):
        fail(f"GRPO_DEVICE must be cpu or cuda, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        fail("GRPO_DEVICE=cuda, but CUDA is not available")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun, one process group with two backends: nccl for CUDA tensors and
    gloo for CPU tensors, so every collective works whatever device its tensors are on (nccl alone has no CPU path;
    the collective helpers below also move their tensors to the rank's device)."""
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        # a group left alive at exit can abort the interpreter's teardown ("terminate called without an active
        # exception") and turn a finished run into a failed one; a finished run calls `finish_distributed` itself
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return *rank_and_world(), device


def finish_distributed() -> None:
    """The end of a run: the ranks wait for each other, then the group is destroyed. Rank 0 does work of its own after
    the last collective (summary, plots); without the barrier the other ranks tear their connections down meanwhile.
    (After an exception the atexit handler destroys the group without a barrier: a barrier could wait forever.)"""
    if is_distributed():
        barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main() -> bool:
    """Rank 0; before the process group exists, torchrun's RANK says (so flag checks print once, not per rank)."""
    return (dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))) == 0


def keep_freed_memory() -> bool:
    """CPU training loops: stop glibc from handing freed memory back to the OS after every step, which makes each
    step re-fault its activations page by page (~1.5 µs per 4 KiB page here, and GR, with its higher peak, several
    times as often as a plain update). Blocks up to 32 MiB then come from a heap that is not trimmed, as the CUDA
    caching allocator keeps its blocks; peak RSS is unchanged. Process-wide; False where mallopt is missing."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt takes a C int
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def autocast(device, dtype: str | None):
    """bf16 compute over fp32 master weights (GR's ε·g1 lives in the fp32 weights); None or float32: no autocast."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- randomness per (seed, step, rank)

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed for one step's randomness, a pure function of (seed, step, rank): resumed runs reproduce."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank))


# ----------------------------------------------------------------------------- FSDP2

def shard(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: `fully_shard` every transformer block, then the root. No-op in a single process. `param_dtype`
    (e.g. bf16 for the bf16 update regimes): parameters are all-gathered and used in it, half the traffic of fp32;
    gradients are reduce-scattered in the master weights' own dtype either way."""
    if is_distributed():
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=next(model.parameters()).dtype)
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def gradient_sync(model, enabled: bool) -> None:
    """FSDP2: whether the next backward ends by reduce-scattering the gradients (True) or keeps accumulating them
    unsharded on each rank (False). A pass over several micro-batches enables it for the last one only: one
    reduce-scatter per FSDP unit per pass instead of one per micro-batch, at the price of holding the unsharded
    fp32 gradients of the whole model on every rank during the pass. No-op without FSDP2."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def is_sharded(model) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model) -> None:
    """Free gathered weights after a forward with no backward (FSDP2 leaves the root unsharded)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(model) -> dict:
    """The unsharded state dict on the CPU, from any rank layout (every rank must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_list(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share; pads with the last item so every rank runs the same batches (lockstep)."""
    per = -(-len(items) // world)
    share = items[rank * per:(rank + 1) * per]
    return share + [items[-1]] * (per - len(share))


# ----------------------------------------------------------------------------- collectives

def all_reduce_sum(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) of `t` over ranks (a new tensor on t's device; `t` itself in one process)."""
    if not is_distributed():
        return t
    out = t.detach().to(rank_device(), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t, dist.ReduceOp.MAX)


def all_gather_rows(local: torch.Tensor, indices: list[int], total: int) -> torch.Tensor:
    """(total, k) float64 on the CPU from every rank's (n, k) rows for the items `indices` (every rank the same n, as
    `shard_list` makes them; its padding copies rewrite the same row). Rows no rank sent stay nan."""
    rows = torch.cat([torch.tensor(indices, dtype=torch.float64)[:, None], local.detach().double().cpu()], 1)
    if is_distributed():
        rows = rows.to(rank_device())
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows)
        rows = torch.cat(parts).cpu()
    out = torch.full((total, local.shape[1]), float("nan"), dtype=torch.float64)
    out[rows[:, 0].long()] = rows[:, 1:]
    return out


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; they travel over gloo, on the CPU)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
