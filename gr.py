"""Finite-difference gradient regularization (GR) for policy-gradient updates.

Paper §2.3 eq. 4-5, §5, App. C.1 and Fig. 9. With g(φ) = ∇L(φ):

    g1 = clip(g(φ), 10)                     gradient of the batch loss
    g2 = clip(g(φ + ε·g1), 10)              same sampled actions, same advantages; only the
                                            transformer blocks are perturbed
    grad = g1 + (γ/ε)(g2 − g1)              ≈ g + γ·H g = ∇[L + (γ/2)‖∇L‖²]   (blocks)
    grad = g1                               (embedding, output head, final norm)

then the caller clips grad to 1.0 and takes the optimizer step. Eq. 5 writes the penalty as
(γ/2)·Δ with Δ from eq. 4; Fig. 9, which we follow, folds the 1/2 into γ, so γ here is the
paper's γ in every table. Works unchanged on FSDP2 (`fully_shard`) models: norms are global
(DTensor reductions), perturbation and restore act in place on each rank's local shards.

Precision note: ε·g1 is tiny (ε = 1e-3, ‖g1‖ ≤ 10 spread over all weights). Keep master weights
in fp32; if the forward runs in bf16 most of the perturbation is rounded away.
"""

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks, found by the HF `_no_split_modules` class names.

    Covers `model.layers` (Qwen2, Llama), `gpt_neox.layers` (Pythia), `transformer.h` (GPT-2).
    Checks the MRO so it still finds them after `fully_shard` renames the classes.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found via _no_split_modules={names}")
    return blocks


def block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters perturbed by GR: attention, MLP and norms inside the blocks; never embedding or head."""
    return [p for block in transformer_blocks(model) for p in block.parameters() if p.requires_grad]


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


def _global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of `grads` over all ranks."""
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # partial per-rank norms -> all-reduced global norm
        norm = norm.full_tensor()
    return norm


def clip_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale `grads` in place to global L2 norm ≤ max_norm (over all ranks); return the pre-clip norm."""
    norm = _global_norm(grads)
    torch._foreach_mul_([local_shard(g) for g in grads], torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def gr_backward(model: nn.Module, closure, *, gamma: float, eps: float,
                g1_clip: float = 10.0, g2_clip: float = 10.0, perturbed: list[nn.Parameter] | None = None) -> dict:
    """Leave the GR gradient in `.grad` of every trainable parameter of `model`.

    `closure()` runs forward + backward over all micro-batches of the step (accumulating into
    `.grad`) and returns the loss; it is called twice, on the same data. `perturbed` defaults to
    `block_parameters(model)`. Returns the loss at φ, the pre-clip norms of g1 and g2, and GR's correction:
    correction_norm = ‖(γ/ε)(clip(g2) − g1)‖ over the blocks and correction_ratio = correction_norm / ‖clip(g1)‖.
    """
    if eps <= 0:
        raise ValueError(f"GR needs eps > 0, got {eps}")
    params = [p for p in model.parameters() if p.requires_grad]
    in_block = {id(p) for p in (block_parameters(model) if perturbed is None else perturbed)}
    is_block = [id(p) in in_block for p in params]  # every list below follows `params`' order

    # g1 = ∇L(φ), clipped
    for p in params:
        p.grad = None
    loss = closure()
    g1 = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    g1_norm = clip_(g1, g1_clip)

    # g2 = ∇L(φ + ε·g1) on the same actions, the block parameters perturbed; φ restored bit-exactly afterwards
    phi = [local_shard(p.detach()) for p, b in zip(params, is_block) if b]
    g1_block = [local_shard(g) for g, b in zip(g1, is_block) if b]
    with restored(phi):
        torch._foreach_add_(phi, g1_block, alpha=eps)
        for p in params:
            p.grad = None
        closure()
        g2 = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    # grad = g1 + (γ/ε)(clip(g2) − g1) = lerp(g1, clip(g2), γ/ε) on the blocks, g1 elsewhere, built in g1's
    # buffers. clip(g2) uses the norm of all of g2, but only its block part is needed, so only that is scaled.
    g2_norm = _global_norm(g2)
    g2_block = [local_shard(g) for g, b in zip(g2, is_block) if b]
    torch._foreach_mul_(g2_block, torch.clamp(g2_clip / (g2_norm + 1e-6), max=1.0))
    # GR's own size, ‖(γ/ε)(clip(g2) − g1)‖ on the blocks (one tensor-sized temporary at a time)
    correction = (gamma / eps) * _global_norm([torch.linalg.vector_norm(a - b) for a, b, blk in zip(g2, g1, is_block)
                                               if blk])
    g1_used = _global_norm(g1)  # after the clip
    torch._foreach_lerp_(g1_block, g2_block, gamma / eps)
    for p, g in zip(params, g1):
        p.grad = g
    g1_norm, g2_norm, correction, g1_used = torch.stack([g1_norm, g2_norm, correction, g1_used]).tolist()
    return {"loss": loss.detach(), "g1_norm": g1_norm, "g2_norm": g2_norm, "correction_norm": correction,
            "correction_ratio": correction / max(g1_used, 1e-12)}
