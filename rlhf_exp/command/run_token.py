"""The default run dir is unique per launch.

`hydra.run.dir` (conf/config.yaml) is `outputs/<experiment>/<time>_<token>_<stage>`: the time
alone is shared by two runs started in the same second (a shell loop with `&`, a job array),
which then wrote into one dir. `${run_token:}` is this process's token: random, drawn once per
process, so the dispatcher's preflight and the app's Hydra (one process) name the same dir, and
Hydra's resolver cache carries it to a sweep's jobs as it carries `${now:...}`. A multi-process
run's ranks do not resolve it: the launcher hands them the run dir it fixed (cli._relaunch).
"""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf

TOKEN = secrets.token_hex(3)  # 6 hex digits: 16.7 million per second of launches


def register_resolvers() -> None:
    """`${run_token:}`, as Hydra registers `${now:...}` (cached per config)."""
    if not OmegaConf.has_resolver("run_token"):
        OmegaConf.register_new_resolver("run_token", lambda: TOKEN, use_cache=True)
