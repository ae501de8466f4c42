"""study.py smoke: two seeds of a tiny sweep on a small toy judge write the seeded table and the plots."""

import loading
import study


def test_study_smoke(small_judge_toy, tmp_path, monkeypatch):
    train, test, policy, judge = small_judge_toy
    extra = (f"--model {policy} --judge {judge} --dataset {train} --test-dataset {test} --prompts-per-step 4 "
             f"--group-size 4 --max-new-tokens 16 --judge-max-new-tokens 24 --eval-limit 4 --eval-pairs 4 "
             f"--sharpness-perturbations 2 --sharpness-prompts 4")
    cfg = loading.parse_config(study.StudyConfig, ["--tasks", "judge", "--seeds", "2", "--steps", "2", "--no-prepare",
                                                   "--out-dir", str(tmp_path), "--extra", extra])
    monkeypatch.setattr(study, "REGIMES", {k: study.REGIMES[k] for k in ("none", "gr-g0.01")})
    text = study.main(cfg)
    assert text == (tmp_path / "table.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"regime", "none", "gr-g0.01"} and rows["none"][1] == "2"  # both seeds ran
    assert " ± " in rows["none"][2]  # mean ± sd over the seeds
    assert rows["none"][6] == "—" and rows["gr-g0.01"][6] != "—"  # GR's correction ratio: GR runs only
    for seed in (0, 1):
        records = study.load_metrics(tmp_path / "judge" / f"gr-g0.01-s{seed}")
        assert "gr/correction_ratio" in records[1] and "eval/sharpness" in records[-1]
    for png in ("true_vs_kl.png", "diagnostics.png"):
        assert (tmp_path / "judge" / png).read_bytes()[:4] == b"\x89PNG"
