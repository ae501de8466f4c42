"""gr.gr_backward inside the wrappers people train with, 2 gloo ranks against one process on the same global batch:
DDP (bucket views on and off, `no_sync` accumulation), FSDP1 (`use_orig_params` True and False), FSDP2; and the
setups that must be refused at the first call (FSDP1 FlatParameters mixing block and non-block weights; DeepSpeed
ZeRO-1/2 where deepspeed is installed). Every clip acts at every step, and every norm is compared."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gr  # noqa: E402
from tiny import tiny_model  # noqa: E402
from wrappers_worker import LR, REFUSED, SETUPS, STEPS  # noqa: E402

WORKER = Path(__file__).parent / "wrappers_worker.py"
NORMS = ("g1_norm", "g2_norm", "correction_norm", "correction_ratio", "grad_norm", "loss")


def run_worker(out: Path, nproc: int, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_DEVICE": "cpu"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", f"--master_port={port}"]
    subprocess.run([*launcher, str(WORKER), str(out)], check=True, env=env, timeout=300)
    return torch.load(out / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = run_worker(tmp_path_factory.mktemp("single"), 1, 0)["single"]
    return single, run_worker(tmp_path_factory.mktemp("ranks"), 2, 29531)


def step_gradients(params: list[dict]) -> list[dict]:
    """The gradient each SGD step applied, (φ_t − φ_t+1) / lr, per parameter."""
    return [{k: (a[k] - b[k]) / LR for k in a} for a, b in zip(params, params[1:])]


def test_every_clip_acts_at_every_step(runs):
    single, _ = runs
    assert len(single["metrics"]) == STEPS
    for m in single["metrics"]:
        assert m["g1_norm"] > 10 and m["g2_norm"] > 10 and m["grad_norm"] > 1, m  # g1, g2 to 10; the final to 1
        assert m["correction_ratio"] > 0.5, m  # GR's correction is a large part of the step


@pytest.mark.parametrize("setup", SETUPS)
def test_two_ranks_match_one_process(runs, setup):
    single, ranks = runs
    run = ranks[setup]
    assert run["params"][0].keys() == single["params"][0].keys()
    for t, (want, got) in enumerate(zip(step_gradients(single["params"]), step_gradients(run["params"]), strict=True)):
        scale = max(v.abs().max().item() for v in want.values())
        diff = max((want[k] - got[k]).abs().max().item() for k in want)
        assert diff < 1e-9 * scale, (t, diff, scale)
    for t, (want, got) in enumerate(zip(single["metrics"], run["metrics"], strict=True)):
        for k in NORMS:
            assert got[k] == pytest.approx(want[k], rel=1e-10), (t, k)


@pytest.mark.parametrize("setup", REFUSED)
def test_refused_at_the_first_call_naming_the_wrapper_and_the_fix(runs, setup):
    _, ranks = runs
    if setup not in ranks["refused"]:
        pytest.skip("deepspeed is not installed (not a requirement; `pip install deepspeed` runs this check)")
    message = ranks["refused"][setup]
    if setup.startswith("deepspeed"):
        assert "DeepSpeed ZeRO" in message and "FSDP2" in message, message
    else:
        assert "FSDP1" in message and "use_orig_params=True" in message and "ModuleWrapPolicy" in message, message


def test_a_closure_that_leaves_no_gradient_in_grad_is_refused():
    """No backward, or a wrapper that keeps gradients elsewhere: an error, not a zero gradient."""
    model = tiny_model()
    with pytest.raises(ValueError, match="no gradient in .grad"):
        gr.gr_backward(model, lambda: torch.zeros(()), gamma=1e-3, eps=1e-3)
