"""Rollouts: the model that generates, sampling, and `generate` on a static KV cache.

Shapes: N = sequences on this rank, P = prompt length (left-padded), T = completion length (right-padded),
V = vocabulary.
"""

import copy

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from distributed import all_reduce_sum, is_main, is_sharded, reshard
from gr import transformer_blocks
from loading import eos_token_ids


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, L) positions of a left-padded batch: 0 at each row's first real token (padding clamped to 0). Generation
    lays sequences out this way, and every later forward over them must use the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- the rollout model

def rollout_model(policy, dtype: torch.dtype, *, replica: bool = True, cuda_graphs: bool = False):
    """The model that generates: an unsharded plain HF copy of `policy` in the compute `dtype` on this rank, kept
    equal to the policy by `refresh_rollout_model` after every optimizer step. Decoding then runs no FSDP hooks, no
    collectives and no autocast casts, and ranks generate independently, for one copy of the weights per rank. Where
    the copy would equal the policy (one process, same dtype) it is the policy itself; `replica=False` returns the
    policy too (FSDP-sharded generation in lockstep, for models whose copy does not fit). `cuda_graphs`: on CUDA,
    `generate` replays this model's decode step as a CUDA graph."""
    sharded = is_sharded(policy)
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


# ----------------------------------------------------------------------------- sampling

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


# ----------------------------------------------------------------------------- generate

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
    positions = position_ids(mask)  # (N, P + T): a decode step's position is its column's
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


# ----------------------------------------------------------------------------- prompts in, texts out

def tokenize_prompts(tokenizer, texts: list[str], device):
    """Left-padded (N, P) ids and mask. Rendered chat prompts carry their special tokens already."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def decode_completions(tokenizer, completion, cmask) -> list[str]:
    """The completions' texts: tokens up to and including the first EOS, special tokens dropped."""
    return tokenizer.batch_decode(completion * cmask + tokenizer.pad_token_id * (1 - cmask), skip_special_tokens=True)


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
        yield {"prompt_ids": ids, "prompt_mask": mask, "completion": completion, "cmask": cmask,
               "texts": decode_completions(tokenizer, completion, cmask), "ended": has_eos(completion, eos).cpu()}


def generate_texts(model, tokenizer, prompts: list[str], **kwargs) -> tuple[list[str], torch.Tensor]:
    """Completions (decoded) and has_eos (N,) of a list of prompt strings; kwargs as `rollouts`."""
    batches = list(rollouts(model, tokenizer, prompts, **kwargs))
    return [t for b in batches for t in b["texts"]], torch.cat([b["ended"] for b in batches])
