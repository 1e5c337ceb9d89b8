"""Optuna search as a Hydra sweeper: each trial is one job of the multirun.

    rlhf-exp -m hparams_search=sft_optuna                        # conf/hparams_search/
    rlhf-exp -m hydra/sweeper=optuna stage=sft 'sft.lr=tag(log, interval(1e-4, 1e-2))' \\
        sft.warmup_steps=0,10,20 hydra.sweeper.n_trials=20

The search space uses Hydra's override grammar, on the command line or in
`hydra.sweeper.params` (same as hydra-optuna-sweeper, so its configs carry over):
    a,b,c / choice(a,b,c)          categorical
    range(1, 9)                    integers 1..8 (int steps), categorical otherwise
    interval(0.1, 0.9)             float uniform; tag(log, interval(..)) log-uniform;
                                   tag(int, interval(1, 8)) integer
Other overrides are passed to every trial unchanged. A trial's value is what the app returns
(the `objective` metric); a job that fails or returns nothing is told to Optuna as FAILED, and
the search goes on. The best trial is printed and saved in `<sweep dir>/optimization_results.yaml`.
A bad search space (low > high, log with low <= 0, an unknown key, a value the config rejects)
or n_trials < 1 stops `rlhf-exp` before the first trial: rlhf_exp/command/preflight.py checks it
with this module's `search_space`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.errors import UserError

log = logging.getLogger(__name__)
DIRECTIONS = ("minimize", "maximize")


class SearchSpaceError(UserError, ValueError):
    """A search space or sweeper setting Optuna cannot use; one line, naming the key."""


def check_settings(direction: str, n_trials: int, n_jobs: int) -> None:
    if direction not in DIRECTIONS:
        raise SearchSpaceError(f"hydra.sweeper.direction={direction!r}: choose one of "
                               f"{', '.join(DIRECTIONS)}")
    for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
        if not isinstance(value, int) or value < 1:
            raise SearchSpaceError(f"hydra.sweeper.{key}={value!r} must be an integer >= 1")


def to_distribution(override: Override):
    """The Optuna distribution of one sweep override."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value = override.value()
    line = override.input_line or f"{override.get_key_element()}=..."
    if isinstance(value, ChoiceSweep):
        choices = [x for x in override.sweep_iterator(transformer=Transformer.encode)]
        if not choices:
            raise SearchSpaceError(f"{line}: no choices")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        if value.shuffle:
            raise SearchSpaceError(f"{line}: shuffle(range(..)) is meaningless for Optuna")
        if value.step == 0:
            raise SearchSpaceError(f"{line}: the step of a range must not be 0")
        values = [x for x in override.sweep_iterator()]
        if not values:
            raise SearchSpaceError(f"{line}: the range is empty (range(start, stop, step) stops "
                                   "before stop; start < stop for a positive step)")
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return IntDistribution(min(values), max(values), step=abs(value.step))
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale, low, high = "log" in value.tags, value.start, value.end
        if low > high:
            raise SearchSpaceError(f"{line}: low {low} > high {high}; write interval(low, high)")
        if "int" in value.tags:
            low, high = math.ceil(low), math.floor(high)
            if low > high:
                raise SearchSpaceError(f"{line}: holds no integer")
            if log_scale and low < 1:
                raise SearchSpaceError(f"{line}: a log-scale integer interval needs low >= 1")
            return IntDistribution(low, high, log=log_scale)
        if log_scale and low <= 0:
            raise SearchSpaceError(f"{line}: a log-scale interval needs low > 0")
        return FloatDistribution(low, high, log=log_scale)
    raise SearchSpaceError(f"{line} is not a search space (use a,b / choice / range / interval)")


def search_space(params: dict, arguments: list[str], parser: OverridesParser | None = None
                 ) -> tuple[dict, list[str]]:
    """(search space {key: distribution}, fixed overrides) from hydra.sweeper.params and the
    command line (the command line wins on a key given in both)."""
    parser = parser or OverridesParser.create()
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for ov in parser.parse_overrides(lines):
        key = ov.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if ov.is_sweep_override():
            space[key] = to_distribution(ov)
        else:
            fixed[key] = f"{key}={ov.get_value_element_as_str()}"
    if not space:
        raise SearchSpaceError("the Optuna sweeper has no search space: give hydra.sweeper.params "
                               "or sweep overrides such as sft.lr=interval(1e-4,1e-2)")
    return space, list(fixed.values())


def probe_values(dist) -> list:
    """Values that stand for a distribution when checking the configs it makes: every choice,
    or both ends of a range."""
    choices = getattr(dist, "choices", None)
    return list(choices) if choices is not None else [dist.low, dist.high]


class OptunaSweeper(Sweeper):
    """`hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml holds the settings)."""

    def __init__(self, direction: str = "minimize", study_name: str | None = None,
                 storage: str | None = None, n_trials: int = 20, n_jobs: int = 1,
                 sampler: Any = None, params: Any = None) -> None:
        check_settings(direction, n_trials, n_jobs)  # rlhf-exp checks these before Hydra too
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler_cfg = sampler
        self.params = OmegaConf.to_container(params, resolve=True) if params else {}
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from hydra.utils import instantiate
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        space, fixed = search_space(self.params, arguments, OverridesParser.create(
            config_loader=self.hydra_context.config_loader))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # Hydra instantiates the sweeper recursively: `sampler` usually arrives built already
        sampler = self.sampler_cfg
        if isinstance(sampler, (dict, DictConfig)):
            sampler = instantiate(sampler)
        study = optuna.create_study(study_name=self.study_name or sweep_dir.name,
                                    storage=self.storage, sampler=sampler,
                                    direction=self.direction, load_if_exists=True)
        log.info(f"Optuna {optuna.__version__} study {study.study_name}: {self.n_trials} "
                 f"trials, {self.direction} the objective, sampler "
                 f"{type(study.sampler).__name__}")
        log.info("search space: " + "; ".join(f"{k}: {d}" for k, d in space.items()))
        job_idx, left, returns, self.jobs = 0, self.n_trials, [], {}
        while left > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, left))]
            batch = [[*fixed, *(f"{k}={t.params[k]}" for k in space)] for t in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for i, (trial, result) in enumerate(zip(trials, results)):
                self.jobs[trial.number] = job_idx + i
                value = result.return_value if result.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, float(value))
                else:
                    why = ("failed" if result.status != JobStatus.COMPLETED or value is None
                           else f"returned {value!r}")
                    log.warning(f"trial {trial.number} {why}: told to Optuna as FAILED")
                    study.tell(trial, state=TrialState.FAIL)
            job_idx += len(batch)
            left -= len(batch)
            returns.append(results)
        self._report(study, sweep_dir)
        return returns

    def _report(self, study, sweep_dir: Path) -> None:
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name,
                                   "direction": self.direction, "n_trials": len(study.trials),
                                   "n_complete": len(done)}
        if done:
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value,
                           best_params=dict(best.params))
            params = " ".join(f"{k}={v}" for k, v in best.params.items())
            results["best_job"] = self.jobs.get(best.number)
            print(f"optuna: best trial {best.number} (job {self.jobs.get(best.number)}) value "
                  f"{best.value:.6g}: {params}", flush=True)
        else:
            print("optuna: no trial completed (see the failures above)", flush=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
