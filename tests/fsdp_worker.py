"""GR and KL + reset steps on tiny Qwen2s (untied and tied head), as 1 process or under torchrun (FSDP2).

Usage: [torchrun --nproc_per_node=N] tests/fsdp_worker.py OUT_DIR [float32|float64]. Writes OUT_DIR/result.pt (rank 0):
per model (untied, tied): final parameters and per-step metrics; the untied run again, interrupted after step
RESUME_AT by a checkpoint that fresh models and a fresh optimizer resume from; greedy completions, generation with
ranks that stop at different steps, greedy rollouts of an unsharded replica; a checkpoint under OUT_DIR/ckpt.
"""

import sys
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
PLAN = [("gr", False)] * 3 + [("reset", True), ("reset", False), ("reset", False)]  # (reg, reset the reference first)
RESUME_AT = 4  # after the reset: the resumed run must use the checkpoint's reference/


def run(model, ref, opt, steps: range, dtype) -> list[dict]:
    rank, world = distributed.rank_and_world()
    share = slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
    device = distributed.rank_device()
    metrics = []
    for step in steps:
        reg, reset_now = PLAN[step]
        full_batch = rollout_batch(n=N_GLOBAL, completion_len=T, group=4, seed=step)
        batch = {k: v[share].to(device) for k, v in full_batch.items()}
        batch["advantages"] = batch["advantages"].to(dtype)
        if reg == "reset":
            if reset_now:
                grpo.reset_reference(ref, model)
            batch["ref_logp"] = grpo.reference_logprobs(ref, batch, 0.7, MICRO)
        metrics.append(grpo.train_step(model, opt, batch, reg=reg, temperature=0.7, micro_batch_size=MICRO, beta=0.3,
                                       normalizer=batch["input_ids"].shape[0] * T, gamma=0.1, eps=1e-3, step=step))
    return metrics


def fresh(tie: bool, dtype):
    device = distributed.rank_device()
    model, ref = (distributed.shard(tiny_model(seed=0, tie=tie, dtype=dtype).to(device)) for _ in range(2))
    return model, ref, torch.optim.Adam(model.parameters(), lr=1e-3)


def main(out: Path, dtype: torch.dtype):
    rank, world, device = distributed.init_distributed()
    result = {}
    for tie in (False, True):
        model, ref, opt = fresh(tie, dtype)
        metrics = run(model, ref, opt, range(len(PLAN)), dtype)
        result["tied" if tie else "untied"] = {"params": distributed.full_state_dict(model), "metrics": metrics}
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
    resumed = run(model, ref, opt, range(start, len(PLAN)), dtype)
    result["resumed"] = {"start": start, "params": distributed.full_state_dict(model), "metrics": resumed}

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
