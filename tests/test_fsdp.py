"""FSDP2 equivalence: `torchrun --nproc_per_node=2` (gloo, CPU) == one process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

WORKER = Path(__file__).parent / "fsdp_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs in float64, so any difference is a logic error rather than float32 reduction order."""
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("fsdp")
    subprocess.run([sys.executable, str(WORKER), str(single), "float64"], check=True, env=ENV, timeout=300)
    # a hang in generation with uneven stopping would hit the timeout
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29513",
                    str(WORKER), str(sharded), "float64"], check=True, env=ENV, timeout=300)
    load = lambda d: torch.load(d / "result.pt", weights_only=True)  # noqa: E731
    return load(single), load(sharded)


def test_parameters_match_after_gr_and_kl_reset_steps(runs):
    single, sharded = runs
    assert single["params"].keys() == sharded["params"].keys()
    diff = max((single["params"][k] - sharded["params"][k]).abs().max().item() for k in single["params"])
    assert diff < 1e-10, diff
    for a, b in zip(single["metrics"], sharded["metrics"]):  # global norms, rank-averaged metrics
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_generation_lockstep_and_identical_greedy(runs):
    single, sharded = runs
    assert single["uneven_len"] == 1  # alone, every token is an EOS: stops after one
    assert sharded["uneven_len"] == 12  # rank 0 kept stepping until rank 1 reached the limit
    assert torch.equal(single["greedy"], sharded["greedy"])


def test_sharded_checkpoint_loads_with_from_pretrained(runs):
    _, sharded = runs
    model = AutoModelForCausalLM.from_pretrained(sharded["ckpt"], dtype=torch.float64)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    for k, v in model.state_dict().items():
        assert torch.equal(v, sharded["params"][k]), k
