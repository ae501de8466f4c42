"""Reward hacking on the offline toys, and the mechanism the paper proposes: --reg none vs kl vs reset vs gr (§3-5).

    python study.py              # both toys, 8 regimes x 3 seeds, mean ± sd (time: see the README)
    python study.py --quick      # the earlier one-seed sweep: KL β ∈ {0.05, 0.2}, reset, GR γ ∈ {1e-3, 1e-2, 1e-1}
    python study.py --toy gaussian   # §3's own setting instead: a Gaussian policy on 2-D actions (gaussian_toy.py)

Two imperfect proxies, as in the paper: the toy LLM judge of train_judge.py (true reward: rule-based correctness)
and the toy reward model of train_tldr.py (true reward: the programmatic gold). The paper's claim is a mechanism: GR
and reference resets keep the policy where the proxy reward is flat, and there the proxy is more accurate (§3-4,
Fig. 3-4). So besides the proxy and true reward, every run logs GR's own size each step (`gr/correction_ratio` =
‖(γ/ε)(clip(g2) − g1)‖ / ‖g1‖ over the blocks), and at its evals the sharpness S of the mean proxy reward (eval.py;
σ = 0.02; 8 perturbations of J on 64 prompts for the judge, 16 on 64 for the RM) and the proxy's error on the
policy's own samples (Bradley-Terry loss / accuracy of the proxy on pairs of samples oriented by the true reward;
the judge: 128 prompts sampled twice, the RM: 128).

Protocol: every run is the real script in a subprocess with matched budgets (same steps, batch, lr): no reg, no reg
at half the lr (anything that slows learning looks safer per step), KL at β = 0.2 (the better β of the one-seed sweep
on both toys), reset (β 0.3, R = 20), GR at γ ∈ {1e-3, 1e-2, 3e-2}, and GR at γ 1e-2 whose second pass weights
the reused actions by π_{φ+εg1}/π_φ (`--gr-importance-weights`, gr-is), each on 3 seeds. Outputs under --out-dir:
each run's metrics.jsonl, table.md (mean ± sd over seeds of: final and best true reward, final proxy reward, KL to
the initial policy, GR's correction ratio, final sharpness, final proxy BT accuracy), true_vs_kl.png (true reward vs
KL to init, one curve per regime: the mean over seeds in bins of KL, their range as a band; Fig. 4 style) and
diagnostics.png (sharpness, proxy accuracy and GR's correction ratio over steps, mean over seeds).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gaussian_toy
import loading
from plots import moving_average
from rundir import load_metrics

ROOT = Path(__file__).resolve().parent
TASKS = {
    "judge": dict(script="train_judge.py", args=["--preset", "toy", "--log-kl-init", "--eval-pairs", "128",
                                                 "--sharpness-perturbations", "8", "--sharpness-prompts", "64"],
                  proxy="rewards/judge_correctness", true="rewards/true_reward", lr=1e-4, steps=30, eval_every=15),
    # the RL stage against the toy's SFT policy and proxy RM (built once by `prepare`)
    "rm": dict(script="train_tldr.py", args=["--preset", "toy", "--stage", "rl", "--log-kl-init",
                                             "--sharpness-perturbations", "16"],
               proxy="rewards/proxy", true="rewards/gold", lr=1e-4, steps=100, eval_every=25),
}
REGIMES = {"none": ["--reg", "none"], "none-half-lr": ["--reg", "none", "--lr-scale", "0.5"],
           "kl-b0.2": ["--reg", "kl", "--beta", "0.2"], "reset-b0.3": ["--reg", "reset", "--beta", "0.3"],
           **{f"gr-g{g:g}": ["--reg", "gr", "--gamma", str(g)] for g in (1e-3, 1e-2, 3e-2)},
           "gr-is-g0.01": ["--reg", "gr", "--gamma", "1e-2", "--gr-importance-weights"]}
QUICK = {**{k: v for k, v in REGIMES.items() if not k.startswith("gr")}, "kl-b0.05": ["--reg", "kl", "--beta", "0.05"],
         **{f"gr-g{g:g}": ["--reg", "gr", "--gamma", str(g)] for g in (1e-3, 1e-2, 1e-1)}}
COLUMNS = {"final_true": "final true", "best_true": "best true", "final_proxy": "final proxy", "kl_init": "KL to init",
           "correction_ratio": "GR correction / ‖g1‖", "sharpness": "final sharpness",
           "bt_accuracy": "final proxy BT accuracy"}


@dataclass
class StudyConfig:
    """Run --reg none|kl|reset|gr on the toy judge and toy RM tasks: reward hacking, sharpness, proxy error."""
    toy: str = field(default="lm", metadata={"help": "lm: the language toys (--tasks); gaussian: the Gaussian-policy "
                                                     "toy of §3 (gaussian_toy.py; uses --seeds, --steps, --parallel, "
                                                     "--out-dir)", "choices": ["lm", "gaussian"]})
    tasks: str = field(default="judge,rm", metadata={"help": "comma-separated: judge, rm"})
    seeds: int = field(default=3, metadata={"help": "seeds per regime"})
    quick: bool = field(default=False, metadata={"help": "the one-seed sweep of KL β and GR γ instead"})
    steps: int = field(default=0, metadata={"help": "RL steps of every run (0 = per task: judge 30, rm 100; the "
                                                    "Gaussian toy 300)"})
    reset_every: int = field(default=20, metadata={"help": "R for --reg reset (scaled down from the paper's 200)"})
    parallel: int = field(default=2, metadata={"help": "runs at a time (one thread each)"})
    out_dir: str = field(default="runs/study", metadata={"help": "where runs, table and plots go"})
    extra: str = field(default="", metadata={"help": "extra flags for every run, e.g. '--prompts-per-step 4'"})
    prepare: bool = field(default=True, metadata={"help": "build the toys' artefacts first (off when --extra "
                                                           "points the runs at other models)"})


def run_one(cfg: StudyConfig, task: str, name: str, flags: list[str], seed: int) -> Path:
    spec, out = TASKS[task], Path(cfg.out_dir) / task / f"{name}-s{seed}"
    if (out / "done").exists():
        return out
    if "--lr-scale" in flags:  # a fraction of the task's learning rate
        i = flags.index("--lr-scale")
        flags = flags[:i] + ["--lr", str(spec["lr"] * float(flags[i + 1]))] + flags[i + 2:]
    steps = cfg.steps or spec["steps"]
    where = ["--rl-dir", str(out)] if task == "rm" else ["--out-dir", str(out)]  # rm runs share the toy's sft/, rm/
    cmd = [sys.executable, spec["script"], *spec["args"], *flags, *where, "--seed", str(seed), "--steps", str(steps),
           "--reset-every", str(cfg.reset_every), "--eval-every", str(min(spec["eval_every"], steps)),
           "--save-every", str(steps), *([] if "--lr" in flags else ["--lr", str(spec["lr"])]), *cfg.extra.split(),
           "--overwrite"]  # an unfinished run (no `done`) from an interrupted study is redone
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task}/{name} seed {seed} failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    (out / "done").write_text("")
    print(f"  {task}/{name}-s{seed} done", flush=True)
    return out


def prepare(task: str) -> None:
    """Build the task's toy artefacts once (the runs themselves then only read them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for stage in (["sft", "rm"] if task == "rm" else []):
        subprocess.run([sys.executable, "train_tldr.py", "--preset", "toy", "--stage", stage, "--resume"],
                       cwd=ROOT, env=env, check=True, capture_output=True)
    if task == "judge":
        subprocess.run([sys.executable, "toy.py", "judge"], cwd=ROOT, env=env, check=True, capture_output=True)


def summarize(run: Path, spec: dict) -> dict:
    """One run: final/best true reward (10-step moving averages), final proxy, KL to init, the step where the true
    reward fell 0.1 below its best, GR's mean correction ratio, and the last eval's sharpness and proxy accuracy."""
    records = load_metrics(run)
    rows = [r for r in records if r["step"] > 0 and spec["true"] in r]
    true, proxy = moving_average([r[spec["true"]] for r in rows]), moving_average([r[spec["proxy"]] for r in rows])
    best = max(range(len(true)), key=true.__getitem__)
    evals = [r for r in records if "eval/sharpness" in r]
    ratios = [r["gr/correction_ratio"] for r in rows if "gr/correction_ratio" in r]
    return {"final_true": true[-1], "best_true": true[best], "final_proxy": proxy[-1],
            "kl_init": rows[-1].get("kl_init", float("nan")),
            "collapse_step": next((rows[i]["step"] for i in range(best, len(true)) if true[i] < true[best] - 0.1),
                                  None),
            "correction_ratio": statistics.mean(ratios) if ratios else float("nan"),
            "sharpness": evals[-1]["eval/sharpness"] if evals else float("nan"),
            "bt_accuracy": evals[-1].get("eval/bt_accuracy", float("nan")) if evals else float("nan")}


def mean_sd(values: list[float]) -> str:
    if any(v != v for v in values):  # nan: the metric does not apply (e.g. GR's correction without GR)
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| regime | seeds | " + " | ".join(COLUMNS.values()) + " | true fell 0.1 below best at |",
             "| --- " * (len(COLUMNS) + 3) + "|"]
    for name, rs in results.items():
        collapse = ", ".join("—" if r["collapse_step"] is None else str(r["collapse_step"]) for r in rs)
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(mean_sd([r[k] for r in rs]) for k in COLUMNS)
                     + f" | {collapse} |")
    return "\n".join(lines)


def kl_frontier(runs: list[tuple[list[float], list[float]]], bins: int = 10) -> list[tuple[float, float, float, float]]:
    """One regime's true reward as a function of KL to the initial policy, from its seeds' runs [(KL per step, true
    reward per step)]: the seeds' points pooled and cut at KL quantiles into `bins` bins; in each bin every seed's mean
    true reward, then their mean and range. Returns (mean KL of the bin's points, mean over seeds, min, max) for the
    bins that at least two seeds reach (every bin with one seed), in order of KL."""
    pooled = sorted(k for kls, _ in runs for k in kls)
    edges = [pooled[round(i * (len(pooled) - 1) / bins)] for i in range(1, bins)]
    kl_in, true_in = {}, {}  # bin -> its KL values; bin -> {seed: its true rewards there}
    for seed, (kls, trues) in enumerate(runs):
        for k, t in zip(kls, trues):
            b = sum(k >= e for e in edges)
            kl_in.setdefault(b, []).append(k)
            true_in.setdefault(b, {}).setdefault(seed, []).append(t)
    curve = []
    for b in sorted(kl_in):
        per_seed = [statistics.mean(ts) for ts in true_in[b].values()]
        if len(per_seed) >= min(2, len(runs)):
            curve.append((statistics.mean(kl_in[b]), statistics.mean(per_seed), min(per_seed), max(per_seed)))
    return curve


def regime_colors(names) -> dict[str, tuple]:
    """One colour family per kind of regime (no regularisation grey, KL blue, resets green, GR red), a darker shade
    for each further regime of the family, so the families stand apart in a plot of many regimes."""
    import matplotlib
    families = {"none": "Greys", "kl": "Blues", "reset": "Greens", "gr": "Reds"}
    members = {f: [n for n in names if n.split("-")[0] == f] for f in families}
    colors = {}
    for f, ns in members.items():
        for i, n in enumerate(ns):
            colors[n] = matplotlib.colormaps[families[f]](0.55 + 0.4 * i / max(len(ns) - 1, 1))
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: colors.get(n, cycle[i % len(cycle)]) for i, n in enumerate(names)}


def plot(task: str, spec: dict, runs: dict[str, list[Path]], out: Path) -> list[Path]:
    """true_vs_kl.png: true reward (moving average) against KL to init, one curve per regime: the mean over seeds in
    bins of KL with the seeds' range as a band (`kl_frontier`; Fig. 4). diagnostics.png: sharpness and proxy BT
    accuracy at the evals, GR's correction ratio per step; mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = regime_colors(list(runs))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, paths in runs.items():
        seeds = []
        for path in paths:
            rows = [r for r in load_metrics(path) if r["step"] >= 0 and "kl_init" in r]
            seeds.append(([r["kl_init"] for r in rows], moving_average([r[spec["true"]] for r in rows])))
        curve = kl_frontier([s for s in seeds if s[0]])
        if curve:
            kl, mean, low, high = zip(*curve)
            ax.plot(kl, mean, color=colors[name], marker="o", markersize=3, linewidth=1.5, label=name)
            ax.fill_between(kl, low, high, color=colors[name], alpha=0.15, linewidth=0)
    ax.set(xlabel="KL to the initial policy (binned)", ylabel=f"true reward ({spec['true']})",
           title=f"{task}: true reward vs KL, mean over {max(map(len, runs.values()))} seeds, band: their range")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "true_vs_kl.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, key, label in zip(axes, ("eval/sharpness", "eval/bt_accuracy", "gr/correction_ratio"),
                              ("sharpness S of the proxy reward", "proxy BT accuracy on policy pairs",
                               "GR correction / ‖g1‖")):
        for name, paths in runs.items():
            series = [[(r["step"], r[key]) for r in load_metrics(p) if key in r] for p in paths]
            if series and series[0]:
                steps = [s for s, _ in series[0]]
                means = [statistics.mean(v for _, v in column) for column in zip(*series)]
                ax.plot(steps, means if key.startswith("eval/") else moving_average(means), color=colors[name],
                        marker="o" if key.startswith("eval/") else None, markersize=3, label=name)
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{task}: mean over seeds")
    fig.tight_layout()
    fig.savefig(out / "diagnostics.png", dpi=110)
    plt.close(fig)
    return [out / "true_vs_kl.png", out / "diagnostics.png"]


def main(cfg: StudyConfig) -> str:
    if cfg.toy == "gaussian":
        return gaussian_study(cfg)
    tasks = [t for t in cfg.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        loading.fail(f"--tasks: unknown {unknown}; choose from {list(TASKS)}")
    regimes, seeds = (QUICK, 1) if cfg.quick else (REGIMES, cfg.seeds)
    report = [f"# Reward-hacking study ({'--quick' if cfg.quick else f'{seeds} seeds'})\n"]
    t0 = time.time()
    for task in tasks:
        spec = TASKS[task]
        if cfg.prepare:
            prepare(task)
        with ThreadPoolExecutor(cfg.parallel) as pool:
            futures = {name: [pool.submit(run_one, cfg, task, name, flags, s) for s in range(seeds)]
                       for name, flags in regimes.items()}
            runs = {name: [f.result() for f in fs] for name, fs in futures.items()}
        results = {name: [summarize(r, spec) for r in paths] for name, paths in runs.items()}
        base = Path(cfg.out_dir) / task
        plot(task, spec, runs, base)
        report += [f"## {task}: proxy `{spec['proxy']}`, true `{spec['true']}`, {cfg.steps or spec['steps']} steps\n",
                   table(results), "", f"![{task} true vs KL]({task}/true_vs_kl.png)",
                   f"![{task} diagnostics]({task}/diagnostics.png)\n"]
    report.append(f"Wall time: {time.time() - t0:.0f} s.")
    text = "\n".join(report)
    (Path(cfg.out_dir) / "table.md").write_text(text)
    print(text)
    return text


# ----------------------------------------------------------------------------- the Gaussian toy of §3

GAUSSIAN_COLUMNS = {"true": "final true", "best_true": "best true", "proxy": "final proxy", "G": "G",
                    "p_sharp": "P(S_K,δ)", "excess_bt": "excess BT loss", "kl_init": "KL to init",
                    "correction_ratio": "GR correction / ‖g1‖", "distance": "‖μ − a*‖"}


def gaussian_summary(history: list[dict]) -> dict:
    """One run: §3's quantities at the last evaluation, the best true reward, GR's mean correction ratio."""
    last = history[-1]
    return {**{k: last[k] for k in ("true", "proxy", "G", "p_sharp", "excess_bt", "kl_init")},
            "best_true": max(h["true"] for h in history), "distance": last["mean_distance"],
            "correction_ratio": statistics.mean(h["correction_ratio"] for h in history[1:])}


def gaussian_study(cfg: StudyConfig) -> str:
    """Every regime of gaussian_toy.REGIMES on both proxies and --seeds seeds: table.md (mean ± sd at the last
    evaluation), action_plane.png (the paths of μ_φ(0), seed 0), curves_<proxy>.png (§3's quantities over steps)
    and runs.json (every run's measurements, by proxy, seed and regime)."""
    if cfg.quick:
        loading.fail("--quick is a sweep of the language toys; the Gaussian toy has one sweep")
    toy = gaussian_toy.ToyConfig(**({"steps": cfg.steps} if cfg.steps else {}))
    t0 = time.time()
    results = gaussian_toy.sweep(toy, gaussian_toy.REGIMES, cfg.seeds, cfg.parallel)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gaussian_toy.plot_action_plane(results, out / "action_plane.png")
    (out / "runs.json").write_text(json.dumps({kind: [{name: r["history"] for name, r in run["regimes"].items()}
                                                      for run in runs] for kind, runs in results.items()}))
    bound = gaussian_toy.bt_lower_bound(toy.K, toy.lipschitz, toy.delta, 1.0)
    report = [f"# The Gaussian toy of §3 ({cfg.seeds} seeds, {toy.steps} steps)\n",
              f"σ = {toy.sigma}, L = {toy.lipschitz:.2f}, δ = {toy.delta:.2f}, K = {toy.k_over_l_delta:g}Lδ = "
              f"{toy.K:.2f}: eq. 10 bounds the excess BT loss below by {bound:.4f}·P(S_K,δ). Values at step {toy.steps} "
              f"on {toy.eval_states} "
              "held-out states; G and the distance to a* are averages over them.\n",
              "![the action plane](action_plane.png)\n"]
    for kind, runs in results.items():
        gaussian_toy.plot_curves(kind, runs, out / f"curves_{kind}.png")
        if kind == "rm":
            fit = {k: statistics.mean(r["proxy"][k] for r in runs) for k in runs[0]["proxy"]}
            about = (f"BT reward model, held-out pairs from the initial policy: BT loss {fit['rm_bt']:.3f}, accuracy "
                     f"{fit['rm_accuracy']:.3f} (R* itself: {fit['true_bt']:.3f}, {fit['true_accuracy']:.3f}); "
                     f"stopped after {fit['rm_steps']:.0f} steps on average")
        else:
            about = (f"R* + {toy.spikes} spikes of height {toy.spike_height:g} and width {toy.spike_width:g} at "
                     f"radius {toy.spike_radii[0]:g}–{toy.spike_radii[1]:g} from the origin")
        rows = {name: [gaussian_summary(r["regimes"][name]["history"]) for r in runs] for name in runs[0]["regimes"]}
        report += [f"## proxy {kind}: {about}\n", "| regime | seeds | " + " | ".join(GAUSSIAN_COLUMNS.values()) + " |",
                   "| --- " * (len(GAUSSIAN_COLUMNS) + 2) + "|"]
        report += [f"| {name} | {len(rs)} | " + " | ".join(mean_sd([r[k] for r in rs]) for k in GAUSSIAN_COLUMNS)
                   + " |" for name, rs in rows.items()]
        report.append(f"\n![{kind} curves](curves_{kind}.png)\n")
    report.append(f"Wall time: {time.time() - t0:.0f} s.")
    text = "\n".join(report)
    (out / "table.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main(loading.parse_config(StudyConfig))
