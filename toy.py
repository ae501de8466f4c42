"""The embedded offline default: tiny models of a real HF architecture, a locally trained tokenizer and
synthetic data in the real datasets' schemas, so every script runs end to end on a laptop CPU, no hub.

    python toy.py gsm8k     # build (cached under .cache/toy/): data, tokenizer, SFT policy
    python toy.py judge     # and the tiny LLM judge for train_judge.py

The training scripts call these builders themselves for `--preset toy`; artefacts are reused once built.
GSM8K toy: one-step arithmetic word problems written like GSM8K (`question`, `answer` ending in `#### N`).
The SFT policy is trained briefly on a mix of the paper's <reasoning>/<answer> format (70%) and a plain
"The answer is N." style (30%), so it follows the format part of the time and RL has room to improve.
"""

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from generation import generate_texts
from loading import load_model, load_tokenizer
from rewards import gsm8k_gold, gsm8k_messages, gsm8k_rewards, judge_messages, judge_rewards, render_chat
from supervised import sft_batch, sft_loss, supervised_train

ROOT = Path(__file__).resolve().parent / ".cache" / "toy"


def gsm8k_paths(root: Path = ROOT) -> tuple[Path, Path, Path]:
    """(train jsonl, test jsonl, SFT policy dir) of the GSM8K toy under `root`."""
    return root / "gsm8k_train.jsonl", root / "gsm8k_test.jsonl", root / "gsm8k-sft"


GSM8K_TRAIN, GSM8K_TEST, GSM8K_POLICY = gsm8k_paths()
TAGS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]

NAMES = ["Tom", "Ann", "Ravi", "Mia", "Lee", "Sara", "Omar", "Lena", "Ken", "Ada"]
ITEMS = ["apple", "book", "coin", "pencil", "card", "egg", "shell", "marble", "sticker", "cookie"]


# ----------------------------------------------------------------------------- data

def word_problem(rng: random.Random) -> dict:
    """One GSM8K-schema row: question, and an answer with the working and `#### N`."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "add_sub"])
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    if kind == "add":
        q = f"{name} has {a} {item}s. {name} buys {b} more. How many {item}s does {name} have now?"
        work, n = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a = a + b
        q = f"{name} had {a} {item}s and gave {b} to {other}. How many {item}s does {name} have left?"
        work, n = f"{a} - {b} = {a - b}", a - b
    elif kind == "mul":
        q = f"{name} buys {a} bags with {b} {item}s in each bag. How many {item}s does {name} buy?"
        work, n = f"{a} * {b} = {a * b}", a * b
    else:
        q = f"{name} has {a} {item}s, finds {b} more and loses {c}. How many {item}s does {name} have?"
        work, n = f"{a} + {b} - {c} = {a + b - c}", a + b - c
    calc = work.replace(" = ", "=")  # GSM8K's calculator annotation style
    return {"question": q, "answer": f"{name} works it out: <<{calc}>>{n}.\n#### {n}", "work": work}


def write_splits(make_row, key: str, paths: tuple[Path, Path], n_train: int, n_test: int, seed: int,
                 fields: tuple[str, ...] | None = None) -> None:
    """Sample rows with distinct `key` (train and test share none) and write train/test jsonl atomically."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_test:
        row = make_row(rng)
        if row[key] not in seen:
            seen.add(row[key])
            rows.append({k: row[k] for k in fields} if fields else row)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, part in zip(paths, (rows[:n_train], rows[n_train:])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
        os.replace(tmp, path)


def build_gsm8k_data(root: Path = ROOT, n_train: int = 4000, n_test: int = 200, seed: int = 0) -> None:
    write_splits(word_problem, "question", gsm8k_paths(root)[:2], n_train, n_test, seed, ("question", "answer"))


def sft_completion(row: dict, rng: random.Random) -> str:
    work = row["answer"].split("<<")[1].split(">>")[0].replace("=", " = ")
    n = row["answer"].split("####")[1].strip()
    if rng.random() < 0.7:
        return f"<reasoning>\n{work}\n</reasoning>\n<answer>\n{n}\n</answer>"
    return f"{work}. The answer is {n}."


# ----------------------------------------------------------------------------- tokenizer and model

def build_tokenizer(texts: list[str], vocab_size: int = 800):
    """Byte-level BPE trained on the toy corpus. Digits stay single tokens (arithmetic stays learnable), the
    four format tags are atomic, and merges stay within a line, so the long fixed prompt costs few tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(TAGS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   padding_side="left")


def tiny_qwen2(vocab_size: int, hidden: int = 96, layers: int = 4, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=1, pad_token_id=0)
    return Qwen2ForCausalLM(cfg)


def supervised(model, tokenizer, prompts: list[str], completions: list[str], *, steps: int, batch_size: int = 32,
               lr: float = 1e-3, warmup: int = 100, seed: int = 0, log_every: int = 100) -> None:
    """A short SFT run on prompt -> completion pairs (random batches), loss on completion tokens only, through
    `supervised.supervised_train`: linear warmup, then cosine decay to lr/10 (without warmup, or at 3e-3, the toy policy
    stalled before learning to copy numbers)."""
    warmup = min(warmup, steps // 5)
    rng = random.Random(seed)

    def loss_fn(step):
        idx = rng.sample(range(len(prompts)), batch_size)
        ids, mask, loss_mask = sft_batch(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx],
                                         "cpu", max_len=512)
        loss = sft_loss(model, ids, mask, loss_mask)
        loss.backward()
        return {"loss": loss}

    supervised_train(model, loss_fn, steps, lr=lr, print_every=log_every,
                     schedule=lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))


def build_gsm8k_policy(root: Path = ROOT, *, sft_steps: int = 800, n_train: int = 4000, hidden: int = 128,
                       layers: int = 4) -> Path:
    """Data, tokenizer and the SFT policy (a few minutes on 2 cores). Cached: returns at once when built."""
    train_path, _, policy = gsm8k_paths(root)
    if (policy / "model.safetensors").exists():
        return policy
    t0 = time.time()
    build_gsm8k_data(root, n_train=n_train)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    rng = random.Random(0)
    completions = [sft_completion(r, rng) for r in rows]
    plain = type("Plain", (), {"chat_template": None})()  # render without a chat template
    prompts = [render_chat(plain, gsm8k_messages(r["question"], system_prompt=None)) for r in rows]
    tokenizer = build_tokenizer(prompts + completions)
    model = tiny_qwen2(len(tokenizer), hidden=hidden, layers=layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy gsm8k: {len(rows)} train problems, vocab {len(tokenizer)}, Qwen2 with {n_params / 1e6:.2f}M params; SFT")
    torch.manual_seed(0)
    supervised(model, tokenizer, prompts, completions, steps=sft_steps)
    save_atomic(model, tokenizer, policy)
    print(f"toy gsm8k policy built in {time.time() - t0:.0f}s: {policy}")
    return policy


def save_atomic(model, tokenizer, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- GSM8K judge

def judge_path(root: Path = ROOT) -> Path:
    return root / "gsm8k-judge"


def judge_reply(correct: bool, well_formed: bool) -> str:
    """The App. C.5 reply format with the scores the judge is taught: correctness 5 or 1."""
    sentence = "The answer matches the correct solution." if correct else "The answer is wrong."
    return (f"<judgement>\n{sentence}\n</judgement>\n<correctness_score>\n{5 if correct else 1}\n"
            f"</correctness_score>\n<coherence_score>\n{5 if well_formed else 2}\n</coherence_score>")


def build_gsm8k_judge(root: Path = ROOT, *, n_train: int = 3000, sft_steps: int = 300, hidden: int = 128,
                      layers: int = 4, policy_kwargs: dict | None = None) -> Path:
    """A tiny LM taught to answer the paper's judge prompt (App. C.5) for completions sampled from the toy
    policy, labelled by the rule-based correctness. Small and briefly trained, so it is an imperfect,
    hackable proxy for correctness (§5.3). Prints its agreement with the rule on held-out completions."""
    path = judge_path(root)
    if (path / "model.safetensors").exists():
        return path
    t0 = time.time()
    policy_dir = build_gsm8k_policy(root, **(policy_kwargs or {}))
    train_path, _, _ = gsm8k_paths(root)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    rows = (rows * (1 + (n_train + 200) // len(rows)))[:n_train + 200]
    policy_tok, policy = load_tokenizer(str(policy_dir)), load_model(policy_dir, "cpu")
    plain = type("Plain", (), {"chat_template": None})()
    prompts = [render_chat(plain, gsm8k_messages(r["question"], system_prompt=None)) for r in rows]
    completions, _ = generate_texts(policy, policy_tok, prompts, max_new_tokens=32, temperature=1.0,
                                         batch_size=256, generator=torch.Generator().manual_seed(0))
    terms = [gsm8k_rewards(c, gsm8k_gold(r["answer"])) for r, c in zip(rows, completions)]
    judge_prompts = [render_chat(plain, judge_messages(r["question"], c, r["answer"])) for r, c in zip(rows, completions)]
    replies = [judge_reply(t["correctness"] > 0, t["strict_format"] > 0) for t in terms]
    tokenizer = build_tokenizer(judge_prompts + replies, vocab_size=1000)
    model = tiny_qwen2(len(tokenizer), hidden=hidden, layers=layers, seed=1)
    print(f"toy judge: {n_train} judged completions ({sum(t['correctness'] > 0 for t in terms)} correct), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; SFT")
    supervised(model, tokenizer, judge_prompts[:n_train], replies[:n_train], steps=sft_steps)
    held = slice(n_train, n_train + 200)
    scores, failures = judge_rewards(model, tokenizer, [r["question"] for r in rows[held]], completions[held],
                                     [r["answer"] for r in rows[held]])
    truth = torch.tensor([t["correctness"] > 0 for t in terms[held]])
    agreement = ((scores > 1.0) == truth).float().mean().item()
    print(f"toy judge vs rule-based correctness on 200 held-out completions: agreement {agreement:.2f}, "
          f"{failures} unparsable replies")
    save_atomic(model, tokenizer, path)
    (path / "judge_eval.json").write_text(json.dumps({"agreement": agreement, "parse_failures": failures,
                                                      "rule_correct_rate": truth.float().mean().item()}))
    print(f"toy judge built in {time.time() - t0:.0f}s: {path}")
    return path


def wait_or_build(build, marker: Path) -> None:
    """Under torchrun, rank 0 builds and the other ranks wait for its artefact."""
    if int(os.environ.get("RANK", 0)) == 0:
        build()
    while not marker.exists():
        time.sleep(1)


# ----------------------------------------------------------------------------- TL;DR toy (RLHF, train_tldr.py)
# "Summarisation" of a post that mentions 4-6 topics, e.g. prompt "Summarize: owl cat egg sun", summary " cat owl".
# Readers care about some topics more than others: every topic has a fixed importance 1-3 (TLDR_IMPORTANCE,
# known only to the gold reward). The gold reward (the programmatic stand-in for the gold RM) is the importance
# of the distinct topics of the post that a summary names minus TLDR_WORD_COST per word, so repeats, topics that
# are not in the post and topics of importance 1 cost more than they bring: the best summary names exactly the
# post's topics of importance >= 2, once each. The dataset's reference summaries are noisy (a topic of importance
# w is named with probability TLDR_INCLUDE[w]), so SFT on them leaves room for RL, and a proxy RM trained on a
# limited number of gold-labelled pairs sampled from the SFT policy is imperfect: it has seen few summaries that
# repeat or invent topics, and RL finds what it gets wrong. Summaries list topics in TLDR_WORDS order (a tiny
# model learns that within one SFT epoch; copying in the post's order needs induction heads that it does not form
# in a few CPU minutes).

TLDR_WORDS = ["apple", "bread", "cat", "dog", "egg", "fish", "goat", "hat", "ice", "jam", "kite", "lamp",
              "milk", "nut", "owl", "pear", "rose", "sun", "tree", "van", "wolf", "yak", "zebra", "box"]
TLDR_IMPORTANCE = {w: 1 + i % 3 for i, w in enumerate(TLDR_WORDS)}  # apple 1, bread 2, cat 3, dog 1, ...
TLDR_WORD_COST = 1.5
TLDR_INCLUDE = {3: 0.9, 2: 0.5, 1: 0.15}
TLDR_NO_EOS_COST = 1.0  # a summary cut off at the length limit is scored as written, minus this


def tldr_paths(root: Path = ROOT) -> tuple[Path, Path, Path]:
    """(train jsonl, test jsonl, base model dir: random-init tiny Qwen2 + tokenizer) of the TL;DR toy."""
    return root / "tldr_train.jsonl", root / "tldr_test.jsonl", root / "tldr-base"


TLDR_TRAIN, TLDR_TEST, TLDR_BASE = tldr_paths()


def tldr_topics(prompt: str) -> set[str]:
    """The topics of a toy post: the words after "Summarize:"."""
    return set(prompt.split("Summarize:", 1)[-1].split())


def tldr_gold_reward(prompt: str, completion: str, has_eos: bool = True) -> float:
    """Σ importance of the distinct post topics named − TLDR_WORD_COST × words; cut-off summaries pay
    TLDR_NO_EOS_COST. Words are whitespace-separated, stripped of `.,;:`; a repeat counts once, costs every time."""
    topics = tldr_topics(prompt)
    words = [w.strip(".,;:") for w in completion.split()]
    gain = sum(TLDR_IMPORTANCE[w] for w in set(words) if w in topics)
    return float(gain - TLDR_WORD_COST * len(words) - (0 if has_eos else TLDR_NO_EOS_COST))


def tldr_row(rng: random.Random) -> dict:
    """One row: prompt (4-6 distinct topics in random order) and a noisy reference summary."""
    topics = rng.sample(TLDR_WORDS, rng.randint(4, 6))
    order = sorted(topics, key=TLDR_WORDS.index)
    summary = ([w for w in order if rng.random() < TLDR_INCLUDE[TLDR_IMPORTANCE[w]]]
               or [max(order, key=TLDR_IMPORTANCE.get)])
    return {"prompt": "Summarize: " + " ".join(topics), "reference": " " + " ".join(summary)}  # " ": as TL;DR's


def build_tldr_data(root: Path = ROOT, n_train: int = 24000, n_test: int = 256, seed: int = 0) -> None:
    write_splits(tldr_row, "prompt", tldr_paths(root)[:2], n_train, n_test, seed)


def build_tldr_tokenizer(texts: list[str], vocab_size: int = 400):
    """Byte-level BPE like `build_tokenizer`, but with GPT-2's word-splitting regex, so merges never cross a
    word boundary: the RMs score prompt + decoded completion re-tokenised as one string (`rewards.rm_scores`),
    and word-aligned tokens make that re-tokenisation reproduce the policy's own tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
                                   padding_side="left")


def build_tldr_base(root: Path = ROOT, *, n_train: int = 24000, n_test: int = 256, hidden: int = 64,
                    layers: int = 4) -> Path:
    """Data, tokenizer and a randomly initialised tiny Qwen2 (the "pretrained" model that train_tldr.py's SFT
    stage starts from). Seconds. Cached: returns at once when built."""
    train_path, _, base = tldr_paths(root)
    if (base / "model.safetensors").exists():
        return base
    build_tldr_data(root, n_train=n_train, n_test=n_test)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    plain = type("Plain", (), {"chat_template": None})()
    prompts = [render_chat(plain, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    tokenizer = build_tldr_tokenizer(prompts + [r["reference"] for r in rows])
    model = tiny_qwen2(len(tokenizer), hidden=hidden, layers=layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy tldr: {len(rows)} train prompts, vocab {len(tokenizer)}, Qwen2 with {n_params / 1e6:.2f}M params")
    save_atomic(model, tokenizer, base)
    return base


if __name__ == "__main__":
    builders = {"gsm8k": build_gsm8k_policy, "judge": build_gsm8k_judge, "tldr": build_tldr_base}
    if len(sys.argv) != 2 or sys.argv[1] not in builders:
        raise SystemExit(f"usage: python toy.py {{{'|'.join(builders)}}}")
    print(builders[sys.argv[1]]())
