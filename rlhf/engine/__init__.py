"""The generation engine: prompts in, sampled responses out (and the episodes PPO trains on)."""
