"""Benchmark one RL update (plain / KL / GR) and rollout generation (generation.generate vs HF `model.generate`).

Same model, same fixed batch, one run; the variants alternate (plain, kl, gr, plain, kl, gr, ...) so drift
(other load, thermals) hits them alike. Reported: medians, ratios of medians to plain (updates) or to HF
(generation), the median of per-repeat paired ratios, and the same for process CPU time, which on a shared
CPU machine is steadier than wall time (it leaves out time spent descheduled). Every update runs the real
code path, `grpo.train_step` with Adam on a batch built like tests/tiny.py `rollout_batch` (left-padded
prompts, right-padded completions); the kl variant times `grpo.reference_logprobs` too. Generation runs as the
trainer's does, on `generation.rollout_model` (the --gen-dtype replica of the policy, or the policy itself), with the
same prompts and sampling distribution (temperature, top_k 0, top_p 1) for every variant, all forced to emit
exactly the requested number of tokens (no EOS). --gens picks the variants: ours (`generation.generate`: static KV
cache, eager), graphed (the same with the compiled decode step, the trainer's --cuda-graphs: CUDA graphs on CUDA,
GRPO_COMPILE_BACKEND's backend on any device), hf (HF `generate`: its DynamicCache, eager) and hf_static (HF
`generate` with a static cache and `torch.compile`, the best HF offers: CUDA graphs on GPU; on CPU a long compile).
Printed per variant:
tok/s, ms per decode step, and with --bandwidth-gbs the share of the memory-bandwidth bound (every decode step reads
the weights and the KV cache once).
Setup is the trainer's: `distributed.init_distributed()` and, on CPU, `distributed.keep_freed_memory()` (glibc keeps
freed memory) exactly as in training.

Peak memory of each update (one extra, untimed call each): on CUDA `torch.cuda.max_memory_allocated`;
on CPU the tensor-byte counter of c10's CPU allocator, read from `torch.profiler(profile_memory=True)`
("Total Allocated" of its `[memory]` events). Both count live tensor bytes relative to the start of the
update (not allocator caches, not Python objects), so GR's extra = peak(gr) - peak(plain) compares directly
with the budget, one fp32 copy of the gradients + one copy of the perturbed block parameters + what the first pass
keeps for the second, O(batch) bytes (its fp32 log-probs, one per token, and a few scalars). In one process
the CPU count is exact (it returns to 0 after each step). Under FSDP on gloo some frees run on gloo's
threads, which the profiler does not see, so there the CPU number is only an upper bound (flagged).

Commands (from the repository root; --threads 1 is the default, see its help):
    python benchmarks/bench_step.py                                   # ~1M and ~10M Qwen2 on CPU, < 3 min on 2 cores
    torchrun --nproc_per_node=2 benchmarks/bench_step.py              # FSDP2 (gloo on CPU, nccl on GPUs)
    python benchmarks/bench_step.py --model Qwen/Qwen2.5-0.5B-Instruct --gen-dtype bfloat16 --n-seqs 64 \
        --prompt-len 256 --completion-len 512 --gen-shape 256x128+768 --gens ours,graphed,hf,hf_static \
        --bandwidth-gbs 4800                                                      # GPU
    python benchmarks/bench_step.py --sizes 1.5b --gen-only --gens graphed --gen-dtype bfloat16 \
        --gen-shape 128x256+1024 --bandwidth-gbs 4800                # rollouts alone, a Qwen2.5-1.5B shape

Model sizes (random init, built from configs, untied head, exact parameter counts):
    tiny  vocab 48,   d 32,  4 layers, MLP 64:      40,480 params (37,376 in blocks; for the test)
    1m    vocab 1024, d 128, 4 layers, MLP 384:  1,050,752 params (788,480 in blocks)
    10m   vocab 8192, d 256, 8 layers, MLP 768: 10,494,208 params (6,299,648 in blocks)
    30m, 100m (gr_precision.py's ladder); 0.5b, 1.5b: the shapes of Qwen2.5-0.5B and -1.5B (tied head)
"""

import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed  # noqa: E402
import generation  # noqa: E402
import grpo  # noqa: E402
import loading  # noqa: E402
from gr import block_parameters, local_shard  # noqa: E402

SIZES = {  # Qwen2Config kwargs (untied head unless the size says otherwise); benchmarks/gr_precision.py uses them too
    "tiny": dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "1m": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2),
    "10m": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4),
    "30m": dict(vocab_size=16384, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2),
    "100m": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=2),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,  # Qwen2.5-0.5B
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,  # Qwen2.5-1.5B
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
}
UPDATES = ("plain", "kl", "gr")  # ratios are to plain
GENS = ("ours", "graphed", "hf", "hf_static")  # ratios are to hf (else to the first timed)


@dataclass
class Config:
    """Benchmark plain / KL / GR updates and rollout generation (ours vs HF generate)."""
    sizes: str = field(default="1m,10m", metadata={"help": "comma-separated built-in sizes: tiny, 1m, 10m (ignored with --model)"})
    model: str = field(default="", metadata={"help": "HF id or local path of a real model (from_pretrained) instead of --sizes"})
    dtype: str = field(default="float32", metadata={"help": "parameter (master weight) dtype", "choices": ["float32", "bfloat16"]})
    gen_dtype: str = field(default="float32", metadata={"help": "compute dtype of generation, as the trainer's --dtype "
                                                               "(bfloat16: autocast)", "choices": ["float32", "bfloat16"]})
    update_dtype: str = field(default="float32", metadata={"help": "compute dtype of the update passes, as the trainer's "
                                                                  "--update-dtype", "choices": ["float32", "bfloat16"]})
    device: str = field(default="", metadata={"help": "cpu / cuda; default: cuda if available (the rank's GPU under torchrun)"})
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads; 0 = torch's default. 1 keeps CPU numbers "
                                                     "steady on a shared machine: OpenMP threads stall when a core is busy"})
    n_seqs: int = field(default=16, metadata={"help": "sequences in the step, all ranks together (split evenly)"})
    prompt_len: int = field(default=32, metadata={"help": "prompt tokens (left-padded)"})
    completion_len: int = field(default=64, metadata={"help": "completion tokens (right-padded) in the update batch"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward"})
    gen_tokens: int = field(default=0, metadata={"help": "tokens each rollout generates (0: --completion-len)"})
    gen_shape: str = field(default="", metadata={"help": "generation shape NxP+T, e.g. 256x128+768: sequences per rank "
                                                         "x (prompt + new tokens); default the update batch's"})
    gen_only: bool = field(default=False, metadata={"help": "time generation only (no update variants)"})
    gens: str = field(default="ours,hf,hf_static", metadata={
        "help": "comma-separated generation variants: ours (static cache, eager), graphed (ours with the compiled "
                "decode step: CUDA graphs; elsewhere only with GRPO_COMPILE_BACKEND), hf (HF generate, eager; the "
                "ratios' reference when timed, else the first), "
                "hf_static (HF generate, static cache + torch.compile)"})
    bandwidth_gbs: float = field(default=0.0, metadata={"help": "device memory bandwidth in GB/s (H200 ~4800, H100 "
                                                                "~3350): prints each variant's share of that bound"})
    repeats: int = field(default=5, metadata={"help": "timed repeats of each variant (alternating); medians reported"})
    warmup: int = field(default=1, metadata={"help": "untimed repeats of each variant first"})
    memory: bool = field(default=True, metadata={"help": "measure peak memory of each update variant (one extra untimed call each)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (and logprob temperature)"})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient of the kl variant"})
    gamma: float = field(default=1e-3, metadata={"help": "GR strength"})
    eps: float = field(default=1e-3, metadata={"help": "GR finite-difference step"})
    lr: float = field(default=1e-6, metadata={"help": "Adam learning rate (tiny: the benchmark updates on one batch repeatedly)"})
    seed: int = field(default=0, metadata={"help": "seed for weights, batch and sampling"})


# ----------------------------------------------------------------------------- setup

def log(*args):
    if distributed.is_main():
        print(*args, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    if os.path.exists("/proc/cpuinfo"):
        return next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                    platform.processor())
    return platform.processor()


def machine(device) -> str:
    """The first line of a measurement: versions, CPU and its load, torch threads, GPU."""
    import transformers
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    load = " load average %.2f %.2f %.2f," % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
            f"CPU {cpu_name()} ({os.cpu_count()} cores),{load} torch threads {torch.get_num_threads()}, GPU {gpu}")


def qwen2(size: str, seed: int):
    """A Qwen2 of a built-in size with the model's own random init (HF's, std 0.02), fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{"tie_word_embeddings": False, **SIZES[size]}, max_position_embeddings=4096,
                                        attn_implementation="sdpa", bos_token_id=2, eos_token_id=1, pad_token_id=0))


def build_model(cfg: Config, size: str, device):
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, cfg.dtype)
    model = (AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype) if cfg.model else
             qwen2(size, cfg.seed).to(dtype))
    return model.to(device).eval()  # as loading.load_model: no dropout in RL


def random_batch(n: int, P: int, T: int, vocab: int, seed: int, group: int = 4) -> dict:
    """A batch as the trainer builds it (tests/tiny.py `rollout_batch`), on the CPU: left-padded prompts (uneven),
    right-padded completions (uneven lengths), Dr.GRPO advantages of uniform rewards in groups of `group`."""
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, vocab, (n, P), generator=g)
    prompt_mask = torch.ones(n, P, dtype=torch.long)
    completion = torch.randint(3, vocab, (n, T), generator=g)
    completion_mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        pad = (i * 5) % max(P // 2, 1)
        prompt_mask[i, :pad], prompt[i, :pad] = 0, 0
        completion_mask[i, T - (i * 7) % max(T // 2, 1):] = 0
    completion = completion * completion_mask
    adv = grpo.group_advantages(torch.rand(n, generator=g), group if n % group == 0 else 1)
    return {"input_ids": torch.cat([prompt, completion], 1), "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
            "completion_mask": completion_mask, "advantages": adv}


def make_batch(cfg: Config, vocab: int, rank: int, world: int, device):
    """This rank's share of the global random batch."""
    share = slice(rank * cfg.n_seqs // world, (rank + 1) * cfg.n_seqs // world)
    batch = random_batch(cfg.n_seqs, cfg.prompt_len, cfg.completion_len, vocab, cfg.seed)
    return {k: v[share].to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- the variants

def update(name, cfg: Config, model, ref, opt, batch):
    """One optimizer step of the trainer (phases 5-6), with its reference forward for kl."""
    with distributed.autocast(batch["input_ids"].device, cfg.update_dtype):
        if name == "kl":
            batch = dict(batch, ref_logp=grpo.reference_logprobs(ref, batch, cfg.temperature, cfg.micro_batch_size))
        return grpo.train_step(model, opt, batch, reg="none" if name == "plain" else name,
                               temperature=cfg.temperature, normalizer=batch["input_ids"].shape[0] * cfg.completion_len,
                               micro_batch_size=cfg.micro_batch_size, beta=cfg.beta, gamma=cfg.gamma, eps=cfg.eps)


@torch.no_grad()
def generate(name, cfg: Config, model, ids, mask, n_new: int, seed: int, rank: int):
    """(N, n_new) sampled tokens from the rollout model. The EOS id is out of the vocabulary, so every rollout runs to
    the limit. A rollout model that is the fp32 policy itself generates under --gen-dtype autocast, as in training."""
    no_eos = model.config.vocab_size + 7
    autocast = next(model.parameters()).dtype == torch.float32 and cfg.gen_dtype != "float32"
    with distributed.autocast(ids.device, cfg.gen_dtype if autocast else "float32"):
        if name in ("ours", "graphed"):
            model.grpo_cuda_graphs = name == "graphed"  # what generation.rollout_model(..., cuda_graphs=) marks
            generator = distributed.step_generator(seed, 0, rank, ids.device)
            out, _ = generation.generate(model, ids, mask, max_new_tokens=n_new, eos_token_ids=[no_eos], pad_token_id=0,
                                         temperature=cfg.temperature, generator=generator)
            return out
        from transformers import CompileConfig, GenerationConfig
        torch.manual_seed(seed)
        static = dict(cache_implementation="static", compile_config=CompileConfig(
            fullgraph=True, mode="reduce-overhead" if ids.device.type == "cuda" else "default"))
        if ids.device.type == "cpu":
            static["compile_config"]._compile_all_devices = True  # HF compiles on CPU only when told to
        gc = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=n_new,
                              min_new_tokens=n_new, eos_token_id=None, pad_token_id=0, bos_token_id=None,
                              **(static if name == "hf_static" else {}))
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        distributed.reshard(model)  # FSDP2 leaves the root gathered after a forward with no backward
        return out[:, ids.shape[1]:]


def gen_prompts(cfg: Config, vocab: int, batch: dict, device):
    """(N, P) prompt ids and mask: the update batch's prompts, or --gen-shape's (random, uneven left padding)."""
    if not cfg.gen_shape:
        return batch["input_ids"][:, :cfg.prompt_len], batch["attention_mask"][:, :cfg.prompt_len], None
    n, rest = cfg.gen_shape.split("x")
    n, P, T = int(n), *(int(x) for x in rest.split("+"))
    g = torch.Generator().manual_seed(cfg.seed + 2)
    ids = torch.randint(3, vocab, (n, P), generator=g)
    mask = (torch.arange(P)[None] >= (torch.arange(n)[:, None] * 5) % max(P // 4, 1)).long()  # uneven left padding
    return (ids * mask).to(device), mask.to(device), T


def bound_tok_s(model, n: int, prompt_len: int, n_new: int, bandwidth_gbs: float) -> float:
    """Tokens/s if every decode step only read the weights and the (on average half-grown) KV cache once."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * elem
    kv = n * c.num_hidden_layers * 2 * kv_heads * head_dim * elem * (prompt_len + n_new / 2)
    return n / ((weights + kv) / (bandwidth_gbs * 1e9))


# ----------------------------------------------------------------------------- measurement

def timed(fn, device):
    """(wall seconds, this process's CPU seconds). CPU time ignores time spent descheduled, which on a shared CPU
    machine is most of the noise; for one thread it is the work done (GPU: use wall)."""
    distributed.barrier()  # ranks start together, so no rank's time includes waiting for another's previous call
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def alternate(variants: dict, cfg: Config, device) -> dict:
    """name -> [(wall, cpu)] per timed repeat; variants run in turn (a, b, c, a, b, c, ...) after the warmup.
    variants: name -> fn(repeat)."""
    samples = {name: [] for name in variants}
    for r in range(cfg.warmup + cfg.repeats):
        for name, fn in variants.items():
            t = timed(lambda: fn(r), device)
            if r >= cfg.warmup:
                samples[name].append(t)
    return samples


@contextmanager
def quiet_stderr():
    """The profiler prints start/stop lines and an allocator warning on fd 2; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, device) -> tuple[int, bool]:
    """Peak tensor bytes allocated by `fn()` above what was live when it started (this rank), and whether that
    count is exact (False: an upper bound)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start, True
    from torch.profiler import ProfilerActivity, profile
    with tempfile.TemporaryDirectory() as tmp, quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    # c10's CPU allocator counts bytes allocated since profiling began minus those freed again; frees of blocks
    # allocated before are not subtracted, so this can only overstate the live delta
    totals = [e["args"]["Total Allocated"] for e in sorted(events, key=lambda e: e.get("ts", 0))
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    # a step frees all it allocates; a nonzero end means frees ran on threads the profiler misses (gloo's)
    return max(totals, default=0), not totals or totals[-1] == 0


def held_bytes(nbytes: int, device) -> int:
    """Bytes the allocator holds for a tensor of `nbytes`: CUDA's caching allocator rounds every block up to 512 B
    (so a tiny model's budget is mostly rounding); the CPU counter counts exact bytes."""
    return -(-nbytes // 512) * 512 if device.type == "cuda" else nbytes


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(samples: dict, ref: str, per: float = 1.0, inverse: bool = False) -> dict:
    """samples: name -> list of (wall, cpu) per repeat. Medians, ratios of medians to `ref`, and the median of
    the per-repeat paired ratios (repeat r of a variant against repeat r of `ref`: robust to slow drift).
    inverse: report rates (per / seconds) and ratios as rate / ref rate."""
    out = {}
    for name, xs in samples.items():
        row = {}
        for i, kind in enumerate(("wall", "cpu")):
            mine, base = [x[i] for x in xs], [x[i] for x in samples[ref]]
            m, b = median(mine), median(base)
            row[kind] = per / m if inverse else m
            row[kind + "_ratio"] = b / m if inverse else m / b
            row[kind + "_paired"] = median([y / x if inverse else x / y for x, y in zip(mine, base)])
        row["all_wall"] = [x[0] for x in xs]
        out[name] = row
    return out


def mib(b):
    return f"{b / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------- one size

def bench(cfg: Config, size: str, rank: int, world: int, device) -> dict:
    model = build_model(cfg, size, device)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    n_block = sum(p.numel() for p in block_parameters(model))
    model, ref = distributed.shard(model), distributed.shard(ref)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batch = make_batch(cfg, model.config.vocab_size, rank, world, device)
    n_local, n_new = batch["input_ids"].shape[0], cfg.gen_tokens or cfg.completion_len
    name = cfg.model or size
    log(f"\n=== {name}: {n_params:,} params ({n_block:,} in blocks), {cfg.dtype} weights, {cfg.update_dtype} updates, "
        f"{cfg.gen_dtype} generation, {device}, world {world}; "
        f"batch {n_local}x({cfg.prompt_len}+{cfg.completion_len}) per rank, micro-batch {cfg.micro_batch_size}; "
        f"generate {n_local}x{n_new} tokens per rank")

    updates = {u: (lambda r, u=u: update(u, cfg, model, ref, opt, batch)) for u in UPDATES if not cfg.gen_only}
    samples = alternate(updates, cfg, device)
    mem = {u: peak_bytes(lambda: fn(0), device) for u, fn in updates.items()} if cfg.memory and updates else {}

    rollout = generation.rollout_model(model, getattr(torch, cfg.gen_dtype))
    prompt_ids, prompt_mask, shape_new = gen_prompts(cfg, model.config.vocab_size, batch, device)
    n_gen, n_new = prompt_ids.shape[0], shape_new or n_new
    log(f"generation: {n_gen}x({prompt_ids.shape[1]}+{n_new}) per rank on "
        f"{'a ' + cfg.gen_dtype + ' replica' if rollout is not model else 'the policy'}")

    def gen(g, r):  # the same prompts for every variant; a new sampling seed each repeat
        out = generate(g, cfg, rollout, prompt_ids, prompt_mask, n_new, seed=cfg.seed + r, rank=rank)
        assert out.shape == (n_gen, n_new), (g, tuple(out.shape))
    gens = [g for g in cfg.gens.split(",") if g != "graphed" or generation.compile_backend(device)]
    gsamples = alternate({g: (lambda r, g=g: gen(g, r)) for g in gens}, cfg, device)
    gen_ref = "hf" if "hf" in gens else gens[0]

    trainable = [p for p in model.parameters() if p.requires_grad]
    res = {"size": name, "params": n_params, "block_params": n_block,
           "updates": summarize(samples, "plain"), "gen_ref": gen_ref,
           "gens": summarize(gsamples, gen_ref, per=n_gen * n_new * world, inverse=True), "n_new": n_new,
           "bound": bound_tok_s(rollout, n_gen * world, prompt_ids.shape[1], n_new, cfg.bandwidth_gbs)
                    if cfg.bandwidth_gbs else 0.0,
           "mem": {u: b for u, (b, _) in mem.items()}, "mem_exact": all(exact for _, exact in mem.values()),
           # GR's budget on this rank: one fp32 copy of the gradients + one copy of the perturbed block parameters,
           # and O(batch) bytes: the first pass's fp32 log-probs (one per token, kept for the second pass) and a few
           # scalars (its loss, the g1 norm; 4 KiB, CUDA rounds each to 512 B)
           "budget": {"grads_fp32": sum(held_bytes(local_shard(p.detach()).numel() * 4, device) for p in trainable),
                      "block_params": sum(held_bytes(local_shard(p.detach()).numel() * p.element_size(), device)
                                          for p in block_parameters(model)),
                      "batch": 4 * n_local * cfg.completion_len + 4096}}
    report(res)
    return res


def report(res: dict):
    mem, ref = res["mem"], res["gen_ref"]
    if res["updates"]:
        log(f"{'update':<9}{'wall ms':>9}{'/plain':>8}{'paired':>8}{'cpu ms':>9}{'/plain':>8}{'peak mem':>12}{'extra':>12}"
            f"   wall ms per repeat")
    for u, r in res["updates"].items():
        m = f"{mib(mem[u]):>12}{mib(mem[u] - mem['plain']):>12}" if mem else ""
        log(f"{u:<9}{1e3 * r['wall']:9.1f}{r['wall_ratio']:7.3f}x{r['wall_paired']:7.3f}x{1e3 * r['cpu']:9.1f}"
            f"{r['cpu_ratio']:7.3f}x{m}   {[round(1e3 * x, 1) for x in r['all_wall']]}")
    log(f"{'generate':<14}{'tok/s':>8}{'/' + ref:>8}{'paired':>8}{'tok/cpu-s':>10}{'/' + ref:>8}{'ms/step':>9}"
        f"{'of bound':>10}")
    for g, r in res["gens"].items():
        share = f"{r['wall'] / res['bound']:9.1%}" if res["bound"] else ""
        log(f"{g:<14}{r['wall']:8.0f}{r['wall_ratio']:7.3f}x{r['wall_paired']:7.3f}x{r['cpu']:10.0f}{r['cpu_ratio']:7.3f}x"
            f"{1e3 * median(r['all_wall']) / res['n_new']:9.2f}{share:>10}")
    if res["bound"]:
        log(f"memory-bandwidth bound: {res['bound']:.0f} tok/s")
    if mem:
        b, extra = res["budget"], mem["gr"] - mem["plain"]
        budget = sum(b.values())
        log(f"GR extra memory (peak gr - peak plain) {extra:,} B vs budget {budget:,} B = fp32 grads "
            f"{b['grads_fp32']:,} + block params {b['block_params']:,} + first-pass log-probs and scalars "
            f"{b['batch']:,}: "
            f"{'within' if extra <= budget else 'OVER'} budget")
        if not res["mem_exact"]:
            log("  (CPU count is an upper bound here: frees made on other threads, e.g. gloo's under FSDP, are not "
                "seen; measure FSDP memory on CUDA)")


def summary(results: list[dict]):
    log("\n=== summary: medians over repeats; x = ratio of medians (wall | process CPU time); "
        "update vs plain, generation vs HF generate (or the first variant timed)")
    for res in results:
        mem, b = res["mem"], res["budget"]
        for u, r in res["updates"].items():
            extra = f"  extra mem {mem[u] - mem['plain']:>12,} B" if mem else ""
            log(f"{res['size']:>6} update {u:<13}{1e3 * r['wall']:9.1f} ms  {r['wall_ratio']:6.3f}x | "
                f"{r['cpu_ratio']:6.3f}x plain{extra}")
        if mem:
            log(f"{res['size']:>6} GR memory budget {sum(b.values()):>39,} B (fp32 grads + block params + "
                "first-pass log-probs and scalars)")
        for g, r in res["gens"].items():
            log(f"{res['size']:>6} generate {g:<11}{r['wall']:9.0f} tok/s {r['wall_ratio']:5.3f}x | {r['cpu_ratio']:6.3f}x "
                f"{res['gen_ref']}  {1e3 * median(r['all_wall']) / res['n_new']:8.2f} ms/step")


def main(argv=None):
    cfg = loading.parse_config(Config, argv)
    unknown = [g for g in cfg.gens.split(",") if g not in GENS]
    if unknown or not cfg.gens:
        loading.fail(f"--gens: unknown {unknown or 'empty'}; choose from {list(GENS)}")
    # the trainer's setup: process group under torchrun and, on CPU, distributed.keep_freed_memory (glibc keeps freed
    # memory), which changes update times (GR's most: its peak is highest), so the benchmark must run with it too
    rank, world, device = distributed.init_distributed()
    kept = device.type == "cpu" and distributed.keep_freed_memory()
    if cfg.device and not (cfg.device == "cuda" and world > 1):  # under torchrun each rank keeps its own GPU
        device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    distributed.seed_everything(cfg.seed)
    log(f"{machine(device)}, world {world}; keep_freed_memory {'on' if kept else 'off'}")
    log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    sizes = [cfg.model] if cfg.model else [s for s in cfg.sizes.split(",") if s]
    results = [bench(cfg, s, rank, world, device) for s in sizes]
    summary(results)
    distributed.finish_distributed()
    return results


if __name__ == "__main__":
    main()
