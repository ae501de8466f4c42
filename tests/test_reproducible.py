"""The toys' numbers on any CPU: `toy.pin_kernels` puts a process on one code path, so two toys built in processes that
are told to use different kernels (ATen's AVX-512 or scalar ones, MKL's own dispatch or its compatible branch, 2 or 1
threads: what differs from one CPU to another) come out byte for byte the same. Without the pin they differ, which
shows that this test can see a difference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# a small GSM8K toy (data, tokenizer, SFT policy) built in a fresh process, as `python train_math.py --preset toy` does
BUILD = """import sys
from pathlib import Path
import loading, toy
loading.hf_progress_bars_on_terminal_only()  # as every entry point does first
if sys.argv[2] == "pinned":
    toy.pin_kernels()
toy.build_gsm8k_policy(Path(sys.argv[1]), sft_steps=20, n_train=200, hidden=64, layers=2)
"""
# two machines' worth of kernel choices; unpinned, one thread each and only ATen's choice differing (it suffices)
SETTINGS = {"pinned": ({"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "", "OMP_NUM_THREADS": "2"},
                       {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}),
            "unpinned": ({"ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "1"},
                         {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"})}


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="needs an x86-64 CPU with AVX2 (the toys' pinned code path)")
def test_pinned_toy_builds_are_byte_identical_across_cpu_code_paths(tmp_path):
    runs = [(pin, k) for pin in SETTINGS for k in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path / f"{pin}-{k}"), pin], cwd=ROOT,
                              env={**os.environ, **SETTINGS[pin][k]}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pin, k in runs]
    for proc in procs:
        output = proc.communicate()[0]
        assert proc.returncode == 0, output
        assert "note:" not in output  # every pinned build ran ATen's AVX2 kernels
        assert "" not in output.splitlines()  # nor printed blank lines (the tokenizer trainer's progress)
    weights = {(pin, k): (tmp_path / f"{pin}-{k}" / "gsm8k-sft" / "model.safetensors").read_bytes() for pin, k in runs}
    assert weights["pinned", 0] == weights["pinned", 1]
    assert weights["unpinned", 0] != weights["unpinned", 1]
