"""The reward-hacking alarm of the RL stages (PPO, GRPO): rl_loop.py feeds it every step's
statistics and every held-out eval; it answers with `alarm/*` metrics, prints one line when an
alarm fires, and says when the run should stop (`<stage>.alarm.action=stop`). docs/alarm.md.

The alarms (a threshold of null turns one off):

  proxy_gold      at a held-out eval: gold has fallen more than `gold_drop` below its best eval
                  so far while the proxy (the held-out reward-model score
                  `<stage>/eval_reward_score`, else the step's training reward) has risen more
                  than `proxy_rise` since that best eval, on `patience` evals in a row. Only
                  where held-out gold exists.
                  alarm/gold_drop, alarm/proxy_rise (the watched values)
  length          mean response length (rolling mean over `window` steps) over its start (the
                  mean of the first `window` steps) outside [1/length_ratio, length_ratio].
                  alarm/length_ratio
  entropy         the policy's token entropy (rolling) over its start below `entropy_ratio`.
                  alarm/entropy_ratio
  kl              the sequence KL to the reference (rolling) above `kl_budget` nats.
                  alarm/kl_value
  repeat_ngrams   the share of a response's `ngram`-grams that repeat an earlier one in the
                  same response, averaged over the step's responses (rolling), above
                  `repeat_share`. alarm/repeat_ngram_share

`alarm/<name>` is 0 until the alarm fires and 1 from then on (latched); `alarm/any` is 1 once
any fired. The step it first fired at is in the run's result (`StageResult.alarms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from rlhf_exp.training import runtime

NAMES = ("proxy_gold", "length", "entropy", "kl", "repeat_ngrams")


def repeated_ngram_share(responses: torch.Tensor, mask: torch.Tensor, n: int) -> float:
    """Mean over responses of (n-grams that repeat an earlier n-gram of the same response) /
    (n-grams of the response); responses shorter than n tokens count as 0. `responses` [B, R]
    token ids, `mask` [B, R] (1 on the response's tokens, a prefix of each row)."""
    shares = []
    for ids, m in zip(responses.tolist(), mask.tolist()):
        toks = ids[:int(sum(m))]
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        shares.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(shares) / len(shares) if shares else 0.0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@dataclass
class Watch:
    """One run's alarm state; `state_dict` / `load_state_dict` carry it through a resume."""

    stage: str
    cfg: DictConfig  # the `<stage>.alarm` node
    history: dict[str, list[float]] = field(default_factory=dict)  # step series watched
    evals: list[dict[str, float]] = field(default_factory=list)  # step, gold, proxy
    streak: int = 0  # evals in a row past the proxy_gold thresholds
    fired: dict[str, int] = field(default_factory=dict)  # alarm -> step it first fired at
    best: dict[str, float] | None = None  # the best eval by `keep_best` (step, value)
    last: dict[str, float] | None = None  # the last eval by `keep_best` (step, value)

    # ------------------------------------------------------------------ the step alarms
    def step_series(self, stats: dict[str, float]) -> dict[str, float | None]:
        """The values the step alarms watch in this step's statistics (None: not logged)."""
        s = self.stage
        return {"length": stats.get(f"{s}/response_length"), "entropy": stats.get(f"{s}/entropy"),
                "kl": stats.get(f"{s}/kl"), "repeat_ngrams": stats.get("alarm/repeat_ngram_share")}

    def on_step(self, step: int, stats: dict[str, float]) -> dict[str, float]:
        """The step alarms after step `step`; returns the `alarm/*` metrics to log with it."""
        if not self.cfg.enabled:
            return {}
        c, w = self.cfg, self.cfg.window
        out: dict[str, float] = {}
        for name, value in self.step_series(stats).items():
            if value is None:
                continue
            series = self.history.setdefault(name, [])
            series.append(float(value))
            start, now = _mean(series[:w]), _mean(series[-w:])
            if name == "length":
                ratio = now / start if start > 0 else 1.0
                out["alarm/length_ratio"] = ratio
                trip = c.length_ratio is not None and len(series) > w and not (
                    1.0 / c.length_ratio <= ratio <= c.length_ratio)
                detail = f"mean response length {start:.1f} -> {now:.1f} (x{ratio:.2f})"
            elif name == "entropy":
                ratio = now / start if start > 0 else 1.0
                out["alarm/entropy_ratio"] = ratio
                trip = c.entropy_ratio is not None and len(series) > w and ratio < c.entropy_ratio
                detail = f"entropy {start:.3f} -> {now:.3f} (x{ratio:.2f})"
            elif name == "kl":
                out["alarm/kl_value"] = now
                trip = c.kl_budget is not None and now > c.kl_budget
                detail = f"KL {now:.3f} above the budget {c.kl_budget}"
            else:
                out["alarm/repeat_ngram_share"] = now
                trip = c.repeat_share is not None and now > c.repeat_share
                detail = f"{now:.2f} of the {c.ngram}-grams repeat within a response"
            if trip:
                self._fire(name, step, detail)
        return {**out, **self.flags()}

    # ------------------------------------------------------------------ the eval alarm
    def proxy(self, eval_metrics: dict[str, float], stats: dict[str, float]) -> float | None:
        """The proxy reward at an eval: the held-out reward-model score, else the last step's
        training reward (before the first step: none)."""
        s = self.stage
        for key in (f"{s}/eval_reward_score", f"{s}/reward_score", f"{s}/reward"):
            source = eval_metrics if "eval_" in key else stats
            if key in source:
                return float(source[key])
        return None

    def on_eval(self, step: int, eval_metrics: dict[str, float], stats: dict[str, float]
                ) -> dict[str, float]:
        """The proxy_gold alarm at a held-out eval of step `step`; returns the `alarm/*`
        metrics to log with it. Also tracks the best eval by `keep_best`."""
        if not self.cfg.enabled:
            return {}
        gold = eval_metrics.get(f"{self.stage}/eval_gold_reward")
        proxy = self.proxy(eval_metrics, stats)
        self._track_best(step, gold, proxy)
        if gold is None or proxy is None:
            return {}
        if self.evals and self.evals[-1]["step"] == step:  # the same eval again (final)
            self.evals.pop()
        self.evals.append({"step": step, "gold": float(gold), "proxy": float(proxy)})
        top = max(self.evals, key=lambda e: e["gold"])  # the earliest best on ties
        drop, rise = top["gold"] - gold, proxy - top["proxy"]
        c = self.cfg
        past = (c.gold_drop is not None and c.proxy_rise is not None and drop > c.gold_drop
                and rise > c.proxy_rise)
        self.streak = self.streak + 1 if past else 0
        if self.streak >= c.patience:
            self._fire("proxy_gold", step,
                       f"held-out gold {top['gold']:.3f} (step {top['step']}) -> {gold:.3f} "
                       f"while the proxy rose {top['proxy']:.3f} -> {proxy:.3f}")
        return {"alarm/gold_drop": drop, "alarm/proxy_rise": rise, **self.flags()}

    def _track_best(self, step: int, gold: float | None, proxy: float | None) -> None:
        value = gold if self.cfg.keep_best == "gold" else proxy
        if value is None:
            return
        self.last = {"step": step, "value": float(value)}
        if self.best is None or value > self.best["value"] or self.best["step"] == step:
            self.best = dict(self.last)

    @property
    def keeps_best(self) -> bool:
        """Whether a stop keeps the best checkpoint (the loop then checkpoints every eval that
        is a new best)."""
        return self.cfg.enabled and self.cfg.action == "stop"

    def value_at(self, step: int) -> float | None:
        """The `keep_best` value of the held-out eval of `step` (None: no eval there)."""
        return self.last["value"] if self.last and self.last["step"] == step else None

    def is_new_best(self, step: int) -> bool:
        """Whether the eval of `step` is the best so far by `keep_best`."""
        return self.best is not None and self.best["step"] == step

    # ------------------------------------------------------------------ firing, stopping
    def _fire(self, name: str, step: int, detail: str) -> None:
        if name in self.fired:
            return
        self.fired[name] = step
        action = "stopping" if self.cfg.action == "stop" else "warning only"
        runtime.say(f"{self.stage}: ALARM {name} at step {step}: {detail} ({action}; "
                    f"{self.stage}.alarm)")

    def flags(self) -> dict[str, float]:
        """alarm/<name> (latched 0/1) for every alarm, and alarm/any."""
        out = {f"alarm/{name}": float(name in self.fired) for name in NAMES}
        out["alarm/any"] = float(bool(self.fired))
        return out

    @property
    def stop(self) -> bool:
        return self.keeps_best and bool(self.fired)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "evals": self.evals, "streak": self.streak,
                "fired": self.fired, "best": self.best, "last": self.last}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.history, self.evals = saved["history"], saved["evals"]
        self.streak, self.fired = saved["streak"], saved["fired"]
        self.best, self.last = saved["best"], saved["last"]
