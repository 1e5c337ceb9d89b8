"""Errors caused by the user's input (config, data files): reported as one line, exit code 2."""


class UserError(Exception):
    """Bad input: the message names the key/file/column and what is allowed."""


class RewardFunctionError(UserError):
    """A reward function (`*.reward_functions`) that cannot be imported, or that fails or
    misbehaves on real rows."""
