"""Every error the user can act on, in one place: each is reported as one line, exit code 2.

The message names the key, file or column, what is allowed, and what to change; the CLI prints
it as `rlhf-exp: error: <message>` without a traceback. Raise these before any model loads and
before any W&B run exists wherever the problem can be known that early.

The classes also derive from the built-in error a caller would expect (ValueError for a bad
value, FileNotFoundError for a missing starting point), so `except ValueError` keeps working.
The modules that used to define them re-export them (`rlhf_exp.config.ConfigError`,
`rlhf_exp.data.DataError`, `rlhf_exp.training.tracking.InitError`,
`rlhf_exp.command.compare.CompareError`).
"""


class UserError(Exception):
    """Bad input: the message names the key/file/column and what is allowed."""


class ConfigError(UserError, ValueError):
    """A composed config that cannot run; the message names the key and what is allowed."""


class DataError(UserError, ValueError):
    """Bad data: the message names the file (and line or column) and what was expected."""


class InitError(UserError, FileNotFoundError):
    """A stage's starting point (`*.init_from`, `ppo.actor_init`, ...) that cannot be found."""


class CompareError(UserError):
    """`rlhf-exp-compare` was given a path or run it cannot read."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or inf; the run stops, its last checkpoint is kept.
    (rlhf_exp/train_loop.check_finite: every rank raises it at the same step.)"""


class RewardFunctionError(UserError):
    """A reward function (`*.reward_functions`) that cannot be imported, or that fails or
    misbehaves on real rows."""
