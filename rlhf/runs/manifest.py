"""What a finished run records, as one type: every stage hands ``Run.finish`` a ``Manifest``; ``Run.finish`` adds
what the run itself knows (times, processes, memory, versions, the command, the files it holds, the resolved base)
and writes ``manifest.json``. A later stage reads it back as ``rlhf.models.modeling.ParentRun``.

The JSON is the same for every stage in its common fields (``base``, ``parents``, ``data``, ``metrics``, ``seed``,
``recipe``); the stage's own sections (PPO's ``reward``, ``advantage``, ``objective``...; DPO's ``dpo``; eval's
``scorers``) sit beside them under their own names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# the keys a stage's own sections may not take: the common fields and what Run.finish adds
RESERVED = ("stage", "status", "base", "untrained_rows_reinitialised", "parents", "adapter", "data", "metrics",
            "reward_stats", "seed", "recipe", "started", "finished", "seconds", "resumed", "world_size",
            "distributed", "shards", "memory_by_process", "versions", "allocator", "command", "files", "resolved")

# the stages that score with a reward model: their manifests always say its statistics (null when there is none)
SCORING_STAGES = ("rm", "ppo")


@dataclass(frozen=True)
class Manifest:
    """A stage's record of its run (``Run.finish`` writes it as ``manifest.json``)."""

    base: str
    """the base model the run trained on, as the recipe named it (``resolved`` adds where it was found)"""
    parents: dict
    """the runs it started from, by role (``sft``, ``rm``, ``policies``): paths, or None"""
    data: dict
    """what it read: the data files' summaries and the counts of rows used and left out"""
    metrics: dict
    """its results (final losses, accuracies, PPO's last step's means)"""
    seed: int | None
    recipe: dict
    """the whole resolved recipe, with the model and adapter settings the run really used"""
    adapter: dict | None = None
    """the method and its parameter counts (``{"method", "parameters"}``); None for a run that trains nothing"""
    untrained_rows_reinitialised: int | None = None
    """how many embedding rows of the base ``load_base`` re-initialised (the stages that load a fresh base)"""
    reward_stats: dict | None = None
    """the reward model's score mean and std (rm: on its training data; ppo: its reward model's, None without one)"""
    shards: dict | None = None
    """what each process held of sharded models (``distributed.record_shards``); None when nothing was sharded"""
    sections: dict = field(default_factory=dict)
    """the stage's own sections, by name (PPO's ``reward``, ``advantage``...; DPO's ``dpo``; eval's ``scorers``)"""

    def __post_init__(self) -> None:
        taken = sorted(set(self.sections) & set(RESERVED))
        if taken:
            raise ValueError(f"a stage's own manifest sections cannot be named {', '.join(taken)}")

    def to_json(self, stage: str) -> dict:
        """The manifest's fields as ``manifest.json`` holds them, before what ``Run.finish`` adds."""
        out: dict = {"stage": stage, "status": "complete", "base": self.base}
        if self.untrained_rows_reinitialised is not None:
            out["untrained_rows_reinitialised"] = self.untrained_rows_reinitialised
        out["parents"] = self.parents
        if self.adapter is not None:
            out["adapter"] = self.adapter
        out |= {"data": self.data, "metrics": self.metrics}
        if stage in SCORING_STAGES:
            out["reward_stats"] = self.reward_stats
        return out | self.sections | {"seed": self.seed, "recipe": self.recipe}
