"""RLVR on GSM8K / MATH with rule-based rewards (paper §5.2, App. C.4, Tables 8-9).

    python train_math.py --preset toy                      # offline: tiny Qwen2 + synthetic GSM8K, CPU, minutes
    python train_math.py --reg gr                          # 1 GPU, Qwen2.5-0.5B-Instruct on openai/gsm8k
    torchrun --nproc_per_node=8 train_math.py --model Qwen/Qwen2.5-1.5B-Instruct --reg gr
    torchrun --nproc_per_node=8 train_math.py --task math --model Qwen/Qwen2.5-1.5B-Instruct --reg gr --steps 1000

Kept from the paper: Dr.GRPO, 32 prompts × 8 rollouts (MATH: 128 × 8), temperature 0.7, Adam (0.9, 0.999),
lr 5e-6 with GR and 3e-6 without, GR γ = ε = 1e-3 with g1/g2 clipped to 10, final clip 1.0, completion length
768 (MATH 1024), one-shot GSM8K prompt with the five reward terms (max 5.0), MATH: math-verify correctness
(2.0) + reasoning-steps format (≤ 1.0). Changed: FSDP2 instead of DeepSpeed ZeRO-2; KL β = 0.05 is the
default for --reg kl (Table 9), not for the other regimes. The correctness term is logged as the true reward.
"""

from dataclasses import dataclass, field

import torch

import distributed
import eval as evaluation
import grpo
import loading
import toy
from rewards import (GSM8K_REWARD_KEYS, QWEN_SYSTEM_PROMPT, grader_pool, gsm8k_gold, gsm8k_rewards,
                     math_rewards_batch)


PROMPTS_PER_STEP = {"gsm8k": 32, "math": 128}  # × 8 rollouts = 256 / 1024 sequences per step (Tables 8-9)


@dataclass
class Config(grpo.RLConfig):
    """Dr.GRPO on GSM8K or MATH with rule-based rewards; --reg none|kl|reset|gr."""
    task: str = field(default="gsm8k", metadata={"help": "reward and prompt format", "choices": ("gsm8k", "math")})
    dataset: str = field(default=None, metadata={"type": str, "help": "hub id or local json/jsonl/parquet "
                                                                      "(default: openai/gsm8k or MATH-lighteval)"})
    test_dataset: str = field(default=None, metadata={"type": str, "help": "eval data (default: --dataset's test split)"})
    system_prompt: str = field(default=QWEN_SYSTEM_PROMPT, metadata={"help": "system prompt ('' for none)"})
    grader_workers: int = field(default=0, metadata={"help": "MATH: processes grading with math-verify, started once "
                                                             "per run (0 = in the training process)"})
    # None: the paper's recipe for --task, filled in by `resolve_task_defaults`
    prompts_per_step: int = field(default=None, metadata={
        "type": int, "help": "prompts per step, all ranks; default by --task: gsm8k 32, math 128 (x 8 rollouts: the "
                             "paper's 256 / 1024 sequences)"})
    max_new_tokens: int = field(default=None, metadata={
        "type": int, "help": "completion length, also the loss normaliser; default by --task: gsm8k 768, math 1024"})


PRESETS = {
    # Offline toy: a 0.5M-param Qwen2 SFT'd on synthetic GSM8K-style problems (toy.py builds it on first use).
    "toy": dict(model=str(toy.GSM8K_POLICY), dataset=str(toy.GSM8K_TRAIN), test_dataset=str(toy.GSM8K_TEST),
                out_dir="runs/toy_math", system_prompt="", steps=60, prompts_per_step=16, group_size=8,
                max_new_tokens=32, max_prompt_tokens=128, micro_batch_size=128, lr=1e-4, eval_every=20,
                eval_limit=200, save_every=20, gen_batch_size=200),
}


def resolve_task_defaults(cfg: Config) -> Config:
    """--prompts-per-step and --max-new-tokens that neither a flag nor a preset set: the paper's recipe for --task."""
    if cfg.prompts_per_step is None:
        cfg.prompts_per_step = PROMPTS_PER_STEP[cfg.task]
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = evaluation.MAX_NEW_TOKENS[cfg.task]
    return cfg


def load_task(cfg: Config):
    """Train rows (with the parsed gold answer) and test rows; MATH rows with an unparsable gold are dropped."""
    dataset, config, fields = evaluation.TASKS[cfg.task]
    train = loading.load_rows(cfg.dataset or dataset, "train", fields, config)
    test = loading.load_rows(cfg.test_dataset or cfg.dataset or dataset, "test", fields, config)
    if cfg.task == "gsm8k":
        for r in train:
            r["gold"] = gsm8k_gold(r["answer"])
    else:
        ok = [g is not None for g in math_rewards_batch([""] * len(train), [r["solution"] for r in train])]
        if not all(ok):
            print(f"skipping {ok.count(False)} MATH training problems whose gold answer math-verify cannot parse")
        train = [r for r, keep in zip(train, ok) if keep]
    return train, test


def main(cfg: Config):
    resolve_task_defaults(cfg)
    toy_policy = cfg.model == str(toy.GSM8K_POLICY)
    grpo.validate(cfg, check_model=not toy_policy)
    if toy_policy:  # built on first use, after the flags are checked
        toy.wait_or_build(toy.build_gsm8k_policy, toy.GSM8K_POLICY / "model.safetensors")
    train, test = load_task(cfg)
    test = test[:cfg.eval_limit] if cfg.eval_limit else test
    system = cfg.system_prompt or None

    graders = grader_pool(cfg.grader_workers if cfg.task == "math" else 0)  # one pool for the whole run

    def make_prompt(row):
        return evaluation.prompt_messages(cfg.task, row, system)

    def score(rows, completions, has_eos):
        if cfg.task == "gsm8k":
            terms = [gsm8k_rewards(c, r["gold"]) for r, c in zip(rows, completions)]
            keys = GSM8K_REWARD_KEYS
        else:
            terms = math_rewards_batch(completions, [r["solution"] for r in rows], pool=graders)
            keys = ("correctness", "reasoning_steps")
        per_term = {k: torch.tensor([t[k] for t in terms]) for k in keys}
        per_term["true_reward"] = per_term["correctness"] / 2.0  # accuracy: rule-based correctness is the truth
        if cfg.task == "math":  # share of answers math-verify failed to grade (timeout, error); their correctness is 0
            per_term["grader_failure_rate"] = torch.tensor([t["grader_failure"] for t in terms])
        return sum(per_term[k] for k in keys), per_term

    evaluate = evaluation.pass_at_1_evaluator(cfg.task, test, system_prompt=system, max_new_tokens=cfg.max_new_tokens,
                                              batch_size=cfg.gen_batch_size, temperature=cfg.temperature, seed=cfg.seed)
    try:
        return grpo.rl_train(cfg, train, make_prompt, score, evaluate)
    finally:
        if graders is not None:
            graders.shutdown()


if __name__ == "__main__":
    main(loading.parse_config(Config, presets=PRESETS))
    distributed.finish_distributed()
