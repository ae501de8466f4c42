"""`eval.py plot` and the study's plots: default panels follow the metrics the runs have, every label fits in the
figure, no empty panel; the study's true-vs-KL curve per regime against a hand computation."""

import json
import warnings

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import plots
import study

MATH = {"reward": 3.0, "rewards/correctness": 1.0, "rewards/true_reward": 0.5, "g1_norm": 0.7, "grad_norm": 0.7,
        "gr/correction_ratio": 0.01, "completion_length": 16.0, "loss": -0.1}
JUDGE = {**MATH, "rewards/judge_correctness": 1.7}
TLDR = {"reward": 0.1, "rewards/proxy": 0.1, "rewards/gold": 2.0, "rewards/true_reward": 2.0, "grad_norm": 0.5}


def write_run(path, per_step: dict, evals: dict, steps: int = 40, eval_every: int = 20):
    """A metrics.jsonl: the initial eval at step -1, `per_step` every step, `evals` every `eval_every` steps."""
    path.mkdir(parents=True)
    records = [{"step": -1, **evals}] + [{"step": s, **{k: v + 0.01 * s for k, v in per_step.items()},
                                          **(evals if (s + 1) % eval_every == 0 else {})} for s in range(steps)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_default_panels_follow_the_metrics_the_runs_have(tmp_path):
    math_run = write_run(tmp_path / "math", MATH, {"eval/pass@1_greedy": 0.9, "eval/pass@1_sampled": 0.7})
    panels = plots.default_panels(plots.load_metrics(math_run))
    assert panels == [("step", ["reward"]), ("step", ["rewards/true_reward"]),
                      ("step", ["eval/pass@1_greedy", "eval/pass@1_sampled"]), ("step", ["g1_norm", "grad_norm"]),
                      ("step", ["completion_length"]), ("step", ["gr/correction_ratio"])]  # no KL: a GR run
    judge_run = write_run(tmp_path / "judge", JUDGE, {"eval/pass@1_greedy": 0.9, "eval/pass@1_sampled": 0.7})
    assert plots.default_panels(plots.load_metrics(judge_run))[0] == (
        "step", ["rewards/judge_correctness", "rewards/true_reward"])
    tldr_run = write_run(tmp_path / "tldr", TLDR, {"eval/kl": 0.1, "eval/gold": 2.0, "eval/proxy": 0.1,
                                                   "eval/win_rate": 0.6, "eval/bt_loss": 0.7})  # no sharpness
    assert plots.default_panels(plots.load_metrics(tldr_run)) == [
        ("step", ["rewards/proxy", "rewards/gold"]), ("eval/kl", ["eval/gold", "eval/proxy"]),
        ("step", ["eval/win_rate"]), ("step", ["grad_norm"]), ("step", ["eval/bt_loss"])]


def drawn_figure(monkeypatch):
    """The figure the next `plot_runs` saves, drawn (text extents are known after a draw)."""
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: saved.append(fig))
    return saved


@pytest.mark.parametrize("panels", [None, [("step", ["rewards/judge_correctness", "rewards/true_reward"]),
                                           ("step", ["g1_norm"])]])  # the README's judge plot
def test_every_label_fits_and_no_panel_is_empty(tmp_path, monkeypatch, panels):
    runs = [write_run(tmp_path / name, JUDGE, {"eval/pass@1_greedy": 0.9, "eval/pass@1_sampled": 0.7})
            for name in ("gsm8k_none", "gsm8k_gr")]
    saved = drawn_figure(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "No artists with labels found to put in legend"
        plots.plot_runs(runs, tmp_path / "plot.png", panels)
    fig = saved[0]
    canvas = FigureCanvasAgg(fig)  # plot_runs closed its own
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.axison]
    assert any("rewards/true_reward" in ax.get_ylabel() for ax in axes)
    for ax in axes:  # its labels, tick labels, title and legend as drawn
        box = ax.get_tightbbox(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, ax.get_ylabel()
    assert all(ax.lines for ax in fig.axes if ax.axison)


def test_plot_refuses_a_metric_no_run_logs(tmp_path):
    run = write_run(tmp_path / "math", MATH, {})
    with pytest.raises(SystemExit, match=r"error: --panel: no run logs \['rewards/gold'\]"):
        plots.plot_main([str(run), "--out", str(tmp_path / "x.png"), "--panel", "step:reward,rewards/gold"])


def test_kl_frontier_against_a_hand_computation():
    a = ([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    b = ([0.0, 1.0, 10.0, 11.0], [10.0, 20.0, 30.0, 40.0])
    # pooled KL 0 0 1 1 2 3 10 11, cut at its quantiles into 4 bins: [0, 1), [1, 2), [2, 3) (seed a alone), [3, ∞)
    assert study.kl_frontier([a, b], bins=4) == [
        (0.0, (1.0 + 10.0) / 2, 1.0, 10.0),
        (1.0, (2.0 + 20.0) / 2, 2.0, 20.0),
        ((3.0 + 10.0 + 11.0) / 3, (4.0 + 35.0) / 2, 4.0, 35.0)]
    assert study.kl_frontier([a], bins=2) == [(0.5, 1.5, 1.5, 1.5), (2.5, 3.5, 3.5, 3.5)]  # one seed: every bin
