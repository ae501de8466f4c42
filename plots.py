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


def plot_runs(runs, out, panels: list[tuple[str, list[str]]], *, title: str | None = None, smooth: int = 10) -> Path:
    """One subplot per (x key, [y keys]) panel, one line per run and y key (records lacking either are skipped).
    Per-step series longer than 3·smooth are shown as a `smooth`-step moving average. Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = {Path(r).name if Path(r).is_dir() else str(r): load_metrics(r) for r in runs}
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
        ax.set_ylabel(", ".join(ys))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
                        help="x key and y keys of one subplot; repeatable (default: the TL;DR panels)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window of per-step series")
    args = parser.parse_args(argv)
    if any(":" not in p for p in args.panel or []):
        fail("--panel takes X:Y1,Y2 (e.g. step:rewards/proxy,rewards/gold)")
    panels = [(p.split(":", 1)[0], p.split(":", 1)[1].split(",")) for p in args.panel or []] or TLDR_PANELS
    path = plot_runs(args.runs, args.out, panels, smooth=args.smooth)
    print(path)
    return path
