"""train_tldr.py (SFT -> RM -> RL, 1 process and torchrun) and eval.py's RLHF metrics, on a small TL;DR toy."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import eval as evaluation
import generation
import grpo
import loading
import rundir
import supervised
import toy
import train_tldr
from rewards import bradley_terry_loss, rm_last_token_scores
from tiny import VOCAB, greedy_continuation, rollout_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def toy_args(small_tldr, out, *extra):
    train, test, base = small_tldr
    return ["--preset", "toy", "--model", str(base), "--dataset", str(train), "--test-dataset", str(test),
            "--out-dir", str(out), "--sft-batch-size", "32", "--sft-epochs", "4", "--sft-lr", "1e-2",
            "--rm-pairs", "160", "--rm-batch-size", "16",
            "--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--eval-limit", "16",
            "--eval-pairs", "8", "--eval-every", "2", "--save-every", "2", "--sharpness-perturbations", "3",
            "--sharpness-prompts", "8", *extra]


def run(small_tldr, out, *extra):
    args = toy_args(small_tldr, out, *extra)
    return train_tldr.main(loading.parse_config(train_tldr.Config, args, train_tldr.PRESETS))


def read_metrics(run_dir, with_initial_eval=False):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows if with_initial_eval else [r for r in rows if r["step"] >= 0]


def run_cli(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def naive_heldout_pairs(rm_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (chosen, rejected) of the saved RM on its held-out pairs, each sequence alone (prompt + completion +
    EOS, no padding): the scalar head's output at the last token."""
    tokenizer = loading.load_tokenizer(str(rm_dir))
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    pairs = [json.loads(line) for line in (Path(rm_dir) / "pairs.jsonl").read_text().splitlines()]
    pairs = [p for p in pairs if p["split"] == "heldout"]

    def score(prompt, completion):
        text = train_tldr.render(tokenizer, {"prompt": prompt}) + completion
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return rm.score(rm.model(torch.tensor([ids])).last_hidden_state)[0, -1, 0]

    with torch.no_grad():
        return (torch.stack([score(p["prompt"], p["chosen"]) for p in pairs]),
                torch.stack([score(p["prompt"], p["rejected"]) for p in pairs]))


def pair_accuracy(chosen, rejected) -> float:
    return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()


def naive_win_rate(policy_dir, rows, max_new_tokens) -> tuple[float, float]:
    """(win rate vs the references, mean gold) of greedy completions (`greedy_continuation`), both by the toy gold
    reward, which also charges a completion without EOS; ties count 1/2."""
    tokenizer = loading.load_tokenizer(str(policy_dir))
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    eos = loading.eos_token_ids(tokenizer, model)
    golds = []
    for row in rows:
        prompt = tokenizer(train_tldr.render(tokenizer, row), add_special_tokens=False)["input_ids"]
        new = greedy_continuation(model, torch.tensor(prompt), max_new_tokens, eos)
        golds.append(toy.tldr_gold_reward(row["prompt"], tokenizer.decode(new, skip_special_tokens=True),
                                          has_eos=new[-1] in eos))
    refs = [toy.tldr_gold_reward(r["prompt"], r["reference"]) for r in rows]
    return sum((g > r) + 0.5 * (g == r) for g, r in zip(golds, refs)) / len(rows), sum(golds) / len(rows)


@pytest.fixture(scope="session")
def chain(small_tldr, tmp_path_factory):
    """The whole chain, --stage all, one process, --reg none; float32, as the naive checks below (also on a GPU)."""
    out = tmp_path_factory.mktemp("chain")
    return out, run(small_tldr, out, "--reg", "none", "--dtype", "float32")


# ----------------------------------------------------------------------------- the chain

def test_sft_stage_writes_a_loadable_policy(chain):
    out, result = chain
    summary = json.loads((out / "sft" / "train_summary.json").read_text())
    assert summary == result["results"]["sft"] and summary["steps"] == 4 * 640 // 32
    assert math.isfinite(summary["final_loss"])
    assert type(AutoModelForCausalLM.from_pretrained(out / "sft")).__name__ == "Qwen2ForCausalLM"
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temp dirs


def test_rm_stage_reports_heldout_accuracy(chain):
    out, result = chain
    summary = json.loads((out / "rm" / "train_summary.json").read_text())
    assert summary == result["results"]["rm"]
    chosen, rejected = naive_heldout_pairs(out / "rm")
    assert summary["heldout_pairs"] == len(chosen) > 0
    assert summary["heldout_accuracy"] == pytest.approx(pair_accuracy(chosen, rejected))
    assert summary["pairs_sampled"] == 160 == (summary["train_pairs"] + summary["heldout_pairs"]
                                               + summary["gold_ties_dropped"] + summary["cut_off_dropped"])
    pairs = [json.loads(line) for line in (out / "rm" / "pairs.jsonl").read_text().splitlines()]
    assert sum(p["split"] == "heldout" for p in pairs) == summary["heldout_pairs"]
    for p in pairs:  # chosen is the gold RM's preference
        assert toy.tldr_gold_reward(p["prompt"], p["chosen"]) > toy.tldr_gold_reward(p["prompt"], p["rejected"])
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert rm.config.num_labels == 1


def test_reward_model_learns_the_gold_preference_direction(chain, small_tldr, tmp_path, monkeypatch):
    """Bradley–Terry direction through the RM stage: on pairs of one-word summaries (two topics of the post, the toy
    gold prefers the more important one), the trained RM ranks held-out chosen above rejected far above chance, and
    its training loss falls."""
    def one_word_pairs(cfg, rows, device):
        rng, pairs = random.Random(0), []
        for i, row in enumerate(rows):
            a, b = (" " + w for w in rng.sample(sorted(toy.tldr_topics(row["prompt"])), 2))
            gold_a, gold_b = (toy.tldr_gold_reward(row["prompt"], c) for c in (a, b))
            pairs.append({"index": i, "prompt": row["prompt"], "a": a, "b": b, "eos_a": True, "eos_b": True,
                          "gold_a": gold_a, "gold_b": gold_b})
        return pairs

    monkeypatch.setattr(train_tldr, "sample_pairs", one_word_pairs)
    run(small_tldr, tmp_path, "--stage", "rm", "--sft-dir", str(chain[0] / "sft"), "--rm-pairs", "200",
        "--rm-heldout", "0.3", "--rm-lr", "1e-2")
    chosen, rejected = naive_heldout_pairs(tmp_path / "rm")
    n, right = len(chosen), int((chosen > rejected).sum())
    # a coin-flipping RM gets ≥ `right` of n right with probability Σ_{k ≥ right} C(n, k) / 2^n; demand < 1e-3
    assert n >= 30 and sum(math.comb(n, k) for k in range(right, n + 1)) / 2 ** n < 1e-3, (right, n)
    assert bradley_terry_loss(chosen, rejected).item() < math.log(2) - 0.1  # held out, below chance's log 2
    losses = [json.loads(line)["loss"] for line in (tmp_path / "rm_metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_rl_stage_logs_proxy_gold_and_rlhf_metrics(chain, small_tldr):
    out, result = chain
    init, *rows = read_metrics(out / "rl-none", with_initial_eval=True)
    assert [r["step"] for r in rows] == [0, 1, 2] and init["step"] == -1
    for r in rows:
        assert {"reward", "rewards/proxy", "rewards/gold", "rewards/true_reward", "grad_norm"} <= r.keys()
        assert r["reward"] == pytest.approx(r["rewards/proxy"])  # the trained reward is the proxy
    evals = [r for r in rows if "eval/win_rate" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals + [init]:
        assert {"eval/gold", "eval/proxy", "eval/bt_loss", "eval/bt_accuracy", "eval/kl"} <= r.keys()
        assert r["eval/sharpness"] >= r["eval/sharpness_J"] - r["eval/sharpness_J_perturbed"] - 1e-12  # max ≥ mean
    assert result["results"]["rl"]["win_rate"] == evals[-1]["eval/win_rate"]
    # the last eval is of the final policy: greedy completions of the first 16 test prompts, judged by the toy gold
    eval_rows = train_tldr.short_enough(evaluation.load_tldr_rows(str(small_tldr[1]), "test"),
                                        loading.load_tokenizer(str(out / "sft")), 64, "eval")[:16]
    win, gold = naive_win_rate(rundir.latest_checkpoint(out / "rl-none"), eval_rows, 16)
    assert (evals[-1]["eval/win_rate"], evals[-1]["eval/gold"]) == pytest.approx((win, gold))
    assert rundir.latest_checkpoint(out / "rl-none").name == "ckpt-000003"
    assert (out / "rl-none" / "curves.png").stat().st_size > 0


def test_rl_stage_alone_reuses_sft_and_rm(chain, small_tldr):
    out, _ = chain
    run(small_tldr, out, "--stage", "rl", "--reg", "gr", "--steps", "2", "--eval-every", "0")
    rows = read_metrics(out / "rl-gr")
    assert [r["step"] for r in rows] == [0, 1] and "g2_norm" in rows[0] and "eval/gold" in rows[-1]
    cfg = json.loads((out / "rl-gr" / "config.json").read_text())
    assert cfg["model"] == str(out / "sft") and cfg["gamma"] == 1e-2  # the RLHF default γ


def test_resume_skips_finished_stages(chain, small_tldr):
    out, _ = chain
    before = {d: (out / d / "train_summary.json").read_text() for d in ("sft", "rm")}
    result = run(small_tldr, out, "--reg", "none", "--resume")  # RL already at its last step: nothing to redo
    assert result["results"].keys() == {"rl"} and [r["step"] for r in read_metrics(out / "rl-none")] == [0, 1, 2]
    assert {d: (out / d / "train_summary.json").read_text() for d in ("sft", "rm")} == before


def test_proxy_bt_metric_scores_the_raw_reward_model_and_reports_the_no_eos_share(chain, small_tldr):
    """The BT loss / accuracy on policy pairs is that of the proxy RM's own scores (each sequence scored alone, + EOS,
    as it was trained), not of the trained reward whose EOS penalty gives every cut-off completion −1; the share of
    samples without EOS is reported beside it. Completions cut at 3 tokens: most have no EOS."""
    out, _ = chain
    _, test, _ = small_tldr
    rows = evaluation.load_tldr_rows(str(test), "test")[:16]
    policy_dir = rundir.latest_checkpoint(out / "rl-none")
    tokenizer = loading.load_tokenizer(str(policy_dir))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    rm = loading.load_reward_model(out / "rm", "cpu", pad_token_id=tokenizer.pad_token_id)
    gold = evaluation.make_gold("toy", "cpu")
    sampling = dict(temperature=0.7, seed=0, max_new_tokens=3, batch_size=8)
    got = evaluation.proxy_on_policy(policy, tokenizer, rows, evaluation.tldr_messages,
                                     evaluation.make_proxy(rm, tokenizer, eos_penalty=None), gold, **sampling)
    twice = [r for r in rows for _ in range(2)]
    batches = list(evaluation.policy_samples(policy, tokenizer, twice, evaluation.tldr_messages, stream=1, **sampling))
    texts, ended = [t for b in batches for t in b["texts"]], torch.cat([b["ended"] for b in batches])
    assert 0 < (~ended).float().mean() < 1
    with torch.no_grad():
        raw = []
        for row, text in zip(twice, texts):
            ids = tokenizer(train_tldr.render(tokenizer, row) + text, add_special_tokens=False)["input_ids"]
            raw.append(rm.score(rm.model(torch.tensor([ids + [tokenizer.eos_token_id]])).last_hidden_state)[0, -1, 0])
    raw = torch.stack(raw)
    golds = torch.tensor([toy.tldr_gold_reward(r["prompt"], t, bool(e)) for r, t, e in zip(twice, texts, ended)])
    expected = evaluation.bt_loss_on_policy(raw[0::2], raw[1::2], golds[0::2], golds[1::2])
    assert (got["bt_loss"], got["bt_accuracy"]) == pytest.approx((expected["bt_loss"], expected["bt_accuracy"]),
                                                                 rel=1e-5)
    assert got["sampled_no_eos"] == pytest.approx((~ended).double().mean().item())
    penalised = torch.where(ended, raw, torch.full_like(raw, -1.0))  # what the trained reward would have scored
    assert evaluation.bt_loss_on_policy(penalised[0::2], penalised[1::2], golds[0::2],
                                        golds[1::2])["bt_loss"] != pytest.approx(expected["bt_loss"], rel=1e-3)


def test_beta_default_depends_on_reg(small_tldr, tmp_path):
    for reg, beta in (("kl", 0.05), ("reset", 0.3), ("none", 0.05)):
        cfg = loading.parse_config(train_tldr.Config, toy_args(small_tldr, tmp_path, "--reg", reg), train_tldr.PRESETS)
        grpo.validate(cfg, check_model=False)
        assert cfg.beta == beta
    cfg = loading.parse_config(train_tldr.Config, toy_args(small_tldr, tmp_path, "--reg", "reset", "--beta", "0.2"),
                               train_tldr.PRESETS)
    grpo.validate(cfg, check_model=False)
    assert cfg.beta == 0.2


def test_torchrun_two_processes_whole_chain(small_tldr, chain, tmp_path):
    proc = run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    "train_tldr.py", *toy_args(small_tldr, tmp_path, "--reg", "reset", "--reset-every", "2",
                                               "--dtype", "float32")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # SFT sees the same global batches as the 1-process chain: the same training up to float rounding
    single, sharded = (json.loads((d / "sft" / "train_summary.json").read_text()) for d in (chain[0], tmp_path))
    assert sharded["final_loss"] == pytest.approx(single["final_loss"], rel=1e-3)
    # the held-out accuracy the 2 ranks computed (scores gathered across ranks) is that of each pair scored alone
    summary = json.loads((tmp_path / "rm" / "train_summary.json").read_text())
    assert summary["heldout_accuracy"] == pytest.approx(pair_accuracy(*naive_heldout_pairs(tmp_path / "rm")))
    rows = read_metrics(tmp_path / "rl-reset")
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/bt_loss" in rows[-1] and "kl" in rows[0]
    assert (rundir.latest_checkpoint(tmp_path / "rl-reset") / "reference" / "model.safetensors").exists()


def test_eval_cli_on_checkpoint_and_plot(chain, small_tldr, tmp_path):
    out, _ = chain
    _, test, _ = small_tldr
    summary = evaluation.evaluate(evaluation.EvalConfig(
        checkpoint=str(rundir.latest_checkpoint(out / "rl-none")), task="tldr", dataset=str(test), limit=12,
        gold_rm="toy", proxy_rm=str(out / "rm"), reference_model=str(out / "sft"), max_new_tokens=4,
        batch_size=32, sharpness_perturbations=2, dtype="float32", out=str(tmp_path / "eval.json")))
    assert json.loads((tmp_path / "eval.json").read_text()) == summary
    assert summary["n"] == 12 and summary["grad_norm"] > 0
    assert {"bt_loss", "bt_accuracy", "kl", "sharpness", "gold", "proxy"} <= summary.keys()
    rows = evaluation.load_tldr_rows(str(test), "test")[:12]
    win, gold = naive_win_rate(rundir.latest_checkpoint(out / "rl-none"), rows, 4)
    assert (summary["win_rate"], summary["gold"]) == pytest.approx((win, gold))
    # the BT metric is the raw proxy RM's (the test above checks proxy_on_policy itself)
    policy_dir = rundir.latest_checkpoint(out / "rl-none")
    tokenizer = loading.load_tokenizer(str(policy_dir))
    rm = loading.load_reward_model(out / "rm", "cpu", pad_token_id=tokenizer.pad_token_id)
    raw = evaluation.proxy_on_policy(AutoModelForCausalLM.from_pretrained(policy_dir).eval(), tokenizer, rows,
                                     evaluation.tldr_messages, evaluation.make_proxy(rm, tokenizer, eos_penalty=None),
                                     evaluation.make_gold("toy", "cpu"), temperature=0.7, seed=0, max_new_tokens=4,
                                     batch_size=32)
    assert summary["bt_loss"] == pytest.approx(raw["bt_loss"], rel=1e-5)
    assert 0 < summary["sampled_no_eos"] < 1  # 4 new tokens: some samples are cut off, where the two proxies differ
    png = tmp_path / "fig.png"
    proc = run_cli([sys.executable, "eval.py", "plot", str(out / "rl-none"), str(out / "rl-none" / "metrics.jsonl"),
                    "--out", str(png), "--panel", "step:rewards/proxy,rewards/gold", "--panel", "eval/kl:eval/gold"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_fail_fast_with_one_line(small_tldr, chain, tmp_path):
    out, _ = chain
    no_fields = tmp_path / "no_fields.jsonl"
    no_fields.write_text(json.dumps({"prompt": "x", "summary": "y"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "no such directory": ["--model", str(tmp_path / "missing")],
        "--gold-rm": ["--gold-rm", str(tmp_path / "no_gold")],
        "has no reference field": ["--dataset", str(no_fields)],
        "is empty": ["--dataset", str(empty)],
        "run --stage sft first": ["--stage", "rm", "--sft-dir", str(tmp_path / "nothing")],
        "run --stage rm first": ["--stage", "rl", "--sft-dir", str(out / "sft"), "--rm-dir", str(tmp_path / "x")],
        "--reg gr needs --eps > 0": ["--reg", "gr", "--eps", "0"],
    }
    for expected, extra in cases.items():
        with pytest.raises(SystemExit) as e:
            run(small_tldr, tmp_path / "out", *extra)
        message = str(e.value)
        assert message.startswith("error:") and expected in message and "\n" not in message, (expected, message)
        assert not (tmp_path / "out" / "sft").exists()  # failed before any work


def test_non_finite_sft_loss_stops_with_step_number(small_tldr, tmp_path, monkeypatch):
    sft_loss = supervised.sft_loss
    monkeypatch.setattr(supervised, "sft_loss", lambda *args: sft_loss(*args) * float("nan"))
    with pytest.raises(FloatingPointError, match="sft step 0: non-finite loss"):
        run(small_tldr, tmp_path, "--stage", "sft")
    assert not (tmp_path / "sft").exists()


# ----------------------------------------------------------------------------- metric functions

def naive_bt(chosen, rejected):
    return sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen, rejected)) / len(chosen)


def test_bradley_terry_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(7, generator=g) * 3, torch.randn(7, generator=g) * 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(naive_bt(chosen.tolist(), rejected.tolist()),
                                                                        rel=1e-6)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_bt_loss_on_policy_orients_by_gold_and_drops_ties():
    proxy_a, proxy_b = [2.0, 0.5, 1.0, -1.0, 3.0], [1.0, 1.5, 1.0, 0.0, 3.0]
    gold_a, gold_b = [1.0, 1.0, 0.0, 5.0, 2.0], [0.0, 0.0, 0.0, 1.0, 1.0]  # pair 2 is a gold tie
    out = evaluation.bt_loss_on_policy(proxy_a, proxy_b, gold_a, gold_b)
    chosen, rejected = [2.0, 0.5, -1.0, 3.0], [1.0, 1.5, 0.0, 3.0]  # gold prefers a in all kept pairs
    assert out["bt_pairs"] == 4
    assert out["bt_loss"] == pytest.approx(naive_bt(chosen, rejected), rel=1e-9)
    assert out["bt_accuracy"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)  # a proxy tie is half right
    flipped = evaluation.bt_loss_on_policy(proxy_b, proxy_a, gold_b, gold_a)  # same pairs, other order
    assert flipped == pytest.approx(out)
    assert math.isnan(evaluation.bt_loss_on_policy([1.0], [2.0], [3.0], [3.0])["bt_loss"])


def test_win_rate_known_answers():
    assert evaluation.win_rate([3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 2.0, -1.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert evaluation.win_rate(torch.ones(5), torch.zeros(5)) == 1.0
    assert evaluation.win_rate([0.0], [0.0]) == 0.5


def test_kl_to_reference_sums_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert evaluation.kl_to_reference(logp, ref, mask).tolist() == pytest.approx([0.5 - 1.0, 0.5])
    assert evaluation.kl_to_reference(logp, logp, mask).abs().sum() == 0


def test_sequence_kl_of_two_policies_matches_a_per_sequence_loop():
    """eval's KL to the initial policy on a rollouts batch: Σ_t (log π − log π_init) over each completion, both
    log-probs of logits / T, each sequence run alone."""
    policy, init = tiny_model(seed=0), tiny_model(seed=1)
    b = rollout_batch(n=4, prompt_len=5, completion_len=6, group=2)
    batch = {"prompt_ids": b["input_ids"][:, :5], "prompt_mask": b["attention_mask"][:, :5],
             "completion": b["input_ids"][:, 5:], "cmask": b["completion_mask"]}
    expected = []
    with torch.no_grad():
        for i in range(4):
            ids = b["input_ids"][i][b["attention_mask"][i].bool()][None]
            n = int(b["completion_mask"][i].sum())
            logp = [torch.log_softmax(m(ids).logits[0, -n - 1:-1] / 0.7, -1).gather(-1, ids[0, -n:, None]).sum()
                    for m in (policy, init)]
            expected.append(logp[0] - logp[1])
    torch.testing.assert_close(evaluation.sequence_kl(policy, init, batch, 0.7), torch.stack(expected),
                               rtol=1e-4, atol=1e-5)


def test_sharpness_of_a_quadratic_has_known_value_and_restores_weights():
    model = tiny_model(seed=0)
    center = [p.detach().clone() for p in model.parameters()]

    def objective():  # J = −‖φ − φ0‖², maximal at φ0
        return -sum(((p - c) ** 2).sum() for p, c in zip(model.parameters(), center)).item()

    assert evaluation.sharpness(model, objective, perturbations=4, sigma=0.0)["sharpness"] == 0.0
    sigma = 1e-2
    out = evaluation.sharpness(model, objective, perturbations=4, sigma=sigma, seed=3)
    # ε = σ·rms(W)·z per tensor: E‖ε‖² = σ² Σ_W numel(W)·rms(W)² = σ²‖φ0‖², tightly concentrated
    expected = sigma ** 2 * sum((c ** 2).sum().item() for c in center)
    assert out["sharpness"] == pytest.approx(expected, rel=0.05) and out["J"] == 0.0
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), center))


def test_sharpness_of_sampled_generation_is_zero_at_scale_zero_and_positive_otherwise():
    model = tiny_model(seed=0)
    batch = rollout_batch(n=8, completion_len=1, group=4)
    ids, mask = batch["input_ids"][:, :5], batch["attention_mask"][:, :5]

    def sample():  # 6 tokens per prompt, fixed sampling draws
        gen = torch.Generator().manual_seed(0)
        return generation.generate(model, ids, mask, max_new_tokens=6, eos_token_ids=[VOCAB + 1], pad_token_id=0,
                                   temperature=1.0, generator=gen)[0]

    target = sample()

    def objective():  # fraction of tokens equal to the unperturbed samples': maximal (1) at φ
        return (sample() == target).float().mean().item()

    assert evaluation.sharpness(model, objective, perturbations=3, sigma=0.0)["sharpness"] == 0.0
    out = evaluation.sharpness(model, objective, perturbations=16, sigma=0.5)
    assert out["J"] == 1.0 and 0 < out["sharpness"] <= 1


def test_rm_last_token_scores_equal_each_sequence_scored_alone():
    """Batched, padded on either side, pad == EOS: the score of each row is the head's output at the last token of
    the unpadded sequence run alone (backbone, then head; HF's own pooling would skip a final EOS == pad)."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification
    torch.manual_seed(0)
    rm = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    num_labels=1, pad_token_id=1)).eval()
    for left_pad in (True, False):
        batch = rollout_batch(n=6, completion_len=5, left_pad=left_pad)
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"]
        ids[mask.bool() & (ids == 1)] = 2  # keep id 1 (pad) for padding only ...
        ids[:, -1] = torch.where(mask[:, -1].bool(), 1, ids[:, -1])  # ... but let some rows end in it (EOS = pad)
        with torch.no_grad():
            got = rm_last_token_scores(rm, ids, mask)
            for i in range(len(ids)):
                alone = ids[i][mask[i].bool()][None]
                expected = rm.score(rm.model(alone).last_hidden_state)[0, -1, 0].item()
                assert got[i].item() == pytest.approx(expected, abs=1e-5), (left_pad, i)


def test_gold_rm_from_a_hf_dir_scores_conversations_as_its_model_card(small_tldr, tmp_path):
    """A real gold RM (here a tiny random one) scores the chat-template conversation, read at its last token."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification
    _, _, base = small_tldr
    tokenizer = loading.load_tokenizer(str(base))
    tokenizer.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}")
    torch.manual_seed(0)
    rm = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    num_labels=1, pad_token_id=tokenizer.pad_token_id)).eval()
    rm.save_pretrained(tmp_path / "gold")
    tokenizer.save_pretrained(tmp_path / "gold")
    gold = evaluation.make_gold(str(tmp_path / "gold"), "cpu", batch_size=2)
    rows = [{"prompt": "Summarize: cat owl egg"}, {"prompt": "Summarize: dog sun pear hat jam"}, {"prompt": "x"}]
    completions = [" cat owl", " dog", " a much longer summary of it"]
    scores = gold(rows, completions, [True, False, True])  # the gold judges the text as written, EOS or not
    for row, completion, score in zip(rows, completions, scores):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                             {"role": "assistant", "content": completion}], return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            assert score.item() == pytest.approx(rm(ids).logits[0, 0].item(), abs=1e-5)


def test_toy_gold_reward_known_values():
    prompt = "Summarize: owl cat egg apple"
    assert toy.tldr_topics(prompt) == {"owl", "cat", "egg", "apple"}
    imp = toy.TLDR_IMPORTANCE
    assert (imp["apple"], imp["bread"], imp["cat"], imp["egg"], imp["owl"]) == (1, 2, 3, 2, 3)
    assert toy.tldr_gold_reward(prompt, " cat egg owl") == 3 + 2 + 3 - 3 * 1.5
    assert toy.tldr_gold_reward(prompt, " apple cat") == 1 + 3 - 2 * 1.5
    assert toy.tldr_gold_reward(prompt, " cat cat") == 3 - 2 * 1.5  # a repeat costs, gains nothing
    assert toy.tldr_gold_reward(prompt, " cat bread") == 3 - 2 * 1.5  # a topic not in the post costs
    assert toy.tldr_gold_reward(prompt, " cat owl", has_eos=False) == 6 - 3 - 1.0
    assert toy.tldr_gold_reward(prompt, "") == 0
