"""PPO and its critic-free variants: the equations, the four models, the update, the precision."""
