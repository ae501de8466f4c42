"""The paper's §3 setting as a runnable toy: a Gaussian policy over 2-D actions, a smooth true reward, and proxies.

    python study.py --toy gaussian --seeds 5    # every regime x 5 seeds on both proxies: table, plots, runs.json

§3.2 argues for a Gaussian policy with fixed covariance, a_i ~ N(μ_φ(s), σ²I), an L-Lipschitz true reward R* and a
proxy R̃ whose errors are sharp maxima: GR biases φ toward flat maxima (Prop. 3.3: a bounded action gradient G of R̃
at the mean), where δ-close action pairs with a proxy gap > K are rare (eq. 9: P(S_{K,δ})), and such pairs are what
forces an excess Bradley-Terry loss of the proxy on the policy's own pairs (eq. 10). Here every piece is explicit:

    s ~ N(0, I_4)                                   states
    μ_φ(s) = out(blocks(in(s)))                     a tanh MLP; GR perturbs the two hidden "blocks" only
    R*(s, a) = h*·exp(−‖a − a*(s)‖²/2ℓ²)            a*(s) = (2, 0) + s_{1:2}/2; L = h*/(ℓ√e)
    R̃ = "rm":     an MLP reward model trained by Bradley-Terry on pairs from π_φ1 labelled by R* (eq. 2-3)
    R̃ = "spikes": R* + Σ_k h·exp(−‖a − b_k‖²/2w²), narrow wrong maxima b_k away from the initial policy (Fig. 1)

and the RL update is this project's: Dr.GRPO advantages and loss (grpo.py), `gr.gr_backward` with the blocks as
`perturbed` (g1, g2 clipped to 10, ε = 1e-3), the final clip to 1.0 and Adam. Everything runs in float64 on the CPU,
so the finite difference's precision plays no part.
"""

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gr
from grpo import dr_grpo_loss, group_advantages
from rewards import bradley_terry_loss

PROXIES = ("rm", "spikes")
DTYPE = torch.float64


@dataclass(frozen=True)
class ToyConfig:
    """The Gaussian toy: the world (R*), the proxies, the policy and the RL budget every regime shares."""
    state_dim: int = 4
    action_dim: int = 2
    sigma: float = 0.3              # the policy's fixed std (Σ = σ²I)
    true_height: float = 4.0        # h*
    true_width: float = 1.0         # ℓ
    hidden: int = 32
    blocks: int = 2                 # hidden layers of μ_φ, the part GR perturbs
    # proxy "rm": BT reward model on pairs from the initial policy
    rm_pairs: int = 2048            # and half as many held out, for early stopping
    rm_hidden: int = 32
    rm_steps: int = 400             # at most; the parameters kept are those of the best held-out BT loss
    rm_lr: float = 3e-3
    # proxy "spikes": R* plus narrow spurious maxima in the annulus spike_radii around the origin
    spikes: int = 16
    spike_height: float = 8.0       # h = 2 h*
    spike_width: float = 0.3        # w = σ: narrower spikes are averaged away by the policy's own noise
    spike_radii: tuple = (1.0, 3.5)
    # RL, the same for every regime
    steps: int = 300
    states_per_step: int = 32
    group_size: int = 8
    lr: float = 3e-3
    eps: float = 1e-3
    # §3's measurements
    eval_every: int = 20
    eval_states: int = 64
    eval_actions: int = 32          # per state, for the expected rewards and (as 16 iid pairs) the excess BT loss
    close_pairs: int = 64           # δ-close pairs per state, for P(S_{K,δ})
    delta_over_sigma: float = 0.5   # δ = σ/2
    k_over_l_delta: float = 2.0     # K = 2Lδ: the proxy at least twice as steep as R* can ever be

    @property
    def lipschitz(self) -> float:
        """L of R*: the steepest slope of a Gaussian bump, h*/(ℓ√e)."""
        return self.true_height / (self.true_width * math.sqrt(math.e))

    @property
    def delta(self) -> float:
        return self.delta_over_sigma * self.sigma

    @property
    def K(self) -> float:
        return self.k_over_l_delta * self.lipschitz * self.delta


# ----------------------------------------------------------------------------- rewards

def optimum(s: torch.Tensor) -> torch.Tensor:
    """a*(s) = (2, 0) + s_{1:2}/2, the true reward's maximum. s (..., state_dim) -> (..., 2)."""
    return torch.stack([2 + s[..., 0] / 2, s[..., 1] / 2], -1)


def true_reward(cfg: ToyConfig, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """R*(s, a) = h*·exp(−‖a − a*(s)‖²/2ℓ²). s (..., state_dim), a (..., 2) -> (...)."""
    d2 = (a - optimum(s)).pow(2).sum(-1)
    return cfg.true_height * torch.exp(-d2 / (2 * cfg.true_width ** 2))


def spike_reward(cfg: ToyConfig, b: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """R̃(s, a) = R*(s, a) + Σ_k h·exp(−‖a − b_k‖²/2w²). b (spikes, 2) the wrong maxima."""
    d2 = (a[..., None, :] - b).pow(2).sum(-1)  # (..., spikes)
    return true_reward(cfg, s, a) + cfg.spike_height * torch.exp(-d2 / (2 * cfg.spike_width ** 2)).sum(-1)


def spike_centres(cfg: ToyConfig, g: torch.Generator) -> torch.Tensor:
    """b_k uniform over the annulus spike_radii around the origin (the initial policy sits within ~1 of it)."""
    r0, r1 = cfg.spike_radii
    r = torch.sqrt(r0 ** 2 + (r1 ** 2 - r0 ** 2) * torch.rand(cfg.spikes, generator=g, dtype=DTYPE))
    theta = 2 * math.pi * torch.rand(cfg.spikes, generator=g, dtype=DTYPE)
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1)


def mlp(d_in: int, d_out: int, hidden: int, blocks: int) -> nn.Sequential:
    """in -> tanh -> [Linear(hidden, hidden) -> tanh] x blocks -> out; modules 2, 4, ... are the blocks."""
    layers = [nn.Linear(d_in, hidden), nn.Tanh()]
    for _ in range(blocks):
        layers += [nn.Linear(hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(hidden, d_out)).to(DTYPE)


def hidden_parameters(net: nn.Sequential) -> list[nn.Parameter]:
    """The blocks' weights and biases: what GR perturbs (never the input or output layer, as §C.1)."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    return [p for m in linears[1:-1] for p in m.parameters()]


def preference_pairs(cfg: ToyConfig, policy: nn.Module, n: int, g: torch.Generator):
    """n triplets (s, a_w, a_l): s ~ P(s), a_0, a_1 ~ π(·|s), the winner drawn by BT from R* (eq. 2)."""
    s = torch.randn(n, cfg.state_dim, generator=g, dtype=DTYPE)
    with torch.no_grad():
        mu = policy(s)
    a0, a1 = (mu + cfg.sigma * torch.randn(mu.shape, generator=g, dtype=DTYPE) for _ in range(2))
    p = torch.sigmoid(true_reward(cfg, s, a1) - true_reward(cfg, s, a0))  # P(a_1 > a_0 | s)
    y = (torch.rand(p.shape, generator=g, dtype=DTYPE) < p)[:, None]
    return s, torch.where(y, a1, a0), torch.where(y, a0, a1)


def train_reward_model(cfg: ToyConfig, policy: nn.Module, g: torch.Generator):
    """Proxy "rm": eq. 3 minimised by Adam on pairs from the initial policy, stopped where the BT loss on held-out
    pairs was lowest (the labels are noisy, P(a_w > a_l) ≈ 0.6, and a longer fit memorises them). Returns the RM
    and its held-out BT loss and accuracy next to R*'s own (the floor for these labels)."""
    train = preference_pairs(cfg, policy, cfg.rm_pairs, g)
    held_out = preference_pairs(cfg, policy, cfg.rm_pairs // 2, g)
    rm = mlp(cfg.state_dim + cfg.action_dim, 1, cfg.rm_hidden, 1)
    reward = lambda s, a: rm(torch.cat([s, a], -1))[:, 0]  # noqa: E731
    opt = torch.optim.Adam(rm.parameters(), lr=cfg.rm_lr)
    best, best_step, best_state = math.inf, 0, None
    for step in range(cfg.rm_steps + 1):
        if step % 10 == 0:
            with torch.no_grad():
                held = bradley_terry_loss(reward(held_out[0], held_out[1]), reward(held_out[0], held_out[2])).item()
            if held < best:
                best, best_step, best_state = held, step, {k: v.clone() for k, v in rm.state_dict().items()}
            elif step - best_step >= 50:
                break
        opt.zero_grad()
        bradley_terry_loss(reward(train[0], train[1]), reward(train[0], train[2])).backward()
        opt.step()
    rm.load_state_dict(best_state)
    s, a_w, a_l = held_out
    with torch.no_grad():
        r_w, r_l, t_w, t_l = reward(s, a_w), reward(s, a_l), true_reward(cfg, s, a_w), true_reward(cfg, s, a_l)
    info = {"rm_steps": best_step,
            "rm_bt": bradley_terry_loss(r_w, r_l).item(), "rm_accuracy": (r_w > r_l).double().mean().item(),
            "true_bt": bradley_terry_loss(t_w, t_l).item(), "true_accuracy": (t_w > t_l).double().mean().item()}
    return rm.requires_grad_(False), info


def make_proxy(cfg: ToyConfig, kind: str, policy: nn.Module, g: torch.Generator):
    """R̃(s, a) -> (...) for `kind` in PROXIES, and what the report shows about it: the RM's held-out fit, or the
    spikes' centres b."""
    if kind == "rm":
        rm, info = train_reward_model(cfg, policy, g)
        return (lambda s, a: rm(torch.cat([s.expand(*a.shape[:-1], -1), a], -1))[..., 0]), info
    if kind == "spikes":
        b = spike_centres(cfg, g)
        return (lambda s, a: spike_reward(cfg, b, s, a)), {"spikes": b}
    raise ValueError(f"proxy must be one of {PROXIES}, got {kind!r}")


# ----------------------------------------------------------------------------- the quantities of §3

def gaussian_logp(a: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(a; μ, σ²I). a, mu (..., n) -> (...)."""
    n = a.shape[-1]
    return -(a - mu).pow(2).sum(-1) / (2 * sigma ** 2) - n * math.log(sigma * math.sqrt(2 * math.pi))


def action_gradient_norm(proxy, s: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Prop. 3.3's quantity ‖∇_a R̃(s, μ_φ(s))‖ per state. s (S, state_dim), mu (S, n) -> (S,)."""
    a = mu.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(proxy(s, a).sum(), a)
    return grad.norm(dim=-1)


def prob_close(delta: float, sigma: float, n: int) -> float:
    """P(‖a_1 − a_2‖ ≤ δ) for a_1, a_2 iid N(μ, σ²I_n): a_1 − a_2 ~ N(0, 2σ²I), so ‖a_1 − a_2‖²/2σ² ~ χ²_n.
    The same for every μ: under a fixed covariance closeness does not depend on the policy's mean."""
    return torch.special.gammainc(torch.tensor(n / 2), torch.tensor(delta ** 2 / (4 * sigma ** 2))).item()


def close_pairs(mu: torch.Tensor, sigma: float, delta: float, m: int, g: torch.Generator):
    """m pairs (a_1, a_2) iid ~ N(μ, σ²I) conditioned on ‖a_1 − a_2‖ ≤ δ, per row of mu (S, n) -> 2 x (S, m, n).

    For iid Gaussians the midpoint c = (a_1 + a_2)/2 ~ N(μ, σ²/2) and the difference d = a_2 − a_1 ~ N(0, 2σ²) are
    independent, so conditioning on ‖d‖ ≤ δ leaves c alone: d by rejection, c as usual."""
    S, n = mu.shape
    ds = []
    while sum(len(d) for d in ds) < S * m:
        d = math.sqrt(2) * sigma * torch.randn(4 * S * m, n, generator=g, dtype=mu.dtype)
        ds.append(d[d.norm(dim=-1) <= delta])
    d = torch.cat(ds)[:S * m].view(S, m, n)
    c = mu[:, None] + sigma / math.sqrt(2) * torch.randn(S, m, n, generator=g, dtype=mu.dtype)
    return c - d / 2, c + d / 2


def sharp_pair_probability(r1: torch.Tensor, r2: torch.Tensor, K: float, p_close: float) -> torch.Tensor:
    """Eq. 9's P(S_{K,δ}(R̃) | π_φ) = P(‖a_1 − a_2‖ ≤ δ)·P(|R̃(a_1) − R̃(a_2)| > K | δ-close), from the proxy's
    rewards r1, r2 of δ-close pairs (any shape)."""
    return p_close * ((r1 - r2).abs() > K).double().mean()


def excess_bt_loss(true1: torch.Tensor, true2: torch.Tensor, proxy1: torch.Tensor, proxy2: torch.Tensor):
    """Eq. 10's left side, L_BT(R̃) − L_BT(R*) on pairs labelled by R* (eq. 21): E KL(Bern(p) ‖ Bern(q)) with
    p = σ(R*(a_1) − R*(a_2)), q = σ(R̃(a_1) − R̃(a_2)); the expectation over the labels is taken exactly."""
    dt, dp = true1 - true2, proxy1 - proxy2
    p = torch.sigmoid(dt)
    return (p * (F.logsigmoid(dt) - F.logsigmoid(dp)) + (1 - p) * (F.logsigmoid(-dt) - F.logsigmoid(-dp))).mean()


def bt_lower_bound(K: float, L: float, delta: float, p_sharp: float) -> float:
    """Eq. 10's right side, 2(σ(K) − σ(Lδ))²·P(S_{K,δ}); needs K > Lδ."""
    return 2 * (torch.sigmoid(torch.tensor(K)) - torch.sigmoid(torch.tensor(L * delta))).item() ** 2 * p_sharp


def kl_to_init(mu: torch.Tensor, mu0: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(π_φ ‖ π_φ1) averaged over states; exact for equal covariances: ‖μ − μ_1‖²/2σ²."""
    return ((mu - mu0).pow(2).sum(-1) / (2 * sigma ** 2)).mean()


@torch.no_grad()
def measure(cfg: ToyConfig, policy: nn.Module, mu0: torch.Tensor, proxy, s: torch.Tensor,
            g: torch.Generator) -> dict:
    """§3's quantities of the policy on the evaluation states s (S, state_dim); mu0 = μ_φ1(s)."""
    mu = policy(s)
    a = mu[:, None] + cfg.sigma * torch.randn(len(s), cfg.eval_actions, cfg.action_dim, generator=g, dtype=DTYPE)
    s_ = s[:, None]
    true, prox = true_reward(cfg, s_, a), proxy(s_, a)
    half = cfg.eval_actions // 2  # iid pairs (a_1, a_2): the first half against the second
    a1, a2 = close_pairs(mu, cfg.sigma, cfg.delta, cfg.close_pairs, g)
    p_sharp = sharp_pair_probability(proxy(s_, a1), proxy(s_, a2), cfg.K,
                                     prob_close(cfg.delta, cfg.sigma, cfg.action_dim)).item()
    with torch.enable_grad():
        G = action_gradient_norm(proxy, s, mu)
    return {"true": true.mean().item(), "proxy": prox.mean().item(), "G": G.mean().item(), "p_sharp": p_sharp,
            "excess_bt": excess_bt_loss(true[:, :half], true[:, half:], prox[:, :half], prox[:, half:]).item(),
            "kl_init": kl_to_init(mu, mu0, cfg.sigma).item(),
            "mean_distance": (mu - optimum(s)).norm(dim=-1).mean().item()}


# ----------------------------------------------------------------------------- RL on the proxy

@dataclass(frozen=True)
class Regime:
    """One way of updating: lr as a multiple of the toy's, a KL penalty to π_φ1, or GR at γ; `importance` weights
    GR's second pass by π_φ+εg1(a)/π_φ(a) (see `update_gradient`)."""
    lr_scale: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    importance: bool = False


REGIMES = {"none": Regime(), "none-half-lr": Regime(lr_scale=0.5),
           "kl-b0.1": Regime(beta=0.1), "kl-b1": Regime(beta=1.0),
           **{f"gr-g{g:g}": Regime(gamma=g) for g in (1e-2, 1e-1, 1, 10, 100, 1000)},
           **{f"gr-is-g{g:g}": Regime(gamma=g, importance=True) for g in (1e-2, 1e-1, 1, 10)}}


def surrogate_loss(policy: nn.Module, s: torch.Tensor, a: torch.Tensor, advantages: torch.Tensor, sigma: float,
                   ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                   old_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The Dr.GRPO loss of grpo.py on Gaussian actions, each a one-token completion: s (N, state_dim) repeated per
    rollout, a (N, n), advantages (N,), normaliser N. With old_logp = log π_old(a) (N,) each action's term is weighted
    by π_φ(a)/π_old(a), detached, as train_step's --gr-importance-weights does: 1 at φ = old, plain Dr.GRPO."""
    logp = gaussian_logp(a, policy(s), sigma)[:, None]  # (N, 1)
    weights = None if old_logp is None else torch.exp(logp.detach() - old_logp[:, None])
    ref = None if ref_logp is None else ref_logp[:, None]
    return dr_grpo_loss(logp, advantages, torch.ones_like(logp), len(a), ref, beta, weights=weights)


def update_gradient(cfg: ToyConfig, regime: Regime, policy: nn.Module, s: torch.Tensor, a: torch.Tensor,
                    advantages: torch.Tensor, ref_logp: torch.Tensor | None) -> float:
    """Leave the step's gradient in .grad, as grpo.train_step does (before its clip): plain backward, or GR with the
    hidden layers perturbed. Returns GR's correction ratio (nan without GR).

    GR's second pass reuses the actions drawn at φ (App. C.1). On them the Dr.GRPO gradient at any φ' is
    −Σ_i A_i J_φ'(s_i)ᵀ a_i / Nσ² (the advantages sum to 0 per state), so g2 − g1 sees how the MLP's Jacobian J
    bends, never how R̃ curves in action space. regime.importance weights the second pass by π_φ'(a)/π_φ(a), which
    makes g2 an unbiased estimate of ∇J(φ') and brings that curvature in (App. C.1: "could be corrected")."""
    old_logp = gaussian_logp(a, policy(s), cfg.sigma).detach() if regime.importance else None

    def closure():
        loss = surrogate_loss(policy, s, a, advantages, cfg.sigma, ref_logp, regime.beta, old_logp)
        loss.backward()
        return loss

    if not regime.gamma:
        for p in policy.parameters():
            p.grad = None
        closure()
        return float("nan")
    return gr.gr_backward(policy, closure, gamma=regime.gamma, eps=cfg.eps,
                          perturbed=hidden_parameters(policy))["correction_ratio"]


def rl_step(cfg: ToyConfig, regime: Regime, policy: nn.Module, policy0: nn.Module, optimizer, proxy,
            g: torch.Generator) -> float:
    """One Dr.GRPO step on the proxy: G actions per state, group advantages, the gradient of the loss (+β·KL to
    π_φ1), clipped to 1.0, Adam. Returns GR's correction ratio (nan without GR)."""
    s = torch.randn(cfg.states_per_step, cfg.state_dim, generator=g, dtype=DTYPE).repeat_interleave(cfg.group_size, 0)
    with torch.no_grad():
        mu = policy(s)
        a = mu + cfg.sigma * torch.randn(mu.shape, generator=g, dtype=DTYPE)  # (N, n), N = states x G
        advantages = group_advantages(proxy(s, a), cfg.group_size)
        ref_logp = gaussian_logp(a, policy0(s), cfg.sigma) if regime.beta else None
    ratio = update_gradient(cfg, regime, policy, s, a, advantages, ref_logp)
    gr.clip_([p.grad for p in policy.parameters()], 1.0)
    optimizer.step()
    return ratio


def initial_policy(cfg: ToyConfig, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(cfg.state_dim, cfg.action_dim, cfg.hidden, cfg.blocks)


@torch.no_grad()
def action_plane(cfg: ToyConfig, proxy, paths: list[torch.Tensor], n: int = 160) -> dict:
    """R̃(0, a) and R*(0, a) on an n x n grid over the box that holds the paths and a*(0) with a margin."""
    pts = torch.cat([*paths, torch.tensor([[-1.0, -1.5], [3.5, 1.5]], dtype=DTYPE)])
    lo, hi = pts.min(0).values - 0.7, pts.max(0).values + 0.7
    x, y = torch.linspace(lo[0], hi[0], n, dtype=DTYPE), torch.linspace(lo[1], hi[1], n, dtype=DTYPE)
    a = torch.stack(torch.meshgrid(x, y, indexing="xy"), -1)  # (n, n, 2)
    s = torch.zeros(1, 1, cfg.state_dim, dtype=DTYPE)
    return {"x": x, "y": y, "proxy": proxy(s, a), "true": true_reward(cfg, s, a)}


def run(cfg: ToyConfig, kind: str, regimes: dict[str, Regime], seed: int) -> dict:
    """Every regime from the same initial policy and proxy (built from `seed`), with the same random draws:
    {"proxy": make_proxy's info, "plane": action_plane, "regimes": {name: {"history": [measurements],
    "path": (steps + 1, 2)}}}, where `path` is μ_φ(0) before every step and after the last (the plots' state s = 0,
    a*(0) = (2, 0))."""
    policy0 = initial_policy(cfg, seed)
    proxy, info = make_proxy(cfg, kind, policy0, torch.Generator().manual_seed(1000 + seed))
    s_eval = torch.randn(cfg.eval_states, cfg.state_dim, generator=torch.Generator().manual_seed(2000 + seed),
                         dtype=DTYPE)
    with torch.no_grad():
        mu0 = policy0(s_eval)
    origin = torch.zeros(1, cfg.state_dim, dtype=DTYPE)
    out = {"proxy": info, "regimes": {}}
    for name, regime in regimes.items():
        policy = initial_policy(cfg, seed)
        optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr * regime.lr_scale, foreach=True)
        g_rl, g_eval = torch.Generator().manual_seed(3000 + seed), torch.Generator().manual_seed(4000 + seed)
        history, path, ratios = [], [], []
        for step in range(cfg.steps + 1):
            with torch.no_grad():
                path.append(policy(origin)[0])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                ratio = sum(ratios) / len(ratios) if ratios else float("nan")  # GR's mean over the steps since
                history.append({"step": step, **measure(cfg, policy, mu0, proxy, s_eval, g_eval),
                                "correction_ratio": ratio})
                ratios = []
            if step < cfg.steps:
                ratios.append(rl_step(cfg, regime, policy, policy0, optimizer, proxy, g_rl))
        out["regimes"][name] = {"history": history, "path": torch.stack(path)}
    out["plane"] = action_plane(cfg, proxy, [r["path"] for r in out["regimes"].values()])
    return out


def sweep(cfg: ToyConfig, regimes: dict[str, Regime], seeds: int, workers: int = 2) -> dict[str, list[dict]]:
    """`run` for every proxy and seed, `workers` processes at a time (1: in this process). {proxy: [run per seed]}."""
    jobs = [(cfg, kind, regimes, seed) for kind in PROXIES for seed in range(seeds)]
    if workers == 1:  # one thread, as each worker below: on tensors this small threads only add overhead
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            outs = [run(*job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            outs = list(pool.map(run, *zip(*jobs)))
    return {kind: [o for o, job in zip(outs, jobs) if job[1] == kind] for kind in PROXIES}


# ----------------------------------------------------------------------------- plots

def regime_colors(names: list[str]) -> dict[str, tuple]:
    """Fixed colours for the baselines; GR darker with γ (blues), importance-weighted GR likewise (reds)."""
    import matplotlib.pyplot as plt
    fixed = {"none": "black", "none-half-lr": "grey", "kl-b0.1": "tab:olive", "kl-b1": "tab:green"}
    colors = {}
    for prefix, cmap in (("gr-is-", plt.cm.Reds), ("gr-", plt.cm.Blues)):
        group = [n for n in names if n.startswith(prefix) and n not in colors]
        colors.update({n: cmap(0.35 + 0.65 * i / max(len(group) - 1, 1)) for i, n in enumerate(group)})
    return {n: colors.get(n, fixed.get(n, "tab:purple")) for n in names}


def plot_action_plane(results: dict[str, list[dict]], path: Path) -> Path:
    """One panel per proxy, seed 0, state s = 0: R̃ filled, R* as lines, μ_φ(0) of every regime over the steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 7))
    for ax, (kind, runs) in zip(axes, results.items()):
        out, plane = runs[0], runs[0]["plane"]
        filled = ax.contourf(plane["x"], plane["y"], plane["proxy"], levels=30, cmap="Greys")
        fig.colorbar(filled, ax=ax, label="proxy R̃(0, a)", shrink=0.8)
        lines = ax.contour(plane["x"], plane["y"], plane["true"], levels=[0.5, 1, 2, 3], colors="tab:orange",
                           linewidths=1)
        ax.clabel(lines, fontsize=7, fmt="R*=%g")
        colors = regime_colors(list(out["regimes"]))
        for name, r in out["regimes"].items():
            xy = r["path"]
            ax.plot(xy[:, 0], xy[:, 1], color=colors[name], lw=1.2, label=name)
            ax.plot(xy[-1, 0], xy[-1, 1], "o", color=colors[name], ms=6, mec="white", mew=0.6)
        ax.plot(*optimum(torch.zeros(2)), "*", color="tab:orange", ms=15, mec="black", label="a*(0): R*'s maximum")
        ax.plot(*next(iter(out["regimes"].values()))["path"][0], "s", color="white", mec="black", ms=7,
                label="μ_φ1(0): the start")
        ax.set(xlabel="action a₁", ylabel="action a₂", aspect="equal",
               title=f"proxy \"{kind}\": μ_φ(0) over the steps (dots: the end), seed 0")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=8, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CURVES = [("true", "true reward E R*", False), ("proxy", "proxy reward E R̃", False),
          ("G", "G = ‖∇ₐR̃(s, μ_φ(s))‖ (Prop. 3.3)", False), ("p_sharp", "P(S_K,δ) (eq. 9)", False),
          ("excess_bt", "excess BT loss of R̃ (eq. 10)", False), ("kl_init", "KL to the initial policy", True),
          ("correction_ratio", "GR correction / ‖g1‖", True)]


def plot_curves(kind: str, runs: list[dict], path: Path) -> Path:
    """§3's quantities over the steps for one proxy, mean over seeds, one line per regime."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(runs[0]["regimes"])
    colors = regime_colors(names)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (key, label, log) in zip(axes.flat, CURVES):
        for name in names:
            histories = [r["regimes"][name]["history"] for r in runs]
            steps = [h["step"] for h in histories[0]]
            mean = [sum(h[i][key] for h in histories) / len(histories) for i in range(len(steps))]
            ax.plot(steps, mean, color=colors[name], lw=1.3, label=name)
        ax.set(xlabel="step", title=label, yscale="log" if log else "linear")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(*axes.flat[0].get_legend_handles_labels(), loc="center", fontsize=9, ncol=2)
    fig.suptitle(f"Gaussian toy, proxy \"{kind}\": mean over {len(runs)} seeds, measured every "
                 f"{runs[0]['regimes'][names[0]]['history'][1]['step']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
