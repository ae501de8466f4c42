"""gr.py against exact answers: double-backward Hessian-vector products, a quadratic, clipping."""

import math

import pytest
import torch
from torch import nn

from gr import block_parameters, clip_, gr_backward
from grpo import dr_grpo_loss, token_logprobs
from tiny import rollout_batch, tiny_model

NO_CLIP = dict(g1_clip=math.inf, g2_clip=math.inf)


def grpo_closure(model, batch):
    """Forward+backward of the Dr.GRPO loss over two micro-batches, as the trainer does.

    Also returns `reinforce_loss`, −Σ A·log π / normaliser: the same gradient field g(φ), and the one to
    double-differentiate. (The ratio form's detach adds an outer-product term to its second derivative,
    while GR differentiates g(φ) = −Σ A ∇log π(φ) on the fixed samples.)
    """
    T = batch["completion_mask"].shape[1]
    normalizer = batch["input_ids"].shape[0] * T

    def loss_fn(reinforce=False):
        total = 0
        for sl in (slice(0, 3), slice(3, None)):
            logp, _ = token_logprobs(model, batch["input_ids"][sl], batch["attention_mask"][sl], T, temperature=0.7)
            adv, mask = batch["advantages"][sl], batch["completion_mask"][sl]
            if reinforce:
                total = total - (adv[:, None] * logp * mask).sum() / normalizer
            else:
                total = total + dr_grpo_loss(logp, adv, mask, normalizer)
        return total

    def closure():
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return loss_fn, closure


def hvp_reference(model, loss_fn, gamma):
    """g + γ·H·(P g) by double backward, P = projection onto the block parameters; g elsewhere."""
    params = list(model.parameters())
    blocks = {id(p) for p in block_parameters(model)}
    grads = torch.autograd.grad(loss_fn(reinforce=True), params, create_graph=True)
    v = [g.detach() if id(p) in blocks else torch.zeros_like(p) for g, p in zip(grads, params)]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    return [g.detach() + gamma * h if id(p) in blocks else g.detach() for g, h, p in zip(grads, hv, params)]


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen2", True), ("gpt_neox", False)])
def test_gr_equals_gradient_plus_gamma_hessian_gradient(arch, tie):
    model = tiny_model(arch, tie=tie, dtype=torch.float64, exact=True)
    batch = rollout_batch(left_pad=False)
    loss_fn, closure = grpo_closure(model, batch)
    gamma, eps = 0.5, 1e-7  # FD error is O(ε): 8e-3 relative at the paper's ε = 1e-3, 8e-7 here
    expected = hvp_reference(model, loss_fn, gamma)
    gr_backward(model, closure, gamma=gamma, eps=eps, **NO_CLIP)
    got = [p.grad for p in model.parameters()]
    correction = torch.cat([(e - g).flatten() for e, g in zip(expected, hvp_reference(model, loss_fn, 0.0))])
    err = torch.cat([(a - b).flatten() for a, b in zip(got, expected)])
    assert correction.norm() > 1e-3 * torch.cat([e.flatten() for e in expected]).norm()  # γHg is not negligible
    assert err.norm() / correction.norm() < 5e-6, err.norm() / correction.norm()


class Quadratic(nn.Module):
    """L(φ) = ½ φᵀAφ + bᵀφ over [embed, block0, block1]: finite differences are exact."""
    _no_split_modules = ["Block"]

    def __init__(self, n=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
        self.layers = nn.ModuleList(Block(n, g) for _ in range(2))
        m = torch.randn(3 * n, 3 * n, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T)
        self.register_buffer("b", torch.randn(3 * n, generator=g, dtype=torch.float64))

    def flat(self):
        return torch.cat([self.embed] + [blk.w for blk in self.layers])

    def forward(self):
        phi = self.flat()
        return 0.5 * phi @ self.A @ phi + self.b @ phi


class Block(nn.Module):
    def __init__(self, n, g):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))


def quadratic_closure(model, seen):
    def closure():
        seen.append(model.flat().detach().clone())
        loss = model()
        loss.backward()
        return loss.detach()
    return closure


def test_gr_on_quadratic_is_exact():
    model, seen = Quadratic(), []
    phi = model.flat().detach().clone()
    g = model.A @ phi + model.b
    gamma, eps = 0.3, 0.25  # large ε: still exact on a quadratic
    out = gr_backward(model, quadratic_closure(model, seen), gamma=gamma, eps=eps, **NO_CLIP)
    P = torch.cat([torch.zeros(5), torch.ones(10)]).double()  # blocks only
    expected = g + gamma * P * (model.A @ (P * g))
    torch.testing.assert_close(torch.cat([p.grad for p in model.parameters()]), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen[1], phi + eps * P * g, rtol=1e-15, atol=0)  # perturbed: blocks only (to ~1 ulp: FMA)
    assert torch.equal(model.flat().detach(), phi)  # restored bit-exactly
    assert out["g1_norm"] == pytest.approx(g.norm().item())


@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen2", True), ("llama", False), ("gpt_neox", False),
                                      ("gpt2", True)])
def test_only_blocks_perturbed_and_restored(arch, tie):
    model = tiny_model(arch, tie=tie)
    blocks = {id(p) for p in block_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) not in blocks}
    layer_names = {n for n, _ in model.named_parameters() if ".layers." in n or ".h." in n}
    assert layer_names == {n for n, p in model.named_parameters() if id(p) in blocks}  # every block param
    assert any("embed" in n or "wte" in n for n in names)
    assert tie or any("lm_head" in n or "embed_out" in n for n in names)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshots = []
    batch = rollout_batch()
    _, closure = grpo_closure(model, batch)

    def recording_closure():
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return closure()

    # g1 by a plain backward, for comparison
    closure()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    gr_backward(model, recording_closure, gamma=1e-3, eps=1e-3, **NO_CLIP)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} not restored bit-exactly"
        if n in names:  # embedding / head: never perturbed, gradient is g1
            assert torch.equal(snapshots[1][n], before[n]), n
            torch.testing.assert_close(p.grad, g1[n], rtol=1e-6, atol=1e-8)
        else:
            torch.testing.assert_close(snapshots[1][n], before[n] + 1e-3 * g1[n], rtol=1e-6, atol=1e-9)
            assert not torch.equal(snapshots[1][n], before[n]) or g1[n].abs().max() == 0, n


@pytest.mark.parametrize("clips", [dict(g1_clip=1.0, g2_clip=0.5), {}])  # {}: the paper's 10 and 10 (‖g‖ ≈ 100)
def test_clipping_of_g1_and_g2_and_the_correction_gamma_over_eps(clips):
    """g1, g2 written out on the quadratic: grad = g1 + (γ/ε)(clip(g2) − g1) on the blocks, no hidden 1/2; the
    reported correction is ‖(γ/ε)(clip(g2) − g1)‖ over the blocks, and its ratio to ‖clip(g1)‖."""
    model, seen = Quadratic(), []
    phi = model.flat().detach().clone()
    g = model.A @ phi + model.b
    P = torch.cat([torch.zeros(5), torch.ones(10)]).double()
    gamma, eps = 0.1, 1e-2
    g1_clip, g2_clip = clips.get("g1_clip", 10.0), clips.get("g2_clip", 10.0)
    assert g.norm() > max(g1_clip, g2_clip)  # the clips bite
    g1c = g * g1_clip / g.norm()
    g2 = model.A @ (phi + eps * P * g1c) + model.b
    g2c = g2 * g2_clip / g2.norm()
    out = gr_backward(model, quadratic_closure(model, seen), gamma=gamma, eps=eps, **clips)
    assert out["g1_norm"] == pytest.approx(g.norm().item())  # pre-clip
    assert out["g2_norm"] == pytest.approx(g2.norm().item())
    torch.testing.assert_close(seen[1], phi + eps * P * g1c)  # perturbed with the clipped g1
    correction = P * (gamma / eps) * (g2c - g1c)
    torch.testing.assert_close(torch.cat([p.grad for p in model.parameters()]), g1c + correction)
    assert out["correction_norm"] == pytest.approx(correction.norm().item(), rel=1e-6)
    assert out["correction_ratio"] == pytest.approx((correction.norm() / g1c.norm()).item(), rel=1e-6)


def test_weights_restored_bit_exactly_when_the_second_pass_raises():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    _, closure = grpo_closure(model, rollout_batch())
    calls = []

    def failing_closure():
        calls.append(1)
        if len(calls) == 2:  # at φ + ε·g1, e.g. out of memory
            raise RuntimeError("second pass failed")
        return closure()

    with pytest.raises(RuntimeError, match="second pass failed"):
        gr_backward(model, failing_closure, gamma=1e-3, eps=1e-1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_clip_below_threshold_is_untouched():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0])]
    norm = clip_(grads, 10.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.equal(grads[0], torch.tensor([3.0, 4.0]))
    clip_(grads, 1.0)
    assert torch.cat(grads).norm().item() == pytest.approx(1.0, rel=1e-5)


def test_eps_zero_is_rejected():
    model = Quadratic()
    with pytest.raises(ValueError, match="eps"):
        gr_backward(model, lambda: model(), gamma=1e-3, eps=0.0)


def test_gamma_equal_to_eps_gives_exactly_the_clipped_perturbed_gradient():
    """γ = ε (the paper's reasoning setting): the block gradient is clip(g2) bit for bit, g2 the gradient at
    φ + ε·clip(g1) computed here by hand; elsewhere it is clip(g1)."""
    model = tiny_model(dtype=torch.float64)
    batch = rollout_batch()
    batch["advantages"] = batch["advantages"].double() * 300  # both clips act
    loss_fn, closure = grpo_closure(model, batch)
    params, blocks = list(model.parameters()), {id(p) for p in block_parameters(model)}
    g1 = list(torch.autograd.grad(loss_fn(), params))
    clip_(g1, 10.0)
    with torch.no_grad():
        saved = [p.clone() for p in params]
        for p, g in zip(params, g1):
            if id(p) in blocks:
                p.add_(g, alpha=1e-3)
    g2 = list(torch.autograd.grad(loss_fn(), params))
    assert clip_(g2, 10.0) > 10
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    gr_backward(model, closure, gamma=1e-3, eps=1e-3)
    for p, a, b in zip(params, g1, g2):
        assert torch.equal(p.grad, b if id(p) in blocks else a)
