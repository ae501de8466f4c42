"""train_judge.py end to end on a small toy policy + toy judge: 1 process and torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import grpo
import toy
import train_judge

ROOT = Path(__file__).resolve().parents[1]


def judge_args(paths, out, *extra):
    train, test, policy, judge = paths
    return ["--preset", "toy", "--model", str(policy), "--judge", str(judge), "--dataset", str(train),
            "--test-dataset", str(test), "--out-dir", str(out), "--steps", "2", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "16", "--judge-max-new-tokens", "24", "--eval-limit", "8",
            "--save-every", "2", *extra]


def test_judge_built_with_held_out_agreement(small_judge_toy):
    report = json.loads((small_judge_toy[3] / "judge_eval.json").read_text())
    assert 0 <= report["agreement"] <= 1 and report["parse_failures"] >= 0


def test_smoke_logs_judge_and_true_reward(small_judge_toy, tmp_path):
    cfg = grpo.parse_config(train_judge.Config, judge_args(small_judge_toy, tmp_path, "--reg", "gr"),
                            train_judge.PRESETS)
    train_judge.main(cfg)
    init, *rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert init["step"] == -1 and [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert {"rewards/judge_correctness", "rewards/true_reward", "rewards/judge_failure_rate",
                "rewards/strict_format", "g1_norm", "g2_norm"} <= r.keys()
        assert 0 <= r["rewards/judge_failure_rate"] <= 1
        # the trained reward is the judge's correctness plus the four format terms, never the rule's correctness
        parts = sum(r[f"rewards/{k}"] for k in ("judge_correctness", *train_judge.FORMAT_TERMS))
        assert r["reward"] == pytest.approx(parts, rel=1e-5, abs=1e-5)
    assert "eval/pass@1_greedy" in rows[-1]


def test_torchrun_two_processes(small_judge_toy, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29515", "train_judge.py", *judge_args(small_judge_toy, tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert grpo.latest_checkpoint(tmp_path).name == "ckpt-000002"


def test_missing_judge_is_a_one_line_error(small_judge_toy, tmp_path):
    with pytest.raises(SystemExit, match="--judge .* no such directory"):
        train_judge.main(grpo.parse_config(train_judge.Config, judge_args(
            small_judge_toy, tmp_path, "--judge", str(tmp_path / "nope")), train_judge.PRESETS))


def test_judge_error_and_sharpness_evals(small_judge_toy, tmp_path):
    """The eval's judge draws are fixed, so at σ = 0 every perturbation gives back J exactly: sharpness 0."""
    final = train_judge.main(grpo.parse_config(train_judge.Config, judge_args(
        small_judge_toy, tmp_path, "--steps", "1", "--eval-pairs", "6", "--sharpness-perturbations", "2",
        "--sharpness-prompts", "6", "--sharpness-sigma", "0"), train_judge.PRESETS))
    assert final["sharpness"] == 0 and final["sharpness_J"] == final["sharpness_J_perturbed"]
    assert {"bt_loss", "bt_accuracy", "bt_pairs", "sampled_gold", "sampled_proxy"} <= final.keys()
    assert final["bt_pairs"] <= 6 and final["sampled_gold"] in {i / 12 * 2 for i in range(13)}  # 12 samples, 0 or 2
