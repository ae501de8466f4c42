"""RLVR on GSM8K with an LLM judge as the correctness reward (paper §5.3, App. C.5, Fig. 7-8).

    python train_judge.py --preset toy                     # offline: tiny policy + tiny judge, CPU, minutes
    python train_judge.py --reg gr                         # 1 GPU: Qwen2.5-0.5B-Instruct judged by Qwen2.5-1.5B-Instruct
    torchrun --nproc_per_node=8 train_judge.py --reg gr
    torchrun --nproc_per_node=8 train_judge.py --reg none  # watch the judge get hacked (Fig. 7)

The training reward is the judge's correctness score scaled to [0, 2] plus the four GSM8K format terms
(the paper's setup); the rule-based correctness is logged as the true reward every step (`rewards/true_reward`,
never trained on), beside the judge reward and the judge's parse-failure rate. Kept from the paper: the judge
prompt of App. C.5 with one correct example shot, judge sampling at temperature 0.7, top-p 0.8, top-k 20,
≤ 64 new tokens, failure reward −2 for an unparsable score, and the GSM8K recipe of train_math.py. Changed:
FSDP2 instead of DeepSpeed; the judge is not sharded (a replica per rank, generating independently), and the
paper's one-shot example is not published, so ours is GSM8K train example 0 (rewards.py).
"""

from dataclasses import dataclass, field

import torch

import distributed
import eval as evaluation
import grpo
import loading
import toy
import train_math
from rewards import QWEN_SYSTEM_PROMPT, gsm8k_gold, gsm8k_rewards, judge_rewards


@dataclass
class Config(grpo.RLConfig):
    """Dr.GRPO on GSM8K rewarded by an LLM judge (+ format terms); --reg none|kl|reset|gr."""
    judge: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "judge LM: hub id or local HF dir"})
    dataset: str = field(default="openai/gsm8k", metadata={"help": "hub id or local json/jsonl/parquet"})
    test_dataset: str = field(default=None, metadata={"type": str, "help": "eval data (default: --dataset's test split)"})
    system_prompt: str = field(default=QWEN_SYSTEM_PROMPT, metadata={"help": "policy system prompt ('' for none)"})
    judge_batch_size: int = field(default=64, metadata={"help": "judge prompts per generate call"})
    judge_max_new_tokens: int = field(default=64, metadata={"help": "judge reply length (paper: 64)"})
    failure_reward: float = field(default=-2.0, metadata={"help": "judge reward when its score is unparsable"})
    eval_pairs: int = field(default=0, metadata={"help": "eval prompts sampled twice: the judge's Bradley-Terry loss "
                                                         "/ accuracy against the rule on the policy's samples (0: off)"})
    sharpness_perturbations: int = field(default=0, metadata={"help": "eval: sharpness of the mean judge reward "
                                                                      "over this many perturbations (0: off)"})
    sharpness_sigma: float = field(default=0.02, metadata={"help": "perturbation std relative to each tensor's RMS"})
    sharpness_prompts: int = field(default=32, metadata={"help": "prompts of the sharpness objective J"})


PRESETS = {
    # Offline toy: the toy GSM8K policy of train_math.py judged by a tiny LM taught the judge format (toy.py).
    "toy": {**train_math.PRESETS["toy"], "judge": str(toy.judge_path()), "out_dir": "runs/toy_judge",
            "judge_batch_size": 128},
}
FORMAT_TERMS = ("int_format", "strict_format", "soft_format", "xml_count")


def main(cfg: Config):
    toy_models = {str(toy.GSM8K_POLICY), str(toy.judge_path())}
    grpo.validate(cfg, check_model=cfg.model not in toy_models)
    if cfg.judge not in toy_models:
        loading.check_model_path(cfg.judge, "--judge")
    if cfg.model in toy_models or cfg.judge in toy_models:  # built on first use, after the flags are checked
        toy.wait_or_build(toy.build_gsm8k_judge, toy.judge_path() / "model.safetensors")
    train = loading.load_rows(cfg.dataset, "train", ("question", "answer"), "main")
    test = loading.load_rows(cfg.test_dataset or cfg.dataset, "test", ("question", "answer"), "main")
    test = test[:cfg.eval_limit] if cfg.eval_limit else test
    for r in train:
        r["gold"] = gsm8k_gold(r["answer"])
    _, _, device = distributed.init_distributed()
    judge_tokenizer = loading.load_tokenizer(cfg.judge, cfg.trust_remote_code)
    judge_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    judge = loading.load_model(cfg.judge, device, dtype=judge_dtype, trust_remote_code=cfg.trust_remote_code)
    judge.requires_grad_(False)
    system = cfg.system_prompt or None

    def make_prompt(row):
        return evaluation.prompt_messages("gsm8k", row, system)

    def score(rows, completions, has_eos):
        judged, failures = judge_rewards(judge, judge_tokenizer, [r["question"] for r in rows], completions,
                                         [r["answer"] for r in rows], batch_size=cfg.judge_batch_size,
                                         max_new_tokens=cfg.judge_max_new_tokens, failure_reward=cfg.failure_reward)
        rule = [gsm8k_rewards(c, r["gold"]) for r, c in zip(rows, completions)]
        terms = {k: torch.tensor([t[k] for t in rule]) for k in FORMAT_TERMS}
        terms["judge_correctness"] = judged
        terms["judge_failure_rate"] = torch.full_like(judged, failures / len(rows))
        terms["true_reward"] = torch.tensor([t["correctness"] / 2.0 for t in rule])  # logged, never trained on
        return judged + sum(terms[k] for k in FORMAT_TERMS), terms

    def judged(rows, completions, has_eos):  # the eval's proxy: fixed judge draws, so J(φ) is a function of φ
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            return judge_rewards(judge, judge_tokenizer, [r["question"] for r in rows], completions,
                                 [r["answer"] for r in rows], batch_size=cfg.judge_batch_size,
                                 max_new_tokens=cfg.judge_max_new_tokens, failure_reward=cfg.failure_reward)[0]

    def rule(rows, completions, has_eos):  # the truth: rule-based correctness
        return torch.tensor([gsm8k_rewards(c, gsm8k_gold(r["answer"]))["correctness"]
                             for r, c in zip(rows, completions)])

    pass_at_1 = evaluation.pass_at_1_evaluator("gsm8k", test, system_prompt=system, max_new_tokens=cfg.max_new_tokens,
                                               batch_size=cfg.gen_batch_size, temperature=cfg.temperature,
                                               seed=cfg.seed)

    def evaluate(model, tokenizer, step):
        out = pass_at_1(model, tokenizer, step)
        sampling = dict(temperature=cfg.temperature, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.gen_batch_size)
        if cfg.eval_pairs:  # the judge's error on the policy's own samples
            out.update(evaluation.proxy_on_policy(model, tokenizer, test[:cfg.eval_pairs], make_prompt, judged, rule,
                                                  **sampling))
        if cfg.sharpness_perturbations:
            out.update(evaluation.proxy_sharpness(model, tokenizer, test[:cfg.sharpness_prompts], make_prompt, judged,
                                                  perturbations=cfg.sharpness_perturbations,
                                                  sigma=cfg.sharpness_sigma, **sampling))
        return out

    return grpo.rl_train(cfg, train, make_prompt, score, evaluate)


if __name__ == "__main__":
    main(loading.parse_config(Config, presets=PRESETS))
    distributed.finish_distributed()
