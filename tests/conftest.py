"""Test session setup: never reach for the hub, keep CPU threads predictable, run on the CPU.

Every test runs on the CPU (GRPO_DEVICE=cpu, read by distributed.rank_device), so the suite gives the same answers on a
laptop, in CI and on a GPU node, and a torchrun test with more ranks than GPUs still runs (gloo). The CUDA paths have
their own tests (tests/test_cuda.py), which set GRPO_DEVICE=cuda and are skipped, with the reason printed, without a
GPU. `GRPO_DEVICE=cuda python -m pytest` runs the rest of the suite on the GPU as well.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRPO_DEVICE", "cpu")


# ----------------------------------------------------------------------------- small toys, built once per session

@pytest.fixture(scope="session")
def small_toy(tmp_path_factory):
    """A smaller, faster-built GSM8K toy (same builders as `--preset toy`): (train, test, policy dir)."""
    import toy
    root = tmp_path_factory.mktemp("toy")
    toy.build_gsm8k_policy(root, sft_steps=150, n_train=400, hidden=64, layers=2)
    return toy.gsm8k_paths(root)


@pytest.fixture(scope="session")
def small_judge_toy(small_toy):
    """The small GSM8K toy plus a small toy judge: (train, test, policy dir, judge dir)."""
    import toy
    root = small_toy[2].parent
    judge = toy.build_gsm8k_judge(root, n_train=200, sft_steps=40, hidden=64, layers=2)
    return (*small_toy, judge)


@pytest.fixture(scope="session")
def small_tldr(tmp_path_factory):
    """A smaller TL;DR toy (same builders as `--preset toy`): (train, test, random-init base dir)."""
    import toy
    root = tmp_path_factory.mktemp("tldr_toy")
    toy.build_tldr_base(root, n_train=640, n_test=32, hidden=32, layers=2)
    return toy.tldr_paths(root)
