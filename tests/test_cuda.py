"""The CUDA paths CI cannot see (it runs gloo on CPU): nccl collectives, the scripts under torchrun on one GPU, FSDP2
on two GPUs, the benchmark's CUDA memory accounting. Skipped, with the reason printed, on a machine without a GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generation
import test_bench
import test_fsdp
import test_tldr
import test_train_judge
import test_train_math
from tiny import VOCAB, rollout_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU (none visible)")
CUDA_ENV = {**os.environ, "GRPO_DEVICE": "cuda", "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], nproc: int = 1, port: int = 29531, timeout: int = 600):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={port}", *args], cwd=ROOT, env=CUDA_ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


COLLECTIVES = """
import torch, torch.distributed as dist, distributed
rank, world, device = distributed.init_distributed()
assert device.type == "cuda", device
for local in (torch.ones(2, 1), torch.ones(2, 1, device=device)):  # a CPU tensor is issue 10's crash under nccl
    assert distributed.all_gather_rows(local * rank, [2 * rank, 2 * rank + 1], 2 * world).flatten().tolist() == \\
        [float(r) for r in range(world) for _ in range(2)]
    summed = distributed.all_reduce_sum(local)
    assert summed.sum().item() == 2 * world and summed.device == local.device
assert distributed.all_gather_objects({"rank": rank}) == [{"rank": r} for r in range(world)]
parts = [torch.zeros(3) for _ in range(world)]
dist.all_gather(parts, torch.full((3,), float(rank)))  # a raw CPU collective goes over the group's gloo backend
assert [p[0].item() for p in parts] == list(range(world))
distributed.barrier()
print("collectives ok")
dist.destroy_process_group()
"""


def test_collectives_take_cpu_and_cuda_tensors_under_nccl(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    env_path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={min(GPUS, 2)}",
                           "--master_port=29532", str(script)], cwd=ROOT, env={**CUDA_ENV, "PYTHONPATH": env_path},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "collectives ok" in proc.stdout, proc.stderr[-4000:]


def test_train_math_and_eval_under_torchrun_on_one_gpu(small_toy, tmp_path):
    torchrun(["train_math.py", *test_train_math.toy_args(small_toy, tmp_path, "--reg", "gr")])
    rows = test_train_math.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/pass@1_greedy" in rows[-1]
    torchrun(["eval.py", "--checkpoint", str(tmp_path / "ckpt-000003"), "--dataset", str(small_toy[1]),
              "--limit", "8", "--samples", "2", "--max-new-tokens", "16", "--system-prompt", ""], port=29533)


def test_train_math_with_cuda_graph_decode(small_toy, tmp_path):
    torchrun(["train_math.py", *test_train_math.toy_args(small_toy, tmp_path, "--reg", "gr", "--cuda-graphs")],
             port=29537)
    assert [r["step"] for r in test_train_math.read_metrics(tmp_path)] == [0, 1, 2]


@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_generation_on_cuda_matches_hf_generate(graphs):
    """fp32 (no TF32): our static-cache decode, eager or replayed as a CUDA graph, == HF `generate`."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = generation.rollout_model(tiny_model("qwen2").cuda(), torch.float32, cuda_graphs=graphs)
    batch = rollout_batch(n=6, prompt_len=7, completion_len=1, group=3, device="cuda")
    ids, mask = batch["input_ids"][:, :7], batch["attention_mask"][:, :7]
    for _ in range(2):  # the second call replays the recorded graph
        ours, _ = generation.generate(model, ids, mask, max_new_tokens=20, eos_token_ids=[VOCAB + 1], pad_token_id=0,
                                      temperature=0)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                        eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours[:, :20], hf[:, 7:])


def test_bf16_replica_on_cuda_follows_the_policy():
    import grpo
    policy = tiny_model("qwen2").cuda()
    replica = generation.rollout_model(policy, torch.bfloat16)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    grpo.train_step(policy, opt, rollout_batch(device="cuda"), reg="gr", temperature=0.7, normalizer=42,
                    micro_batch_size=6, gamma=1e-3, eps=1e-3)
    generation.refresh_rollout_model(replica, policy)
    assert all(torch.equal(r, p.detach().to(torch.bfloat16)) for r, p in zip(replica.parameters(), policy.parameters()))
    batch = rollout_batch(n=8, prompt_len=5, completion_len=1, group=4, device="cuda")
    out, mask = generation.generate(replica, batch["input_ids"][:, :5], batch["attention_mask"][:, :5],
                                    max_new_tokens=16, eos_token_ids=[1], pad_token_id=0, temperature=0.7,
                                    generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape[0] == 8 and ((out >= 0) & (out < VOCAB)).all()


def test_train_judge_under_torchrun_on_one_gpu(small_judge_toy, tmp_path):
    torchrun(["train_judge.py", *test_train_judge.judge_args(small_judge_toy, tmp_path, "--reg", "kl")], port=29534)


def test_train_tldr_whole_chain_under_torchrun_on_one_gpu(small_tldr, tmp_path):
    """Issue 10: this died in the RM stage (an all_gather of CPU tensors under nccl)."""
    torchrun(["train_tldr.py", *test_tldr.toy_args(small_tldr, tmp_path, "--reg", "reset", "--reset-every", "2")],
             port=29535)
    rows = test_tldr.read_metrics(tmp_path / "rl-reset")
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/win_rate" in rows[-1]


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
def test_fsdp_on_two_gpus_equals_one_gpu(tmp_path):
    (tmp_path / "single").mkdir()
    (tmp_path / "fsdp").mkdir()
    single = test_fsdp.run_worker(tmp_path / "single", 1, CUDA_ENV, 0)
    sharded = test_fsdp.run_worker(tmp_path / "fsdp", 2, CUDA_ENV, 29536)
    for head in ("untied", "tied"):
        test_fsdp.assert_same_run(single[head], sharded[head], tol=1e-9)
    test_fsdp.assert_same_run(sharded["untied"], {**sharded["resumed"], "metrics": sharded["untied"]["metrics"][4:]},
                              tol=1e-9)
    assert torch.equal(single["greedy"], sharded["greedy"])


def test_bench_gr_memory_within_budget_on_cuda():
    """On CUDA the budget counts the caching allocator's 512-byte rounding of every tensor (a tiny model's budget
    is mostly rounding); 8 KiB of slack covers GR's scalar temporaries (the norms and the clip factors)."""
    out = subprocess.run([sys.executable, "benchmarks/bench_step.py", "--device", "cuda", *test_bench.TINY],
                         cwd=ROOT, env=CUDA_ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"GR extra memory \(peak gr - peak plain\) ([\d,]+) B vs budget ([\d,]+) B", out.stdout)
    extra, budget = (int(x.replace(",", "")) for x in m.groups())
    assert 0 < extra <= budget + 8192, (extra, budget)

