"""grpo.rl_train against quantities recomputed here from the weights it trained with: log-probs of logits / T, the
Dr.GRPO advantage and normaliser in the logged loss, the reference after resets at steps R, 2R, ..., β, the KL to the
initial policy, the entropy. One short --reg reset run on the small toy, spied on at each train_step."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import eval as evaluation
import grpo

STEPS, R, GROUP, PROMPTS, MAX_NEW = 5, 2, 3, 2, 8
TEMPERATURE = 0.5  # not the default 0.7: a hard-coded or forgotten temperature shows


@pytest.fixture(scope="module")
def reset_run(small_toy, tmp_path_factory):
    """Per step: the batch train_step got, its keyword arguments and the policy weights before the update; the rows
    and rewards `score` saw; the metrics.jsonl records."""
    train, _, policy = small_toy
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()][:40]
    cfg = grpo.RLConfig(model=str(policy), out_dir=str(tmp_path_factory.mktemp("reset_run")), reg="reset",
                        steps=STEPS, reset_every=R, prompts_per_step=PROMPTS, group_size=GROUP, max_new_tokens=MAX_NEW,
                        temperature=TEMPERATURE, max_prompt_tokens=256, lr=1e-3, micro_batch_size=4, log_kl_init=True,
                        save_every=100, dtype="float32", update_dtype="float32")  # fp32 as the recomputation, also on CUDA
    grpo.validate(cfg, check_model=False)
    steps, scored, train_step = [], [], grpo.train_step

    def spy(model, optimizer, batch, **kwargs):
        steps.append({"batch": {k: v.detach().cpu().clone() for k, v in batch.items()}, "kwargs": kwargs,
                      "optimizer": optimizer, "weights": {k: v.cpu().clone() for k, v in model.state_dict().items()}})
        return train_step(model, optimizer, batch, **kwargs)

    def score(rows, completions, has_eos):  # any reward that varies within a group
        rewards = torch.tensor([float(sum(map(ord, c)) % 11) for c in completions])
        scored.append(([r["question"] for r in rows], rewards))
        return rewards, {}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "train_step", spy)
        grpo.rl_train(cfg, rows, lambda row: evaluation.prompt_messages("gsm8k", row, None), score)
    metrics = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"cfg": cfg, "steps": steps, "scored": scored, "metrics": metrics, "policy": policy}


def naive_logprobs(model, weights, batch):
    """Per row, the unpadded sequence alone: log_softmax(logits / T) of each completion token and the entropy of that
    tempered distribution, (n,) each, n = the row's completion length."""
    model.load_state_dict(weights)
    out = []
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
            n = int(batch["completion_mask"][i].sum())
            logp = torch.log_softmax(model(ids).logits[0, -n - 1:-1].double() / TEMPERATURE, -1)
            out.append((logp.gather(-1, ids[0, -n:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)))
    return out


def k3(p, q):
    return torch.exp(q - p) - (q - p) - 1


def test_reference_resets_after_steps_R_2R_and_logprobs_at_T(reset_run):
    """Step s uses the reference copied from the policy at the start of step R·⌊s/R⌋ (the initial policy before
    the first reset), its log-probs of logits / T; β stays the --reg reset default 0.3 across resets."""
    model = AutoModelForCausalLM.from_pretrained(reset_run["policy"], dtype=torch.float32).eval()
    steps = reset_run["steps"]
    assert len(steps) == STEPS
    for s, step in enumerate(steps):
        batch, cmask = step["batch"], step["batch"]["completion_mask"]
        expected = naive_logprobs(model, steps[R * (s // R)]["weights"], batch)
        for i, (logp, _) in enumerate(expected):
            got = batch["ref_logp"][i, :len(logp)].double()
            torch.testing.assert_close(got, logp, rtol=0, atol=2e-5, msg=f"step {s} row {i}")
        assert cmask.sum() > 0 and step["kwargs"]["beta"] == 0.3 and step["kwargs"]["temperature"] == TEMPERATURE
    assert any(not torch.equal(steps[0]["weights"][k], steps[R]["weights"][k]) for k in steps[0]["weights"])


def test_logged_kl_entropy_and_dr_grpo_loss_match_a_recomputation(reset_run):
    """Per step, from the weights alone: entropy and k3 KL to the reference and to the initial policy (token means),
    and loss = Σ_i Σ_t (−A_i + β·k3) / (sequences × max_new_tokens), A_i = r_i − the mean of its prompt's rewards."""
    model = AutoModelForCausalLM.from_pretrained(reset_run["policy"], dtype=torch.float32).eval()
    steps, metrics = reset_run["steps"], reset_run["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for s, (step, record, (questions, rewards)) in enumerate(zip(steps, metrics, reset_run["scored"])):
        batch = step["batch"]
        policy = naive_logprobs(model, step["weights"], batch)
        ref = naive_logprobs(model, steps[R * (s // R)]["weights"], batch)
        init = naive_logprobs(model, steps[0]["weights"], batch)
        advantages = [r - rewards[[q == question for q in questions]].mean() for question, r in zip(questions, rewards)]
        assert [questions.count(q) for q in questions] == [GROUP] * len(questions)
        tokens = sum(len(p) for p, _ in policy)
        entropy = sum(h.sum() for _, h in policy) / tokens
        kl = sum(k3(p, q).sum() for (p, _), (q, _) in zip(policy, ref))
        kl_init = sum(k3(p, q).sum() for (p, _), (q, _) in zip(policy, init))
        loss = (sum(-a * len(p) for a, (p, _) in zip(advantages, policy)) + 0.3 * kl) / (PROMPTS * GROUP * MAX_NEW)
        assert record["entropy"] == pytest.approx(entropy.item(), rel=1e-4), s
        assert record["kl"] == pytest.approx((kl / tokens).item(), rel=1e-3, abs=1e-6), s
        assert record["kl_init"] == pytest.approx((kl_init / tokens).item(), rel=1e-3, abs=1e-6), s
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6), s
        torch.testing.assert_close(step["batch"]["advantages"].double(), torch.stack(advantages).double())
    assert all(step["kwargs"]["normalizer"] == PROMPTS * GROUP * MAX_NEW for step in steps)


def test_adam_with_the_papers_betas(reset_run):
    optimizer = reset_run["steps"][0]["optimizer"]
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["lr"] == reset_run["cfg"].lr
