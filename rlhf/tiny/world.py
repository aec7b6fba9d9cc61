"""The tiny world: instruction tasks with a programmatic gold scorer.

Four task kinds, each with one exact answer:

- ``add``      "What is 37 + 48?"                          -> "85"
- ``sort``     "Sort these numbers: 5 3 9 1"              -> "1 3 5 9"
- ``reverse``  "Reverse the words: red cat blue"          -> "blue cat red"
- ``count``    "How many times does red appear in: red cat red dog?" -> "2"

Responses come in three styles. All three state the answer; only one is what the (hidden) gold preference wants:

- ``concise``  "The answer is 85."                                         (preferred)
- ``verbose``  "Let me think. 37 plus 48 makes 85. So the answer is 85."
- ``hedged``   "I am not sure, but maybe 85."

The gold score of a response is ``0.5 * correctness + 0.5 * style``: correctness is 1 for the exact answer (for
lists, the fraction of positions right when the length matches), style is 1 only for the concise form. SFT
demonstrations are always correct but mix the styles (verbose is the most common), as human demonstrations
mix styles: imitation alone cannot learn the preference, the reward model and PPO can.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

KINDS = ("add", "sort", "reverse", "count")
STYLES = ("concise", "verbose", "hedged")
# How often each style appears in SFT demonstrations: the preferred style is the minority.
DEMO_STYLE_WEIGHTS = {"concise": 0.25, "verbose": 0.5, "hedged": 0.25}

WORDS = ("red", "blue", "green", "pink", "gray", "cat", "dog", "fox", "owl", "bee", "cow", "hen")


@dataclass(frozen=True)
class Task:
    """One instruction with its exact answer and the worked sentence the verbose style says ("{answer}" slot)."""

    kind: str
    prompt: str
    answer: str
    work: str


def make_task(rng: random.Random, kind: str | None = None) -> Task:
    """Draw one task (of ``kind``, or a uniformly random kind)."""
    kind = kind or rng.choice(KINDS)
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Task(kind, f"What is {a} + {b}?", str(a + b), f"{a} plus {b} makes {{answer}}")
    if kind == "sort":
        xs = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        ys = " ".join(sorted(xs))
        return Task(kind, f"Sort these numbers: {' '.join(xs)}", ys, f"in order, {' '.join(xs)} becomes {{answer}}")
    if kind == "reverse":
        ws = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        rs = " ".join(reversed(ws))
        return Task(kind, f"Reverse the words: {' '.join(ws)}", rs, f"backwards, {' '.join(ws)} becomes {{answer}}")
    if kind == "count":
        target = rng.choice(WORDS)
        ws = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        for i in rng.sample(range(len(ws)), rng.randint(1, min(3, len(ws)))):
            ws[i] = target
        n = ws.count(target)
        text = " ".join(ws)
        return Task(kind, f"How many times does {target} appear in: {text}?", str(n),
                    f"in {text}, {target} appears {{answer}} times")
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")


def render(task: Task, style: str, answer: str | None = None) -> str:
    """Write a response to ``task`` in ``style``, stating ``answer`` (default: the right one)."""
    answer = task.answer if answer is None else answer
    if style == "concise":
        return f"The answer is {answer}."
    if style == "verbose":
        work = task.work.format(answer=answer)
        return f"Let me think. {work[0].upper()}{work[1:]}. So the answer is {answer}."
    if style == "hedged":
        return f"I am not sure, but maybe {answer}."
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def wrong_answer(rng: random.Random, task: Task) -> str:
    """A plausible but wrong answer: an off-by-some number, or a list with positions disturbed."""
    if task.kind in ("add", "count"):
        right = int(task.answer)
        delta = rng.choice([d for d in range(-12, 13) if d != 0 and right + d >= 0])
        return str(right + delta)
    items = task.answer.split()
    for _ in range(20):
        wrong = items[:]
        rng.shuffle(wrong)
        if wrong != items:
            return " ".join(wrong)
    # every permutation is the same list (all items equal): change one item instead
    pool = WORDS if task.kind == "reverse" else tuple("0123456789")
    items[0] = rng.choice([w for w in pool if w != items[0]])
    return " ".join(items)


# ---------------------------------------------------------------------------------------------------------------
# The gold scorer
# ---------------------------------------------------------------------------------------------------------------

_PROMPTS = (
    ("add", re.compile(r"^What is (\d+) \+ (\d+)\?$")),
    ("sort", re.compile(r"^Sort these numbers: ([\d ]+)$")),
    ("reverse", re.compile(r"^Reverse the words: ([a-z ]+)$")),
    ("count", re.compile(r"^How many times does ([a-z]+) appear in: ([a-z ]+)\?$")),
)
_CONCISE = re.compile(r"^The answer is ([^.]+)\.$")
_STATED = re.compile(r"(?:answer is|maybe) ([^.?!]+)[.?!]?\s*$")


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """Return ``(kind, exact answer)`` for a tiny-world prompt, or None for a prompt from elsewhere."""
    prompt = prompt.strip()
    for kind, pattern in _PROMPTS:
        m = pattern.match(prompt)
        if not m:
            continue
        if kind == "add":
            return kind, str(int(m.group(1)) + int(m.group(2)))
        if kind == "sort":
            return kind, " ".join(sorted(m.group(1).split()))
        if kind == "reverse":
            return kind, " ".join(reversed(m.group(1).split()))
        return kind, str(m.group(2).split().count(m.group(1)))
    return None


def stated_answer(response: str) -> str | None:
    """The answer a response commits to: the text after its last "answer is" or "maybe", at the very end."""
    m = _STATED.search(response.strip())
    return m.group(1).strip() if m else None


def correctness(kind: str, answer: str, stated: str | None) -> float:
    """1 for the exact answer; for lists of equal length, the fraction of positions that match; else 0."""
    if stated is None:
        return 0.0
    if kind in ("add", "count"):
        return float(stated == answer)
    want, got = answer.split(), stated.split()
    if len(want) != len(got):
        return 0.0
    return sum(w == g for w, g in zip(want, got)) / len(want)


def gold_parts(prompt: str, response: str) -> dict[str, float]:
    """The two halves of the gold score, for reports: ``correct`` and ``style`` (each in [0, 1])."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a tiny-world prompt: {prompt!r}")
    kind, answer = parsed
    response = response.strip()
    return {
        "correct": correctness(kind, answer, stated_answer(response)),
        "style": float(_CONCISE.match(response) is not None),
    }


def score(prompt: str, response: str) -> float:
    """Gold score in [0, 1]: ``0.5 * correctness + 0.5 * (response is the concise form)``."""
    parts = gold_parts(prompt, response)
    return 0.5 * parts["correct"] + 0.5 * parts["style"]


def _batched(part, kind: str | None = None):
    """A scorer (``rlhf.feedback.scorers``) from one measure of ``gold_parts``: None for prompts from elsewhere (and,
    with ``kind``, for the world's prompts of another kind)."""
    def scorer(prompts: list[list[dict]], responses: list[str]) -> list[float | None]:
        out = []
        for messages, response in zip(prompts, responses):
            question = messages[-1]["content"]
            parsed = parse_prompt(question)
            if parsed is None or kind not in (None, parsed[0]):
                out.append(None)
            else:
                parts = gold_parts(question, response)
                out.append(0.5 * parts["correct"] + 0.5 * parts["style"] if part == "gold" else parts[part])
        return out
    scorer.__name__ = f"{part}_{kind}_scores" if kind else f"{part}_scores"
    return scorer


gold_scores = _batched("gold")
"""the gold score as a scorer (built-in name ``gold``)"""
correctness_scores = _batched("correct")
"""correctness alone (built-in name ``correctness``)"""
style_scores = _batched("style")
"""style alone (built-in name ``style``)"""
correct_add_scores, correct_sort_scores, correct_reverse_scores, correct_count_scores = (
    _batched("correct", kind) for kind in KINDS)
"""correctness on one kind of task, None on the others (built-in names ``correct_add``, ...: eval's columns by task
kind)"""


# ---------------------------------------------------------------------------------------------------------------
# Pretraining text for the tiny base: the world's facts in plain prose, no chat format
# ---------------------------------------------------------------------------------------------------------------

_FACT_TEMPLATES = {
    "add": ("{a} plus {b} makes {s}.", "{a} + {b} = {s}."),
    "sort": ("in order, {x} becomes {y}.", "sorting {x} gives {y}."),
    "reverse": ("backwards, {x} becomes {y}.", "reversing {x} gives {y}."),
    "count": ("in {x}, {w} appears {n} times.", "{w} appears {n} times in {x}."),
}


def fact_sentence(rng: random.Random) -> str:
    """One true sentence about the world, or a question followed by a correct answer in any style.

    The base model learns the whole language of the world this way (questions, answers, every style) but never
    sees the chat markers, and never sees a response end on its own: documents run on from one sentence to the
    next, so stopping after the answer is something only SFT teaches.
    """
    task = make_task(rng)
    if rng.random() < 0.35:
        return f"{task.prompt} {render(task, rng.choice(STYLES))}"
    template = rng.choice(_FACT_TEMPLATES[task.kind])
    if task.kind == "add":
        a, b = task.prompt[len("What is "):-1].split(" + ")
        text = template.format(a=a, b=b, s=task.answer)
    elif task.kind == "count":
        w, x = re.match(r"^How many times does ([a-z]+) appear in: ([a-z ]+)\?$", task.prompt).groups()
        text = template.format(w=w, x=x, n=task.answer)
    else:
        x = task.prompt.split(": ", 1)[1]
        text = template.format(x=x, y=task.answer)
    text = text[0].upper() + text[1:]
    if rng.random() < 0.15:
        text = f"{text} So the answer is {task.answer}."
    return text


def pretraining_document(rng: random.Random) -> str:
    """A short document of 1-6 fact sentences (the base model's pretraining text)."""
    return " ".join(fact_sentence(rng) for _ in range(rng.randint(1, 6)))
