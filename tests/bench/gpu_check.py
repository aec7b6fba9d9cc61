"""``make gpu-check``: the pipeline on one GPU with a model shaped like Qwen2.5-0.5B, then PPO measured.

A random-initialised model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, a 151,936-token vocabulary), built from its transformers config with a locally built ChatML tokenizer (no
download), goes through SFT, RM, PPO and eval for a few steps in bf16 with LoRA, and with QLoRA when bitsandbytes
is installed. Then PPO runs at batch 64 with 128-token responses, and the check reports generated tokens/s,
episodes/s, the time of each phase (generation, scoring, update), peak GPU memory, and at step 1 the
policy-reference KL and the first mini-batch's probability ratio: ~0 and ~1 when the sampling pass and the
training pass compute the same log-probs. It also says whether PPO repeats bit for bit on the device: the run's own
check (``rlhf.ppo.precision.repeats``, the manifest's ``repeatable``) and the pipeline's PPO run a second time, its
adapter compared with the first's. One table on stdout; gpu_check.json and gpu_check.md in --out.

``--tiny`` runs the same code on the CPU with a 2-layer model of the same family and small batches (the test suite
runs it, so the check's code path stays working without a GPU).

    python tests/bench/gpu_check.py [--out runs/gpu-check] [--tiny] [--steps 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
"""Qwen2.5-0.5B's shape (its config.json), about 494M parameters"""
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=True)
"""a 2-layer model of the same family for the CPU mode (a vocabulary past the tokenizer's, as Qwen's is)"""
ANCHOR = {"verl_tokens_per_s": 1100, "target_tokens_per_s": 2200}
"""verl's single-GPU PPO log on Qwen2.5-0.5B (vLLM rollouts, full fine-tuning), and this project's target"""


def invoke(*args: str) -> float:
    """``rlhf ARGS`` in this process; returns its wall time in seconds."""
    from click.testing import CliRunner

    from rlhf.cli import cli

    t0 = time.time()
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if result.exit_code:
        raise SystemExit(f"rlhf {' '.join(args)} exited {result.exit_code}\n{result.output}")
    return time.time() - t0


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` alpaca-style prompts of 10 to 40 words."""
    from families import sentence

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"instruction": sentence(rng, rng.randint(10, 40)), "input": ""}) + "\n"
                            for _ in range(n)))
    return path


def recipe(base: Path, data: dict, run_dir: Path, gpu: bool, method: str = "lora") -> dict:
    """A few steps of every stage: enough to run each code path on the device, not to train."""
    small = not gpu
    return {
        "name": method, "run_dir": str(run_dir),
        "model": {"base": str(base), "dtype": "bfloat16" if gpu else "float32"},
        "adapter": {"method": method, "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"sft": str(data["sft"]), "preference": str(data["preference"]), "prompts": str(data["prompts"]),
                 "eval_prompts": str(data["prompts"])},
        "sft": {"max_steps": 2 if small else 4, "batch_size": 4 if small else 8, "max_length": 256,
                "eval_fraction": 0.1, "logging_every": 1},
        "rm": {"max_steps": 2 if small else 4, "batch_size": 4 if small else 8, "max_length": 192,
               "eval_fraction": 0.2, "logging_every": 1, "stats_samples": 0},
        "ppo": {"max_steps": 1 if small else 2, "batch_size": 4 if small else 8, "mini_batch_size": 4 if small else 8,
                "micro_batch_size": 2 if small else 8, "max_new_tokens": 8 if small else 16,
                "max_prompt_length": 128, "eval_every": 0},
        "eval": {"policies": ["sft", "ppo"], "icl_shots": 1, "limit": 4 if small else 16,
                 "max_new_tokens": 8 if small else 32, "bootstrap": 50},
        "logging": {"progress": "off"},
    }


def pipeline(base: Path, data: dict, work: Path, gpu: bool, method: str) -> dict:
    """SFT, RM, PPO and eval on ``method``: seconds per stage, or why a stage failed (the later ones are skipped)."""
    import traceback

    import yaml

    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe(base, data, work / "runs", gpu, method), sort_keys=False))
    times: dict = {}
    for stage in ("sft", "rm", "ppo", "eval"):
        try:
            times[stage] = round(invoke(stage, "--recipe", str(path), "--overwrite"), 1)
        except BaseException as e:  # noqa: BLE001  (a check reports every failure and goes on where it can)
            print("".join(traceback.format_exception(e))[-3000:], file=sys.stderr)
            times[stage] = f"failed: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__}"
            break
    return times


def measure_ppo(work: Path, method: str, batch: int, length: int, steps: int) -> dict:
    """PPO at ``batch`` episodes of exactly ``length`` response tokens for ``steps`` steps (the first warms up)."""
    import torch

    runs = work / "runs" / method
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = work / "runs" / f"ppo-measured-{batch}"
    mini = min(batch, 32)
    wall = invoke("ppo", "--recipe", str(work / f"{method}.yaml"), "--policy", str(runs / "sft"),
                  "--reward", str(runs / "rm"), "--out", str(out), "--overwrite",
                  "--set", f"data.prompts={work / 'prompts.jsonl'}",
                  "--set", f"ppo.batch_size={batch}", "--set", f"ppo.mini_batch_size={mini}",
                  "--set", f"ppo.micro_batch_size={mini}", "--set", f"ppo.max_new_tokens={length}",
                  "--set", f"ppo.min_new_tokens={length}", "--set", f"ppo.max_steps={steps}",
                  "--set", "ppo.eval_every=0", "--set", "ppo.save_every=0")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    steady = rows[1:] or rows  # step 1 pays for kernel selection and allocator warm-up
    mean = lambda key: statistics.mean(r[key] for r in steady)  # noqa: E731
    tokens = [batch * r["response/length"] for r in steady]
    return {
        "batch": batch, "response_tokens": length, "steps": steps, "steps_timed": len(steady),
        "mini_batch": mini, "ppo_epochs": 4, "precision": manifest["mixed_precision"],
        "model_dtype": manifest["recipe"]["model"]["dtype"],
        "attention": manifest["recipe"]["model"]["attn_implementation"],
        "generated_tokens_per_s": statistics.mean(t / r["time/generation_s"] for t, r in zip(tokens, steady)),
        "episodes_per_s": batch / mean("time/step_s"),
        "step_s": mean("time/step_s"),
        "generation_s": mean("time/generation_s"), "scoring_s": mean("time/scoring_s"),
        "update_s": mean("time/update_s"),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "step1_kl": rows[0]["objective/kl"], "step1_ratio_first": rows[0]["policy/ratio_first"],
        "step1_policy_ratio": rows[0]["policy/ratio"], "response_length": mean("response/length"),
        "wall_s": round(wall, 1),
    }


def repeat_ppo(work: Path, method: str) -> dict:
    """The pipeline's PPO run again into another directory: whether its adapter equals the first run's bit for bit
    (the largest difference when not), and what each run's own check said (``repeatable``)."""
    import torch
    from safetensors.torch import load_file

    runs = work / "runs" / method
    invoke("ppo", "--recipe", str(work / f"{method}.yaml"), "--out", str(runs / "ppo-again"), "--overwrite")
    a, b = (load_file(runs / d / "adapter_model.safetensors") for d in ("ppo", "ppo-again"))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    manifests = [json.loads((runs / d / "manifest.json").read_text()) for d in ("ppo", "ppo-again")]
    return {"identical": diff == 0.0, "max_abs_diff": diff, "repeatable": [m["repeatable"] for m in manifests],
            "precision": manifests[0]["mixed_precision"], "model_dtype": manifests[0]["recipe"]["model"]["dtype"],
            "torch_deterministic": torch.are_deterministic_algorithms_enabled()}


def decode_latency(work: Path, method: str, tokens: int, batches: tuple[int, ...]) -> dict:
    """Milliseconds per decode step of the generation engine (``rollout.decode``; the prompt's pass left
    out) at each of ``batches``: the plain transformers model, PPO's four-adapter model with every adapter off, and
    with the policy adapter on. When a large batch costs what batch 1 costs, the decode step is bound by kernel
    launches and Python, not by arithmetic or memory."""
    import torch

    from rlhf.engine import rollout
    from rlhf.models import modeling
    from rlhf.ppo import ppo_models
    from rlhf.text import encoding
    from rlhf.config import ModelConfig

    runs = work / "runs" / method
    manifest = json.loads((runs / "rm" / "manifest.json").read_text())
    cfg = ModelConfig(**{**manifest["recipe"]["model"], "base": manifest["base"]})
    device = modeling.accelerator()
    tok = modeling.load_tokenizer(cfg, str(runs / "sft"))
    rows = [[{"role": "user", "content": json.loads(x)["instruction"]}]
            for x in (work / "prompts.jsonl").read_text().splitlines()[:64]]
    ids, mask = (t.to(device) for t in encoding.left_pad(encoding.encode_prompts(tok, rows, 10_000)[0],
                                                          tok.pad_token_id))
    plain = modeling.load_base(cfg, device=device).eval()
    models = ppo_models.load(cfg, method, runs / "sft", runs / "rm", device=device, mixed_precision="auto")
    models.train(False)
    cuda = device.type == "cuda"

    def seconds(run, batch: int, n: int) -> float:
        keys = rollout.episode_keys(0, 1, torch.arange(batch))
        kwargs = dict(keys=keys, temperature=1.0, max_new_tokens=n, min_new_tokens=n,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(ids[:batch], mask[:batch], **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def timed(run, batch: int) -> float:
        seconds(run, batch, tokens)  # warm-up
        return (seconds(run, batch, tokens) - seconds(run, batch, 1)) * 1000 / (tokens - 1)

    def bare(*a, **k):
        with models.bare():
            return models.sample(*a, **k)

    out = {}
    for batch in batches:
        out[f"plain model, batch {batch}"] = timed(lambda *a, **k: rollout.decode(plain, *a, **k), batch)
        out[f"PPO's model, adapters off, batch {batch}"] = timed(bare, batch)
        out[f"PPO's model, policy adapter, batch {batch}"] = timed(models.sample, batch)
    return {k: round(v, 2) for k, v in out.items()}


def table(result: dict) -> str:
    m = result["ppo"]
    lines = [f"# GPU check: {result['device']}", "",
             f"Model: random-initialised, {result['shape']} ({result['parameters'] / 1e6:.1f}M parameters), "
             f"LoRA r=16 on every linear layer, weights in {m['model_dtype']}; torch {result['versions']['torch']}, "
             f"transformers {result['versions']['transformers']}.", "",
             "| stage | " + " | ".join(result["pipeline"]) + " |", "|---|" + "---|" * len(result["pipeline"])]
    for method, times in result["pipelines"].items():
        cells = [f"{times[s]:.1f}" if isinstance(times.get(s), float) else str(times.get(s, "-"))
                 for s in result["pipeline"]]
        lines.append(f"| {method} (s) | " + " | ".join(cells) + " |")
    lines += ["", f"PPO at batch {m['batch']}, {m['response_tokens']}-token responses, {m['ppo_epochs']} PPO epochs "
              f"of mini-batches of {m['mini_batch']} (mean of {m['steps_timed']} steps after the first):", "",
              "| measure | value |", "|---|---|",
              f"| generated tokens/s | {m['generated_tokens_per_s']:,.0f} "
              f"(verl's log: ~{ANCHOR['verl_tokens_per_s']:,}; "
              f"target {ANCHOR['target_tokens_per_s']:,}) |",
              f"| episodes/s | {m['episodes_per_s']:.2f} |",
              f"| step (s) | {m['step_s']:.2f} |",
              f"| generation / scoring / update (s) | {m['generation_s']:.2f} / {m['scoring_s']:.2f} / "
              f"{m['update_s']:.2f} |",
              "| peak GPU memory (GiB) | " + (f"{m['peak_gpu_memory_gib']:.1f}" if m["peak_gpu_memory_gib"] else "-")
              + " |",
              f"| step 1: policy-reference KL | {m['step1_kl']:.2e} |",
              f"| step 1: first mini-batch ratio | {m['step1_ratio_first']:.6f} |"]
    if result.get("repeat"):
        r = result["repeat"]
        lines.append(f"| two identical PPO runs ({r['model_dtype']} weights, autocast "
                     f"{'bf16' if r['precision'] == 'bf16' else 'none'}) | "
                     + ("identical bit for bit" if r["identical"] else f"differ (max {r['max_abs_diff']:.2e})")
                     + f"; each run's own check: {', '.join('repeats' if x else 'does not repeat' for x in r['repeatable'])} |")
    if result.get("decode_ms_per_token"):
        lines += ["", "Milliseconds per decode step of the rollout's sampling loop (the prompt's pass left out):",
                  "", "| model | ms per token |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in result["decode_ms_per_token"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--tiny", action="store_true", help="the CPU mode: a 2-layer model, small batches")
    parser.add_argument("--steps", type=int, default=3, help="PPO steps measured (the first is not timed)")
    parser.add_argument("--batch", type=int, default=None, help="PPO batch (default 64; 8 with --tiny)")
    parser.add_argument("--length", type=int, default=None, help="response tokens (default 128; 16 with --tiny)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from families import BY_NAME, build, write_data

    transformers.logging.set_verbosity_error()  # the stages print what matters (load reports: a fresh score head)

    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        raise SystemExit("gpu-check: no GPU here; --tiny runs the check's code on the CPU")
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = build(BY_NAME["qwen2"], work / "base", config=QWEN25_05B if gpu else TINY,
                 dtype=torch.bfloat16 if gpu else torch.float32, device="cuda" if gpu else "cpu")
    data = write_data(work / "data")
    data["prompts"] = write_prompts(work / "prompts.jsonl", 256)
    built = time.time() - t0
    methods = ["lora"] + (["qlora"] if gpu and importlib.util.find_spec("bitsandbytes") else [])
    pipelines = {method: pipeline(base, data, work, gpu, method) for method in methods}
    ppo = measure_ppo(work, "lora", args.batch or (64 if gpu else 8), args.length or (128 if gpu else 16),
                      args.steps) if isinstance(pipelines["lora"].get("ppo"), float) else None
    decode = decode_latency(work, "lora", 33 if gpu else 5, (1, 64) if gpu else (1, 8)) if ppo is not None else None
    repeat = repeat_ppo(work, "lora") if ppo is not None else None
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        parameters = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    result = {
        "device": torch.cuda.get_device_name() if gpu else "CPU (tiny mode)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "shape": "Qwen2.5-0.5B's shape" if gpu else "a 2-layer Qwen2 (tiny mode)",
        "parameters": parameters, "base_built_s": round(built, 1), "methods": methods,
        "qlora": "ran" if "qlora" in methods else "skipped: bitsandbytes is not installed" if gpu else "skipped: CPU",
        "pipeline": ["sft", "rm", "ppo", "eval"], "pipelines": pipelines, "ppo": ppo, "anchor": ANCHOR,
        "decode_ms_per_token": decode, "repeat": repeat,
    }
    (work / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    if ppo is None:
        raise SystemExit(f"gpu-check: the pipeline failed ({pipelines}); see {work / 'gpu_check.json'}")
    (work / "gpu_check.md").write_text(table(result))
    print(table(result), end="")
    return result


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
