"""study.py smoke: a 2-step sweep on a small toy judge writes the table and the plots."""

from pathlib import Path

import grpo
import study


def test_study_smoke(small_judge_toy, tmp_path, monkeypatch):
    train, test, policy, judge = small_judge_toy
    extra = (f"--model {policy} --judge {judge} --dataset {train} --test-dataset {test} --prompts-per-step 4 "
             f"--group-size 4 --max-new-tokens 16 --judge-max-new-tokens 24 --eval-limit 4")
    cfg = grpo.parse_config(study.StudyConfig, ["--tasks", "judge", "--seeds", "2", "--steps", "2", "--no-prepare",
                                                "--out-dir", str(tmp_path), "--extra", extra])
    monkeypatch.setattr(study, "BETAS", {"kl": (0.05,), "reset": (0.3,)})  # a one-point sweep keeps it short
    monkeypatch.setattr(study, "GAMMAS", (1e-2,))
    study.main(cfg)
    text = (tmp_path / "table.md").read_text()
    for regime in ("none", "none-half-lr", "kl-b0.05", "reset-b0.3", "gr-g0.01"):
        assert f"| {regime} |" in text
    assert "| none | 2 |" in text  # the second seed ran
    assert (tmp_path / "judge" / "curves.png").stat().st_size > 0 and (tmp_path / "judge" / "true_vs_kl.png").exists()
    assert Path(tmp_path / "judge" / "gr-g0.01-s1" / "metrics.jsonl").exists()
