"""The rollout replica's refresh under FSDP2, as the trainer runs it: after an optimizer step on the sharded policy.

Usage: torchrun --nproc_per_node=2 tests/replica_worker.py OUT_DIR. Writes OUT_DIR/rank{R}.json, for tiny Qwen2s (an
untied head with a float32 replica, a tied head with a bfloat16 one, and, sharded with bf16 all-gathers, a bfloat16
and a float32 replica): the collectives one `refresh_rollout_model` ran (calls of torch.distributed's and DTensor's functional collectives), the number
of FSDP units, whether every replica parameter equals the policy parameter's full tensor (gathered on its own, one
`full_tensor()` each) in the replica's dtype, and whether the policy is sharded again.
"""

import collections
import json
import sys
from pathlib import Path

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed  # noqa: E402
import generation  # noqa: E402
import grpo  # noqa: E402
from tiny import rollout_batch, tiny_model  # noqa: E402


CALLS = collections.Counter()  # collective name -> calls, at the entry points FSDP2 and DTensor call through


def counted(name: str, collective):
    def call(*args, **kwargs):
        CALLS[name] += 1
        return collective(*args, **kwargs)
    return call


# counted, not profiled: Kineto's threads in a gloo worker aborted it at exit now and then ("terminate called")
for module in (torch.distributed, funcol):
    for fn in ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_tensor", "all_reduce",
               "reduce_scatter_single", "reduce_scatter_tensor", "broadcast", "barrier", "all_to_all_single"):
        if hasattr(module, fn):
            setattr(module, fn, counted(fn.split("_single")[0].split("_into")[0].split("_tensor")[0],
                                        getattr(module, fn)))


def collectives(fn) -> dict:
    """{collective: count} of the collectives `fn` runs (all-gathers, and any other)."""
    before = CALLS.copy()
    fn()
    return dict(CALLS - before)


def main(out: Path):
    rank, world, device = distributed.init_distributed()
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    result = {}
    for tie, dtype, gathers in ((False, torch.float32, None), (True, torch.bfloat16, None),
                                (False, torch.bfloat16, torch.bfloat16), (False, torch.float32, torch.bfloat16)):
        policy = distributed.shard(tiny_model(tie=tie), param_dtype=gathers)
        opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
        replica = generation.rollout_model(policy, dtype)  # its first refresh: before any forward, as in rl_train
        batch = {k: v[share] for k, v in rollout_batch(n=8, group=4).items()}
        grpo.train_step(policy, opt, batch, reg="none", temperature=1.0, normalizer=56, micro_batch_size=4)
        seen = collectives(lambda: generation.refresh_rollout_model(replica, policy))
        resharded = all(isinstance(p, DTensor) for p in policy.parameters())
        with torch.no_grad():
            params = dict(replica.named_parameters())
            exact = all(torch.equal(params[n], p.full_tensor().to(dtype)) for n, p in policy.named_parameters())
        result[f"{'tied' if tie else 'untied'} {str(dtype)[6:]}{', bf16 gathers' if gathers else ''}"] = {
            "collectives": seen, "units": sum(isinstance(m, FSDPModule) for m in policy.modules()), "exact": exact,
            "resharded": resharded}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.finish_distributed()  # a barrier first: a rank that tears down early aborts the other in gloo


if __name__ == "__main__":
    main(Path(sys.argv[1]))
