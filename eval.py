"""The paper's metrics for any checkpoint dir (or hub id).

Reasoning (§5.2-5.3): pass@1 on the GSM8K / MATH test split, greedy and sampled (mean over k samples per
problem at the training temperature); MATH accuracy per difficulty quintile (Table 4), where each
(type, level) category is placed in a quintile by the *base* model's accuracy on it, read from the JSON
that this script wrote for the base model (`--base-results`).

    python eval.py --checkpoint runs/math/ckpt-000500 --task gsm8k --samples 4 --out runs/math/eval.json
    torchrun --nproc_per_node=8 eval.py --checkpoint Qwen/Qwen2.5-1.5B-Instruct --task math --out base.json
    python eval.py --checkpoint runs/math_gr/ckpt-001000 --task math --base-results base.json

Writes a JSON summary (also printed). Under torchrun the problems are split across ranks.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo
from rewards import (QWEN_SYSTEM_PROMPT, gsm8k_gold, gsm8k_messages, gsm8k_rewards, math_messages, math_rewards_batch,
                     render_chat)

TASKS = {"gsm8k": ("openai/gsm8k", "main", ("question", "answer")),
         "math": ("DigitalLearningGmbH/MATH-lighteval", None, ("problem", "solution", "level", "type"))}
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


if __name__ == "__main__":
    evaluate(grpo.parse_config(EvalConfig))
