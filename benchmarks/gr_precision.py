"""How much of GR's finite difference survives bf16 compute? Prints cosines side by side.

    python benchmarks/gr_precision.py

The GR correction (g2 − g1)/ε ≈ H·g1 is computed on a tiny Qwen2 (weights at a realistic scale, std ≈ 0.03)
with fp32 master weights, once with fp32 compute and once under bf16 autocast, for several ε. The reference
is fp32 at the paper's ε = 1e-3. In bf16 the perturbation ε·g1 is far below the weights' rounding step, so
the difference of the two gradients is mostly rounding noise; this is why grpo.py runs the update passes in
float32 (`--update-dtype`) and only generation in bf16.
"""

import contextlib
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
from gr import gr_backward  # noqa: E402
from grpo import dr_grpo_loss, token_logprobs  # noqa: E402
from tiny import rollout_batch, tiny_model  # noqa: E402


def hessian_gradient(model, batch, eps, compute) -> torch.Tensor:
    """(g2 − g1)/ε over all parameters (zero outside the blocks), from gr_backward with γ = ε."""
    T = batch["completion_mask"].shape[1]

    def closure():
        with compute():
            logp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], T, 0.7)
            loss = dr_grpo_loss(logp, batch["advantages"], batch["completion_mask"], len(logp) * T)
        loss.backward()
        return loss.detach()

    model.zero_grad()
    closure()
    g1 = torch.cat([p.grad.flatten() for p in model.parameters()])
    gr_backward(model, closure, gamma=eps, eps=eps)  # grad = g1 + (g2 − g1) on the blocks
    return torch.cat([p.grad.flatten() for p in model.parameters()]) - g1


def main():
    torch.manual_seed(0)
    model = tiny_model("qwen2", layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    batch = rollout_batch(n=8, group=4)
    fp32, bf16 = contextlib.nullcontext, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    ref = hessian_gradient(model, batch, 1e-3, fp32) / 1e-3
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()  # noqa: E731
    print(f"{'eps':>6} {'cos fp32':>9} {'cos bf16':>9} {'|bf16|/|fp32 ref|':>18}")
    for eps in (1e-3, 1e-2, 5e-2):
        a = hessian_gradient(model, batch, eps, fp32) / eps
        b = hessian_gradient(model, batch, eps, bf16) / eps
        print(f"{eps:>6g} {cos(a, ref):>9.3f} {cos(b, ref):>9.3f} {(b.norm() / ref.norm()).item():>18.2f}")


if __name__ == "__main__":
    main()
