"""The held-out gold reward of a preference stage's policy (dpo, kto): before its first step
and after its last, sampled exactly as PPO's held-out eval (ppo.generation,
ppo.eval_batch_size, ppo.max_prompt_len, seed + rank: evaluation.heldout_eval), so the numbers
compare across stages. `<stage>/eval_gold_reward` and `<stage>/eval_response_length`; the
starting policy's as `<stage>/init_eval_*` (as PPO names them)."""

from __future__ import annotations

from omegaconf import DictConfig

from rlhf_exp.rl import evaluation
from rlhf_exp.training import runtime


def heldout_gold(stage: str, eng, tokenizer, cfg: DictConfig, rows: list[dict]
                 ) -> dict[str, float]:
    """`<stage>/eval_gold_reward` and `<stage>/eval_response_length` of the policy `eng`."""
    settings = evaluation.stage_settings(cfg, cfg.ppo, eng.zero_optimization_stage())
    return evaluation.heldout_eval(eng, tokenizer, rows, settings, prefix=stage)


def as_initial(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """<stage>/eval_gold_reward -> <stage>/init_eval_gold_reward."""
    return {k.replace(f"{stage}/eval_", f"{stage}/init_eval_"): v for k, v in metrics.items()}


def starting_gold(stage: str, run, eng, tokenizer, rows: list[dict],
                  logged: dict[str, float]) -> dict[str, float]:
    """The starting policy's held-out gold reward as `<stage>/init_eval_*`, logged at step 0
    with the stage's data statistics `logged`; a resumed run logged it already and reads it
    back from its checkpoint (the loop's extra_state `init_gold`)."""
    if not rows:
        runtime.say(f"{stage}: the ppo share has no held-out prompts (data_mix.split, "
                    "eval_fraction): no held-out gold reward")
    if run.resume_from is not None:
        return as_initial(stage, run.saved.get("extra", {}).get("init_gold", {}))
    gold = heldout_gold(stage, eng, tokenizer, run.cfg, rows) if rows else {}
    run.tracker.log({**logged, **gold}, 0)
    return as_initial(stage, gold)


def final_gold(stage: str, run, eng, tokenizer, rows: list[dict], state) -> None:
    """The held-out gold reward after the last step, logged and kept with the loop's eval
    metrics (`state.eval_metrics`, which the result repeats)."""
    if rows:
        gold = heldout_gold(stage, eng, tokenizer, run.cfg, rows)
        run.tracker.log(gold, state.step)
        state.eval_metrics.update(gold)
