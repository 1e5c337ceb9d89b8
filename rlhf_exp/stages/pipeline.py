"""Placeholder replaced by the pipeline runner (SFT -> reward -> PPO)."""
