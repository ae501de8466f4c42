"""End to end on a small toy: train_math.py (1 process and torchrun), eval.py, resume, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from math_verify.errors import TimeoutException
from transformers import AutoModelForCausalLM

import eval as evaluation
import grpo
import loading
import rundir
import train_math
from rewards import extract_xml_answer, render_chat
from tiny import greedy_continuation

ROOT = Path(__file__).resolve().parents[1]


def toy_args(small_toy, out, *extra):
    train, test, policy = small_toy
    return ["--preset", "toy", "--model", str(policy), "--dataset", str(train), "--test-dataset", str(test),
            "--out-dir", str(out), "--steps", "3", "--prompts-per-step", "4", "--group-size", "4",
            "--max-new-tokens", "16", "--eval-limit", "8", "--eval-every", "2", "--save-every", "2", *extra]


def read_metrics(out):
    """Training steps; the first line (step -1) is the initial policy's eval."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == -1 and "eval/pass@1_greedy" in rows[0]
    return rows[1:]


def rows_answered_by(policy, rows, max_new_tokens, path):
    """Writes `rows` to `path` with the gold answer set to the policy's own greedy answer (`greedy_continuation` of
    the GSM8K prompt without system prompt) on even rows and to one it never gives on odd rows; returns the greedy
    pass@1 an eval of `policy` must report on them."""
    tokenizer, model = loading.load_tokenizer(str(policy)), AutoModelForCausalLM.from_pretrained(policy).eval()
    eos = loading.eos_token_ids(tokenizer, model)
    answers = []
    for row in rows:
        prompt = tokenizer(render_chat(tokenizer, evaluation.prompt_messages("gsm8k", row, None)),
                           add_special_tokens=False)["input_ids"]
        new = greedy_continuation(model, torch.tensor(prompt), max_new_tokens, eos)
        answers.append(extract_xml_answer(tokenizer.decode(new, skip_special_tokens=True)))
    golds = [a if i % 2 == 0 and a is not None and "," not in a and "$" not in a else "never"
             for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps({**r, "answer": f"#### {g}"}) + "\n" for r, g in zip(rows, golds)))
    return sum(g != "never" for g in golds) / len(rows)


def run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("reg", grpo.REGS)
def test_smoke_each_reg(small_toy, tmp_path, reg):
    cfg = loading.parse_config(train_math.Config, toy_args(small_toy, tmp_path, "--reg", reg, "--log-kl-init"),
                               train_math.PRESETS)
    final = train_math.main(cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"reward", "rewards/correctness", "rewards/true_reward", "g1_norm", "entropy", "kl_init",
                "completion_length", "clipped_ratio", "time/generate"} <= r.keys()
        assert ("g2_norm" in r) == (reg == "gr") and ("kl" in r) == (reg in ("kl", "reset"))
    assert final == {k.removeprefix("eval/"): v for k, v in rows[-1].items() if k.startswith("eval/")}  # the last eval
    ckpt = rundir.latest_checkpoint(tmp_path)
    assert ckpt.name == "ckpt-000003" and (ckpt / "model.safetensors").exists()
    assert (ckpt / "reference" / "model.safetensors").exists() == (reg == "reset")


def test_torchrun_two_processes(small_toy, tmp_path):
    """2 ranks: the run completes, and its sharded eval of the initial policy (4 problems per rank, gathered) reports
    the pass@1 a naive greedy loop gives on problems whose gold is that loop's answer on every other row."""
    train, test, policy = small_toy
    rows = [json.loads(line) for line in Path(test).read_text().splitlines()][:8]
    expected = rows_answered_by(policy, rows, 20, tmp_path / "test.jsonl")
    proc = run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29514",
                    "train_math.py", *toy_args((train, tmp_path / "test.jsonl", policy), tmp_path, "--reg", "gr",
                                               "--max-new-tokens", "20", "--dtype", "float32")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert initial["step"] == -1 and initial["eval/pass@1_greedy"] == expected > 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert rundir.latest_checkpoint(tmp_path).name == "ckpt-000003"


def test_eval_on_saved_checkpoint(small_toy, tmp_path):
    cfg = loading.parse_config(train_math.Config, toy_args(small_toy, tmp_path, "--steps", "1"), train_math.PRESETS)
    train_math.main(cfg)
    _, test, _ = small_toy
    ckpt = rundir.latest_checkpoint(tmp_path)
    rows = [json.loads(line) for line in Path(test).read_text().splitlines()][:10]
    expected = rows_answered_by(ckpt, rows, 20, tmp_path / "test.jsonl")
    out = tmp_path / "eval.json"
    summary = evaluation.evaluate(evaluation.EvalConfig(  # sampled at T → 0: every sample is the greedy one
        checkpoint=str(ckpt), dataset=str(tmp_path / "test.jsonl"), samples=2, temperature=1e-6, max_new_tokens=20,
        system_prompt="", dtype="float32", out=str(out)))
    assert json.loads(out.read_text()) == summary
    assert summary["n"] == 10 and summary["pass@1_greedy"] == summary["pass@1_sampled"] == expected > 0


@pytest.mark.parametrize("reg", ["gr", "reset"])
def test_resume_reproduces_uninterrupted_run(small_toy, tmp_path, reg):
    common = ["--reg", reg, "--reset-every", "2", "--steps", "4"]  # reset: the step-2 checkpoint follows a reset
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_math.main(loading.parse_config(train_math.Config, toy_args(small_toy, full, *common), train_math.PRESETS))
    # the "killed" run stops after its step-2 checkpoint, then resumes to the same end
    train_math.main(loading.parse_config(train_math.Config, toy_args(small_toy, killed, *common, "--steps", "2"),
                                         train_math.PRESETS))
    train_math.main(loading.parse_config(train_math.Config, toy_args(small_toy, killed, *common, "--resume"),
                                         train_math.PRESETS))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(killed)) == strip(read_metrics(full))


def test_bad_inputs_fail_fast_with_one_line(small_toy, tmp_path):
    train, _, _ = small_toy
    no_fields = tmp_path / "no_fields.jsonl"
    no_fields.write_text(json.dumps({"prompt": "x"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "no such directory": ["--model", str(tmp_path / "missing")],
        "cannot load dataset 'nobody/no-such-dataset'": ["--dataset", "nobody/no-such-dataset"],
        "lacks field(s) ['question', 'answer']": ["--dataset", str(no_fields)],
        "is empty": ["--dataset", str(empty)],
        "--reg gr needs --eps > 0": ["--reg", "gr", "--eps", "0"],
    }
    for expected, extra in cases.items():
        proc = run_cli([sys.executable, "train_math.py", *toy_args(small_toy, tmp_path / "out", *extra)])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (expected, proc.stderr[-2000:])
        assert expected in lines[-1] and lines[-1].startswith("error:") and "Traceback" not in proc.stderr, lines
        assert not (tmp_path / "out" / "metrics.jsonl").exists()  # failed before any work


def math_task(small_toy, tmp_path, steps: int = 2) -> tuple[list[dict], Path, list[str]]:
    """MATH-schema rows (one with an unparsable gold), their file, and train_math's flags for a short --task math run."""
    rows = [{"problem": f"What is {a} + {b}?", "solution": f"{a} + {b} = \\boxed{{{a + b}}}",
             "level": f"Level {1 + a % 5}", "type": ("Algebra", "Prealgebra")[b % 2]} for a in range(1, 7) for b in (2, 3)]
    rows.append({"problem": "Unparsable gold", "solution": "no boxed answer", "level": "Level 1", "type": "Algebra"})
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--task", "math", "--model", str(small_toy[2]), "--dataset", str(data), "--out-dir", str(tmp_path / "run"),
            "--steps", str(steps), "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "16",
            "--eval-limit", "6", "--save-every", str(steps), "--system-prompt", "", "--max-prompt-tokens", "256"]
    return rows, data, args


def test_math_task_and_quintiles(small_toy, tmp_path, monkeypatch):
    """--task math end to end on MATH-schema rows (math-verify rewards), then eval.py's Table-4 quintiles."""
    rows, data, args = math_task(small_toy, tmp_path)
    _, _, policy = small_toy
    import math_verify.parser

    def timing_out(pred, *args, **kwargs):
        raise TimeoutException("Operation timed out!")  # what math-verify's signal.alarm handler raises

    with monkeypatch.context() as mp:  # every grading times out: reward 0 and a counted failure, never a crash
        mp.setattr(math_verify.parser, "extract_target_from_pred", timing_out)
        train_math.main(loading.parse_config(train_math.Config, args))
    metrics = read_metrics(tmp_path / "run")
    assert {"rewards/correctness", "rewards/reasoning_steps", "rewards/true_reward"} <= metrics[0].keys()
    assert [(m["rewards/grader_failure_rate"], m["rewards/correctness"]) for m in metrics] == [(1.0, 0.0)] * 2
    common = dict(task="math", dataset=str(data), max_new_tokens=16, system_prompt="")
    base = evaluation.evaluate(evaluation.EvalConfig(checkpoint=str(policy), out=str(tmp_path / "base.json"), **common))
    assert base["skipped_unparsable_gold"] == 1 and base["n"] == len(rows) - 1
    assert set(base["per_category"]) == {f"{t}|Level {k}" for t in ("Algebra", "Prealgebra") for k in range(1, 6)}
    after = evaluation.evaluate(evaluation.EvalConfig(checkpoint=str(rundir.latest_checkpoint(tmp_path / "run")),
                                                      base_results=str(tmp_path / "base.json"), **common))
    assert set(after["quintiles"]) == set(evaluation.QUINTILES)
    assert sum(q["n"] for q in after["quintiles"].values()) == len(rows) - 1


def test_grader_pool_is_created_once_per_run_and_grades_as_in_process(small_toy, tmp_path, monkeypatch):
    """--grader-workers 2: one pool for the whole run (not one per step), every step's grades equal to grading in the
    training process, and the pool shut down at the end."""
    import rewards
    pools, graded = [], []

    def counting_pool(workers):
        pools.append(rewards.grader_pool(workers))
        return pools[-1]

    def checked_batch(completions, solutions, *, pool=None):
        got = rewards.math_rewards_batch(completions, solutions, pool=pool)
        if pool is not None:  # (load_task's gold check runs in-process, before the pool exists)
            assert pool is pools[0] and got == rewards.math_rewards_batch(completions, solutions)
            graded.append(len(got))
        return got

    monkeypatch.setattr(train_math, "grader_pool", counting_pool)
    monkeypatch.setattr(train_math, "math_rewards_batch", checked_batch)
    _, _, args = math_task(small_toy, tmp_path, steps=3)
    train_math.main(loading.parse_config(train_math.Config, args + ["--grader-workers", "2", "--eval-every", "0"]))
    assert len(pools) == 1 and graded == [16] * 3
    with pytest.raises(RuntimeError, match="shutdown"):
        pools[0].submit(print)


def test_quintile_and_category_accuracy_on_crafted_base_results():
    """Table 4 by hand: each (type, level) category goes to the band of its base accuracy, [0, 0.2) ... [0.8, 1];
    None (unparsable gold) is neither right nor wrong; a category the base results lack is left out."""
    base = {"Precalculus|Level 5": 0.0, "Geometry|Level 2": 0.19, "Geometry|Level 1": 0.2, "Number Theory|Level 3": 0.5,
            "Counting|Level 4": 0.79, "Algebra|Level 1": 0.95, "Algebra|Level 5": 1.0}
    results = {"Precalculus|Level 5": [0, 0, 1, None], "Geometry|Level 2": [0], "Geometry|Level 1": [1, 1, 0],
               "Number Theory|Level 3": [1], "Counting|Level 4": [0.5, 0.3], "Algebra|Level 1": [0, None],
               "Algebra|Level 5": [1, 1, 0], "Prealgebra|Level 1": [1, 1]}
    rows, correct = [], []
    for category, values in results.items():
        kind, level = category.split("|")
        rows += [{"type": kind, "level": level}] * len(values)
        correct += values
    assert evaluation.quintile_accuracy(rows, correct, base) == {
        "00-20%": {"accuracy": pytest.approx(1 / 4), "n": 4}, "20-40%": {"accuracy": pytest.approx(2 / 3), "n": 3},
        "40-60%": {"accuracy": 1.0, "n": 1}, "60-80%": {"accuracy": pytest.approx(0.4), "n": 2},
        ">80%": {"accuracy": pytest.approx(1 / 2), "n": 4}}
    assert evaluation.category_accuracy(rows, correct) == pytest.approx({
        "Algebra|Level 1": 0.0, "Algebra|Level 5": 2 / 3, "Counting|Level 4": 0.4, "Geometry|Level 1": 2 / 3,
        "Geometry|Level 2": 0.0, "Number Theory|Level 3": 1.0, "Prealgebra|Level 1": 1.0, "Precalculus|Level 5": 1 / 3})


# ----------------------------------------------------------------------------- watching a run: trackers, ETA, summary

def fake_wandb(calls: list):
    """A stand-in `wandb` module that records init/log/finish."""
    import importlib.machinery
    import types
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    run = types.SimpleNamespace(log=lambda scalars, step: calls.append(("log", step, scalars)),
                                finish=lambda: calls.append(("finish",)))
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    return module


def test_tracker_gets_config_and_every_record_and_summary_adds_up(small_toy, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    train_math.main(loading.parse_config(train_math.Config, toy_args(small_toy, tmp_path, "--reg", "gr", "--report-to",
                                                                     "wandb"), train_math.PRESETS))
    init, *logs, finish = calls
    assert init[0] == "init" and init[1]["config"]["reg"] == "gr" and init[1]["config"]["report_to"] == ("wandb",)
    assert finish == ("finish",)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [step for _, step, _ in logs] == [0, 0, 1, 2]  # the initial eval (step -1) at step 0, then every step
    for (_, _, scalars), record in zip(logs, records):
        assert scalars == {k: v for k, v in record.items() if k != "step"}  # metrics.jsonl's names and values
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step=")]
    assert len(printed) == 3 and all(re.search(r"elapsed=\d+m\d\ds eta=\d+m\d\ds$", line) for line in printed)
    assert printed[-1].endswith("eta=0m00s")

    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = records[1:]
    assert summary["stopped"] == "completed" and summary["steps_done"] == 3
    assert summary["final_eval"] == {"step": 2, **{k[5:]: v for k, v in steps[-1].items() if k.startswith("eval/")}}
    evals = [r for r in records if "eval/pass@1_greedy" in r]
    best = max(evals, key=lambda r: (r["eval/pass@1_greedy"], r["step"]))
    assert summary["best_eval"]["pass@1_greedy"] == {"value": best["eval/pass@1_greedy"], "step": best["step"]}
    for phase in ("generate", "score", "update", "eval"):
        mean = sum(r.get(f"time/{phase}", 0) for r in steps) / 3
        assert summary["seconds_per_step"][phase] == pytest.approx(mean, abs=1e-4)
    assert sum(summary["share_of_step"].values()) == pytest.approx(1, abs=1e-3)
    tokens = sum(r["completion_length"] * 4 * 4 for r in steps)  # 4 prompts x 4 rollouts per step
    assert summary["rollout_tokens_per_second"] == pytest.approx(tokens / sum(r["time/generate"] for r in steps))
    assert summary["peak_gpu_memory_gib"] is None  # the suite runs on the CPU


def test_non_finite_stop_still_writes_the_summary(small_toy, tmp_path, monkeypatch):
    score = train_math.gsm8k_rewards
    monkeypatch.setattr(train_math, "gsm8k_rewards", lambda c, g: {k: float("nan") for k in score(c, g)})
    with pytest.raises(FloatingPointError, match="step 0"):
        train_math.main(loading.parse_config(train_math.Config, toy_args(small_toy, tmp_path), train_math.PRESETS))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"].startswith("step 0: non-finite loss") and summary["steps_done"] == 0


def test_missing_tracker_package_fails_fast(small_toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb([]))  # installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    with pytest.raises(SystemExit, match="^error: --report-to tensorboard needs the tensorboard package"):
        args = toy_args(small_toy, tmp_path, "--report-to", "wandb", "--report-to", "tensorboard")
        train_math.main(loading.parse_config(train_math.Config, args, train_math.PRESETS))
    assert not (tmp_path / "metrics.jsonl").exists()
