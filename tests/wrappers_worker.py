"""gr.gr_backward inside other people's wrappers, as 1 process (the reference) or under torchrun (2 gloo ranks).

Usage: [torchrun --nproc_per_node=2] tests/wrappers_worker.py OUT_DIR. Writes OUT_DIR/result.pt (rank 0): per setup,
the full parameters before the first step and after every step, and every step's norms. One process runs the plain
model; 2 ranks run every wrapper of SETUPS on the same global batch (each rank its half), plus the setups that must be
refused at the first call (their error messages). float64, SGD: any difference in a gradient shows in the parameters at its own scale.
"""

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gr  # noqa: E402
from grpo import dr_grpo_loss, token_logprobs  # noqa: E402
from tiny import rollout_batch, tiny_model  # noqa: E402

N_GLOBAL, T, MICRO, STEPS, LR = 8, 7, 2, 3, 0.05
ADV_SCALE = 300.0  # g1 and g2 above their clip (10) and the GR gradient above the final clip (1) at every step
GR = dict(gamma=0.05, eps=1e-3)
SETUPS = ("ddp_bucket_view", "ddp", "ddp_no_sync", "fsdp1", "fsdp1_flat", "fsdp2", "fsdp2_no_sync")
REFUSED = ("fsdp1_flat_root_only", "deepspeed_zero1", "deepspeed_zero2")  # DeepSpeed: where it is installed


def wrap(model, setup: str):
    cpu = torch.device("cpu")
    block = type(gr.transformer_blocks(model)[0])
    if setup.startswith("ddp"):
        return DDP(model, gradient_as_bucket_view=setup != "ddp", bucket_cap_mb=0.01)  # several buckets
    if setup.startswith("fsdp1"):
        policy = None if setup.endswith("root_only") else ModuleWrapPolicy({block})
        return FSDP1(model, auto_wrap_policy=policy, use_orig_params="flat" not in setup, device_id=cpu)
    if setup.startswith("fsdp2"):
        for b in gr.transformer_blocks(model):
            fully_shard(b)
        return fully_shard(model)
    if setup.startswith("deepspeed"):
        import deepspeed
        config = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": int(setup[-1])},
                  "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_allow_untested_optimizer": True}
        return deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())[0]
    assert setup == "single", setup
    return model


def closure_for(model, batch: dict, no_sync: bool):
    """Forward + backward of the Dr.GRPO loss over the micro-batches; with `no_sync`, gradient accumulation: only the
    last micro-batch's backward reduces (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`)."""
    normalizer = batch["input_ids"].shape[0] * T  # this rank's sequences × T: ranks' mean = the global loss

    def closure():
        total = torch.zeros((), dtype=torch.float64)
        n = batch["input_ids"].shape[0]
        for i in range(0, n, MICRO):
            mb = {k: v[i:i + MICRO] for k, v in batch.items()}
            sync = not no_sync or i + MICRO >= n
            if isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or isinstance(model, FSDPModule) else model.no_sync():
                logp, _ = token_logprobs(model, mb["input_ids"], mb["attention_mask"], T, temperature=0.7)
                loss = dr_grpo_loss(logp, mb["advantages"], mb["completion_mask"], normalizer)
                loss.backward()
            total += loss.detach()
        return total
    return closure


def run(setup: str) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = wrap(tiny_model(seed=0, dtype=torch.float64), setup)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    share = slice(rank * N_GLOBAL // world, (rank + 1) * N_GLOBAL // world)
    params, metrics = [full_params(model)], []
    for step in range(STEPS):
        batch = {k: v[share] for k, v in rollout_batch(n=N_GLOBAL, completion_len=T, group=4, seed=step).items()}
        batch["advantages"] = batch["advantages"].double() * ADV_SCALE
        out = gr.gr_backward(model, closure_for(model, batch, setup.endswith("no_sync")), **GR)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        out["grad_norm"] = gr.clip_(grads, 1.0, gr.shard_group(model)).item()
        loss = out.pop("loss").clone()
        if world > 1:
            dist.all_reduce(loss)
        out["loss"] = loss.item() / world
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics.append(out)
        params.append(full_params(model))
    return {"params": params, "metrics": metrics}


def full_params(model) -> dict:
    """Every parameter, whole, on every rank (copies: in one process and under DDP the state dict is the live
    tensors)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in full.items()}


def refusal(setup: str) -> str:
    model = wrap(tiny_model(seed=0, dtype=torch.float64), setup)
    batch = {k: v[:MICRO] for k, v in rollout_batch(n=N_GLOBAL, completion_len=T, group=4).items()}
    try:
        gr.gr_backward(model, closure_for(model, batch, False), **GR)
    except ValueError as e:
        return str(e)
    return ""


def main(out: Path):
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    result = {s: run(s) for s in (SETUPS if distributed else ("single",))}
    if distributed:
        has_deepspeed = importlib.util.find_spec("deepspeed") is not None  # not a requirement of the project
        result["refused"] = {s: refusal(s) for s in REFUSED if has_deepspeed or not s.startswith("deepspeed")}
    if not distributed or dist.get_rank() == 0:
        torch.save(result, out / "result.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
