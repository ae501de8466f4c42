"""grpo.py math against naive per-sequence references."""

import math

import pytest
import torch

import generation
import grpo
import rundir
from tiny import VOCAB, rollout_batch, tiny_model


def test_group_advantages_naive():
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0, 5.0, 5.0, -1.0, 3.0])  # two groups of 4
    expected = []
    for g in range(2):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(group) / 4
        expected += [r - mean for r in group]  # no division by the std
    assert grpo.group_advantages(rewards[:8], 4).tolist() == pytest.approx(expected)
    assert grpo.group_advantages(torch.tensor([5.0, 5.0, 5.0]), 3).abs().sum() == 0  # equal rewards: no signal


def test_dr_grpo_loss_naive_loop():
    g = torch.Generator().manual_seed(0)
    N, T = 5, 6
    logp = -torch.rand(N, T, generator=g)
    ref = -torch.rand(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = torch.ones(N, T)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    beta, normalizer = 0.1, N * T  # constant: sequences × max completion length
    naive = 0.0
    for i in range(N):
        for t in range(T):
            if mask[i, t]:
                d = (ref[i, t] - logp[i, t]).item()
                naive += -adv[i].item() + beta * (torch.exp(torch.tensor(d)).item() - d - 1)
    loss = grpo.dr_grpo_loss(logp, adv, mask, normalizer, ref, beta, "k3")
    assert loss.item() == pytest.approx(naive / normalizer, rel=1e-6)


def test_dr_grpo_gradient_is_reinforce():
    logp = torch.randn(3, 4, requires_grad=True)
    adv, mask = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).float()
    grpo.dr_grpo_loss(logp, adv, mask, normalizer=12).backward()
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / 12)


def test_kl_estimators():
    p = torch.log_softmax(torch.randn(4, 10), -1)
    q = torch.log_softmax(torch.randn(4, 10), -1)
    assert (grpo.kl_per_token(p, q, "k3") >= 0).all()
    assert grpo.kl_per_token(p, p, "k3").abs().max() == 0
    assert grpo.kl_per_token(p, p, "k1").abs().max() == 0
    torch.testing.assert_close(grpo.kl_per_token(p, q, "k1"), p - q)
    # k3 is unbiased for KL(π‖π_ref) when the tokens are sampled from π
    probs = p[0].exp()
    exact = (probs * (p[0] - q[0])).sum()
    k3_mean = (probs * grpo.kl_per_token(p[0], q[0], "k3")).sum()
    torch.testing.assert_close(k3_mean, exact)
    with pytest.raises(ValueError):
        grpo.kl_per_token(p, q, "k2")


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_token_logprobs_match_unpadded_forward(arch):
    model = tiny_model(arch)
    batch = rollout_batch()
    T = batch["completion_mask"].shape[1]
    logp, entropy = grpo.token_logprobs(model, batch["input_ids"], batch["attention_mask"], T, 0.7, with_entropy=True)
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][keep][None]  # the sequence alone: no padding at all
        logits = model(ids).logits[0].float() / 0.7
        n = int(batch["completion_mask"][i].sum())
        lp = torch.log_softmax(logits[-n - 1:-1], -1)
        ref = lp.gather(-1, ids[0, -n:, None]).squeeze(-1)
        torch.testing.assert_close(logp[i, :n], ref, rtol=1e-4, atol=1e-5)
        ent = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(entropy[i, :n], ent, rtol=1e-4, atol=1e-5)


def naive_greedy(model, prompt, n, eos):
    ids = prompt[None]
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
        if nxt.item() == eos:
            break
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_greedy_generation_matches_naive_loop(arch):
    model = tiny_model(arch)
    batch = rollout_batch(n=4, prompt_len=5, completion_len=1, group=2)
    prompt_ids, prompt_mask = batch["input_ids"][:, :5], batch["attention_mask"][:, :5]
    # make the token greedy decoding emits third for row 0 the EOS, so rows stop at different lengths
    completion, mask = generation.generate(model, prompt_ids, prompt_mask, max_new_tokens=8, eos_token_ids=[VOCAB - 1],
                                           pad_token_id=0, temperature=0)
    eos = completion[0, 2].item()
    completion, mask = generation.generate(model, prompt_ids, prompt_mask, max_new_tokens=8, eos_token_ids=[eos],
                                           pad_token_id=0, temperature=0)
    for i in range(4):
        ref = naive_greedy(model, prompt_ids[i][prompt_mask[i].bool()], 8, eos)
        n = int(mask[i].sum())
        assert completion[i, :n].tolist() == ref
        assert (completion[i, n:] == 0).all()  # padded after EOS
    assert mask[0].sum() <= 3 and completion[0, int(mask[0].sum()) - 1] == eos


def test_completion_mask_and_has_eos():
    completion = torch.tensor([[5, 9, 3, 9, 4], [5, 6, 7, 8, 4], [9, 0, 0, 0, 0]])
    eos = torch.tensor([9])
    assert generation.completion_mask(completion, eos).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert generation.has_eos(completion, [9]).tolist() == [True, False, True]


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top1 = generation.sample_token(logits, 1.0, top_k=1, generator=gen)
    assert (top1 == 0).all()
    top2 = generation.sample_token(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    # softmax([4,3,0,-1]) = [.72,.26,.013,.005]: top_p 0.5 keeps token 0 only, 0.9 keeps 0 and 1
    assert (generation.sample_token(logits, 1.0, top_p=0.5, generator=gen) == 0).all()
    assert set(generation.sample_token(logits, 1.0, top_p=0.9, generator=gen).tolist()) == {0, 1}
    freq = (generation.sample_token(logits, 1.0, generator=gen) == 0).float().mean()
    assert abs(freq - 0.72) < 0.05


def _train_batch(model, reg):
    batch = rollout_batch()
    if reg in ("kl", "reset"):
        T = batch["completion_mask"].shape[1]
        batch["ref_logp"] = grpo.reference_logprobs(model, batch, 0.7, 4) - 0.1 * torch.rand(6, T)
    return batch


@pytest.mark.parametrize("reg", grpo.REGS)
def test_train_step_changes_params_and_reports(reg):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    batch = _train_batch(model, reg)
    metrics = grpo.train_step(model, opt, batch, reg=reg, temperature=0.7, normalizer=6 * 7, micro_batch_size=4,
                              beta=0.1, gamma=1e-3, eps=1e-3)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert {"loss", "grad_norm", "g1_norm", "entropy"} <= metrics.keys()
    assert ("g2_norm" in metrics) == (reg == "gr")
    assert ("kl" in metrics) == (reg in ("kl", "reset"))
    assert metrics["kl"] > 0 if "kl" in metrics else True


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer whose step records the gradient it is handed (after train_step's clip) and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def naive_logp(model, batch, i: int, temperature: float):
    """log π of sequence i's completion tokens, the sequence alone (no padding): log_softmax(logits / T)."""
    ids = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
    n = int(batch["completion_mask"][i].sum())
    logits = model(ids).logits[0, -n - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, -n:, None]).squeeze(-1)


def naive_dr_grpo_loss(model, batch, *, temperature, normalizer, beta, estimator, weights=None):
    """Σ_i Σ_t w_t·[−A_i·π/π_detached + β·KL_t] / normaliser, one unpadded sequence at a time, with
    log π = log_softmax(logits / T) and KL_t = e^(q−p) − (q−p) − 1 (k3) or p − q (k1), written out here."""
    total = 0.0
    for i in range(batch["input_ids"].shape[0]):
        p = naive_logp(model, batch, i, temperature)
        n = len(p)
        q = batch["ref_logp"][i, :n]
        kl = torch.exp(q - p) - (q - p) - 1 if estimator == "k3" else p - q
        w = 1.0 if weights is None else weights[i, :n]
        total = total + (w * (-batch["advantages"][i] * torch.exp(p - p.detach()) + beta * kl)).sum()
    return total / normalizer


@pytest.mark.parametrize("reg,estimator", [("kl", "k3"), ("reset", "k3"), ("kl", "k1"), ("none", "k3")])
def test_train_step_gradient_is_autograd_of_the_written_out_loss(reg, estimator):
    """The update's gradient (two micro-batches, tempered log-probs) equals autograd of the loss written out above,
    with the β·KL term for kl and reset and without it for none (even when β and reference log-probs are passed)."""
    model = tiny_model(dtype=torch.float64)
    batch = _train_batch(model, "kl")
    batch["advantages"] = batch["advantages"].double()
    beta, temperature, normalizer = 0.3, 0.7, 6 * 7
    expected = torch.autograd.grad(naive_dr_grpo_loss(model, batch, temperature=temperature, normalizer=normalizer,
                                                      beta=beta if reg != "none" else 0.0, estimator=estimator),
                                   list(model.parameters()))
    opt = GradientRecorder(model.parameters())
    grpo.train_step(model, opt, batch, reg=reg, temperature=temperature, normalizer=normalizer, micro_batch_size=4,
                    beta=beta, kl_estimator=estimator, max_grad_norm=math.inf)
    for got, want in zip(opt.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_kl_estimator_gradients_are_their_formulas():
    """d/dp of each estimator at p = log π, q = log π_ref: k3 1 − e^(q−p); k3-ratio (TRL ≥ 1.10) the same plus k3,
    with the same value as k3; k1 1."""
    g = torch.Generator().manual_seed(0)
    p0, q = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3, -torch.rand(5, 7, generator=g, dtype=torch.float64)
    k3 = torch.exp(q - p0) - (q - p0) - 1
    expected = {"k3": 1 - torch.exp(q - p0), "k3-ratio": 1 - torch.exp(q - p0) + k3, "k1": torch.ones_like(p0)}
    for estimator, grad in expected.items():
        p = p0.clone().requires_grad_()
        value = grpo.kl_per_token(p, q, estimator)
        value.sum().backward()
        torch.testing.assert_close(p.grad, grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(value.detach(), k3 if estimator != "k1" else p0 - q, rtol=1e-12, atol=1e-12)


def test_truncated_importance_sampling_gradient_is_the_weighted_loss():
    """With sampler log-probs and --tis-cap C, the update's gradient is autograd of the loss written out with each
    token weighted by min(π_φ / π_sampler, C), computed here from the naive log-probs; C truncates some weights."""
    model = tiny_model(dtype=torch.float64)
    batch = _train_batch(model, "kl")
    batch["advantages"] = batch["advantages"].double()
    N, T = batch["completion_mask"].shape
    batch["sampler_logp"] = grpo.reference_logprobs(model, batch, 0.7, 4) + 0.5 * torch.randn(
        N, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cap, normalizer = 1.5, N * T
    weights = torch.zeros(N, T, dtype=torch.float64)
    with torch.no_grad():
        for i in range(N):
            n = int(batch["completion_mask"][i].sum())
            weights[i, :n] = torch.exp(naive_logp(model, batch, i, 0.7) - batch["sampler_logp"][i, :n]).clamp(max=cap)
    assert (weights == cap).any() and ((weights > 0) & (weights < cap)).any()
    expected = torch.autograd.grad(naive_dr_grpo_loss(model, batch, temperature=0.7, normalizer=normalizer, beta=0.3,
                                                      estimator="k3", weights=weights), list(model.parameters()))
    opt = GradientRecorder(model.parameters())
    metrics = grpo.train_step(model, opt, batch, reg="kl", temperature=0.7, normalizer=normalizer, micro_batch_size=4,
                              beta=0.3, max_grad_norm=math.inf, tis_cap=cap)
    for got, want in zip(opt.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    m = batch["completion_mask"].bool()
    ratio = torch.exp(grpo.reference_logprobs(model, batch, 0.7, 4) - batch["sampler_logp"])
    assert metrics["sampler/ratio_max"] == pytest.approx(ratio[m].max().item(), rel=1e-6)  # logged in float32
    assert metrics["sampler/abs_logp_diff"] == pytest.approx(ratio[m].log().abs().mean().item(), rel=1e-6)


def test_gr_importance_weights_reweight_only_the_second_pass():
    """--gr-importance-weights: grad = g1 + (γ/ε)(g2_w − g1), where g2_w is the gradient at φ' = φ + ε·g1 (blocks only)
    of the loss with each token weighted by π_φ'/π_φ, all written out here (no clip acts: norms < 10)."""
    from gr import block_parameters
    model = tiny_model(dtype=torch.float64, exact=True)
    batch = _train_batch(model, "none")
    batch["advantages"] = batch["advantages"].double() * 0.3
    params, blocks = list(model.parameters()), {id(p) for p in block_parameters(model)}
    gamma, eps, normalizer, N = 0.5, 1e-3, 42, batch["input_ids"].shape[0]
    loss = lambda weights=None: naive_dr_grpo_loss(model, batch, temperature=0.7, normalizer=normalizer,  # noqa: E731
                                                   beta=0.0, estimator="k3", weights=weights)
    batch["ref_logp"] = torch.zeros(N, 7, dtype=torch.float64)  # unused at β = 0
    g1 = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        logp_phi = [naive_logp(model, batch, i, 0.7) for i in range(N)]
        for p, g in zip(params, g1):
            if id(p) in blocks:
                p.add_(g, alpha=eps)
        weights = torch.zeros(N, 7, dtype=torch.float64)
        for i in range(N):
            weights[i, :len(logp_phi[i])] = torch.exp(naive_logp(model, batch, i, 0.7) - logp_phi[i])
    assert (weights[batch["completion_mask"].bool()] - 1).abs().max() > 1e-6  # the weights are not all 1
    g2 = torch.autograd.grad(loss(weights), params)
    with torch.no_grad():
        for p, g in zip(params, g1):
            if id(p) in blocks:
                p.sub_(g, alpha=eps)
    del batch["ref_logp"]
    assert max(torch.linalg.vector_norm(g) for g in g1) < 10
    opt = GradientRecorder(model.parameters())
    grpo.train_step(model, opt, batch, reg="gr", temperature=0.7, normalizer=normalizer, micro_batch_size=4,
                    gamma=gamma, eps=eps, max_grad_norm=math.inf, gr_importance_weights=True)
    for p, got, a, b in zip(params, opt.grads, g1, g2):
        want = a + (gamma / eps) * (b - a) if id(p) in blocks else a
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_reset_optimizer_state_is_a_fresh_adam():
    """After some steps, `reset_optimizer_state` makes the next Adam step the step of a newly built Adam."""
    model, fresh_model = tiny_model(), tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(3):
        grpo.train_step(model, opt, rollout_batch(seed=seed), reg="none", temperature=1.0, normalizer=42,
                        micro_batch_size=6)
    fresh_model.load_state_dict(model.state_dict())
    grpo.reset_optimizer_state(opt)
    grpo.train_step(model, opt, rollout_batch(seed=9), reg="none", temperature=1.0, normalizer=42, micro_batch_size=6)
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=1e-2)
    grpo.train_step(fresh_model, fresh, rollout_batch(seed=9), reg="none", temperature=1.0, normalizer=42,
                    micro_batch_size=6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


def test_non_finite_loss_stops_with_step_number():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = rollout_batch()
    batch["advantages"][0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="step 17"):
        grpo.train_step(model, opt, batch, reg="none", temperature=1.0, normalizer=42, micro_batch_size=6, step=17)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no update applied


def test_reset_reference_copies_policy():
    policy, ref = tiny_model(seed=0), tiny_model(seed=1)
    grpo.reset_reference(ref, policy)
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))


def test_checkpoint_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    grpo.train_step(model, opt, rollout_batch(), reg="none", temperature=1.0, normalizer=42, micro_batch_size=6)
    for step in (3, 5):
        ckpt = rundir.save_checkpoint(tmp_path, step, model, opt, tok)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000005"]  # older removed, no temp dir left
    assert rundir.latest_checkpoint(tmp_path) == ckpt
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    opt2 = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    assert rundir.load_trainer_state(ckpt, loaded, opt2) == 5
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


# ----------------------------------------------------------------------------- generation against HF and the math

@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen2", True), ("llama", False), ("gpt_neox", False)])
def test_greedy_generation_matches_hf_generate(arch, tie):
    """Our static-cache decode == HF `generate` (its own cache and masks), unequal left-padded prompts."""
    model = tiny_model(arch, tie=tie)
    batch = rollout_batch(n=6, prompt_len=7, completion_len=1, group=3)
    ids, mask = batch["input_ids"][:, :7], batch["attention_mask"][:, :7]
    assert len(set(mask.sum(1).tolist())) == 3  # three prompt lengths
    ours, ours_mask = generation.generate(model, ids, mask, max_new_tokens=12, eos_token_ids=[VOCAB + 1],
                                          pad_token_id=0, temperature=0)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                        eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, hf[:, 7:]) and ours_mask.all()


def test_sampled_token_frequencies_match_softmax_at_temperature():
    """40k draws at T = 0.7 against softmax(logits / T), within 5 standard errors of each frequency; at T = 1 the
    same draws would be far outside (the test can tell the temperatures apart)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n, T = 40_000, 0.7
    p = torch.softmax(logits[0].double() / T, -1)
    se = (p * (1 - p) / n).sqrt()
    draws = generation.sample_token(logits.repeat(n, 1), T, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert ((freq - p).abs() <= 5 * se).all(), (freq, p)
    assert ((freq - torch.softmax(logits[0].double(), -1)).abs() > 5 * se).any()


def test_generate_samples_the_first_token_from_softmax_at_temperature():
    """End to end through `generate` (pre-drawn uniforms, static cache): the first sampled token of 20k copies of
    one prompt is distributed as softmax(logits / T) of the model's own next-token logits."""
    model = tiny_model("qwen2")
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # every token likely enough to count, yet T = 0.7 and T = 1 far apart
    prompt = torch.tensor([[5, 9, 11, 3]])
    n, T = 20_000, 0.7
    completion, _ = generation.generate(model, prompt.repeat(n, 1), torch.ones(n, 4, dtype=torch.long),
                                        max_new_tokens=1, eos_token_ids=[VOCAB + 1], pad_token_id=0, temperature=T,
                                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.softmax(model(prompt).logits[0, -1].double() / T, -1)
    freq = torch.bincount(completion[:, 0], minlength=VOCAB).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se).all()
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1].double(), -1)
    assert ((freq - p1).abs() > 5 * se).any()  # sampling at T = 1 would fail


def test_top_k_and_top_p_keep_what_hf_keeps():
    """Kept tokens equal HF's TopK/TopP logits warpers': integer logits with exact ties at the k-th value (kept),
    dyadic probabilities whose mass reaches top_p exactly, and 200 random distributions for top-p."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    ties = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    for k in (1, 2, 3):
        ours = generation.filter_logits(ties, top_k=k).isfinite()
        assert torch.equal(ours, TopKLogitsWarper(k)(None, ties.clone()).isfinite()), k
    assert generation.filter_logits(ties, top_k=2).isfinite()[0].tolist() == [True, True, True, False, False]
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))  # dyadic: the masses before each token are exact
    for top_p, kept in ((0.5, 1), (0.75, 2), (0.875, 3)):  # mass before a token ≥ top_p: dropped
        ours, hf = generation.filter_logits(exact, top_p=top_p).isfinite(), TopPLogitsWarper(top_p)(None, exact.clone())
        assert ours.sum() == hf.isfinite().sum() == kept, top_p  # at 0.875 either tied 0.125 may stay
    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(0)) * 2
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.99):
        ours = generation.filter_logits(logits, top_p=top_p).isfinite()
        assert torch.equal(ours, TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()), top_p


def test_replica_equals_policy_after_a_step():
    """The bf16 rollout replica holds the policy's weights rounded to bf16, before and after an optimizer step."""
    policy = tiny_model()
    replica = generation.rollout_model(policy, torch.bfloat16)
    assert replica is not policy and {p.dtype for p in replica.parameters()} == {torch.bfloat16}
    assert generation.rollout_model(policy, torch.float32) is policy  # one process, same dtype: no copy
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in replica.parameters()]
    grpo.train_step(policy, opt, rollout_batch(), reg="none", temperature=1.0, normalizer=42, micro_batch_size=6)
    generation.refresh_rollout_model(replica, policy)
    for r, p, b in zip(replica.parameters(), policy.parameters(), before):
        assert torch.equal(r, p.detach().to(torch.bfloat16))
        assert not torch.equal(r, b) or p.dim() == 1  # it moved (norm weights barely do)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_decode_step_traces_as_one_graph(arch):
    """The decode step (HF forward on the static cache + sampling) compiles without graph breaks, as CUDA-graph
    replay needs (`torch.compile(fullgraph=True)`; the eager backend: tracing only, seconds)."""
    from transformers import StaticCache
    model = tiny_model(arch)
    mask = torch.ones(3, 8, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1)
    cache = StaticCache(config=model.config, max_cache_len=8)
    step = torch.compile(generation.decode_step, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        model(input_ids=torch.tensor([[4, 5, 6]] * 3), attention_mask=mask, position_ids=positions[:, :3], cache=cache,
              use_cache=True)
        token = torch.tensor([7, 8, 9])
        for t in range(3, 6):
            token = step(model, token, positions[:, t], mask, cache, torch.rand(3, 1, dtype=torch.float64), 0.7, 1.0, 0)
    assert token.shape == (3,)


def test_update_dtype_auto_follows_the_precision_measurements(monkeypatch, capsys):
    """GR's finite difference needs fp32 (benchmarks/gr_precision.py); the other regimes update in bf16 on CUDA."""
    for device, reg, expected in (("cuda", "gr", "float32"), ("cuda", "kl", "bfloat16"), ("cuda", "none", "bfloat16"),
                                  ("cpu", "reset", "float32"), ("cpu", "gr", "float32")):
        monkeypatch.setattr(grpo, "rank_device", lambda: torch.device(device))
        cfg = grpo.RLConfig(reg=reg)
        grpo.validate(cfg, check_model=False)
        assert (cfg.update_dtype, cfg.dtype) == (expected, "bfloat16" if device == "cuda" else "float32"), (device, reg)
    cfg = grpo.RLConfig(reg="gr", update_dtype="bfloat16", eps=1e-3)
    grpo.validate(cfg, check_model=False)
    assert cfg.update_dtype == "bfloat16" and "‖g1‖ ≳ 5 at ε = 0.001" in capsys.readouterr().out  # asked for: warned


def test_flag_warnings_print_once_under_torchrun(monkeypatch, capsys):
    """Flags are checked before the process group exists: only torchrun's RANK 0 prints the warning."""
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        grpo.validate(grpo.RLConfig(reg="gr", update_dtype="bfloat16"), check_model=False)
        assert ("warning: --update-dtype bfloat16" in capsys.readouterr().out) == printed, rank


def test_grad_checkpointing_recomputes_the_blocks_with_the_same_gradient_and_no_dropout():
    """--grad-checkpointing in RL, where the policy stays in eval mode: each block runs forward twice (the recompute
    in backward), not once as HF would in eval mode, and the gradient is unchanged; dropout (0.5 in the config)
    stays off, or the two gradients would differ."""
    from gr import transformer_blocks
    import loading
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model(dtype=torch.float64)
        model.config.attention_dropout = 0.5
        for block in model.model.layers:
            block.self_attn.attention_dropout = 0.5
        if checkpointing:
            loading.checkpoint_activations(model)
        counted = [0]
        for block in transformer_blocks(model):
            block.mlp.register_forward_pre_hook(lambda *_: counted.__setitem__(0, counted[0] + 1))
        opt = GradientRecorder(model.parameters())
        grpo.train_step(model, opt, _train_batch(model, "none"), reg="none", temperature=0.7, normalizer=42,
                        micro_batch_size=6, max_grad_norm=math.inf)
        grads.append(opt.grads)
        calls.append(counted[0])
    assert calls == [2, 4]  # 2 blocks, one micro-batch: forward, then forward again in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
