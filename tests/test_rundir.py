"""A run's directory is safe (issue 23): no silent overwrite, one writer, a resume that checks what it resumes and
falls back past what does not load, one `error:` line for each bad flag or row. Each test plants its fault: a used
dir, a second process holding the lock, changed flags, a truncated trainer_state.pt, nan weights, a torn metrics line,
a half-written checkpoint, ranks that do not share a filesystem."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluation
import grpo
import loading
import rundir
import train_judge
import train_math
import train_tldr
from test_train_math import ROOT, read_metrics
from tiny import tiny_model


def args(data, out, *extra):
    train, test, policy = data
    return ["--preset", "toy", "--model", str(policy), "--dataset", str(train), "--test-dataset", str(test),
            "--out-dir", str(out), "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
            "--max-new-tokens", "16", "--eval-limit", "8", "--eval-every", "0", "--save-every", "1", *extra]


def train(data, out, *extra):
    return train_math.main(loading.parse_config(train_math.Config, args(data, out, *extra), train_math.PRESETS))


def without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.fixture(scope="module")
def data(small_toy, tmp_path_factory):
    """The small toy with a test set whose first question is longer than --max-prompt-tokens (128)."""
    train_rows, _, policy = small_toy
    rows = [json.loads(line) for line in Path(small_toy[1]).read_text().splitlines()][:8]
    test = tmp_path_factory.mktemp("data") / "test.jsonl"
    long = {**rows[0], "question": "How many apples? " * 60}
    test.write_text("".join(json.dumps(r) + "\n" for r in [long, *rows]))
    return train_rows, test, policy


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 2-step run saving every step (ckpt-000001, ckpt-000002) and what it printed."""
    out = tmp_path_factory.mktemp("finished")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(data, out)
    return out, printed.getvalue()


def copy_of(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def error_of(call) -> str:
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- no silent overwrite, one writer

def test_fresh_run_into_a_used_dir_stops_and_overwrite_starts_afresh(data, finished, tmp_path):
    run = copy_of(finished[0], tmp_path)
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    message = error_of(lambda: train(data, run, "--seed", "1"))
    assert f"--out-dir {run} holds a run" in message and "--resume" in message and "--overwrite" in message
    assert files() == before  # nothing written
    assert [c.name for c in rundir.checkpoints(run)] == ["ckpt-000001", "ckpt-000002"]
    train(data, run, "--overwrite", "--steps", "1", "--seed", "1")
    assert [c.name for c in rundir.checkpoints(run)] == ["ckpt-000001"]
    assert [r["step"] for r in rundir.load_metrics(run)] == [0, 1]
    assert json.loads((run / "config.json").read_text())["seed"] == 1


def test_pruning_keeps_this_runs_newest_checkpoints_by_step(tmp_path):
    """ckpt-000040 is from before a resume that fell back past it: steps 1-3 of this run prune their own only."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in (40, 1, 2, 3):
        rundir.save_checkpoint(tmp_path, step, model, opt, tok, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000002", "ckpt-000003", "ckpt-000040"]


def test_one_writer_per_dir_and_the_lock_dies_with_its_holder(data, finished, tmp_path):
    run = copy_of(finished[0], tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, rundir; rundir.lock_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(300)", str(run)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"], ["--overwrite"]):  # a second run, whatever it asks for
            message = error_of(lambda: train(data, run, *extra))
            assert f"{run.resolve()} is in use by another run (pid {holder.pid} on " in message, message
        assert (run / "metrics.jsonl").read_text() == metrics
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.lock_dir(run)  # the kernel released it with the killed process
    rundir.release_dir(run)


# ----------------------------------------------------------------------------- resume checks what it resumes

def test_resume_refuses_changed_experiment_flags_naming_each(data, finished):
    run, _ = finished
    message = error_of(lambda: train(data, run, "--resume", "--lr", "1e-3", "--seed", "3", "--group-size", "2"))
    assert "--group-size 2 (the run's: 4), --lr 0.001 (the run's: 0.0001), --seed 3 (the run's: 0);" in message
    assert "--allow-change" in message
    other_model = str(run / "ckpt-000001")
    for flag, value in (("--reg", "reset"), ("--model", other_model), ("--temperature", "0.5"),
                        ("--max-new-tokens", "12"), ("--prompts-per-step", "8"), ("--dataset", str(data[1]))):
        assert f"{flag} {value} (the run's:" in error_of(lambda: train(data, run, "--resume", flag, value))


def test_resume_says_where_and_an_allowed_change_truly_applies(data, finished, tmp_path, monkeypatch, capsys):
    """--allow-change lr: the resumed updates use the new lr, not the one in the optimizer state."""
    run = copy_of(finished[0], tmp_path)
    lrs, train_step = [], grpo.train_step

    def spy(model, optimizer, batch, **kwargs):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        return train_step(model, optimizer, batch, **kwargs)

    monkeypatch.setattr(grpo, "train_step", spy)
    train(data, run, "--resume", "--steps", "3", "--lr", "1e-3", "--allow-change", "lr", "--keep-checkpoints", "1")
    printed = capsys.readouterr().out
    assert f"--resume: resuming from {run / 'ckpt-000002'} (step 2 of 3)" in printed
    assert "--resume: continuing with --lr 0.001 (the run's: 0.0001)" in printed
    assert lrs == [[1e-3]] and json.loads((run / "config.json").read_text())["lr"] == 1e-3
    assert [r["step"] for r in rundir.load_metrics(run)] == [0, 1, 2, 3]
    assert [c.name for c in rundir.checkpoints(run)] == ["ckpt-000003"]  # --keep-checkpoints is free to change


def test_a_gr_run_resumed_as_reset_starts_its_reference_at_the_policy(data, finished, tmp_path):
    """A GR checkpoint has no reference/: resumed with --reg reset (allowed), the reference starts as the resumed
    policy, a reset at the resumed step, so the first resumed step's KL to it is 0 (from the initial model: > 0)."""
    run = copy_of(finished[0], tmp_path)
    train(data, run, "--resume", "--steps", "3", "--reg", "reset", "--allow-change", "reg", "--allow-change", "beta",
          "--log-kl-init")
    last = read_metrics(run)[-1]
    assert last["step"] == 3 and last["kl"] == pytest.approx(0, abs=1e-9) and last["kl_init"] > 1e-6


def plant_nan(file: Path, tensor: str) -> None:
    """0xFF over one tensor's bytes in a safetensors file (nan in any float format), the header intact."""
    raw = bytearray(file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    raw[8 + n + start:8 + n + end] = b"\xff" * (end - start)
    file.write_bytes(raw)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


@pytest.mark.parametrize("fault", ["truncated trainer_state.pt", "nan weights"])
def test_resume_falls_back_past_a_checkpoint_that_does_not_load(data, finished, tmp_path, capsys, fault):
    """The newest checkpoint is broken, metrics.jsonl ends in a torn line and a half-written ckpt-000003.tmp lies
    around (what kill -9 leaves): the resume warns, continues from ckpt-000001 and redoes step 2 exactly."""
    run = copy_of(finished[0], tmp_path)
    if fault == "nan weights":
        plant_nan(run / "ckpt-000002" / "model.safetensors", "model.norm.weight")
    else:
        truncate(run / "ckpt-000002" / "trainer_state.pt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward": 0.')
    (run / "ckpt-000003.tmp").mkdir()
    (run / "ckpt-000003.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    train(data, run, "--resume")
    printed = capsys.readouterr().out
    problem = ("tensor model.norm.weight has non-finite values" if fault == "nan weights" else
               "trainer_state.pt: PytorchStreamReader failed")
    assert f"warning: --resume: {run / 'ckpt-000002'} does not load (" in printed and problem in printed
    assert f"resuming from {run / 'ckpt-000001'} (step 1 of 2)" in printed
    assert "dropped its torn last line" in printed
    assert without_times(read_metrics(run)) == without_times(read_metrics(finished[0]))


def test_resume_with_no_checkpoint_that_loads_stops(data, finished, tmp_path):
    run = copy_of(finished[0], tmp_path)
    truncate(run / "ckpt-000002" / "trainer_state.pt")
    plant_nan(run / "ckpt-000001" / "model.safetensors", "model.embed_tokens.weight")
    message = error_of(lambda: train(data, run, "--resume"))
    assert f"--resume: no checkpoint in {run} loads" in message and "--overwrite" in message


def test_eval_refuses_nan_weights_naming_the_tensor(data, finished, tmp_path):
    ckpt = copy_of(finished[0], tmp_path) / "ckpt-000002"
    plant_nan(ckpt / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    message = error_of(lambda: evaluation.evaluate(evaluation.EvalConfig(
        checkpoint=str(ckpt), dataset=str(data[1]), max_new_tokens=16, system_prompt="")))
    assert message == (f"error: --checkpoint {ckpt}: model.safetensors: tensor model.layers.1.mlp.up_proj.weight "
                       f"has non-finite values")


def test_a_torn_line_inside_metrics_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "rew\n{"step": 2}\n')
    assert error_of(lambda: rundir.load_metrics(path)).startswith(f"error: {path} line 2 is not JSON")


def test_metrics_written_with_the_old_step_numbers_are_read_in_the_new(tmp_path):
    """Before issue 26, step -1 was the initial eval and step i the (i+1)-th update."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ({"step": -1, "eval/x": 1}, {"step": 0}, {"step": 1})))
    assert [r["step"] for r in rundir.load_metrics(path)] == [0, 1, 2]


# ----------------------------------------------------------------------------- ranks that do not share a filesystem

def test_ranks_that_see_different_out_dirs_stop_with_one_clean_error(data, tmp_path):
    """2 ranks (gloo), rank r's --out-dir BASE/CASE/view{r}: two nodes whose out dir is node-local. Not a hang: each
    case stops both ranks with the same error, at start-up (lock), at the first save, and at --resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29521",
                           str(ROOT / "tests" / "views_worker.py"), str(tmp_path), *map(str, data)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, path in (("lock", "lock/view{}/.lock"), ("save", "save/view{}/ckpt-000001/trainer_state.pt"),
                       ("resume", "save/view{}/ckpt-000001/trainer_state.pt")):
        for rank in (0, 1):
            message = (tmp_path / f"{case}.rank{rank}.txt").read_text()
            assert message == (f"error: rank 1 cannot see {tmp_path / path.format(rank)} as rank 0 wrote it: the out "
                               f"dir must be on a filesystem all nodes share (README: Multi-GPU)"), (case, message)
    assert (tmp_path / "save" / "view0" / "ckpt-000001" / "trainer_state.pt").exists()  # rank 0 saved, then stopped


# ----------------------------------------------------------------------------- bad flags and rows: one line each

@pytest.mark.parametrize("flags,expected", [
    (["--prompts-per-step", "0"], "--prompts-per-step must be > 0, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be > 0, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0, got 0"),
    (["--save-every", "0"], "--save-every must be > 0, got 0"),
    (["--gen-batch-size", "0"], "--gen-batch-size must be > 0, got 0"),
    (["--lr=-1e-4"], "--lr must be > 0, got -0.0001"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--gamma", "-1"], "--gamma must be >= 0, got -1.0"),
    (["--eps", "nan"], "--eps must be >= 0, got nan"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be > 0, got 0"),
    (["--steps", "0"], "--steps must be > 0, got 0"),
    (["--grader-workers", "-1"], "--grader-workers must be >= 0, got -1"),
    (["--resume", "--overwrite"], "--resume continues the run in --out-dir and --overwrite deletes it"),
    (["--allow-change", "lr"], "--allow-change applies to --resume"),
    (["--resume", "--allow-change", "learning-rate"], "--allow-change: no such flag ['learning_rate']"),
])
def test_bad_flags_stop_before_anything_loads(data, tmp_path, monkeypatch, flags, expected):
    for name in ("load_model", "load_tokenizer", "load_rows"):
        monkeypatch.setattr(loading, name, lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    assert expected in error_of(lambda: train(data, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file(data, tmp_path):
    (tmp_path / "file").write_text("")
    assert error_of(lambda: train(data, tmp_path / "file")) == f"error: --out-dir {tmp_path / 'file'} is a file, " \
                                                                "not a directory"


def test_every_script_checks_its_own_flags_first(small_toy, small_tldr, tmp_path, monkeypatch):
    for name in ("load_model", "load_tokenizer", "load_rows"):
        monkeypatch.setattr(loading, name, lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    train_rows, test, policy = small_toy
    judge = ["--model", str(policy), "--judge", str(policy), "--dataset", str(train_rows), "--out-dir", str(tmp_path)]
    for flags, expected in ((["--judge-batch-size", "0"], "--judge-batch-size must be > 0"),
                            (["--sharpness-sigma", "-1"], "--sharpness-sigma must be >= 0")):
        cfg = loading.parse_config(train_judge.Config, [*judge, *flags])
        assert expected in error_of(lambda: train_judge.main(cfg))
    tldr = ["--preset", "toy", "--model", str(small_tldr[2]), "--out-dir", str(tmp_path)]
    for flags, expected in ((["--sft-batch-size", "0"], "--sft-batch-size must be > 0"),
                            (["--rm-lr", "0"], "--rm-lr must be > 0"), (["--lr", "-1"], "--lr must be > 0")):
        cfg = loading.parse_config(train_tldr.Config, [*tldr, *flags], train_tldr.PRESETS)
        assert expected in error_of(lambda: train_tldr.main(cfg))
    for flags, expected in ((["--batch-size", "0"], "--batch-size must be > 0"),
                            (["--samples", "-1"], "--samples must be >= 0"),
                            (["--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
                            (["--task", "tldr", "--temperature", "0"], "--temperature must be > 0")):
        cfg = loading.parse_config(evaluation.EvalConfig, ["--checkpoint", str(policy), *flags])
        assert expected in error_of(lambda: evaluation.evaluate(cfg))


def rows_file(tmp_path, rows, name="rows.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_are_one_line_naming_file_row_and_field(data, tmp_path):
    good = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(json.dumps(good).encode() + b'\n{"question": "caf\xe9?", "answer": "#### 1"}\n')
    assert error_of(lambda: train(data, tmp_path / "a", "--dataset", str(bad_bytes))) == \
        f"error: dataset {str(bad_bytes)!r} line 2: not UTF-8 (byte 0xe9 at column 18)"
    for answer, shown in (("It is 4.", "'It is 4.'"), ("#### abc", "'#### abc'"), ("#### ", "'#### '")):
        path = rows_file(tmp_path, [good, good, {"question": "q", "answer": answer}])
        for flag in ("--dataset", "--test-dataset"):
            split = "train" if flag == "--dataset" else "test"
            assert error_of(lambda: train(data, tmp_path / "b", flag, str(path))) == (
                f"error: dataset {str(path)!r} split {split!r} row 3: field 'answer' must end in '#### <number>' "
                f"(the gold answer), got {shown}")


def test_empty_questions_are_skipped_with_a_count(small_toy, tmp_path, capsys):
    rows = [json.loads(line) for line in Path(small_toy[0]).read_text().splitlines()][:6]
    rows[1]["question"], rows[4]["question"] = "", "  \n"
    cfg = loading.parse_config(train_math.Config, args(small_toy, tmp_path, "--dataset", str(rows_file(tmp_path, rows))),
                               train_math.PRESETS)
    train_rows, _ = train_math.load_task(cfg)
    assert [r["question"] for r in train_rows] == [rows[i]["question"] for i in (0, 2, 3, 5)]
    assert "split 'train': skipped 2 of 6 rows with an empty 'question'" in capsys.readouterr().out


def test_over_long_test_prompts_are_dropped_with_a_count(finished):
    """The training prompts' rule for the eval's: train_math drops them (count printed), eval.py those that leave no
    room for --max-new-tokens in the model's context."""
    assert "eval: dropped 1 of 9 prompts longer than 128 tokens" in finished[1]


def test_eval_drops_prompts_beyond_the_context_with_a_count(data, finished, tmp_path, capsys):
    ckpt = finished[0] / "ckpt-000002"
    rows = [json.loads(line) for line in Path(data[1]).read_text().splitlines()]
    rows[2]["question"] = "How many apples? " * 200  # beyond the toy's 512 positions
    path = rows_file(tmp_path, rows)
    summary = evaluation.evaluate(evaluation.EvalConfig(checkpoint=str(ckpt), dataset=str(path), max_new_tokens=16,
                                                        system_prompt="", dtype="float32"))
    assert "eval: dropped 1 of 9 prompts longer than 496 tokens" in capsys.readouterr().out and summary["n"] == 8


def test_load_errors_blame_the_hub_only_for_hub_ids(tmp_path):
    (tmp_path / "empty").mkdir()
    for load, what in ((loading.load_tokenizer, "tokenizer"), (lambda p: loading.load_model(p, "cpu"), "model")):
        assert error_of(lambda: load(str(tmp_path / "missing"))) == \
            f"error: {what} {str(tmp_path / 'missing')!r}: no such file or directory"
        message = error_of(lambda: load(str(tmp_path / "empty")))
        assert message.startswith(f"error: cannot load {what} {str(tmp_path / 'empty')!r}: ") and "offline" not in message
        assert "(offline? wrong id?)" in error_of(lambda: load("nobody/no-such-model"))


def test_tldr_refuses_to_redo_a_finished_stage_silently(small_tldr, tmp_path):
    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "config.json").write_text("{}")
    flags = ["--preset", "toy", "--model", str(small_tldr[2]), "--dataset", str(small_tldr[0]), "--test-dataset",
             str(small_tldr[1]), "--out-dir", str(out), "--stage", "sft"]
    cfg = loading.parse_config(train_tldr.Config, flags, train_tldr.PRESETS)
    assert error_of(lambda: train_tldr.main(cfg)) == (f"error: {out / 'sft'} holds a finished sft stage: --resume "
                                                       f"keeps it (and skips the stage), --overwrite redoes it")
    cfg = loading.parse_config(train_tldr.Config, [*flags, "--resume"], train_tldr.PRESETS)
    assert train_tldr.main(cfg)["results"] == {}  # skipped
    assert (out / "sft" / "config.json").read_text() == "{}"
