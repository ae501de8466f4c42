"""How much of GR's finite difference (g2 − g1)/ε survives each compute precision of the update passes?

GR (gr.py) perturbs the transformer blocks by ε·g1 and takes the difference of two gradients,
d = (g2 − g1)/ε ≈ H·g1. With ε = 1e-3 the perturbation is far below a weight's bf16 rounding step, so it can
be rounded away. This script measures how much of d each precision keeps, on a Qwen2-shaped model with its
own HF random init (std 0.02, not rescaled) or a real checkpoint, on a random RL batch:

    python benchmarks/gr_precision.py --threads 2                         # tiny, 1m, 10m on CPU, fp64 reference
    python benchmarks/gr_precision.py --threads 2 --sizes 100m            # ~100M params (slow on CPU in fp64)
    python benchmarks/gr_precision.py --sizes 100m --reference float32    # cheaper reference for big models
    python benchmarks/gr_precision.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --reference float32 \
        --batch 8x64+64                                                   # a real model on a GPU

Every number comes from the real code path: `gr.gr_backward` with γ = ε, so on the blocks the gradient it leaves
is g1 + (γ/ε)(clip(g2) − g1) = g2 and d = (grad − g1)/ε, with no clipping (g1_clip = g2_clip = inf: the
measurement is of the finite difference itself), and a closure of `grpo.token_logprobs` + `grpo.dr_grpo_loss`
over a batch built like the trainer's (left-padded prompts, right-padded completions, Dr.GRPO group advantages).
The advantages are scaled so that ‖g1‖ (all parameters, as gr_backward reports it) hits each `--grad-norm`: the
loss is linear in the advantages, so one unscaled reference pass gives the factor. In exact arithmetic d depends
on ε and ‖g1‖ only through the step ε·g1 (d(ε, s·g) = s²·d(s·ε, g)), so the table's rows with equal ε·‖g1‖
measure the same finite difference; its rounding is what differs between modes.

Compute modes (`--modes`; the model's weights are the same fp32 init cast to each dtype):
    float64        weights and compute in fp64 (RMSNorm patched to stay in fp64; RoPE cos/sin stay fp32 constants)
    float32        fp32 weights, fp32 compute
    tf32           fp32 weights, matmuls with TF32 inputs (CUDA only; on CPU it is skipped and the reason printed)
    bf16-autocast  fp32 master weights, bf16 autocast (the trainer's `--update-dtype bfloat16`, distributed.autocast)
    bf16-held      the model cast to bf16 (weights held in bf16, as under DeepSpeed bf16); gr_backward itself adds
                   ε·g1 to the bf16 weights, and the gradients are bf16

Reference (`--reference`): float64 (default; the reference is computed at the SAME ε as each row, so cos and the
norm ratio isolate rounding from finite-difference truncation) or float32 (cheaper, for large models; then the
float32 row is the reference recomputed). `--hvp` adds the exact Hessian-vector product H·g1 (restricted to the
blocks: H_bb·g1_b), by double backward in the reference dtype, which shows truncation + rounding together.

Columns of each table (one table per model size and target ‖g1‖; `reference` is the reference row itself):
    mode, eps     compute mode and ε
    step          ε·‖g1 on the blocks‖, the length of the perturbation
    g1            ‖g1‖ of this mode (gr_backward's g1_norm; the target up to this mode's rounding)
    cos           cosine of this mode's d with the reference's d at the same ε
    ratio         ‖d‖ / ‖d_ref‖ (1 = right length; ≫ 1 = rounding noise dominates)
    cos Hg        cosine of d with H·g1 (with --hvp)
    ratio Hg      ‖d‖ / ‖H·g1‖ (with --hvp)
    changed       share of block weights that the perturbation changes in the precision the forward sees:
                  fp64/fp32 weights: w + ε·g1 ≠ w; bf16 autocast: bf16(w + ε·g1) ≠ bf16(w) for the weights of
                  nn.Linear layers (autocast casts them; norms stay fp32); tf32: the same with TF32 rounding
                  (round-to-nearest to 10 mantissa bits, emulated); bf16-held: the bf16 add changed w
    s             wall seconds of this row (one gr_backward: two forward/backward passes)
A summary at the end repeats cos (ratio) per mode as size × ‖g1‖ × ε grids.

Measured on CPU (the README's "Precision of the finite difference", tiny to the Qwen2.5-0.5B shape): for bf16
autocast what decides is the step ε·‖g1‖, not the model size. It keeps d (cos ≥ 0.99, ratio 1.00 ± 0.02) at ε·‖g1‖ ≈ 1e-2 at every
size, gives cos 0.64–0.86 with ‖d‖ 1.1–1.6× too long at 1e-3, and mostly noise (cos ≤ 0.22) at 1e-4. bf16-held
weights lose more of d the larger the model: at ε·‖g1‖ ≈ 1e-2, cos 0.99 / ratio 0.97 at 40K params but cos 0.62–0.75
/ ratio 0.23 at 100M–0.5B. fp32 keeps cos ≥ 0.9998 against fp64 (tiny to 100m).
"""

import copy
import dataclasses
import math
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed  # noqa: E402
import grpo  # noqa: E402
import loading  # noqa: E402
from bench_step import SIZES, machine, qwen2, random_batch  # noqa: E402
from gr import block_parameters, gr_backward  # noqa: E402

MODES = ("float64", "float32", "tf32", "bf16-autocast", "bf16-held")
GROUP = 4  # rollouts per prompt in the random batch


@dataclass
class Config:
    """Measure GR's finite difference (g2 − g1)/ε under fp32 / TF32 / bf16 autocast / bf16-held weights."""
    sizes: str = field(default="tiny,1m,10m", metadata={"help": "comma-separated built-in sizes: " + ", ".join(SIZES)
                                                                 + " (ignored with --model)"})
    model: str = field(default="", metadata={"help": "local HF dir or hub id of a real model (from_pretrained)"})
    device: str = field(default="", metadata={"help": "cpu / cuda; default: cuda if available"})
    modes: str = field(default="float32,tf32,bf16-autocast,bf16-held",
                       metadata={"help": "comma-separated compute modes: " + ", ".join(MODES)})
    reference: str = field(default="float64", metadata={"help": "dtype of the reference, computed at the same ε",
                                                         "choices": ["float64", "float32"]})
    eps: str = field(default="1e-4,1e-3,1e-2", metadata={"help": "comma-separated ε"})
    grad_norm: str = field(default="0.1,1,10", metadata={"help": "comma-separated targets for ‖g1‖ (advantages scaled)"})
    batch: str = field(default="8x64+64", metadata={"help": "sequences x (prompt + completion) tokens"})
    hvp: bool = field(default=True, metadata={"help": "also compare with the exact H·g1 (double backward, reference dtype)"})
    temperature: float = field(default=0.7, metadata={"help": "logprob temperature, as in training"})
    threads: int = field(default=0, metadata={"help": "torch.set_num_threads (0 = torch's default)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and the batch"})


# ----------------------------------------------------------------------------- model and batch

def build_model(cfg: Config, size: str, device) -> nn.Module:
    """The fp32 master model: a checkpoint, or a built-in size with the model's own random init (std 0.02)."""
    from transformers import AutoModelForCausalLM
    model = (AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32) if cfg.model else
             qwen2(size, cfg.seed).float())
    return model.to(device).eval()  # as loading.load_model: no dropout in RL


def fp64_rms_norm(self, x):
    """HF's RMSNorm without its round trip through fp32, so an fp64 model rounds in fp64 throughout."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def cast_model(master: nn.Module, dtype: torch.dtype) -> nn.Module:
    model = copy.deepcopy(master).to(dtype)
    if dtype == torch.float64:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = types.MethodType(fp64_rms_norm, m)
    return model


def parse_batch(spec: str) -> tuple[int, int, int]:
    """'8x64+64' -> (sequences, prompt tokens, completion tokens)."""
    try:
        n, rest = spec.lower().split("x")
        p, t = rest.split("+")
        return int(n), int(p), int(t)
    except ValueError:
        raise SystemExit(f"--batch {spec!r}: expected SEQUENCESxPROMPT+COMPLETION, e.g. 8x64+64") from None


def make_batch(n: int, P: int, T: int, vocab: int, seed: int, device) -> dict:
    """A random batch as the trainer builds it (bench_step.py's `random_batch`), on `device`."""
    return {k: v.to(device) for k, v in random_batch(n, P, T, vocab, seed, GROUP).items()}


# ----------------------------------------------------------------------------- compute modes

@contextmanager
def tf32_matmuls():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # CUDA: fp32 matmuls (and SDPA's) take TF32 inputs
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def weight_dtype(mode: str) -> torch.dtype:
    """The dtype a mode holds the weights in (float32 master weights unless the mode says otherwise)."""
    return {"float64": torch.float64, "bf16-held": torch.bfloat16}.get(mode, torch.float32)


def compute_context(mode: str, device):
    """The autocast / matmul-precision context of a mode's forward and backward."""
    if mode == "bf16-autocast":
        return distributed.autocast(device, "bfloat16")  # the trainer's --update-dtype bfloat16
    if mode == "tf32":
        return tf32_matmuls()
    return nullcontext()


def skip_reason(mode: str, device) -> str:
    if mode == "tf32" and device.type != "cuda":
        return ("TF32 is an input format of NVIDIA tensor cores (Ampere and later); on CPU fp32 matmuls run in full "
                "fp32, so this row would repeat float32")
    return ""


def round_tf32(w: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (10 explicit mantissa bits, ties to even), emulated on the bits."""
    bits = w.float().view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.to(torch.int32).view(torch.float32)


def seen_weights(model: nn.Module, mode: str) -> list[torch.Tensor]:
    """The block weights as the forward sees them: under autocast (TF32) nn.Linear weights and biases enter the
    matmul rounded to bf16 (TF32); everything else, and every weight in the other modes, as stored."""
    linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    cast = {"bf16-autocast": lambda w: w.to(torch.bfloat16), "tf32": round_tf32}.get(mode)
    return [cast(p.detach()) if cast and id(p) in linear else p.detach().clone() for p in block_parameters(model)]


# ----------------------------------------------------------------------------- measurement

def loss_fn(model, batch, advantages, temperature):
    """The trainer's loss on the whole batch (one micro-batch): Dr.GRPO, normalised by N × T."""
    T = batch["completion_mask"].shape[1]
    logp, _ = grpo.token_logprobs(model, batch["input_ids"], batch["attention_mask"], T, temperature)
    return grpo.dr_grpo_loss(logp, advantages, batch["completion_mask"], len(logp) * T)


def flat(tensors) -> torch.Tensor:
    """One fp32 vector (4 bytes a weight: the vectors of a 0.5B model fit; fp32 keeps every digit printed)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def gradient_norm(model, batch, advantages, temperature) -> float:
    """‖∇L‖ over all trainable parameters (what gr_backward reports as g1_norm)."""
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch, advantages, temperature).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()
    model.zero_grad(set_to_none=True)
    return norm


def finite_difference(model, mode: str, batch, advantages, eps: float, temperature: float) -> dict:
    """d = (g2 − g1)/ε on the blocks (subtracted in fp64, then flattened), from gr_backward with γ = ε and no clipping; plus the
    share of block weights the perturbation changed as the forward sees them, and ‖g1‖.

    The closure records g1 after gr_backward's first call (φ) and the seen weights then, and counts at its second
    call (φ + ε·g1) how many seen weights differ; after gr_backward they must equal those at φ again (restored)."""
    blocks = block_parameters(model)
    record, device = {}, batch["input_ids"].device

    def closure():
        if "g1" in record:  # second call: the blocks are perturbed now
            changed = sum((a != b).sum().item() for a, b in zip(seen_weights(model, mode), record["seen"]))
            record["changed"] = changed / sum(p.numel() for p in blocks)
        with compute_context(mode, device):
            loss = loss_fn(model, batch, advantages, temperature)
        loss.backward()
        if "g1" not in record:
            record["g1"] = [p.grad.clone() for p in blocks]
            record["seen"] = seen_weights(model, mode)
        return loss.detach()

    t0 = time.perf_counter()
    stats = gr_backward(model, closure, gamma=eps, eps=eps, g1_clip=math.inf, g2_clip=math.inf)
    if not all(torch.equal(a, b) for a, b in zip(seen_weights(model, mode), record.pop("seen"))):
        raise RuntimeError(f"{mode}, ε = {eps:g}: gr_backward did not restore the block weights")
    # grad = g1 + (γ/ε)(clip(g2) − g1) = g2 on the blocks
    d = flat((p.grad.double() - g1.double()) / eps for p, g1 in zip(blocks, record["g1"]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return {"d": d, "changed": record["changed"], "g1": stats["g1_norm"],
            "step": eps * torch.nn.utils.get_total_norm(record["g1"]).item(), "seconds": seconds}


def hessian_g1(model, batch, advantages, temperature) -> torch.Tensor:
    """H_bb·g1_b, the exact product of the blocks' Hessian with their gradient, by double backward (flattened). H is the Jacobian of φ ↦ g(φ), the function the finite difference differentiates: the Hessian of the
    linear loss −Σ A·log π / (N·T), whose gradient equals dr_grpo_loss's at every φ. (Double backward through
    dr_grpo_loss's ratio exp(log π − sg(log π)) would add −Σ A ∇log π ∇log πᵀ, a term g(φ) does not have, since
    the stop-gradient moves with φ.) SDPA's math kernel: the fused attention kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    blocks = block_parameters(model)
    T = batch["completion_mask"].shape[1]
    with sdpa_kernel(SDPBackend.MATH):
        logp, _ = grpo.token_logprobs(model, batch["input_ids"], batch["attention_mask"], T, temperature)
        loss = -(advantages[:, None] * logp * batch["completion_mask"]).sum() / (len(logp) * T)
        g = torch.autograd.grad(loss, blocks, create_graph=True)
        hg = torch.autograd.grad(g, blocks, grad_outputs=[x.detach() for x in g])
    return flat(hg)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """a·b accumulated in fp64, in chunks (no fp64 copy of a whole 0.5B-weight vector)."""
    return sum((x.double() @ y.double()).item() for x, y in zip(a.split(1 << 24), b.split(1 << 24)))


def compare(d: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine, norm ratio ‖d‖/‖ref‖)."""
    dn, rn = math.sqrt(dot(d, d)), math.sqrt(dot(ref, ref))
    cos = dot(d, ref) / (dn * rn) if dn and rn else float("nan")
    return cos, dn / rn if rn else float("nan")


COLUMNS = f"{'mode':<14}{'eps':>7}{'step':>10}{'g1':>9}{'cos':>8}{'ratio':>9}{'cos Hg':>8}{'ratio Hg':>10}" \
          f"{'changed':>10}{'s':>7}"


def measure_row(mode: str, eps: float, r: dict, ref: torch.Tensor, hg: torch.Tensor | None) -> dict:
    """One table row: r (from finite_difference) compared with the reference d at the same ε and with H·g1."""
    cos, ratio = compare(r["d"], ref)
    hcos, hratio = compare(r["d"], hg) if hg is not None else (float("nan"), float("nan"))
    row = {"mode": mode, "eps": eps, "step": r["step"], "g1": r["g1"], "cos": cos, "ratio": ratio, "cos_hg": hcos,
           "ratio_hg": hratio, "changed": r["changed"], "seconds": r["seconds"]}
    print(f"{mode:<14}{eps:>7.0e}{r['step']:>10.2e}{r['g1']:>9.3g}{cos:>8.4f}{ratio:>9.3f}{hcos:>8.4f}{hratio:>10.3f}"
          f"{100 * r['changed']:>9.3g}%{r['seconds']:>7.1f}", flush=True)
    return row


def run_size(cfg: Config, size: str, device) -> list[dict]:
    """Every (‖g1‖ target, mode, ε) of one model; returns the rows as dicts for the summary."""
    t_size = time.perf_counter()
    master = build_model(cfg, size, device)
    n, P, T = parse_batch(cfg.batch)
    batch = make_batch(n, P, T, master.config.vocab_size, cfg.seed, device)
    epss = [float(e) for e in cfg.eps.split(",")]
    targets = [float(g) for g in cfg.grad_norm.split(",")]
    modes = [m for m in cfg.modes.split(",") if m]
    name = cfg.model or size
    n_params = sum(p.numel() for p in master.parameters())
    n_block = sum(p.numel() for p in block_parameters(master))

    # an fp32 reference runs on the master itself (one model less in memory: a 0.5B model fits on a 24 GB CPU
    # machine); gr_backward leaves it unchanged, as finite_difference checks after every call
    ref_model = master if weight_dtype(cfg.reference) == torch.float32 else cast_model(master, weight_dtype(cfg.reference))
    unit = gradient_norm(ref_model, batch, batch["advantages"], cfg.temperature)
    hg_unit = hessian_g1(ref_model, batch, batch["advantages"], cfg.temperature) if cfg.hvp else None
    print(f"\n=== {name}: {n_params:,} params ({n_block:,} in blocks), batch {n}x({P}+{T}), {device}; "
          f"‖g1‖ at the sampled advantages {unit:.4g} ({cfg.reference})", flush=True)

    results = []
    for target in targets:
        scale = target / unit
        adv = batch["advantages"] * scale
        hg = hg_unit * scale ** 2 if hg_unit is not None else None  # H·g1 is quadratic in the advantage scale
        print(f"\n--- {name}, target ‖g1‖ = {target:g} (advantages × {scale:.4g}); reference {cfg.reference} at the "
              f"same ε" + ("; Hg = exact H·g1 (double backward, " + cfg.reference + ")" if cfg.hvp else ""), flush=True)
        print(COLUMNS, flush=True)
        info, refs = {"size": name, "params": n_params, "target": target}, {}
        for eps in epss:
            r = finite_difference(ref_model, cfg.reference, batch, adv, eps, cfg.temperature)
            refs[eps] = r["d"]
            results.append(measure_row("reference", eps, r, refs[eps], hg) | info)
        for mode in modes:
            if reason := skip_reason(mode, device):
                print(f"{mode:<14}skipped on {device.type}: {reason}", flush=True)
                continue
            model = cast_model(master, weight_dtype(mode))
            for eps in epss:
                r = finite_difference(model, mode, batch, adv, eps, cfg.temperature)
                results.append(measure_row(mode, eps, r, refs[eps], hg) | info)
            del model
        del refs
    print(f"({name}: {time.perf_counter() - t_size:.0f} s)", flush=True)
    return results


def summary(results: list[dict], cfg: Config):
    epss = [float(e) for e in cfg.eps.split(",")]
    print(f"\n=== summary: cos (norm ratio) [share of block weights changed] against the {cfg.reference} reference "
          f"at the same ε; rows: size, target ‖g1‖; columns: ε")
    for mode in dict.fromkeys(r["mode"] for r in results if r["mode"] != "reference"):
        print(f"\n{mode}\n{'size':<8}{'params':>12}{'‖g1‖':>7}" + "".join(f"{e:>28.0e}" for e in epss))
        keys = dict.fromkeys((r["size"], r["params"], r["target"]) for r in results if r["mode"] == mode)
        for size, params, target in keys:
            cells = {r["eps"]: r for r in results if (r["mode"], r["size"], r["target"]) == (mode, size, target)}
            print(f"{size:<8}{params:>12,}{target:>7g}" + "".join(
                f"{c['cos']:>10.4f} ({c['ratio']:>6.3g}) [{100 * c['changed']:>5.3g}%]" if (c := cells.get(e)) else
                f"{'-':>28}" for e in epss))


def main(argv=None):
    cfg = loading.parse_config(Config, argv)
    bad = [m for m in cfg.modes.split(",") if m and m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    sizes = [cfg.model] if cfg.model else [s for s in cfg.sizes.split(",") if s]
    if not cfg.model and (unknown := [s for s in sizes if s not in SIZES]):
        raise SystemExit(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(machine(device))
    print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    print(f"d = (g2 − g1)/ε from gr.gr_backward (γ = ε, no clipping). cos and ratio compare each mode with the "
          f"{cfg.reference} reference computed at the SAME ε: they isolate rounding from finite-difference truncation"
          + (" (which the Hg columns, against the exact H·g1, include)." if cfg.hvp else "."), flush=True)
    t0 = time.perf_counter()
    results = [r for s in sizes for r in run_size(cfg, s, device)]
    summary(results, cfg)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
