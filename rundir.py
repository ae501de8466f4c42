"""A run's directory: who may write it, checkpoints and resuming, metrics.jsonl, per-phase timings, trackers and
summary.json.

Steps count optimizer updates done: the record, eval and checkpoint of step N come after the N-th update
(`ckpt-N`), and step 0 is the initial policy's eval, before any update.
"""

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from distributed import all_gather_objects, barrier, full_state_dict, is_main, on_rank_0
from loading import fail, weights_problem


# ----------------------------------------------------------------------------- the run dir: one writer, no overwrite

RUN_FILES = ("ckpt-*", "metrics.jsonl", "config.json", "summary.json", "tensorboard", "wandb")  # what a run writes
SHARED_FS_WAIT = 30.0  # seconds a rank waits for a file rank 0 wrote (network filesystems cache what they list)
_locks: dict[Path, int] = {}  # dir -> this process's open lock file


def check_out_dir(out) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        fail(f"--out-dir {out} is a file, not a directory")


def check_run_flags(cfg) -> None:
    """The flags that say what happens to --out-dir (--resume, --overwrite, --allow-change), before anything loads."""
    check_out_dir(cfg.out_dir)
    if cfg.resume and cfg.overwrite:
        fail("--resume continues the run in --out-dir and --overwrite deletes it: pick one")
    cfg.allow_change = tuple(name.replace("-", "_") for name in cfg.allow_change)
    flags = {f.name for f in dataclasses.fields(cfg)}
    if unknown := [n for n in cfg.allow_change if n not in flags]:
        fail(f"--allow-change: no such flag {unknown}")
    if cfg.allow_change and not cfg.resume:
        fail("--allow-change applies to --resume")


def lock_dir(path) -> None:
    """One writer per dir: an exclusive `flock` on `path/.lock`, held until `release_dir` or the end of the process
    (the kernel releases it, after kill -9 too). The holder writes its pid and host there for the error another
    process gets. Taking a lock this process holds already is a no-op."""
    path = Path(path).resolve()
    if path in _locks:
        return
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        fail(f"{path} is in use by another run ({holder}): one run writes a dir at a time; wait for that one to end "
             f"or pick another --out-dir")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    os.fsync(fd)  # other nodes read it (`check_shared`)
    _locks[path] = fd


def release_dir(path) -> None:
    fd = _locks.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)


def lock_out_dir(out) -> None:
    """`lock_dir` on rank 0 (creating `out`), which every rank then sees (`check_shared`)."""
    out = Path(out)

    def lock():
        check_out_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        lock_dir(out)
    on_rank_0(lock)
    check_shared(out / ".lock")


def claim_out_dir(out, *, resume: bool, overwrite: bool) -> None:
    """Before a run writes `out`: one writer (`lock_out_dir`), and never over another run's files. A fresh run into a
    dir that holds some (RUN_FILES) stops, unless --overwrite, which deletes them first; --resume continues them."""
    out = Path(out)
    lock_out_dir(out)

    def claim():
        found = sorted({p for pattern in RUN_FILES for p in out.glob(pattern)})
        if found and not resume:
            if not overwrite:
                fail(f"--out-dir {out} holds a run ({', '.join(p.name for p in found)}): --resume continues it, "
                     f"--overwrite deletes it and starts afresh")
            for p in found:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            print(f"--overwrite: deleted the previous run in {out} ({', '.join(p.name for p in found)})")
    on_rank_0(claim)


def check_shared(path: Path) -> None:
    """Every rank must see the file `path` as rank 0 wrote it (its size and mtime): the run's dir is on a filesystem
    all nodes share. Otherwise every rank stops with the same error (rather than hang in a collective, or resume from
    another step than rank 0)."""
    def stamp():
        try:
            with open(path, "rb") as f:  # opened, not stat'ed: NFS revalidates what it caches on open
                st = os.fstat(f.fileno())
            return st.st_size, int(st.st_mtime)
        except OSError:
            return None

    expected = all_gather_objects(stamp())[0]
    deadline = time.time() + SHARED_FS_WAIT
    while stamp() != expected and time.time() < deadline:
        time.sleep(0.5)
    missing = [rank for rank, seen in enumerate(all_gather_objects(stamp())) if seen != expected]
    if missing:
        fail(f"rank {', '.join(map(str, missing))} cannot see {path} as rank 0 wrote it: the out dir must be on a "
             f"filesystem all nodes share (README: Multi-GPU)")


def write_atomic(path, text: str) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def save_checkpoint(out_dir, step: int, model, optimizer, tokenizer, ref_model=None, keep: int = 2) -> Path:
    """Write `out_dir/ckpt-{step}`: a HF dir (safetensors) that `from_pretrained` loads, plus `trainer_state.pt`
    (optimizer, step) and, for reference resets, `reference/`. Atomic; every rank must see it (`check_shared`). Then
    only the newest `keep` checkpoints of steps up to `step` are kept: later ones are from before a resume that fell
    back past them (they did not load), and stay for the user to look at."""
    out_dir = Path(out_dir)
    optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
    final = save_pretrained(out_dir / f"ckpt-{step:06d}", model, tokenizer, reference=ref_model,
                            files={"trainer_state.pt": {"optimizer": optim_state, "step": step}})
    check_shared(final / "trainer_state.pt")
    if is_main():
        for old in [c for c in checkpoints(out_dir) if checkpoint_step(c) <= step][:-keep]:
            shutil.rmtree(old)
    return final


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("ckpt-"))


def checkpoints(out_dir) -> list[Path]:
    """The checkpoint dirs, oldest step first (a half-written `ckpt-N.tmp` is not one)."""
    found = [p for p in Path(out_dir).glob("ckpt-*") if p.name.removeprefix("ckpt-").isdigit()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir) -> Path | None:
    done = [p for p in checkpoints(out_dir) if (p / "trainer_state.pt").exists()]
    return done[-1] if done else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a run cannot resume from `ckpt` (None if it can): trainer_state.pt does not load (e.g. truncated by a
    kill) or holds another step, or its weights or reference/'s do not load or are not finite."""
    try:
        step = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu", mmap=True)["step"]
    except Exception as e:  # whatever stops it loading rules the checkpoint out
        return f"trainer_state.pt: {(str(e).splitlines() or [type(e).__name__])[0]}"
    if step != checkpoint_step(ckpt):
        return f"trainer_state.pt is of step {step}"
    if not any(ckpt.glob("*.safetensors")):
        return "no *.safetensors weights"
    for weights in (ckpt, ckpt / "reference"):
        if weights.exists() and (problem := weights_problem(weights)):
            return problem if weights == ckpt else f"reference/{problem}"
    return None


def flag_changes(cfg, saved: dict, free) -> list[tuple[str, object, object]]:
    """(flag, the run's value, now) of each field of the dataclass `cfg` outside `free` that differs from the run's
    config.json (a field the run did not record had its default)."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cfg)}))
    return [(k, saved.get(k, defaults[k]), v) for k, v in now.items()
            if k not in free and saved.get(k, defaults[k]) != v]


def described(changes) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {now} (the run's: {was})" for k, was, now in changes)


def resume_point(out, cfg, *, free, allowed) -> Path | None:
    """--resume, decided once by rank 0: each field of the dataclass `cfg` but the `free` ones must equal the run's
    config.json, unless `allowed` names it; the checkpoint is the newest that loads (`checkpoint_problem`), with a
    warning for each newer one that does not. Every rank must see that checkpoint (`check_shared`). None: `out` has no
    checkpoint (a fresh start). Prints what it resumes."""
    out = Path(out)

    def decide():
        config = out / "config.json"
        saved = json.loads(config.read_text()) if config.exists() else {}
        changes = flag_changes(cfg, saved, free)
        if refused := [c for c in changes if c[0] not in allowed]:
            fail(f"--resume: flags that define the experiment differ from {config}: {described(refused)}; pass the "
                 f"run's values, or name each flag to change with --allow-change")
        if changes:
            print(f"--resume: continuing with {described(changes)}")
        found = checkpoints(out)
        for ckpt in reversed(found):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                print(f"--resume: resuming from {ckpt} (step {checkpoint_step(ckpt)} of {cfg.steps})")
                return ckpt.name
            print(f"warning: --resume: {ckpt} does not load ({problem}); falling back to the checkpoint before it")
        if found:
            fail(f"--resume: no checkpoint in {out} loads (see the warnings above); --overwrite starts afresh")
        print(f"--resume: no checkpoint in {out}, starting afresh")
        return None

    name = on_rank_0(decide)
    if name is None:
        return None
    check_shared(out / name / "trainer_state.pt")
    return out / name


def load_trainer_state(ckpt: Path, model, optimizer) -> int:
    """Restore the optimizer (sharded as `model` is) from a checkpoint; return the step to resume at."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return state["step"]


# ----------------------------------------------------------------------------- metrics and timings

def load_metrics(run) -> list[dict]:
    """Records of a metrics.jsonl file or of a run dir's metrics.jsonl (step 0: the initial policy's eval). A torn last
    line (what a kill while writing it leaves) is dropped with a warning; any other line that is not JSON stops."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.exists():
        fail(f"no metrics at {path}")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                fail(f"{path} line {n} is not JSON: {line[:80]!r}")
            print(f"warning: {path}: dropped its torn last line {line[:40]!r}... (a run stopped while writing it)")
    if records and records[0]["step"] == -1:  # written before steps counted updates done (initial eval -1, update i: i)
        records = [{**r, "step": r["step"] + 1} for r in records]
    return records


def restart_metrics(out, start: int) -> None:
    """Rewrite out/metrics.jsonl (atomically) with the records up to step `start`: a resumed run redoes the steps after
    its checkpoint, a fresh one (start 0) begins it empty. Rank 0."""
    path = Path(out) / "metrics.jsonl"
    kept = [r for r in load_metrics(path) if r["step"] <= start] if start and path.exists() else []
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


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
    names, at the record's step; the config is logged once. Rank 0 only."""
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
            send(scalars, record["step"])

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
    steps = [r for r in records if r["step"] > 0]
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


def closing_line(out, stopped: str, summary: dict) -> str:
    """How the run ended and what it wrote where: the last line a log shows."""
    ckpt = latest_checkpoint(out)
    return (f"run {'completed' if stopped == 'completed' else 'stopped'}: {summary['steps_done']} steps in "
            f"{duration(summary['wall_seconds_this_run'])}; wrote {out}/: metrics.jsonl, summary.json"
            f"{', ' + ckpt.name if ckpt else ''}")
