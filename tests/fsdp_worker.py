"""GR and KL + reset steps on tiny Qwen2s (untied and tied head), as 1 process or under torchrun (FSDP2).

Usage: [torchrun --nproc_per_node=N] tests/fsdp_worker.py OUT_DIR [float32|float64]. Writes OUT_DIR/result.pt (rank 0):
per model (untied, tied): final parameters, per-step metrics and the reduce-scatters of each step; the untied run
again, interrupted after step RESUME_AT by a checkpoint that fresh models and a fresh optimizer resume from; one more
GR step with the gradients reduce-scattered after every micro-batch instead of once per pass; a bf16 step through
FSDP2's mixed precision; greedy completions, generation with ranks that stop at different steps, greedy rollouts of an
unsharded replica; a checkpoint under OUT_DIR/ckpt.
"""

import sys
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed  # noqa: E402
import generation  # noqa: E402
import grpo  # noqa: E402
import rundir  # noqa: E402
from tiny import VOCAB, rollout_batch, tiny_model  # noqa: E402

N_GLOBAL, T, MICRO = 8, 7, 2
# (reg, reset the reference first, advantage scale). At scale 30 every clip acts: ‖g1‖ and ‖g2‖ ≈ 35-60 > 10 and the
# final gradient ≈ 40-175 > 1; at scale 1 only the final clip does (‖g1‖ ≈ 1-2, the final gradient ≈ 1.4-5)
PLAN = [("gr", False, 1.0), ("gr", False, 30.0), ("gr", False, 30.0),
        ("reset", True, 1.0), ("reset", False, 30.0), ("reset", False, 30.0)]
RESUME_AT = 4  # after the reset: the resumed run must use the checkpoint's reference/
COLLECTIVES = Counter()  # (name, dtype) -> calls, of FSDP2's all-gathers and reduce-scatters


def counted(name: str, collective):
    def call(*args, **kwargs):
        COLLECTIVES[name, str(kwargs.get("input", args[1] if len(args) > 1 else None).dtype)] += 1
        return collective(*args, **kwargs)
    return call


torch.distributed.reduce_scatter_single = counted("reduce_scatter", torch.distributed.reduce_scatter_single)
torch.distributed.all_gather_single = counted("all_gather", torch.distributed.all_gather_single)


def step_batch(step: int, dtype, scale: float = 1.0) -> dict:
    """This rank's share of step `step`'s global batch."""
    rank, world = distributed.rank_and_world()
    share = slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
    batch = {k: v[share].to(distributed.rank_device()) for k, v in rollout_batch(n=N_GLOBAL, completion_len=T, group=4,
                                                                                  seed=step).items()}
    batch["advantages"] = batch["advantages"].to(dtype) * scale
    return batch


def run(model, ref, opt, steps: range, dtype) -> tuple[list[dict], list[int]]:
    """The PLAN's steps: their metrics and the number of reduce-scatters each made."""
    metrics, reduce_scatters = [], []
    for step in steps:
        reg, reset_now, scale = PLAN[step]
        batch = step_batch(step, dtype, scale)
        if reg == "reset":
            if reset_now:
                grpo.reset_reference(ref, model)
            batch["ref_logp"] = grpo.reference_logprobs(ref, batch, 0.7, MICRO)
        before = sum(n for (name, _), n in COLLECTIVES.items() if name == "reduce_scatter")
        metrics.append(grpo.train_step(model, opt, batch, reg=reg, temperature=0.7, micro_batch_size=MICRO, beta=0.3,
                                       normalizer=batch["input_ids"].shape[0] * T, gamma=0.1, eps=1e-3, step=step))
        reduce_scatters.append(sum(n for (name, _), n in COLLECTIVES.items() if name == "reduce_scatter") - before)
    return metrics, reduce_scatters


def gr_step_grads(model, sync_every_micro_batch: bool) -> dict:
    """The gradient one GR step hands the optimizer (step 1's batch), with FSDP2's reduce-scatter once per pass or, as
    before, after every micro-batch."""
    grads = {}

    class Record(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self):
            for name, p in model.named_parameters():
                grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()

    sync = distributed.gradient_sync
    if sync_every_micro_batch:
        grpo.gradient_sync = lambda model, enabled: sync(model, True)
    batch = step_batch(1, torch.float64, 30.0)
    try:
        grpo.train_step(model, Record(model.parameters()), batch, reg="gr", temperature=0.7, micro_batch_size=MICRO,
                        normalizer=batch["input_ids"].shape[0] * T, gamma=0.1, eps=1e-3)
    finally:
        grpo.gradient_sync = sync
    return grads


def bf16_update(device) -> dict:
    """One KL-free update with bf16 parameters in FSDP2's all-gathers (`shard(..., torch.bfloat16)`) under bf16
    autocast, as --update-dtype bfloat16 runs: its metrics and the dtypes of the collectives it made."""
    model = distributed.shard(tiny_model(seed=0).to(device), torch.bfloat16)
    batch = step_batch(1, torch.float32)
    COLLECTIVES.clear()
    with distributed.autocast(device, "bfloat16"):
        metrics = grpo.train_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), batch, reg="none",
                                  temperature=0.7, micro_batch_size=MICRO, normalizer=batch["input_ids"].shape[0] * T)
    return {"metrics": metrics, "collectives": dict(COLLECTIVES),
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def fresh(tie: bool, dtype):
    device = distributed.rank_device()
    model, ref = (distributed.shard(tiny_model(seed=0, tie=tie, dtype=dtype).to(device)) for _ in range(2))
    return model, ref, torch.optim.Adam(model.parameters(), lr=1e-3)


def main(out: Path, dtype: torch.dtype):
    rank, world, device = distributed.init_distributed()
    result = {}
    for tie in (False, True):
        model, ref, opt = fresh(tie, dtype)
        metrics, reduce_scatters = run(model, ref, opt, range(len(PLAN)), dtype)
        result["tied" if tie else "untied"] = {"params": distributed.full_state_dict(model), "metrics": metrics,
                                               "reduce_scatters": reduce_scatters}
        if not tie:
            untied, untied_opt = model, opt

    # interrupted after RESUME_AT steps; the checkpoint alone (weights, reference/, optimizer state) continues
    model, ref, opt = fresh(False, dtype)
    run(model, ref, opt, range(RESUME_AT), dtype)
    ckpt = rundir.save_checkpoint(out / "resume", RESUME_AT, model, opt, _tokenizer(), ref)
    del model, ref, opt
    load = lambda path: distributed.shard(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device))  # noqa: E731
    model, ref = load(ckpt), load(ckpt / "reference")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = rundir.load_trainer_state(ckpt, model, opt)
    resumed, _ = run(model, ref, opt, range(start, len(PLAN)), dtype)
    result["resumed"] = {"start": start, "params": distributed.full_state_dict(model), "metrics": resumed}

    # gradient sync once per pass == after every micro-batch (as before); FSDP2 mixed precision for the bf16 regimes
    model, _, _ = fresh(False, dtype)
    result["sync_once"], result["sync_every"] = gr_step_grads(model, False), gr_step_grads(model, True)
    result["bf16"] = bf16_update(device)

    # generation: rank 0 stops at once (every token is EOS), the others run to the length limit
    share = slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
    prompts = rollout_batch(n=N_GLOBAL, completion_len=1, group=4, seed=99)
    ids, mask = prompts["input_ids"][share, :5].to(device), prompts["attention_mask"][share, :5].to(device)
    uneven, _ = generation.generate(untied, ids, mask, max_new_tokens=12, pad_token_id=0, temperature=0,
                                    eos_token_ids=range(VOCAB) if rank == 0 else [VOCAB + 1])
    greedy, _ = generation.generate(untied, ids, mask, max_new_tokens=6, pad_token_id=0, temperature=0,
                                    eos_token_ids=[3])
    greedy = distributed.all_gather_rows(greedy, list(range(share.start, share.stop)), N_GLOBAL).long()
    # rollouts from an unsharded replica of the sharded policy: each rank decodes on its own, no collectives
    replica = generation.rollout_model(untied, dtype)
    full = distributed.full_state_dict(untied)  # on rank 0
    replica_exact = rank != 0 or all(torch.equal(v.cpu(), full[k]) for k, v in replica.named_parameters())
    no_eos, _ = generation.generate(replica, ids, mask, max_new_tokens=6, pad_token_id=0, temperature=0,
                                    eos_token_ids=[VOCAB + 1])
    no_eos = distributed.all_gather_rows(no_eos, list(range(share.start, share.stop)), N_GLOBAL).long()
    result["replica"] = {"copy": replica is not untied, "exact": replica_exact, "greedy": no_eos}
    ckpt = rundir.save_checkpoint(out / "ckpt", len(PLAN), untied, untied_opt, _tokenizer())
    if rank == 0:
        torch.save({**result, "uneven_len": uneven.shape[1], "greedy": greedy, "ckpt": str(ckpt)}, out / "result.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))


if __name__ == "__main__":
    main(Path(sys.argv[1]), getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "float32"))
