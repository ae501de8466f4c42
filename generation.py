"""Rollouts: the model that generates, sampling, and `generate` on a static KV cache.

Shapes: N = sequences on this rank, P = prompt length (left-padded), T = completion length (right-padded),
V = vocabulary.
"""

import copy
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from distributed import all_reduce_sum, is_main, is_sharded, reshard
from gr import transformer_blocks
from loading import eos_token_ids, fail


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
    policy too (FSDP-sharded generation in lockstep, for models whose copy does not fit). `cuda_graphs`: `generate`
    runs this model's decode step compiled (`compiled_decode_step`): CUDA graphs on CUDA, GRPO_COMPILE_BACKEND's
    backend anywhere; never on FSDP shards."""
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
    model.grpo_cuda_graphs = cuda_graphs and not (model is policy and sharded)
    if model.grpo_cuda_graphs:
        compile_backend(next(model.parameters()).device)  # a bad GRPO_COMPILE_BACKEND fails here, before any work
    return model


@torch.no_grad()
def refresh_rollout_model(model, policy) -> None:
    """Copy the policy's weights into its replica (a no-op when the replica is the policy). Under FSDP2 each FSDP unit
    (a transformer block; the root's embeddings, final norm and head) is unsharded, copied and resharded in turn: one
    all-gather of all its parameters per unit, one unit's full weights at a time on top of the replica. The copy is
    the policy's weights rounded once to the replica's dtype: where FSDP all-gathers in a mixed-precision dtype that
    is neither (bf16 gathers, an fp32 replica), each parameter is gathered again on its own, in full."""
    if model is policy:
        return
    replica = dict(model.named_parameters())
    units = [(prefix, m) for prefix, m in policy.named_modules() if isinstance(m, FSDPModule)] or [("", policy)]
    copied = set()
    for prefix, unit in units:
        master = dict(unit.named_parameters(prefix=prefix))  # sharded, in the master weights' dtype
        if isinstance(unit, FSDPModule):
            unit.unshard()
        for name, p in unit.named_parameters(prefix=prefix):
            if not isinstance(p, DTensor):  # this unit's, now whole (a nested unit's stay sharded)
                once = p.dtype in (master[name].dtype, replica[name].dtype)
                replica[name].copy_(p if once else master[name].full_tensor())
                copied.add(name)
        if isinstance(unit, FSDPModule):
            unit.reshard()
    if copied != replica.keys():
        raise RuntimeError(f"refresh_rollout_model: no FSDP unit holds {sorted(replica.keys() - copied)}")


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


def sample_token(logits, temperature, top_p: float = 1.0, top_k: int = 0, generator=None, uniforms=None):
    """One token per row from (N, V) logits at `temperature` (0 = argmax), after `filter_logits`. `uniforms`: (N, 1)
    float64 draws in [0, 1) to use, else they are drawn from `generator`."""
    if uniforms is None and not (isinstance(temperature, float | int) and temperature == 0):
        uniforms = torch.rand(logits.shape[0], 1, dtype=torch.float64, device=logits.device, generator=generator)
    return sample_with_logprob(logits, temperature, top_p, top_k, uniforms)[0]


def sample_with_logprob(logits, temperature, top_p: float, top_k: int, uniforms):
    """(tokens (N,), their log-probs (N,) under the distribution they were drawn from): from (N, V) logits at
    `temperature` after `filter_logits`, one uniform per row (N, 1); greedy rows (temperature 0) take the argmax, a
    point mass: log-prob 0. In the compiled decode step `temperature` is a 0-d tensor: greedy or not is then picked
    by `torch.where`, not by a branch that dynamo would specialise on, so one graph serves every temperature (the
    same tokens: the same float32 division, the same draws)."""
    if isinstance(temperature, torch.Tensor):
        greedy = temperature == 0
        sampled, logp = inverse_cdf(filter_logits(logits / torch.where(greedy, 1.0, temperature), top_p, top_k)
                                    .softmax(-1), uniforms)
        return torch.where(greedy, logits.argmax(-1), sampled), torch.where(greedy, 0.0, logp)
    if temperature == 0:
        return logits.argmax(-1), logits.new_zeros(logits.shape[0])
    return inverse_cdf(filter_logits(logits / temperature, top_p, top_k).softmax(-1), uniforms)


def inverse_cdf(probs, uniforms):
    """(N,) tokens drawn from the distributions `probs` (N, V) by inverse-CDF sampling with one uniform per row
    (N, 1), and their log-probs (N,): the same categorical distribution as torch.multinomial, with one uniform per
    row instead of an exponential per vocabulary entry (one CPU thread, 16 rows: 5.0 -> 1.8 ms at V = 8k, 82 -> 34 ms
    at V = 152k); float64 cumsum keeps tiny probabilities exact; right=True never picks a p = 0 token."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    tokens = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def completion_mask(completion, eos: torch.Tensor):
    """(N, T) mask: 1 up to and including the first EOS; all ones when there is no EOS (truncated)."""
    is_eos = torch.isin(completion, eos).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()


def has_eos(completion, eos_token_ids) -> torch.Tensor:
    """(N,) bool: the completion ended with an EOS rather than the length limit."""
    return torch.isin(completion, torch.as_tensor(list(eos_token_ids), device=completion.device)).any(-1)


# ----------------------------------------------------------------------------- generate

def progress_bar(iterable, desc: str, total: int | None = None):
    """A tqdm bar named `desc` over `iterable` on rank 0, shown once the loop has lasted 2 s and only on a terminal: in
    a log file its carriage returns would run into the step lines. Empty `desc`: no bar."""
    return tqdm(iterable, desc=desc, total=total, disable=not (desc and is_main() and sys.stderr.isatty()), delay=2,
                leave=False)



@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, *, max_new_tokens: int, eos_token_ids, pad_token_id: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, generator=None, progress: str = "",
             return_logprobs: bool = False):
    """Sample completions: one prefill forward, then one decode step per token on a static KV cache. temperature 0
    = greedy.

    prompt_ids, prompt_mask: (N, P) left-padded. Returns completion ids (N, T) padded with `pad_token_id` after the
    first EOS, and its mask (N, T): 1 up to and including the first EOS. T ≤ max_new_tokens: decoding stops once
    every row has an EOS, checked every `sync_every(device)` steps (the check is a host sync), so on CUDA up to that
    many trailing pad columns remain. The cache and every decode-step input have fixed shapes and addresses for the
    whole call. A model marked by `rollout_model(..., cuda_graphs=True)` runs the compiled decode step on a shape
    rounded up by `decode_shape` (padding rows repeat the last prompt and are dropped; cache columns past P + T are
    never reached) with the same tokens as eager decoding.
    On an FSDP2-sharded model the blocks are gathered once for the whole decode and ranks stop together (every rank
    steps until all ranks are done), so uneven lengths cannot hang a collective; a replica decodes on its own.
    `progress`: a `progress_bar` of that name over the decode steps.
    `return_logprobs`: also return (N, T) the sampled tokens' log-probs under the distribution that drew them (the
    rollout model's tempered, filtered softmax; 0 when greedy), read off the sampler at no extra forward.
    """
    from transformers import StaticCache
    device, (N, P) = prompt_ids.device, prompt_ids.shape
    T = max_new_tokens
    eos = torch.as_tensor(list(eos_token_ids), device=device)
    sharded = [b for b in transformer_blocks(model) if isinstance(b, FSDPModule)]
    step = compiled_step(model, N, P + T, top_p, top_k)
    rows, length = decode_shape(N, P + T) if step else (N, P + T)
    if rows > N:  # padding rows: the last prompt again, decoded and dropped
        prompt_ids = torch.cat([prompt_ids, prompt_ids[-1:].expand(rows - N, -1)])
        prompt_mask = torch.cat([prompt_mask, prompt_mask[-1:].expand(rows - N, -1)])
    mask = F.pad(prompt_mask.long(), (0, length - P), value=1)  # (rows, length): the prompt, then the completion
    positions = position_ids(mask)  # (rows, length): a decode step's position is its column's
    cache = decode_cache(model, rows, length) if step else StaticCache(config=model.config, max_cache_len=length)
    # the sampler's uniforms, drawn up front (one per row and step), so the decode step itself draws nothing; none
    # for padding rows, so the draws are those of the N rows whatever the shape
    uniforms = (torch.rand(T, N, 1, dtype=torch.float64, device=device, generator=generator) if temperature > 0
                else torch.zeros(T, N, 1, dtype=torch.float64, device=device))
    uniforms = F.pad(uniforms, (0, 0, 0, rows - N))
    sampling = (torch.tensor(temperature, dtype=torch.float32, device=device) if step else temperature, top_p, top_k)
    step = step or decode_step
    tokens = torch.full((rows, T), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(rows, T, device=device)
    done = torch.arange(rows, device=device) >= N  # padding rows count as done
    for m in sharded:  # gather each block once, not once per decode step
        m.set_reshard_after_forward(False, recurse=False)
    try:
        logits = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions[:, :P], cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        token, logp = sample_with_logprob(logits.float(), temperature, top_p, top_k, uniforms[0])
        every = sync_every(device)
        for t in progress_bar(range(T), progress):
            token = torch.where(done, pad_token_id, token)
            tokens[:, t], logps[:, t] = token, logp
            done |= torch.isin(token, eos)
            if t + 1 == T or ((t + 1) % every == 0 and all_done(done, lockstep=bool(sharded))):
                break
            token, logp = step(model, token, positions[:, P + t], mask, cache, uniforms[t + 1], *sampling)
    finally:
        for m in sharded:
            m.set_reshard_after_forward(True, recurse=False)  # fully_shard's default for non-root modules
        reshard(model)
    completion = tokens[:N, :t + 1]
    if return_logprobs:
        return completion, completion_mask(completion, eos), logps[:N, :t + 1]
    return completion, completion_mask(completion, eos)


def decode_step(model, token, position, mask, cache, uniforms, temperature, top_p: float, top_k: int):
    """One token per row: a forward of the last tokens (N,) at `position` (N,) on the cache, then sampling: the next
    tokens (N,) and their log-probs (N,)."""
    logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache,
                   use_cache=True).logits[:, -1]
    return sample_with_logprob(logits.float(), temperature, top_p, top_k, uniforms)


# ----------------------------------------------------------------------------- the compiled decode step

# `--cuda-graphs` compiles `decode_step` once per process (fixed shapes, no graph breaks) for a few shapes, each its
# own graph (on CUDA one CUDA graph, replayed every step): rows rounded up to a power of two, cache length to a
# multiple of LENGTH_STEP. A GSM8K run (per rank 256 training rows or fewer, eval batches of 64 and their tail,
# prompts of 100-500 tokens + 768 new ones) needs 2-4 shapes. The temperature is a tensor input, so greedy and
# sampled share a graph; top-p/top-k, fixed for a run, are compiled in. A shape past DECODE_GRAPHS decodes eagerly.
LENGTH_STEP = 256
DECODE_GRAPHS = 8  # = dynamo's default recompile limit, which `compiled_decode_step` raises to it if set lower
compiled_graphs = 0  # the process's graphs so far (dynamo keeps them on decode_step's code object)


def decode_shape(rows: int, length: int) -> tuple[int, int]:
    """The compiled step's (rows, cache length) for a call of `rows` sequences of up to `length` tokens."""
    return 1 << (rows - 1).bit_length(), -(-length // LENGTH_STEP) * LENGTH_STEP


def compile_backend(device) -> str | None:
    """How `--cuda-graphs` compiles the decode step on `device`: GRPO_COMPILE_BACKEND names a torch.compile backend
    (e.g. eager, which runs the same compiled path on the CPU, as CI does); unset, CUDA compiles with inductor and
    replays CUDA graphs (mode reduce-overhead), and the CPU decodes eagerly (None)."""
    backend = os.environ.get("GRPO_COMPILE_BACKEND", "")
    if backend and backend not in torch._dynamo.list_backends(exclude_tags=()):
        fail(f"GRPO_COMPILE_BACKEND={backend!r} is not a torch.compile backend "
             f"({', '.join(torch._dynamo.list_backends(exclude_tags=()))})")
    return backend or ("reduce-overhead" if device.type == "cuda" else None)


@functools.cache
def compiled_decode_step(backend: str):
    """`decode_step` compiled with `backend` ("reduce-overhead": inductor with CUDA graphs): fullgraph, so a graph
    break fails loudly instead of splitting the CUDA graph; dynamic=False, one graph per shape."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_GRAPHS)
    how = {"mode": backend} if backend == "reduce-overhead" else {"backend": backend}
    return torch.compile(decode_step, fullgraph=True, dynamic=False, **how)


def compiled_step(model, rows: int, length: int, top_p: float, top_k: int):
    """The compiled decode step for a `generate` call of `rows` × `length`, or None (decode eagerly): when the model
    is marked for it, its device has a backend, and its shape has a graph already or one more fits DECODE_GRAPHS.
    Counted per model and everything else dynamo specialises on, so never fewer graphs than dynamo holds."""
    global compiled_graphs
    device = next(model.parameters()).device
    backend = compile_backend(device) if getattr(model, "grpo_cuda_graphs", False) else None
    if backend is None:
        return None
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (backend, *decode_shape(rows, length), top_p, top_k, next(model.parameters()).dtype, autocast)
    graphs = model.__dict__.setdefault("grpo_decode_graphs", {})  # key -> compiled (True) or eager (False)
    if key not in graphs:
        graphs[key] = compiled_graphs < DECODE_GRAPHS
        compiled_graphs += graphs[key]
        if not graphs[key] and is_main():
            print(f"warning: decode shape {key[1]} x {key[2]} would be compiled graph {DECODE_GRAPHS + 1}, past "
                  f"DECODE_GRAPHS = {DECODE_GRAPHS}: it decodes eagerly")
    return compiled_decode_step(backend) if graphs[key] else None


def decode_cache(model, rows: int, length: int):
    """The compiled step's static KV cache for `rows` × `length`, reset. CUDA graphs replay against fixed addresses,
    so each shape keeps its cache for the model's life; every shape's cache is a view of one buffer per layer, sized
    for the largest shape so far (printed when it grows): the memory of one cache, not of one per shape."""
    from transformers import StaticCache
    pool = model.__dict__.setdefault("grpo_decode_pool", {"capacity": 0, "caches": {}})
    if (rows, length) not in pool["caches"]:
        if rows * length > pool["capacity"]:  # a new largest shape: a new buffer, the other shapes' views move to it
            layout = kv_layout(model)
            pool.clear()  # the old buffer goes first
            buffers = [(torch.empty(rows * length * h * dk, dtype=dtype, device=device),
                        torch.empty(rows * length * h * dv, dtype=dtype, device=device))
                       for h, dk, dv, dtype, device in layout]
            pool.update(capacity=rows * length, caches={}, layout=layout, buffers=buffers)
            if is_main():
                print(f"decode cache: {kv_bytes(layout, rows, length) / 2**30:.3f} GiB ({rows} rows x {length} "
                      f"positions), shared by every decode shape")
        cache = StaticCache(config=model.config, max_cache_len=length)
        for layer, (keys, values), (h, dk, dv, _, _) in zip(cache.layers, pool["buffers"], pool["layout"]):
            bind_static_layer(layer, keys[:rows * h * length * dk].view(rows, h, length, dk),
                              values[:rows * h * length * dv].view(rows, h, length, dv))
        pool["caches"][(rows, length)] = cache
    cache = pool["caches"][(rows, length)]
    cache.reset()
    return cache


def bind_static_layer(layer, keys, values) -> None:
    """Point a transformers StaticLayer at given key and value tensors (rows, heads, length, dim): what its lazy
    initialisation does with fresh zeros, here with views of the pool (its metadata set from meta tensors, which
    allocate nothing). Static addresses, as CUDA graphs need."""
    layer.lazy_initialization(keys[:, :, :0].to("meta"), values[:, :, :0].to("meta"))
    layer.keys, layer.values, layer.device = keys, values, keys.device
    layer.cumulative_length = torch.zeros((), dtype=torch.long, device=keys.device)
    for t in (layer.keys, layer.values, layer.cumulative_length):
        torch._dynamo.mark_static_address(t)


@torch.no_grad()
def kv_layout(model) -> list[tuple]:
    """Per layer (heads, key dim, value dim, dtype, device) of the KV cache, read from a one-token forward into a
    transformers StaticCache: what the model's attention stores, whatever its config calls it."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer
    cache = StaticCache(config=model.config, max_cache_len=1)
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), cache=cache,
          use_cache=True)
    if any(type(layer) is not StaticLayer for layer in cache.layers):
        raise ValueError(f"{type(model).__name__}: the compiled decode step needs full-attention layers only, got "
                         f"{sorted({type(layer).__name__ for layer in cache.layers})}")
    return [(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3], layer.keys.dtype, layer.keys.device)
            for layer in cache.layers]


def kv_bytes(layout, rows: int, length: int) -> int:
    return sum(rows * length * h * (dk + dv) * dtype.itemsize for h, dk, dv, dtype, _ in layout)


def prepare_decode(model, rows: int, length: int) -> str:
    """Start-of-run words on decoding (eager, or compiled: how and within which bounds). Compiled, it also sizes the KV
    buffer (printed) for calls of up to `rows` sequences of `length` tokens, so that later shapes are views of it, not
    regrowths, each of which would re-record their CUDA graphs. Every rank calls it."""
    backend = compile_backend(next(model.parameters()).device) if getattr(model, "grpo_cuda_graphs", False) else None
    if backend is None:
        return "eager decode" + (" (--cuda-graphs: none on the CPU unless GRPO_COMPILE_BACKEND is set)"
                                 if getattr(model, "grpo_cuda_graphs", False) else "")
    decode_cache(model, *decode_shape(rows, length))
    how = "CUDA graphs" if backend == "reduce-overhead" else f"torch.compile backend {backend}"
    return (f"compiled decode ({how}; rows rounded up to a power of two, cache length to a multiple of {LENGTH_STEP}, "
            f"at most {DECODE_GRAPHS} graphs)")


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
