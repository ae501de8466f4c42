"""Finite-difference gradient regularization (GR) for policy-gradient updates.

Paper §2.3 eq. 4-5, §5, App. C.1 and Fig. 9. With g(φ) = ∇L(φ):

    g1 = clip(g(φ), 10)                     gradient of the batch loss
    g2 = clip(g(φ + ε·g1), 10)              same sampled actions, same advantages; only the
                                            transformer blocks are perturbed
    grad = g1 + (γ/ε)(g2 − g1)              ≈ g + γ·H g = ∇[L + (γ/2)‖∇L‖²]   (blocks)
    grad = g1                               (embedding, output head, final norm)

then the caller clips grad to 1.0 and takes the optimizer step. Eq. 5 writes the penalty as
(γ/2)·Δ with Δ from eq. 4; Fig. 9, which we follow, folds the 1/2 into γ, so γ here is the
paper's γ in every table. At γ = ε (the paper's reasoning runs: 1e-3, 1e-3) the block gradient is
exactly clip(g2), the gradient at the perturbed point: a SAM-like step of radius ε·‖clip(g1)‖.
Right under one process, DDP, FSDP1 and FSDP2 (README: "Using gr.py in your trainer"): norms are
global, perturbation and restore act on each rank's local shards, g1 is copied out of the
wrapper's gradient buffers and the result written back into them. Keep master weights in fp32:
ε·g1 is tiny, and a bf16 forward rounds most of it away.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.tensor import DTensor


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, found by the HF `_no_split_modules` class names (of any submodule, so also
    through DDP and FSDP1 wrappers). Covers `model.layers` (Qwen2, Llama), `gpt_neox.layers` (Pythia),
    `transformer.h` (GPT-2). Checks the MRO so it still finds them after `fully_shard` renames the classes.
    """
    names = set().union(*(getattr(m, "_no_split_modules", None) or () for m in model.modules()))
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found via _no_split_modules={names}")
    return blocks


def block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters perturbed by GR: attention, MLP and norms inside the blocks; never embedding or head."""
    blocks = transformer_blocks(model)
    units = {id(m.module) for m in model.modules() if isinstance(m, FSDP1)}
    if any(getattr(p, "_is_flat_param", False) for p in model.parameters()) and any(id(b) not in units for b in blocks):
        raise ValueError("gr_backward: FSDP1 with use_orig_params=False packs block and non-block weights into one "
                         "FlatParameter; wrap every transformer block as its own FSDP unit (auto_wrap_policy="
                         "ModuleWrapPolicy({block class})) or pass use_orig_params=True")
    return [p for block in blocks for p in block.parameters() if p.requires_grad]


def shard_group(model: nn.Module):
    """FSDP1's shard group, over which norms must sum the ranks' pieces of each gradient; None where every rank
    holds whole gradients (one process, DDP, FSDP1 NO_SHARD) or DTensors that reduce themselves (FSDP2)."""
    if any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-1/2 or ZeRO-3
        raise ValueError("gr_backward: DeepSpeed ZeRO sums every backward of a step into the engine's gradient "
                         "partitions until engine.step(), so g1 and g2 cannot be taken apart; train with DDP, FSDP1 "
                         "or FSDP2 (fully_shard)")
    units = [m for m in model.modules() if isinstance(m, FSDP1)]
    return units[0].process_group if units and units[0].sharding_strategy != ShardingStrategy.NO_SHARD else None


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (a view: in-place ops reach the parameter); `t` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def restored(tensors: list[torch.Tensor]):
    """Whatever the block does to `tensors` in place is undone on exit, bit-exactly (from a saved copy, not by
    subtracting), also when it raises."""
    saved = [t.clone() for t in tensors]
    try:
        yield
    finally:
        torch._foreach_copy_(tensors, saved)


def _global_norm(grads: list[torch.Tensor], group=None) -> torch.Tensor:
    """L2 norm of `grads` over all ranks."""
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # FSDP2
        return norm.full_tensor()
    if group is not None:  # FSDP1: sum the squares of the ranks' pieces
        dist.all_reduce(norm := norm.square(), group=group)
        return norm.sqrt()
    return norm


def clip_(grads: list[torch.Tensor], max_norm: float, group=None) -> torch.Tensor:
    """Scale `grads` in place to global L2 norm ≤ max_norm (over all ranks); return the pre-clip norm."""
    norm = _global_norm(grads, group)
    torch._foreach_mul_([local_shard(g) for g in grads], torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def gr_backward(model: nn.Module, closure, *, gamma: float, eps: float,
                g1_clip: float = 10.0, g2_clip: float = 10.0, perturbed: list[nn.Parameter] | None = None) -> dict:
    """Leave the GR gradient in `.grad` of every trainable parameter of `model` (the wrapper, if any).

    `closure()` runs forward + backward over all micro-batches of the step (accumulating into
    `.grad`) and returns the loss; it is called twice, on the same data. `perturbed` defaults to
    `block_parameters(model)`. Returns the loss at φ, the pre-clip norms of g1 and g2, and GR's correction:
    correction_norm = ‖(γ/ε)(clip(g2) − g1)‖ over the blocks and correction_ratio = correction_norm / ‖clip(g1)‖.
    """
    if eps <= 0:
        raise ValueError(f"GR needs eps > 0, got {eps}")
    group = shard_group(model)
    params = [p for p in model.parameters() if p.requires_grad]
    in_block = {id(p) for p in (block_parameters(model) if perturbed is None else perturbed)}
    is_block = [id(p) in in_block for p in params]  # every list below follows `params`' order
    part = lambda ts, blocks=True: [local_shard(t) for t, b in zip(ts, is_block) if b == blocks]  # noqa: E731

    # g1 = ∇L(φ), clipped. Copied out of .grad, which wrappers reuse in the next backward (DDP's bucket views,
    # FSDP1's flat gradient); where nothing else holds it, the original is freed as soon as it is copied.
    model.zero_grad(set_to_none=True)
    loss = closure()
    if all(p.grad is None for p in params):
        raise ValueError("gr_backward: the closure left no gradient in .grad of any trainable parameter")
    g1 = []
    for p in params:
        g1.append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        p.grad = None
    g1_norm = clip_(g1, g1_clip, group)

    # g2 = ∇L(φ + ε·g1) on the same actions, the block parameters perturbed; φ restored bit-exactly afterwards
    phi, g1_block = part([p.detach() for p in params]), part(g1)
    with restored(phi):
        torch._foreach_add_(phi, g1_block, alpha=eps)
        closure()
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad  # g2 and, at the end, the result
    g2 = [p.grad for p in params]

    # grad = g1 + (γ/ε)(clip(g2) − g1) = lerp(clip(g2), g1, 1 − γ/ε) on the blocks, g1 elsewhere, built in .grad
    # (g2's buffers). clip(g2) uses the norm of all of g2, but only its block part is needed, so only that is scaled.
    g2_norm, g2_block = _global_norm(g2, group), part(g2)
    torch._foreach_mul_(g2_block, torch.clamp(g2_clip / (g2_norm + 1e-6), max=1.0))
    # GR's own size, ‖(γ/ε)(clip(g2) − g1)‖ on the blocks (one tensor-sized temporary at a time)
    correction = (gamma / eps) * _global_norm([torch.linalg.vector_norm(a - b) for a, b, blk in zip(g2, g1, is_block)
                                               if blk], group)
    g1_used = _global_norm(g1, group)  # after the clip
    torch._foreach_lerp_(g2_block, g1_block, 1 - gamma / eps)
    if not all(is_block):
        torch._foreach_copy_(part(g2, False), part(g1, False))
    g1_norm, g2_norm, correction, g1_used = torch.stack([g1_norm, g2_norm, correction, g1_used]).tolist()
    return {"loss": loss.detach(), "g1_norm": g1_norm, "g2_norm": g2_norm, "correction_norm": correction,
            "correction_ratio": correction / max(g1_used, 1e-12)}
