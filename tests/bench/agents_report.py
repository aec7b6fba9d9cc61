"""The agents table on the tiny world (docs/agents.md): each policy answers the held-out prompts greedily, with
the calculator (multi-turn episodes through ``rlhf.engine.agent``, the tools in its prompt) or without it (one
response, as ``rlhf eval`` plays it); the table gives correctness by task kind, gold, turns, calls and failed
calls per episode, and seconds per batch of episodes.

    python tests/bench/agents_report.py RUN[:tools|:plain] ... [--prompts data/tiny/heldout_prompts.jsonl]

RUN is a policy run directory (SFT or PPO); ``:tools`` plays episodes with ``tiny:calculator`` (the default for a
run trained on tools), ``:plain`` one response without tools.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import click
import torch

from rlhf.engine import agent, environments, rollout
from rlhf.models import modeling
from rlhf.text import encoding, formats
from rlhf.tiny import world


def play(run: str, mode: str, prompts: list[list[dict]], batch: int, max_new_tokens: int) -> list[dict]:
    """Each prompt's greedy answer under the run's policy, with what the episode did."""
    model, tok = modeling.load_policy(run)
    env = environments.load("tiny:calculator")
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        t0 = time.time()

        def sample(query, mask, **kwargs):
            return rollout.decode(model, query, mask, temperature=0.0, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, vocab=len(tok), **kwargs)

        if mode == "tools":  # greedy: the keys play no part
            episodes = agent.generate(model, tok, chunk, env, environments.Limits(max_turns=3, max_tokens=220),
                                      max_new_tokens, batch_size=len(chunk))
            rows = [{"answer": e.answer, "turns": e.turns, "calls": e.calls, "failures": sum(e.failures.values())}
                    for e in episodes]
        else:
            ids, mask = encoding.left_pad([encoding.encode_prompt(tok, m) for m in chunk], tok.pad_token_id)
            with torch.no_grad():
                done = sample(ids, mask, max_new_tokens=max_new_tokens)
            rows = []
            for r in done.tokens.tolist():
                n = r.index(tok.eos_token_id) if tok.eos_token_id in r else len(r)
                rows.append({"answer": tok.decode(r[:n], skip_special_tokens=True).strip(), "turns": 1, "calls": 0,
                             "failures": 0})
        seconds = time.time() - t0
        for m, row in zip(chunk, rows):
            out.append({**row, "prompt": m[-1]["content"], "seconds": seconds / len(chunk)})
    return out


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| policy | " + " | ".join(f"correct: {k}" for k in world.KINDS) + " | correct | gold | turns | calls "
             "| failed calls | s / episode |", "|---" * (len(world.KINDS) + 7) + "|"]
    for name, rows in results.items():
        by_kind = defaultdict(list)
        golds = []
        for r in rows:
            parts = world.gold_parts(r["prompt"], r["answer"])
            by_kind[world.parse_prompt(r["prompt"])[0]].append(parts["correct"])
            golds.append(world.score(r["prompt"], r["answer"]))
        correct = [c for k in by_kind for c in by_kind[k]]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines.append(f"| {name} | " + " | ".join(f"{mean(by_kind[k]):.3f}" for k in world.KINDS)
                     + f" | {mean(correct):.3f} | {mean(golds):.3f} | {mean([r['turns'] for r in rows]):.2f} | "
                     f"{mean([r['calls'] for r in rows]):.2f} | {mean([r['failures'] for r in rows]):.2f} | "
                     f"{mean([r['seconds'] for r in rows]):.3f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--prompts", default="data/tiny/heldout_prompts.jsonl", show_default=True)
@click.option("--batch", default=50, show_default=True)
@click.option("--max-new-tokens", default=80, show_default=True)
@click.option("--out", default=None, help="write the table and the answers (JSON) here")
def main(runs, prompts, batch, max_new_tokens, out):
    rows = formats.load(prompts, "prompts").rows
    results = {}
    for spec in runs:
        run, _, mode = spec.partition(":")
        mode = mode or "tools"
        results[f"{run} ({'with the calculator' if mode == 'tools' else 'no tools'})"] = play(
            run, mode, rows, batch, max_new_tokens)
    text = table(results)
    click.echo(text, nl=False)
    if out:
        with open(out, "w") as f:
            json.dump({"table": text, "answers": results}, f, indent=1)


if __name__ == "__main__":
    main()
