"""train_judge.py end to end on a small toy policy + toy judge: 1 process and torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loading
import rundir
import rewards
import toy
import train_judge
from rewards import parse_judge_score
from test_train_math import rows_answered_by

ROOT = Path(__file__).resolve().parents[1]


def judge_args(paths, out, *extra):
    train, test, policy, judge = paths
    return ["--preset", "toy", "--model", str(policy), "--judge", str(judge), "--dataset", str(train),
            "--test-dataset", str(test), "--out-dir", str(out), "--steps", "2", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "16", "--judge-max-new-tokens", "24", "--eval-limit", "8",
            "--save-every", "2", *extra]


def test_judge_is_taught_the_rule_and_agrees_at_least_as_a_constant_verdict(small_judge_toy):
    """The replies the toy judge learns score a correct completion 5 (reward 2) and a wrong one 1 (reward 0); on
    held-out completions it agrees with the rule at least as often as the better constant verdict (always right /
    always wrong). (The small fixture's judge is barely trained: there that bound is all it can show.)"""
    assert [parse_judge_score(toy.judge_reply(correct, well_formed)) for correct in (True, False)
            for well_formed in (True, False)] == [5, 5, 1, 1]
    report = json.loads((small_judge_toy[3] / "judge_eval.json").read_text())
    assert report["agreement"] >= max(report["rule_correct_rate"], 1 - report["rule_correct_rate"])


def test_smoke_logs_judge_and_true_reward(small_judge_toy, tmp_path, monkeypatch):
    judged = []  # per step: the judge's rewards and parse failures

    def judge_rewards(*args, **kwargs):
        judged.append(rewards.judge_rewards(*args, **kwargs))
        return judged[-1]

    monkeypatch.setattr(train_judge, "judge_rewards", judge_rewards)
    cfg = loading.parse_config(train_judge.Config, judge_args(small_judge_toy, tmp_path, "--reg", "gr"),
                               train_judge.PRESETS)
    train_judge.main(cfg)
    init, *rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert init["step"] == -1 and [r["step"] for r in rows] == [0, 1]
    for r, (scores, failures) in zip(rows, judged, strict=True):
        assert {"rewards/judge_correctness", "rewards/true_reward", "rewards/judge_failure_rate",
                "rewards/strict_format", "g1_norm", "g2_norm"} <= r.keys()
        assert r["rewards/judge_failure_rate"] == pytest.approx(failures / 16)  # 4 prompts × 4 rollouts
        assert r["rewards/judge_correctness"] == pytest.approx(scores.mean().item())
        # the trained reward is the judge's correctness plus the four format terms, never the rule's correctness
        parts = sum(r[f"rewards/{k}"] for k in ("judge_correctness", *train_judge.FORMAT_TERMS))
        assert r["reward"] == pytest.approx(parts, rel=1e-5, abs=1e-5)
    assert "eval/pass@1_greedy" in rows[-1]


def test_torchrun_two_processes(small_judge_toy, tmp_path):
    """2 ranks, each with its own judge replica: the run completes and its sharded eval of the initial policy reports
    the naive greedy pass@1 on problems whose gold is the policy's own answer on every other row."""
    train, test, policy, judge = small_judge_toy
    rows = [json.loads(line) for line in Path(test).read_text().splitlines()][:8]
    expected = rows_answered_by(policy, rows, 20, tmp_path / "test.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = judge_args((train, tmp_path / "test.jsonl", policy, judge), tmp_path, "--max-new-tokens", "20",
                      "--dtype", "float32")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29515", "train_judge.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert initial["step"] == -1 and initial["eval/pass@1_greedy"] == expected > 0
    assert rundir.latest_checkpoint(tmp_path).name == "ckpt-000002"


def test_missing_judge_is_a_one_line_error(small_judge_toy, tmp_path):
    with pytest.raises(SystemExit, match="--judge .* no such directory"):
        train_judge.main(loading.parse_config(train_judge.Config, judge_args(
            small_judge_toy, tmp_path, "--judge", str(tmp_path / "nope")), train_judge.PRESETS))


def test_judge_error_and_sharpness_evals(small_judge_toy, tmp_path):
    """The eval's judge draws are fixed, so at σ = 0 every perturbation gives back J exactly: sharpness 0."""
    final = train_judge.main(loading.parse_config(train_judge.Config, judge_args(
        small_judge_toy, tmp_path, "--steps", "1", "--eval-pairs", "6", "--sharpness-perturbations", "2",
        "--sharpness-prompts", "6", "--sharpness-sigma", "0"), train_judge.PRESETS))
    assert final["sharpness"] == 0 and final["sharpness_J"] == final["sharpness_J_perturbed"]
    assert {"bt_loss", "bt_accuracy", "bt_pairs", "sampled_gold", "sampled_proxy"} <= final.keys()
    assert final["bt_pairs"] <= 6 and final["sampled_gold"] in {i / 12 * 2 for i in range(13)}  # 12 samples, 0 or 2
