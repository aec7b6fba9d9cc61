"""The fine-tuning method comparison (``make methods-report``): every method through the SFT stage of the tiny
world, with trainable parameters, peak memory, wall time and the held-out gold score of the result.

Each method runs in its own process so that its peak resident memory is its own. Writes ``report.md`` and
``report.json`` into the output directory.

    python tests/bench/methods_report.py [--recipe recipes/tiny.yaml] [--out runs/methods-report] [--epochs E]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]

# Rows of the table: (label, adapter.method, extra --set overrides). Learning rates follow common practice per
# family: base weights take smaller steps, soft prompts and scaling vectors much larger ones.
ROWS = [
    ("lora", "lora", []),
    ("dora", "dora", []),
    ("qlora (4-bit NF4 base)", "qlora", []),
    ("lora on an 8-bit base", "lora", ["model.quantization=8bit"]),
    ("ia3", "ia3", ["sft.lr=3e-2"]),
    ("adalora", "adalora", []),
    ("prefix", "prefix", ["sft.lr=1e-2"]),
    ("prompt (random init)", "prompt", ["sft.lr=3e-2"]),
    ("prompt (text init)", "prompt", ["sft.lr=3e-2", "adapter.prompt_init=text",
                                      "adapter.prompt_init_text=Answer in as few words as possible."]),
    ("ptuning (MLP encoder)", "ptuning", ["sft.lr=1e-2"]),
    ("ptuning (LSTM encoder)", "ptuning", ["sft.lr=1e-2", "adapter.encoder=lstm"]),
    ("ptuning_v2", "ptuning_v2", ["sft.lr=3e-2"]),
    ("adapter (Houlsby)", "adapter", []),
    ("bitfit (base with zero-initialised biases)", "bitfit", ["sft.lr=1e-2"]),
    ("freeze (top 2 blocks)", "freeze", ["sft.lr=3e-4"]),
    ("full", "full", ["sft.lr=3e-4"]),
]


def biased_base(out: Path) -> str:
    """The tiny base with zero bias terms added (the same function as the base), so that bitfit has biases."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = ROOT / "data" / "tiny-base"
    if not (out / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(base, attention_bias=True, mlp_bias=True).save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def run_one(recipe_path: str, method: str, overrides: list[str], out: Path, limit: int) -> dict:
    """SFT with one method, then greedy answers to held-out prompts scored by the gold scorer."""
    import torch

    from bench import own_peak_mb  # this directory: the script's own

    from rlhf.engine import rollout
    from rlhf.models import modeling
    from rlhf.text import formats
    from rlhf.config import load_recipe
    from rlhf.tiny import world
    from stages import sft

    recipe = load_recipe(recipe_path, [f"adapter.method={method}", *overrides])
    start = time.perf_counter()
    manifest = sft.main(recipe, out=out, overwrite=True)
    seconds = time.perf_counter() - start
    model, tokenizer = modeling.load_policy(out)
    prompts = formats.load(recipe.data.eval_prompts, "prompts").rows[:limit]
    gens = rollout.generate(model, tokenizer, prompts, max_new_tokens=64)
    questions = [p[-1]["content"] for p in prompts]
    gold = sum(world.score(q, t) for q, t in zip(questions, gens.texts)) / len(prompts)
    result = {"parameters": manifest["adapter"]["parameters"], "seconds": round(seconds, 1),
              "steps": manifest["metrics"]["steps"], "eval_loss": manifest["metrics"].get("eval_loss"),
              "gold": round(gold, 4), "peak_rss_mib": round(own_peak_mb())}
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


@click.command()
@click.option("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"), show_default=True)
@click.option("--out", default=str(ROOT / "runs" / "methods-report"), show_default=True)
@click.option("--epochs", type=float, help="override sft.epochs for every method (default: the recipe's)")
@click.option("--limit", default=200, show_default=True, help="held-out prompts scored per method")
@click.option("--only", help="comma-separated row labels or methods to run (default: all)")
@click.option("--one", hidden=True)
@click.option("--set", "overrides", multiple=True, hidden=True)
def main(recipe, out, epochs, limit, only, one, overrides):
    out_dir = Path(out)
    if one:  # child process: one method
        print(json.dumps(run_one(recipe, one, list(overrides), out_dir, limit)))
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for label, method, extra in ROWS:
        if only and label not in only.split(",") and method not in only.split(","):
            continue
        extra = list(extra) + ([f"sft.epochs={epochs}"] if epochs else [])
        if method == "bitfit":
            extra.append(f"model.base={biased_base(out_dir / 'biased-base')}")
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        cmd = [sys.executable, __file__, "--recipe", recipe, "--out", str(out_dir / slug),
               "--limit", str(limit), "--one", method, *[a for o in extra for a in ("--set", o)]]
        print(f"methods-report: {label} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            results.append({"label": label, "method": method, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            results.append({"label": label, "method": method, "overrides": extra,
                            **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(f"methods-report: {results[-1]}", file=sys.stderr, flush=True)
    (out_dir / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(results, recipe, epochs))
    print(markdown(results, recipe, epochs))


def markdown(results: list[dict], recipe: str, epochs: float | None) -> str:
    import platform

    lines = [f"SFT on the tiny world ({Path(recipe).name}{f', {epochs} epochs' if epochs else ''}), "
             f"{os.cpu_count()} CPU threads, {platform.processor() or platform.machine()}; gold = mean held-out "
             "gold score of greedy answers (higher is better).", "",
             "| method | trainable | % of base | peak RSS MiB | seconds | eval loss | gold |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:120]} | | | | | |")
            continue
        p = r["parameters"]
        loss = f"{r['eval_loss']:.3f}" if r.get("eval_loss") is not None else "-"
        lines.append(f"| {r['label']} | {p['trainable']:,} | {p['percent']:.2f} | {r['peak_rss_mib']} | "
                     f"{r['seconds']} | {loss} | {r['gold']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
