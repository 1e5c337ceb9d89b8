"""A Hydra sweeper on Optuna 5 (`hydra/sweeper=optuna`), shipped with rlhf_exp.

Hydra finds sweepers only in the `hydra_plugins` namespace package, hence this package beside
`rlhf_exp` (pyproject.toml installs both). Why not hydra-optuna-sweeper: its latest release
(1.3) pins optuna<3, and rlhf_exp needs optuna 4/5. See docs/sweeps.md.
"""
