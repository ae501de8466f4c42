"""Tests for rewards.py: every GSM8K term on crafted strings and real gold answers, MATH equivalences,
judge prompt/parsing/batching, reward-model scoring on tiny random models."""

import json
import math
import string
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from math_verify.errors import TimeoutException
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXForSequenceClassification,
                          LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForSequenceClassification)

from rewards import (GSM8K_FORMAT_INSTRUCTION, GSM8K_REWARD_KEYS, JUDGE_INSTRUCTION, JUDGE_ONE_SHOT_REPLY,
                     MATH_INSTRUCTION, QWEN_SYSTEM_PROMPT, XML_COT_FORMAT, bradley_terry_loss, extract_xml_answer,
                     grader_pool, gsm8k_gold, gsm8k_messages, gsm8k_rewards, judge_messages, judge_rewards, last_boxed,
                     math_messages, math_rewards, math_rewards_batch, parse_judge_score, reasoning_steps_reward,
                     render_chat, rm_last_token_scores, rm_scores, rm_scores_from_ids, xml_count_reward)

DATA = Path(__file__).parent / "data"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, <pad>=0, <eos>=1, <unk>=2; no chat template."""
    chars = sorted(set(string.printable) | set("’—é€"))
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def perfect(reasoning: str, answer: str) -> str:
    return XML_COT_FORMAT.format(reasoning=reasoning, answer=answer)


# ---------------------------------------------------------------------------------------------------------------
# prompts


def test_gsm8k_messages_are_system_format_one_shot_question():
    messages = gsm8k_messages("How many apples?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == QWEN_SYSTEM_PROMPT + "\n" + GSM8K_FORMAT_INSTRUCTION
    assert GSM8K_FORMAT_INSTRUCTION == (
        "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>")
    assert messages[1]["content"] == "What is the largest single-digit prime number?"
    assert messages[2]["content"] == (
        "<reasoning>\n9 is divisble by 3 and 8 is divisible by 2, but 7 is prime.\n</reasoning>\n"
        "<answer>\n7\n</answer>\n")
    assert messages[3]["content"] == "How many apples?"
    assert gsm8k_messages("q", system_prompt=None)[0]["content"] == GSM8K_FORMAT_INSTRUCTION
    assert gsm8k_messages("q", system_prompt="Be brief.")[0]["content"].startswith("Be brief.\nRespond in")


def test_math_messages():
    messages = math_messages("What is $1+1$?")
    assert messages == [
        {"role": "system", "content": QWEN_SYSTEM_PROMPT},
        {"role": "user",
         "content": "What is $1+1$?\nLet's think step by step and output the final answer within \\boxed{}."},
    ]
    assert MATH_INSTRUCTION.endswith("within \\boxed{}.")
    assert math_messages("p", system_prompt=None) == [{"role": "user", "content": "p\n" + MATH_INSTRUCTION}]


def test_render_chat_uses_template_or_plain_fallback():
    tok = char_tokenizer()
    messages = gsm8k_messages("How many apples?")
    plain = render_chat(tok, messages)
    assert plain.startswith("System: " + QWEN_SYSTEM_PROMPT)
    assert plain.endswith("User: How many apples?\n\nAssistant:")
    positions = [plain.index(m["content"]) for m in messages]
    assert positions == sorted(positions)

    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    templated = render_chat(tok, messages)
    assert templated.startswith("<|system|>" + QWEN_SYSTEM_PROMPT)
    assert templated.endswith("<|user|>How many apples?<|end|><|assistant|>")


# ---------------------------------------------------------------------------------------------------------------
# GSM8K


def gsm8k_sample() -> list[dict]:
    return [json.loads(line) for line in (DATA / "gsm8k_sample.jsonl").read_text(encoding="utf-8").splitlines()]


def test_gsm8k_gold_answers_of_the_sample_are_integers_and_score_max():
    rows = gsm8k_sample()
    assert len(rows) == 50
    golds = [gsm8k_gold(row["answer"]) for row in rows]
    assert all(g.lstrip("-").isdigit() and g.isascii() for g in golds), golds
    assert "2125" in golds and "-10" in golds and "-3" in golds  # commas removed; negatives kept
    for row, gold in zip(rows, golds):
        reasoning = row["answer"].split("####")[0].strip()
        scores = gsm8k_rewards(perfect(reasoning, gold), gold)
        assert scores == {"correctness": 2.0, "int_format": 0.5, "strict_format": 1.0, "soft_format": 1.0,
                          "xml_count": 0.5}, (gold, scores)
        assert sum(scores.values()) == 5.0


@pytest.mark.parametrize("field, gold", [
    ("He pays 2 * $1,250 = $<<2*1250=2500>>2,500.\n#### 2,500", "2500"),
    ("#### $18", "18"),
    ("x\n####  -3 \n", "-3"),
    ("so 0.5 hours\n#### 0.5", "0.5"),
])
def test_gsm8k_gold_extraction(field, gold):
    assert gsm8k_gold(field) == gold


def test_gsm8k_gold_without_marker_raises():
    with pytest.raises(ValueError):
        gsm8k_gold("The answer is 5.")


R = "Janet has 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = 18 dollars."
PERFECT = perfect(R, "18")

# (completion, gold, expected terms): one crafted case per row; comments say what differs from the authors' code.
GSM8K_CASES = {
    "perfect": (PERFECT, "18", dict(correctness=2.0, int_format=0.5, strict_format=1.0, soft_format=1.0,
                                    xml_count=0.5)),
    "perfect_without_final_newline": (PERFECT.rstrip("\n"), "18", dict(  # authors: xml 0.501 - len(text)/1000
        correctness=2.0, int_format=0.5, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "surrounding_whitespace": ("\n  " + PERFECT + "\n\n", "18", dict(
        correctness=2.0, int_format=0.5, strict_format=1.0, soft_format=1.0, xml_count=0.5 - 0.002)),
    "wrong_answer": (perfect(R, "17"), "18", dict(
        correctness=0.0, int_format=0.5, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "missing_newline_after_reasoning_tag": (PERFECT.replace("<reasoning>\n", "<reasoning>"), "18", dict(
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=1.0, xml_count=0.375)),
    "missing_newline_before_closing_answer": (PERFECT.replace("\n</answer>", "</answer>"), "18", dict(
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=1.0, xml_count=0.375)),
    "single_line_tags": ("<reasoning>9*2=18</reasoning><answer>18</answer>", "18", dict(
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=1.0, xml_count=0.0)),
    "whitespace_between_blocks": (PERFECT.replace("</reasoning>\n<answer>", "</reasoning>\n\n \n<answer>"), "18",
                                  dict(correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=1.0,
                                       xml_count=0.5)),
    "text_between_blocks": (PERFECT.replace("</reasoning>\n", "</reasoning>\nSo:\n"), "18", dict(
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=0.0, xml_count=0.5)),
    "text_before_reasoning": ("Sure!\n" + PERFECT, "18", dict(
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=0.0, xml_count=0.5)),
    # authors: strict (MULTILINE `$`) and soft (re.match) accepted this
    "trailing_text_after_answer": (PERFECT + "Hope this helps!", "18", dict(
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=0.0, xml_count=0.5 - 0.016)),
    "duplicate_answer_blocks": (perfect(R, "17") + "<answer>\n18\n</answer>\n", "18", dict(
        correctness=2.0, int_format=0.5, strict_format=1.0, soft_format=1.0, xml_count=0.25)),
    "nested_answer_tags": ("<reasoning>\nR\n</reasoning>\n<answer>\n<answer>\n18\n</answer>\n</answer>\n", "18",
                           dict(correctness=2.0, int_format=0.5, strict_format=1.0, soft_format=1.0,
                                xml_count=0.375)),  # str.count: "\n<answer>\n<answer>\n" holds one, not two
    "reversed_blocks": ("<answer>\n18\n</answer>\n<reasoning>\nR\n</reasoning>\n", "18", dict(
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=0.0, xml_count=0.375 - 0.027)),
    "empty": ("", "18", dict(correctness=0.0, int_format=0.0, strict_format=0.0, soft_format=0.0, xml_count=0.0)),
    # authors: the whole completion is "the answer" when there is no <answer> tag, so this scored 2.5
    "bare_answer_without_tags": ("18", "18", dict(
        correctness=0.0, int_format=0.0, strict_format=0.0, soft_format=0.0, xml_count=0.0)),
    # authors: text after the last <answer> counted as the answer
    "truncated_inside_answer": (PERFECT[: PERFECT.index("18\n</answer>") + 2], "18", dict(
        correctness=0.0, int_format=0.0, strict_format=0.0, soft_format=0.0, xml_count=0.375)),
    "answer_with_units": (perfect(R, "$18"), "18", dict(  # no numeric normalisation of the policy's answer
        correctness=0.0, int_format=0.0, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "answer_with_comma": (perfect(R, "1,800"), "1800", dict(
        correctness=0.0, int_format=0.0, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "decimal_answer": (perfect(R, "18.0"), "18", dict(
        correctness=0.0, int_format=0.0, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    # authors' isdigit(): int_format 0 for a correct negative answer
    "negative_answer": (perfect(R, "-3"), "-3", dict(
        correctness=2.0, int_format=0.5, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "empty_answer": (perfect(R, ""), "18", dict(
        correctness=0.0, int_format=0.0, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "non_ascii_reasoning": (perfect("Janet’s ducks — 16 − 3 − 4 = 9, 9 × 2 € = 18 €. 鸭", "18"), "18", dict(
        correctness=2.0, int_format=0.5, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    # authors' isdigit() is True for these
    "non_ascii_digits": (perfect(R, "١٨"), "18", dict(
        correctness=0.0, int_format=0.0, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "superscript_digit": (perfect(R, "18²"), "18", dict(
        correctness=0.0, int_format=0.0, strict_format=1.0, soft_format=1.0, xml_count=0.5)),
    "non_ascii_trailing_text": (PERFECT + "—ñ", "18", dict(  # counted in characters, not bytes
        correctness=2.0, int_format=0.5, strict_format=0.0, soft_format=0.0, xml_count=0.5 - 0.002)),
}


@pytest.mark.parametrize("name", list(GSM8K_CASES))
def test_gsm8k_terms_on_crafted_completions(name):
    completion, gold, expected = GSM8K_CASES[name]
    scores = gsm8k_rewards(completion, gold)
    assert tuple(scores) == GSM8K_REWARD_KEYS
    assert scores == pytest.approx(expected, abs=1e-12)


def test_gsm8k_very_long_completion():
    long_reasoning = "\n".join(f"Step {i}: add 1 to get {i}." for i in range(20_000))  # ~500k characters
    assert sum(gsm8k_rewards(perfect(long_reasoning, "18"), "18").values()) == 5.0
    # the trailing-text penalty is linear and not floored (as in the authors' code)
    junk = gsm8k_rewards(PERFECT + "x" * 10_000, "18")
    assert junk["xml_count"] == pytest.approx(0.5 - 10.0)
    assert (junk["strict_format"], junk["soft_format"], junk["correctness"]) == (0.0, 0.0, 2.0)


def test_xml_count_trailing_penalty_never_rewards_nothing_after_tag():
    assert xml_count_reward("<reasoning>\nR\n</reasoning>\n<answer>\n1\n</answer>") == 0.5
    assert xml_count_reward("<reasoning>\nR\n</reasoning>\n<answer>\n1\n</answer>\n") == 0.5
    assert xml_count_reward("<reasoning>\nR\n</reasoning>\n<answer>\n1\n</answer>\n\n") == pytest.approx(0.499)
    assert xml_count_reward("\n</answer>") == 0.125
    assert xml_count_reward("<reasoning>\n<reasoning>\n") == 0.0


def test_extract_xml_answer():
    assert extract_xml_answer("<answer> 5 </answer> then <answer>\n 7\n</answer> tail") == "7"
    assert extract_xml_answer("<answer>\n7") is None
    assert extract_xml_answer("no tags") is None
    assert extract_xml_answer("</answer><answer>x") is None
    assert extract_xml_answer("<answer></answer>") == ""


# ---------------------------------------------------------------------------------------------------------------
# MATH


@pytest.mark.parametrize("text, boxed", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed {x^{2}}", "x^{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{\\left\\{ a \\right\\}}", "\\left\\{ a \\right\\}"),
    ("\\boxed{\\text{(B)}} done", "\\text{(B)}"),
    ("\\boxed{}", ""),
    ("no box", None),
    ("\\boxed{\\frac{1}{2}", None),  # truncated: unclosed
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\dfrac{3}{4}", "\\frac34"),
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("(0,1]", "(0, 1]"),
    ("[2, \\infty)", "[2,\\infty)"),
    ("3", "x=3"),
    ("x=3", "3"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\text{(B)}", "B"),
    ("-5", "-5"),
    ("10", "10.0"),
]
NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("12", "13"),
    ("(0,1]", "[0,1]"),
    ("(0,1]", "(0,1)"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("(1,2)", "(2,1)"),
    ("\\pi", "3.14"),
    ("3", "3 \\text{ and } 4"),
    ("x=3", "x=4"),
]


@pytest.mark.parametrize("gold, answer", EQUIVALENT)
def test_math_equivalent_answers_score_2(gold, answer):
    completion = f"Step 1: compute.\nStep 2: simplify.\nFinally, the answer is $\\boxed{{{answer}}}$."
    assert math_rewards(completion, f"So the answer is $\\boxed{{{gold}}}$.") == {
        "correctness": 2.0, "reasoning_steps": 1.0, "grader_failure": 0.0}


@pytest.mark.parametrize("gold, answer", NOT_EQUIVALENT)
def test_math_non_equivalent_answers_score_0(gold, answer):
    assert math_rewards(f"\\boxed{{{answer}}}", f"\\boxed{{{gold}}}")["correctness"] == 0.0


def test_math_correctness_uses_last_boxed_of_completion_and_needs_one():
    solution = "We get $x = 2$, so the answer is $\\boxed{4}$."
    assert math_rewards("\\boxed{3} no wait \\boxed{4}", solution)["correctness"] == 2.0
    assert math_rewards("\\boxed{4} no wait \\boxed{3}", solution)["correctness"] == 0.0
    assert math_rewards("The answer is 4.", solution)["correctness"] == 0.0
    assert math_rewards("", solution) == {"correctness": 0.0, "reasoning_steps": 0.0, "grader_failure": 0.0}
    assert math_rewards("\\boxed{4", solution)["correctness"] == 0.0  # truncated


@pytest.mark.parametrize("solution", ["The answer is 4.", "$\\boxed{}$", "\\boxed{\\;}", "\\boxed{4"])
def test_math_unparsable_gold_is_reported_not_scored(solution):
    assert math_rewards("\\boxed{4}", solution) is None


def test_math_rewards_work_in_worker_threads():
    pairs = [(f"\\boxed{{{a}}}", f"\\boxed{{{g}}}") for g, a in EQUIVALENT + NOT_EQUIVALENT]
    in_main = [math_rewards(c, s) for c, s in pairs]
    assert threading.current_thread() is threading.main_thread()
    with ThreadPoolExecutor(2) as pool:
        in_threads = list(pool.map(lambda pair: math_rewards(*pair), pairs))
    assert in_threads == in_main
    assert [r["correctness"] for r in in_threads] == [2.0] * len(EQUIVALENT) + [0.0] * len(NOT_EQUIVALENT)


@pytest.mark.parametrize("workers", [0, 2])
def test_math_rewards_batch_matches_single_calls_and_keeps_order(workers):
    """In the calling thread or in a grader pool's processes: the same results, in order."""
    solutions = ["\\boxed{\\frac{1}{2}}", "no boxed gold", "\\boxed{(0,1]}"]
    answers = ["0.5", "\\frac{2}{4}", "1/3", "7", "(0, 1]", "[0,1]", "no box"]
    completions, golds = [], []
    for i, answer in enumerate(answers * 3):  # interleaved groups
        completions.append(f"1. think\n2. more\n\\boxed{{{answer}}}" if answer != "no box" else answer)
        golds.append(solutions[i % 3])
    pool = grader_pool(workers)
    try:
        batch = math_rewards_batch(completions, golds, pool=pool)
        assert batch == [math_rewards(c, s) for c, s in zip(completions, golds)]
        assert [b is None for b in batch] == [s == "no boxed gold" for s in golds]
        assert math_rewards_batch([], [], pool=pool) == []
    finally:
        if pool is not None:
            pool.shutdown()


def test_grader_pool_starts_fresh_interpreters_with_timeouts_active():
    """The pool's processes are not forked from the trainer (forkserver: safe beside CUDA and NCCL threads), and tasks
    run in their main thread, where math-verify's signal-based timeout works (elsewhere it is switched off)."""
    import rewards
    pool = grader_pool(1)
    try:
        assert pool._mp_context.get_start_method() == "forkserver"
        assert pool.submit(rewards._math_verify_timeout).result() == rewards.MATH_VERIFY_TIMEOUT_S
    finally:
        pool.shutdown()
    assert grader_pool(0) is None


def test_math_grader_timeout_or_error_scores_0_and_is_counted(monkeypatch):
    """math-verify timing out inside its parse (its TimeoutException is a BaseException) or `verify` raising, on one
    answer or on a gold: that sample gets correctness 0 and grader_failure 1, the others are graded as usual."""
    import math_verify.parser
    import rewards
    extract, real_verify = math_verify.parser.extract_target_from_pred, rewards.verify

    def slow_extract(pred, *args, **kwargs):
        if "\\frac{1}{7}" in pred:
            raise TimeoutException("Operation timed out!")  # what math-verify's signal.alarm handler raises
        return extract(pred, *args, **kwargs)

    def verify(gold, answer, **kwargs):
        if "13" in map(str, answer):
            raise TimeoutError("verify timed out")
        return real_verify(gold, answer, **kwargs)

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", slow_extract)
    monkeypatch.setattr(rewards, "verify", verify)
    twelve, seventh = "so $\\boxed{12}$", "$\\boxed{\\frac{1}{7}}$"
    cases = [  # (completion, solution, correctness, reasoning_steps, grader_failure)
        ("\\boxed{12}", twelve, 2.0, 0.0, 0.0),
        ("\\boxed{13}", twelve, 0.0, 0.0, 1.0),  # verify raised
        ("1. a\n2. b\n\\boxed{13}", twelve, 0.0, 2 / 3, 1.0),
        ("\\boxed{\\frac{1}{7}}", twelve, 0.0, 0.0, 1.0),  # parsing the answer timed out
        ("\\boxed{11}", twelve, 0.0, 0.0, 0.0),
        ("no box", twelve, 0.0, 0.0, 0.0),
        ("\\boxed{12}", seventh, 0.0, 0.0, 1.0),  # parsing the gold timed out: nothing can be graded
        ("no box", seventh, 0.0, 0.0, 1.0),
    ]
    got = math_rewards_batch([c[0] for c in cases], [c[1] for c in cases])
    assert got == [{"correctness": c, "reasoning_steps": pytest.approx(r), "grader_failure": f}
                   for _, _, c, r, f in cases]


@pytest.mark.parametrize("completion, steps", [
    ("", 0),
    ("Step 1: a\nStep 2: b", 2),
    ("1. a\n2. b\n3. c\n4. d", 3),
    ("Let's see.\n1. a\n2. b", 2),  # Open-R1: 0 (its `^\d+\.` only matched at the string start)
    ("- a\n* b", 2),
    ("First, a. Second, b.", 2),
    ("Next, a.\nFinally, b.", 2),
    ("3.5 is larger than 3.\n12.5% more", 0),  # decimals at a line start are not list items
    ("  - indented\n\t1. indented", 0),
    ("---\n-5 is negative\n**bold**", 0),  # Open-R1's `\n-` counted the first two
    ("first, second, next, finally,", 0),  # case-sensitive
    ("Step 1: a\n1. b\n- c\nFirst, d", 3),  # capped at 1.0
])
def test_reasoning_steps_reward(completion, steps):
    assert reasoning_steps_reward(completion) == pytest.approx(min(1.0, steps / 3))


# ---------------------------------------------------------------------------------------------------------------
# LLM-as-a-judge


def test_judge_messages_contain_instruction_shot_and_query():
    messages = judge_messages("How many?", "<reasoning>\n2+2\n</reasoning>\n<answer>\n4\n</answer>\n", "#### 4")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == JUDGE_INSTRUCTION
    assert JUDGE_INSTRUCTION.startswith("Judge the correctness of the answer and reasoning for the given problem.")
    assert ("Give a one sentence judgement on the `model_answer`, then you will give scores from 1 to 5 for "
            "correctness and for coherence of the reasoning trace.") in JUDGE_INSTRUCTION
    assert messages[2]["content"] == JUDGE_ONE_SHOT_REPLY
    assert parse_judge_score(JUDGE_ONE_SHOT_REPLY) == 5  # the shot is a correct example
    assert messages[3]["content"] == (
        "<problem>\nHow many?\n</problem>\n"
        "<model_answer>\n<reasoning>\n2+2\n</reasoning>\n<answer>\n4\n</answer>\n</model_answer>\n"
        "<correct_solution>\n#### 4\n</correct_solution>")
    assert messages[1]["content"].startswith("<problem>\nNatalia sold clips")


@pytest.mark.parametrize("text, score", [
    ("<correctness_score>5</correctness_score>", 5),
    ("<judgement>\nok\n</judgement>\n<correctness_score>\n 3 \n</correctness_score>\n<coherence_score>\n5", 3),
    ("<correctness_score>\t1\r\n</correctness_score>", 1),
    ("<correctness_score>2</correctness_score><correctness_score>5</correctness_score>", 2),  # first one
    ("<correctness_score>0</correctness_score>", None),
    ("<correctness_score>6</correctness_score>", None),
    ("<correctness_score>-1</correctness_score>", None),
    ("<correctness_score>4.5</correctness_score>", None),
    ("<correctness_score>5/5</correctness_score>", None),
    ("<correctness_score>five</correctness_score>", None),
    ("<correctness_score></correctness_score>", None),
    ("<correctness_score>\n4\n", None),  # cut off before the closing tag
    ("<coherence_score>4</coherence_score>", None),
    ("Correctness_score: 4", None),
    ("", None),
    ("<correctness_score>٤</correctness_score>", None),
])
def test_parse_judge_score(text, score):
    assert parse_judge_score(text) == score


class ScriptedJudge(torch.nn.Module):
    """Stands in for a causal LM: replies with a fixed text chosen by a keyword in each prompt."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"attention_mask": attention_mask, **kwargs})
        rows = []
        for ids in input_ids:
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            key = next(k for k in self.replies if f"<problem>\n{k}" in prompt)
            rows.append(self.tokenizer(self.replies[key] + "<eos>")["input_ids"])
        width = max(map(len, rows))
        new = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], 1)


def test_judge_rewards_scaling_failures_batching_and_sampling_settings():
    tok = char_tokenizer()
    replies = {
        "A": "<judgement>\nfine\n</judgement>\n<correctness_score>\n5\n</correctness_score>",
        "B": "<correctness_score>1</correctness_score>",
        "C": "<correctness_score> 3 </correctness_score><coherence_score>1</coherence_score>",
        "D": "I cannot judge this.",
        "E": "<correctness_score>4</correctness_score>",
    }
    judge = ScriptedJudge(tok, replies)
    problems = ["A", "B", "C", "D", "E", "D and more text to make this prompt longer"]
    rewards_, failures = judge_rewards(judge, tok, problems, ["<answer>\n1\n</answer>"] * 6, ["#### 1"] * 6,
                                       batch_size=4)
    assert rewards_.dtype == torch.float32
    assert rewards_.tolist() == [2.0, 0.0, 1.0, -2.0, 1.5, -2.0]
    assert failures == 2
    assert len(judge.calls) == 2  # 6 prompts in batches of 4
    for call in judge.calls:
        assert (call["do_sample"], call["temperature"], call["top_p"], call["top_k"], call["max_new_tokens"]) == (
            True, 0.7, 0.8, 20, 64)
        mask = call["attention_mask"]
        assert (mask[:, -1] == 1).all() and (mask.cummax(1).values == mask).all()  # left padding
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was
    rewards_, failures = judge_rewards(judge, tok, ["D"], ["x"], ["y"], failure_reward=-1.0)
    assert rewards_.tolist() == [-1.0] and failures == 1


def test_judge_rewards_runs_a_real_hf_causal_lm():
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    judge = Qwen2ForCausalLM(cfg).eval()
    rewards_, failures = judge_rewards(judge, tok, ["1+1?", "2+2, a longer problem?"], ["2", "4"], ["2", "4"],
                                       max_new_tokens=8)
    # a random model cannot emit the score tags: every reply is a parse failure
    assert rewards_.tolist() == [-2.0, -2.0] and failures == 2


# ---------------------------------------------------------------------------------------------------------------
# reward model


def tiny_rm(arch: str, tok, seed: int = 0):
    torch.manual_seed(seed)
    # pad == eos on purpose: HF's own pooling would then read the token before the appended EOS
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, num_labels=1,
                  pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "qwen2":
        model = Qwen2ForSequenceClassification(Qwen2Config(num_key_value_heads=2, **common))
    elif arch == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=2, **common))
    else:
        model = GPTNeoXForSequenceClassification(GPTNeoXConfig(**common))
    with torch.no_grad():  # random init is tiny (std 0.02): make scores differ visibly between sequences
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


PROMPTS = ["Q: 1+1?\nA:", "Q: a much longer question about ducks and eggs?\nA:", "Q: x\nA:", "Q: 7*6?\nA:"]
COMPLETIONS = [" 2", " They sell 9 eggs for 18 dollars.", "", " 42, because 7*6 is 42 and so on"]


def reference_score(rm, tok, text: str) -> float:
    """Unbatched, unpadded: per-token head output at the final (EOS) position."""
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        return rm.score(rm.base_model(input_ids=ids).last_hidden_state)[0, -1, 0].item()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt_neox"])
def test_rm_scores_at_appended_eos_independent_of_padding_side(arch):
    tok = char_tokenizer()
    rm = tiny_rm(arch, tok)
    has_eos = [True] * 4
    tok.padding_side = "right"
    right = rm_scores(rm, tok, PROMPTS, COMPLETIONS, has_eos)
    tok.padding_side = "left"
    left = rm_scores(rm, tok, PROMPTS, COMPLETIONS, has_eos, batch_size=3)
    expected = torch.tensor([reference_score(rm, tok, p + c) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, expected, atol=1e-5, rtol=0)
    assert right.dtype == torch.float32 and right.shape == (4,)
    assert len({round(s, 4) for s in right.tolist()}) == 4  # the scores carry information


def test_rm_eos_penalty_replaces_score_of_completions_without_eos():
    tok = char_tokenizer()
    rm = tiny_rm("qwen2", tok)
    scored = rm_scores(rm, tok, PROMPTS, COMPLETIONS, [True] * 4)
    penalised = rm_scores(rm, tok, PROMPTS, COMPLETIONS, torch.tensor([True, False, True, False]))
    assert penalised[1].item() == -1.0 and penalised[3].item() == -1.0
    torch.testing.assert_close(penalised[[0, 2]], scored[[0, 2]])
    custom = rm_scores(rm, tok, PROMPTS, COMPLETIONS, [False] * 4, eos_penalty=-3.5)
    assert custom.tolist() == [-3.5] * 4


def test_rm_scores_from_ids_accept_either_padding_and_match_text_variant():
    tok = char_tokenizer()
    rm = tiny_rm("qwen2", tok)
    seqs = [tok(p + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for p, c in zip(PROMPTS, COMPLETIONS)]
    width = max(map(len, seqs)) + 2  # extra all-pad columns
    pad = tok.pad_token_id
    left = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    right = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    left_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    right_mask = left_mask.flip(1)
    has_eos = [True, True, False, True]
    from_text = rm_scores(rm, tok, PROMPTS, COMPLETIONS, has_eos)
    torch.testing.assert_close(rm_scores_from_ids(rm, left, left_mask, has_eos, batch_size=2), from_text,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(rm_scores_from_ids(rm, right, right_mask, has_eos), from_text, atol=1e-5, rtol=0)


def test_rm_saved_and_reloaded_with_auto_sequence_classification(tmp_path):
    tok = char_tokenizer()
    rm = tiny_rm("qwen2", tok)
    rm.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    torch.testing.assert_close(rm_scores(loaded, tok, PROMPTS, COMPLETIONS, [True] * 4),
                               rm_scores(rm, tok, PROMPTS, COMPLETIONS, [True] * 4))


def test_rm_last_token_scores_is_differentiable_for_bt_training():
    tok = char_tokenizer()
    rm = tiny_rm("qwen2", tok)
    batch = tok.pad({"input_ids": [tok("ab<eos>")["input_ids"], tok("abcd<eos>")["input_ids"]]},
                    return_tensors="pt")
    scores = rm_last_token_scores(rm, batch["input_ids"], batch["attention_mask"])
    bradley_terry_loss(scores[:1], scores[1:]).backward()
    assert rm.score.weight.grad is not None and rm.score.weight.grad.abs().sum() > 0


def test_bradley_terry_loss():
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(2.0))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)
    assert bradley_terry_loss(torch.tensor([50.0]), torch.tensor([-50.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])))

