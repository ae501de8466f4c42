"""The paper's metrics for any checkpoint dir (or hub id).

Reasoning (§5.2-5.3): pass@1 on the GSM8K / MATH test split, greedy and sampled (mean over k samples per
problem at the training temperature); MATH accuracy per difficulty quintile (Table 4), where each
(type, level) category is placed in a quintile by the *base* model's accuracy on it, read from the JSON
that this script wrote for the base model (`--base-results`).

    python eval.py --checkpoint runs/math/ckpt-000500 --task gsm8k --samples 4 --out runs/math/eval.json
    torchrun --nproc_per_node=8 eval.py --checkpoint Qwen/Qwen2.5-1.5B-Instruct --task math --out base.json
    python eval.py --checkpoint runs/math_gr/ckpt-001000 --task math --base-results base.json

RLHF (§4-5.1, `--task tldr`): win rate vs the reference completion judged by the gold RM, BT loss / accuracy of the
proxy RM on gold-labelled pairs sampled from the policy, KL to the initial policy, sharpness and gradient norm
(definitions and scales: train_tldr.py's docstring).

    python eval.py --task tldr --checkpoint runs/tldr/rl-gr/ckpt-001000 --proxy-rm runs/tldr/rm \
        --reference-model runs/tldr/sft --max-new-tokens 106 --limit 512 --out runs/tldr/rl-gr/eval.json
    python eval.py --task tldr --checkpoint runs/toy_tldr/rl-gr/ckpt-000150 --dataset .cache/toy/tldr_test.jsonl \
        --gold-rm toy --proxy-rm runs/toy_tldr/rm --reference-model runs/toy_tldr/sft --max-new-tokens 16
    python eval.py plot runs/toy_tldr/rl-none runs/toy_tldr/rl-gr --out fig.png \
        --panel step:rewards/proxy,rewards/gold --panel eval/kl:eval/gold     # metrics.jsonl curves -> PNG

Writes a JSON summary (also printed). Under torchrun the problems are split across ranks.
"""

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo
from rewards import (QWEN_SYSTEM_PROMPT, gsm8k_gold, gsm8k_messages, gsm8k_rewards, math_messages, math_rewards_batch,
                     render_chat)

TASKS = {"gsm8k": ("openai/gsm8k", "main", ("question", "answer")),
         "math": ("DigitalLearningGmbH/MATH-lighteval", None, ("problem", "solution", "level", "type")),
         "tldr": ("trl-lib/tldr", None, ("prompt", "completion"))}  # fields: see train_tldr.load_split
QUINTILES = ("00-20%", "20-40%", "40-60%", "60-80%", ">80%")


@dataclass
class EvalConfig:
    """Evaluate a checkpoint on GSM8K or MATH: pass@1 greedy and sampled, MATH per-quintile accuracy."""
    checkpoint: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "HF dir or hub id"})
    task: str = field(default="gsm8k", metadata={"help": "benchmark", "choices": tuple(TASKS)})
    dataset: str = field(default=None, metadata={"type": str, "help": "hub id or local file (default: the task's)"})
    split: str = field(default="test", metadata={"help": "split of a hub dataset"})
    limit: int = field(default=0, metadata={"help": "first N problems only (0 = all)"})
    samples: int = field(default=0, metadata={"help": "k samples per problem for sampled pass@1 (0 = greedy only)"})
    temperature: float = field(default=0.7, metadata={"help": "temperature of the sampled pass@1"})
    max_new_tokens: int = field(default=768, metadata={"help": "completion length (GSM8K 768, MATH 1024)"})
    batch_size: int = field(default=64, metadata={"help": "prompts per generate call on one rank"})
    system_prompt: str = field(default=QWEN_SYSTEM_PROMPT, metadata={"help": "system prompt ('' for none)"})
    base_results: str = field(default=None, metadata={"type": str, "help": "base model's eval JSON (MATH quintiles)"})
    out: str = field(default=None, metadata={"type": str, "help": "write the JSON summary here"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": ("auto", "float32", "bfloat16")})
    # --task tldr (RLHF)
    gold_rm: str = field(default="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
                         metadata={"help": "tldr: gold RM (hub id, dir, or 'toy')"})
    proxy_rm: str = field(default=None, metadata={"type": str, "help": "tldr: the proxy RM dir RL trained against"})
    reference_model: str = field(default=None, metadata={"type": str, "help": "tldr: initial (SFT) policy for the KL"})
    sharpness_sigma: float = field(default=0.02, metadata={"help": "tldr: perturbation std / each tensor's RMS"})
    sharpness_perturbations: int = field(default=32, metadata={"help": "tldr: random perturbations (0 = skip)"})


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
    """Per-problem accuracy (mean over `samples` completions; greedy when temperature is 0), all ranks'
    problems gathered in order. Every rank must call this (generation runs in lockstep under FSDP2)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if grpo.is_distributed() else (0, 1)
    mine = grpo.shard_list(list(range(len(rows))), rank, world)
    device = next(model.parameters()).device
    prompts = [render_chat(tokenizer, prompt_messages(task, rows[i], system_prompt)) for i in mine]
    eos = grpo.eos_token_ids(tokenizer, model)
    scores = torch.zeros(len(mine), dtype=torch.float64)
    valid = torch.ones(len(mine), dtype=torch.bool)
    for k in range(samples):
        generator = grpo.step_generator(seed, k, rank, device)
        texts = []
        for i in tqdm(range(0, len(prompts), batch_size), desc=f"eval {task} {k + 1}/{samples}", disable=rank != 0,
                      leave=False):
            texts += grpo.generate_texts(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                                         temperature=temperature, eos_ids=eos, batch_size=batch_size,
                                         generator=generator)[0]
        for j, g in enumerate(grade(task, [rows[i] for i in mine], texts)):
            if g is None:
                valid[j] = False
            else:
                scores[j] += g / samples
    gathered = torch.stack([torch.tensor(mine, dtype=torch.float64), scores, valid.double()])
    if world > 1:
        parts = [torch.zeros_like(gathered) for _ in range(world)]
        dist.all_gather(parts, gathered)
        gathered = torch.cat(parts, 1)
    result: list[float | None] = [None] * len(rows)
    for i, s, v in gathered.T.tolist():  # padded duplicates just rewrite the same entry
        result[int(i)] = s if v else None
    return result


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


def evaluate(cfg: EvalConfig) -> dict:
    if cfg.task == "tldr":
        return evaluate_tldr(cfg)
    dataset, config, fields = TASKS[cfg.task]
    rows = grpo.load_rows(cfg.dataset or dataset, cfg.split, fields, config)
    rows = rows[:cfg.limit] if cfg.limit else rows
    base = None
    if cfg.base_results:
        if cfg.task != "math":
            grpo.fail("--base-results (difficulty quintiles) applies to --task math")
        base = json.loads(Path(cfg.base_results).read_text()).get("per_category")
        if not base:
            grpo.fail(f"{cfg.base_results} has no per_category accuracies (write it with this script on MATH)")
    grpo.check_model_path(cfg.checkpoint, "--checkpoint")
    rank, world, device = grpo.init_distributed()
    tokenizer = grpo.load_tokenizer(cfg.checkpoint)
    model = grpo.shard(grpo.load_model(cfg.checkpoint, device))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    common = dict(system_prompt=cfg.system_prompt, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    with grpo.autocast(device, dtype):
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
    if rank == 0:
        print(json.dumps(summary, indent=2))
        if cfg.out:
            Path(cfg.out).write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- RLHF metrics (§4-5.1, train_tldr.py)

def win_rate(policy_scores, reference_scores) -> float:
    """Fraction of prompts where the gold RM scores the policy's completion above the reference; ties count 1/2."""
    p, r = torch.as_tensor(policy_scores, dtype=torch.float64), torch.as_tensor(reference_scores, dtype=torch.float64)
    return ((p > r).double() + 0.5 * (p == r).double()).mean().item()


def bt_loss_on_policy(proxy_a, proxy_b, gold_a, gold_b) -> dict:
    """Bradley-Terry loss (eq. 3) and accuracy of the proxy RM on pairs (a, b), each pair oriented by the gold RM.

    Pairs the gold RM ties are dropped; a proxy tie counts as half correct. Returns bt_loss, bt_accuracy, bt_pairs
    (nan loss/accuracy when no pair is left)."""
    from rewards import bradley_terry_loss
    pa, pb, ga, gb = (torch.as_tensor(x, dtype=torch.float64) for x in (proxy_a, proxy_b, gold_a, gold_b))
    keep = ga != gb
    chosen = torch.where(ga > gb, pa, pb)[keep]
    rejected = torch.where(ga > gb, pb, pa)[keep]
    if not keep.any():
        return {"bt_loss": math.nan, "bt_accuracy": math.nan, "bt_pairs": 0}
    accuracy = ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean().item()
    return {"bt_loss": bradley_terry_loss(chosen, rejected).item(), "bt_accuracy": accuracy,
            "bt_pairs": int(keep.sum())}


def kl_to_reference(logp, ref_logp, mask) -> torch.Tensor:
    """(N,) sequence KL estimate Σ_t (log π − log π_ref) over the completion tokens (mask = 1), for completions
    sampled from π: an unbiased estimate of KL(π ‖ π_ref) per sequence (k1 summed over tokens)."""
    return ((logp - ref_logp) * mask).sum(-1)


@torch.no_grad()
def sharpness(model, objective, *, perturbations: int = 32, sigma: float = 0.02, seed: int = 0, params=None) -> dict:
    """S = max_i J(φ) − J(φ + ε_i) over `perturbations` random directions (paper §4, Fig. 3).

    `objective()` returns J at the model's current weights (deterministic: fixed prompts and sampling seed). Every
    tensor W of `params` (default: all parameters) is perturbed by ε = sigma · rms(W) · z, z ~ N(0, I), so sigma is
    the perturbation's size relative to the weights' own scale; sigma = 0 gives S = 0 exactly. The weights are
    restored from a saved copy after each perturbation. Works on FSDP2 models (each rank perturbs its local shard;
    rms over the whole tensor); every rank must call it. Returns sharpness, J, J_perturbed_mean."""
    from torch.distributed.tensor import DTensor
    import numpy as np
    params = list(model.parameters()) if params is None else list(params)
    local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in params]
    saved = [t.clone() for t in local]
    sq = grpo.all_reduce_sum(torch.stack([t.double().pow(2).sum() for t in local]))
    rms = (sq / torch.tensor([p.numel() for p in params], dtype=torch.float64, device=sq.device)).sqrt().tolist()
    rank = dist.get_rank() if grpo.is_distributed() else 0
    j0 = objective()
    drops = []
    for i in range(perturbations):
        state = int(np.random.SeedSequence([seed, i, rank]).generate_state(1)[0])
        gen = torch.Generator(device=local[0].device).manual_seed(state)
        for t, r in zip(local, rms):
            t.add_(torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype), alpha=sigma * r)
        try:
            drops.append(j0 - objective())
        finally:
            torch._foreach_copy_(local, saved)
    return {"sharpness": max(drops) if drops else 0.0, "J": j0,
            "J_perturbed_mean": j0 - sum(drops) / len(drops) if drops else j0}


def evaluate_tldr(cfg: EvalConfig) -> dict:
    import train_tldr
    summary = train_tldr.evaluate_checkpoint(
        cfg.checkpoint, dataset=cfg.dataset, split=cfg.split, limit=cfg.limit, gold_rm=cfg.gold_rm,
        proxy_rm=cfg.proxy_rm, reference_model=cfg.reference_model, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed, dtype=cfg.dtype,
        sharpness_sigma=cfg.sharpness_sigma, sharpness_perturbations=cfg.sharpness_perturbations)
    if not grpo.is_distributed() or dist.get_rank() == 0:
        print(json.dumps(summary, indent=2))
        if cfg.out:
            Path(cfg.out).write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- curves from metrics.jsonl

def load_metrics(run) -> list[dict]:
    """Records of a metrics.jsonl file or of a run dir's metrics.jsonl (step -1: the initial policy's eval)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.exists():
        grpo.fail(f"no metrics at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# the paper's Fig. 3/4 quantities: proxy vs gold reward over steps, gold reward vs KL to the initial policy, ...
TLDR_PANELS = [("step", ["rewards/proxy", "rewards/gold"]), ("eval/kl", ["eval/gold", "eval/proxy"]),
               ("step", ["eval/win_rate"]), ("step", ["grad_norm"]), ("step", ["eval/bt_loss"]),
               ("step", ["eval/sharpness"])]


def plot_runs(runs, out, panels: list[tuple[str, list[str]]], *, title: str | None = None, smooth: int = 10) -> Path:
    """One subplot per (x key, [y keys]) panel, one line per run and y key (records lacking either are skipped).
    Per-step series longer than 3·smooth are shown as a `smooth`-step moving average. Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = {Path(r).name if Path(r).is_dir() else str(r): load_metrics(r) for r in runs}
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (x, ys) in zip(axes.flat, panels):
        for k, (name, records) in enumerate(data.items()):
            for j, y in enumerate(ys):  # one colour per run, one line style per key
                pts = sorted((r[x], r[y]) for r in records if isinstance(r.get(x), (int, float))
                             and isinstance(r.get(y), (int, float)) and math.isfinite(r[y]))
                if not pts:
                    continue
                xs, vs = zip(*pts)
                if x == "step" and len(vs) > 3 * smooth:
                    vs = [sum(vs[max(0, i - smooth + 1):i + 1]) / len(vs[max(0, i - smooth + 1):i + 1])
                          for i in range(len(vs))]
                label = y if len(data) == 1 else f"{name}: {y}"
                color = colors[(j if len(data) == 1 else k) % len(colors)]
                ax.plot(xs, vs, marker="o" if len(xs) < 30 else None, markersize=3, label=label, color=color,
                        linestyle="-" if len(data) == 1 else ("-", "--", ":", "-.")[j % 4])
        ax.set_xlabel(x)
        ax.set_ylabel(", ".join(ys))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_main(argv: list[str]) -> Path:
    import argparse
    parser = argparse.ArgumentParser(prog="eval.py plot", description="metrics.jsonl curves of one or more runs")
    parser.add_argument("runs", nargs="+", help="run dirs (metrics.jsonl inside) or metrics.jsonl files")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--panel", action="append", metavar="X:Y1,Y2",
                        help="x key and y keys of one subplot; repeatable (default: the TL;DR panels)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window of per-step series")
    args = parser.parse_args(argv)
    if any(":" not in p for p in args.panel or []):
        grpo.fail("--panel takes X:Y1,Y2 (e.g. step:rewards/proxy,rewards/gold)")
    panels = [(p.split(":", 1)[0], p.split(":", 1)[1].split(",")) for p in args.panel or []] or TLDR_PANELS
    path = plot_runs(args.runs, args.out, panels, smooth=args.smooth)
    print(path)
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:
        plot_main(sys.argv[2:])
    else:
        evaluate(grpo.parse_config(EvalConfig))
