"""FSDP2 equivalence: `torchrun --nproc_per_node=2` (gloo, CPU) == one process on the same global batch, untied and
tied head; a sharded checkpoint resumed under 2 ranks == the uninterrupted 2-rank run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

WORKER = Path(__file__).parent / "fsdp_worker.py"


def run_worker(out: Path, nproc: int, env: dict, port: int) -> dict:
    """float64, so any difference is a logic error rather than float32 reduction order."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", f"--master_port={port}"]
    # a hang in generation with uneven stopping would hit the timeout
    subprocess.run([*launcher, str(WORKER), str(out), "float64"], check=True, env=env, timeout=300)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_DEVICE": "cpu"}  # 2 ranks need not fit the GPUs there are
    return (run_worker(tmp_path_factory.mktemp("single"), 1, env, 0),
            run_worker(tmp_path_factory.mktemp("fsdp"), 2, env, 29513))


def assert_same_run(a: dict, b: dict, tol: float = 1e-10):
    assert a["params"].keys() == b["params"].keys()
    diff = max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])
    assert diff < tol, diff
    assert len(a["metrics"]) == len(b["metrics"])
    for x, y in zip(a["metrics"], b["metrics"]):  # global norms, rank-averaged metrics
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_parameters_match_after_gr_and_kl_reset_steps(runs, head):
    single, sharded = runs
    assert_same_run(single[head], sharded[head])
    if head == "tied":  # Qwen2.5-0.5B ties its head: one tensor, never perturbed by GR, still trained
        params = sharded[head]["params"]
        assert torch.equal(params["model.embed_tokens.weight"], params["lm_head.weight"])


def test_sharded_checkpoint_resumes_the_uninterrupted_run(runs):
    _, sharded = runs
    uninterrupted, resumed = sharded["untied"], sharded["resumed"]
    assert resumed["start"] == 4
    assert all(torch.equal(resumed["params"][k], v) for k, v in uninterrupted["params"].items())  # bit-exact
    assert resumed["metrics"] == uninterrupted["metrics"][4:]  # reference/ and Adam state restored


def test_generation_lockstep_and_identical_greedy(runs):
    single, sharded = runs
    assert single["uneven_len"] == 1  # alone, every token is an EOS: stops after one
    assert sharded["uneven_len"] == 12  # rank 0 kept stepping until rank 1 reached the limit
    assert torch.equal(single["greedy"], sharded["greedy"])


def test_replica_rollouts_under_two_ranks_equal_one_process(runs):
    single, sharded = runs
    assert not single["replica"]["copy"] and sharded["replica"]["copy"]  # one process: the policy itself
    assert sharded["replica"]["exact"]  # every rank holds the full, current weights
    assert torch.equal(single["replica"]["greedy"], sharded["replica"]["greedy"])


def test_sharded_checkpoint_loads_with_from_pretrained(runs):
    _, sharded = runs
    model = AutoModelForCausalLM.from_pretrained(sharded["ckpt"], dtype=torch.float64)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    for k, v in model.state_dict().items():
        assert torch.equal(v, sharded["untied"]["params"][k]), k
