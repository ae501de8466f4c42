"""The one supervised loop: the SFT and reward-model stages of train_tldr.py and the toy builders of toy.py."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distributed import all_reduce_sum, is_main, keep_freed_memory, rank_and_world
from generation import position_ids
from gr import clip_
from rundir import log_jsonl


def supervised_train(model, loss_fn, steps: int, *, lr: float, schedule=None, weight_decay: float = 0.0,
                     max_grad_norm: float = 1.0, name: str = "sft", log_path=None, print_every: int = 0) -> dict:
    """AdamW at lr × schedule(step), gradient clipped to `max_grad_norm`, a non-finite loss stops it before the
    update. `loss_fn(step)` runs forward and backward over this rank's micro-batches of one optimizer step and returns
    {"loss": this rank's loss, whose average over ranks is the global loss (FSDP averages the ranks' gradients), other
    metric: a tensor that sums over ranks}. Logs {step, loss, grad_norm, lr, ...} to a fresh `log_path` (rank 0);
    returns the last record."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or (lambda s: 1.0))
    world = rank_and_world()[1]
    if params[0].device.type == "cpu":
        keep_freed_memory()
    if log_path is not None and is_main():
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("")
    record = {}
    model.train()
    for step in range(steps):
        out = loss_fn(step)
        grad_norm = clip_([p.grad for p in params if p.grad is not None], max_grad_norm)
        sums = all_reduce_sum(torch.stack([v.detach().float().reshape(()) for v in out.values()])).tolist()
        values = {k: v / world if k == "loss" else v for k, v in zip(out, sums)}
        norm = grad_norm.item()
        if not (np.isfinite(values["loss"]) and np.isfinite(norm)):
            raise FloatingPointError(f"{name} step {step}: non-finite loss ({values['loss']}) or gradient norm "
                                     f"({norm}); stopping")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, **values, "grad_norm": norm, "lr": scheduler.get_last_lr()[0]}
        if log_path is not None:
            log_jsonl(log_path, record)
        if print_every and ((step + 1) % print_every == 0 or step + 1 == steps) and is_main():
            print(f"  {name} step {step + 1}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                  flush=True)
    model.eval()
    return record


def sft_loss(model, input_ids, attention_mask, loss_mask):
    """Mean next-token cross-entropy over the tokens where loss_mask = 1 (the completion). All (N, L)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask)).logits[:, :-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # (N, L-1)
    m = loss_mask[:, 1:].float()
    return (nll * m).sum() / m.sum().clamp(min=1)


def sft_batch(tokenizer, prompts: list[str], completions: list[str], device, max_len: int):
    """Right-padded prompt+completion+EOS ids (N, L), mask, and the completion-only loss mask."""
    ids, loss = [], []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (p_ids + c_ids)[:max_len]
        ids.append(seq)
        loss.append(([0] * len(p_ids) + [1] * len(c_ids))[:max_len])
    L = max(map(len, ids))
    input_ids = torch.full((len(ids), L), tokenizer.pad_token_id, dtype=torch.long)
    mask, loss_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (seq, lm) in enumerate(zip(ids, loss)):
        input_ids[i, :len(seq)], mask[i, :len(seq)], loss_mask[i, :len(seq)] = torch.tensor(seq), 1, torch.tensor(lm)
    return input_ids.to(device), mask.to(device), loss_mask.to(device)
