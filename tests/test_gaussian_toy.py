"""gaussian_toy.py against independent computations: §3's quantities by naive loops and closed forms, GR on the
policy MLP by double backward, and a smoke of `study.py --toy gaussian`."""

import dataclasses
import json
import math
import statistics

import pytest
import torch

import gaussian_toy as gt
import grpo
import loading
import study

CFG = gt.ToyConfig()
D = torch.float64


def test_gaussian_logp_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, mu0, a = (torch.randn(5, 2, generator=g, dtype=D) for _ in range(3))
    normal = torch.distributions.Independent(torch.distributions.Normal(mu, 0.3), 1)
    assert torch.allclose(gt.gaussian_logp(a, mu, 0.3), normal.log_prob(a))
    normal0 = torch.distributions.Independent(torch.distributions.Normal(mu0, 0.3), 1)
    kl = torch.distributions.kl_divergence(normal, normal0)
    assert math.isclose(gt.kl_to_init(mu, mu0, 0.3).item(), kl.mean().item(), rel_tol=1e-12)


def test_action_gradient_norm_is_the_true_rewards_gradient():
    s, mu = torch.randn(6, CFG.state_dim, dtype=D), torch.randn(6, 2, dtype=D)
    # ∇ₐ h*·exp(−‖a − a*‖²/2ℓ²) = R*·(a* − a)/ℓ²
    by_hand = gt.true_reward(CFG, s, mu)[:, None] * (gt.optimum(s) - mu) / CFG.true_width ** 2
    got = gt.action_gradient_norm(lambda s, a: gt.true_reward(CFG, s, a), s, mu)
    assert torch.allclose(got, by_hand.norm(dim=-1))


def test_sharp_pair_probability_matches_a_loop_over_iid_pairs():
    """Eq. 9 on a crafted proxy, a cliff of height 3 across a₁ = 0.1 under the policy: the estimator (closed-form
    P(close) x the share of conditioned close pairs) against the raw frequency over iid pairs."""
    sigma, delta, K = 0.3, 0.15, 1.0
    cliff = lambda a: 3 * torch.tanh((a[..., 0] - 0.1) / 0.05)  # noqa: E731
    mu = torch.tensor([[0.0, 0.0]], dtype=D)
    g = torch.Generator().manual_seed(0)
    a1, a2 = gt.close_pairs(mu, sigma, delta, 200_000, g)
    assert (a1 - a2).norm(dim=-1).max() <= delta
    got = gt.sharp_pair_probability(cliff(a1), cliff(a2), K, gt.prob_close(delta, sigma, 2)).item()
    n = 4_000_000
    b1, b2 = (sigma * torch.randn(n, 2, generator=g, dtype=D) for _ in range(2))
    close = (b1 - b2).norm(dim=-1) <= delta
    assert abs(close.double().mean().item() - gt.prob_close(delta, sigma, 2)) < 5 * math.sqrt(0.06 / n)
    naive = (close & ((cliff(b1) - cliff(b2)).abs() > K)).double().mean().item()
    assert 0.005 < naive < 0.05  # the cliff makes sharp pairs common, but not all close pairs
    sd = math.sqrt(naive / n + naive ** 2 / (0.06 * 200_000))
    assert abs(got - naive) < 5 * sd, (got, naive, sd)


def test_excess_bt_loss_is_the_cross_entropy_minus_the_entropy_of_the_true_labels():
    """Eq. 21 written out: E_Y[−log q_Y] − E_Y[−log p_Y], p = σ(ΔR*), q = σ(ΔR̃), and ≥ 0 (a KL)."""
    g = torch.Generator().manual_seed(1)
    t1, t2, r1, r2 = (3 * torch.randn(1000, generator=g, dtype=D) for _ in range(4))
    p, q = torch.sigmoid(t1 - t2), torch.sigmoid(r1 - r2)
    cross_entropy = -(p * torch.log(q) + (1 - p) * torch.log(1 - q))
    entropy = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    got = gt.excess_bt_loss(t1, t2, r1, r2)
    assert torch.allclose(got, (cross_entropy - entropy).mean(), rtol=1e-10)
    assert gt.excess_bt_loss(t1, t2, t1, t2).abs() < 1e-12 and got > 0
    # and by sampling the labels of eq. 2 and evaluating eq. 3 for both rewards
    y = torch.rand(1000, 200, generator=g, dtype=D) < p[:, None]
    bt = lambda d: -torch.nn.functional.logsigmoid(torch.where(y, d[:, None], -d[:, None])).mean()  # noqa: E731
    assert abs((bt(r1 - r2) - bt(t1 - t2)) - got) < 0.03 * got


def batch(cfg, policy, seed=0):
    """A step's rollouts on the spikes proxy: s repeated per rollout, a ~ π_φ, Dr.GRPO advantages (scaled small so
    that no clip acts)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(4, cfg.state_dim, generator=g, dtype=D).repeat_interleave(cfg.group_size, 0)
    with torch.no_grad():
        a = policy(s) + cfg.sigma * torch.randn(len(s), 2, generator=g, dtype=D)
    b = gt.spike_centres(cfg, g)
    return s, a, 0.1 * grpo.group_advantages(gt.spike_reward(cfg, b, s, a), cfg.group_size)


def test_policy_gradient_sees_the_proxy_only_through_the_advantage_weighted_actions():
    """At any φ, ∇ of the Dr.GRPO loss on fixed actions = ∇ of −Σ_i μ_φ(s_i)·A_i a_i / Nσ² (Σ A = 0 per state),
    checked away from the φ the actions were drawn at."""
    policy = gt.initial_policy(CFG, 0)
    s, a, adv = batch(CFG, policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = list(policy.parameters())
    got = torch.autograd.grad(gt.surrogate_loss(policy, s, a, adv, CFG.sigma), params)
    formula = torch.autograd.grad(-(policy(s) * adv[:, None] * a).sum() / (len(a) * CFG.sigma ** 2), params)
    for x, y in zip(got, formula):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("importance", [False, True])
def test_gr_on_the_policy_is_gradient_plus_gamma_hessian_gradient_on_the_hidden_layers(importance):
    """update_gradient with GR = g + γ·H·(P g) by double backward, P = the two hidden layers; g on the input and
    output layers. H is the Hessian of −Σ A log π_φ(a)/N on the fixed actions, or with importance of
    −Σ A π_φ(a)/π_φ_now(a)/N, the loss whose gradient is an unbiased ∇J(φ) for actions drawn at φ_now."""
    cfg = dataclasses.replace(CFG, eps=1e-7)
    policy = gt.initial_policy(cfg, 0)
    s, a, adv = batch(cfg, policy)
    params, hidden = list(policy.parameters()), {id(p) for p in gt.hidden_parameters(policy)}
    linears = [m for m in policy if isinstance(m, torch.nn.Linear)]
    assert hidden == {id(p) for m in linears[1:-1] for p in m.parameters()} and len(linears) == cfg.blocks + 2

    old = gt.gaussian_logp(a, policy(s), cfg.sigma).detach()
    logp = gt.gaussian_logp(a, policy(s), cfg.sigma)
    loss = -(adv * (torch.exp(logp - old) if importance else logp)).sum() / len(a)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [g.detach() if id(p) in hidden else torch.zeros_like(p) for g, p in zip(grads, params)]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    gamma = 0.5
    expected = [g.detach() + gamma * h if id(p) in hidden else g.detach() for g, h, p in zip(grads, hv, params)]

    ratio = gt.update_gradient(cfg, gt.Regime(gamma=gamma, importance=importance), policy, s, a, adv, None)
    err = torch.cat([(p.grad - e).flatten() for p, e in zip(params, expected)]).norm()
    correction = torch.cat([(gamma * h).flatten() for h, p in zip(hv, params) if id(p) in hidden]).norm()
    g1 = torch.cat([g.detach().flatten() for g in grads]).norm()
    assert correction > 1e-3 * g1  # γHg is not negligible
    assert err < 1e-4 * correction, (err, correction)
    assert math.isclose(ratio, (correction / g1).item(), rel_tol=1e-3)


def test_importance_weighting_changes_only_the_second_pass():
    """At φ the weight is exactly 1: without GR the importance-weighted gradient is the plain one, bit for bit; with
    GR the two corrections differ (the weight's own derivative is the action-space curvature term)."""
    policy = gt.initial_policy(CFG, 0)
    s, a, adv = batch(CFG, policy, seed=1)
    grads = {}
    for importance in (False, True):
        gt.update_gradient(CFG, gt.Regime(importance=importance), policy, s, a, adv, None)
        grads[importance] = [p.grad.clone() for p in policy.parameters()]
        gt.update_gradient(CFG, gt.Regime(gamma=1.0, importance=importance), policy, s, a, adv, None)
        grads[importance, "gr"] = [p.grad.clone() for p in policy.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(grads[False], grads[True]))
    diff = sum((x - y).norm() for x, y in zip(grads[False, "gr"], grads[True, "gr"]))
    assert diff > 1e-3 * sum(x.norm() for x in grads[False])


def test_sweep_in_two_processes_is_the_sweep_in_one():
    """The seed fixes everything (policy, proxy, every draw): worker processes reproduce the in-process numbers."""
    cfg = dataclasses.replace(CFG, steps=2, eval_every=1, rm_steps=20, eval_states=8, close_pairs=8)
    regimes = {"gr-is-g1": gt.REGIMES["gr-is-g1"]}
    one, two = gt.sweep(cfg, regimes, seeds=1, workers=1), gt.sweep(cfg, regimes, seeds=1, workers=2)
    for kind in gt.PROXIES:
        h1, h2 = one[kind][0]["regimes"]["gr-is-g1"]["history"], two[kind][0]["regimes"]["gr-is-g1"]["history"]
        assert [list(h) for h in h1] == [list(h) for h in h2]
        for a, b in zip(h1, h2):
            assert all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) or math.isnan(a[k]) and math.isnan(b[k])
                       for k in a), (a, b)


def test_study_gaussian_smoke(tmp_path, monkeypatch):
    """`study.py --toy gaussian`: both proxies, two seeds, a few steps: the seeded table and the plots; the reward
    model ranks held-out pairs about as well as R* itself."""
    monkeypatch.setattr(gt, "REGIMES", {k: gt.REGIMES[k] for k in ("none", "gr-g1", "gr-is-g1")})
    cfg = loading.parse_config(study.StudyConfig, ["--toy", "gaussian", "--seeds", "2", "--steps", "3",
                                                "--parallel", "1", "--out-dir", str(tmp_path)])
    text = study.main(cfg)
    assert text == (tmp_path / "table.md").read_text()
    for kind in gt.PROXIES:
        section = text.split(f"## proxy {kind}")[1].split("## proxy")[0]
        rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in section.splitlines()
                if line.startswith("| ") and "---" not in line}
        assert set(rows) == {"regime", "none", "gr-g1", "gr-is-g1"} and rows["none"][1] == "2"
        assert " ± " in rows["none"][2]  # mean ± sd over the two seeds
        assert rows["none"][9] == "—" and rows["gr-g1"][9] != "—"  # GR's correction ratio: GR runs only
    rm = text.split("## proxy rm")[1]
    rm_accuracy, true_accuracy = (float(x) for x in (rm.split("accuracy ")[1][:5], rm.split("R* itself: ")[1][7:12]))
    assert rm_accuracy > 0.5 and abs(rm_accuracy - true_accuracy) < 0.05
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [len(runs[kind]) for kind in gt.PROXIES] == [2, 2] and set(runs["rm"][1]) == set(gt.REGIMES)
    assert [h["step"] for h in runs["spikes"][0]["gr-g1"]] == [0, 3]  # every eval_every steps and after the last
    final_true = [run["gr-g1"][-1]["true"] for run in runs["spikes"]]  # the table's first column, from the raw runs
    spikes = text.split("## proxy spikes")[1]
    assert f"| gr-g1 | 2 | {statistics.mean(final_true):.3f} ± {statistics.stdev(final_true):.3f} |" in spikes
    for png in ("action_plane.png", "curves_rm.png", "curves_spikes.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
