"""RL and preference math and the steps built on it: PPO, GRPO and DPO losses and advantages,
generation and rollouts, the PPO/GRPO loop (rl_loop), reward models and reward functions,
sequence scoring, and the one held-out evaluator (evaluation)."""
