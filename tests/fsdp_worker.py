"""Runs a few GR steps and KL + reset steps on a tiny Qwen2, as 1 process or under torchrun (FSDP2).

Usage: [torchrun --nproc_per_node=2] tests/fsdp_worker.py OUT_DIR [float32|float64]. Writes OUT_DIR/result.pt (rank 0):
final parameters, per-step metrics, greedy completions; and a checkpoint under OUT_DIR/ckpt.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo  # noqa: E402
from tiny import VOCAB, rollout_batch, tiny_model  # noqa: E402

N_GLOBAL, T, MICRO = 8, 7, 2


def main(out: Path, dtype: torch.dtype):
    rank, world, device = grpo.init_distributed()
    model, ref = grpo.shard(tiny_model(seed=0, dtype=dtype)), grpo.shard(tiny_model(seed=0, dtype=dtype))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    share = slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
    metrics = []
    plan = [("gr", False)] * 3 + [("reset", False), ("reset", True), ("reset", False)]
    for step, (reg, reset_now) in enumerate(plan):
        batch = {k: v[share] for k, v in rollout_batch(n=N_GLOBAL, completion_len=T, group=4, seed=step).items()}
        batch["advantages"] = batch["advantages"].to(dtype)
        if reg == "reset":
            if reset_now:
                grpo.reset_reference(ref, model)
            batch["ref_logp"] = grpo.reference_logprobs(ref, batch, 0.7, MICRO)
        metrics.append(grpo.train_step(model, opt, batch, reg=reg, temperature=0.7, normalizer=batch["input_ids"].shape[0] * T,
                                       micro_batch_size=MICRO, beta=0.3, gamma=0.1, eps=1e-3, step=step))

    # generation: rank 0 stops at once (every token is EOS), rank 1 runs to the length limit
    prompts = rollout_batch(n=N_GLOBAL, completion_len=1, group=4, seed=99)
    ids, mask = prompts["input_ids"][share, :5], prompts["attention_mask"][share, :5]
    uneven, _ = grpo.generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, temperature=0,
                              eos_token_ids=range(VOCAB) if rank == 0 else [VOCAB + 1])
    greedy, greedy_mask = grpo.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0, temperature=0,
                                        eos_token_ids=[3])
    gathered = [torch.zeros_like(greedy) for _ in range(world)]
    if world > 1:
        torch.distributed.all_gather(gathered, greedy)
    else:
        gathered = [greedy]

    ckpt = grpo.save_checkpoint(out / "ckpt", len(plan), model, opt, _tokenizer())
    params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"params": params, "metrics": metrics, "uneven_len": uneven.shape[1],
                    "greedy": torch.cat(gathered), "ckpt": str(ckpt)}, out / "result.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))


if __name__ == "__main__":
    main(Path(sys.argv[1]), getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "float32"))
