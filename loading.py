"""What a run reads before it works: its flags, models, tokenizers and datasets. Bad input stops here, with one
`error:` line, before any real work."""

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch


def fail(message: str):
    """Bad input: one line on stderr, exit status 1, before any real work."""
    raise SystemExit(f"error: {message}")


def parse_config(cls, argv=None, presets: dict[str, dict] | None = None):
    """Dataclass -> argparse: one `--flag-name` per field, help text from `field(metadata={"help": ...})`.

    `--preset NAME` first applies a named set of defaults (e.g. the offline toy); explicit flags win. Every script
    starts here, so this is also where HF's progress bars are kept out of log files.
    """
    hf_progress_bars_on_terminal_only()
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="named defaults; explicit flags override them")
    for f in dataclasses.fields(cls):
        flag, default, help_ = "--" + f.name.replace("_", "-"), f.default, f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.metadata.get("repeatable"):  # --flag a --flag b -> (a, b); none given -> the field's default
            parser.add_argument(flag, action="append", help=f"{help_} (repeatable; default: {' '.join(default)})",
                                choices=f.metadata.get("choices"))
        else:
            kind = f.metadata.get("type") or {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, default=default, help=help_, choices=f.metadata.get("choices"))
    if presets:
        known, _ = parser.parse_known_args(argv)
        if known.preset:
            parser.set_defaults(**presets[known.preset])
    args = vars(parser.parse_args(argv))
    args.pop("preset", None)
    for f in dataclasses.fields(cls):
        if f.metadata.get("repeatable"):
            args[f.name] = tuple(args[f.name] or f.default)
    return cls(**args)


def check_ranges(cfg, *, positive=(), non_negative=()) -> None:
    """One `error:` line for the first of these flags out of its range (nan and inf included), before anything loads;
    a flag left None is filled in later from its default."""
    for names, ok, bound in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                fail(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path: what the hub is asked for."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and not Path(name).expanduser().exists()


def hf_progress_bars_on_terminal_only() -> None:
    """HF's own progress bars (loading weights, writing model shards, generating a dataset split) on a terminal only:
    in a log file their carriage returns run into the step lines."""
    if not sys.stderr.isatty():
        import datasets
        import transformers
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def check_model_path(name_or_path: str, what: str = "--model") -> None:
    """A local path must exist; anything else is treated as a hub id (`org/name`)."""
    if not is_hub_id(name_or_path) and not Path(name_or_path).expanduser().exists():
        fail(f"{what} {name_or_path!r}: no such directory (and not a hub id of the form org/name)")


def cannot_load(what: str, name, error: Exception):
    """The one line of a failed load: "(offline? wrong id?)" for a hub id only; "no such file or directory" for a local
    path that does not exist; the loader's reason for one that does."""
    name, cause = str(name), error.__cause__ or error
    reason = (str(cause).splitlines() or [type(cause).__name__])[0]
    if is_hub_id(name):
        fail(f"cannot load {what} {name!r} (offline? wrong id?): {reason}")
    if not Path(name).expanduser().exists():
        fail(f"{what} {name!r}: no such file or directory")
    fail(f"cannot load {what} {name!r}: {reason}")


def weights_problem(path) -> str | None:
    """Why the safetensors weights of the HF dir `path` cannot be used (None if they can, or if it has none): a file
    that does not read, or a tensor with a non-finite value, named."""
    from safetensors import SafetensorError, safe_open
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        return f"{file.name}: tensor {name} has non-finite values"
        except (OSError, SafetensorError) as e:
            return f"{file.name}: {str(e).splitlines()[0]}"
    return None


def check_weights(path: str, what: str) -> None:
    """A local model dir whose weights are unreadable or not finite is one `error:` line, before it is loaded."""
    if Path(path).is_dir() and (problem := weights_problem(path)):
        fail(f"{what} {path}: {problem}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    config = Path(name_or_path) / "tokenizer_config.json"
    generic = config.exists() and json.loads(config.read_text()).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    try:  # AutoTokenizer would swap a generic tokenizer (our toys') for the model type's class
        tok = (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a dir without tokenizer files
        cannot_load("tokenizer", name_or_path, e)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded so completions start at the same column
    return tok


def load_model(name_or_path, device, *, dtype=torch.float32, trust_remote_code: bool = False,
               grad_checkpointing: bool = False, cls=None):
    """A HF causal LM (or `cls`, e.g. AutoModelForSequenceClassification) in eval mode (no dropout in RL)."""
    from transformers import AutoModelForCausalLM
    cls = cls or AutoModelForCausalLM
    try:
        model = cls.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a dir without a model config
        cannot_load("model", name_or_path, e)
    model = model.to(device).eval()
    if grad_checkpointing:
        checkpoint_activations(model)
    return model


def checkpoint_activations(model) -> None:
    """Activation checkpointing for a model kept in eval mode (RL: no dropout). HF checkpoints a decoder layer only
    while that layer is in training mode, so the layers' own flags are set, not their submodules' (dropout stays
    off); a later `.eval()` or `.train()` undoes it."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m.training = True


def load_reward_model(name_or_path, device, *, pad_token_id: int, dtype=torch.float32, trust_remote_code=False):
    """An `AutoModelForSequenceClassification` with one output (a new scalar head when `name_or_path` is a causal
    LM), eval mode. `pad_token_id` is set in its config: HF's forward refuses batches without one (the score itself
    is read at the last attended token, `rewards.rm_last_token_scores`)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # HF's load report (a table in ANSI colours) for the expected new head: one line below
    try:
        rm, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError) as e:
        cannot_load("reward model", name_or_path, e)
    finally:
        logging.set_verbosity(verbosity)
    head = sorted(k for k in info["missing_keys"] if k.startswith("score."))  # a causal LM's new scalar head
    other, unused = sorted(set(info["missing_keys"]) - set(head)), sorted(info["unexpected_keys"])
    notes = []
    if head:
        notes.append(f"new scalar head {', '.join(head)}, randomly initialised (expected: a causal LM becomes the RM)")
    if other:
        notes.append(f"weights missing from the checkpoint, randomly initialised: {', '.join(other)}")
    if unused:
        notes.append(f"checkpoint weights not used: {', '.join(unused)}")
    if notes and int(os.environ.get("RANK", 0)) == 0:  # rank 0 says it once (torchrun sets RANK)
        print(("warning: " if other else "") + f"reward model {name_or_path}: " + "; ".join(notes))
    rm.config.pad_token_id = pad_token_id
    return rm.to(device).eval()


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the generation config's (Qwen-Instruct ends turns with <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def load_rows(dataset: str, split: str, fields: tuple[str, ...], config: str | None = None) -> list[dict]:
    """Rows of a local json/jsonl/parquet/csv file or a hub dataset split, checked for `fields`."""
    import datasets
    path = Path(dataset).expanduser()
    try:
        if path.suffix in (".json", ".jsonl", ".parquet", ".csv"):
            if not path.exists():
                fail(f"dataset file {dataset!r} does not exist")
            if path.stat().st_size == 0:  # datasets raises a bare StopIteration on an empty file
                fail(f"dataset {dataset!r} is empty")
            if path.suffix != ".parquet":
                check_utf8(path)
            kind = {".jsonl": "json"}.get(path.suffix, path.suffix[1:])
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(dataset, config, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        cannot_load("dataset", dataset, e)
    if len(ds) == 0:
        fail(f"dataset {dataset!r} split {split!r} is empty")
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        fail(f"dataset {dataset!r} lacks field(s) {missing}; it has {ds.column_names}")
    return list(ds)


def check_utf8(path: Path) -> None:
    """A text file that is not UTF-8 is one `error:` line naming its first bad line and byte."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"dataset {str(path)!r} line {n}: not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})")


def short_prompts(tokenizer, prompts: list[str], max_tokens: int, what: str) -> list[int]:
    """Indices of the prompts of at most `max_tokens` tokens; prints how many were dropped, fails if none is left."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_tokens]
    if len(keep) < len(prompts) and int(os.environ.get("RANK", "0")) == 0:  # rank 0 (torchrun sets RANK)
        print(f"{what}: dropped {len(prompts) - len(keep)} of {len(prompts)} prompts longer than {max_tokens} tokens")
    if not keep:
        fail(f"{what}: every prompt is longer than {max_tokens} tokens")
    return keep
