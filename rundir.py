"""A run's directory: checkpoints, metrics.jsonl, per-phase timings, trackers and summary.json."""

import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from distributed import all_gather_objects, barrier, full_state_dict, is_main
from loading import fail


# ----------------------------------------------------------------------------- checkpoints

def save_pretrained(path, model, tokenizer, *, files: dict | None = None, reference=None) -> Path:
    """Write `path` as a HF dir that `from_pretrained` loads (safetensors + tokenizer), atomically: into a temp dir,
    then renamed. Every rank calls it (the weights are gathered), rank 0 writes. `files`: {name: str written as text
    | any other object, written with torch.save}; `reference`: a second model, saved under `reference/`."""
    path = Path(path)
    state = full_state_dict(model)
    ref_state = full_state_dict(reference) if reference is not None else None
    if is_main():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        if ref_state is not None:
            reference.save_pretrained(tmp / "reference", state_dict=ref_state)
        for name, obj in (files or {}).items():
            (tmp / name).write_text(obj) if isinstance(obj, str) else torch.save(obj, tmp / name)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()
    return path


def save_checkpoint(out_dir, step: int, model, optimizer, tokenizer, ref_model=None, keep: int = 1) -> Path:
    """Write `out_dir/ckpt-{step}`: a HF dir (safetensors) that `from_pretrained` loads, plus `trainer_state.pt`
    (optimizer, step) and, for reference resets, `reference/`. Atomic; older checkpoints beyond `keep` are removed
    afterwards."""
    out_dir = Path(out_dir)
    optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
    final = save_pretrained(out_dir / f"ckpt-{step:06d}", model, tokenizer, reference=ref_model,
                            files={"trainer_state.pt": {"optimizer": optim_state, "step": step}})
    if is_main():
        for old in sorted(out_dir.glob("ckpt-??????"))[:-keep]:
            shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    done = sorted(p for p in Path(out_dir).glob("ckpt-??????") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_trainer_state(ckpt: Path, model, optimizer) -> int:
    """Restore the optimizer (sharded as `model` is) from a checkpoint; return the step to resume at."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return state["step"]


# ----------------------------------------------------------------------------- metrics and timings

def load_metrics(run) -> list[dict]:
    """Records of a metrics.jsonl file or of a run dir's metrics.jsonl (step -1: the initial policy's eval)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.exists():
        fail(f"no metrics at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_jsonl(path, record: dict) -> None:
    if is_main():
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Timer:
    """`with timer("gen"): ...` accumulates wall seconds per phase (syncing CUDA for honest numbers)."""

    def __init__(self):
        self.times = {}

    def __call__(self, name):
        self._name = name
        return self

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        key = f"time/{self._name}"
        self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - self._t0


def duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


# ----------------------------------------------------------------------------- trackers and summary

TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --report-to value -> the package it needs
BEST = {"pass@1_greedy": max, "pass@1_sampled": max, "win_rate": max, "gold": max, "bt_accuracy": max,
        "bt_loss": min}  # eval metrics whose best value summary.json reports
PHASES = ("generate", "score", "reference", "update", "eval")


def check_trackers(report_to) -> None:
    """The trackers are optional packages: a missing one is one error line at start, before any work."""
    import importlib.util
    for name in report_to:
        if name != "none" and importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            fail(f"--report-to {name} needs the {TRACKER_PACKAGES[name]} package: pip install {TRACKER_PACKAGES[name]}")


def open_trackers(report_to, config: dict, out_dir):
    """(log, close): log(record) sends a metrics.jsonl record's numbers to every --report-to tracker under the same
    names, at the record's step (the initial eval, step -1, at step 0); the config is logged once. Rank 0 only."""
    sinks = []
    if is_main() and "wandb" in report_to:
        import wandb
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gr-rl"), name=Path(out_dir).name, dir=str(out_dir),
                         config=config)
        sinks.append((lambda scalars, step: run.log(scalars, step=step), run.finish))
    if is_main() and "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        sinks.append((lambda scalars, step: [writer.add_scalar(k, v, step) for k, v in scalars.items()], writer.close))

    def log(record: dict) -> None:
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for send, _ in sinks:
            send(scalars, max(record["step"], 0))

    def close() -> None:
        for _, finish in sinks:
            finish()
    return log, close


def write_summary(out_dir, *, stopped: str, seconds: float, sequences_per_step: int) -> dict:
    """OUT_DIR/summary.json from metrics.jsonl (the whole run, resumed parts included): how it stopped, final and
    best eval metrics with their steps, mean seconds per step of each phase and its share, rollout tokens per second
    (all ranks), peak GPU memory (the largest rank's). Every rank calls it (the memory is gathered); rank 0 writes."""
    peak = max(all_gather_objects(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0))
    if not is_main():
        return {}
    records = load_metrics(out_dir)
    steps = [r for r in records if r["step"] >= 0]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    times = {p: sum(r.get(f"time/{p}", 0.0) for r in steps) / max(len(steps), 1) for p in PHASES}
    generated = sum(r.get("completion_length", 0.0) * sequences_per_step for r in steps)
    summary = {
        "stopped": stopped, "steps_done": len(steps), "wall_seconds_this_run": round(seconds, 1),
        "final_eval": {"step": evals[-1]["step"], **{k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}}
        if evals else {},
        "best_eval": {},
        "seconds_per_step": {p: round(t, 4) for p, t in times.items()},
        "share_of_step": {p: round(t / max(sum(times.values()), 1e-12), 4) for p, t in times.items()},
        "rollout_tokens_per_second": generated / max(sum(r.get("time/generate", 0.0) for r in steps), 1e-12),
        "peak_gpu_memory_gib": round(peak / 2**30, 3) if torch.cuda.is_available() else None}
    for key, pick in BEST.items():
        seen = [(r[f"eval/{key}"], r["step"]) for r in evals if f"eval/{key}" in r]
        if seen:
            value, step = pick(seen)
            summary["best_eval"][key] = {"value": value, "step": step}
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
