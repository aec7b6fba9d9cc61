"""The benchmark (``make bench``): our PPO against TRL 0.28's, SFT against the machine's matmul peak, and the
default pipeline's wall time per stage. Writes ``bench.md`` and ``bench.json`` into the output directory.

1. PPO vs TRL 0.28 on the same tiny base, SFT policy, reward model (merged to plain Hugging Face directories for
   TRL), prompts (the same token ids), LoRA r/alpha, batch size, 24-token responses (EOS suppressed on both
   sides: TRL's ``stop_token=None`` and our ``ppo.min_new_tokens``), 4 PPO epochs, one mini-batch. Each run is a
   fresh process; the runs alternate, and the medians over repeats are reported. Our critic-free estimators
   (``ppo.advantage``: grpo, rloo, reinforce_pp; 4 responses per prompt, the same episodes per step) are rows of
   their own. Episodes per second come from
   the median step time after the first (warm-up) step; peak memory is the process's peak resident set.
2. SFT achieved FLOP/s (the trainer's ``total_flos`` over its training time) against the peak of a large square
   matmul in fp32 and bf16 measured in the same run.
3. ``rlhf sft / rm / ppo / eval`` on the default recipe, wall time per stage (into a separate run_dir).

    python tests/bench/bench.py [--out runs/bench] [--repeats 3] [--trl-python .venv-trl/bin/python]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[2]
RLHF = [sys.executable, "-m", "rlhf.cli"]
TRL_SCRIPT = Path(__file__).with_name("trl_ppo.py")


def run(cmd: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """Run ``cmd`` in a fresh process; returns (stdout, wall seconds, that process's peak resident memory in MB:
    the child is reaped here with wait4, so its own ru_maxrss is known). Linux carries a process's peak across
    exec, so the child's number is at least this process's peak when it started the child: a result no larger
    than that is refused rather than reported."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stdout[-2000:]}\n{stderr[-4000:]}")
    floor = own_peak_mb()
    if usage.ru_maxrss / 1024 <= floor:
        raise SystemExit(f"{' '.join(cmd)}: its peak memory is hidden under this process's {floor:.0f} MB "
                         "(inherited across exec); run the benchmark from a smaller process")
    return stdout, wall, usage.ru_maxrss / 1024


def own_peak_mb() -> float:
    """This process's own peak resident memory in MB (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# 1. PPO against TRL 0.28
# ---------------------------------------------------------------------------------------------------------------

def parents(work: Path, recipe: Path) -> dict[str, Path]:
    """Short SFT and RM runs, their merged exports (for TRL), and the prompts as token ids."""
    sft, rm = work / "runs" / "bench" / "sft", work / "runs" / "bench" / "rm"
    common = ["--recipe", str(recipe), "--set", f"run_dir={work / 'runs'}", "--set", "name=bench", "--overwrite"]
    if not (sft / "manifest.json").exists():
        run(RLHF + ["sft", *common, "--set", "sft.max_steps=60"])
    if not (rm / "manifest.json").exists():
        run(RLHF + ["rm", *common, "--set", "rm.max_steps=60", "--set", "rm.stats_samples=256"])
    merged = {"sft": work / "sft-merged", "rm": work / "rm-merged"}
    for name, src in (("sft", sft), ("rm", rm)):
        if not (merged[name] / "config.json").exists():
            run(RLHF + ["export", str(src), "--merge", "--out", str(merged[name]), "--overwrite"])
    ids = work / "prompt_ids.json"
    if not ids.exists():
        from rlhf.models import modeling
        from rlhf.text import encoding, formats
        from rlhf.config import load_recipe

        r = load_recipe(str(recipe))
        tok = modeling.load_tokenizer(r.model, str(sft))
        rows = formats.load(str(ROOT / r.data.prompts), "prompts").rows
        ids.write_text(json.dumps(encoding.encode_prompts(tok, rows, 256)[0]))
    return {"sft": sft, "rm": rm, **{f"{k}_merged": v for k, v in merged.items()}, "ids": ids}


def ours(p: dict, recipe: Path, work: Path, batch: int, steps: int, length: int, env: dict,
         sets: tuple[str, ...] = ()) -> dict:
    out = work / f"ppo-ours-{batch}"
    cmd = RLHF + ["ppo", "--recipe", str(recipe), "--policy", str(p["sft"]), "--reward", str(p["rm"]),
                  "--out", str(out), "--overwrite", "--set", f"ppo.batch_size={batch}",
                  "--set", f"ppo.mini_batch_size={batch}", "--set", f"ppo.micro_batch_size={batch}",
                  "--set", "ppo.ppo_epochs=4", "--set", f"ppo.max_steps={steps}",
                  "--set", f"ppo.max_new_tokens={length}", "--set", f"ppo.min_new_tokens={length}",
                  "--set", "ppo.eval_every=0", "--set", "ppo.save_every=0", "--set", "logging.progress=off",
                  *[x for kv in sets for x in ("--set", kv)]]
    _, wall, rss = run(cmd, env=env)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    return {"step_seconds": [r["time/step_s"] for r in rows], "rss_mb": rss, "wall_s": wall,
            "length": statistics.mean(r["response/length"] for r in rows), "allocator": manifest["allocator"],
            "precision": manifest["mixed_precision"], "bf16_speedup": manifest["bf16_speedup"],
            "repeatable": manifest["repeatable"], "repeat_check_s": manifest["repeat_check_s"],
            "phases": {k: statistics.median(r[f"time/{k}_s"] for r in rows[1:])
                       for k in ("generation", "scoring", "update")}}


def trl(p: dict, trl_python: str, work: Path, batch: int, steps: int, length: int, lr: float, kl: float,
        r: int, alpha: int, bf16: bool, env: dict) -> dict:
    cmd = [trl_python, str(TRL_SCRIPT), "--policy", str(p["sft_merged"]), "--reward", str(p["rm_merged"]),
           "--prompts", str(p["ids"]), "--batch", str(batch), "--steps", str(steps), "--response-length",
           str(length), "--epochs", "4", "--lr", str(lr), "--kl-coef", str(kl), "--r", str(r), "--alpha", str(alpha),
           "--out", str(work / f"ppo-trl-{batch}")] + (["--bf16"] if bf16 else [])
    out, wall, rss = run(cmd, env={"TOKENIZERS_PARALLELISM": "false", **env})
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    return {**json.loads(line), "rss_mb": rss, "wall_s": wall, "length": length,
            "allocator": "tcmalloc" if "tcmalloc" in env.get("LD_PRELOAD", "") else "system",
            "precision": "bf16" if bf16 else "no"}


def import_floor(python: str, modules: str) -> float:
    """Peak RSS (MB) of a process that only imports ``modules``: the part of every run's memory that is libraries."""
    return run([python, "-c", f"import {modules}"])[2]


def runs_to_compare() -> dict[str, dict]:
    """The PPO runs of the comparison: which side, with which environment (and TRL's bf16 switch). Without
    tcmalloc on the system, ours runs on glibc's malloc only and TRL is not rerun under tcmalloc."""
    from rlhf.scale import allocator

    tcmalloc = allocator.find_tcmalloc()
    configs = {"ours": {"side": "ours", "env": {}},
               "trl": {"side": "trl", "env": {}},
               "trl_bf16": {"side": "trl", "env": {}, "bf16": True},
               # what "auto" falls back to where bf16 does not repeat bit for bit (rlhf/ppo/precision.py)
               "ours_fp32": {"side": "ours", "env": {}, "sets": ("ppo.mixed_precision=no",)},
               # GAE with the value head on the policy's hidden state: one forward and backward per mini-batch
               "ours_shared": {"side": "ours", "env": {}, "sets": ("ppo.critic=shared",)}}
    if tcmalloc:
        configs["ours_system_malloc"] = {"side": "ours", "env": {allocator.ENV: "system"}}
        configs["trl_tcmalloc"] = {"side": "trl", "env": {"LD_PRELOAD": tcmalloc}}
    for estimator in ESTIMATORS:  # the same episodes per step: batch / 4 prompts, 4 responses each
        configs[f"ours_{estimator}"] = {"side": "ours", "env": {},
                                        "sets": (f"ppo.advantage={estimator}", "ppo.samples_per_prompt=4")}
    return configs


ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
"""the critic-free estimators, each its own row: how fast one can align here, not a PPO-vs-PPO comparison"""


# (ours, reference) pairs whose ratios are reported: as each toolkit runs by default, and with the same allocator
PAIRS = (("ours", "trl"), ("ours", "trl_bf16"), ("ours_system_malloc", "trl"), ("ours", "trl_tcmalloc"),
         ("ours_fp32", "ours"), ("ours_fp32", "trl"), ("ours_shared", "trl"), ("ours_shared", "trl_bf16"),
         ("ours_shared", "ours"),
         *((f"ours_{e}", "ours") for e in ESTIMATORS), *((f"ours_{e}", "trl") for e in ESTIMATORS))


def step_work(base: str, r: int, prompt: float, response: float, epochs: int, critic: str | None) -> dict:
    """The matrix-product FLOPs one episode costs in each phase of a PPO step, from the model's shapes: a
    ``prompt + response`` sequence through every linear weight of the decoder layers (2 FLOPs per weight and token)
    with its rank-``r`` LoRA adapter, causal attention (4 x layers x width x the positions seen), and the output
    head where logits are needed (the response positions). A backward pass with a frozen base costs the forward's
    products again (input gradients) plus the adapter's weight gradients. Phases: generation (the sampling pass),
    scoring (the reference's log-probs, the reward model's score, the value adapter's values: ``critic`` "adapter"),
    the update (``epochs`` x the policy's forward and backward, and the value adapter's with ``critic``
    "adapter"; the shared critic's and a critic-free run's are the policy's alone)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    body = sum(m.weight.numel() for m in linears)
    lora = sum(r * (m.in_features + m.out_features) for m in linears)
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    seq = prompt + response
    attention = 4 * config.num_hidden_layers * width * seq * (seq + 1) / 2
    logits = 2 * head.weight.numel() * response
    forward = 2 * (body + lora) * seq + attention  # one pass of one adapter over the sequence, no logits
    backward = forward + 2 * lora * seq + attention  # input gradients (attention's twice) + adapter weights
    work = {"generation": forward + logits,
            "scoring": (forward + logits) + forward + (forward if critic == "adapter" else 0),
            "update": epochs * ((forward + logits) + (backward + logits)
                                + (forward + backward if critic == "adapter" else 0))}
    return {**work, "total": sum(work.values())}


def ppo_vs_trl(p, recipe, work, trl_python, repeats, batches, steps, length, only_configs=None) -> dict:
    from rlhf.config import load_recipe

    r = load_recipe(str(recipe))
    configs = {k: v for k, v in runs_to_compare().items() if not only_configs or k in only_configs}
    results = {"import_floor_mb": {"ours": import_floor(sys.executable, "torch, transformers, peft, trl, stages.ppo"),
                                   "trl": import_floor(trl_python, "torch, transformers, peft, trl.experimental.ppo")},
               "configs": {name: {k: v for k, v in c.items()} for name, c in configs.items()}}
    for batch in batches:
        runs = {name: [] for name in configs}
        for i in range(repeats):  # alternate, so that drifts of the machine hit all alike
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]
            for name in order:
                c = configs[name]
                if c["side"] == "ours":
                    res = ours(p, recipe, work, batch, steps, length, c["env"], c.get("sets", ()))
                else:
                    res = trl(p, trl_python, work, batch, steps, length, r.ppo.lr, r.ppo.kl_coef, r.adapter.r,
                              r.adapter.alpha, bf16=c.get("bf16", False), env=c["env"])
                res["episodes_per_s"] = batch / statistics.median(res["step_seconds"][1:])
                runs[name].append(res)
                print(f"ppo batch {batch} {name}: {res['episodes_per_s']:.1f} episodes/s, "
                      f"{res['rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        summary = {name: {"episodes_per_s": statistics.median(x["episodes_per_s"] for x in rs),
                          "rss_mb": statistics.median(x["rss_mb"] for x in rs),
                          "length": statistics.median(x["length"] for x in rs),
                          "allocator": rs[0]["allocator"], "precision": rs[0]["precision"]}
                   for name, rs in runs.items()}
        prompt = statistics.mean(len(x) for x in json.loads(Path(p["ids"]).read_text()))
        peaks = {"bf16": matmul_peak("bfloat16"), "no": matmul_peak("float32")}
        for name, c in configs.items():  # each of ours against the matmul work of its step at this CPU's peak
            if c["side"] != "ours":
                continue
            sets = dict(kv.split("=", 1) for kv in c.get("sets", ()))
            critic = None if sets.get("ppo.advantage", "gae") != "gae" else sets.get("ppo.critic", "adapter")
            flops = step_work(str(r.model.base if Path(r.model.base).is_absolute() else ROOT / r.model.base),
                              r.adapter.r, prompt, summary[name]["length"], 4, critic)
            summary[name]["phases"] = {k: statistics.median(x["phases"][k] for x in runs[name])
                                       for k in ("generation", "scoring", "update")}
            peak = peaks[summary[name]["precision"]]
            summary[name]["matmul"] = {"flops_per_episode": flops, "peak": peak,
                                       "bound_s": batch * flops["total"] / peak,
                                       "step_s": batch / summary[name]["episodes_per_s"]}
        summary["ours"]["bf16_speedup"] = statistics.median(x["bf16_speedup"] or 0.0 for x in runs["ours"])
        summary["ours"]["repeatable"] = all(x["repeatable"] for x in runs["ours"])
        summary["ours"]["repeat_check_s"] = statistics.median(x["repeat_check_s"] for x in runs["ours"])
        floor = results["import_floor_mb"]
        summary["ratios"] = {}
        for a, b in PAIRS:
            if a in summary and b in summary:
                summary["ratios"][f"{a}/{b}"] = {
                    "speed": summary[a]["episodes_per_s"] / summary[b]["episodes_per_s"],
                    "memory": summary[a]["rss_mb"] / summary[b]["rss_mb"],
                    "memory_above_imports": (summary[a]["rss_mb"] - floor["ours"]) / (summary[b]["rss_mb"]
                                                                                      - floor["trl"])}
        summary["runs"] = runs
        results[str(batch)] = summary
    return results


# ---------------------------------------------------------------------------------------------------------------
# 1b. The generation engine against the arithmetic
# ---------------------------------------------------------------------------------------------------------------

def generation(p: dict, work: Path, batches: list[int], tokens: int = 64, repeats: int = 3) -> dict:
    """Generated tokens/s and milliseconds per decode step of the engine (``rollout.decode``) with PPO's policy
    (the tiny base with its four adapters, the precision PPO picks), every response forced to ``tokens`` tokens,
    at each batch: over the preallocated cache (the engine), over transformers' growing cache (the same loop as the
    sampler before it), and Hugging Face ``generate`` (greedy; eval's path before). The decode step's arithmetic
    (2 x batch x every weight matrix it multiplies by, plus attention over the average context) is set against this
    CPU's measured fp32 matmul peak."""
    import torch

    from rlhf.engine import rollout
    from rlhf.models import modeling
    from rlhf.ppo import ppo_models, precision
    from rlhf.text import encoding, formats
    from rlhf.config import ModelConfig

    manifest = json.loads((p["sft"] / "manifest.json").read_text())
    cfg = ModelConfig(**{**manifest["recipe"]["model"], "base": manifest["base"]})
    models = ppo_models.load(cfg, "lora", p["sft"], p["rm"], mixed_precision="auto")
    models.train(False)
    tok = modeling.load_tokenizer(cfg, str(p["sft"]))
    rows = formats.load(str(ROOT / "data" / "tiny" / "heldout_prompts.jsonl"), "prompts").rows
    ids_all, mask_all = encoding.left_pad(encoding.encode_prompts(tok, rows[:max(batches)], 10_000)[0],
                                         tok.pad_token_id)
    core = models.model
    embed = core.get_input_embeddings().weight
    other = (".reference.", ".reward.", ".value.")
    matrices = sum(x.numel() for n, x in core.named_parameters()
                   if x.dim() == 2 and x is not embed and not any(o in n for o in other))
    c = models.config
    if core.get_output_embeddings().weight is embed:  # tied: the head multiplies by the embedding matrix too
        matrices += embed.numel()
    peak = matmul_peak("float32")

    def seconds(fn, n: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(n)
            best = min(best, time.perf_counter() - t0)
        return best

    out = {"tokens": tokens, "precision": str(models.autocast or "fp32"), "peak_fp32": peak, "batches": {}}
    for batch in batches:
        ids, mask = ids_all[-batch:], mask_all[-batch:]
        keys = rollout.episode_keys(0, 1, torch.arange(batch))
        kw = dict(keys=keys, temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

        def engine(n, static=None):
            return models.sample(ids, mask, max_new_tokens=n, min_new_tokens=n, static=static, **kw)

        def hf(n):
            models.use("policy")
            with precision.autocast(models.device, models.autocast), torch.no_grad():
                return core.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

        context = int(mask.sum(1).float().mean()) + tokens // 2
        flops = 2 * batch * matrices + 4 * batch * c.num_hidden_layers * c.hidden_size * context
        ways = {"engine (preallocated cache)": engine, "growing cache (the sampler before)":
                lambda n: engine(n, static=False), "Hugging Face generate (eval before)": hf}
        res = {}
        for name, fn in ways.items():
            fn(4)  # warm-up
            whole, first = seconds(fn, tokens), seconds(fn, 1)
            step = (whole - first) / (tokens - 1)
            res[name] = {"tokens_per_s": batch * tokens / whole, "step_ms": step * 1000, "prefill_ms": first * 1000}
            print(f"generation batch {batch} {name}: {res[name]['tokens_per_s']:.0f} tokens/s, "
                  f"{res[name]['step_ms']:.2f} ms a step", file=sys.stderr, flush=True)
        out["batches"][str(batch)] = {"ways": res, "step_flops": flops, "arithmetic_ms": flops / peak * 1000}
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1c. Where the update's time goes
# ---------------------------------------------------------------------------------------------------------------

def update_profile(p: dict, batch: int = 32, length: int = 70, keep: int = 65, repeats: int = 4,
                   compiled: bool = True) -> dict:
    """One mini-batch of the default recipe's PPO update (``batch`` sequences of ``length`` tokens, the last
    ``keep`` positions' logits), each pass timed alone (best of ``repeats``), in the precision PPO picks here: the
    policy's forward, its forward and backward with the shared critic's head, the adapter critic's value adapter
    forward and backward on top, the forward with every adapter switched off (what LoRA costs), and, with
    ``compiled``, the shared critic's forward and backward with each decoder layer compiled
    (``torch.compile``, regional), its compile time included separately."""
    import torch

    from rlhf.models import methods
    from rlhf.ppo import ppo_models
    from rlhf.config import ModelConfig

    manifest = json.loads((p["sft"] / "manifest.json").read_text())
    cfg = ModelConfig(**{**manifest["recipe"]["model"], "base": manifest["base"], "attn_implementation": "eager"})
    out = {"batch": batch, "length": length}
    ids = torch.randint(3, 400, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1000

    for critic in ("shared", "adapter"):
        models = ppo_models.load(cfg, "lora", p["sft"], p["rm"], mixed_precision="auto", critic=critic)
        models.train(False)
        out["precision"] = "bf16" if models.autocast else "fp32"

        def policy_step():
            logits, values = models.critic.with_policy(ids, mask, keep)
            (logits.float().logsumexp(-1).mean() + values.mean()).backward()

        def adapter_step():
            logits = models.policy_logits(ids, mask, keep)
            logits.float().logsumexp(-1).mean().backward()
            models.critic.values(ids, mask).mean().backward()

        def forward():
            with torch.no_grad():
                models.policy_logits(ids, mask, keep)

        def bare():
            with torch.no_grad(), models.bare():
                models.policy_logits(ids, mask, keep)

        if critic == "shared":
            out.update({"forward_ms": best(forward), "forward_no_adapters_ms": best(bare),
                        "shared_step_ms": best(policy_step)})
            if compiled:
                t0 = time.perf_counter()
                for layer in methods.unwrap(models.model).model.layers:
                    layer.compile(dynamic=False)
                policy_step()
                out["compile_s"] = time.perf_counter() - t0
                out["shared_step_compiled_ms"] = best(policy_step)
        else:
            out["adapter_step_ms"] = best(adapter_step)
        print(f"update profile ({critic}): {out}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. SFT against the hardware
# ---------------------------------------------------------------------------------------------------------------

def matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on this machine's threads (best of ``repeats``)."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sft_flops(recipe: Path, work: Path, steps: int) -> dict:
    out = work / "sft-flops"
    run(RLHF + ["sft", "--recipe", str(recipe), "--out", str(out), "--overwrite", "--set", f"sft.max_steps={steps}",
                "--set", "sft.eval_fraction=0", "--set", "logging.progress=off"])
    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    manifest = json.loads((out / "manifest.json").read_text())
    # transformers counts 6 x (non-embedding parameters) x (tokens, padding included) per run. With a frozen base
    # the backward pass computes no weight gradients for it: the matmul work is 4 x its linear weights per token
    # (forward + input gradients; the tied output projection included) plus 6 x the adapter's parameters.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(manifest["base"])
    tokens = row["train/total_flos"] / (6 * base.num_parameters(exclude_embeddings=True))
    linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    trainable = manifest["adapter"]["parameters"]["trainable"]
    flops = tokens * (4 * linear + 6 * trainable)
    runtime = row["summary/runtime"]
    return {"hf_total_flos": row["train/total_flos"], "hf_flops_per_s": row["train/total_flos"] / runtime,
            "tokens": tokens, "matmul_flops": flops, "train_runtime_s": runtime, "flops_per_s": flops / runtime,
            "steps": steps, "dtype": manifest["recipe"]["model"]["dtype"]}


# ---------------------------------------------------------------------------------------------------------------
# 3. The pipeline, per stage
# ---------------------------------------------------------------------------------------------------------------

def pipeline(recipe: Path, work: Path) -> dict:
    times = {}
    for stage in ("sft", "rm", "ppo", "eval"):
        _, wall, rss = run(RLHF + [stage, "--recipe", str(recipe), "--set", f"run_dir={work / 'pipeline'}",
                                            "--overwrite", "--set", "logging.progress=off"])
        times[stage] = {"wall_s": wall, "rss_mb": rss}
        print(f"pipeline {stage}: {wall:.1f} s", file=sys.stderr, flush=True)
    times["total_s"] = sum(t["wall_s"] for t in times.values())
    summary = json.loads((work / "pipeline" / "tiny" / "eval" / "summary.json").read_text())
    times["gold"] = {k: v.get("gold") for k, v in summary.items()}
    return times


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    from rlhf.scale import allocator

    cpu, flags = "", []
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text().splitlines()
        names = [x.split(":", 1)[1].strip() for x in info if x.startswith("model name")]
        cpu = names[0] if names else ""
        present = next((x.split(":", 1)[1].split() for x in info if x.startswith("flags")), [])
        flags = [f for f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in present]
    return {"cpu": cpu, "cpu_flags": flags, "tcmalloc": allocator.find_tcmalloc(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Benchmark ({res['date']})", "",
             f"Machine: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores ({m['torch_threads']} torch threads)"
             + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU") + f"; torch {m['torch']}; CPU flags "
             + (", ".join(m.get("cpu_flags") or []) or "-") + f"; tcmalloc: {m.get('tcmalloc') or 'not installed'}.",
             ""]
    if "ppo" in res:
        floor = res["ppo"]["import_floor_mb"]
        lines += ["## PPO against TRL 0.28", "",
                  f"Tiny base, LoRA, {res['ppo_setup']['length']}-token responses, 4 PPO epochs, one mini-batch, "
                  f"median of {res['ppo_setup']['repeats']} alternating runs of {res['ppo_setup']['steps']} steps "
                  "(the first step of each run is warm-up and not counted). Ours runs its defaults (precision "
                  "chosen by measuring bf16 against fp32 products, tcmalloc where the system has it, eager "
                  "attention on CPU); TRL as configured for a CPU (fp32), with tcmalloc preloaded too, and with "
                  "its bf16 mixed precision. Peak RSS is the whole process's; importing the libraries alone takes "
                  f"{floor['ours']:.0f} MB (ours) and {floor['trl']:.0f} MB (TRL's environment).", ""]
        names = {"ours": "ours (PPO, GAE)", "ours_system_malloc": "ours, glibc malloc",
                 "ours_fp32": "ours, fp32 (auto's fallback)", "ours_shared": "ours (PPO, GAE, shared critic)",
                 "trl": "TRL 0.28 fp32",
                 "trl_tcmalloc": "TRL 0.28 fp32, tcmalloc", "trl_bf16": "TRL 0.28 bf16",
                 **{f"ours_{e}": f"ours, {e} (no critic, 4 per prompt)" for e in ESTIMATORS}}
        for batch, s in res["ppo"].items():
            if not batch.isdigit():
                continue
            o = s["ours"]
            lines += [f"Batch {batch} (ours: {o['precision'] if o['precision'] != 'no' else 'fp32'}, bf16 products "
                      f"measured {o['bf16_speedup']:.2f}x fp32, passes "
                      f"{'repeat' if o['repeatable'] else 'do NOT repeat'} bit for bit, checked in "
                      f"{o['repeat_check_s']:.2f} s; {o['allocator']}):", "",
                      "| run | allocator | episodes/s | peak RSS |", "|---|---|---|---|"]
            for name in names:
                if name in s:
                    lines.append(f"| {names[name]} | {s[name]['allocator']} | {s[name]['episodes_per_s']:.1f} | "
                                 f"{s[name]['rss_mb']:.0f} MB |")
            lines += ["", "| ours vs | speed | peak memory | memory above the imports |", "|---|---|---|---|"]
            for pair, ratio in s["ratios"].items():
                a, b = pair.split("/")
                lines.append(f"| {names[a]} vs {names[b]} | {ratio['speed']:.2f}x | {ratio['memory']:.2f}x | "
                             f"{ratio['memory_above_imports']:.2f}x |")
            flags = ", ".join(m.get("cpu_flags") or []) or "no AVX512/AMX"
            lines += ["", f"Ours against the arithmetic ({m['cpu'] or 'unknown CPU'}; {flags}): the matrix-product "
                          "work of a step (`step_work`: every weight, adapter, attention and the head where logits "
                          "are read, forward and backward) at this CPU's measured peak in the run's precision "
                          "(a 2048^2 product, so the bound is generous to the small shapes of the tiny model).", "",
                      "| run | step | generation / scoring / update | matmul work | bound at peak | step / bound |",
                      "|---|---|---|---|---|---|"]
            for name in names:
                if name in s and "matmul" in s[name]:
                    w, ph = s[name]["matmul"], s[name]["phases"]
                    lines.append(f"| {names[name]} | {w['step_s']:.2f} s | {ph['generation']:.2f} / "
                                 f"{ph['scoring']:.2f} / {ph['update']:.2f} s | "
                                 f"{int(batch) * w['flops_per_episode']['total'] / 1e9:.0f} GFLOP | "
                                 f"{w['bound_s']:.2f} s ({w['peak'] / 1e9:.0f} GFLOP/s, "
                                 f"{'bf16' if s[name]['precision'] == 'bf16' else 'fp32'}) | "
                                 f"{w['step_s'] / w['bound_s']:.1f}x |")
            lines.append("")
    if "generation" in res:
        g = res["generation"]
        lines += ["## Generation", "",
                  f"The engine (`rollout.decode`) with PPO's policy (tiny base, four LoRA adapters, {g['precision']}), "
                  f"every response {g['tokens']} tokens, best of 3; a decode step's arithmetic at this CPU's "
                  f"measured fp32 matmul peak ({g['peak_fp32'] / 1e9:.0f} GFLOP/s) for scale.", "",
                  "| batch | way | generated tokens/s | decode step | its arithmetic at peak | step / arithmetic |",
                  "|---|---|---|---|---|---|"]
        for batch, b in g["batches"].items():
            for name, w in b["ways"].items():
                lines.append(f"| {batch} | {name} | {w['tokens_per_s']:,.0f} | {w['step_ms']:.2f} ms | "
                             f"{b['arithmetic_ms']:.2f} ms | {w['step_ms'] / b['arithmetic_ms']:.1f}x |")
        lines.append("")
    if "update" in res:
        u = res["update"]
        lines += ["## Where the update's time goes", "",
                  f"One mini-batch of the default recipe's update ({u['batch']} sequences of {u['length']} tokens, "
                  f"{u['precision']} as `auto` picks here), each pass timed alone, best of 4:", "",
                  "| pass | ms |", "|---|---|",
                  f"| policy forward | {u['forward_ms']:.0f} |",
                  f"| the same forward with every adapter off (the base alone) | {u['forward_no_adapters_ms']:.0f} |",
                  f"| policy forward + backward, shared critic (one pass) | {u['shared_step_ms']:.0f} |",
                  f"| policy forward + backward, then the value adapter's (adapter critic) | "
                  f"{u['adapter_step_ms']:.0f} |"]
        if "shared_step_compiled_ms" in u:
            lines.append(f"| shared critic, each decoder layer compiled (`torch.compile`, after {u['compile_s']:.0f} "
                         f"s of compiling for this one shape) | {u['shared_step_compiled_ms']:.0f} |")
        lines.append("")
    if "sft" in res:
        s = res["sft"]
        lines += ["## SFT against the hardware", "",
                  "| measure | FLOP/s |", "|---|---|",
                  f"| matmul peak fp32 (2048^2) | {res['peak']['float32'] / 1e9:.0f} G |",
                  f"| matmul peak bf16 (2048^2) | {res['peak']['bfloat16'] / 1e9:.0f} G |",
                  f"| SFT stage, {s['dtype']}, {s['steps']} steps: matmul work of a frozen base + LoRA per second "
                  f"(4 x base linear weights + 6 x adapter parameters per token) | {s['flops_per_s'] / 1e9:.1f} G = "
                  f"{100 * s['fraction_of_peak']:.1f}% of the {s['dtype']} peak |",
                  f"| (the trainer's own count, 6 x non-embedding parameters per token) | "
                  f"{s['hf_flops_per_s'] / 1e9:.1f} G |", ""]
    if "pipeline" in res:
        p = res["pipeline"]
        lines += ["## The default pipeline", "", "| stage | wall time | peak RSS |", "|---|---|---|"]
        for stage in ("sft", "rm", "ppo", "eval"):
            lines.append(f"| {stage} | {p[stage]['wall_s']:.0f} s | {p[stage]['rss_mb']:.0f} MB |")
        lines += [f"| total | {p['total_s']:.0f} s ({p['total_s'] / 60:.1f} min) | |", "",
                  "Held-out gold: " + ", ".join(f"{k} {v:.3f}" for k, v in p["gold"].items() if v is not None), ""]
    return "\n".join(lines)


@click.command()
@click.option("--out", default=str(ROOT / "runs" / "bench"), type=click.Path(file_okay=False))
@click.option("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"), type=click.Path(dir_okay=False))
@click.option("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"),
              help="python of an environment with trl==0.28.0 and transformers<5")
@click.option("--repeats", default=3, show_default=True)
@click.option("--steps", default=4, show_default=True, help="PPO steps per run (the first is warm-up)")
@click.option("--length", default=24, show_default=True, help="response tokens")
@click.option("--batches", default="8,64", show_default=True)
@click.option("--only", type=click.Choice(["ppo", "generation", "update", "sft", "pipeline"]), multiple=True,
              help="run only these parts")
@click.option("--configs", default="", help="PPO runs to compare, comma-separated (default: all of them; e.g. "
              "ours,ours_shared,trl)")
def main(out, recipe, trl_python, repeats, steps, length, batches, only, configs):
    work = Path(out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    recipe = Path(recipe).resolve()
    parts = set(only) or {"ppo", "generation", "update", "sft", "pipeline"}
    previous = work / "bench.json"  # parts not run this time are kept from the last run
    res = json.loads(previous.read_text()) if previous.exists() and only else {}
    res.update({"date": time.strftime("%Y-%m-%d"), "machine": machine()})
    if "ppo" in parts:
        if not Path(trl_python).exists():
            raise SystemExit(f"{trl_python}: no TRL 0.28 environment (make bench creates .venv-trl)")
        p = parents(work, recipe)
        res["ppo_setup"] = {"repeats": repeats, "steps": steps, "length": length}
        res["ppo"] = ppo_vs_trl(p, recipe, work, trl_python, repeats, [int(b) for b in batches.split(",")], steps,
                                length, [c for c in configs.split(",") if c])
    if "generation" in parts:
        res["generation"] = generation(parents(work, recipe), work, [int(b) for b in batches.split(",")])
    if "update" in parts:
        res["update"] = update_profile(parents(work, recipe))
    if "sft" in parts:
        res["peak"] = {dt: matmul_peak(dt) for dt in ("float32", "bfloat16")}
        res["sft"] = sft_flops(recipe, work, steps=60)
        res["sft"]["fraction_of_peak"] = res["sft"]["flops_per_s"] / res["peak"][res["sft"]["dtype"]]
    if "pipeline" in parts:
        res["pipeline"] = pipeline(recipe, work)
    (work / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    (work / "bench.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
