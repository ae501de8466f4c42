"""Curves of one or several runs from their metrics.jsonl, in the paper's style (`python eval.py plot`)."""

import math
from pathlib import Path

from loading import fail
from rundir import load_metrics


def moving_average(xs, window: int = 10) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


# the paper's Fig. 3/4 quantities: proxy vs gold reward over steps, gold reward vs KL to the initial policy, ...
TLDR_PANELS = [("step", ["rewards/proxy", "rewards/gold"]), ("eval/kl", ["eval/gold", "eval/proxy"]),
               ("step", ["eval/win_rate"]), ("step", ["grad_norm"]), ("step", ["eval/bt_loss"]),
               ("step", ["eval/sharpness"])]
# Fig. 7-8: the judge's reward against the rule-based truth, and what the judge gets wrong
JUDGE_PANELS = [("step", ["rewards/judge_correctness", "rewards/true_reward"]),
                ("step", ["eval/pass@1_greedy", "eval/pass@1_sampled"]), ("step", ["g1_norm", "grad_norm"]),
                ("step", ["eval/bt_accuracy"]), ("step", ["eval/sharpness"]), ("step", ["gr/correction_ratio"]),
                ("step", ["kl"])]
# Fig. 6: rule rewards on GSM8K / MATH
MATH_PANELS = [("step", ["reward"]), ("step", ["rewards/true_reward"]),
               ("step", ["eval/pass@1_greedy", "eval/pass@1_sampled"]), ("step", ["g1_norm", "grad_norm"]),
               ("step", ["completion_length"]), ("step", ["gr/correction_ratio"]), ("step", ["kl"])]
# each kind of run is told apart by a metric that only it logs
DEFAULT_PANELS = {"rewards/proxy": TLDR_PANELS, "rewards/judge_correctness": JUDGE_PANELS, "reward": MATH_PANELS}


def numeric_keys(records: list[dict]) -> set[str]:
    return {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def default_panels(records: list[dict]) -> list[tuple[str, list[str]]]:
    """The paper's panels for the kind of run these records come from, keeping only the metrics they have."""
    keys = numeric_keys(records)
    kind = next((k for k in DEFAULT_PANELS if k in keys), None)
    if kind is None:
        fail(f"no default panels for runs without any of {list(DEFAULT_PANELS)}: pass --panel X:Y1,Y2")
    return [(x, [y for y in ys if y in keys]) for x, ys in DEFAULT_PANELS[kind] if x in keys and keys & set(ys)]


def plot_runs(runs, out, panels: list[tuple[str, list[str]]] | None = None, *, title: str | None = None,
              smooth: int = 10) -> Path:
    """One subplot per (x key, [y keys]) panel (default: `default_panels`), one line per run and y key (records
    lacking either are skipped). Per-step series longer than 3·smooth are shown as a `smooth`-step moving average.
    Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = {Path(r).name if Path(r).is_dir() else str(r): load_metrics(r) for r in runs}
    panels = panels or default_panels([r for records in data.values() for r in records])
    cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(5 * cols, 3.6 * n_rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (x, ys) in zip(axes.flat, panels):
        for k, (name, records) in enumerate(data.items()):
            for j, y in enumerate(ys):  # one colour per run, one line style per key
                pts = sorted((r[x], r[y]) for r in records if isinstance(r.get(x), (int, float))
                             and isinstance(r.get(y), (int, float)) and math.isfinite(r[y]))
                if not pts:
                    continue
                xs, vs = zip(*pts)
                if x == "step" and len(vs) > 3 * smooth:
                    vs = moving_average(vs, smooth)
                ax.plot(xs, vs, marker="o" if len(xs) < 30 else None, markersize=3,
                        label=y if len(data) == 1 else f"{name}: {y}",
                        color=colors[(j if len(data) == 1 else k) % len(colors)],
                        linestyle="-" if len(data) == 1 else ("-", "--", ":", "-.")[j % 4])
        ax.set_xlabel(x)
        ax.set_ylabel("\n".join(ys), fontsize=9 if len(ys) > 1 else 10)  # one key a line: long names fit
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_main(argv: list[str]) -> Path:
    import argparse
    parser = argparse.ArgumentParser(prog="eval.py plot", description="metrics.jsonl curves of one or more runs")
    parser.add_argument("runs", nargs="+", help="run dirs (metrics.jsonl inside) or metrics.jsonl files")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--panel", action="append", metavar="X:Y1,Y2",
                        help="x key and y keys of one subplot; repeatable (default: the paper's panels for the kind "
                             "of run, TL;DR, judge or rule rewards, with the metrics the runs have)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window of per-step series")
    args = parser.parse_args(argv)
    if any(":" not in p for p in args.panel or []):
        fail("--panel takes X:Y1,Y2 (e.g. step:rewards/proxy,rewards/gold)")
    panels = [(p.split(":", 1)[0], p.split(":", 1)[1].split(",")) for p in args.panel or []]
    keys = numeric_keys([r for run in args.runs for r in load_metrics(run)])
    missing = sorted({k for x, ys in panels for k in (x, *ys)} - keys)
    if missing:
        fail(f"--panel: no run logs {missing}; they log {sorted(keys)}")
    path = plot_runs(args.runs, args.out, panels or None, smooth=args.smooth)
    print(path)
    return path
