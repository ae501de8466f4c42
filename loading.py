"""What a run reads before it works: its flags, models, tokenizers and datasets. Bad input stops here, with one
`error:` line, before any real work."""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch


def fail(message: str):
    """Bad input: one line on stderr, exit status 1, before any real work."""
    raise SystemExit(f"error: {message}")


def parse_config(cls, argv=None, presets: dict[str, dict] | None = None):
    """Dataclass -> argparse: one `--flag-name` per field, help text from `field(metadata={"help": ...})`.

    `--preset NAME` first applies a named set of defaults (e.g. the offline toy); explicit flags win.
    """
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


def check_model_path(name_or_path: str, what: str = "--model") -> None:
    """A local path must exist; anything else is treated as a hub id (`org/name`)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if (looks_local or name_or_path.count("/") != 1) and not Path(name_or_path).expanduser().exists():
        fail(f"{what} {name_or_path!r}: no such directory (and not a hub id of the form org/name)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    config = Path(name_or_path) / "tokenizer_config.json"
    generic = config.exists() and json.loads(config.read_text()).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    try:  # AutoTokenizer would swap a generic tokenizer (our toys') for the model type's class
        tok = (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        fail(f"cannot load tokenizer {name_or_path!r} (offline? wrong id?): {str(e).splitlines()[0]}")
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
    except OSError as e:
        fail(f"cannot load model {str(name_or_path)!r} (offline? wrong id?): {str(e).splitlines()[0]}")
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
    try:
        rm = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=dtype,
                                                                trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        fail(f"cannot load reward model {str(name_or_path)!r}: {str(e).splitlines()[0]}")
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
            kind = {".jsonl": "json"}.get(path.suffix, path.suffix[1:])
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(dataset, config, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        fail(f"cannot load dataset {dataset!r} split {split!r} (offline? wrong id?): {str(e).splitlines()[0]}")
    if len(ds) == 0:
        fail(f"dataset {dataset!r} split {split!r} is empty")
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        fail(f"dataset {dataset!r} lacks field(s) {missing}; it has {ds.column_names}")
    return list(ds)
