"""Peak memory and time of token log-probs + entropy, forward and backward, for one micro-batch: the (N, T, V) float32
implementation ("before", copied below) against the chunked one ("after", grpo.token_logprobs).

Model: a randomly initialised Qwen2 with Qwen2.5-0.5B's vocabulary (151,936), width (896), heads and MLP and a tied
head, but only --layers blocks, in float32 on the CPU. Batch: N × (P + T) left-padded prompts and completions, as the
trainer builds them; the loss is Σ A·logp, so every parameter gets its gradient.

Each variant runs in a fresh process: one small warm-up pass, gradients dropped, then RSS is read, the kernel's peak
RSS counter is reset (/proc/self/clear_refs, Linux) and one pass runs; printed: peak RSS − RSS before the pass
(what the pass added: activations, logits, the gradients themselves) and its wall time; then before / after.

    python benchmarks/bench_logprobs.py                   # 8 × (64 + 768), V = 151,936, 1 layer: needs ~19 GiB
    python benchmarks/bench_logprobs.py --variants after  # the chunked one alone
    python benchmarks/bench_logprobs.py --variants after --chunk-mib 64 --layers 2
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import loading  # noqa: E402
import logprobs  # noqa: E402


@dataclass
class Config:
    """Peak RSS and time of token log-probs + entropy, forward and backward, (N, T, V) logits vs chunked."""
    n: int = field(default=8, metadata={"help": "sequences in the micro-batch"})
    prompt_len: int = field(default=64, metadata={"help": "prompt tokens per sequence"})
    completion_len: int = field(default=768, metadata={"help": "completion tokens per sequence"})
    vocab: int = field(default=151_936, metadata={"help": "vocabulary size (Qwen2.5's by default)"})
    layers: int = field(default=1, metadata={"help": "transformer blocks of the random Qwen2"})
    variants: str = field(default="before,after", metadata={"help": "comma-separated: before, after"})
    chunk_mib: int = field(default=0, metadata={"help": "after: float32 logits per chunk in MiB (0: "
                                                         "logprobs.CHUNK_BYTES)"})


def token_logprobs_before(model, input_ids, attention_mask, n_completion: int, temperature: float,
                          with_entropy: bool = False):
    """grpo.token_logprobs before issue 21: (N, T, V) float32 logits, a full softmax for the entropy."""
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


VARIANTS = {"before": token_logprobs_before, "after": grpo.token_logprobs}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def batch(n: int, prompt_len: int, completion_len: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, prompt_len + completion_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):  # uneven left padding
        mask[i, : 8 * i] = 0
    return ids * mask, mask, torch.randn(n, generator=g)


def one_pass(model, fn, ids, mask, adv, completion_len: int) -> None:
    logp, _ = fn(model, ids, mask, completion_len, 0.7, with_entropy=True)  # the entropy as the first GR pass does
    (-(adv[:, None] * logp).sum()).backward()


def measure(args: Config, variant: str) -> dict:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).float()
    if args.chunk_mib:
        logprobs.CHUNK_BYTES = args.chunk_mib * 2**20
    fn = VARIANTS[variant]
    one_pass(model, fn, *batch(2, 4, 8, args.vocab), 8)  # warm-up: lazy initialisation of kernels and libraries
    model.zero_grad(set_to_none=True)
    ids, mask, adv = batch(args.n, args.prompt_len, args.completion_len, args.vocab)
    rss = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    t0 = time.perf_counter()
    one_pass(model, fn, ids, mask, adv, args.completion_len)
    seconds = time.perf_counter() - t0
    return {"peak_gib": (status_kib("VmHWM") - rss) / 2**20, "seconds": seconds}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # internal: one variant in this process, JSON out
        args = Config(**json.loads(sys.argv[2]))
        print(json.dumps(measure(args, os.environ["BENCH_VARIANT"])))
        return
    args = loading.parse_config(Config)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        loading.fail(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    print(f"{args.n} x ({args.prompt_len} + {args.completion_len}) tokens, V = {args.vocab:,}, d 896, "
          f"{args.layers} layers, tied head, float32, forward + backward with entropy, "
          f"{(args.chunk_mib or logprobs.CHUNK_BYTES >> 20)} MiB chunks; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    results = {}
    for v in variants:  # a fresh process each: peak RSS is per process
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(asdict(args))], check=True,
                             capture_output=True, text=True, env={**os.environ, "BENCH_VARIANT": v})
        results[v] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{v:<7} peak RSS +{results[v]['peak_gib']:6.2f} GiB   {results[v]['seconds']:7.2f} s", flush=True)
    if len(results) == 2:
        b, a = results["before"], results["after"]
        print(f"before / after: memory {b['peak_gib'] / a['peak_gib']:.1f}x, time {b['seconds'] / a['seconds']:.2f}x")


if __name__ == "__main__":
    main()
