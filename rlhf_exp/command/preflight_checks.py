"""Checks of what a run's command line and config point at that the first preflight
(rlhf_exp/command/preflight.py) did not make: each a function of its own, called with one line from
the dispatcher (cli.py) or preflight, so that a stage registry can later say which apply to which
stage. Every failure is a UserError naming the key (or override) and what to change.

    override_parse_hint   a malformed override: which one, and how to quote a value with = or :
    refuse_merging_appends `+key={...}` / `+key=[...]` on a key that exists (Hydra merges
                          those silently, e.g. over a built-in arm of stage=algorithms)
    check_checkpoint_kinds a starting point of the wrong kind (a reward model as a policy, a
                          policy as a reward model), from each checkpoint's rlhf_exp.json
    check_tokenizers_match dpo.reference, grpo.reward_model, ppo.critic_init / reward_model
                          have the policy's tokenizer
    policy_tokenizer      the tokenizer a stage's policy will have (its input checks count
                          lengths with it: dpo, kto under data_mix.overlong=drop)
    check_run_dir_owner   an existing run dir holds this very run (same stage and config)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp import registry
from rlhf_exp.errors import ConfigError, UserError


def check_inputs(cfg: DictConfig, refs: list[tuple[str, str]], stages: list[str]) -> None:
    """From preflight, after its own checks of the starting points and the data: the kind of
    each starting point, the tokenizers of the models scoring the policy's tokens."""
    check_checkpoint_kinds(refs)
    check_tokenizers_match(cfg, stages)


# ----------------------------------------------------------------------------- command line
def override_parse_hint(exc: Exception) -> str:
    """Hydra's OverrideParseException as one line: the override, the parser's complaint, and
    the quoting a value with `=`, `:` or spaces needs inside a list or dict."""
    override = getattr(exc, "override", None)
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    where = f"cannot parse the override {override!r}: " if override else ""
    hint = "overrides look like key=value"
    value = str(override).split("=", 1)[1] if override and "=" in override else ""
    if "=" in value:
        hint += ("; an item holding '=' or ':' must be quoted inside the argument, e.g. "
                 """'+stage.arms.x.overrides=["grpo.epsilon_high=0.28"]'""")
    return f"{where}{first} ({hint})"


def refuse_merging_appends(overrides: list[str],
                           compose: Callable[[list[str]], DictConfig]) -> None:
    """`+key=value` adds a key that is not there; Hydra refuses it on an existing key, except
    when the value is a dict or a list, which it merges in without a word (e.g.
    `+stage.arms.ppo={stages:[sft,grpo]}` would turn the built-in PPO arm into GRPO, reported as
    PPO). Refused here the same way. `compose` composes a list of overrides as the run will."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a malformed override: worded where the run's overrides are parsed
        return
    appends = [ov for ov in parsed if ov.type == OverrideType.ADD and ov.package is None
               and not ov.is_sweep_override() and isinstance(ov.value(), (dict, list))]
    if not appends:
        return
    lines = {ov.input_line for ov in appends}
    base = compose([o for o in overrides if o not in lines])
    for ov in appends:
        key = ov.key_or_group
        if OmegaConf.select(base, key, default=None) is None:
            continue
        if key.startswith("stage.arms.") and key.count(".") == 2:
            raise ConfigError(f"{ov.input_line}: {key} is the built-in arm "
                              f"{key.rsplit('.', 1)[-1]!r} already (+ adds an arm; Hydra would "
                              "merge into this one silently): give the new arm another name, or "
                              f"change this one's keys without + (e.g. {key}.stages=[...])")
        raise ConfigError(f"{ov.input_line}: {key} exists already (+ adds a key; Hydra would "
                          f"merge into this one silently): set it without +, e.g. {key}=...")


# ----------------------------------------------------------------------------- checkpoint kinds
POLICY, REWARD = "a policy (causal LM)", "a reward model (score head)"
# stage=eval's own inputs (lists, not registry start keys)
_EVAL_POLICY_KEYS = ("eval.policies.", "eval.reference")
_EVAL_REWARD_KEYS = ("eval.reward_model",)


def _start_keys(kind: str) -> tuple[str, ...]:
    """The registered starting points that must hold a checkpoint of `kind` (policy/reward)."""
    return tuple(s.key for spec in registry.STAGES.values() for s in spec.starts
                 if s.kind == kind)


def expected_kind(key: str) -> str | None:
    """What the starting point under `key` must hold (None: either)."""
    if key in (*_start_keys("reward"), *_EVAL_REWARD_KEYS) or key.endswith("(reward model)"):
        return REWARD
    policy_keys = (*_start_keys("policy"), *_EVAL_POLICY_KEYS)
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in policy_keys) or \
            key.startswith("eval.from_run="):
        return POLICY
    return None


def checkpoint_kind(path: Path) -> tuple[str | None, str]:
    """(POLICY, REWARD or None = cannot tell, how we know) of a checkpoint dir: the stage its
    rlhf_exp.json records (PPO's critic is a score-head model), else the architectures of its
    config.json (a plain HF dir), else its adapter's task type and base."""
    meta = path / "rlhf_exp.json"
    if meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            info = {}
        stage = info.get("stage")
        if stage == "reward" or (stage == "ppo" and info.get("model") == "critic"):
            return REWARD, f"a {stage} {'critic' if stage == 'ppo' else 'model'} checkpoint"
        if stage in registry.STAGES and registry.get(stage).trains_policy:
            return POLICY, f"a {stage} {'EMA ' if info.get('model') == 'ema' else ''}policy " \
                           "checkpoint"
    config = path / "config.json"
    if config.is_file():
        try:
            arch = json.loads(config.read_text()).get("architectures") or []
        except (OSError, ValueError):
            return None, ""
        names = ", ".join(arch)
        if any(a.endswith("ForSequenceClassification") for a in arch):
            return REWARD, f"a sequence-classification model ({names})"
        if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
               for a in arch):
            return POLICY, f"a causal LM ({names})"
        return None, ""
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            task = json.loads(adapter.read_text()).get("task_type")
        except (OSError, ValueError):
            return None, ""
        if task == "SEQ_CLS":
            return REWARD, "a LoRA adapter of a sequence-classification model"
        if task == "CAUSAL_LM":
            return POLICY, "a LoRA adapter of a causal LM"
    return None, ""


def check_checkpoint_kind(key: str, ref: str, path: Path) -> None:
    """The checkpoint `path` (what `key=ref` resolves to) is of the kind `key` needs: a reward
    model as a policy would chat garbage, a policy as a reward model would score with an
    untrained head. A dir that says nothing of its kind passes (a hub model, where a base
    model is allowed)."""
    want = expected_kind(key)
    if want is None:
        return
    kind, what = checkpoint_kind(Path(path))
    if kind is None or kind == want:
        return
    shown = ref if str(path) == ref else f"{ref} ({path})"
    raise UserError(f"{key}={shown} holds {what}, but {key.split('=')[0]} needs {want}: give "
                    f"{'a reward' if want == REWARD else 'an sft, ppo, grpo or dpo'} run dir or "
                    "checkpoint")


def _resolved(ref: str) -> Path | None:
    """The checkpoint dir a starting point names (None where preflight left it to W&B)."""
    from rlhf_exp.training.tracking import resolve_init

    try:
        return Path(resolve_init(ref, None)[0])
    except Exception:
        return None


def check_checkpoint_kinds(refs: list[tuple[str, str]]) -> None:
    """Every (key, reference) of preflight.starting_points, checked for its kind."""
    for key, ref in refs:
        path = _resolved(ref)
        if path is not None:
            check_checkpoint_kind(key, ref, path)


# ----------------------------------------------------------------------------- tokenizers
def _scored_with(stage: str, cfg: DictConfig | None = None) -> tuple[str, tuple[str, ...]]:
    """(the policy's starting-point key, the keys of the frozen models `stage` feeds the
    policy's token ids: they must share its tokenizer; with `cfg`, only those the run loads),
    from the stage registry."""
    starts = registry.get(stage).starts
    policy = next(s.key for s in starts if s.handoff == "policy")
    return policy, tuple(s.key for s in starts if s.same_tokenizer and (
        cfg is None or s.loaded_if is None or s.loaded_if(cfg)))


def _scoring_stages(stages: list[str]) -> list[str]:
    return [s for s in stages if s in registry.STAGES
            and any(k.same_tokenizer for k in registry.get(s).starts)]


def _policy_path(cfg: DictConfig, stage: str, stages: list[str]) -> str:
    """Where `stage`'s policy (and so its tokenizer) comes from: its starting point, else the
    base model (also what an SFT stage before it in a pipeline starts from)."""
    from rlhf_exp.modeling import models

    key = _scored_with(stage)[0]
    ref = OmegaConf.select(cfg, key)
    if ref and not ("sft" in stages and stages.index("sft") < stages.index(stage)):
        path = _resolved(str(ref))
        if path is not None:
            return str(path)
    return models.resolve_base_path(cfg.model)  # the tiny model is built once, cached


def _vocab(path: str, cfg: DictConfig) -> dict[str, int]:
    from rlhf_exp.modeling import models

    return models.load_tokenizer(path, cfg.model).get_vocab()  # the tokenizer files only


def check_tokenizers_match(cfg: DictConfig, stages: list[str]) -> None:
    """dpo.reference, grpo.reward_model, ppo.critic_init / reward_model are fed the policy's
    token ids: each must have the policy's tokenizer (one set by model.tokenizer_path is
    shared by all of them). Compares the vocabularies; no model weights are read."""
    if cfg.model.tokenizer_path:
        return
    for stage in _scoring_stages(stages):
        refs = [(k, str(OmegaConf.select(cfg, k))) for k in _scored_with(stage, cfg)[1]
                if OmegaConf.select(cfg, k)]
        paths = [(k, ref, p) for k, ref in refs if (p := _resolved(ref)) is not None]
        if not paths:
            continue
        policy = _policy_path(cfg, stage, stages)
        mine = _vocab(policy, cfg)
        for key, ref, path in paths:
            theirs = _vocab(str(path), cfg)
            if theirs != mine:
                raise UserError(
                    f"{key}={ref} has another tokenizer than the {stage} policy ({policy}): "
                    f"{len(theirs)} vs {len(mine)} tokens"
                    f"{'' if len(theirs) != len(mine) else ', other ids'}; {stage} feeds it the "
                    "policy's token ids, so it must come from the same base model (or set "
                    "model.tokenizer_path for both)")


def policy_tokenizer(cfg: DictConfig, stage: str, stages: list[str]):
    """The tokenizer `stage`'s policy will have (its starting point's, else the base model's):
    what its input check counts lengths with. Only the tokenizer files are read."""
    from rlhf_exp.modeling import models

    return models.load_tokenizer(_policy_path(cfg, stage, stages), cfg.model)


# ----------------------------------------------------------------------------- run dir
def check_run_dir_owner(cfg: DictConfig, run_dir: Path, stage: str | None = None) -> None:
    """An existing run dir that holds a run of this stage (its saved config) holds this very
    run: the same config but for what a resumed run may change (length, intervals, retention,
    logger, tags: resume.check_compatible's rule). Another run's dir would get this run's
    config, checkpoints and result mixed into its own. (Another stage's run:
    preflight.check_run_dir.)"""
    from rlhf_exp.training import resume

    run_dir = Path(run_dir)
    if (stage and stage != cfg.stage.name) or not run_dir.is_dir():
        return  # an arm of stage=algorithms: its dir holds its last stage's run
    try:
        resume.check_compatible(cfg, run_dir)
    except UserError as exc:
        detail = str(exc).split(": ", 1)[-1].split("; a resumed run", 1)[0]
        detail = detail.replace("the run was made with another config", "made with another "
                                "config")
        raise UserError(f"hydra.run.dir={run_dir} holds another {cfg.stage.name} run ({detail}); "
                        "a run never writes into another's dir: give a new hydra.run.dir (or "
                        "leave it unset), or resume=<that dir> with its own config") from None
