"""The paper's metrics, for any checkpoint dir (or hub id) and as the RL loops' periodic eval. Every metric lives here.

Reasoning (§5.2-5.3): pass@1 on the GSM8K / MATH test split, greedy and sampled (mean over k samples per problem at
the training temperature); MATH accuracy per difficulty quintile (Table 4), where each (type, level) category is
placed in a quintile by the *base* model's accuracy on it, read from the JSON this script wrote for the base model.

RLHF (§4-5.1, `--task tldr`): win rate of greedy completions vs the dataset's reference judged by the gold RM; gold
and proxy reward; Bradley-Terry loss / accuracy of the proxy on pairs sampled from the policy, labelled by the gold;
KL to the initial policy (Σ_t log π − log π_init over samples, both tempered by T as in training); sharpness S =
max_i J(φ) − J(φ + ε_i), J the mean proxy reward of samples at T with fixed draws on fixed prompts, every weight
tensor W perturbed by ε = σ·rms(W)·N(0, I) (σ = --sharpness-sigma, 0.02); the policy-gradient norm.

    python eval.py --checkpoint runs/math/ckpt-000500 --task gsm8k --samples 4 --out runs/math/eval.json
    torchrun --nproc_per_node=8 eval.py --checkpoint Qwen/Qwen2.5-1.5B-Instruct --task math --out base.json
    python eval.py --checkpoint runs/math_gr/ckpt-001000 --task math --base-results base.json
    python eval.py --task tldr --checkpoint runs/toy_tldr/rl-gr/ckpt-000150 --dataset .cache/toy/tldr_test.jsonl \
        --gold-rm toy --proxy-rm runs/toy_tldr/rm --reference-model runs/toy_tldr/sft --max-new-tokens 16
    python eval.py plot runs/toy_tldr/rl-none runs/toy_tldr/rl-gr --out fig.png --panel step:rewards/proxy,rewards/gold

Writes a JSON summary (also printed). Under torchrun the problems are split across ranks.
"""
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import distributed
import generation
import grpo
import loading
import plots
import toy
from gr import clip_, local_shard, restored
from rewards import (QWEN_SYSTEM_PROMPT, bradley_terry_loss, gsm8k_gold, gsm8k_messages, gsm8k_rewards,
                     math_messages, math_rewards_batch, render_chat, rm_scores, rm_scores_from_ids)

TASKS = {"gsm8k": ("openai/gsm8k", "main", ("question", "answer")),
         "math": ("DigitalLearningGmbH/MATH-lighteval", None, ("problem", "solution", "level", "type")),
         "tldr": ("trl-lib/tldr", None, ())}  # fields: load_tldr_rows
MAX_NEW_TOKENS = {"gsm8k": 768, "math": 1024, "tldr": 106}  # the paper's output lengths (Tables 5, 8, 9)
QUINTILES = ("00-20%", "20-40%", "40-60%", "60-80%", ">80%")
TLDR_PROMPT_FIELDS, TLDR_REFERENCE_FIELDS = ("prompt", "query"), ("reference", "completion", "reference_response")
TOY_GOLD = "toy"


@dataclass
class EvalConfig:
    """Evaluate a checkpoint: GSM8K / MATH pass@1 (greedy, sampled) and MATH quintiles, or the TL;DR RLHF metrics."""
    checkpoint: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "HF dir or hub id"})
    task: str = field(default="gsm8k", metadata={"help": "benchmark", "choices": tuple(TASKS)})
    dataset: str = field(default=None, metadata={"type": str, "help": "hub id or local file (default: the task's)"})
    split: str = field(default="test", metadata={"help": "split of a hub dataset"})
    limit: int = field(default=0, metadata={"help": "first N problems only (0 = all)"})
    samples: int = field(default=0, metadata={"help": "k samples per problem for sampled pass@1 (0 = greedy only)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (sampled pass@1, tldr samples)"})
    max_new_tokens: int = field(default=None, metadata={"type": int, "help": "completion length; default per task: "
                                                        + ", ".join(f"{k} {v}" for k, v in MAX_NEW_TOKENS.items())})
    batch_size: int = field(default=64, metadata={"help": "prompts per generate call on one rank"})
    system_prompt: str = field(default=QWEN_SYSTEM_PROMPT, metadata={"help": "system prompt ('' for none)"})
    base_results: str = field(default=None, metadata={"type": str, "help": "base model's eval JSON (MATH quintiles)"})
    out: str = field(default=None, metadata={"type": str, "help": "write the JSON summary here"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype (auto: bfloat16 on CUDA, else float32)",
                                                "choices": ("auto", "float32", "bfloat16")})
    rollout_replica: bool = field(default=True, metadata={
        "help": "generate with an unsharded --dtype copy on each rank (--no-rollout-replica: the FSDP-sharded model)"})
    # --task tldr (RLHF)
    gold_rm: str = field(default="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
                         metadata={"help": f"tldr: gold RM (hub id, dir, or '{TOY_GOLD}')"})
    proxy_rm: str = field(default=None, metadata={"type": str, "help": "tldr: the proxy RM dir RL trained against"})
    reference_model: str = field(default=None, metadata={"type": str, "help": "tldr: initial (SFT) policy for the KL"})
    eval_pairs: int = field(default=128, metadata={"help": "tldr: prompts sampled twice for the BT loss and KL"})
    sharpness_sigma: float = field(default=0.02, metadata={"help": "tldr: perturbation std / each tensor's RMS"})
    sharpness_perturbations: int = field(default=32, metadata={"help": "tldr: random perturbations (0 = skip)"})
    sharpness_prompts: int = field(default=64, metadata={"help": "tldr: prompts of the sharpness objective J"})
    eos_penalty: float = field(default=-1.0, metadata={"help": "tldr: proxy reward of a completion without EOS"})


# ----------------------------------------------------------------------------- reasoning: GSM8K, MATH

def prompt_messages(task: str, row: dict, system_prompt: str | None) -> list[dict]:
    if task == "gsm8k":
        return gsm8k_messages(row["question"], system_prompt=system_prompt or None)
    return math_messages(row["problem"], system_prompt=system_prompt or None)


def grade(task: str, rows: list[dict], completions: list[str]) -> list[float | None]:
    """1.0 / 0.0 per completion; None where a MATH gold answer is unparsable (excluded from accuracy)."""
    if task == "gsm8k":
        return [float(gsm8k_rewards(c, gsm8k_gold(r["answer"]))["correctness"] > 0) for r, c in zip(rows, completions)]
    results = math_rewards_batch(completions, [r["solution"] for r in rows])
    return [None if res is None else float(res["correctness"] > 0) for res in results]


def pass_at_1(model, tokenizer, task: str, rows: list[dict], *, system_prompt: str | None, max_new_tokens: int,
              batch_size: int, temperature: float = 0.0, samples: int = 1, seed: int = 0) -> list[float | None]:
    """Per-problem accuracy (mean over `samples` completions; greedy when temperature is 0), all ranks' problems
    gathered in order. Every rank must call this."""
    rank, world = distributed.rank_and_world()
    mine = distributed.shard_list(list(range(len(rows))), rank, world)
    prompts = [render_chat(tokenizer, prompt_messages(task, rows[i], system_prompt)) for i in mine]
    scores, valid = torch.zeros(len(mine), dtype=torch.float64), torch.ones(len(mine), dtype=torch.bool)
    for k in range(samples):
        generator = distributed.step_generator(seed, k, rank, next(model.parameters()).device)
        batches = generation.rollouts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                      batch_size=batch_size, generator=generator)
        texts = [t for b in tqdm(batches, desc=f"eval {task} {k + 1}/{samples}", total=-(-len(prompts) // batch_size),
                                 disable=rank != 0, delay=2, leave=False) for t in b["texts"]]
        for j, g in enumerate(grade(task, [rows[i] for i in mine], texts)):
            valid[j] &= g is not None
            scores[j] += (g or 0.0) / samples
    gathered = distributed.all_gather_rows(torch.stack([scores, valid.double()], 1), mine, len(rows))
    return [s if v else None for s, v in gathered.tolist()]


def pass_at_1_evaluator(task: str, rows: list[dict], *, system_prompt: str | None, max_new_tokens: int,
                        batch_size: int, temperature: float, seed: int):
    """evaluate(model, tokenizer, step) -> pass@1 on `rows`, greedy and with one sample at `temperature` (the
    reasoning RL loops' eval). Every rank calls it."""
    common = dict(system_prompt=system_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def evaluate(model, tokenizer, step):
        greedy = pass_at_1(model, tokenizer, task, rows, **common)
        sampled = pass_at_1(model, tokenizer, task, rows, temperature=temperature, seed=seed, **common)
        return {"pass@1_greedy": mean(greedy), "pass@1_sampled": mean(sampled)}
    return evaluate


def mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / max(len(xs), 1)


def category_accuracy(rows: list[dict], correct: list[float | None]) -> dict[str, float]:
    """MATH accuracy per (type, level) category, the unit of Table 4's quintiles."""
    cats: dict[str, list] = {}
    for r, c in zip(rows, correct):
        cats.setdefault(f"{r['type']}|{r['level']}", []).append(c)
    return {k: mean(v) for k, v in sorted(cats.items())}


def quintile_accuracy(rows: list[dict], correct: list[float | None], base_category_acc: dict[str, float]) -> dict:
    """Table 4: accuracy on the problems whose category's base-model accuracy falls in each 20% band."""
    bands: dict[str, list] = {q: [] for q in QUINTILES}
    for r, c in zip(rows, correct):
        base = base_category_acc.get(f"{r['type']}|{r['level']}")
        if base is not None:
            bands[QUINTILES[min(int(base * 5), 4)]].append(c)
    return {q: {"accuracy": mean(v), "n": sum(x is not None for x in v)} for q, v in bands.items()}


# ----------------------------------------------------------------------------- RLHF: data, gold and proxy rewards

def load_tldr_rows(dataset: str, split: str, prompt_field: str | None = None,
                   reference_field: str | None = None) -> list[dict]:
    """Rows {"prompt", "reference"} of a hub split or local file; the fields default to the first present of
    TLDR_PROMPT_FIELDS / TLDR_REFERENCE_FIELDS (trl-lib/tldr, Huang et al.'s query / reference_response)."""
    rows = loading.load_rows(dataset, split, ())
    columns = list(rows[0])

    def pick(given, candidates, what):
        for c in [given] if given else candidates:
            if c in columns:
                return c
        loading.fail(f"dataset {dataset!r} has no {what} field ({given or list(candidates)}); it has {columns}")

    p, r = pick(prompt_field, TLDR_PROMPT_FIELDS, "prompt"), pick(reference_field, TLDR_REFERENCE_FIELDS, "reference")
    out = [{"prompt": row[p], "reference": row[r]} for row in rows
           if isinstance(row[p], str) and isinstance(row[r], str) and row[p].strip()]
    if not out:
        loading.fail(f"dataset {dataset!r} split {split!r} has no rows with a non-empty {p!r} and a {r!r} string")
    return out


def tldr_messages(row: dict) -> list[dict]:
    """The policy's prompt, one user turn (rendered by `render_chat` identically in every stage)."""
    return [{"role": "user", "content": row["prompt"]}]


def make_gold(gold_rm: str, device, *, dtype=torch.float32, batch_size: int = 16, trust_remote_code: bool = False):
    """gold(rows, completions, has_eos) -> (N,) float32 CPU: the toy's programmatic reward, or a real RM scoring the
    conversation as its model card does (its own chat template), the text as written, EOS or not."""
    if gold_rm == TOY_GOLD:
        return lambda rows, completions, has_eos: torch.tensor(
            [toy.tldr_gold_reward(r["prompt"], c, bool(e)) for r, c, e in zip(rows, completions, has_eos)],
            dtype=torch.float32)
    tokenizer = loading.load_tokenizer(gold_rm, trust_remote_code)
    tokenizer.padding_side = "right"
    rm = loading.load_reward_model(gold_rm, device, pad_token_id=tokenizer.pad_token_id, dtype=dtype,
                                   trust_remote_code=trust_remote_code).requires_grad_(False)

    def gold(rows, completions, has_eos):
        convs = [tldr_messages(r) + [{"role": "assistant", "content": c}] for r, c in zip(rows, completions)]
        if getattr(tokenizer, "chat_template", None):
            ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in convs]
        else:
            ids = [tokenizer(render_chat(tokenizer, c[:1]) + c[1]["content"], add_special_tokens=False)["input_ids"]
                   + [tokenizer.eos_token_id] for c in convs]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        return rm_scores_from_ids(rm, batch["input_ids"], batch["attention_mask"], torch.ones(len(ids), dtype=bool),
                                  batch_size=batch_size).float().cpu()
    return gold


def make_proxy(rm, tokenizer, *, eos_penalty: float | None = -1.0, batch_size: int = 16):
    """proxy(rows, completions, has_eos) -> (N,) float32 CPU: the proxy RM on prompt + completion + EOS, and
    `eos_penalty` for a completion without EOS (the authors' -1, the trained reward). eos_penalty None: the RM's own
    score of every completion (+ EOS), which is what its Bradley-Terry loss and accuracy measure."""
    def proxy(rows, completions, has_eos):
        prompts = [render_chat(tokenizer, tldr_messages(r)) for r in rows]
        ended = torch.ones(len(rows), dtype=torch.bool) if eos_penalty is None else has_eos
        return rm_scores(rm, tokenizer, prompts, completions, ended, eos_penalty=eos_penalty or 0.0,
                         batch_size=batch_size).float().cpu()
    return proxy


# ----------------------------------------------------------------------------- RLHF metrics (§4-5.1)

def win_rate(policy_scores, reference_scores) -> float:
    """Fraction of prompts where the gold RM scores the policy's completion above the reference; ties count 1/2."""
    p, r = torch.as_tensor(policy_scores, dtype=torch.float64), torch.as_tensor(reference_scores, dtype=torch.float64)
    return ((p > r).double() + 0.5 * (p == r).double()).mean().item()


def bt_loss_on_policy(proxy_a, proxy_b, gold_a, gold_b) -> dict:
    """Bradley-Terry loss (eq. 3) and accuracy of the proxy RM on pairs (a, b), each pair oriented by the gold RM.

    Pairs the gold RM ties are dropped; a proxy tie counts as half correct. Returns bt_loss, bt_accuracy, bt_pairs
    (nan loss/accuracy when no pair is left)."""
    pa, pb, ga, gb = (torch.as_tensor(x, dtype=torch.float64) for x in (proxy_a, proxy_b, gold_a, gold_b))
    keep = ga != gb
    if not keep.any():
        return {"bt_loss": math.nan, "bt_accuracy": math.nan, "bt_pairs": 0}
    chosen, rejected = torch.where(ga > gb, pa, pb)[keep], torch.where(ga > gb, pb, pa)[keep]
    accuracy = ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()
    return {"bt_loss": bradley_terry_loss(chosen, rejected).item(), "bt_accuracy": accuracy,
            "bt_pairs": int(keep.sum())}


def kl_to_reference(logp, ref_logp, mask) -> torch.Tensor:
    """(N,) sequence KL estimate Σ_t (log π − log π_ref) over the completion tokens (mask = 1), for completions
    sampled from π: an unbiased estimate of KL(π ‖ π_ref) per sequence (k1 summed over tokens)."""
    return ((logp - ref_logp) * mask).sum(-1)


@torch.no_grad()
def sequence_kl(model, ref_model, batch: dict, temperature: float) -> torch.Tensor:
    """(N,) `kl_to_reference` of a `generation.rollouts` batch."""
    b = grpo.rl_batch(batch["prompt_ids"], batch["prompt_mask"], batch["completion"], batch["cmask"])
    T = batch["completion"].shape[1]
    logp = grpo.token_logprobs(model, b["input_ids"], b["attention_mask"], T, temperature)[0]
    distributed.reshard(model)
    ref_logp = grpo.token_logprobs(ref_model, b["input_ids"], b["attention_mask"], T, temperature)[0]
    distributed.reshard(ref_model)
    return kl_to_reference(logp, ref_logp, batch["cmask"]).cpu()


@torch.no_grad()
def sharpness(model, objective, *, perturbations: int = 32, sigma: float = 0.02, seed: int = 0, params=None) -> dict:
    """S = max_i J(φ) − J(φ + ε_i) over `perturbations` random directions (paper §4, Fig. 3).

    `objective()` returns J at the model's current weights (deterministic: fixed prompts and sampling draws). Every
    tensor W of `params` (default: all parameters) is perturbed by ε = sigma · rms(W) · z, z ~ N(0, I), so sigma is
    the perturbation's size relative to the weights' own scale; sigma = 0 gives S = 0 exactly. The weights are
    restored from a saved copy after each perturbation. Every rank must call it. FSDP2 shards (DTensors) get their
    own slice of z per rank (rms over the whole tensor); a replicated model gets the same z on every rank.
    Returns sharpness, J, J_perturbed_mean."""
    params = list(model.parameters()) if params is None else list(params)
    sharded = [isinstance(p, DTensor) for p in params]
    local = [local_shard(p.detach()) for p in params]
    sq = torch.stack([t.double().pow(2).sum() for t in local])
    sq = torch.where(torch.tensor(sharded, device=sq.device), distributed.all_reduce_sum(sq), sq)
    rms = (sq / torch.tensor([p.numel() for p in params], dtype=torch.float64, device=sq.device)).sqrt().tolist()
    rank = distributed.rank_and_world()[0]
    j0 = objective()
    drops = []
    for i in tqdm(range(perturbations), desc="sharpness", disable=rank != 0, delay=2, leave=False):
        with restored(local):
            gens = {}  # one generator per kind: rank-specific for shards, shared for replicated weights
            for t, r, s in zip(local, rms, sharded):
                if s not in gens:
                    state = int(np.random.SeedSequence([seed, i, rank if s else 0]).generate_state(1)[0])
                    gens[s] = torch.Generator(device=t.device).manual_seed(state)
                t.add_(torch.randn(t.shape, generator=gens[s], device=t.device, dtype=t.dtype), alpha=sigma * r)
            drops.append(j0 - objective())
    return {"sharpness": max(drops) if drops else 0.0, "J": j0,
            "J_perturbed_mean": j0 - sum(drops) / len(drops) if drops else j0}


def policy_samples(model, tokenizer, items: list[dict], messages, *, temperature: float, stream: int, seed: int,
                   max_new_tokens: int, batch_size: int):
    """`generation.rollouts` batches for the rows `items` (prompt = messages(row)), sampled with fixed draws (a function
    of seed, stream and rank: the same at every eval); temperature 0 = greedy."""
    rank, device = distributed.rank_and_world()[0], next(model.parameters()).device
    gen = None if temperature == 0 else distributed.step_generator(seed, 10**6 + stream, rank, device)
    return generation.rollouts(model, tokenizer, [render_chat(tokenizer, messages(r)) for r in items],
                               max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                               generator=gen)


def score_batches(batches, items: list[dict], batch_size: int, *scorers) -> torch.Tensor:
    """(n, len(scorers)): every scorer(rows, texts, has_eos) -> (b,) on every batch of `policy_samples(items)`."""
    return torch.cat([torch.stack([f(items[s:s + batch_size], b["texts"], b["ended"]) for f in scorers], 1)
                      for s, b in zip(range(0, len(items), batch_size), batches)])


def proxy_on_policy(model, tokenizer, rows: list[dict], messages, proxy, gold, *, init_model=None, **sampling) -> dict:
    """Two samples per row from the policy: the proxy's Bradley-Terry loss / accuracy on them as pairs oriented by
    the gold (true) reward (score both with the reward models' own outputs, not with a length penalty), the samples'
    mean proxy and gold reward, their share without EOS, and with `init_model` the KL to it."""
    rank, world = distributed.rank_and_world()
    mine = distributed.shard_list(list(range(len(rows))), rank, world)
    twice = [rows[i] for i in mine for _ in range(2)]
    batches = list(policy_samples(model, tokenizer, twice, messages, stream=1, **sampling))
    cols = [score_batches(batches, twice, sampling["batch_size"], proxy, gold).double(),
            torch.cat([~b["ended"] for b in batches]).double()[:, None]]
    if init_model is not None:
        cols.append(torch.cat([sequence_kl(model, init_model, b, sampling["temperature"]) for b in batches])[:, None])
    cols = torch.cat(cols, 1)
    k = cols.shape[1]
    g = distributed.all_gather_rows(cols.view(len(mine), 2 * k), mine, len(rows))  # (proxy, gold, no EOS[, kl]) a, b
    out = {**bt_loss_on_policy(g[:, 0], g[:, k], g[:, 1], g[:, k + 1]),
           "sampled_gold": g[:, [1, k + 1]].mean().item(), "sampled_proxy": g[:, [0, k]].mean().item(),
           "sampled_no_eos": g[:, [2, k + 2]].mean().item()}
    return {**out, "kl": g[:, [3, k + 3]].mean().item()} if init_model is not None else out


def proxy_sharpness(model, tokenizer, rows: list[dict], messages, proxy, *, perturbations: int, sigma: float,
                    **sampling) -> dict:
    """`sharpness` of J(φ) = the mean proxy reward of completions of `rows` sampled with fixed draws."""
    rank, world = distributed.rank_and_world()
    mine = distributed.shard_list(list(range(len(rows))), rank, world)
    items = [rows[i] for i in mine]

    def objective():
        batches = policy_samples(model, tokenizer, items, messages, stream=2, **sampling)
        return distributed.all_gather_rows(score_batches(batches, items, sampling["batch_size"], proxy), mine,
                                           len(rows)).mean().item()

    s = sharpness(model, objective, perturbations=perturbations, sigma=sigma, seed=sampling["seed"])
    return {"sharpness": s["sharpness"], "sharpness_J": s["J"], "sharpness_J_perturbed": s["J_perturbed_mean"]}


def rlhf_evaluator(rows: list[dict], gold, proxy, init_model, *, bt_proxy, pairs: int = 128,
                   sharpness_prompts: int = 64, sharpness_perturbations: int = 32, sharpness_sigma: float = 0.02,
                   **sampling):
    """evaluate(model, tokenizer, step) -> the RLHF metrics of `model` on `rows` (module docstring), for the RL loop
    and `--task tldr`. `gold`/`proxy`: `make_gold`/`make_proxy` (the trained reward, EOS penalty included);
    `bt_proxy`: the proxy RM's raw score (`make_proxy(..., eos_penalty=None)`), whose Bradley-Terry loss / accuracy on
    policy pairs is reported; `init_model`: the initial policy for the KL; sampling: temperature, seed,
    max_new_tokens, batch_size. Every rank calls it; each generates its share."""
    reference_gold = {}  # gold score of the dataset references, computed once

    def evaluate(model, tokenizer, step):
        rank, world = distributed.rank_and_world()
        # 1. greedy completions vs the references, both judged by the gold RM -> win rate
        mine = distributed.shard_list(list(range(len(rows))), rank, world)
        items = [rows[i] for i in mine]
        batches = list(policy_samples(model, tokenizer, items, tldr_messages, stream=0,
                                      **{**sampling, "temperature": 0.0}))
        texts, ended = [t for b in batches for t in b["texts"]], torch.cat([b["ended"] for b in batches])
        if "scores" not in reference_gold:
            reference_gold["scores"] = gold(items, [r["reference"] for r in items], torch.ones(len(mine), dtype=bool))
        lengths = torch.tensor([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])
        local = torch.stack([gold(items, texts, ended), proxy(items, texts, ended), reference_gold["scores"],
                             lengths.float(), ended.float()], 1)
        g = distributed.all_gather_rows(local, mine, len(rows))
        keys = ("gold", "proxy", "reference_gold", "length", "eos_rate")
        out = {"win_rate": win_rate(g[:, 0], g[:, 2]), **{k: g[:, j].mean().item() for j, k in enumerate(keys)}}
        # 2. the proxy's error on gold-labelled pairs of policy samples; KL to the initial policy
        if pairs:
            out.update(proxy_on_policy(model, tokenizer, rows[:pairs], tldr_messages, bt_proxy, gold,
                                       init_model=init_model, **sampling))
        # 3. sharpness of J(φ) = mean proxy reward on fixed prompts with fixed sampling draws
        if sharpness_perturbations and sharpness_prompts:
            out.update(proxy_sharpness(model, tokenizer, rows[:sharpness_prompts], tldr_messages, proxy,
                                       perturbations=sharpness_perturbations, sigma=sharpness_sigma, **sampling))
        return out

    return evaluate


def policy_gradient_norm(model, tokenizer, rows: list[dict], proxy, *, prompts: int = 32, group_size: int = 8,
                         max_new_tokens: int, temperature: float, micro_batch_size: int, seed: int = 0) -> float:
    """‖∇ Dr.GRPO loss‖ (no KL) on `group_size` rollouts of the first `prompts` rows (the paper's 32 × 8), proxy
    rewards: the gradient norm the paper watches as a hacking signal, for a checkpoint."""
    rank, world = distributed.rank_and_world()
    mine = distributed.shard_list(list(range(min(prompts, len(rows)))), rank, world)
    items = [rows[i] for i in mine for _ in range(group_size)]
    gen = distributed.step_generator(seed, 10**6 + 3, rank, next(model.parameters()).device)
    prompts = [render_chat(tokenizer, tldr_messages(r)) for r in items]
    b = next(generation.rollouts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                 batch_size=len(items), generator=gen))
    rewards = proxy(items, b["texts"], b["ended"]).to(b["completion"].device)
    batch = grpo.rl_batch(b["prompt_ids"], b["prompt_mask"], b["completion"], b["cmask"],
                          grpo.group_advantages(rewards, group_size))
    T = b["completion"].shape[1]
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for mb in grpo.micro_batches(batch, micro_batch_size):
            logp, _ = grpo.token_logprobs(model, mb["input_ids"], mb["attention_mask"], T, temperature)
            grpo.dr_grpo_loss(logp, mb["advantages"], mb["completion_mask"], len(items) * max_new_tokens).backward()
    norm = clip_([p.grad for p in model.parameters() if p.grad is not None], float("inf")).item()
    model.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------- command line

def evaluate(cfg: EvalConfig) -> dict:
    cfg.max_new_tokens = cfg.max_new_tokens or MAX_NEW_TOKENS[cfg.task]
    summary = evaluate_tldr(cfg) if cfg.task == "tldr" else evaluate_reasoning(cfg)
    if distributed.is_main():
        print(json.dumps(summary, indent=2))
        if cfg.out:
            Path(cfg.out).write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_reasoning(cfg: EvalConfig) -> dict:
    dataset, config, fields = TASKS[cfg.task]
    rows = loading.load_rows(cfg.dataset or dataset, cfg.split, fields, config)[:cfg.limit or None]
    base = None
    if cfg.base_results:
        if cfg.task != "math":
            loading.fail("--base-results (difficulty quintiles) applies to --task math")
        base = json.loads(Path(cfg.base_results).read_text()).get("per_category")
        if not base:
            loading.fail(f"{cfg.base_results} has no per_category accuracies (write it with this script on MATH)")
    loading.check_model_path(cfg.checkpoint, "--checkpoint")
    rank, world, device = distributed.init_distributed()
    tokenizer = loading.load_tokenizer(cfg.checkpoint)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    policy = distributed.shard(loading.load_model(cfg.checkpoint, device))
    model = generation.rollout_model(policy, getattr(torch, dtype), replica=cfg.rollout_replica)
    del policy  # with a replica, the fp32 shards are dropped once copied
    common = dict(system_prompt=cfg.system_prompt, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    with distributed.autocast(device, dtype):
        greedy = pass_at_1(model, tokenizer, cfg.task, rows, **common)
        sampled = (pass_at_1(model, tokenizer, cfg.task, rows, temperature=cfg.temperature, samples=cfg.samples,
                             seed=cfg.seed, **common) if cfg.samples else None)
    summary = {"checkpoint": cfg.checkpoint, "task": cfg.task, "n": sum(c is not None for c in greedy),
               "skipped_unparsable_gold": sum(c is None for c in greedy), "pass@1_greedy": mean(greedy)}
    if sampled is not None:
        summary.update({"pass@1_sampled": mean(sampled), "samples": cfg.samples, "temperature": cfg.temperature})
    if cfg.task == "math":
        summary["per_category"] = category_accuracy(rows, greedy)
        if base:
            summary["quintiles"] = quintile_accuracy(rows, greedy, base)
    return summary


def evaluate_tldr(cfg: EvalConfig, grad_norm: bool = True) -> dict:
    """The RLHF metrics of one checkpoint (what the RL eval logs), plus the policy-gradient norm."""
    for name, what in ((cfg.checkpoint, "--checkpoint"), (cfg.proxy_rm, "--proxy-rm"),
                       (cfg.reference_model, "--reference-model")):
        if not name:
            loading.fail(f"--task tldr needs {what}")
        loading.check_model_path(name, what)
    if cfg.gold_rm != TOY_GOLD:
        loading.check_model_path(cfg.gold_rm, "--gold-rm")
    rows = load_tldr_rows(cfg.dataset or TASKS["tldr"][0], cfg.split)[:cfg.limit or None]
    rank, world, device = distributed.init_distributed()
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    rm_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    tokenizer = loading.load_tokenizer(cfg.checkpoint)
    policy = distributed.shard(loading.load_model(cfg.checkpoint, device))
    rollout = generation.rollout_model(policy, getattr(torch, dtype), replica=cfg.rollout_replica)
    init_model = distributed.shard(loading.load_model(cfg.reference_model, device)).requires_grad_(False)
    rm = loading.load_reward_model(cfg.proxy_rm, device, pad_token_id=tokenizer.pad_token_id, dtype=rm_dtype)
    rm.requires_grad_(False)
    proxy = make_proxy(rm, tokenizer, eos_penalty=cfg.eos_penalty, batch_size=cfg.batch_size)
    gold = make_gold(cfg.gold_rm, device, dtype=rm_dtype, batch_size=cfg.batch_size)
    evaluate = rlhf_evaluator(rows, gold, proxy, init_model, bt_proxy=make_proxy(rm, tokenizer, eos_penalty=None,
                                                                                 batch_size=cfg.batch_size),
                              max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed,
                              pairs=cfg.eval_pairs, sharpness_prompts=cfg.sharpness_prompts,
                              sharpness_perturbations=cfg.sharpness_perturbations, sharpness_sigma=cfg.sharpness_sigma)
    with distributed.autocast(device, dtype):
        metrics = evaluate(rollout, tokenizer, 0)
        if grad_norm:
            metrics["grad_norm"] = policy_gradient_norm(policy, tokenizer, rows, proxy, seed=cfg.seed,
                                                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                        micro_batch_size=cfg.batch_size)
    keys = ("checkpoint", "task", "gold_rm", "proxy_rm", "reference_model", "sharpness_sigma",
            "sharpness_perturbations")
    return {**{k: getattr(cfg, k) for k in keys}, "n": len(rows), **metrics}


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:
        plots.plot_main(sys.argv[2:])
    else:
        evaluate(loading.parse_config(EvalConfig))
        distributed.finish_distributed()
