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
import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

from gr import clip_, gr_backward, transformer_blocks

REGS = ("none", "kl", "reset", "gr")


# ----------------------------------------------------------------------------- config / setup

def parse_config(cls, argv=None):
    """Dataclass -> argparse: one `--flag-name` per field, help text from `field(metadata={"help": ...})`."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, default, help_ = "--" + f.name.replace("_", "-"), f.default, f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, default=default, help=help_,
                                choices=f.metadata.get("choices"))
    return cls(**vars(parser.parse_args(argv)))


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: a process group (nccl on GPU, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """RNG for one step's sampling, a pure function of (seed, step, rank): resume reproduces runs."""
    state = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


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

@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, *, max_new_tokens: int, eos_token_ids, pad_token_id: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, generator=None):
    """Sample completions with a KV cache. temperature 0 = greedy.

    prompt_ids, prompt_mask: (N, P) left-padded. Returns completion ids (N, T) padded with
    `pad_token_id` after the first EOS, and its mask (N, T): 1 up to and including the first EOS.
    Under FSDP2 the blocks are gathered once for the whole decode, and ranks stop together
    (every rank runs until all ranks are done), so uneven lengths cannot hang a collective.
    """
    device, N = prompt_ids.device, prompt_ids.shape[0]
    eos = torch.as_tensor(list(eos_token_ids), device=device)
    blocks = [b for b in transformer_blocks(model) if isinstance(b, FSDPModule)]
    for m in blocks:  # gather each block once, not once per decode step
        m.set_reshard_after_forward(False, recurse=False)
    tokens, done = [], torch.zeros(N, dtype=torch.bool, device=device)
    mask = prompt_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, cache = prompt_ids, None
    try:
        for _ in range(max_new_tokens):
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            next_token = sample_token(out.logits[:, -1].float(), temperature, top_p, top_k, generator)  # (N,)
            next_token = torch.where(done, pad_token_id, next_token)
            tokens.append(next_token)
            done |= torch.isin(next_token, eos)
            if all_done(done):
                break
            input_ids = next_token[:, None]
            position_ids = position_ids[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)  # fully_shard's default for non-root modules
        reshard(model)
    completion = torch.stack(tokens, dim=1)  # (N, T)
    return completion, completion_mask(completion, eos)


def all_done(done: torch.Tensor) -> bool:
    """True when every sequence on every rank has finished (one all-reduce per decode step)."""
    flag = done.all().to(torch.int32)
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def sample_token(logits, temperature: float, top_p: float = 1.0, top_k: int = 0, generator=None):
    """One token per row from (N, V) logits; temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass ≥ top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


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
    advantages (N,); ref_logp (N, T) when reg is kl/reset. Returns metrics averaged over ranks.
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
                for k, v in acc.items():
                    stats[k] = stats.get(k, 0) + v.float()
        return total

    params = [p for p in model.parameters() if p.requires_grad]
    metrics = {}
    if reg == "gr":
        out = gr_backward(model, closure, gamma=gamma, eps=eps)
        loss = out["loss"]
        metrics.update(g1_norm=out["g1_norm"], g2_norm=out["g2_norm"])
    else:
        optimizer.zero_grad(set_to_none=True)
        loss = closure()
    grad_norm = clip_([p.grad for p in params if p.grad is not None], max_grad_norm)
    loss_value, grad_norm = torch.stack([loss.float(), grad_norm.float()]).tolist()
    if not (np.isfinite(loss_value) and np.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); stopping")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    tokens = stats.pop("tokens")
    sums = all_reduce_sum(torch.stack([loss.float(), tokens] + [stats[k] for k in stats]))
    world = dist.get_world_size() if is_distributed() else 1
    metrics.update(loss=sums[0].item() / world, grad_norm=grad_norm)
    for i, k in enumerate(stats):
        metrics[k] = (sums[2 + i] / sums[1]).item()
    metrics.setdefault("g1_norm", grad_norm)  # pre-clip norm of the update's gradient, comparable across --reg
    return metrics


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- checkpoints

def _full_state_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(out_dir, step: int, model, optimizer, tokenizer, ref_model=None, keep: int = 1) -> Path:
    """Write `out_dir/ckpt-{step}`: a HF dir (safetensors) that `from_pretrained` loads, plus
    `trainer_state.pt` (optimizer, step) and, for reference resets, `reference/`. Atomic: written to
    a temp dir, then renamed; older checkpoints beyond `keep` are removed afterwards."""
    out_dir = Path(out_dir)
    final, tmp = out_dir / f"ckpt-{step:06d}", out_dir / f"ckpt-{step:06d}.tmp"
    model_sd = get_model_state_dict(model, options=_full_state_options())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    ref_sd = get_model_state_dict(ref_model, options=_full_state_options()) if ref_model is not None else None
    if not is_distributed() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_sd)
        tokenizer.save_pretrained(tmp)
        if ref_sd is not None:
            ref_model.save_pretrained(tmp / "reference", state_dict=ref_sd)
        torch.save({"optimizer": optim_sd, "step": step}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out_dir.glob("ckpt-??????"))[:-keep]:
            shutil.rmtree(old)
    if is_distributed():
        dist.barrier()
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
    if not is_distributed() or dist.get_rank() == 0:
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
        self.times[f"time/{self._name}"] = time.perf_counter() - self._t0
