"""benchmarks/bench_step.py keeps working: one tiny iteration of every variant, output checked, no timing asserts."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import distributed

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_step.py"
TINY = ["--sizes", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--n-seqs", "8", "--prompt-len", "6",
        "--completion-len", "5", "--micro-batch-size", "4", "--gens", "ours,hf"]  # HF's compile: ~40 s on a CPU
UPDATES, GENS = ["plain", "kl", "gr"], ["ours", "hf"]


def run(*args, timeout=120, **env_vars):
    env = {**{k: v for k, v in os.environ.items() if k != "GRPO_COMPILE_BACKEND"}, "OMP_NUM_THREADS": "1", **env_vars}
    out = subprocess.run([sys.executable, str(BENCH), *TINY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_bench_prints_ratio_table():
    out = run("--gen-shape", "6x9+4", "--bandwidth-gbs", "50")
    assert "generation: 6x(9+4) per rank on the policy" in out  # fp32 on the CPU: no copy
    assert re.search(r"memory-bandwidth bound: \d+ tok/s", out) and re.search(r"^ours .* \d+\.\d%$", out, re.M)
    assert "torch " in out and "torch threads 1" in out and "load average" in out
    for u in UPDATES:  # one row per variant in the per-size table and in the summary, with ratios to plain
        assert re.search(rf"^{u}\s+[\d.]+\s+[\d.]+x\s+[\d.]+x\s+[\d.]+\s+[\d.]+x", out, re.M), u
        assert re.search(rf"tiny update {u}\s+[\d.]+ ms\s+[\d.]+x \|\s+[\d.]+x plain", out), u
    assert re.search(r"tiny update plain\s+[\d.]+ ms\s+1\.000x", out)
    for g in GENS:  # tok/s, ratios to HF and ms per decode step
        assert re.search(rf"^{g}\s+\d+\s+[\d.]+x\s+[\d.]+x\s+\d+\s+[\d.]+x\s+[\d.]+", out, re.M), g
        assert re.search(rf"tiny generate {g}\s+\d+ tok/s [\d.]+x \|\s+[\d.]+x hf\s+[\d.]+ ms/step", out), g
    assert not re.search(r"gr_fast|ours_", out)  # the merged prototypes are gone
    # memory: GR's extra bytes printed next to the budget; in one process the CPU count is exact
    m = re.search(r"GR extra memory \(peak gr - peak plain\) ([\d,]+) B vs budget ([\d,]+) B", out)
    assert m, out
    extra, budget = (int(x.replace(",", "")) for x in m.groups())
    assert 0 < extra <= budget  # g1's copy, the saved block parameters, O(batch) bytes, nothing more
    assert "upper bound" not in out


def test_bench_times_generation_alone_against_ours():
    out = run("--gen-only", "--gens", "ours,graphed")  # on a CPU graphed is left out: CUDA graphs are CUDA's
    assert not re.search(r"update (plain|kl|gr)|^(plain|kl|gr) |GR extra memory", out, re.M)
    assert re.search(r"^generate\s+tok/s\s+/ours", out, re.M) and re.search(r"^ours\s+\d+\s+1\.000x", out, re.M)
    assert re.search(r"tiny generate ours\s+\d+ tok/s 1\.000x \|\s+1\.000x ours", out)
    assert not re.search(r"^(hf|graphed)\s", out, re.M)
    out = run("--gen-only", "--gens", "ours,graphed", GRPO_COMPILE_BACKEND="eager")  # gpu_check.sh's compiled decode
    assert re.search(r"^graphed\s+\d+\s+[\d.]+x", out, re.M) and "decode cache: " in out


def test_bench_uses_trainer_setup(monkeypatch):
    """The benchmark sets up as training does: on the CPU glibc keeps freed memory (distributed.keep_freed_memory)."""
    monkeypatch.setenv("GRPO_DEVICE", "cpu")
    class Called(Exception):
        pass

    def keep_freed_memory():
        raise Called  # stop before any benchmarking: reaching here is the check
    monkeypatch.setattr(distributed, "keep_freed_memory", keep_freed_memory)
    monkeypatch.setattr(sys, "argv", [str(BENCH), *TINY])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repository root
    with pytest.raises(Called):
        runpy.run_path(str(BENCH), run_name="__main__")


def test_bench_help_lists_options():
    out = subprocess.run([sys.executable, str(BENCH), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--sizes", "--model", "--dtype", "--gen-dtype", "--update-dtype", "--device", "--repeats", "--warmup",
                 "--micro-batch-size", "--gen-shape", "--gen-only", "--gens", "--bandwidth-gbs"):
        assert flag in out.stdout, flag
    assert "--malloc-keep" not in out.stdout and "--updates" not in out.stdout
