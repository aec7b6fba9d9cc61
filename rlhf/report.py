"""Statistics and pictures for evaluation reports: bootstrap intervals, win rates, sequence KL, plots.

The statistics are pure functions (numbers in, numbers out); the plots read run directories and write PNGs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample with replacement ``resamples`` times and take the
    (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means."""
    if not values:
        return (float("nan"), float("nan"))
    if len(values) == 1:
        return (values[0], values[0])
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * (resamples - 1))]
    hi = means[int(round((1 + level) / 2 * (resamples - 1)))]
    return (lo, hi)


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """Share of paired items where ours scores higher than theirs; ties count half."""
    if len(ours) != len(theirs):
        raise ValueError(f"win rate needs paired scores, got {len(ours)} and {len(theirs)}")
    if not ours:
        return float("nan")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate of the sampled response: sum_t (log pi(y_t) - log pi_ref(y_t)) over real tokens."""
    from rlhf.ppo.ppo_math import sequence_sum

    return sequence_sum(logp - ref_logp, mask)


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reward_distributions(scores: dict[str, list[float]], path: Path) -> Path:
    """One histogram of reward-model scores per policy, overlaid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lo = min(min(v) for v in scores.values())
    hi = max(max(v) for v in scores.values())
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    for name, values in scores.items():
        ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (mean {sum(values) / len(values):.2f})")
    ax.set_xlabel("reward-model score")
    ax.set_ylabel("responses")
    ax.set_title("Reward distribution per policy (held-out prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# The training curves each stage draws into its run directory (curves.png): (metric, title) panels, in order
STAGE_CURVES = {
    "sft": [("train/loss", "training loss"), ("eval/loss", "held-out loss"), ("train/learning_rate", "learning rate")],
    "rm": [("train/loss", "training loss"), ("train/accuracy", "training pair accuracy"),
           ("eval/accuracy", "held-out pair accuracy"), ("train/margin", "training reward margin")],
    "dpo": [("train/loss", "training loss"), ("train/rewards/accuracies", "training implicit-reward accuracy"),
            ("eval/rewards/accuracies", "held-out implicit-reward accuracy"),
            ("train/rewards/margins", "training implicit-reward margin"), ("train/logps/chosen", "log-prob chosen"),
            ("train/logps/rejected", "log-prob rejected")],
    "ppo": [("objective/score", "reward-model score"), ("objective/score_total", "total score (ppo.reward)"),
            ("objective/kl", "KL to reference (nats)"),
            ("ppo/kl_coef", "KL coefficient"), ("policy/entropy", "policy entropy"),
            ("response/length", "response length (tokens)"), ("eval/gold", "held-out gold (greedy)")],
}


def plot_curves(rows: list[dict], panels: list[tuple[str, str]], path: Path, xlabel: str = "step") -> Path | None:
    """One panel per metric that ``rows`` (metrics.jsonl) hold, against the step; None when none is logged."""
    panels = [(k, t) for k, t in panels if any(k in r for r in rows)]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 12 else None)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_curves(run_dir: Path, stage: str) -> Path | None:
    """``curves.png`` in a run directory, from its metrics.jsonl, with the panels of its stage."""
    if stage not in STAGE_CURVES:
        return None
    return plot_curves(read_metrics(run_dir), STAGE_CURVES[stage], Path(run_dir) / "curves.png",
                       "PPO step" if stage == "ppo" else "optimizer step")


def plot_ppo_curves(run_dir: Path, path: Path) -> Path | None:
    """Score, KL and (when logged) held-out gold of a PPO run over its steps."""
    rows = read_metrics(run_dir)
    score = "objective/score" if any("objective/score" in r for r in rows) else "objective/score_total"
    panels = [p for p in STAGE_CURVES["ppo"] if p[0] in (score, "objective/kl", "eval/gold")]
    return plot_curves(rows, panels, path, "PPO step")


def plot_overoptimisation(points: list[dict], path: Path) -> Path | None:
    """Proxy (reward-model score) and gold score of the policy as PPO proceeds, on two axes: where the proxy keeps
    rising and the gold flattens or falls, the policy is exploiting the reward model."""
    points = [p for p in points if p.get("gold") is not None]
    if len(points) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [p["step"] for p in points]
    ax.plot(steps, [p["score"] for p in points], color="tab:blue", marker="o", label="reward-model score (proxy)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward-model score", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [p["gold"] for p in points], color="tab:red", marker="s", label="gold score")
    ax2.set_ylabel("gold score", color="tab:red")
    ax.set_title("Proxy vs gold reward during PPO (held-out prompts, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
