"""Dr.GRPO machinery shared by train_tldr.py, train_math.py and train_judge.py.

Paper §2.1: one policy-gradient update per sampled batch, REINFORCE with the group mean as
baseline and no std scaling (Dr.GRPO), loss normalised by a constant (sequences × max completion
length). Regularisers (`--reg`): none; kl (β·KL to the initial policy, k3 estimator by default);
reset (the same KL, reference ← policy every R steps, §4); gr (finite-difference gradient
regularisation, gr.py, §5). Runs as one process (`python`) or FSDP2 (`torchrun`).

Shapes: N = sequences on this rank (prompts × G), P = prompt length (left-padded),
T = completion length (right-padded), V = vocabulary.
"""

import argparse
import atexit
import contextlib
import copy
import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from gr import clip_, gr_backward, transformer_blocks

REGS = ("none", "kl", "reset", "gr")


# ----------------------------------------------------------------------------- config / setup

def parse_config(cls, argv=None, presets: dict[str, dict] | None = None):
    """Dataclass -> argparse: one `--flag-name` per field, help text from `field(metadata={"help": ...})`.

    `--preset NAME` first applies a named set of defaults (e.g. the offline toy); explicit flags win.
    """
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="named defaults; explicit flags override them")
    for f in dataclasses.fields(cls):
        flag, default, help_ = "--" + f.name.replace("_", "-"), f.default, f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.metadata.get("repeatable"):  # --flag a --flag b -> (a, b); none given -> the field's default
            parser.add_argument(flag, action="append", help=f"{help_} (repeatable; default: {' '.join(default)})",
                                choices=f.metadata.get("choices"))
        else:
            kind = f.metadata.get("type") or {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, default=default, help=help_, choices=f.metadata.get("choices"))
    if presets:
        known, _ = parser.parse_known_args(argv)
        if known.preset:
            parser.set_defaults(**presets[known.preset])
    args = vars(parser.parse_args(argv))
    args.pop("preset", None)
    for f in dataclasses.fields(cls):
        if f.metadata.get("repeatable"):
            args[f.name] = tuple(args[f.name] or f.default)
    return cls(**args)


def rank_device() -> torch.device:
    """This process's device: its GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU. GRPO_DEVICE=cpu forces
    the CPU, e.g. for more torchrun ranks than GPUs (the tests do that); GRPO_DEVICE=cuda insists on a GPU."""
    want = os.environ.get("GRPO_DEVICE", "")
    if want not in ("", "cpu", "cuda"):
        fail(f"GRPO_DEVICE must be cpu or cuda, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        fail("GRPO_DEVICE=cuda, but CUDA is not available")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun, one process group with two backends: nccl for CUDA tensors and
    gloo for CPU tensors, so every collective works whatever device its tensors are on (nccl alone has no CPU path;
    the collective helpers below also move their tensors to the rank's device)."""
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        # a group left alive at exit can abort the interpreter's teardown ("terminate called without an active
        # exception") and turn a finished run into a failed one; a finished run calls `finish_distributed` itself
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return *rank_and_world(), device


def finish_distributed() -> None:
    """The end of a run: the ranks wait for each other, then the group is destroyed. Rank 0 does work of its own after
    the last collective (summary, plots); without the barrier the other ranks tear their connections down meanwhile.
    (After an exception the atexit handler destroys the group without a barrier: a barrier could wait forever.)"""
    if is_distributed():
        barrier()
        dist.destroy_process_group()


def keep_freed_memory() -> bool:
    """CPU: stop glibc from handing freed memory back to the OS after every step, which makes each step re-fault
    its activations page by page (~1.5 µs per 4 KiB page here, and GR, with its higher peak, several times as
    often as a plain update). Blocks up to 32 MiB then come from a heap that is not trimmed, as the CUDA caching
    allocator keeps its blocks; peak RSS is unchanged. Process-wide; False where mallopt is missing (not glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt takes a C int
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main() -> bool:
    """Rank 0; before the process group exists, torchrun's RANK says (so flag checks print once, not per rank)."""
    return (dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed for one step's randomness, a pure function of (seed, step, rank): resumed runs reproduce."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank))


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: `fully_shard` every transformer block, then the root. No-op in a single process."""
    if is_distributed():
        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
    return model


def _fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model) -> None:
    """Free gathered weights after a forward with no backward (FSDP2 leaves the root unsharded)."""
    for m in _fsdp_modules(model):
        m.reshard()


# ----------------------------------------------------------------------------- rollouts

def rollout_model(policy, dtype: torch.dtype, *, replica: bool = True, cuda_graphs: bool = False):
    """The model that generates: an unsharded plain HF copy of `policy` in the compute `dtype` on this rank, kept
    equal to the policy by `refresh_rollout_model` after every optimizer step. Decoding then runs no FSDP hooks, no
    collectives and no autocast casts, and ranks generate independently, for one copy of the weights per rank. Where
    the copy would equal the policy (one process, same dtype) it is the policy itself; `replica=False` returns the
    policy too (FSDP-sharded generation in lockstep, for models whose copy does not fit). `cuda_graphs`: on CUDA,
    `generate` replays this model's decode step as a CUDA graph."""
    sharded = any(isinstance(m, FSDPModule) for m in policy.modules())
    if not replica or (not sharded and dtype == next(policy.parameters()).dtype):
        model = policy
    else:
        from transformers import AutoModelForCausalLM
        with torch.device(next(policy.parameters()).device):
            model = AutoModelForCausalLM.from_config(policy.config, dtype=dtype).eval().requires_grad_(False)
        model.generation_config = copy.deepcopy(policy.generation_config)  # its EOS ids (e.g. Qwen's <|im_end|>)
        if [n for n, _ in model.named_parameters()] != [n for n, _ in policy.named_parameters()]:
            raise ValueError(f"{type(policy).__name__}: the replica's parameters do not match the policy's")
        refresh_rollout_model(model, policy)
    model.grpo_cuda_graphs = cuda_graphs and not (model is policy and sharded)  # never on FSDP shards
    return model


@torch.no_grad()
def refresh_rollout_model(model, policy) -> None:
    """Copy the policy's weights into its replica (a no-op when the replica is the policy). Under FSDP2 every rank
    all-gathers each parameter in turn: one full tensor at a time on top of the replica."""
    if model is not policy:
        for r, p in zip(model.parameters(), policy.parameters()):
            r.copy_(p.full_tensor() if isinstance(p, DTensor) else p)


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, *, max_new_tokens: int, eos_token_ids, pad_token_id: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, generator=None, progress: str = ""):
    """Sample completions: one prefill forward, then one decode step per token on a static KV cache. temperature 0
    = greedy.

    prompt_ids, prompt_mask: (N, P) left-padded. Returns completion ids (N, T) padded with `pad_token_id` after the
    first EOS, and its mask (N, T): 1 up to and including the first EOS. T ≤ max_new_tokens: decoding stops once
    every row has an EOS, checked every `sync_every(device)` steps (the check is a host sync), so on CUDA up to that
    many trailing pad columns remain. The cache and every decode-step input have fixed shapes and addresses for the
    whole call; a model marked by `rollout_model(..., cuda_graphs=True)` replays its decode step as a CUDA graph.
    On an FSDP2-sharded model the blocks are gathered once for the whole decode and ranks stop together (every rank
    steps until all ranks are done), so uneven lengths cannot hang a collective; a replica decodes on its own.
    `progress`: a tqdm bar of that name over the decode steps on rank 0, shown if decoding lasts over 2 s.
    """
    from transformers import StaticCache
    device, (N, P) = prompt_ids.device, prompt_ids.shape
    T = max_new_tokens
    eos = torch.as_tensor(list(eos_token_ids), device=device)
    sharded = [b for b in transformer_blocks(model) if isinstance(b, FSDPModule)]
    graphed = getattr(model, "grpo_cuda_graphs", False) and device.type == "cuda"
    if graphed:  # a few cache lengths, so a few graphs: pad prompts on the left to a multiple of 64
        extra = -P % 64
        prompt_ids, prompt_mask = F.pad(prompt_ids, (extra, 0), value=pad_token_id), F.pad(prompt_mask, (extra, 0))
        P += extra
    mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(N, T, dtype=torch.long)], 1)  # (N, P + T), fixed
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, P + T): a decode step's position is its column's
    cache = decode_cache(model, N, P + T) if graphed else StaticCache(config=model.config, max_cache_len=P + T)
    # the sampler's uniforms, drawn up front (one per row and step), so the decode step itself draws nothing
    uniforms = (torch.rand(T, N, 1, dtype=torch.float64, device=device, generator=generator) if temperature > 0
                else torch.zeros(T, N, 1, dtype=torch.float64, device=device))
    step = decode_step_graphed if graphed else decode_step
    tokens = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    for m in sharded:  # gather each block once, not once per decode step
        m.set_reshard_after_forward(False, recurse=False)
    try:
        logits = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions[:, :P], cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        token = sample_token(logits.float(), temperature, top_p, top_k, uniforms=uniforms[0])
        every = sync_every(device)
        for t in tqdm(range(T), desc=progress, disable=not (progress and is_main()), delay=2, leave=False):
            token = torch.where(done, pad_token_id, token)
            tokens[:, t] = token
            done |= torch.isin(token, eos)
            if t + 1 == T or ((t + 1) % every == 0 and all_done(done, lockstep=bool(sharded))):
                break
            token = step(model, token, positions[:, P + t], mask, cache, uniforms[t + 1], temperature, top_p, top_k)
    finally:
        for m in sharded:
            m.set_reshard_after_forward(True, recurse=False)  # fully_shard's default for non-root modules
        reshard(model)
    completion = tokens[:, :t + 1]
    return completion, completion_mask(completion, eos)


def decode_step(model, token, position, mask, cache, uniforms, temperature: float, top_p: float, top_k: int):
    """One token per row: a forward of the last tokens (N,) at `position` (N,) on the cache, then sampling."""
    logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache,
                   use_cache=True).logits[:, -1]
    return sample_token(logits.float(), temperature, top_p, top_k, uniforms=uniforms)


# CUDA: the decode step compiled for CUDA-graph replay (fixed shapes, static cache addresses, no host syncs inside)
decode_step_graphed = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


def decode_cache(model, batch: int, length: int):
    """A static KV cache kept on the model per (batch, length), reset for every call: CUDA graphs replay against
    fixed addresses, so the cache must outlive one `generate` call."""
    from transformers import StaticCache
    caches = model.__dict__.setdefault("grpo_decode_caches", {})
    if (batch, length) not in caches:
        caches[(batch, length)] = StaticCache(config=model.config, max_cache_len=length)
    caches[(batch, length)].reset()
    return caches[(batch, length)]


def sync_every(device) -> int:
    """Decode steps between 'has every row ended?' checks. The check reads a flag on the host: free on the CPU,
    a stall of the launch queue on CUDA, so there it runs every 16 steps (at most 15 steps too many)."""
    return 1 if device.type == "cpu" else 16


def all_done(done: torch.Tensor, lockstep: bool) -> bool:
    """True when every sequence has finished: on every rank when `lockstep` (FSDP: one all-reduce), else on this
    rank alone (a replica decodes independently and must not enter a collective). One host sync."""
    return (all_reduce_sum((~done).sum()) if lockstep else (~done).sum()).item() == 0


def filter_logits(logits, top_p: float = 1.0, top_k: int = 0):
    """(N, V) logits with the tokens outside top-k / top-p set to -inf, by HF's rules: ties with the k-th largest
    logit stay; top-p keeps the smallest prefix of the distribution sorted by probability whose mass reaches
    top_p (a token is dropped once the mass before it is ≥ top_p), and always the most likely token."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_token(logits, temperature: float, top_p: float = 1.0, top_k: int = 0, generator=None, uniforms=None):
    """One token per row from (N, V) logits at `temperature` (0 = argmax), after `filter_logits`. `uniforms`: (N, 1)
    float64 draws in [0, 1) to use, else they are drawn from `generator`."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_p, top_k)
    # inverse-CDF sampling: the same categorical distribution as torch.multinomial, with one uniform per row instead
    # of an exponential per vocabulary entry (one CPU thread, 16 rows: 5.0 -> 1.8 ms at V = 8k, 82 -> 34 ms at V =
    # 152k); float64 cumsum keeps tiny probabilities exact; right=True never picks a p = 0 token
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)
    if uniforms is None:
        uniforms = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator)
    return torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def completion_mask(completion, eos: torch.Tensor):
    """(N, T) mask: 1 up to and including the first EOS; all ones when there is no EOS (truncated)."""
    is_eos = torch.isin(completion, eos).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()


def has_eos(completion, eos_token_ids) -> torch.Tensor:
    """(N,) bool: the completion ended with an EOS rather than the length limit."""
    return torch.isin(completion, torch.as_tensor(list(eos_token_ids), device=completion.device)).any(-1)


# ----------------------------------------------------------------------------- the Dr.GRPO objective

def token_logprobs(model, input_ids, attention_mask, n_completion: int, temperature: float,
                   with_entropy: bool = False):
    """log π(a_t | s, a_<t) of the last `n_completion` tokens, from logits / temperature.

    input_ids, attention_mask: (N, P+T). Returns logp (N, T) and, if asked, the entropy (N, T)
    of the same tempered distribution (no gradient).
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=n_completion + 1).logits[:, :-1]  # (N, T, V): position t predicts token t+1
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32
    log_z = logits.logsumexp(-1)  # (N, T)
    targets = input_ids[:, -n_completion:]
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - log_z
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = log_z - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


def group_advantages(rewards, group_size: int):
    """Dr.GRPO advantage A_i = r_i − mean_j r_j within each group of G rollouts (no std division).

    rewards: (B*G,) ordered group by group. Returns (B*G,).
    """
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def kl_per_token(logp, ref_logp, estimator: str = "k3"):
    """KL(π_φ ‖ π_ref) estimate per sampled token. k3 = e^(q−p) − (q−p) − 1 ≥ 0; k1 = p − q."""
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    if estimator == "k1":
        return logp - ref_logp
    raise ValueError(f"unknown KL estimator {estimator!r}; use k3 or k1")


def dr_grpo_loss(logp, advantages, mask, normalizer: float, ref_logp=None, beta: float = 0.0,
                 kl_estimator: str = "k3"):
    """Σ_tokens [−A·π/π_detached + β·KL] / normalizer.

    logp, mask, ref_logp: (N, T); advantages: (N,). The ratio equals 1 but carries ∇log π, so
    the gradient is REINFORCE (eq. 1); the constant normaliser (Dr.GRPO) is
    (sequences in the whole step on this rank) × (max completion length).
    """
    per_token = -advantages[:, None] * torch.exp(logp - logp.detach())  # (N, T)
    if beta:
        per_token = per_token + beta * kl_per_token(logp, ref_logp, kl_estimator)
    return (per_token * mask).sum() / normalizer


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
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    torch._foreach_copy_([local(p) for p in ref_model.parameters()], [local(p) for p in model.parameters()])


def micro_batches(batch: dict, size: int):
    n = batch["input_ids"].shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in batch.items()}


def train_step(model, optimizer, batch: dict, *, reg: str, temperature: float, normalizer: float,
               micro_batch_size: int, beta: float = 0.0, kl_estimator: str = "k3", gamma: float = 0.0,
               eps: float = 1e-3, max_grad_norm: float = 1.0, step: int = 0) -> dict:
    """Phases 5-6 of an RL step: loss/backward (twice for GR), clip to `max_grad_norm`, optimizer step.

    batch (this rank's share): input_ids, attention_mask (N, P+T); completion_mask (N, T);
    advantages (N,); ref_logp (N, T) when reg is kl/reset; optional init_logp (N, T) to log the KL to the
    initial policy. Returns metrics averaged over ranks.
    Raises FloatingPointError (naming `step`) before the update if the loss or gradient is not finite.
    """
    if reg not in REGS:
        raise ValueError(f"reg must be one of {REGS}, got {reg!r}")
    use_kl = reg in ("kl", "reset") and beta > 0
    n_completion = batch["completion_mask"].shape[1]
    stats = {}  # token sums from the first pass at φ

    def closure():
        total = torch.zeros((), device=batch["input_ids"].device)
        first = not stats
        for mb in micro_batches(batch, micro_batch_size):
            logp, entropy = token_logprobs(model, mb["input_ids"], mb["attention_mask"], n_completion,
                                           temperature, with_entropy=first)
            ref_logp = mb["ref_logp"] if use_kl else None
            loss = dr_grpo_loss(logp, mb["advantages"], mb["completion_mask"], normalizer,
                                ref_logp, beta if use_kl else 0.0, kl_estimator)
            loss.backward()
            total += loss.detach()
            if first:
                m = mb["completion_mask"]
                acc = {"tokens": m.sum(), "entropy": (entropy * m).sum()}
                if "ref_logp" in mb:
                    acc["kl"] = (kl_per_token(logp.detach(), mb["ref_logp"], kl_estimator) * m).sum()
                if "init_logp" in mb:  # KL to the initial policy, for every --reg (the paper's x-axis in Fig. 4)
                    acc["kl_init"] = (kl_per_token(logp.detach(), mb["init_logp"], "k3") * m).sum()
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
    tokens = stats.pop("tokens")
    sums = all_reduce_sum(torch.stack([loss.float(), tokens, *stats.values()]))  # global: every rank decides alike
    loss_sum, tokens, *token_sums, grad_norm = torch.cat([sums, grad_norm.float().reshape(1)]).tolist()
    loss_value = loss_sum / (dist.get_world_size() if is_distributed() else 1)
    if not (np.isfinite(loss_value) and np.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); stopping")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics.update(loss=loss_value, grad_norm=grad_norm, **{k: v / tokens for k, v in zip(stats, token_sums)})
    metrics.setdefault("g1_norm", grad_norm)  # pre-clip norm of the update's gradient, comparable across --reg
    return metrics


# ----------------------------------------------------------------------------- collectives
# Every collective of the project goes through these helpers, and each moves its tensors to the rank's device first:
# nccl cannot send CPU tensors, and CI (gloo on CPU) would never notice one that slipped through.

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor on t's device; `t` itself in one process)."""
    if not is_distributed():
        return t
    out = t.detach().to(rank_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_gather_rows(local: torch.Tensor, indices: list[int], total: int) -> torch.Tensor:
    """(total, k) float64 on the CPU from every rank's (n, k) rows for the items `indices` (every rank the same n, as
    `shard_list` makes them; its padding copies rewrite the same row). Rows no rank sent stay nan."""
    rows = torch.cat([torch.tensor(indices, dtype=torch.float64)[:, None], local.detach().double().cpu()], 1)
    if is_distributed():
        rows = rows.to(rank_device())
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows)
        rows = torch.cat(parts).cpu()
    out = torch.full((total, local.shape[1]), float("nan"), dtype=torch.float64)
    out[rows[:, 0].long()] = rows[:, 1:]
    return out


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; they travel over gloo, on the CPU)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- checkpoints

def full_state_dict(model) -> dict:
    """The unsharded state dict on the CPU, from any rank layout (every rank must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(path, model, tokenizer, *, files: dict | None = None, reference=None) -> Path:
    """Write `path` as a HF dir that `from_pretrained` loads (safetensors + tokenizer), atomically: into a temp dir,
    then renamed. Every rank calls it (the weights are gathered), rank 0 writes. `files`: {name: str written as text
    | any other object, written with torch.save}; `reference`: a second model, saved under `reference/`."""
    path = Path(path)
    state = full_state_dict(model)
    ref_state = full_state_dict(reference) if reference is not None else None
    if is_main():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        if ref_state is not None:
            reference.save_pretrained(tmp / "reference", state_dict=ref_state)
        for name, obj in (files or {}).items():
            (tmp / name).write_text(obj) if isinstance(obj, str) else torch.save(obj, tmp / name)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()
    return path


def save_checkpoint(out_dir, step: int, model, optimizer, tokenizer, ref_model=None, keep: int = 1) -> Path:
    """Write `out_dir/ckpt-{step}`: a HF dir (safetensors) that `from_pretrained` loads, plus `trainer_state.pt`
    (optimizer, step) and, for reference resets, `reference/`. Atomic; older checkpoints beyond `keep` are removed
    afterwards."""
    out_dir = Path(out_dir)
    optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
    final = save_pretrained(out_dir / f"ckpt-{step:06d}", model, tokenizer, reference=ref_model,
                            files={"trainer_state.pt": {"optimizer": optim_state, "step": step}})
    if is_main():
        for old in sorted(out_dir.glob("ckpt-??????"))[:-keep]:
            shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    done = sorted(p for p in Path(out_dir).glob("ckpt-??????") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_trainer_state(ckpt: Path, model, optimizer) -> int:
    """Restore the optimizer (sharded as `model` is) from a checkpoint; return the step to resume at."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return state["step"]


def log_jsonl(path, record: dict) -> None:
    if is_main():
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Timer:
    """`with timer("gen"): ...` accumulates wall seconds per phase (syncing CUDA for honest numbers)."""

    def __init__(self):
        self.times = {}

    def __call__(self, name):
        self._name = name
        return self

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        key = f"time/{self._name}"
        self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - self._t0


# ----------------------------------------------------------------------------- watching a run

TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --report-to value -> the package it needs
BEST = {"pass@1_greedy": max, "pass@1_sampled": max, "win_rate": max, "gold": max, "bt_accuracy": max,
        "bt_loss": min}  # eval metrics whose best value summary.json reports
PHASES = ("generate", "score", "reference", "update", "eval")


def check_trackers(report_to) -> None:
    """The trackers are optional packages: a missing one is one error line at start, before any work."""
    import importlib.util
    for name in report_to:
        if name != "none" and importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            fail(f"--report-to {name} needs the {TRACKER_PACKAGES[name]} package: pip install {TRACKER_PACKAGES[name]}")


def open_trackers(report_to, config: dict, out_dir):
    """(log, close): log(record) sends a metrics.jsonl record's numbers to every --report-to tracker under the same
    names, at the record's step (the initial eval, step -1, at step 0); the config is logged once. Rank 0 only."""
    sinks = []
    if is_main() and "wandb" in report_to:
        import wandb
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gr-rl"), name=Path(out_dir).name, dir=str(out_dir),
                         config=config)
        sinks.append((lambda scalars, step: run.log(scalars, step=step), run.finish))
    if is_main() and "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        sinks.append((lambda scalars, step: [writer.add_scalar(k, v, step) for k, v in scalars.items()], writer.close))

    def log(record: dict) -> None:
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for send, _ in sinks:
            send(scalars, max(record["step"], 0))

    def close() -> None:
        for _, finish in sinks:
            finish()
    return log, close


def duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def write_summary(out_dir, *, stopped: str, seconds: float, sequences_per_step: int) -> dict:
    """OUT_DIR/summary.json from metrics.jsonl (the whole run, resumed parts included): how it stopped, final and
    best eval metrics with their steps, mean seconds per step of each phase and its share, rollout tokens per second
    (all ranks), peak GPU memory (the largest rank's). Every rank calls it (the memory is gathered); rank 0 writes."""
    peak = max(all_gather_objects(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0))
    if not is_main():
        return {}
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] >= 0]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    times = {p: sum(r.get(f"time/{p}", 0.0) for r in steps) / max(len(steps), 1) for p in PHASES}
    generated = sum(r.get("completion_length", 0.0) * sequences_per_step for r in steps)
    summary = {
        "stopped": stopped, "steps_done": len(steps), "wall_seconds_this_run": round(seconds, 1),
        "final_eval": {"step": evals[-1]["step"], **{k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}}
        if evals else {},
        "best_eval": {},
        "seconds_per_step": {p: round(t, 4) for p, t in times.items()},
        "share_of_step": {p: round(t / max(sum(times.values()), 1e-12), 4) for p, t in times.items()},
        "rollout_tokens_per_second": generated / max(sum(r.get("time/generate", 0.0) for r in steps), 1e-12),
        "peak_gpu_memory_gib": round(peak / 2**30, 3) if torch.cuda.is_available() else None}
    for key, pick in BEST.items():
        seen = [(r[f"eval/{key}"], r["step"]) for r in evals if f"eval/{key}" in r]
        if seen:
            value, step = pick(seen)
            summary["best_eval"][key] = {"value": value, "step": step}
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- models, tokenizers, data

def fail(message: str):
    """Bad input: one line on stderr, exit status 1, before any real work."""
    raise SystemExit(f"error: {message}")


def check_model_path(name_or_path: str, what: str = "--model") -> None:
    """A local path must exist; anything else is treated as a hub id (`org/name`)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if (looks_local or name_or_path.count("/") != 1) and not Path(name_or_path).expanduser().exists():
        fail(f"{what} {name_or_path!r}: no such directory (and not a hub id of the form org/name)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    config = Path(name_or_path) / "tokenizer_config.json"
    generic = config.exists() and json.loads(config.read_text()).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    try:  # AutoTokenizer would swap a generic tokenizer (our toys') for the model type's class
        tok = (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        fail(f"cannot load tokenizer {name_or_path!r} (offline? wrong id?): {str(e).splitlines()[0]}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded so completions start at the same column
    return tok


def load_model(name_or_path, device, *, dtype=torch.float32, trust_remote_code: bool = False,
               grad_checkpointing: bool = False, cls=None):
    """A HF causal LM (or `cls`, e.g. AutoModelForSequenceClassification) in eval mode (no dropout in RL)."""
    from transformers import AutoModelForCausalLM
    cls = cls or AutoModelForCausalLM
    try:
        model = cls.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        fail(f"cannot load model {str(name_or_path)!r} (offline? wrong id?): {str(e).splitlines()[0]}")
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).eval()


def load_reward_model(name_or_path, device, *, pad_token_id: int, dtype=torch.float32, trust_remote_code=False):
    """An `AutoModelForSequenceClassification` with one output (a new scalar head when `name_or_path` is a causal
    LM), eval mode. `pad_token_id` is set in its config: HF's forward refuses batches without one (the score itself
    is read at the last attended token, `rewards.rm_last_token_scores`)."""
    from transformers import AutoModelForSequenceClassification
    try:
        rm = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=dtype,
                                                                trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        fail(f"cannot load reward model {str(name_or_path)!r}: {str(e).splitlines()[0]}")
    rm.config.pad_token_id = pad_token_id
    return rm.to(device).eval()


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the generation config's (Qwen-Instruct ends turns with <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def load_rows(dataset: str, split: str, fields: tuple[str, ...], config: str | None = None) -> list[dict]:
    """Rows of a local json/jsonl/parquet/csv file or a hub dataset split, checked for `fields`."""
    import datasets
    path = Path(dataset).expanduser()
    try:
        if path.suffix in (".json", ".jsonl", ".parquet", ".csv"):
            if not path.exists():
                fail(f"dataset file {dataset!r} does not exist")
            if path.stat().st_size == 0:  # datasets raises a bare StopIteration on an empty file
                fail(f"dataset {dataset!r} is empty")
            kind = {".jsonl": "json"}.get(path.suffix, path.suffix[1:])
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(dataset, config, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        fail(f"cannot load dataset {dataset!r} split {split!r} (offline? wrong id?): {str(e).splitlines()[0]}")
    if len(ds) == 0:
        fail(f"dataset {dataset!r} split {split!r} is empty")
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        fail(f"dataset {dataset!r} lacks field(s) {missing}; it has {ds.column_names}")
    return list(ds)


def autocast(device, dtype: str):
    """bf16 compute with fp32 master weights (GR's ε·g1 lives in the fp32 weights)."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def short_prompts(tokenizer, prompts: list[str], max_tokens: int, what: str) -> list[int]:
    """Indices of the prompts of at most `max_tokens` tokens; prints how many were dropped, fails if none is left."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_tokens]
    if len(keep) < len(prompts) and is_main():
        print(f"{what}: dropped {len(prompts) - len(keep)} of {len(prompts)} prompts longer than {max_tokens} tokens")
    if not keep:
        fail(f"{what}: every prompt is longer than --max-prompt-tokens {max_tokens}")
    return keep


def tokenize_prompts(tokenizer, texts: list[str], device):
    """Left-padded (N, P) ids and mask. Rendered chat prompts carry their special tokens already."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def rollouts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, batch_size: int,
             generator=None, top_p: float = 1.0, top_k: int = 0):
    """Sampled completions of prompt strings, `batch_size` prompts per `generate` call. Yields per batch a dict:
    prompt_ids, prompt_mask (n, P); completion, cmask (n, T); texts (decoded, special tokens dropped); ended (n,)
    bool on the CPU (the completion has an EOS). Every rank must call it when `model` is FSDP-sharded (lockstep)."""
    device = next(model.parameters()).device
    eos = eos_token_ids(tokenizer, model)
    for s in range(0, len(prompts), batch_size):
        ids, mask = tokenize_prompts(tokenizer, prompts[s:s + batch_size], device)
        completion, cmask = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                                     pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                                     top_k=top_k, generator=generator)
        texts = tokenizer.batch_decode(completion * cmask + tokenizer.pad_token_id * (1 - cmask),
                                       skip_special_tokens=True)
        yield {"prompt_ids": ids, "prompt_mask": mask, "completion": completion, "cmask": cmask, "texts": texts,
               "ended": has_eos(completion, eos).cpu()}


def generate_texts(model, tokenizer, prompts: list[str], **kwargs) -> tuple[list[str], torch.Tensor]:
    """Completions (decoded) and has_eos (N,) of a list of prompt strings; kwargs as `rollouts`."""
    batches = list(rollouts(model, tokenizer, prompts, **kwargs))
    return [t for b in batches for t in b["texts"]], torch.cat([b["ended"] for b in batches])


def shard_list(items: list, rank: int, world: int) -> list:
    """This rank's contiguous share; pads with the last item so every rank runs the same batches (lockstep)."""
    per = -(-len(items) // world)
    share = items[rank * per:(rank + 1) * per]
    return share + [items[-1]] * (per - len(share))


# ----------------------------------------------------------------------------- supervised training

def supervised_train(model, loss_fn, steps: int, *, lr: float, schedule=None, weight_decay: float = 0.0,
                     max_grad_norm: float = 1.0, name: str = "sft", log_path=None, print_every: int = 0) -> dict:
    """The one supervised loop (SFT and reward-model stages, toy builders): AdamW at lr × schedule(step), gradient
    clipped to `max_grad_norm`, a non-finite loss stops it before the update. `loss_fn(step)` runs forward and
    backward over this rank's micro-batches of one optimizer step and returns {"loss": this rank's loss, whose
    average over ranks is the global loss (FSDP averages the ranks' gradients), other metric: a tensor that sums
    over ranks}. Logs {step, loss, grad_norm, lr, ...} to a fresh `log_path` (rank 0); returns the last record."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or (lambda s: 1.0))
    world = rank_and_world()[1]
    if log_path is not None and is_main():
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("")
    record = {}
    model.train()
    for step in range(steps):
        out = loss_fn(step)
        grad_norm = clip_([p.grad for p in params if p.grad is not None], max_grad_norm)
        sums = all_reduce_sum(torch.stack([v.detach().float().reshape(()) for v in out.values()])).tolist()
        values = {k: v / world if k == "loss" else v for k, v in zip(out, sums)}
        norm = grad_norm.item()
        if not (np.isfinite(values["loss"]) and np.isfinite(norm)):
            raise FloatingPointError(f"{name} step {step}: non-finite loss ({values['loss']}) or gradient norm "
                                     f"({norm}); stopping")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, **values, "grad_norm": norm, "lr": scheduler.get_last_lr()[0]}
        if log_path is not None:
            log_jsonl(log_path, record)
        if print_every and ((step + 1) % print_every == 0 or step + 1 == steps) and is_main():
            print(f"  {name} step {step + 1}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                  flush=True)
    model.eval()
    return record


def sft_loss(model, input_ids, attention_mask, loss_mask):
    """Mean next-token cross-entropy over the tokens where loss_mask = 1 (the completion). All (N, L)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # (N, L-1)
    m = loss_mask[:, 1:].float()
    return (nll * m).sum() / m.sum().clamp(min=1)


def sft_batch(tokenizer, prompts: list[str], completions: list[str], device, max_len: int):
    """Right-padded prompt+completion+EOS ids (N, L), mask, and the completion-only loss mask."""
    ids, loss = [], []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (p_ids + c_ids)[:max_len]
        ids.append(seq)
        loss.append(([0] * len(p_ids) + [1] * len(c_ids))[:max_len])
    L = max(map(len, ids))
    input_ids = torch.full((len(ids), L), tokenizer.pad_token_id, dtype=torch.long)
    mask, loss_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (seq, lm) in enumerate(zip(ids, loss)):
        input_ids[i, :len(seq)], mask[i, :len(seq)], loss_mask[i, :len(seq)] = torch.tensor(seq), 1, torch.tensor(lm)
    return input_ids.to(device), mask.to(device), loss_mask.to(device)


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
    kl_estimator: str = field(default="k3", metadata={"help": "KL estimator in the loss", "choices": ("k3", "k1")})
    reset_every: int = field(default=200, metadata={"help": "R: steps between reference resets (--reg reset)"})
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
                "bfloat16 autocast on CUDA, float32 on CPU", "choices": ("auto", "float32", "bfloat16")})
    rollout_replica: bool = field(default=True, metadata={
        "help": "generate and evaluate with an unsharded copy of the policy in --dtype on each rank (one copy of the "
                "weights per rank, refreshed after every step): no FSDP gathers, collectives or autocast while "
                "decoding. --no-rollout-replica: generate with the sharded policy (models whose copy does not fit)"})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "CUDA: replay the decode step as a CUDA graph (torch.compile mode=reduce-overhead). Not yet "
                "measured on a GPU by this project, hence off by default"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing (long completions)"})
    log_kl_init: bool = field(default=False, metadata={"help": "log kl_init, the k3 KL to the initial policy, every "
                                                                "step (one more forward; free with --reg kl)"})
    eval_every: int = field(default=50, metadata={"help": "steps between evals (0 = only at the end)"})
    eval_limit: int = field(default=0, metadata={"help": "eval on the first N test rows (0 = all)"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out-dir"})
    seed: int = field(default=0, metadata={"help": "seed; each step's sampling is a function of (seed, step, rank)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model repos to run their own code"})
    report_to: tuple = field(default=("none",), metadata={
        "help": "experiment tracker(s) that also receive metrics.jsonl's records (rank 0)", "repeatable": True,
        "choices": ("none", *TRACKER_PACKAGES)})


def validate(cfg: RLConfig, check_model: bool = True) -> None:
    """Cheap checks of the flags, before anything is loaded (`check_model=False` when the caller builds it)."""
    if cfg.reg == "gr" and cfg.eps <= 0:
        fail(f"--reg gr needs --eps > 0 (got {cfg.eps}): the finite difference divides by ε")
    if cfg.beta is None:
        cfg.beta = 0.3 if cfg.reg == "reset" else 0.05  # Tables 6-7, 9
    if cfg.reg in ("kl", "reset") and cfg.beta <= 0:
        fail(f"--reg {cfg.reg} needs --beta > 0 (got {cfg.beta})")
    if cfg.reg == "reset" and cfg.reset_every <= 0:
        fail(f"--reset-every must be > 0 (got {cfg.reset_every})")
    if cfg.group_size < 2:
        fail(f"--group-size must be ≥ 2 for a group baseline (got {cfg.group_size})")
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
    from rewards import render_chat
    rank, world, device = init_distributed()
    main = rank == 0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None and main:
        print(f"--resume: no checkpoint in {out}, starting from {cfg.model}")

    tokenizer = load_tokenizer(str(ckpt or cfg.model), cfg.trust_remote_code)
    prompts = [render_chat(tokenizer, make_prompt(r)) for r in rows]
    keep = short_prompts(tokenizer, prompts, cfg.max_prompt_tokens, "rl")
    if len(keep) < cfg.prompts_per_step:
        fail(f"only {len(keep)} usable prompts, fewer than --prompts-per-step {cfg.prompts_per_step}")
    rows, prompts = [rows[i] for i in keep], [prompts[i] for i in keep]

    policy = shard(load_model(ckpt or cfg.model, device, trust_remote_code=cfg.trust_remote_code,
                              grad_checkpointing=cfg.grad_checkpointing))
    ref = None
    if cfg.reg in ("kl", "reset"):
        ref_path = ckpt / "reference" if ckpt is not None and cfg.reg == "reset" else cfg.model
        ref = shard(load_model(ref_path, device, trust_remote_code=cfg.trust_remote_code))
        ref.requires_grad_(False)
    init = None
    if cfg.log_kl_init:
        init = ref if cfg.reg == "kl" else shard(load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code))
        init.requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    start = load_trainer_state(ckpt, policy, optimizer) if ckpt is not None else 0
    rollout = rollout_model(policy, getattr(torch, cfg.dtype), replica=cfg.rollout_replica, cuda_graphs=cfg.cuda_graphs)
    gen_dtype = "float32" if rollout is not policy else cfg.dtype  # a replica holds its weights in the compute dtype
    if main:
        what = f"a {cfg.dtype} replica of the policy on each rank" if rollout is not policy else "the policy itself"
        size = sum(p.numel() * p.element_size() for p in rollout.parameters()) / 2**30
        updates = cfg.update_dtype + (" autocast over fp32 master weights" if cfg.update_dtype == "bfloat16" else "")
        print(f"rollouts: {what} ({size:.3f} GiB of weights){', CUDA-graph decode' if cfg.cuda_graphs else ''}; "
              f"update passes: {updates}")
    eos_ids = eos_token_ids(tokenizer, policy)
    metrics_path = out / "metrics.jsonl"
    if main:  # a resumed run rewrites the steps after its checkpoint
        old = metrics_path.read_text().splitlines() if start and metrics_path.exists() else []
        metrics_path.write_text("".join(l + "\n" for l in old if json.loads(l)["step"] < start))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    track, close_trackers = open_trackers(cfg.report_to, dataclasses.asdict(cfg), out)
    per_rank = cfg.prompts_per_step // world
    normalizer = per_rank * cfg.group_size * cfg.max_new_tokens  # Dr.GRPO: sequences × max completion length
    last_eval = {}
    if evaluate is not None and start == 0:  # the starting point, logged as step -1
        with autocast(device, cfg.dtype):
            last_eval = evaluate(rollout, tokenizer, 0)
        record = {"step": -1, **{f"eval/{k}": v for k, v in last_eval.items()}}
        log_jsonl(metrics_path, record)
        track(record)
        if main:
            print("before RL: " + " ".join(f"{k}={v:.4g}" for k, v in last_eval.items()), flush=True)

    t_start = time.time()

    def finish(stopped: str) -> None:
        close_trackers()
        write_summary(out, stopped=stopped, seconds=time.time() - t_start,
                      sequences_per_step=cfg.prompts_per_step * cfg.group_size)

    try:
        for step in range(start, cfg.steps):
            timer = Timer()
            # 1. sample prompts: the same global batch on every rank, a function of (seed, step)
            torch.manual_seed(step_seed(cfg.seed, step, rank))  # so is any sampling inside `score` (e.g. a judge)
            picks = np.random.default_rng([cfg.seed, step]).choice(len(rows), cfg.prompts_per_step, replace=False)
            picks = picks[rank * per_rank:(rank + 1) * per_rank].repeat(cfg.group_size)  # group by group
            batch_rows = [rows[i] for i in picks]
            # 2. generate G rollouts per prompt
            with timer("generate"), autocast(device, gen_dtype):
                prompt_ids, prompt_mask = tokenize_prompts(tokenizer, [prompts[i] for i in picks], device)
                completion, cmask = generate(rollout, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                             eos_token_ids=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                             temperature=cfg.temperature, progress=f"step {step} generate",
                                             generator=step_generator(cfg.seed, step, rank, device))
            ended = has_eos(completion, eos_ids)
            texts = tokenizer.batch_decode(completion * cmask + tokenizer.pad_token_id * (1 - cmask),
                                           skip_special_tokens=True)
            # 3. score
            with timer("score"):
                rewards, terms = score(batch_rows, texts, ended)
                rewards = rewards.to(device, torch.float32)
            # 4. advantages (Dr.GRPO: group mean baseline, no std)
            batch = {"input_ids": torch.cat([prompt_ids, completion], 1),
                     "attention_mask": torch.cat([prompt_mask, cmask], 1),
                     "completion_mask": cmask,
                     "advantages": group_advantages(rewards, cfg.group_size)}
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
                                   max_grad_norm=cfg.max_grad_norm, step=step)
                refresh_rollout_model(rollout, policy)
            if cfg.reg == "reset" and (step + 1) % cfg.reset_every == 0:
                reset_reference(ref, policy)
            # 7. log, evaluate, checkpoint
            means = {"reward": rewards, **{f"rewards/{k}": v.to(device, torch.float32) for k, v in terms.items()},
                     "completion_length": cmask.sum(1).float(), "clipped_ratio": (~ended).float()}
            sums = all_reduce_sum(torch.stack([v.float().mean() for v in means.values()]))
            record = {"step": step, **{k: v / world for k, v in zip(means, sums.tolist())}, **stats, **timer.times}
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
                save_checkpoint(out, step + 1, policy, optimizer, tokenizer, ref if cfg.reg == "reset" else None)
    except FloatingPointError as e:  # the non-finite stop: every rank raises it alike; the summary says so
        finish(str(e))
        raise
    finish("completed")
    return last_eval
