"""Reward hacking you can watch on a laptop: --reg none vs kl vs reset vs gr on the offline toys (paper §4-5).

    python study.py                                   # both toys, the sweep on one seed: ≈ 19 min on 2 cores
    python study.py --seeds 3                         # then the chosen β/γ on two more seeds (seed spread)

Two imperfect proxies, as in the paper: the toy LLM judge of train_judge.py (a 0.85M-param LM taught the App. C.5
format; the rule-based correctness is the true reward) and the toy reward model of train_tldr.py (a tiny RM
trained on a limited set of gold-labelled pairs; the programmatic gold reward is the truth). Every run is the
real script in a subprocess with matched budgets (same steps, batch, lr unless the regime says otherwise).

Protocol: on seed 0 every regime runs with a small sweep (KL β as in Tables 6-7, GR γ ∈ {1e-3, 1e-2, 1e-1});
the best β and γ by final true reward (an oracle choice, like the paper's grid search) are rerun on the other
seeds, with plain no-reg, no-reg at half the learning rate (anything that slows learning looks safer per step)
and reference resets. Outputs under --out-dir: each run's metrics.jsonl, `table.md` (final and best true
reward, proxy reward, KL to the initial policy, step at which the true reward fell 0.1 below its best) and PNGs
in the paper's style (proxy and true reward over steps with a gradient-norm panel, Fig. 7-8; true reward vs KL,
Fig. 4).
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpo

ROOT = Path(__file__).resolve().parent
TASKS = {
    "judge": dict(script="train_judge.py", args=["--preset", "toy", "--log-kl-init"],
                  proxy="rewards/judge_correctness", true="rewards/true_reward", kl="kl_init", lr=1e-4, steps=30),
    # the RL stage against the toy's SFT policy and proxy RM (built once by `prepare`), sharpness off for speed
    "rm": dict(script="train_tldr.py", args=["--preset", "toy", "--stage", "rl", "--log-kl-init",
                                             "--sharpness-perturbations", "0"],
               proxy="rewards/proxy", true="rewards/gold", kl="kl_init", lr=1e-4, steps=100),
}
BETAS = {"kl": (0.05, 0.2), "reset": (0.3,)}
GAMMAS = (1e-3, 1e-2, 1e-1)


@dataclass
class StudyConfig:
    """Run --reg none|kl|reset|gr on the toy judge and toy RM tasks and tabulate reward hacking."""
    tasks: str = field(default="judge,rm", metadata={"help": "comma-separated: judge, rm"})
    seeds: int = field(default=1, metadata={"help": "seeds (seed 0 carries the β/γ sweep)"})
    steps: int = field(default=0, metadata={"help": "RL steps of every run (0 = per task: judge 30, rm 100)"})
    reset_every: int = field(default=20, metadata={"help": "R for --reg reset (scaled down from the paper's 200)"})
    parallel: int = field(default=2, metadata={"help": "runs at a time (one thread each)"})
    out_dir: str = field(default="runs/study", metadata={"help": "where runs, table and plots go"})
    extra: str = field(default="", metadata={"help": "extra flags for every run, e.g. '--prompts-per-step 4'"})
    prepare: bool = field(default=True, metadata={"help": "build the toys' artefacts first (off when --extra "
                                                           "points the runs at other models)"})


def regimes(seed: int, best: dict) -> dict[str, list[str]]:
    """Name -> flags. Seed 0 sweeps β and γ; later seeds rerun the best of each."""
    out = {"none": ["--reg", "none"], "none-half-lr": ["--reg", "none", "--lr-scale", "0.5"]}
    for reg in ("kl", "reset"):
        for beta in (BETAS[reg] if seed == 0 else (best[reg],)):
            out[f"{reg}-b{beta:g}"] = ["--reg", reg, "--beta", str(beta)]
    for gamma in (GAMMAS if seed == 0 else (best["gr"],)):
        out[f"gr-g{gamma:g}"] = ["--reg", "gr", "--gamma", str(gamma)]
    return out


def run_one(cfg: StudyConfig, task: str, name: str, flags: list[str], seed: int) -> Path:
    spec, out = TASKS[task], Path(cfg.out_dir) / task / f"{name}-s{seed}"
    if (out / "done").exists():
        return out
    if task == "rm":  # every run shares the toy's sft/ and rm/, writes its own RL dir
        flags = flags + ["--rl-dir", str(out)]
    if "--lr-scale" in flags:  # half the task's learning rate
        i = flags.index("--lr-scale")
        flags = flags[:i] + ["--lr", str(spec["lr"] * float(flags[i + 1]))] + flags[i + 2:]
    steps = cfg.steps or spec["steps"]
    cmd = [sys.executable, spec["script"], *spec["args"], *flags, "--seed", str(seed), "--steps", str(steps),
           "--reset-every", str(cfg.reset_every), "--eval-every", str(steps), "--save-every", str(steps),
           *(["--out-dir", str(out)] if task != "rm" else []), *cfg.extra.split()]
    if spec["lr"] is not None and "--lr" not in flags:
        cmd += ["--lr", str(spec["lr"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task}/{name} seed {seed} failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    (out / "done").write_text("")
    print(f"  {task}/{name}-s{seed} done", flush=True)
    return out


def prepare(task: str) -> None:
    """Build the task's toy artefacts once (the runs themselves then only read them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    stages = ["sft", "rm"] if task == "rm" else []
    for stage in stages:
        subprocess.run([sys.executable, "train_tldr.py", "--preset", "toy", "--stage", stage, "--resume"],
                       cwd=ROOT, env=env, check=True, capture_output=True)
    if task == "judge":
        subprocess.run([sys.executable, "toy.py", "judge"], cwd=ROOT, env=env, check=True, capture_output=True)


def moving_average(xs: list[float], window: int = 10) -> list[float]:
    return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def summarize(run: Path, spec: dict) -> dict:
    """Final/best true reward, final proxy, KL to init, and the step where the true reward fell 0.1 below its best."""
    rows = [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
            if r.get("step", -1) >= 0 and spec["true"] in r]
    true, proxy = moving_average([r[spec["true"]] for r in rows]), moving_average([r[spec["proxy"]] for r in rows])
    best = max(range(len(true)), key=true.__getitem__)
    collapse = next((rows[i]["step"] for i in range(best, len(true)) if true[i] < true[best] - 0.1), None)
    return {"final_true": true[-1], "best_true": true[best], "final_proxy": proxy[-1],
            "kl_init": rows[-1].get(spec["kl"], float("nan")), "collapse_step": collapse,
            "g1_norm": moving_average([r["g1_norm"] for r in rows])[-1]}


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| regime | seeds | final true | best true | final proxy | KL to init | true fell 0.1 below best at |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, rs in results.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        spread = lambda k: (max(r[k] for r in rs) - min(r[k] for r in rs)) / 2  # noqa: E731
        fmt = lambda k: f"{mean(k):.3f}" + (f" ± {spread(k):.3f}" if len(rs) > 1 else "")  # noqa: E731
        collapse = ", ".join("—" if r["collapse_step"] is None else str(r["collapse_step"]) for r in rs)
        lines.append(f"| {name} | {len(rs)} | {fmt('final_true')} | {fmt('best_true')} | {fmt('final_proxy')} | "
                     f"{fmt('kl_init')} | {collapse} |")
    return "\n".join(lines)


def main(cfg: StudyConfig):
    from eval import plot_runs
    tasks = [t for t in cfg.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        grpo.fail(f"--tasks: unknown {unknown}; choose from {list(TASKS)}")
    report = ["# Reward-hacking study\n"]
    for task in tasks:
        spec = TASKS[task]
        if cfg.prepare:
            prepare(task)
        print(f"{task}: seed 0 sweep", flush=True)
        with ThreadPoolExecutor(cfg.parallel) as pool:
            runs = {name: pool.submit(run_one, cfg, task, name, flags, 0) for name, flags in regimes(0, {}).items()}
            runs = {name: [f.result()] for name, f in runs.items()}
        sweep = {name: summarize(r[0], spec) for name, r in runs.items()}
        best = {reg: max((n for n in sweep if n.startswith(reg + "-")), key=lambda n: sweep[n]["final_true"])
                for reg in ("kl", "reset", "gr")}
        best_values = {"kl": float(best["kl"].split("-b")[1]), "reset": float(best["reset"].split("-b")[1]),
                       "gr": float(best["gr"].split("-g")[1])}
        with ThreadPoolExecutor(cfg.parallel) as pool:
            later = {(name, s): pool.submit(run_one, cfg, task, name, flags, s)
                     for s in range(1, cfg.seeds) for name, flags in regimes(s, best_values).items()}
            for (name, _), f in later.items():
                runs[name].append(f.result())
        results = {name: [summarize(r, spec) for r in rs] for name, rs in runs.items()}
        report += [f"## {task}: proxy `{spec['proxy']}`, true `{spec['true']}`, {cfg.steps or spec['steps']} steps\n",
                   "Seed-0 sweep (every regime, one seed each):\n", table({n: results[n][:1] for n in results}), ""]
        if cfg.seeds > 1:
            report += [f"The chosen β/γ on {cfg.seeds} seeds (mean ± half-range):\n",
                       table({n: results[n] for n in results if len(results[n]) > 1}), ""]
        chosen = [runs[n][0] for n in ("none", "none-half-lr", best["kl"], best["reset"], best["gr"])]
        base = Path(cfg.out_dir) / task
        plot_runs(chosen, base / "curves.png", [("step", [spec["proxy"], spec["true"]]), ("step", ["g1_norm"])],
                  title=f"{task}: proxy vs true reward, gradient norm (seed 0)")
        plot_runs(chosen, base / "true_vs_kl.png", [(spec["kl"], [spec["true"]])],
                  title=f"{task}: true reward vs KL to the initial policy (seed 0)")
        report.append(f"![{task} curves]({task}/curves.png)\n![{task} true vs KL]({task}/true_vs_kl.png)\n")
    text = "\n".join(report)
    (Path(cfg.out_dir) / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(grpo.parse_config(StudyConfig))
