"""The paper's proxy rewards (§5.2-5.3, App. C.4-C.5): GSM8K rule terms, MATH, LLM-as-a-judge, reward model.

Reward hacking happens against exactly these functions, so they follow the paper's text; where the authors'
released code (Will Brown's GRPO GSM8K rewards, Open-R1's reasoning-steps reward) has a quirk that the text
does not describe, the docstring of the term says what we do instead and why.
Everything here is a function of its inputs (the judge also of the sampling RNG); no training code.
"""

import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from math_verify import parse, verify
from math_verify.errors import TimeoutException

from generation import position_ids

# Qwen2.5-Instruct's default system prompt: the paper keeps the model's default system instructions (App. C.4).
QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def render_chat(tokenizer, messages: list[dict]) -> str:
    """Prompt text ending with the assistant turn opener, ready for generation.

    Uses the tokenizer's chat template when it has one; otherwise (toy tokenizers) a plain
    "System:/User:/Assistant:" rendering, so the same prompt builders work for every model.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


# ----------------------------------------------------------------------------------------------------------------
# GSM8K (§5.2, App. C.4): one-shot prompt, five rule-based terms, maximum 5.0

GSM8K_FORMAT_INSTRUCTION = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)
XML_COT_FORMAT = "<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"
# The authors' one-shot example, verbatim (including the typo "divisble").
GSM8K_ONE_SHOT_QUESTION = "What is the largest single-digit prime number?"
GSM8K_ONE_SHOT_COMPLETION = XML_COT_FORMAT.format(
    reasoning="9 is divisble by 3 and 8 is divisible by 2, but 7 is prime.", answer="7"
)
GSM8K_REWARD_KEYS = ("correctness", "int_format", "strict_format", "soft_format", "xml_count")


def gsm8k_messages(question: str, system_prompt: str | None = QWEN_SYSTEM_PROMPT) -> list[dict]:
    """Chat messages: default system prompt + format instruction, the one-shot example, then the question."""
    system = GSM8K_FORMAT_INSTRUCTION if not system_prompt else f"{system_prompt}\n{GSM8K_FORMAT_INSTRUCTION}"
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": GSM8K_ONE_SHOT_QUESTION},
        {"role": "assistant", "content": GSM8K_ONE_SHOT_COMPLETION},
        {"role": "user", "content": question},
    ]


def gsm8k_gold(answer_field: str) -> str:
    """Gold answer: the text after `####` in a GSM8K `answer` field, with `,` and `$` removed."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer_field[-80:]!r}")
    return answer_field.split("####")[1].replace(",", "").replace("$", "").strip()


def extract_xml_answer(completion: str) -> str | None:
    """Text between the last `<answer>` and the `</answer>` after it, stripped; None without such a pair.

    Differs from the authors' `text.split("<answer>")[-1].split("</answer>")[0]`, which returns the whole
    completion when there is no `<answer>` tag (so a bare "18" scored as correct) and the rest of the text
    when the closing tag is missing (truncated completions).
    """
    start = completion.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = completion.find("</answer>", start)
    return completion[start:end].strip() if end >= 0 else None


# Strict: the whole stripped completion is the prompt's skeleton, newlines exactly as in it. fullmatch, no
# MULTILINE: the authors' MULTILINE `$` also matched at any line end, i.e. it accepted text after the answer.
_STRICT_FORMAT = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>", re.DOTALL)
# Soft: the same tags in the same order, whitespace free (only whitespace between the two blocks).
_SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_INTEGER = re.compile(r"-?[0-9]+")


def xml_count_reward(completion: str) -> float:
    """+0.125 for each of `<reasoning>\\n`, `\\n</reasoning>\\n`, `\\n<answer>\\n`, `\\n</answer>` occurring
    exactly once; with the last tag, -0.001 per character after it beyond the first (a trailing newline is free).

    Computed on the raw (unstripped) completion, as the authors do. Differences from their code: the penalty is
    max(0, len - 1) (theirs paid +0.001 when nothing followed the tag), and their second penalty inside the
    `\\n<answer>\\n` branch, `len(text.split("\\n</answer>\\n")[-1])`, is dropped: SPEC lists one penalty, and that
    one charged the whole completion length when the text ended in `\\n</answer>` without a newline.
    The penalty is not floored, so very long trailing text makes the term negative (as in the authors' code).
    """
    count = 0.0
    for tag in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n"):
        if completion.count(tag) == 1:
            count += 0.125
    if completion.count("\n</answer>") == 1:
        count += 0.125
        count -= max(0, len(completion.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def gsm8k_rewards(completion: str, gold: str) -> dict[str, float]:
    """The five GSM8K terms (App. C.4); `gold` as returned by `gsm8k_gold`.

    correctness 2.0: extracted answer == gold as strings (no numeric normalisation, as the authors).
    int_format 0.5: the extracted answer is an integer, `-?[0-9]+` in ASCII. The paper says "integer"; the
    authors' `str.isdigit()` rejected the negative gold answers of GSM8K (2 of 1319 test answers) and accepted
    non-ASCII digits such as "²".
    strict_format 1.0: the stripped completion is exactly
    `<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>`, "exactly followed including whitespace"
    (App. C.4). The `\\n` before `</answer>` is required, as in the prompt's skeleton and the authors' regex
    (SPEC's rendering omits it). Nothing may follow `</answer>`.
    soft_format 1.0: the stripped completion is `<reasoning>…</reasoning>`, whitespace, `<answer>…</answer>`,
    nothing before or after (the authors' `re.match` ignored text after `</answer>`).
    Duplicated blocks still pass both format regexes (as in the authors' code); xml_count penalises them.
    xml_count: see `xml_count_reward`.
    """
    answer = extract_xml_answer(completion)
    stripped = completion.strip()
    return {
        "correctness": 2.0 if answer is not None and answer == gold else 0.0,
        "int_format": 0.5 if answer is not None and _INTEGER.fullmatch(answer) else 0.0,
        "strict_format": 1.0 if _STRICT_FORMAT.fullmatch(stripped) else 0.0,
        "soft_format": 1.0 if _SOFT_FORMAT.fullmatch(stripped) else 0.0,
        "xml_count": xml_count_reward(completion),
    }


# ----------------------------------------------------------------------------------------------------------------
# MATH (§5.2, App. C.4): chain-of-thought prompt, math-verify correctness, reasoning-steps format term

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Markers of App. C.4: "Step N:", numbered-list items and bullets at any line start, and four keywords.
_REASONING_STEP = re.compile(r"Step \d+:|^\d+\.\s|^[-*] |First,|Second,|Next,|Finally,", re.MULTILINE)
MATH_VERIFY_TIMEOUT_S = 5
# What grading one answer may raise: math-verify's timeout is a BaseException, anything from sympy an Exception.
GRADER_ERRORS = (Exception, TimeoutException)


def math_messages(problem: str, system_prompt: str | None = QWEN_SYSTEM_PROMPT) -> list[dict]:
    """Chat messages: default system prompt, then the problem followed by the step-by-step instruction."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": f"{problem}\n{MATH_INSTRUCTION}"}]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` / `\\boxed {…}` / `\\fbox{…}`, braces balanced; None if absent or unclosed.

    Escaped braces (`\\{`, `\\}`) inside are content, not nesting.
    """
    starts = [m.end() for m in _BOXED_COMMAND.finditer(text)]
    if not starts:
        return None
    start, depth, i = starts[-1], 1, starts[-1]
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def _math_verify_timeout() -> int | None:
    # math-verify's timeout is signal.alarm, which only works in a process's main thread (a process-pool worker
    # runs tasks there); in any other thread it raises, so run without timeout (guard with a process pool).
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_boxed(content: str | None) -> list | None:
    """math-verify parse of one boxed answer; None unless it yields a sympy expression.

    When latex2sympy fails, math-verify falls back to the raw string and `verify` to string equality; we count
    that as unparsable, so a gold like `\\;` is skipped rather than graded by string match.
    Raises on a math-verify timeout or error (`GRADER_ERRORS`) instead of returning [] as math-verify does, so the
    caller can count the failure.
    """
    if content is None:
        return None
    parsed = parse(f"\\boxed{{{content}}}", parsing_timeout=_math_verify_timeout(), raise_on_error=True)
    return parsed if any(not isinstance(p, str) for p in parsed) else None


def reasoning_steps_reward(completion: str) -> float:
    """1/3 per reasoning marker, capped at 1.0 (three markers): `Step N:`, numbered-list items (`1. `) and
    bullets (`- `, `* `) at the start of any line, and `First,` `Second,` `Next,` `Finally,` anywhere.

    Open-R1's pattern `(Step \\d+:|^\\d+\\.|\\n-|\\n\\*|First,|…)` has no MULTILINE, so a numbered list only
    counted when the completion started with "1."; the paper says "numbered lists", so we count items at every
    line start. Bullets follow SPEC (`- ` / `* ` at a line start, which also counts a bullet on the first line);
    Open-R1's `\\n-` also counted lines like "-5" or "---". Indented items are not counted.
    """
    return min(1.0, len(_REASONING_STEP.findall(completion)) / 3)


def _verdict(gold: list, boxed: str | None) -> bool | None:
    """math-verify equivalence of a boxed answer to the parsed gold; None when grading failed (timeout or error)."""
    try:
        answer = parse_boxed(boxed)
        return answer is not None and verify(gold, answer, timeout_seconds=_math_verify_timeout(), raise_on_error=True)
    except GRADER_ERRORS:
        return None


def _math_reward(completion: str, verdict: bool | None) -> dict[str, float]:
    return {"correctness": 2.0 if verdict else 0.0, "reasoning_steps": reasoning_steps_reward(completion),
            "grader_failure": float(verdict is None)}


def _math_rewards_group(solution: str, completions: list[str]) -> list[dict[str, float] | None]:
    # One task per prompt: the gold is parsed once for its G rollouts, and each distinct boxed answer is parsed
    # and verified once (rollouts often agree; parsing, ~4 ms, dominates the cost).
    try:
        gold = parse_boxed(last_boxed(solution))
    except GRADER_ERRORS:  # the gold's own parse failed (e.g. timed out): no answer can be graded
        return [_math_reward(c, None) for c in completions]
    if gold is None:
        return [None] * len(completions)
    boxed = [last_boxed(c) for c in completions]
    verdicts = {b: _verdict(gold, b) for b in dict.fromkeys(boxed)}
    return [_math_reward(c, verdicts[b]) for c, b in zip(completions, boxed)]


def math_rewards(completion: str, solution: str) -> dict[str, float] | None:
    """correctness: 2.0 × math-verify equivalence of the last boxed answers of completion and solution (0 when
    the completion has no boxed answer); reasoning_steps: see `reasoning_steps_reward`; grader_failure: 1.0 when
    math-verify timed out or raised while grading this completion (its correctness is then 0), else 0.0.

    Returns None when the gold solution has no parsable boxed answer: SPEC says skip such examples, so the
    caller must drop them rather than train on a silent 0. Thread-safe (see `_math_verify_timeout`).
    """
    return _math_rewards_group(solution, [completion])[0]


def grader_pool(workers: int) -> ProcessPoolExecutor | None:
    """`workers` processes that grade `math_rewards_batch` for a whole run (None for 0: grade in the calling thread);
    the caller shuts them down. They start from a fresh interpreter (forkserver), never forked from a trainer that
    holds CUDA contexts and NCCL threads: a child forked from such a process inherits whatever locks those threads
    held and can hang. Each task runs in its worker's main thread, so math-verify's timeouts stay active."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) if workers > 0 else None


def math_rewards_batch(
    completions: list[str], solutions: list[str], *, pool: ProcessPoolExecutor | None = None
) -> list[dict[str, float] | None]:
    """`math_rewards` for a batch, None where the gold is unparsable; each distinct solution is parsed once, in the
    calling thread or, in parallel, in the processes of a `grader_pool`.
    """
    assert len(completions) == len(solutions)
    groups: dict[str, list[int]] = {}
    for i, solution in enumerate(solutions):
        groups.setdefault(solution, []).append(i)
    group_completions = [[completions[i] for i in idx] for idx in groups.values()]
    if pool is not None and groups:
        results = list(pool.map(_math_rewards_group, groups, group_completions))
    else:
        results = [_math_rewards_group(s, group) for s, group in zip(groups, group_completions)]
    out: list[dict[str, float] | None] = [None] * len(completions)
    for idx, group_results in zip(groups.values(), results):
        for i, result in zip(idx, group_results):
            out[i] = result
    return out


# ----------------------------------------------------------------------------------------------------------------
# LLM-as-a-judge (§5.3, App. C.5): the judge's correctness score 1-5 scaled to [0, 2]

JUDGE_INSTRUCTION = """Judge the correctness of the answer and reasoning for the given problem.
The format is as follows:
<problem>
...
</problem>
<model_answer>
<reasoning>
...
</reasoning>
<answer>
...
</answer>
</model_answer>
<correct_solution>
...
</correct_solution>

You will reply with the following XML format:
<judgement>
...
</judgement>
<correctness_score>
...
</correctness_score>
<coherence_score>
...
</coherence_score>

The `model_answer` may contain mistakes in the reasoning, the final answer, and in the format.
Give a one sentence judgement on the `model_answer`, then you will give scores from 1 to 5 for correctness \
and for coherence of the reasoning trace."""

# The paper's one correct example shot is not published; ours is GSM8K train example 0 with a correct answer.
JUDGE_ONE_SHOT_PROBLEM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
JUDGE_ONE_SHOT_COMPLETION = XML_COT_FORMAT.format(
    reasoning="In May Natalia sold half of 48, which is 48 / 2 = 24 clips. "
    "Altogether she sold 48 + 24 = 72 clips.",
    answer="72",
)
JUDGE_ONE_SHOT_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
JUDGE_ONE_SHOT_REPLY = (
    "<judgement>\nThe model correctly finds 24 clips sold in May and the total of 72, matching the correct "
    "solution.\n</judgement>\n<correctness_score>\n5\n</correctness_score>\n"
    "<coherence_score>\n5\n</coherence_score>"
)
_CORRECTNESS_SCORE = re.compile(r"<correctness_score>(.*?)</correctness_score>", re.DOTALL)


def judge_query(problem: str, completion: str, solution: str) -> str:
    """The filled-in input block of the judge prompt; the completion carries the policy's reasoning and answer."""
    return (
        f"<problem>\n{problem.strip()}\n</problem>\n<model_answer>\n{completion.strip()}\n</model_answer>\n"
        f"<correct_solution>\n{solution.strip()}\n</correct_solution>"
    )


def judge_messages(problem: str, completion: str, solution: str) -> list[dict]:
    """Judge chat: App. C.5 instruction as system prompt, one correct example shot, then the query."""
    return [
        {"role": "system", "content": JUDGE_INSTRUCTION},
        {"role": "user",
         "content": judge_query(JUDGE_ONE_SHOT_PROBLEM, JUDGE_ONE_SHOT_COMPLETION, JUDGE_ONE_SHOT_SOLUTION)},
        {"role": "assistant", "content": JUDGE_ONE_SHOT_REPLY},
        {"role": "user", "content": judge_query(problem, completion, solution)},
    ]


def parse_judge_score(text: str) -> int | None:
    """The integer 1-5 in the first `<correctness_score>…</correctness_score>`, surrounding whitespace allowed.

    None when the tag pair is missing (e.g. cut off at the token limit), empty, not a plain integer ("4.5",
    "5/5", "five") or out of range.
    """
    match = _CORRECTNESS_SCORE.search(text)
    if match is None or not re.fullmatch(r"[0-9]+", match.group(1).strip()):
        return None
    score = int(match.group(1))
    return score if 1 <= score <= 5 else None


@torch.no_grad()
def judge_rewards(
    judge_model,
    judge_tokenizer,
    problems: list[str],
    completions: list[str],
    solutions: list[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.8,
    top_k: int = 20,
    failure_reward: float = -2.0,
) -> tuple[torch.Tensor, int]:
    """Judge correctness reward 2·(s−1)/4 ∈ [0, 2] per completion; `failure_reward` where the score is unparsable.

    Returns (rewards (N,) float32 on CPU, number of parse failures). Sampled with SPEC's settings; other
    generation settings come from the judge's generation_config. Prompts are left-padded so all replies start
    at the same column; the tokenizer needs a pad token.
    """
    assert len(problems) == len(completions) == len(solutions)
    if judge_tokenizer.pad_token_id is None:
        raise ValueError("judge_tokenizer needs a pad token for batched generation")
    texts = [render_chat(judge_tokenizer, judge_messages(*q)) for q in zip(problems, completions, solutions)]
    device = next(judge_model.parameters()).device
    rewards, failures = [], 0
    for i in range(0, len(texts), batch_size):
        batch = judge_tokenizer(
            texts[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            # A rendered chat template already contains its special tokens.
            add_special_tokens=not getattr(judge_tokenizer, "chat_template", None),
        ).to(device)
        out = judge_model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            pad_token_id=judge_tokenizer.pad_token_id,
        )
        replies = judge_tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for reply in replies:
            score = parse_judge_score(reply)
            failures += score is None
            rewards.append(failure_reward if score is None else 2.0 * (score - 1) / 4)
    return torch.tensor(rewards, dtype=torch.float32), failures


# ----------------------------------------------------------------------------------------------------------------
# Reward model (§4, §5.1, App. C.2): backbone + linear scalar head, read at the last real token


def rm_last_token_scores(rm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward (B,) at the last attended token of each row, differentiable (RM training uses it too).

    `rm` is an `AutoModelForSequenceClassification(num_labels=1)` (Qwen2, Llama, GPT-NeoX, ...: head at `rm.score`),
    the one RM format this project saves. Its own pooling is not used: it finds the last token that is not
    `config.pad_token_id`, which is wrong when pad == EOS (the appended EOS would be skipped). The model's own forward
    runs (so FSDP2's root hooks gather the embedding and head) and the head's per-token outputs are captured with a
    hook. Position ids come from the mask, so left and right padding give the same score.
    """
    captured = {}
    handle = rm.score.register_forward_hook(lambda module, args, out: captured.__setitem__("scores", out))
    try:
        rm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    finally:
        handle.remove()
    token_scores = captured["scores"].squeeze(-1)  # (B, T)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.long()).argmax(-1)
    return token_scores.gather(1, last.unsqueeze(1)).squeeze(1).float()


@torch.no_grad()
def rm_scores_from_ids(
    rm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    has_eos,
    *,
    eos_penalty: float = -1.0,
    batch_size: int = 16,
) -> torch.Tensor:
    """RM reward (N,) float32 for padded prompt+completion token ids (either padding side) in the RM's vocabulary.

    Rows with an EOS must end in it; rows without (hit the length limit) get exactly `eos_penalty`
    (authors: -1) and are not run through the RM.
    """
    device = next(rm.parameters()).device
    has_eos = torch.as_tensor(has_eos, dtype=torch.bool, device=device)
    scores = torch.full((input_ids.shape[0],), eos_penalty, dtype=torch.float32, device=device)
    rows = has_eos.nonzero().squeeze(1)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = input_ids[chunk.to(input_ids.device)].to(device)
        mask = attention_mask[chunk.to(attention_mask.device)].to(device)
        real = mask.bool().any(0)  # drop columns that are padding in every row of this chunk
        scores[chunk] = rm_last_token_scores(rm, ids[:, real], mask[:, real])
    return scores


@torch.no_grad()
def rm_scores(
    rm,
    tokenizer,
    prompts: list[str],
    completions: list[str],
    has_eos,
    *,
    eos_penalty: float = -1.0,
    batch_size: int = 16,
) -> torch.Tensor:
    """RM reward (N,) of text prompt + completion + EOS, `eos_penalty` for completions without EOS.

    Completions are decoded without their EOS; its id is appended after tokenisation (no dependence on how the
    EOS string tokenises). No special tokens are added: prompts rendered with `render_chat` already carry them.
    """
    assert len(prompts) == len(completions) == len(has_eos)
    texts = [p + c for p, c in zip(prompts, completions)]
    ids = [seq + [tokenizer.eos_token_id] for seq in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    return rm_scores_from_ids(
        rm, batch["input_ids"], batch["attention_mask"], has_eos, eos_penalty=eos_penalty, batch_size=batch_size
    )


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss, mean of −log σ(R(a_w) − R(a_l)) (eq. 3)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()
