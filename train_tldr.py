"""RLHF with a reward model on TL;DR (paper §4-5.1, App. C.2-C.3): SFT -> proxy RM -> Dr.GRPO, gold-RM evaluation.

The synthetic-gold setup (Gao et al. 2023): a "gold" RM labels pairs sampled from the SFT policy, a proxy RM is
trained on those labels, RL maximises the proxy, and the gold RM measures what RL really achieved (reward hacking
= proxy up, gold down). Three stages, chained by default (`--stage all`), each writing a HF dir under --out-dir:

    sft  one epoch of SFT on prompt/reference pairs                        -> OUT/sft
    rm   2 samples per prompt from OUT/sft, labelled by --gold-rm, Bradley-Terry training of a scalar-head RM
         initialised from OUT/sft (one epoch), held-out pair accuracy      -> OUT/rm (+ pairs.jsonl)
    rl   Dr.GRPO against OUT/rm with --reg none|kl|reset|gr, EOS penalty  -> OUT/rl-{reg} (metrics.jsonl, ckpts)

    python train_tldr.py --preset toy                                # offline toy, whole chain, CPU, minutes
    python train_tldr.py --preset toy --stage rl --reg gr            # RL only, reusing the toy's OUT/sft, OUT/rm
    python eval.py plot runs/toy_tldr/rl-none runs/toy_tldr/rl-gr --out fig.png   # compare runs
    # real: Pythia-1B SFT -> RM -> RL on TL;DR, gold = Skywork-Reward-Llama-3.1-8B-v0.2 (1 GPU, then 8 GPUs)
    python train_tldr.py --model EleutherAI/pythia-1b-deduped --out-dir runs/tldr_pythia1b --reg reset
    torchrun --nproc_per_node=8 train_tldr.py --model EleutherAI/pythia-1b-deduped --out-dir runs/tldr_pythia1b \
        --stage all --reg reset
    torchrun --nproc_per_node=8 train_tldr.py --out-dir runs/tldr_pythia1b --stage rl --reg gr --gamma 1e-2
    torchrun --nproc_per_node=8 train_tldr.py --model Qwen/Qwen2.5-1.5B --out-dir runs/tldr_qwen15 --reg kl

Dataset: a hub id or local json/jsonl/parquet with a prompt field (`prompt` or `query`) and a reference field
(`reference`, `completion` or `reference_response`); default `trl-lib/tldr` (prompt/completion; its test split is
the eval set). The Huang et al. (2024) set `vwxyzjn/summarize_from_feedback_tldr_3_filtered` (query /
reference_response) also works. Prompts are rendered with `rewards.render_chat` as one user turn (the tokenizer's
chat template, or "User: ...\\n\\nAssistant:" for tokenizers without one, e.g. Pythia), identically in every stage.

Gold RM: `--gold-rm` is a hub id / dir of an `AutoModelForSequenceClassification` scored as its model card does
(prompt + completion rendered as a user/assistant conversation with the gold RM's own chat template), or `toy` for
the toy's programmatic gold reward. A real gold RM scores completions as written, with or without an EOS.
The proxy RM (this script's) reads prompt + completion + EOS at the last token (`rewards.rm_scores`); a completion
that hits the length limit (no EOS) gets --eos-penalty (authors: -1) as its training reward.

Kept from the paper (Tables 5-7, App. C.2): SFT and RM one epoch each, RM initialised from the SFT model, RM pairs
sampled from the SFT policy and labelled by the gold RM, Dr.GRPO with 32 prompts x 8 rollouts = 256 sequences,
temperature 0.7, 106 new tokens, Adam (0.9, 0.999), lr 5e-6 (gr) / 3e-6 (others), clip 1.0, GR eps 1e-3,
reference reset every R = 200 steps. Defaults where the paper gives a range: gamma = 1e-2 (tuned in
{1e-3, 1e-2, 1e-1}), beta = 0.05 for --reg kl (0.03-0.1) and 0.3 for --reg reset (0.2-0.4), when --beta is not given.
Changed: FSDP2 instead of DeepSpeed; SFT/RM optimiser AdamW (weight decay 0.01, lr decayed linearly to 0, lr 3e-6)
following Huang et al. (2024) as far as we know their recipe, not tuned here; no RM output normalisation;
pairs with a gold tie or a cut-off completion are dropped from RM training.

Metrics (every --eval-every RL steps, and for any checkpoint with `eval.py --task tldr`): win rate of greedy
completions vs the dataset reference judged by the gold RM; gold and proxy reward of those completions; BT loss
and accuracy of the proxy RM on pairs sampled from the current policy (temperature T) labelled by the gold RM;
sequence KL to the initial (SFT) policy, sum over tokens of log π − log π_sft on samples at temperature T (both
distributions tempered by T, as in training); sharpness S = max over 32 perturbations ε_i of J(φ) − J(φ+ε_i),
J the mean proxy reward (with EOS penalty) of completions sampled at T with a fixed seed on fixed prompts, every
weight tensor W perturbed by ε = σ·rms(W)·N(0, I), σ = --sharpness-sigma (default 0.02, i.e. 2% of each tensor's
RMS; all parameters, embedding and head included). The initial policy's metrics are the first line of
OUT/rl-{reg}/metrics.jsonl (step -1). Every RL step logs the proxy and gold reward of the training rollouts and the gradient norm.

The offline toy (`--preset toy`, toy.py "TL;DR toy"): posts are lists of 4-6 topics, each topic has a hidden
importance 1-3, the gold reward is the importance of the post's topics a summary names minus 1.5 per word; the
proxy RM is trained on ~2,200 gold-labelled SFT pairs (held-out accuracy ~0.79), and RL against it first improves
the gold reward, then learns to name important topics that are not in the post (hallucination), which the proxy
rewards and the gold penalises. Same code paths as the real run; ~3 min on 2 CPU cores.
"""

import dataclasses
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import eval as evaluation
import grpo
import toy
from gr import clip_
from rewards import bradley_terry_loss, render_chat, rm_scores, rm_scores_from_ids

STAGES = ("all", "sft", "rm", "rl")
PROMPT_FIELDS = ("prompt", "query")
REFERENCE_FIELDS = ("reference", "completion", "reference_response")
TOY_GOLD = "toy"


@dataclass
class Config(grpo.RLConfig):
    """TL;DR RLHF: SFT -> proxy RM (gold-labelled pairs) -> Dr.GRPO --reg none|kl|reset|gr, gold-RM evaluation."""
    model: str = field(default="EleutherAI/pythia-1b-deduped", metadata={"help": "base model of the SFT stage "
                                                                                 "(hub id or HF dir)"})
    out_dir: str = field(default="runs/tldr", metadata={"help": "stage outputs: OUT/sft, OUT/rm, OUT/rl-{reg}"})
    stage: str = field(default="all", metadata={"help": "all = sft, rm, rl in turn", "choices": STAGES})
    dataset: str = field(default="trl-lib/tldr", metadata={"help": "hub id or local json/jsonl/parquet"})
    test_dataset: str = field(default=None, metadata={"type": str, "help": "eval data (default: --dataset's "
                                                                           "--test-split)"})
    test_split: str = field(default="test", metadata={"help": "split of a hub --dataset used for evaluation"})
    prompt_field: str = field(default=None, metadata={"type": str, "help": "default: the first of "
                                                                           f"{PROMPT_FIELDS} present"})
    reference_field: str = field(default=None, metadata={"type": str, "help": "default: the first of "
                                                                              f"{REFERENCE_FIELDS} present"})
    gold_rm: str = field(default="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
                         metadata={"help": f"gold RM: hub id or dir of a sequence classifier, or '{TOY_GOLD}'"})
    gold_batch_size: int = field(default=16, metadata={"help": "sequences per gold/proxy RM forward"})
    sft_dir: str = field(default=None, metadata={"type": str, "help": "SFT policy dir (default OUT/sft)"})
    rm_dir: str = field(default=None, metadata={"type": str, "help": "proxy RM dir (default OUT/rm)"})
    rl_dir: str = field(default=None, metadata={"type": str, "help": "RL run dir (default OUT/rl-{reg})"})
    sft_epochs: int = field(default=1, metadata={"help": "SFT epochs"})
    sft_lr: float = field(default=3e-6, metadata={"help": "SFT AdamW lr (linear decay to 0)"})
    sft_batch_size: int = field(default=128, metadata={"help": "SFT sequences per step, all ranks"})
    rm_pairs: int = field(default=0, metadata={"help": "prompts sampled for RM pairs (0 = every training prompt)"})
    rm_temperature: float = field(default=0.7, metadata={"help": "temperature of the SFT samples for RM pairs"})
    rm_heldout: float = field(default=0.05, metadata={"help": "fraction of the labelled pairs held out for accuracy"})
    rm_epochs: int = field(default=1, metadata={"help": "RM epochs"})
    rm_lr: float = field(default=3e-6, metadata={"help": "RM AdamW lr (linear decay to 0)"})
    rm_batch_size: int = field(default=64, metadata={"help": "RM pairs per step, all ranks"})
    eos_penalty: float = field(default=-1.0, metadata={"help": "proxy reward of a completion without EOS"})
    train_gold: bool = field(default=True, metadata={"help": "score every RL batch with the gold RM too (logged "
                                                             "as rewards/gold, never trained on)"})
    eval_pairs: int = field(default=128, metadata={"help": "eval prompts sampled twice for the BT loss and KL"})
    sharpness_perturbations: int = field(default=32, metadata={"help": "random perturbations (0 = no sharpness)"})
    sharpness_sigma: float = field(default=0.02, metadata={"help": "perturbation std relative to each tensor's RMS"})
    sharpness_prompts: int = field(default=64, metadata={"help": "prompts of the sharpness objective J"})
    # the paper's RLHF values (Tables 5-7) where they differ from RLConfig's GSM8K defaults
    steps: int = field(default=1000, metadata={"help": "RL optimizer steps (one per sampled batch)"})
    max_new_tokens: int = field(default=106, metadata={"help": "completion length; also the loss normaliser"})
    beta: float = field(default=None, metadata={"type": float, "help": "KL weight; default 0.05 (kl), 0.3 (reset)"})
    gamma: float = field(default=1e-2, metadata={"help": "GR strength γ (paper tunes 1e-3, 1e-2, 1e-1)"})
    eval_limit: int = field(default=256, metadata={"help": "eval on the first N test prompts (0 = all)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})


PRESETS = {
    # Offline toy (toy.py, "TL;DR toy"): topic-list summarisation with a programmatic gold reward, a 0.2M-param
    # Qwen2 trained from scratch by the SFT stage (one epoch of 24k rows), a proxy RM from a limited number of
    # gold-labelled pairs.
    "toy": dict(model=str(toy.TLDR_BASE), dataset=str(toy.TLDR_TRAIN), test_dataset=str(toy.TLDR_TEST),
                gold_rm=TOY_GOLD, out_dir="runs/toy_tldr", sft_epochs=1, sft_lr=3e-3, sft_batch_size=32,
                rm_pairs=3000, rm_temperature=1.0, rm_heldout=0.1, rm_epochs=2, rm_lr=1e-3, rm_batch_size=32,
                steps=150, reset_every=50, prompts_per_step=16, group_size=8, max_new_tokens=16, max_prompt_tokens=64,
                micro_batch_size=128, lr=1e-4, eval_every=25, eval_limit=256, eval_pairs=128, save_every=50,
                gen_batch_size=256, gold_batch_size=256, sharpness_prompts=64, threads=1),
}


# ----------------------------------------------------------------------------- data, models, gold

def resolve(cfg: Config) -> Config:
    """Fill the defaults that depend on other flags (stage dirs, β by --reg)."""
    out = Path(cfg.out_dir)
    cfg.sft_dir = cfg.sft_dir or str(out / "sft")
    cfg.rm_dir = cfg.rm_dir or str(out / "rm")
    cfg.rl_dir = cfg.rl_dir or str(out / f"rl-{cfg.reg}")
    if cfg.beta is None:
        cfg.beta = 0.3 if cfg.reg == "reset" else 0.05
    return cfg


def messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}]


def render(tokenizer, row: dict) -> str:
    """The policy's prompt text, the same in every stage (see the module docstring)."""
    return render_chat(tokenizer, messages(row))


def load_split(dataset: str, split: str, prompt_field: str | None, reference_field: str | None) -> list[dict]:
    """Rows {"prompt", "reference"} of a hub split or a local file; one-line error if the fields are missing."""
    rows = grpo.load_rows(dataset, split, ())
    columns = list(rows[0])

    def pick(given, candidates, what):
        if given:
            if given not in columns:
                grpo.fail(f"dataset {dataset!r} has no field {given!r} ({what}); it has {columns}")
            return given
        for c in candidates:
            if c in columns:
                return c
        grpo.fail(f"dataset {dataset!r} has no {what} field (looked for {list(candidates)}); it has {columns}")

    p, r = pick(prompt_field, PROMPT_FIELDS, "prompt"), pick(reference_field, REFERENCE_FIELDS, "reference")
    out = [{"prompt": row[p], "reference": row[r]} for row in rows
           if isinstance(row[p], str) and isinstance(row[r], str) and row[p].strip()]
    if not out:
        grpo.fail(f"dataset {dataset!r} split {split!r} has no rows with a non-empty {p!r} and a {r!r} string")
    return out


def load_data(cfg: Config) -> tuple[list[dict], list[dict]]:
    train = load_split(cfg.dataset, "train", cfg.prompt_field, cfg.reference_field)
    test = load_split(cfg.test_dataset or cfg.dataset, cfg.test_split, cfg.prompt_field, cfg.reference_field)
    return train, test


def short_enough(rows: list[dict], tokenizer, max_prompt_tokens: int, what: str) -> list[dict]:
    encoded = tokenizer([render(tokenizer, r) for r in rows], add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    keep = [r for r, n in zip(rows, lengths) if n <= max_prompt_tokens]
    if len(keep) < len(rows) and is_main():
        print(f"{what}: dropped {len(rows) - len(keep)} of {len(rows)} prompts longer than {max_prompt_tokens} tokens")
    if not keep:
        grpo.fail(f"{what}: every prompt is longer than --max-prompt-tokens {max_prompt_tokens}")
    return keep


def is_main() -> bool:
    return not grpo.is_distributed() or dist.get_rank() == 0


def inference_dtype(cfg) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def load_rm(name_or_path: str, device, *, dtype=torch.float32, trust_remote_code: bool = False, pad_token_id=None):
    """An `AutoModelForSequenceClassification` with one output (a new head when loading a causal LM), eval mode."""
    from transformers import AutoModelForSequenceClassification
    try:
        rm = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=dtype,
                                                                trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        grpo.fail(f"cannot load reward model {str(name_or_path)!r}: {str(e).splitlines()[0]}")
    if pad_token_id is not None:
        rm.config.pad_token_id = pad_token_id  # HF's own pooling needs it for batches (see rm_train_scores)
    return rm.to(device).eval()


def make_gold(cfg, device):
    """gold(rows, completions, has_eos) -> (N,) float32 CPU tensor: the toy's programmatic reward, or a real RM."""
    if cfg.gold_rm == TOY_GOLD:
        def toy_gold(rows, completions, has_eos):
            return torch.tensor([toy.tldr_gold_reward(r["prompt"], c, bool(e))
                                 for r, c, e in zip(rows, completions, has_eos)], dtype=torch.float32)
        return toy_gold
    tokenizer = grpo.load_tokenizer(cfg.gold_rm, cfg.trust_remote_code)
    tokenizer.padding_side = "right"
    rm = load_rm(cfg.gold_rm, device, dtype=inference_dtype(cfg), trust_remote_code=cfg.trust_remote_code)
    rm.requires_grad_(False)

    def gold(rows, completions, has_eos):
        convs = [messages(r) + [{"role": "assistant", "content": c}] for r, c in zip(rows, completions)]
        if getattr(tokenizer, "chat_template", None):
            ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in convs]
        else:
            ids = [tokenizer(render_chat(tokenizer, c[:1]) + c[1]["content"], add_special_tokens=False)["input_ids"]
                   + [tokenizer.eos_token_id] for c in convs]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        ended = torch.ones(len(ids), dtype=torch.bool)  # the gold judges the text as written
        return rm_scores_from_ids(rm, batch["input_ids"], batch["attention_mask"], ended,
                                  batch_size=cfg.gold_batch_size).float().cpu()
    return gold


def make_proxy(cfg, tokenizer, rm):
    """proxy(rows, completions, has_eos) -> (N,) float32 CPU: the proxy RM, --eos-penalty without EOS."""
    def proxy(rows, completions, has_eos):
        return rm_scores(rm, tokenizer, [render(tokenizer, r) for r in rows], completions, has_eos,
                         eos_penalty=cfg.eos_penalty, batch_size=cfg.gold_batch_size).float().cpu()
    return proxy


def save_hf(model, tokenizer, path, extra: dict | None = None) -> Path:
    """Full (unsharded) HF dir at `path`, written to a temp dir and renamed; `extra` = {file name: JSON object}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    path = Path(path)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) if not isinstance(obj, str) else obj)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if grpo.is_distributed():
        dist.barrier()
    return path


def stage_done(path) -> bool:
    return (Path(path) / "config.json").exists()


def all_gather_objects(obj) -> list:
    if not grpo.is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_by_index(local: torch.Tensor, indices: list[int], total: int) -> torch.Tensor:
    """(total, k) from every rank's (n_local, k) rows at `indices` (equal n_local on all ranks: grpo.shard_list)."""
    local = local.double().cpu()
    idx = torch.tensor(indices, dtype=torch.float64)[:, None]
    both = torch.cat([idx, local], 1)
    if grpo.is_distributed():
        parts = [torch.zeros_like(both) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, both)
        both = torch.cat(parts)
    out = torch.full((total, local.shape[1]), float("nan"), dtype=torch.float64)
    out[both[:, 0].long()] = both[:, 1:]  # padded duplicates rewrite the same row
    return out


def linear_decay(optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(total_steps, 1)))


def check_finite(stage: str, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float]:
    values = grpo.all_reduce_sum(torch.stack([loss.detach().float(), grad_norm.detach().float()]))
    world = dist.get_world_size() if grpo.is_distributed() else 1
    loss_value, norm = values[0].item() / world, grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm)):
        raise FloatingPointError(f"{stage} step {step}: non-finite loss ({loss_value}) or gradient norm ({norm}); "
                                 "stopping")
    return loss_value, norm


# ----------------------------------------------------------------------------- stage 1: SFT

def run_sft(cfg: Config, rows: list[dict]) -> dict:
    rank, world, device = grpo.init_distributed()
    t0 = time.time()
    tokenizer = grpo.load_tokenizer(cfg.model, cfg.trust_remote_code)
    rows = short_enough(rows, tokenizer, cfg.max_prompt_tokens, "sft")
    if cfg.sft_batch_size % world:
        grpo.fail(f"--sft-batch-size {cfg.sft_batch_size} is not divisible by the {world} ranks")
    per_epoch = len(rows) // cfg.sft_batch_size
    if per_epoch == 0:
        grpo.fail(f"sft: {len(rows)} rows, fewer than --sft-batch-size {cfg.sft_batch_size}")
    model = grpo.shard(grpo.load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                                       grad_checkpointing=cfg.grad_checkpointing).train())
    total = per_epoch * cfg.sft_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.01)
    scheduler = linear_decay(optimizer, total)
    params = [p for p in model.parameters() if p.requires_grad]
    prompts = [render(tokenizer, r) for r in rows]
    log_path = Path(cfg.out_dir) / "sft_metrics.jsonl"
    if is_main():
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        print(f"sft: {len(rows)} rows, {cfg.sft_epochs} epoch(s), {total} steps of {cfg.sft_batch_size} "
              f"from {cfg.model}")
    step, loss_value = 0, float("nan")
    for epoch in range(cfg.sft_epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(rows))
        for b in range(per_epoch):
            mine = order[b * cfg.sft_batch_size:(b + 1) * cfg.sft_batch_size][rank::world]
            ids, mask, loss_mask = grpo.sft_batch(tokenizer, [prompts[i] for i in mine],
                                                  [rows[i]["reference"] for i in mine], device,
                                                  max_len=cfg.max_prompt_tokens + cfg.max_new_tokens)
            # mean over the global batch's completion tokens (FSDP averages the ranks' gradients: × world)
            tokens = grpo.all_reduce_sum(loss_mask[:, 1:].sum().float()).clamp(min=1) / world
            loss = torch.zeros((), device=device)
            for s in range(0, len(mine), cfg.micro_batch_size):
                sl = slice(s, s + cfg.micro_batch_size)
                with grpo.autocast(device, cfg.dtype):
                    mb = grpo.sft_loss(model, ids[sl], mask[sl], loss_mask[sl]) * loss_mask[sl, 1:].sum() / tokens
                mb.backward()
                loss += mb.detach()
            grad_norm = clip_([p.grad for p in params if p.grad is not None], cfg.max_grad_norm)
            loss_value, norm = check_finite("sft", step, loss, grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if is_main():
                grpo.log_jsonl(log_path, {"step": step, "epoch": epoch, "loss": loss_value, "grad_norm": norm,
                                          "lr": scheduler.get_last_lr()[0]})
                if step % max(1, total // 10) == 0 or step == total:
                    print(f"  sft step {step}/{total} loss {loss_value:.4f}", flush=True)
    model.eval()
    summary = {"stage": "sft", "base": cfg.model, "rows": len(rows), "epochs": cfg.sft_epochs, "steps": total,
               "final_loss": loss_value, "seconds": round(time.time() - t0, 1)}
    save_hf(model, tokenizer, cfg.sft_dir, {"train_summary.json": summary})
    if is_main():
        print(f"sft: wrote {cfg.sft_dir} in {summary['seconds']}s (final loss {loss_value:.4f})")
    return summary


# ----------------------------------------------------------------------------- stage 2: proxy RM

def sample_pairs(cfg: Config, rows: list[dict], device) -> list[dict]:
    """Two completions per prompt from the SFT policy, gold-labelled; every rank returns the whole list."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if grpo.is_distributed() else (0, 1)
    tokenizer = grpo.load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    policy = grpo.shard(grpo.load_model(cfg.sft_dir, device, trust_remote_code=cfg.trust_remote_code))
    gold = make_gold(cfg, device)
    eos = grpo.eos_token_ids(tokenizer, policy)
    mine = grpo.shard_list(list(range(len(rows))), rank, world)
    prompts = [render(tokenizer, rows[i]) for i in mine for _ in range(2)]
    generator = grpo.step_generator(cfg.seed, 10**6, rank, device)  # not a training step
    with grpo.autocast(device, cfg.dtype):
        texts, ended = grpo.generate_texts(policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.rm_temperature, eos_ids=eos,
                                           batch_size=cfg.gen_batch_size, generator=generator)
    ended = ended.cpu()
    scores = []
    for s in range(0, len(texts), cfg.gen_batch_size):
        sl = slice(s, s + cfg.gen_batch_size)
        scores.append(gold([rows[mine[j // 2]] for j in range(len(texts))[sl]], texts[sl], ended[sl]))
    scores = torch.cat(scores)
    local = [{"index": i, "prompt": rows[i]["prompt"], "a": texts[2 * k], "b": texts[2 * k + 1],
              "gold_a": scores[2 * k].item(), "gold_b": scores[2 * k + 1].item(),
              "eos_a": bool(ended[2 * k]), "eos_b": bool(ended[2 * k + 1])} for k, i in enumerate(mine)]
    del policy
    gc.collect()
    pairs = {p["index"]: p for part in all_gather_objects(local) for p in part}
    return [pairs[i] for i in sorted(pairs)]


def rm_train_scores(rm, input_ids, attention_mask) -> torch.Tensor:
    """Differentiable score (B,) at the last attended token; equals `rewards.rm_last_token_scores`.

    Runs the model's own forward (not `rm.base_model` + `rm.score` separately) so FSDP2's root hooks gather the
    embedding and head under torchrun; the per-token head outputs are captured with a hook and read at the last
    attended token (HF's own pooling, by pad id, is computed but not used)."""
    captured = {}
    handle = rm.score.register_forward_hook(lambda module, args, out: captured.__setitem__("scores", out))
    try:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        rm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    finally:
        handle.remove()
    token_scores = captured["scores"].squeeze(-1)  # (B, T)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.long()).argmax(-1)
    return token_scores.gather(1, last[:, None]).squeeze(1).float()


def pair_batch(tokenizer, pairs: list[dict], device):
    """(2B, L) ids and mask: the chosen sequences, then the rejected; prompt + completion + EOS, right-padded."""
    texts = [render(tokenizer, p) + p[key] for key in ("chosen", "rejected") for p in pairs]
    ids = [seq + [tokenizer.eos_token_id] for seq in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    L = max(map(len, ids))
    input_ids = torch.full((len(ids), L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(ids):
        input_ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def pair_scores(rm, tokenizer, pairs: list[dict], cfg, device) -> torch.Tensor:
    """(n, 2) proxy scores (chosen, rejected) of every pair, computed in shares across ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if grpo.is_distributed() else (0, 1)
    mine = grpo.shard_list(list(range(len(pairs))), rank, world)
    out = []
    for s in range(0, len(mine), cfg.micro_batch_size):
        chunk = [pairs[i] for i in mine[s:s + cfg.micro_batch_size]]
        ids, mask = pair_batch(tokenizer, chunk, device)
        with grpo.autocast(device, cfg.dtype):
            scores = rm_train_scores(rm, ids, mask)
        out.append(torch.stack([scores[:len(chunk)], scores[len(chunk):]], 1))
    grpo.reshard(rm)
    return gather_by_index(torch.cat(out), mine, len(pairs))


def run_rm(cfg: Config, rows: list[dict]) -> dict:
    rank, world, device = grpo.init_distributed()
    t0 = time.time()
    tokenizer = grpo.load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    rows = short_enough(rows, tokenizer, cfg.max_prompt_tokens, "rm")
    n = min(cfg.rm_pairs or len(rows), len(rows))
    picked = np.random.default_rng([cfg.seed, 1]).permutation(len(rows))[:n]
    if is_main():
        print(f"rm: sampling 2 completions for each of {n} prompts from {cfg.sft_dir}, gold = {cfg.gold_rm}")
    pairs = sample_pairs(cfg, [rows[i] for i in picked], device)
    t_sample = time.time() - t0
    usable, ties, cut = [], 0, 0
    for p in pairs:
        if not (p["eos_a"] and p["eos_b"]):
            cut += 1
        elif p["gold_a"] == p["gold_b"]:
            ties += 1
        else:
            a_wins = p["gold_a"] > p["gold_b"]
            usable.append({**p, "chosen": p["a"] if a_wins else p["b"], "rejected": p["b"] if a_wins else p["a"]})
    n_held = int(round(cfg.rm_heldout * len(usable)))
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(usable))
    heldout, train = [usable[i] for i in order[:n_held]], [usable[i] for i in order[n_held:]]
    if cfg.rm_batch_size % world:
        grpo.fail(f"--rm-batch-size {cfg.rm_batch_size} is not divisible by the {world} ranks")
    per_epoch = len(train) // cfg.rm_batch_size
    if per_epoch == 0 or not heldout:
        grpo.fail(f"rm: only {len(usable)} usable pairs ({ties} gold ties, {cut} cut off at the length limit): "
                  f"too few for --rm-batch-size {cfg.rm_batch_size} and a held-out set; raise --rm-pairs")
    if is_main():
        print(f"rm: {len(pairs)} pairs in {t_sample:.0f}s; dropped {ties} gold ties and {cut} with a cut-off "
              f"completion; {len(train)} train, {len(heldout)} held out")

    rm = load_rm(cfg.sft_dir, device, trust_remote_code=cfg.trust_remote_code, pad_token_id=tokenizer.pad_token_id)
    rm = grpo.shard(rm.train())
    total = per_epoch * cfg.rm_epochs
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, weight_decay=0.01)
    scheduler = linear_decay(optimizer, total)
    params = [p for p in rm.parameters() if p.requires_grad]
    log_path = Path(cfg.out_dir) / "rm_metrics.jsonl"
    if is_main():
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    step, loss_value = 0, float("nan")
    for epoch in range(cfg.rm_epochs):
        order = np.random.default_rng([cfg.seed, 3, epoch]).permutation(len(train))
        for b in range(per_epoch):
            mine = order[b * cfg.rm_batch_size:(b + 1) * cfg.rm_batch_size][rank::world]
            loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
            for s in range(0, len(mine), max(1, cfg.micro_batch_size // 2)):
                chunk = [train[i] for i in mine[s:s + max(1, cfg.micro_batch_size // 2)]]
                ids, mask = pair_batch(tokenizer, chunk, device)
                with grpo.autocast(device, cfg.dtype):
                    scores = rm_train_scores(rm, ids, mask)
                    chosen, rejected = scores[:len(chunk)], scores[len(chunk):]
                    mb = bradley_terry_loss(chosen, rejected) * len(chunk) / len(mine)
                mb.backward()
                loss += mb.detach()
                correct += (chosen > rejected).sum().detach()
            grad_norm = clip_([p.grad for p in params if p.grad is not None], cfg.max_grad_norm)
            loss_value, norm = check_finite("rm", step, loss, grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            acc = grpo.all_reduce_sum(correct).item() / cfg.rm_batch_size
            if is_main():
                grpo.log_jsonl(log_path, {"step": step, "epoch": epoch, "loss": loss_value, "accuracy": acc,
                                          "grad_norm": norm, "lr": scheduler.get_last_lr()[0]})
                if step % max(1, total // 10) == 0 or step == total:
                    print(f"  rm step {step}/{total} loss {loss_value:.4f} batch accuracy {acc:.3f}", flush=True)
    rm.eval()
    held = pair_scores(rm, tokenizer, heldout, cfg, device)
    bt = evaluation.bt_loss_on_policy(held[:, 0], held[:, 1], torch.ones(len(held)), torch.zeros(len(held)))
    summary = {"stage": "rm", "sft": cfg.sft_dir, "gold_rm": cfg.gold_rm, "pairs_sampled": len(pairs),
               "gold_ties_dropped": ties, "cut_off_dropped": cut, "train_pairs": len(train),
               "heldout_pairs": len(heldout), "epochs": cfg.rm_epochs, "steps": total, "final_train_loss": loss_value,
               "heldout_accuracy": bt["bt_accuracy"], "heldout_bt_loss": bt["bt_loss"],
               "seconds": round(time.time() - t0, 1)}
    pair_lines = "".join(json.dumps({**{k: p[k] for k in ("prompt", "chosen", "rejected")},
                                     "split": "heldout" if j < n_held else "train"}) + "\n"
                         for j, p in enumerate(heldout + train))
    save_hf(rm, tokenizer, cfg.rm_dir, {"train_summary.json": summary, "pairs.jsonl": pair_lines})
    if is_main():
        print(f"rm: held-out accuracy {summary['heldout_accuracy']:.3f}, BT loss {summary['heldout_bt_loss']:.4f} "
              f"on {len(heldout)} pairs; wrote {cfg.rm_dir} in {summary['seconds']}s")
    del rm, optimizer
    gc.collect()
    return summary


# ----------------------------------------------------------------------------- RLHF evaluation

@torch.no_grad()
def rollouts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, batch_size: int,
             generator):
    """Batches of sampled completions with their ids (for log-probs): dicts of prompt_ids/mask, completion/mask,
    texts, ended. Every rank must call this (lockstep generation under FSDP2)."""
    device = next(model.parameters()).device
    eos = grpo.eos_token_ids(tokenizer, model)
    for s in range(0, len(prompts), batch_size):
        ids, mask = grpo.tokenize_prompts(tokenizer, prompts[s:s + batch_size], device)
        completion, cmask = grpo.generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                                          pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                                          generator=generator)
        texts = tokenizer.batch_decode(completion * cmask + tokenizer.pad_token_id * (1 - cmask),
                                       skip_special_tokens=True)
        yield {"prompt_ids": ids, "prompt_mask": mask, "completion": completion, "cmask": cmask, "texts": texts,
               "ended": grpo.has_eos(completion, eos).cpu()}


@torch.no_grad()
def sequence_kl(model, ref_model, batch: dict, temperature: float) -> torch.Tensor:
    """(N,) Σ_t log π − log π_ref of the sampled completions (k1 per token, summed: a sequence-KL estimate)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["cmask"]], 1)
    T = batch["completion"].shape[1]
    logp = grpo.token_logprobs(model, ids, mask, T, temperature)[0]
    grpo.reshard(model)
    ref_logp = grpo.token_logprobs(ref_model, ids, mask, T, temperature)[0]
    grpo.reshard(ref_model)
    return evaluation.kl_to_reference(logp, ref_logp, batch["cmask"]).cpu()


class RLHFEval:
    """The paper's RLHF metrics for a policy (RL eval callback and `eval.py --task tldr`). All ranks call it."""

    def __init__(self, cfg, rows: list[dict], gold, proxy, init_model):
        self.cfg, self.rows, self.gold, self.proxy, self.init_model = cfg, rows, gold, proxy, init_model
        self.reference_gold = None

    def _mine(self, n):
        rank, world = (dist.get_rank(), dist.get_world_size()) if grpo.is_distributed() else (0, 1)
        return grpo.shard_list(list(range(n)), rank, world), rank

    @staticmethod
    def _owned(mine: list[int], n: int) -> torch.Tensor:
        """1 for this rank's own items, 0 for grpo.shard_list's padding copies (owned by another rank or repeated)."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if grpo.is_distributed() else (0, 1)
        per = -(-n // world)
        return torch.tensor([float(rank * per <= i < (rank + 1) * per and i not in mine[:k])
                             for k, i in enumerate(mine)])

    def __call__(self, model, tokenizer, step: int, grad_norm: bool = False) -> dict:
        cfg, device = self.cfg, next(model.parameters()).device
        out = {}
        # 1. greedy completions vs the references, both judged by the gold RM -> win rate
        n = len(self.rows)
        mine, rank = self._mine(n)
        rows = [self.rows[i] for i in mine]
        prompts = [render(tokenizer, r) for r in rows]
        texts, ended = [], []
        for b in rollouts(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                          batch_size=cfg.gen_batch_size, generator=None):
            texts += b["texts"]
            ended.append(b["ended"])
        ended = torch.cat(ended)
        if self.reference_gold is None:
            self.reference_gold = self.gold(rows, [r["reference"] for r in rows],
                                            torch.ones(len(rows), dtype=torch.bool))
        lengths = torch.tensor([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])
        local = torch.stack([self.gold(rows, texts, ended), self.proxy(rows, texts, ended), self.reference_gold,
                             lengths.float(), ended.float()], 1)
        g = gather_by_index(local, mine, n)
        out.update(win_rate=evaluation.win_rate(g[:, 0], g[:, 2]), gold=g[:, 0].mean().item(),
                   proxy=g[:, 1].mean().item(), reference_gold=g[:, 2].mean().item(), length=g[:, 3].mean().item(),
                   eos_rate=g[:, 4].mean().item())
        # 2. two samples per prompt: BT loss / accuracy of the proxy on gold-labelled policy pairs; KL to the init
        n_pairs = min(cfg.eval_pairs, n)
        if n_pairs:
            mine, rank = self._mine(n_pairs)
            rows = [self.rows[i] for i in mine for _ in range(2)]
            gen = grpo.step_generator(cfg.seed, 10**6 + 1, rank, device)  # same draws at every eval
            cols = []
            for s, b in zip(range(0, len(rows), cfg.gen_batch_size),
                            rollouts(model, tokenizer, [render(tokenizer, r) for r in rows],
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     batch_size=cfg.gen_batch_size, generator=gen)):
                r = rows[s:s + cfg.gen_batch_size]
                cols.append(torch.stack([self.proxy(r, b["texts"], b["ended"]), self.gold(r, b["texts"], b["ended"]),
                                         sequence_kl(model, self.init_model, b, cfg.temperature)], 1))
            cols = torch.cat(cols).view(len(mine), 2, 3).reshape(len(mine), 6)  # (proxy, gold, kl) x (a, b)
            g = gather_by_index(cols, mine, n_pairs)
            out.update(evaluation.bt_loss_on_policy(g[:, 0], g[:, 3], g[:, 1], g[:, 4]))
            out["kl"] = torch.cat([g[:, 2], g[:, 5]]).mean().item()
            out["sampled_gold"] = torch.cat([g[:, 1], g[:, 4]]).mean().item()
            out["sampled_proxy"] = torch.cat([g[:, 0], g[:, 3]]).mean().item()
        # 3. sharpness of J(φ) = mean proxy reward on fixed prompts with fixed sampling draws
        n_sharp = min(cfg.sharpness_prompts, n)
        if cfg.sharpness_perturbations and n_sharp:
            mine_s, rank = self._mine(n_sharp)
            rows_s = [self.rows[i] for i in mine_s]
            prompts_s = [render(tokenizer, r) for r in rows_s]
            weight = self._owned(mine_s, n_sharp)

            def objective():
                gen = grpo.step_generator(cfg.seed, 10**6 + 2, rank, device)
                rewards = torch.cat([self.proxy(rows_s[s:s + cfg.gen_batch_size], b["texts"], b["ended"])
                                     for s, b in zip(range(0, len(rows_s), cfg.gen_batch_size),
                                                     rollouts(model, tokenizer, prompts_s,
                                                              max_new_tokens=cfg.max_new_tokens,
                                                              temperature=cfg.temperature,
                                                              batch_size=cfg.gen_batch_size, generator=gen))])
                total = grpo.all_reduce_sum(torch.stack([(rewards * weight).sum(), weight.sum()]).to(device))
                return (total[0] / total[1]).item()

            s = evaluation.sharpness(model, objective, perturbations=cfg.sharpness_perturbations,
                                     sigma=cfg.sharpness_sigma, seed=cfg.seed)
            out.update(sharpness=s["sharpness"], sharpness_J=s["J"], sharpness_J_perturbed=s["J_perturbed_mean"])
        if grad_norm:
            out["grad_norm"] = self.policy_grad_norm(model, tokenizer)
        return out

    def policy_grad_norm(self, model, tokenizer) -> float:
        """‖∇ Dr.GRPO loss‖ (no KL) on G rollouts of the first --prompts-per-step eval prompts, proxy rewards."""
        cfg, device = self.cfg, next(model.parameters()).device
        n = min(cfg.prompts_per_step, len(self.rows))
        mine, rank = self._mine(n)
        rows = [self.rows[i] for i in mine for _ in range(cfg.group_size)]
        gen = grpo.step_generator(cfg.seed, 10**6 + 3, rank, device)
        b = next(rollouts(model, tokenizer, [render(tokenizer, r) for r in rows], max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, batch_size=len(rows), generator=gen))
        rewards = self.proxy(rows, b["texts"], b["ended"]).to(device)
        batch = {"input_ids": torch.cat([b["prompt_ids"], b["completion"]], 1),
                 "attention_mask": torch.cat([b["prompt_mask"], b["cmask"]], 1),
                 "completion_mask": b["cmask"], "advantages": grpo.group_advantages(rewards, cfg.group_size)}
        T = b["completion"].shape[1]
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for mb in grpo.micro_batches(batch, cfg.micro_batch_size):
                logp, _ = grpo.token_logprobs(model, mb["input_ids"], mb["attention_mask"], T, cfg.temperature)
                grpo.dr_grpo_loss(logp, mb["advantages"], mb["completion_mask"],
                                  len(rows) * cfg.max_new_tokens).backward()
        norm = clip_([p.grad for p in model.parameters() if p.grad is not None], float("inf")).item()
        model.zero_grad(set_to_none=True)
        return norm


# ----------------------------------------------------------------------------- stage 3: RL

def run_rl(cfg: Config, train_rows: list[dict], test_rows: list[dict]) -> dict:
    rank, world, device = grpo.init_distributed()
    rl_cfg = dataclasses.replace(cfg, model=cfg.sft_dir, out_dir=cfg.rl_dir)
    tokenizer = grpo.load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    proxy_rm = load_rm(cfg.rm_dir, device, dtype=inference_dtype(cfg), trust_remote_code=cfg.trust_remote_code)
    proxy_rm.requires_grad_(False)
    proxy, gold = make_proxy(cfg, tokenizer, proxy_rm), make_gold(cfg, device)
    init_model = grpo.shard(grpo.load_model(cfg.sft_dir, device, trust_remote_code=cfg.trust_remote_code))
    init_model.requires_grad_(False)
    test_rows = short_enough(test_rows, tokenizer, cfg.max_prompt_tokens, "eval")
    test_rows = test_rows[:cfg.eval_limit] if cfg.eval_limit else test_rows
    evaluator = RLHFEval(cfg, test_rows, gold, proxy, init_model)

    def score(rows, completions, has_eos):
        rewards = proxy(rows, completions, has_eos)  # the trained reward: proxy RM, EOS penalty
        terms = {"proxy": rewards}
        if cfg.train_gold:
            terms["gold"] = terms["true_reward"] = gold(rows, completions, has_eos)
        return rewards, terms

    out = Path(cfg.rl_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    last = grpo.rl_train(rl_cfg, train_rows, messages, score, evaluator)
    if is_main():
        evaluation.plot_runs([out], out / "curves.png", evaluation.TLDR_PANELS, title=Path(cfg.rl_dir).name)
        print(f"rl: {cfg.steps} steps in {time.time() - t0:.0f}s; curves in {out / 'curves.png'}")
    return last


# ----------------------------------------------------------------------------- checkpoint evaluation (eval.py)

def evaluate_checkpoint(checkpoint: str, *, dataset: str | None, split: str, limit: int, gold_rm: str, proxy_rm: str,
                        reference_model: str, max_new_tokens: int, temperature: float, batch_size: int, seed: int,
                        dtype: str, sharpness_sigma: float, sharpness_perturbations: int, grad_norm: bool = True,
                        trust_remote_code: bool = False) -> dict:
    """The RLHF metrics of one checkpoint (what the RL eval logs), plus the policy-gradient norm."""
    for name, what in ((checkpoint, "--checkpoint"), (proxy_rm, "--proxy-rm"), (reference_model, "--reference-model")):
        if not name:
            grpo.fail(f"--task tldr needs {what}")
        grpo.check_model_path(name, what)
    if gold_rm != TOY_GOLD:
        grpo.check_model_path(gold_rm, "--gold-rm")
    cfg = Config(model=checkpoint, dataset=dataset or Config.dataset, gold_rm=gold_rm, max_new_tokens=max_new_tokens,
                 temperature=temperature, gen_batch_size=batch_size, gold_batch_size=batch_size, seed=seed,
                 dtype=dtype, sharpness_sigma=sharpness_sigma, sharpness_perturbations=sharpness_perturbations,
                 trust_remote_code=trust_remote_code, micro_batch_size=batch_size)
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    rows = load_split(cfg.dataset, split, None, None)
    rows = rows[:limit] if limit else rows
    rank, world, device = grpo.init_distributed()
    tokenizer = grpo.load_tokenizer(checkpoint, trust_remote_code)
    policy = grpo.shard(grpo.load_model(checkpoint, device, trust_remote_code=trust_remote_code))
    init_model = grpo.shard(grpo.load_model(reference_model, device, trust_remote_code=trust_remote_code))
    init_model.requires_grad_(False)
    rm = load_rm(proxy_rm, device, dtype=inference_dtype(cfg), trust_remote_code=trust_remote_code)
    rm.requires_grad_(False)
    evaluator = RLHFEval(cfg, rows, make_gold(cfg, device), make_proxy(cfg, tokenizer, rm), init_model)
    with grpo.autocast(device, cfg.dtype):
        metrics = evaluator(policy, tokenizer, 0, grad_norm=grad_norm)
    return {"checkpoint": checkpoint, "task": "tldr", "n": len(rows), "gold_rm": gold_rm, "proxy_rm": proxy_rm,
            "reference_model": reference_model, "sharpness_sigma": sharpness_sigma,
            "sharpness_perturbations": sharpness_perturbations, **metrics}


# ----------------------------------------------------------------------------- main

def check_inputs(cfg: Config) -> None:
    """One-line errors before any work: flags, model dirs of the stages that are skipped, the gold RM."""
    stages = ("sft", "rm", "rl") if cfg.stage == "all" else (cfg.stage,)
    probe = cfg if "sft" in stages else dataclasses.replace(cfg, model=cfg.sft_dir)
    if "sft" not in stages and not Path(cfg.sft_dir).exists():
        grpo.fail(f"--sft-dir {cfg.sft_dir!r} does not exist: run --stage sft first (or pass --sft-dir)")
    if "rl" in stages and "rm" not in stages and not stage_done(cfg.rm_dir):
        grpo.fail(f"--rm-dir {cfg.rm_dir!r} has no reward model: run --stage rm first (or pass --rm-dir)")
    grpo.validate(probe)  # RL flags, lr/dtype defaults, and that the model exists
    cfg.lr, cfg.dtype = probe.lr, probe.dtype
    if ("rm" in stages or "rl" in stages) and cfg.gold_rm != TOY_GOLD:
        grpo.check_model_path(cfg.gold_rm, "--gold-rm")
    if not 0 < cfg.rm_heldout < 1:
        grpo.fail(f"--rm-heldout must be in (0, 1), got {cfg.rm_heldout}")
    if cfg.sharpness_sigma < 0:
        grpo.fail(f"--sharpness-sigma must be >= 0, got {cfg.sharpness_sigma}")


def main(cfg: Config) -> dict:
    cfg = resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # tiny models: one thread is as fast, and robust to a busy machine
    if cfg.model == str(toy.TLDR_BASE):
        toy.wait_or_build(toy.build_tldr_base, toy.TLDR_BASE / "model.safetensors")
    check_inputs(cfg)
    train, test = load_data(cfg)
    grpo.init_distributed()
    grpo.seed_everything(cfg.seed)
    results, times = {}, {}
    for stage, run in (("sft", lambda: run_sft(cfg, train)), ("rm", lambda: run_rm(cfg, train)),
                       ("rl", lambda: run_rl(cfg, train, test))):
        if cfg.stage not in ("all", stage):
            continue
        done_dir = {"sft": cfg.sft_dir, "rm": cfg.rm_dir}.get(stage)
        if cfg.stage == "all" and cfg.resume and done_dir and stage_done(done_dir):
            if is_main():
                print(f"--resume: {stage} already done in {done_dir}")
            continue
        t0 = time.time()
        results[stage] = run()
        times[stage] = round(time.time() - t0, 1)
    if is_main():
        print("stage wall times (s): " + json.dumps(times))
    return {"results": results, "seconds": times}


if __name__ == "__main__":
    main(grpo.parse_config(Config, presets=PRESETS))
