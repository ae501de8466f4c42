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
    python train_tldr.py --model EleutherAI/pythia-1b-deduped --out-dir runs/tldr_p1b --reg reset      # 1 GPU
    torchrun --nproc_per_node=8 train_tldr.py --out-dir runs/tldr_p1b --stage rl --reg gr           # a node

Data: `trl-lib/tldr` (its test split is the eval set) or any hub id / local file with a prompt and a reference
field; prompts are one user turn, rendered alike in every stage. Gold RM: a sequence classifier scored as its model
card does, or `toy`. The proxy RM reads prompt + completion + EOS at the last token; a completion without EOS gets
--eos-penalty (authors: -1). The metrics (every --eval-every RL steps; `eval.py --task tldr`) are eval.py's.

Kept from the paper (Tables 5-7, App. C.2): SFT and RM one epoch each, RM initialised from the SFT model, RM pairs
sampled from the SFT policy and labelled by the gold RM, Dr.GRPO with 32 prompts × 8 rollouts, temperature 0.7,
106 new tokens, Adam (0.9, 0.999), lr 5e-6 (gr) / 3e-6 (others), clip 1.0, GR ε 1e-3, reference reset every R =
200 steps. Where the paper gives a range: γ = 1e-2 (tuned in {1e-3, 1e-2, 1e-1}); β = 0.05 for --reg kl (0.03-0.1)
and 0.3 for --reg reset (0.2-0.4) unless --beta is given. Changed: FSDP2 instead of DeepSpeed; SFT/RM with AdamW
(weight decay 0.01, lr 3e-6 decayed linearly to 0) after Huang et al. (2024) as far as we know their recipe, not
tuned; no RM output normalisation; pairs with a gold tie or a cut-off completion are not used for RM training.

Offline toy (`--preset toy`, toy.py "TL;DR toy"): posts list 4-6 topics of hidden importance 1-3; the gold reward
is the importance of the post's topics a summary names minus 1.5 per word. The proxy RM sees ~2,200 gold-labelled
pairs; RL against it first raises the gold reward, then learns to name important topics absent from the post.
"""

import dataclasses
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import distributed
import eval as evaluation
import generation
import grpo
import loading
import plots
import rundir
import supervised
import toy
from rewards import bradley_terry_loss, render_chat, rm_last_token_scores

STAGES = ("all", "sft", "rm", "rl")


@dataclass
class Config(grpo.RLConfig):
    """TL;DR RLHF: SFT -> proxy RM (gold-labelled pairs) -> Dr.GRPO --reg none|kl|reset|gr, gold-RM evaluation."""
    model: str = field(default="EleutherAI/pythia-1b-deduped", metadata={"help": "SFT base model (hub id or dir)"})
    out_dir: str = field(default="runs/tldr", metadata={"help": "stage outputs: OUT/sft, OUT/rm, OUT/rl-{reg}"})
    stage: str = field(default="all", metadata={"help": "all = sft, rm, rl in turn", "choices": STAGES})
    dataset: str = field(default="trl-lib/tldr", metadata={"help": "hub id or local json/jsonl/parquet"})
    test_dataset: str = field(default=None, metadata={"type": str, "help": "eval data (default: --test-split)"})
    test_split: str = field(default="test", metadata={"help": "split of a hub --dataset used for evaluation"})
    prompt_field: str = field(default=None, metadata={"type": str, "help": "default: prompt or query"})
    reference_field: str = field(default=None, metadata={"type": str, "help": "default: reference, completion or "
                                                                              "reference_response"})
    gold_rm: str = field(default="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
                         metadata={"help": "gold RM: hub id or dir of a sequence classifier, or 'toy'"})
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
    train_gold: bool = field(default=True, metadata={"help": "log the gold reward of every RL batch (rewards/gold)"})
    eval_pairs: int = field(default=128, metadata={"help": "eval prompts sampled twice for the BT loss and KL"})
    sharpness_perturbations: int = field(default=32, metadata={"help": "random perturbations (0 = no sharpness)"})
    sharpness_sigma: float = field(default=0.02, metadata={"help": "perturbation std relative to each tensor's RMS"})
    sharpness_prompts: int = field(default=64, metadata={"help": "prompts of the sharpness objective J"})
    # the paper's RLHF values (Tables 5-7) where they differ from RLConfig's GSM8K defaults
    steps: int = field(default=1000, metadata={"help": "RL optimizer steps (one per sampled batch)"})
    max_new_tokens: int = field(default=106, metadata={"help": "completion length; also the loss normaliser"})
    gamma: float = field(default=1e-2, metadata={"help": "GR strength γ (paper tunes 1e-3, 1e-2, 1e-1)"})
    eval_limit: int = field(default=256, metadata={"help": "eval on the first N test prompts (0 = all)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})


PRESETS = {
    # Offline toy (toy.py, "TL;DR toy"): topic-list summarisation with a programmatic gold reward, a 0.2M-param
    # Qwen2 trained from scratch by the SFT stage (one epoch of 24k rows), a proxy RM from a limited number of
    # gold-labelled pairs.
    "toy": dict(model=str(toy.TLDR_BASE), dataset=str(toy.TLDR_TRAIN), test_dataset=str(toy.TLDR_TEST),
                gold_rm=evaluation.TOY_GOLD, out_dir="runs/toy_tldr", sft_epochs=1, sft_lr=3e-3, sft_batch_size=32,
                rm_pairs=3000, rm_temperature=1.0, rm_heldout=0.1, rm_epochs=2, rm_lr=1e-3, rm_batch_size=32,
                steps=150, reset_every=50, prompts_per_step=16, group_size=8, max_new_tokens=16, max_prompt_tokens=64,
                micro_batch_size=128, lr=1e-4, eval_every=25, eval_limit=256, eval_pairs=128, save_every=50,
                gen_batch_size=256, gold_batch_size=256, sharpness_prompts=64, threads=1),
}


def resolve(cfg: Config) -> Config:
    """Fill the stage dirs that default to subdirs of --out-dir."""
    out = Path(cfg.out_dir)
    cfg.sft_dir = cfg.sft_dir or str(out / "sft")
    cfg.rm_dir = cfg.rm_dir or str(out / "rm")
    cfg.rl_dir = cfg.rl_dir or str(out / f"rl-{cfg.reg}")
    return cfg


def render(tokenizer, row: dict) -> str:
    return render_chat(tokenizer, evaluation.tldr_messages(row))


def short_enough(rows: list[dict], tokenizer, max_prompt_tokens: int, what: str) -> list[dict]:
    keep = grpo.short_prompts(tokenizer, [render(tokenizer, r) for r in rows], max_prompt_tokens, what)
    return [rows[i] for i in keep]


def rm_dtype(cfg) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def epoch_batch(seed, step: int, per_epoch: int, n: int, batch_size: int) -> np.ndarray:
    """This rank's share of global batch `step`: epochs are fixed permutations of the n items, a function of seed."""
    rank, world = distributed.rank_and_world()
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng([*seed, epoch]).permutation(n)
    return order[b * batch_size:(b + 1) * batch_size][rank::world]


# ----------------------------------------------------------------------------- stage 1: SFT

def run_sft(cfg: Config, rows: list[dict]) -> dict:
    rank, world, device = distributed.init_distributed()
    t0 = time.time()
    tokenizer = loading.load_tokenizer(cfg.model, cfg.trust_remote_code)
    rows = short_enough(rows, tokenizer, cfg.max_prompt_tokens, "sft")
    if cfg.sft_batch_size % world:
        loading.fail(f"--sft-batch-size {cfg.sft_batch_size} is not divisible by the {world} ranks")
    per_epoch = len(rows) // cfg.sft_batch_size
    if per_epoch == 0:
        loading.fail(f"sft: {len(rows)} rows, fewer than --sft-batch-size {cfg.sft_batch_size}")
    model = distributed.shard(loading.load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                                                 grad_checkpointing=cfg.grad_checkpointing))
    total = per_epoch * cfg.sft_epochs
    prompts = [render(tokenizer, r) for r in rows]
    if distributed.is_main():
        print(f"sft: {len(rows)} rows, {cfg.sft_epochs} epoch(s), {total} steps of {cfg.sft_batch_size} "
              f"from {cfg.model}")

    def loss_fn(step):
        mine = epoch_batch([cfg.seed], step, per_epoch, len(rows), cfg.sft_batch_size)
        ids, mask, loss_mask = supervised.sft_batch(tokenizer, [prompts[i] for i in mine],
                                                    [rows[i]["reference"] for i in mine], device,
                                                    max_len=cfg.max_prompt_tokens + cfg.max_new_tokens)
        # mean over the global batch's completion tokens (FSDP averages the ranks' gradients: × world)
        tokens = distributed.all_reduce_sum(loss_mask[:, 1:].sum().float()).clamp(min=1) / world
        loss = torch.zeros((), device=device)
        for s in range(0, len(mine), cfg.micro_batch_size):
            sl = slice(s, s + cfg.micro_batch_size)
            distributed.gradient_sync(model, s + cfg.micro_batch_size >= len(mine))  # one reduce-scatter per step
            with distributed.autocast(device, cfg.dtype):
                mb = supervised.sft_loss(model, ids[sl], mask[sl], loss_mask[sl]) * loss_mask[sl, 1:].sum() / tokens
            mb.backward()
            loss += mb.detach()
        return {"loss": loss}

    last = supervised.supervised_train(model, loss_fn, total, lr=cfg.sft_lr, schedule=lambda s: 1 - s / total,
                                       weight_decay=0.01, max_grad_norm=cfg.max_grad_norm, name="sft",
                                       log_path=Path(cfg.out_dir) / "sft_metrics.jsonl",
                                       print_every=max(1, total // 10))
    summary = {"stage": "sft", "base": cfg.model, "rows": len(rows), "epochs": cfg.sft_epochs, "steps": total,
               "final_loss": last["loss"], "seconds": round(time.time() - t0, 1)}
    rundir.save_pretrained(cfg.sft_dir, model, tokenizer, files={"train_summary.json": json.dumps(summary, indent=2)})
    if distributed.is_main():
        print(f"sft: wrote {cfg.sft_dir} in {summary['seconds']}s (final loss {last['loss']:.4f})")
    return summary


# ----------------------------------------------------------------------------- stage 2: proxy RM

def sample_pairs(cfg: Config, rows: list[dict], device) -> list[dict]:
    """Two completions per prompt from the SFT policy, gold-labelled; every rank returns the whole list."""
    rank, world = distributed.rank_and_world()
    tokenizer = loading.load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    policy = distributed.shard(loading.load_model(cfg.sft_dir, device, trust_remote_code=cfg.trust_remote_code))
    policy = generation.rollout_model(policy, getattr(torch, cfg.dtype), replica=cfg.rollout_replica)
    gold = evaluation.make_gold(cfg.gold_rm, device, dtype=rm_dtype(cfg), batch_size=cfg.gold_batch_size,
                                trust_remote_code=cfg.trust_remote_code)
    mine = distributed.shard_list(list(range(len(rows))), rank, world)
    twice = [rows[i] for i in mine for _ in range(2)]
    generator = distributed.step_generator(cfg.seed, 10**6, rank, device)  # not a training step
    with distributed.autocast(device, cfg.dtype):
        texts, ended = generation.generate_texts(policy, tokenizer, [render(tokenizer, r) for r in twice],
                                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.rm_temperature,
                                                 batch_size=cfg.gen_batch_size, generator=generator)
    scores = torch.cat([gold(twice[s:s + cfg.gen_batch_size], texts[s:s + cfg.gen_batch_size],
                             ended[s:s + cfg.gen_batch_size]) for s in range(0, len(texts), cfg.gen_batch_size)])
    local = [{"index": i, "prompt": rows[i]["prompt"], "a": texts[2 * k], "b": texts[2 * k + 1],
              "gold_a": scores[2 * k].item(), "gold_b": scores[2 * k + 1].item(),
              "eos_a": bool(ended[2 * k]), "eos_b": bool(ended[2 * k + 1])} for k, i in enumerate(mine)]
    del policy
    gc.collect()
    pairs = {p["index"]: p for part in distributed.all_gather_objects(local) for p in part}
    return [pairs[i] for i in sorted(pairs)]


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
    mine = distributed.shard_list(list(range(len(pairs))), *distributed.rank_and_world())
    out = []
    for s in range(0, len(mine), cfg.micro_batch_size):
        chunk = [pairs[i] for i in mine[s:s + cfg.micro_batch_size]]
        with distributed.autocast(device, cfg.dtype):
            scores = rm_last_token_scores(rm, *pair_batch(tokenizer, chunk, device))
        out.append(torch.stack([scores[:len(chunk)], scores[len(chunk):]], 1))
    distributed.reshard(rm)
    return distributed.all_gather_rows(torch.cat(out), mine, len(pairs))


def run_rm(cfg: Config, rows: list[dict]) -> dict:
    rank, world, device = distributed.init_distributed()
    t0 = time.time()
    tokenizer = loading.load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    rows = short_enough(rows, tokenizer, cfg.max_prompt_tokens, "rm")
    n = min(cfg.rm_pairs or len(rows), len(rows))
    picked = np.random.default_rng([cfg.seed, 1]).permutation(len(rows))[:n]
    if distributed.is_main():
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
        loading.fail(f"--rm-batch-size {cfg.rm_batch_size} is not divisible by the {world} ranks")
    per_epoch = len(train) // cfg.rm_batch_size
    if per_epoch == 0 or not heldout:
        loading.fail(f"rm: only {len(usable)} usable pairs ({ties} gold ties, {cut} cut off at the length limit): "
                     f"too few for --rm-batch-size {cfg.rm_batch_size} and a held-out set; raise --rm-pairs")
    if distributed.is_main():
        print(f"rm: {len(pairs)} pairs in {t_sample:.0f}s; dropped {ties} gold ties and {cut} with a cut-off "
              f"completion; {len(train)} train, {len(heldout)} held out")

    rm = distributed.shard(loading.load_reward_model(cfg.sft_dir, device, pad_token_id=tokenizer.pad_token_id,
                                                     trust_remote_code=cfg.trust_remote_code))
    total = per_epoch * cfg.rm_epochs
    chunk_size = max(1, cfg.micro_batch_size // 2)  # pairs per forward: 2 sequences each

    def loss_fn(step):
        mine = epoch_batch([cfg.seed, 3], step, per_epoch, len(train), cfg.rm_batch_size)
        loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for s in range(0, len(mine), chunk_size):
            chunk = [train[i] for i in mine[s:s + chunk_size]]
            distributed.gradient_sync(rm, s + chunk_size >= len(mine))  # one reduce-scatter per step
            with distributed.autocast(device, cfg.dtype):
                scores = rm_last_token_scores(rm, *pair_batch(tokenizer, chunk, device))
                chosen, rejected = scores[:len(chunk)], scores[len(chunk):]
                mb = bradley_terry_loss(chosen, rejected) * len(chunk) / len(mine)  # this rank's mean
            mb.backward()
            loss += mb.detach()
            correct += (chosen > rejected).sum().detach()
        return {"loss": loss, "accuracy": correct / cfg.rm_batch_size}

    last = supervised.supervised_train(rm, loss_fn, total, lr=cfg.rm_lr, schedule=lambda s: 1 - s / total,
                                       weight_decay=0.01, max_grad_norm=cfg.max_grad_norm, name="rm",
                                       log_path=Path(cfg.out_dir) / "rm_metrics.jsonl", print_every=max(1, total // 10))
    held = pair_scores(rm, tokenizer, heldout, cfg, device)
    bt = evaluation.bt_loss_on_policy(held[:, 0], held[:, 1], torch.ones(len(held)), torch.zeros(len(held)))
    summary = {"stage": "rm", "sft": cfg.sft_dir, "gold_rm": cfg.gold_rm, "pairs_sampled": len(pairs),
               "gold_ties_dropped": ties, "cut_off_dropped": cut, "train_pairs": len(train),
               "heldout_pairs": len(heldout), "epochs": cfg.rm_epochs, "steps": total, "final_train_loss": last["loss"],
               "heldout_accuracy": bt["bt_accuracy"], "heldout_bt_loss": bt["bt_loss"],
               "seconds": round(time.time() - t0, 1)}
    pair_lines = "".join(json.dumps({**{k: p[k] for k in ("prompt", "chosen", "rejected")},
                                     "split": "heldout" if j < n_held else "train"}) + "\n"
                         for j, p in enumerate(heldout + train))
    rundir.save_pretrained(cfg.rm_dir, rm, tokenizer, files={"train_summary.json": json.dumps(summary, indent=2),
                                                             "pairs.jsonl": pair_lines})
    if distributed.is_main():
        print(f"rm: held-out accuracy {summary['heldout_accuracy']:.3f}, BT loss {summary['heldout_bt_loss']:.4f} "
              f"on {len(heldout)} pairs; wrote {cfg.rm_dir} in {summary['seconds']}s")
    return summary


# ----------------------------------------------------------------------------- stage 3: RL

def run_rl(cfg: Config, train_rows: list[dict], test_rows: list[dict]) -> dict:
    rank, world, device = distributed.init_distributed()
    tokenizer = loading.load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    proxy_rm = loading.load_reward_model(cfg.rm_dir, device, pad_token_id=tokenizer.pad_token_id, dtype=rm_dtype(cfg),
                                         trust_remote_code=cfg.trust_remote_code).requires_grad_(False)
    proxy = evaluation.make_proxy(proxy_rm, tokenizer, eos_penalty=cfg.eos_penalty, batch_size=cfg.gold_batch_size)
    gold = evaluation.make_gold(cfg.gold_rm, device, dtype=rm_dtype(cfg), batch_size=cfg.gold_batch_size,
                                trust_remote_code=cfg.trust_remote_code)
    init_model = distributed.shard(loading.load_model(cfg.sft_dir, device, trust_remote_code=cfg.trust_remote_code))
    test_rows = short_enough(test_rows, tokenizer, cfg.max_prompt_tokens, "eval")
    evaluate = evaluation.rlhf_evaluator(
        test_rows[:cfg.eval_limit] if cfg.eval_limit else test_rows, gold, proxy, init_model.requires_grad_(False),
        bt_proxy=evaluation.make_proxy(proxy_rm, tokenizer, eos_penalty=None, batch_size=cfg.gold_batch_size),
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.gen_batch_size, seed=cfg.seed,
        pairs=cfg.eval_pairs, sharpness_prompts=cfg.sharpness_prompts,
        sharpness_perturbations=cfg.sharpness_perturbations, sharpness_sigma=cfg.sharpness_sigma)

    def score(rows, completions, has_eos):
        rewards = proxy(rows, completions, has_eos)  # the trained reward: proxy RM, EOS penalty
        terms = {"proxy": rewards}
        if cfg.train_gold:
            terms["gold"] = terms["true_reward"] = gold(rows, completions, has_eos)
        return rewards, terms

    t0 = time.time()
    last = grpo.rl_train(dataclasses.replace(cfg, model=cfg.sft_dir, out_dir=cfg.rl_dir), train_rows,
                         evaluation.tldr_messages, score, evaluate)
    if distributed.is_main():
        out = Path(cfg.rl_dir)
        plots.plot_runs([out], out / "curves.png", plots.TLDR_PANELS, title=out.name)
        print(f"rl: {cfg.steps} steps in {time.time() - t0:.0f}s; curves in {out / 'curves.png'}")
    return last


# ----------------------------------------------------------------------------- main

def check_inputs(cfg: Config) -> None:
    """One-line errors before any work: flags, model dirs of the stages that are skipped, the gold RM."""
    stages = ("sft", "rm", "rl") if cfg.stage == "all" else (cfg.stage,)
    if "sft" not in stages and not Path(cfg.sft_dir).exists():
        loading.fail(f"--sft-dir {cfg.sft_dir!r} does not exist: run --stage sft first (or pass --sft-dir)")
    if "rl" in stages and "rm" not in stages and not (Path(cfg.rm_dir) / "config.json").exists():
        loading.fail(f"--rm-dir {cfg.rm_dir!r} has no reward model: run --stage rm first (or pass --rm-dir)")
    grpo.validate(cfg, check_model=False)  # RL flags; lr, β and dtype defaults
    if "sft" in stages:
        loading.check_model_path(cfg.model)
    if ("rm" in stages or "rl" in stages) and cfg.gold_rm != evaluation.TOY_GOLD:
        loading.check_model_path(cfg.gold_rm, "--gold-rm")
    if not 0 < cfg.rm_heldout < 1:
        loading.fail(f"--rm-heldout must be in (0, 1), got {cfg.rm_heldout}")
    if cfg.sharpness_sigma < 0:
        loading.fail(f"--sharpness-sigma must be >= 0, got {cfg.sharpness_sigma}")


def main(cfg: Config) -> dict:
    cfg = resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # tiny models: one thread is as fast, and robust to a busy machine
    if cfg.model == str(toy.TLDR_BASE):
        toy.wait_or_build(toy.build_tldr_base, toy.TLDR_BASE / "model.safetensors")
    check_inputs(cfg)
    train = evaluation.load_tldr_rows(cfg.dataset, "train", cfg.prompt_field, cfg.reference_field)
    test = evaluation.load_tldr_rows(cfg.test_dataset or cfg.dataset, cfg.test_split, cfg.prompt_field,
                                     cfg.reference_field)
    distributed.init_distributed()
    distributed.seed_everything(cfg.seed)
    results, times = {}, {}
    for stage, run in (("sft", lambda: run_sft(cfg, train)), ("rm", lambda: run_rm(cfg, train)),
                       ("rl", lambda: run_rl(cfg, train, test))):
        if cfg.stage not in ("all", stage):
            continue
        done_dir = {"sft": cfg.sft_dir, "rm": cfg.rm_dir}.get(stage)
        if cfg.stage == "all" and cfg.resume and done_dir and (Path(done_dir) / "config.json").exists():
            if distributed.is_main():
                print(f"--resume: {stage} already done in {done_dir}")
            continue
        t0 = time.time()
        results[stage] = run()
        times[stage] = round(time.time() - t0, 1)
    if distributed.is_main():
        print("stage wall times (s): " + json.dumps(times))
    return {"results": results, "seconds": times}


if __name__ == "__main__":
    main(loading.parse_config(Config, presets=PRESETS))
    distributed.finish_distributed()
