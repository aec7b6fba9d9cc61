"""Memory per process of full-fine-tuning PPO, one process against two (``make sharded-memory``): the same run in
one process, in two data-parallel processes (each holds every model whole) and in two FSDP2-sharded processes
(``recipes/accelerate/fsdp.yaml`` on the CPU: each holds half of every weight, gradient and Adam moment, and the
policy gathered whole while it samples).

On the tiny base the runtime (torch, transformers, the tokenizer: ~0.5 GB) hides a model of 14 MB, so the base here
is a random-initialised Llama of the tiny base's vocabulary and chat template at a width where the models count:
``--hidden 1024 --layers 8`` is ~103M parameters, 0.4 GB a copy in fp32. PPO starts from the base (no SFT run)
against the tiny world's gold scorer, so it holds three copies (policy, reference, value; no reward model): with
the gradients and Adam state of two, ~3.7 GB in one process. The numbers are the processes' resident memory
(Linux VmRSS / VmHWM) from each run's manifest.

    python tests/bench/sharded_memory.py [--hidden 1024] [--layers 8] [--out runs/sharded-memory]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "tiny-base"

LAYOUTS = [  # (label, extra CLI arguments, per-process batch)
    ("one process", [], 8),
    ("two processes, data parallel", ["--num-processes", "2"], 4),
    ("two processes, FSDP2 shards", ["--num-processes", "2", "--accelerate-config", "{fsdp}"], 4),
]


def build_base(out: Path, hidden: int, layers: int) -> int:
    """A random-initialised Llama with the tiny base's tokenizer at ``out``; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = json.loads((TINY / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in config.items()
                                                            if k not in ("architectures", "transformers_version")}))
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (TINY / name).exists():
            shutil.copy(TINY / name, out / name)
    return sum(p.numel() for p in model.parameters())


@click.command()
@click.option("--hidden", default=1024, show_default=True)
@click.option("--layers", default=8, show_default=True)
@click.option("--out", default="runs/sharded-memory", show_default=True, type=click.Path(path_type=Path))
def main(hidden: int, layers: int, out: Path) -> None:
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parameters = build_base(out / "base", hidden, layers)
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["model"]["base"] = str(out / "base")
    recipe["adapter"] = {"method": "full"}
    for key in ("sft", "preference", "prompts", "eval_prompts"):
        if isinstance(recipe["data"].get(key), str):
            recipe["data"][key] = str(ROOT / recipe["data"][key])
    recipe["run_dir"] = str(out / "runs")
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    fsdp = out / "fsdp.yaml"
    fsdp.write_text((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text()
                    .replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    rows = []
    for label, extra, batch in LAYOUTS:
        run = out / label.replace(" ", "-").replace(",", "")
        sets = ["ppo.max_steps=2", "ppo.max_new_tokens=16", "ppo.eval_every=0", "ppo.save_every=0",
                "ppo.ppo_epochs=1", "ppo.mixed_precision=no", "ppo.lr=1e-6", "ppo.reward={gold: 4.0}",
                f"ppo.batch_size={batch}", f"ppo.mini_batch_size={batch}", f"ppo.micro_batch_size={batch}"]
        cmd = [sys.executable, "-m", "rlhf.cli", "ppo", "--recipe", str(out / "recipe.yaml"), "--policy", "base",
               "--out", str(run), *[x for s in sets for x in ("--set", s)],
               *[x.format(fsdp=fsdp) for x in extra]]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        m = json.loads((run / "manifest.json").read_text())
        shards = m.get("shards") or {}
        rows.append({"layout": label, "seconds": m["seconds"], **m["memory_by_process"],
                     "parameters": m["adapter"]["parameters"]["total"],
                     "held_by_process": shards.get("held_by_process"),
                     "loaded_peak_rss_mb": shards.get("loaded_peak_rss_mb")})
    lines = [f"Full-fine-tuning PPO, a {parameters / 1e6:.0f}M-parameter random Llama (hidden {hidden}, {layers} "
             "layers), fp32, 2 steps of 8 episodes; resident memory per process (MB):", "",
             "| layout | peak once loaded | peak per process | at the end per process | parameters held per process "
             "| wall |", "|---|---|---|---|---|---|"]
    for r in rows:
        held = ", ".join(f"{x / 1e6:.0f}M" for x in r["held_by_process"]) if r["held_by_process"] else \
            f"{r['parameters'] / 1e6:.0f}M (every copy whole)"
        loaded = ", ".join(f"{x:,.0f}" for x in r["loaded_peak_rss_mb"]) if r["loaded_peak_rss_mb"] else "-"
        lines.append(f"| {r['layout']} | {loaded} | {', '.join(f'{x:,.0f}' for x in r['peak_rss_mb'])} | "
                     f"{', '.join(f'{x:,.0f}' for x in r['rss_mb'])} | {held} | {r['seconds']:.0f} s |")
    (out / "sharded_memory.md").write_text("\n".join(lines) + "\n")
    (out / "sharded_memory.json").write_text(json.dumps({"parameters": parameters, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
