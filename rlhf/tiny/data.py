"""Generate the tiny world's data files (``data/tiny/``) deterministically from a seed.

Held-out prompts are drawn first and every training split rejects them, so no held-out prompt is ever trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf.tiny import world

# rows per file of the default world
SIZES = {
    "sft": 4000,
    "sft_tools": 4000,
    "preference": 4000,
    "prompts": 2000,
    "heldout_prompts": 200,
    "heldout_preference": 400,
}


def demonstration(rng: random.Random, task: world.Task) -> str:
    """A correct response in a style drawn from the demonstrators' mix (``world.DEMO_STYLE_WEIGHTS``)."""
    styles, weights = zip(*world.DEMO_STYLE_WEIGHTS.items())
    return world.render(task, rng.choices(styles, weights)[0])


STYLE_PAIR_SHARE = 0.85
"""share of preference pairs whose two responses differ in style (one concise); the rest differ only in
correctness"""


def preference_pair(rng: random.Random, task: world.Task) -> dict:
    """Two responses with different gold scores; the higher one is ``chosen``.

    Most pairs (STYLE_PAIR_SHARE) put a concise response against a verbose or hedged one; the rest use two responses of the
    same kind (both concise, or both not). Each response is correct with probability 1/2 (else a plausible wrong
    answer); draws whose gold scores tie are redrawn.
    """
    if rng.random() < STYLE_PAIR_SHARE:
        styles = ["concise", rng.choice(("verbose", "hedged"))]
        rng.shuffle(styles)
    else:
        styles = rng.choice([["concise", "concise"], ["verbose", "verbose"], ["hedged", "hedged"],
                             ["verbose", "hedged"], ["hedged", "verbose"]])
    while True:
        a, b = (world.render(task, style, task.answer if rng.random() < 0.5 else world.wrong_answer(rng, task))
                for style in styles)
        ga, gb = world.score(task.prompt, a), world.score(task.prompt, b)
        if ga != gb:
            chosen, rejected = (a, b) if ga > gb else (b, a)
            return {"prompt": task.prompt, "chosen": chosen, "rejected": rejected}


def _unique_tasks(rng: random.Random, n: int, exclude: set[str]) -> list[world.Task]:
    """``n`` tasks with distinct prompts, none in ``exclude`` (their prompts are added to it)."""
    tasks = []
    while len(tasks) < n:
        task = world.make_task(rng, world.KINDS[len(tasks) % len(world.KINDS)])
        if task.prompt not in exclude:
            exclude.add(task.prompt)
            tasks.append(task)
    return tasks


def build_rows(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """All splits of the world as lists of JSON rows, keyed by file stem."""
    sizes = {**SIZES, **(sizes or {})}
    rng = random.Random(seed)
    seen: set[str] = set()
    heldout = _unique_tasks(rng, sizes["heldout_prompts"], seen)
    heldout_pairs = _unique_tasks(rng, sizes["heldout_preference"], seen)
    # training splits may share prompts with each other (as real pipelines do), never with the held-out ones
    train_pool = set(seen)
    return {
        "sft": [{"prompt": t.prompt, "completion": demonstration(rng, t)}
                for t in _unique_tasks(rng, sizes["sft"], set(train_pool))],
        "preference": [preference_pair(rng, t) for t in _unique_tasks(rng, sizes["preference"], set(train_pool))],
        "prompts": [{"prompt": t.prompt} for t in _unique_tasks(rng, sizes["prompts"], set(train_pool))],
        "heldout_prompts": [{"prompt": t.prompt} for t in heldout],
        "heldout_preference": [preference_pair(rng, t) for t in heldout_pairs],
        # drawn last, from a generator of its own: the other files stay as they were before it existed
        "sft_tools": tool_demonstrations(random.Random(seed + 7919), sizes["sft_tools"], set(train_pool)),
    }


TOOL_SHARE = 0.75
"""share of ``add`` demonstrations in ``sft_tools`` that ask the calculator first"""


def tool_demonstrations(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """SFT rows for agents (``recipes/tiny-agent.yaml``): OpenAI-style ``messages`` with the calculator's tools
    (``tiny:calculator``). Most ``add`` demonstrations call ``add`` with the prompt's two numbers, read the result
    and answer with it; the other tasks are answered directly, so the policy learns when a call pays."""
    from rlhf.tiny.environments import Calculator, schemas

    tools = schemas()
    rows = []
    for task in _unique_tasks(rng, n, exclude):
        messages = [{"role": "user", "content": task.prompt}]
        if task.kind == "add" and rng.random() < TOOL_SHARE:
            a, b = (int(x) for x in task.prompt.removeprefix("What is ").rstrip("?").split(" + "))
            call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
            messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "name": "add", "content": str(Calculator().add(a, b))}]
        rows.append({"messages": messages + [{"role": "assistant", "content": demonstration(rng, task)}],
                     "tools": tools})
    return rows


def write(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write every split as ``<out_dir>/<name>.jsonl``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in build_rows(seed, sizes).items():
        path = out / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[name] = path
    return paths
