"""Chunked token log-probs under FSDP2: `torchrun --nproc_per_node=2 tests/logprobs_worker.py OUT.pt` (gloo, CPU).

For an untied and a tied tiny Qwen2 in float64: the full gradients of the Dr.GRPO-style loss −Σ A·logp / (N·T) on
one global batch, (1) in one process on an unsharded model, (2) sharded (`fully_shard` on each block and the root), each
rank on its half of the batch (FSDP2 averages over ranks). Rank 0 writes {head: (single, sharded)}.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import logprobs  # noqa: E402
from grpo import token_logprobs  # noqa: E402
from gr import transformer_blocks  # noqa: E402
from tiny import VOCAB, rollout_batch, tiny_model  # noqa: E402

logprobs.CHUNK_BYTES = 4 * VOCAB * 5  # several chunks per rank


def loss_grads(model, batch) -> dict:
    T = batch["completion_mask"].shape[1]
    logp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], T, 0.7, with_entropy=True)
    loss = -(batch["advantages"][:, None] * logp * batch["completion_mask"]).sum() / logp.numel()
    loss.backward()
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731
    return {k: full(p.grad) for k, p in model.named_parameters()}


def main(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = rollout_batch(n=8, group=4)
    batch["advantages"] = batch["advantages"].double()
    share = {k: v[rank * 8 // world:(rank + 1) * 8 // world] for k, v in batch.items()}
    result = {}
    for tie in (False, True):
        single = loss_grads(tiny_model(tie=tie, dtype=torch.float64, exact=True), batch)
        model = tiny_model(tie=tie, dtype=torch.float64, exact=True)
        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)  # the head's weight (tied or not) belongs to the root
        result["tied" if tie else "untied"] = (single, loss_grads(model, share))
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
