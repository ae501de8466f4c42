"""Dr.GRPO with --reg none|kl|reset|gr: the objective, one update, and the RL loop (paper §2.1, §4, §5).

One policy-gradient update per sampled batch, REINFORCE with the group mean as baseline and no std scaling
(Dr.GRPO), loss normalised by a constant (sequences × max completion length). Regularisers (`--reg`): none; kl
(β·KL to the initial policy, k3 estimator by default); reset (the same KL, reference ← policy every R steps, §4);
gr (finite-difference gradient regularisation, gr.py, §5). Runs as one process (`python`) or FSDP2 (`torchrun`).

Shapes: N = sequences on this rank (prompts × G), P = prompt length (left-padded), T = completion length
(right-padded), V = vocabulary.
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from distributed import (all_reduce_max, all_reduce_sum, autocast, gradient_sync, init_distributed, is_main,
                         keep_freed_memory, rank_and_world, rank_device, reshard, seed_everything, shard,
                         step_generator, step_seed)
from generation import (decode_completions, generate, has_eos, position_ids, prepare_decode, refresh_rollout_model,
                        rollout_model, tokenize_prompts)
from gr import clip_, gr_backward, local_shard
from loading import check_model_path, check_ranges, eos_token_ids, fail, load_model, load_tokenizer, short_prompts
from logprobs import head_returns_logprobs
from rewards import render_chat
from rundir import (TRACKER_PACKAGES, Timer, check_run_flags, check_trackers, claim_out_dir, closing_line, duration,
                    load_trainer_state, log_jsonl, open_trackers, release_dir, restart_metrics, resume_point,
                    save_checkpoint, write_atomic, write_summary)

REGS = ("none", "kl", "reset", "gr")


# ----------------------------------------------------------------------------- the Dr.GRPO objective

def group_advantages(rewards, group_size: int):
    """Dr.GRPO advantage A_i = r_i − mean_j r_j within each group of G rollouts (no std division).

    rewards: (B*G,) ordered group by group. Returns (B*G,).
    """
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def token_logprobs(model, input_ids, attention_mask, n_completion: int, temperature: float,
                   with_entropy: bool = False):
    """log π(a_t | s, a_<t) of the last `n_completion` tokens, from logits / temperature.

    input_ids, attention_mask: (N, P+T). Returns logp (N, T) and, if asked, the entropy (N, T)
    of the same tempered distribution (no gradient). The (N, T, V) logits are never held: the model's LM head
    hands back [logp, entropy] in their place, computed over chunks of positions (logprobs.py).
    """
    with head_returns_logprobs(model, input_ids[:, -n_completion:], temperature, with_entropy) as check:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                    logits_to_keep=n_completion + 1).logits  # (N, T, 2)
        check(out)
    logp, entropy = out.unbind(-1)  # own storage each: a caller keeping logp does not keep (N, T, 2) alive
    return logp.contiguous(), entropy.detach().contiguous() if with_entropy else None


KL_ESTIMATORS = ("k3", "k3-ratio", "k1")


def kl_per_token(logp, ref_logp, estimator: str = "k3"):
    """KL(π_φ ‖ π_ref) estimate per sampled token, p = log π_φ, q = log π_ref. All three have the same value in
    expectation; their gradients differ:
    k3 = e^(q−p) − (q−p) − 1 ≥ 0, gradient (1 − π_ref/π)∇p (the GRPO paper, TRL ≤ 1.9);
    k3-ratio = k3 · π/π_detached, the same value, gradient (1 − π_ref/π + k3)∇p (TRL ≥ 1.10's default,
    use_bias_correction_kl); k1 = p − q, gradient ∇p."""
    if estimator in ("k3", "k3-ratio"):
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        return k3 * torch.exp(logp - logp.detach()) if estimator == "k3-ratio" else k3
    if estimator == "k1":
        return logp - ref_logp
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")


def dr_grpo_loss(logp, advantages, mask, normalizer: float, ref_logp=None, beta: float = 0.0,
                 kl_estimator: str = "k3", weights=None):
    """Σ_tokens w·[−A·π/π_detached + β·KL] / normalizer.

    logp, mask, ref_logp, weights: (N, T); advantages: (N,). The ratio equals 1 but carries ∇log π, so
    the gradient is REINFORCE (eq. 1); the constant normaliser (Dr.GRPO) is
    (sequences in the whole step on this rank) × (max completion length). `weights` (detached, default 1):
    per-token importance weights for tokens sampled from another distribution (`importance_weights`).
    """
    per_token = -advantages[:, None] * torch.exp(logp - logp.detach())  # (N, T)
    if beta:
        per_token = per_token + beta * kl_per_token(logp, ref_logp, kl_estimator)
    if weights is not None:
        per_token = per_token * weights
    return (per_token * mask).sum() / normalizer


def importance_weights(logp, sampler_logp, cap: float):
    """Truncated importance sampling (TIS; Yao et al. 2025, TRL's vllm_importance_sampling_correction, verl's
    tis_imp_ratio_cap): min(π_learner / π_sampler, cap) per token, detached. (N, T)."""
    return torch.exp(logp.detach() - sampler_logp).clamp(max=cap)


# ----------------------------------------------------------------------------- one update

def rl_batch(prompt_ids, prompt_mask, completion, cmask, advantages=None) -> dict:
    """One update's batch: input_ids, attention_mask (N, P+T) of prompt + completion; completion_mask (N, T);
    advantages (N,)."""
    return {"input_ids": torch.cat([prompt_ids, completion], 1), "attention_mask": torch.cat([prompt_mask, cmask], 1),
            "completion_mask": cmask, "advantages": advantages}


def micro_batches(batch: dict, size: int):
    n = batch["input_ids"].shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in batch.items()}


@torch.no_grad()
def reference_logprobs(ref_model, batch: dict, temperature: float, micro_batch_size: int):
    """log π_ref of the completion tokens, (N, T); computed once per step, reused by both GR passes."""
    n_completion = batch["completion_mask"].shape[1]
    out = [token_logprobs(ref_model, mb["input_ids"], mb["attention_mask"], n_completion, temperature)[0]
           for mb in micro_batches(batch, micro_batch_size)]
    reshard(ref_model)
    return torch.cat(out)


@torch.no_grad()
def reset_reference(ref_model, model) -> None:
    """Reference reset (§4): π_ref ← π_φ, copied shard by shard (both models sharded alike)."""
    torch._foreach_copy_([local_shard(p) for p in ref_model.parameters()], [local_shard(p) for p in model.parameters()])


@torch.no_grad()
def reset_optimizer_state(optimizer) -> None:
    """The optimizer as if just built (Adam: moments and step count 0), as ProRL does at each reference reset. Zeroed
    in place, not cleared: a checkpoint right after the reset then saves this state (DCP would fill an empty one by
    taking a zero-gradient step, which counts as step 1)."""
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


def train_step(model, optimizer, batch: dict, *, reg: str, temperature: float, normalizer: float,
               micro_batch_size: int, beta: float = 0.0, kl_estimator: str = "k3", gamma: float = 0.0,
               eps: float = 1e-3, max_grad_norm: float = 1.0, tis_cap: float = 0.0,
               gr_importance_weights: bool = False, step: int = 0) -> dict:
    """Phases 5-6 of an RL step: loss/backward (twice for GR), clip to `max_grad_norm`, optimizer step.

    batch (this rank's share): input_ids, attention_mask (N, P+T); completion_mask (N, T);
    advantages (N,); ref_logp (N, T) when reg is kl/reset; optional init_logp (N, T) to log the KL to the
    initial policy; optional sampler_logp (N, T), the sampled tokens' log-probs under the distribution that sampled
    them, to log the sampler/learner mismatch and, with `tis_cap` > 0, weight each token by
    min(π_φ/π_sampler, tis_cap). `gr_importance_weights`: GR's second pass, at φ + ε·g1 on the same actions, also
    weights each token by π_{φ+εg1}/π_φ (the correction the paper calls unnecessary, §5). Returns metrics averaged
    over ranks. Raises FloatingPointError (naming `step`, and which of the loss and the gradient norm) before the
    update if either is not finite.
    """
    if reg not in REGS:
        raise ValueError(f"reg must be one of {REGS}, got {reg!r}")
    use_kl = reg in ("kl", "reset") and beta > 0
    n_completion = batch["completion_mask"].shape[1]
    stats, logp_at_phi = {}, []  # token sums and each micro-batch's log π_φ, from the first pass

    def closure():
        total = torch.zeros((), device=batch["input_ids"].device)
        first = not logp_at_phi
        n_micro = -(-batch["input_ids"].shape[0] // micro_batch_size)
        for i, mb in enumerate(micro_batches(batch, micro_batch_size)):
            gradient_sync(model, i == n_micro - 1)  # FSDP2: one reduce-scatter per pass, after its last micro-batch
            logp, entropy = token_logprobs(model, mb["input_ids"], mb["attention_mask"], n_completion,
                                           temperature, with_entropy=first)
            if first:
                logp_at_phi.append(logp.detach())
            weights = importance_weights(logp_at_phi[i], mb["sampler_logp"], tis_cap) if tis_cap else None
            if gr_importance_weights and not first:  # π_{φ+εg1}/π_φ: the actions were sampled at φ
                at_phi = torch.exp(logp.detach() - logp_at_phi[i])
                weights = at_phi if weights is None else weights * at_phi
            ref_logp = mb["ref_logp"] if use_kl else None
            loss = dr_grpo_loss(logp, mb["advantages"], mb["completion_mask"], normalizer,
                                ref_logp, beta if use_kl else 0.0, kl_estimator, weights)
            loss.backward()
            total += loss.detach()
            if first:
                m = mb["completion_mask"]
                acc = {"tokens": m.sum(), "entropy": (entropy * m).sum()}
                if "ref_logp" in mb:
                    acc["kl"] = (kl_per_token(logp.detach(), mb["ref_logp"], kl_estimator) * m).sum()
                if "init_logp" in mb:  # KL to the initial policy, for every --reg (the paper's x-axis in Fig. 4)
                    acc["kl_init"] = (kl_per_token(logp.detach(), mb["init_logp"], "k3") * m).sum()
                if "sampler_logp" in mb:  # the rollout model's distribution against the learner's, token by token
                    acc["sampler/abs_logp_diff"] = ((logp.detach() - mb["sampler_logp"]).abs() * m).sum()
                    ratio_max = (torch.exp(logp.detach() - mb["sampler_logp"]) * m).max()
                    stats["sampler_ratio_max"] = torch.maximum(stats.get("sampler_ratio_max", ratio_max), ratio_max)
                for k, v in acc.items():
                    stats[k] = stats.get(k, 0) + v.float()
        return total

    params = [p for p in model.parameters() if p.requires_grad]
    metrics = {}
    if reg == "gr":
        out = gr_backward(model, closure, gamma=gamma, eps=eps)
        loss = out["loss"]
        metrics.update({"g1_norm": out["g1_norm"], "g2_norm": out["g2_norm"],
                        "gr/correction_norm": out["correction_norm"], "gr/correction_ratio": out["correction_ratio"]})
    else:
        optimizer.zero_grad(set_to_none=True)
        loss = closure()
    grad_norm = clip_([p.grad for p in params if p.grad is not None], max_grad_norm)
    if "sampler_ratio_max" in stats:
        metrics["sampler/ratio_max"] = all_reduce_max(stats.pop("sampler_ratio_max").float()).item()
    tokens = stats.pop("tokens")
    sums = all_reduce_sum(torch.stack([loss.float(), tokens, *stats.values()]))  # global: every rank decides alike
    loss_sum, tokens, *token_sums, grad_norm = torch.cat([sums, grad_norm.float().reshape(1)]).tolist()
    loss_value = loss_sum / rank_and_world()[1]
    non_finite = [f"{name} ({v})" for name, v in (("loss", loss_value), ("gradient norm", grad_norm))
                  if not np.isfinite(v)]
    if non_finite:
        raise FloatingPointError(f"step {step}: non-finite {' and '.join(non_finite)}; stopping")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics.update(loss=loss_value, grad_norm=grad_norm, **{k: v / tokens for k, v in zip(stats, token_sums)})
    metrics.setdefault("g1_norm", grad_norm)  # pre-clip norm of the update's gradient, comparable across --reg
    return metrics


# ----------------------------------------------------------------------------- the RL loop

@dataclass
class RLConfig:
    """Dr.GRPO with --reg none|kl|reset|gr. Defaults: the paper's GSM8K recipe (Tables 8-9)."""
    model: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "policy: hub id or local HF dir"})
    out_dir: str = field(default="runs/rl", metadata={"help": "metrics.jsonl, checkpoints, eval JSON"})
    reg: str = field(default="gr", metadata={"help": "regulariser", "choices": REGS})
    steps: int = field(default=500, metadata={"help": "optimizer steps (one per sampled batch)"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per step, all ranks (paper: 256 seqs = 32 x 8)"})
    group_size: int = field(default=8, metadata={"help": "G rollouts per prompt"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (log-probs use it too)"})
    max_new_tokens: int = field(default=768, metadata={"help": "completion length; also the loss normaliser"})
    max_prompt_tokens: int = field(default=512, metadata={"help": "longer prompts are dropped (count printed)"})
    lr: float = field(default=None, metadata={"type": float, "help": "Adam lr; default 5e-6 for gr, 3e-6 otherwise"})
    beta: float = field(default=None, metadata={"type": float, "help": "KL weight β; default 0.05 for --reg kl, 0.3 "
                                                "for --reg reset (paper: 0.03-0.15 without resets, 0.2-0.5 with)"})
    kl_estimator: str = field(default="k3", metadata={
        "help": "KL estimator in the loss: k3 (GRPO paper, TRL <= 1.9), k3-ratio (the same value times π/π_detached: "
                "TRL >= 1.10's use_bias_correction_kl, one more term in the gradient), k1", "choices": KL_ESTIMATORS})
    reset_every: int = field(default=200, metadata={"help": "R: steps between reference resets (--reg reset)"})
    reset_optimizer: bool = field(default=False, metadata={
        "help": "--reg reset: also re-initialise Adam's moments at each reset, as ProRL does (the paper is silent)"})
    tis_cap: float = field(default=0.0, metadata={
        "help": "truncated importance sampling: weight each token by min(π_learner/π_sampler, C), correcting for the "
                "rollout model (bf16 replica, CUDA graph) differing from the learner, as TRL/verl do (0 = off)"})
    gr_importance_weights: bool = field(default=False, metadata={
        "help": "GR: weight the second pass's tokens by π_{φ+εg1}/π_φ (the paper reuses the actions uncorrected)"})
    gamma: float = field(default=1e-3, metadata={"help": "GR strength γ"})
    eps: float = field(default=1e-3, metadata={"help": "GR perturbation ε"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip of the final gradient"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward on one rank"})
    gen_batch_size: int = field(default=64, metadata={"help": "prompts per generate call on one rank (eval)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype of generation and eval: "
                                                        "auto = bfloat16 on CUDA, float32 on CPU",
                                                "choices": ("auto", "float32", "bfloat16")})
    update_dtype: str = field(default="auto", metadata={
        "help": "compute dtype of the loss/backward passes (master weights stay fp32). auto: float32 for --reg gr, "
                "whose finite difference survives bf16 only when ε·‖g1‖ ≳ 5e-3 (benchmarks/gr_precision.py); else "
                "bfloat16 autocast on CUDA, float32 on CPU. Under FSDP2, bfloat16 also all-gathers the weights in bf16",
        "choices": ("auto", "float32", "bfloat16")})
    tf32: bool = field(default=False, metadata={
        "help": "CUDA: fp32 matmuls with TF32 inputs (the fp32 update and reference passes). Off until "
                "`benchmarks/gr_precision.py --device cuda` (its tf32 mode) has measured what it does to GR"})
    rollout_replica: bool = field(default=True, metadata={
        "help": "generate and evaluate with an unsharded copy of the policy in --dtype on each rank (one copy of the "
                "weights per rank, refreshed after every step): no FSDP gathers, collectives or autocast while "
                "decoding. --no-rollout-replica: generate with the sharded policy (models whose copy does not fit)"})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "CUDA: replay the decode step as a CUDA graph (torch.compile mode=reduce-overhead), one per decode "
                "shape (rows and cache length rounded up, at most 8). GRPO_COMPILE_BACKEND=eager runs the same "
                "compiled path on the CPU. Not yet measured on a GPU by this project, hence off by default"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing (long completions)"})
    log_kl_init: bool = field(default=False, metadata={"help": "log kl_init, the k3 KL to the initial policy, every "
                                                                "step (one more forward; free with --reg kl)"})
    eval_every: int = field(default=50, metadata={"help": "steps between evals (0 = only at the end)"})
    eval_limit: int = field(default=0, metadata={"help": "eval on the first N test rows (0 = all)"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (and one at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "the newest K checkpoints are kept, older ones deleted"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --out-dir from its newest checkpoint that loads; the flags that define the "
                "experiment must be the run's (config.json)"})
    allow_change: tuple = field(default=(), metadata={
        "help": "with --resume: a flag that defines the experiment whose new value applies from the resumed step "
                "(e.g. lr)", "repeatable": True})
    overwrite: bool = field(default=False, metadata={"help": "delete the run in --out-dir and start afresh (without "
                                                            "it, a fresh run into a dir that holds one stops)"})
    seed: int = field(default=0, metadata={"help": "seed; each step's sampling is a function of (seed, step, rank)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model repos to run their own code"})
    report_to: tuple = field(default=("none",), metadata={
        "help": "experiment tracker(s) that also receive metrics.jsonl's records (rank 0)", "repeatable": True,
        "choices": ("none", *TRACKER_PACKAGES)})
    # What a --resume may change: when the run evaluates, saves and logs, and how it computes (batching, precision,
    # memory). Every other flag, a script's own too unless its Config adds it here, defines the experiment.
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "out_dir", "steps", "eval_every", "save_every", "keep_checkpoints", "resume", "allow_change", "overwrite",
        "report_to", "log_kl_init", "micro_batch_size", "gen_batch_size", "dtype", "update_dtype", "rollout_replica",
        "cuda_graphs", "grad_checkpointing", "trust_remote_code")


def validate(cfg: RLConfig, check_model: bool = True) -> None:
    """Cheap checks of the flags, before anything is loaded (`check_model=False` when the caller builds it)."""
    check_ranges(cfg, positive=("steps", "prompts_per_step", "max_new_tokens", "max_prompt_tokens", "temperature", "lr",
                                "reset_every", "max_grad_norm", "micro_batch_size", "gen_batch_size", "save_every",
                                "keep_checkpoints"),
                 non_negative=("beta", "gamma", "eps", "eval_every", "eval_limit"))
    check_run_flags(cfg)
    if cfg.reg == "gr" and cfg.eps <= 0:
        fail(f"--reg gr needs --eps > 0 (got {cfg.eps}): the finite difference divides by ε")
    if cfg.beta is None:
        cfg.beta = 0.3 if cfg.reg == "reset" else 0.05  # Tables 6-7, 9
    if cfg.reg in ("kl", "reset") and cfg.beta <= 0:
        fail(f"--reg {cfg.reg} needs --beta > 0 (got {cfg.beta})")
    if cfg.group_size < 2:
        fail(f"--group-size must be ≥ 2 for a group baseline (got {cfg.group_size})")
    if cfg.tis_cap < 0:
        fail(f"--tis-cap must be > 0 (or 0 for off), got {cfg.tis_cap}")
    for flag, on, reg in (("--reset-optimizer", cfg.reset_optimizer, "reset"),
                          ("--gr-importance-weights", cfg.gr_importance_weights, "gr")):
        if on and cfg.reg != reg:
            fail(f"{flag} applies to --reg {reg} only (got --reg {cfg.reg})")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.prompts_per_step % world:
        fail(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by the {world} ranks")
    if cfg.lr is None:
        cfg.lr = 5e-6 if cfg.reg == "gr" else 3e-6  # paper Tables 5, 8, 9
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if rank_device().type == "cuda" else "float32"
    if cfg.update_dtype == "auto":
        cfg.update_dtype = "float32" if cfg.reg == "gr" or rank_device().type == "cpu" else "bfloat16"
    elif cfg.update_dtype == "bfloat16" and cfg.reg == "gr" and is_main():
        print(f"warning: --update-dtype bfloat16 with --reg gr: bf16 rounds away most of GR's finite difference "
              f"unless ε·‖g1‖ ≳ 5e-3, i.e. ‖g1‖ ≳ {5e-3 / cfg.eps:.3g} at ε = {cfg.eps:g} (benchmarks/gr_precision.py)")
    check_trackers(cfg.report_to)
    if check_model:
        check_model_path(cfg.model)


def rl_train(cfg: RLConfig, rows: list[dict], make_prompt, score, evaluate=None) -> dict:
    """The RL loop. `make_prompt(row) -> chat messages`; `score(rows, completions, has_eos) -> (rewards (N,),
    {term: (N,)})`, terms logged as means (a "true_reward" term is the hacking signal where known);
    `evaluate(model, tokenizer, step) -> dict` runs on all ranks, given the rollout model (`rollout_model`: the
    policy's compute-dtype replica, or the policy). Returns the last eval."""
    rank, world, device = init_distributed()
    if device.type == "cpu":
        keep_freed_memory()
    main = rank == 0
    out = Path(cfg.out_dir)
    claim_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)  # one writer, never over another run's files
    seed_everything(cfg.seed)
    ckpt = resume_point(out, cfg, free=cfg.FREE_ON_RESUME, allowed=cfg.allow_change) if cfg.resume else None

    tokenizer = load_tokenizer(str(ckpt or cfg.model), cfg.trust_remote_code)
    prompts = [render_chat(tokenizer, make_prompt(r)) for r in rows]
    keep = short_prompts(tokenizer, prompts, cfg.max_prompt_tokens, "rl")
    if len(keep) < cfg.prompts_per_step:
        fail(f"only {len(keep)} usable prompts, fewer than --prompts-per-step {cfg.prompts_per_step}")
    rows, prompts = [rows[i] for i in keep], [prompts[i] for i in keep]

    if cfg.tf32 and device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    param_dtype = torch.bfloat16 if cfg.update_dtype == "bfloat16" else None  # FSDP2's all-gathers (one process: none)
    policy = shard(load_model(ckpt or cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                              grad_checkpointing=cfg.grad_checkpointing), param_dtype)
    ref = None
    if cfg.reg in ("kl", "reset"):
        ref_path = cfg.model
        if ckpt is not None and cfg.reg == "reset":  # no reference/ (--allow-change reg): reset to the policy now
            ref_path = ckpt / "reference" if (ckpt / "reference").exists() else ckpt
        ref = shard(load_model(ref_path, device, trust_remote_code=cfg.trust_remote_code), param_dtype)
        ref.requires_grad_(False)
    init = None
    if cfg.log_kl_init:
        init = ref if cfg.reg == "kl" else shard(load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code),
                                                 param_dtype)
        init.requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    start = 0
    if ckpt is not None:
        start = load_trainer_state(ckpt, policy, optimizer)
        for group in optimizer.param_groups:  # the state holds the run's lr; --lr (with --allow-change lr) applies
            group["lr"] = cfg.lr
    rollout = rollout_model(policy, getattr(torch, cfg.dtype), replica=cfg.rollout_replica, cuda_graphs=cfg.cuda_graphs)
    rollout_autocast = None if rollout is not policy else cfg.dtype  # a replica holds its weights in --dtype already
    decode = prepare_decode(rollout, max(cfg.prompts_per_step // world * cfg.group_size, cfg.gen_batch_size),
                            cfg.max_prompt_tokens + cfg.max_new_tokens)
    if main:
        what = f"a {cfg.dtype} replica of the policy on each rank" if rollout is not policy else "the policy itself"
        size = sum(p.numel() * p.element_size() for p in rollout.parameters()) / 2**30
        updates = cfg.update_dtype + (" autocast over fp32 master weights" if cfg.update_dtype == "bfloat16" else
                                      " with TF32 matmuls" if cfg.tf32 and device.type == "cuda" else "")
        print(f"rollouts: {what} ({size:.3f} GiB of weights), {decode}; update passes: {updates}")
    eos_ids = eos_token_ids(tokenizer, policy)
    metrics_path = out / "metrics.jsonl"
    if main:
        restart_metrics(out, start)
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    track, close_trackers = open_trackers(cfg.report_to, dataclasses.asdict(cfg), out)
    per_rank = cfg.prompts_per_step // world
    normalizer = per_rank * cfg.group_size * cfg.max_new_tokens  # Dr.GRPO: sequences × max completion length
    last_eval = {}
    if evaluate is not None and start == 0:  # the starting point: step 0, before any update
        with autocast(device, cfg.dtype):
            last_eval = evaluate(rollout, tokenizer, 0)
        record = {"step": 0, **{f"eval/{k}": v for k, v in last_eval.items()}}
        log_jsonl(metrics_path, record)
        track(record)
        if main:
            print("before RL: " + " ".join(f"{k}={v:.4g}" for k, v in last_eval.items()), flush=True)

    t_start = time.time()

    def finish(stopped: str) -> None:
        close_trackers()
        summary = write_summary(out, stopped=stopped, seconds=time.time() - t_start,
                                sequences_per_step=cfg.prompts_per_step * cfg.group_size)
        if main:
            print(closing_line(out, stopped, summary), flush=True)
        release_dir(out)

    try:
        for step in range(start, cfg.steps):  # step: updates done before this one; its record, eval, ckpt: step + 1
            timer = Timer()
            # 1. sample prompts: the same global batch on every rank, a function of (seed, step)
            torch.manual_seed(step_seed(cfg.seed, step, rank))  # so is any sampling inside `score` (e.g. a judge)
            picks = np.random.default_rng([cfg.seed, step]).choice(len(rows), cfg.prompts_per_step, replace=False)
            picks = picks[rank * per_rank:(rank + 1) * per_rank].repeat(cfg.group_size)  # group by group
            batch_rows = [rows[i] for i in picks]
            # 2. generate G rollouts per prompt
            with timer("generate"), autocast(device, rollout_autocast):
                prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [prompts[i] for i in picks], device)
                completion, cmask, sampler_logp = generate(
                    rollout, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens, eos_token_ids=eos_ids,
                    pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, return_logprobs=True,
                    progress=f"step {step + 1} generate", generator=step_generator(cfg.seed, step, rank, device))
            ended = has_eos(completion, eos_ids)
            texts = decode_completions(tokenizer, completion, cmask)
            # 3. score
            with timer("score"):
                rewards, terms = score(batch_rows, texts, ended)
                rewards = rewards.to(device, torch.float32)
            # 4. advantages (Dr.GRPO: group mean baseline, no std)
            batch = rl_batch(prompt_ids, prompt_mask, completion, cmask, group_advantages(rewards, cfg.group_size))
            batch["sampler_logp"] = sampler_logp  # the rollout model's, for the mismatch and --tis-cap
            if ref is not None:
                with timer("reference"), autocast(device, cfg.update_dtype):  # same precision as π_φ in the KL
                    batch["ref_logp"] = reference_logprobs(ref, batch, cfg.temperature, cfg.micro_batch_size)
            if init is not None:
                with timer("reference"), autocast(device, cfg.update_dtype):
                    batch["init_logp"] = (batch["ref_logp"] if init is ref else
                                          reference_logprobs(init, batch, cfg.temperature, cfg.micro_batch_size))
            # 5-6. loss/backward (twice with GR), clip to 1.0, optimizer step
            with timer("update"), autocast(device, cfg.update_dtype):
                stats = train_step(policy, optimizer, batch, reg=cfg.reg, temperature=cfg.temperature,
                                   normalizer=normalizer, micro_batch_size=cfg.micro_batch_size, beta=cfg.beta,
                                   kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, eps=cfg.eps,
                                   max_grad_norm=cfg.max_grad_norm, tis_cap=cfg.tis_cap,
                                   gr_importance_weights=cfg.gr_importance_weights, step=step + 1)
                refresh_rollout_model(rollout, policy)
            if cfg.reg == "reset" and (step + 1) % cfg.reset_every == 0:
                reset_reference(ref, policy)
                if cfg.reset_optimizer:
                    reset_optimizer_state(optimizer)
            # 7. log, evaluate, checkpoint
            means = {"reward": rewards, **{f"rewards/{k}": v.to(device, torch.float32) for k, v in terms.items()},
                     "completion_length": cmask.sum(1).float(), "clipped_ratio": (~ended).float()}
            sums = all_reduce_sum(torch.stack([v.float().mean() for v in means.values()]))
            record = {"step": step + 1, **{k: v / world for k, v in zip(means, sums.tolist())}, **stats, **timer.times}
            eval_now = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps
            if evaluate is not None and eval_now:
                with timer("eval"), autocast(device, cfg.dtype):
                    last_eval = evaluate(rollout, tokenizer, step + 1)
                record.update({f"eval/{k}": v for k, v in last_eval.items()}, **timer.times)
            log_jsonl(metrics_path, record)
            track(record)
            if main:
                elapsed = time.time() - t_start
                eta = elapsed / (step + 1 - start) * (cfg.steps - step - 1)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                               if not k.startswith(("time/", "rewards/")))
                      + f" elapsed={duration(elapsed)} eta={duration(eta)}", flush=True)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(out, step + 1, policy, optimizer, tokenizer, ref if cfg.reg == "reset" else None,
                                keep=cfg.keep_checkpoints)
    except FloatingPointError as e:  # the non-finite stop: every rank raises it alike; the summary says so
        finish(str(e))
        raise
    finish("completed")
    return last_eval
