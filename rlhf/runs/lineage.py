"""What a run directory came from and what it holds: its model card, its lineage (base -> sft -> rm -> ppo), and
the list of runs under a folder with their status.

Everything here reads manifests; nothing loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.runs import provenance
from rlhf.errors import UserError

# The one number that sums up a stage (shown by ``rlhf runs`` and ``rlhf info``)
HEADLINE = {"sft": ("eval_loss", "held-out loss"), "rm": ("eval_accuracy", "held-out pair accuracy"),
            "ppo": ("objective/score", "reward-model score"),
            "dpo": ("eval_rewards/accuracies", "held-out implicit-reward accuracy")}


def _manifest(run_dir: Path) -> dict | None:
    """A run's manifest, or None where there is none or it is not a JSON object (damaged, binary, a list)."""
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bad UTF-8
        return None
    return manifest if isinstance(manifest, dict) else None


def _number(value) -> float | None:
    """A manifest's number, or None for anything else (a hand-edited or damaged manifest shows a gap, never a
    traceback)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return float(value)
    return None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def headline(manifest: dict) -> str:
    stage = manifest.get("stage")
    metrics = _dict(manifest.get("metrics"))
    if stage == "eval":
        golds = [f"{n} {_number(row.get('gold')):.3f}" for n, row in metrics.items()
                 if isinstance(row, dict) and _number(row.get("gold")) is not None]
        return "gold: " + ", ".join(golds) if golds else ""
    if stage in HEADLINE and _number(metrics.get(HEADLINE[stage][0])) is not None:
        key, label = HEADLINE[stage]
        text = f"{label} {_number(metrics[key]):.4g}"
        if stage == "ppo" and _number(metrics.get("eval/gold")) is not None:
            text += f", held-out gold {_number(metrics['eval/gold']):.3f}"
        return text
    return ""


def precision_line(manifest: dict) -> str:
    """A PPO run's precision and whether it repeats bit for bit (its manifest's ``mixed_precision``,
    ``bf16_speedup`` and ``repeatable``: rlhf/ppo/precision.py)."""
    text = "bf16 autocast" if manifest.get("mixed_precision") == "bf16" else "fp32"
    if _number(manifest.get("bf16_speedup")):
        text += f" (bf16 measured {_number(manifest['bf16_speedup']):.2f}x fp32)"
    repeatable = manifest.get("repeatable")
    return text + {True: ", repeats bit for bit", False: ", does NOT repeat bit for bit (resume is not exact)"}.get(
        repeatable if isinstance(repeatable, bool) else None, ", repeatability not checked")


def _data_lines(data: dict) -> list[str]:
    lines = []
    for role, summary in (data or {}).items():
        if not isinstance(summary, dict) or "files" not in summary:
            continue
        for f in summary["files"]:
            digest = f"sha256 `{f['sha256']}`" if "sha256" in f else f"hub split `{f.get('split')}`"
            lines.append(f"- {role}: `{f['path']}` ({digest}; {summary.get('rows_kept', '?')} rows kept, "
                         f"{summary.get('rows_dropped', 0)} dropped)")
    return lines


def model_card(manifest: dict) -> str:
    """A README.md for a run directory: what it is, from what, on which data, how well, and how to redo it."""
    stage = manifest["stage"]
    what = {"sft": "a supervised fine-tuned policy", "rm": "a reward model (one score per sequence)",
            "ppo": "a policy optimised with PPO against a reward model",
            "dpo": "a policy optimised directly on preference pairs (DPO family)", "eval": "an evaluation report"}[stage]
    adapter = manifest.get("adapter") or {}
    params = adapter.get("parameters") or {}
    lines = [f"# {manifest.get('recipe', {}).get('name', 'run')}: {stage}", "", f"This directory holds {what}.", "",
             f"- base model: `{manifest.get('base')}`"]
    if adapter:
        lines.append(f"- method: `{adapter.get('method')}`" + (
            f", {params['trainable']:,} trainable parameters"
            + (f" ({params['percent']}% of {params['total']:,})" if "percent" in params else "")
            if "trainable" in params else ""))
    for role, parent in (manifest.get("parents") or {}).items():
        if parent is not None:
            lines.append(f"- {role}: `{parent}`")
    policies = (manifest.get("data") or {}).get("policies")
    if policies:  # a reward model's rankings of several policies' candidates
        lines.append("- trained on responses of: " + ", ".join(f"`{p}` ({n})" for p, n in policies.items()))
    if manifest.get("reward"):  # PPO: what the policy was optimised against
        lines.append("- reward: " + " + ".join(
            f"{v['weight'] if isinstance(v, dict) else v:g} x {k}" for k, v in manifest["reward"].items()))
    advantage = manifest.get("advantage") or {}
    if advantage.get("estimator"):  # PPO: how rewards became advantages, and the critic it trained
        critic = {"adapter": "a value adapter and head", "shared": "a value head on the policy (shared critic)",
                  None: "no critic"}.get(advantage.get("critic"), advantage.get("critic"))
        lines.append(f"- advantage: `{advantage['estimator']}`, {critic}")
    published = (manifest.get("reward") or {}).get("reward_model")
    published = published if isinstance(published, dict) else manifest.get("reward_model")
    if isinstance(published, dict) and published.get("id"):  # a reward model that is not a run (rlhf.external_rm)
        lines.append(f"- reward model (published, not a run): `{published['id']}`"
                     + (f", revision `{published['revision']}`" if published.get("revision") else "")
                     + (f", directory sha256 `{published['directory_sha256'][:16]}...`"
                        if published.get("directory_sha256") else ""))
    if "repeatable" in manifest:
        lines.append(f"- precision: {precision_line(manifest)}")
    lines += [f"- finished: {manifest.get('finished')} after {manifest.get('seconds')} s"
              + (" (resumed)" if manifest.get("resumed") else ""), ""]
    data = _data_lines(manifest.get("data"))
    if data:
        lines += ["## Data", "", *data, ""]
    metrics = manifest.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.4g}" for k, v in value.items() if isinstance(v, (int, float)))
            elif isinstance(value, float):
                value = f"{value:.4g}"
            lines.append(f"| {key} | {value} |")
        lines.append("")
    if stage in ("sft", "rm", "ppo", "dpo"):
        lines += ["Training curves: `curves.png`; every logged step: `metrics.jsonl`; everything above and the "
                  "resolved recipe: `manifest.json`.", ""]
    lines += ["## Reproduce", "", "```", manifest.get("command", ""), "```", "",
              "with the recipe recorded in `manifest.json` and these package versions: "
              + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()), ""]
    return "\n".join(lines)


def status(run_dir: Path) -> str:
    """complete | damaged | resumable | failed | interrupted for a run directory or its leftovers."""
    run_dir = Path(run_dir)
    manifest = _manifest(run_dir)
    if manifest is not None and manifest.get("status") == "complete":
        return "complete"
    if manifest is None and (run_dir / "manifest.json").is_file():
        return "damaged"  # a manifest that is not a JSON object: not a run any stage can read
    work = run_dir.parent / f".{run_dir.name}.work"
    staging = run_dir.parent / f".{run_dir.name}.partial"
    if work.is_dir() and any(work.iterdir()):
        return "resumable"
    if staging.is_dir():
        return "interrupted"  # stopped before its first resume checkpoint: only --overwrite starts it again
    return "failed"


def list_runs(root: Path) -> list[dict]:
    """Every run directory under ``root`` (``<root>/<name>/<stage>``), finished or not."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    found: dict[Path, dict] = {}
    for manifest_path in sorted(root.rglob("manifest.json")):
        run_dir = manifest_path.parent
        if any(part.startswith(".") for part in run_dir.relative_to(root).parts):
            continue  # staging directories are reported under their final name
        manifest = _manifest(run_dir) or {}
        found[run_dir] = {"path": str(run_dir), "stage": _text(manifest.get("stage")) or "?",
                          "status": status(run_dir), "finished": _text(manifest.get("finished")),
                          "headline": headline(manifest)}
    for leftover in sorted(root.rglob(".*.partial")):
        run_dir = leftover.parent / leftover.name[1:-len(".partial")]
        if run_dir in found:
            found[run_dir]["status"] += ", and an interrupted rerun beside it"
        else:
            found[run_dir] = {"path": str(run_dir), "stage": run_dir.name, "status": status(run_dir),
                              "finished": "", "headline": ""}
    return list(found.values())


def sampled_from(manifest: dict) -> list[str]:
    """The policies whose candidates a reward model's rankings hold (its ``data.policies``), ``base:`` ones aside."""
    policies = _dict(_dict(manifest.get("data")).get("policies"))
    return [p for p in policies if isinstance(p, str) and p and not p.startswith("base:")]


def lineage(run_dir: Path) -> list[tuple[str, Path, dict]]:
    """The chain of runs that produced ``run_dir``: ``(role, path, manifest)``, oldest first, the run last."""
    run_dir = Path(run_dir)
    manifest = _manifest(run_dir)
    if manifest is None:
        raise UserError(f"{run_dir}: not a run directory (no readable manifest.json)")
    chain: list[tuple[str, Path, dict]] = []
    seen: set[Path] = set()

    def visit(role: str, path: Path, m: dict) -> None:
        if path.resolve() in seen:
            return
        seen.add(path.resolve())
        parents = m.get("parents") if isinstance(m.get("parents"), dict) else {}
        # where each parent was recorded (readable from any directory), else as typed; a reward model trained on
        # candidates of several policies (rlhf sample RUN1 RUN2): those runs come before it, so a later round's
        # lineage shows the round before it
        sampled = [(role, p) for role in parents for p in provenance.where(m, role)]
        sampled += [("candidates of", p) for p in sampled_from(m)]
        for parent_role, p in sampled:
            pm = _manifest(Path(p)) if p else None
            if pm is not None:
                visit(parent_role, Path(p), pm)
        chain.append((role, path, m))

    visit(manifest.get("stage", "run"), run_dir, manifest)
    return chain


def describe(run_dir: Path) -> str:
    """``rlhf info``: the lineage from the base to this run, each step's key facts."""
    chain = lineage(run_dir)
    base = chain[0][2].get("base")
    lines = [f"base   {base}"]
    for role, path, m in chain:
        adapter = _dict(m.get("adapter"))
        trainable = _number(_dict(adapter.get("parameters")).get("trainable"))
        facts = [f"{m.get('stage')}", f"status {status(path)}"]
        if adapter:
            facts.append(f"method {adapter.get('method')}"
                         + (f" ({int(trainable):,} trainable)" if trainable is not None else ""))
        if m.get("base") != base:
            facts.append(f"base {m.get('base')}")
        if headline(m):
            facts.append(headline(m))
        if "repeatable" in m:
            facts.append(precision_line(m))
        if m.get("finished"):
            seconds = _number(m.get("seconds"))
            facts.append(f"finished {m['finished']}" + (f" ({seconds:g} s)" if seconds is not None else ""))
        lines.append(f"  -> {path}  [{role}]\n       " + "; ".join(facts))
    last = chain[-1][2]
    lines.append(f"command: {last.get('command')}")
    return "\n".join(lines)
