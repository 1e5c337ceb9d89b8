"""validate(): the semantic checks of a composed config, before any model loads.

What is checked when (one rule): the shared nodes (model, stage, hardware, zero_stage, data_mix,
logger, the run's names) always; a stage's own node (sft.*, ppo.*, grpo.*, eval.*, ...) only
when the run goes through that stage (`run_stages`: the stage, a pipeline's chain, every arm's
chain of stage=algorithms), with the keys of other nodes it reads (StageSpec.also_reads). So a
bad `grpo.*` or `ppo.*` key never stops `stage=sft`, and is refused by any run that trains
GRPO or PPO. Filesystem checks (paths, files) are preflight's (rlhf_exp/command/preflight.py).
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf_exp import registry
from rlhf_exp.config.checks import (
    _allowed,
    _check_finite,
    _check_generation,
    _check_lora,
    _positive,
)
from rlhf_exp.config.choices import (
    DEVICES,
    FORMATS,
    LAUNCHERS,
    NAME_CHARS,
    OFFLOAD,
    OVERLONG,
    PRECISIONS,
    SHARES,
    SOURCE_KINDS,
)
from rlhf_exp.config.stage_checks import check_pass_at_k
from rlhf_exp.errors import ConfigError


def active_arms(cfg: DictConfig) -> dict[str, DictConfig]:
    """stage.arms without the arms set to null: a preset drops a built-in arm with
    `stage.arms.ppo: null` (a merge cannot delete a key), the command line with `~stage.arms.ppo`
    or `stage.arms.ppo=null`."""
    return {str(name): arm for name, arm in cfg.stage.arms.items() if arm is not None}


def run_stages(cfg: DictConfig) -> list[str]:
    """The training stages a run goes through: a pipeline's chain, the union of the arms'
    chains of stage=algorithms (shared stages once), else the stage itself."""
    if cfg.stage.name == "pipeline":
        return list(cfg.stage.stages)
    if cfg.stage.name == "algorithms":
        return list(dict.fromkeys(s for arm in active_arms(cfg).values() for s in arm.stages))
    return [cfg.stage.name]


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    if not m.path and m.tiny is None:
        raise ConfigError("model.path is missing: give a hub id or a local directory "
                          "(or use model=tiny)")
    for key in ("path", "reward_path", "tokenizer_path"):
        if m[key] is not None and not str(m[key]).strip():
            raise ConfigError(f"model.{key} is empty; give a hub id or a local directory, or "
                              "null")
    if m.get("fetch") is not None:
        from rlhf_exp.modeling.model_cache import RECIPES  # torch-free

        if str(m.fetch) not in RECIPES:
            raise ConfigError(f"model.fetch={m.fetch!r} is not a fetch recipe; allowed: "
                              f"{', '.join(sorted(RECIPES))} (or null)")
        if not m.path:
            raise ConfigError(f"model.fetch={m.fetch} needs model.path: the hub id it is a "
                              "copy of")
    if m.tiny is not None:
        t = m.tiny
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _positive(cfg, f"model.tiny.{key}")
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"model.tiny: hidden_size ({t.hidden_size}) must be divisible by "
                              f"num_attention_heads ({t.num_attention_heads}), and that by "
                              f"num_key_value_heads ({t.num_key_value_heads})")
    if not str(m.attn_implementation).strip():
        raise ConfigError("model.attn_implementation is empty; e.g. sdpa or eager")
    template = str(m.prompt_template)
    try:
        filled = template.format(prompt="<<PROMPT>>")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model.prompt_template={template!r} is not a template with only "
                          f"{{prompt}} ({type(exc).__name__}: {exc}); write literal braces as "
                          "{{ and }}") from None
    if "<<PROMPT>>" not in filled:
        raise ConfigError(f"model.prompt_template={template!r} has no {{prompt}}: the prompt "
                          "would be dropped; e.g. 'Question: {prompt} Answer:'")
    if m.tiny is not None and not m.path:
        _check_tiny(cfg)
    _check_lora(cfg, "model.lora")


def _check_tiny(cfg: DictConfig) -> None:
    from rlhf_exp.modeling.tiny_models import FAMILIES, TOKENIZERS

    _allowed(cfg, "model.tiny.family", FAMILIES)
    _allowed(cfg, "model.tiny.tokenizer", TOKENIZERS)
    if cfg.model.tiny.tokenizer == "char" and cfg.model.tiny.family != "llama":
        raise ConfigError(f"model.tiny.tokenizer=char is only built for model.tiny.family=llama "
                          f"(model=tiny); use tokenizer=bpe with family="
                          f"{cfg.model.tiny.family}")
    if cfg.model.tiny.tokenizer == "bpe" and not 300 <= cfg.model.tiny.vocab_size <= 8192:
        raise ConfigError(f"model.tiny.vocab_size={cfg.model.tiny.vocab_size} must be in "
                          "[300, 8192] (the llama tokenizer alone holds 259 byte and special "
                          "tokens)")


def _check_run_names(cfg: DictConfig) -> None:
    """experiment_name names folders and W&B groups/artifacts; tags are W&B tags; the seed
    seeds torch."""
    name = str(cfg.experiment_name)
    if not name or not set(name) <= NAME_CHARS or name.startswith((".", "-")) or len(name) > 96:
        raise ConfigError(f"experiment_name={name!r}: use 1-96 letters, digits, _ . and - (not "
                          "starting with . or -); it names the run folders and W&B artifacts")
    for tag in cfg.tags:
        if not str(tag).strip() or len(str(tag)) > 64:
            raise ConfigError(f"tags has {str(tag)!r}; each tag must be 1-64 characters (W&B)")
    if not -2**63 < cfg.seed < 2**63:
        raise ConfigError(f"seed={cfg.seed} must fit in 64 bits (torch's RNG takes no larger)")
    if not str(cfg.logger.project).strip():
        raise ConfigError("logger.project is empty; name the W&B project (default rlhf_exp)")
    if cfg.logger.table_every < 0:
        raise ConfigError(f"logger.table_every={cfg.logger.table_every} must be >= 0 (0 = off)")


def _check_hardware(cfg: DictConfig) -> None:
    """Launch geometry: a multi-node run needs a rendezvous every node can reach."""
    hw = cfg.hardware
    _allowed(cfg, "hardware.launcher", LAUNCHERS)
    _positive(cfg, "hardware.nproc_per_node")
    _positive(cfg, "hardware.nnodes")
    if not 0 <= hw.node_rank < hw.nnodes:
        raise ConfigError(f"hardware.node_rank={hw.node_rank} must be in "
                          f"[0, hardware.nnodes={hw.nnodes})")
    if not 0 <= hw.master_port < 65536:
        raise ConfigError(f"hardware.master_port={hw.master_port} must be in [0, 65535] "
                          "(0 = pick a free one)")
    if hw.dry_run and hw.launcher == "submitit":
        raise ConfigError("hardware.dry_run prints a torchrun/deepspeed command; with "
                          "hardware.launcher=submitit the job is hydra.launcher.* (print it "
                          "with --cfg hydra)")
    if hw.hostfile and hw.launcher != "deepspeed":
        raise ConfigError(f"hardware.hostfile is only read by hardware.launcher=deepspeed "
                          f"(launcher is {hw.launcher!r}); remove it or switch launcher")


def check_rendezvous(cfg: DictConfig) -> None:
    """Before a multi-node launch (not at composition, so the multinode presets compose on their
    own and take the node-specific values on the command line): every node must reach the same
    master_addr:master_port, and DeepSpeed's runner needs a hostfile (that the file is there is
    preflight's check)."""
    hw = cfg.hardware
    if hw.nnodes > 1 and hw.launcher != "submitit":
        if hw.master_addr in ("127.0.0.1", "localhost", ""):
            raise ConfigError(f"hardware.nnodes={hw.nnodes} needs hardware.master_addr set to "
                              f"the address of node 0 (not {hw.master_addr!r})")
        if hw.master_port == 0:
            raise ConfigError(f"hardware.nnodes={hw.nnodes} needs a fixed hardware.master_port "
                              "(the same on every node), e.g. 29500")
    if hw.launcher == "deepspeed" and hw.nnodes > 1 and not hw.hostfile:
        raise ConfigError("hardware.launcher=deepspeed with hardware.nnodes > 1 needs "
                          "hardware.hostfile (one 'host slots=N' line per node)")


def _check_source(src: DictConfig, key: str) -> None:
    """What can be known about a data source without reading it (the rows are checked when they
    are loaded, before training: rlhf_exp/data/sources.py; its path in preflight)."""
    from rlhf_exp.data.sources import FIELDS
    from rlhf_exp.tasks import GOLD_REWARDS

    for field_name in src.columns:
        if field_name not in FIELDS:
            raise ConfigError(f"{key}.columns has {field_name!r}; keys are internal fields: "
                              f"{', '.join(FIELDS)} (values are your column names)")
    if src.task is not None and src.task not in GOLD_REWARDS:
        raise ConfigError(f"{key}.task={src.task!r} is not a known gold reward; choose one of: "
                          f"{', '.join(GOLD_REWARDS)} (or null)")
    if src.max_examples is not None and src.max_examples < 1:
        raise ConfigError(f"{key}.max_examples={src.max_examples} must be >= 1 (or null = all)")
    for field_name, column in src.columns.items():
        if not str(column).strip():
            raise ConfigError(f"{key}.columns.{field_name} is empty; give the column's name")
    if src.kind == "hub" and not str(src.hub_split).strip():
        raise ConfigError(f"{key}.hub_split is empty; name the dataset split, e.g. train")
    if src.kind == "synthetic":
        task = src.synthetic
        if task.num_examples < 1:
            raise ConfigError(f"{key}.synthetic.num_examples={task.num_examples} must be >= 1")
        if not 1 <= task.min_digits <= task.max_digits:
            raise ConfigError(f"{key}.synthetic: min_digits={task.min_digits} and max_digits="
                              f"{task.max_digits} need 1 <= min_digits <= max_digits")
        if not 0.0 <= task.demo_noise <= 1.0:
            raise ConfigError(f"{key}.synthetic.demo_noise={task.demo_noise} must be in [0, 1]")



def _check_chain(stages: list[str], key: str) -> None:
    """A pipeline's chain: each stage starts from what the stages before it produced
    (the registry's hand-off): SFT comes first, a reward model before the stages that use it,
    no stage twice."""
    handoff = registry.pipeline_handoff()
    for name in stages:
        if name not in handoff:
            raise ConfigError(f"{key} has {name!r}; each must be one of: "
                              f"{', '.join(handoff)}")
    # a stage after the stages it is handed from: a named source (reward.init_from <- sft,
    # ppo.critic_init <- reward) before it; a policy source: the policy stages that start from
    # no other stage (sft) before it
    roots = [s for s in stages if registry.get(s).trains_policy and not handoff[s]]
    wrong = (not stages or len(set(stages)) != len(stages)
             or any(stages.index(src) > i if src in stages else
                    src == "policy" and any(stages.index(r) > i for r in roots)
                    for i, name in enumerate(stages) for src in handoff[name].values()))
    if wrong:
        raise ConfigError(f"{key}={stages} must list stages of "
                          f"{', '.join(handoff)} once each, sft first and reward "
                          "before the stages that use its model (e.g. [sft, reward, ppo], "
                          "[sft, grpo], [sft, dpo])")


def _check_algorithms(cfg: DictConfig) -> None:
    """stage=algorithms: at least one arm; each a chain of shared stages (sft, reward) ending
    in a stage that trains a policy from them, named like a folder."""
    if cfg.stage.name != "algorithms":
        return
    shared, policy_start = registry.shared_stages(), registry.policy_start_key()
    if not active_arms(cfg):
        raise ConfigError("stage=algorithms has no arms: give stage.arms.<name>.stages, e.g. "
                          "'+stage.arms.grpo.stages=[sft,grpo]' (conf/stage/algorithms.yaml)")
    for name, arm in active_arms(cfg).items():
        key = f"stage.arms.{name}"
        if not set(str(name)) <= NAME_CHARS or name in shared:
            raise ConfigError(f"{key}: an arm's name is its folder and W&B run name: letters, "
                              f"digits, _ . - only, and not {' or '.join(shared)}")
        if not isinstance(arm, DictConfig) or set(arm) - {"stages", "overrides"} or \
                not isinstance(arm.get("stages"), ListConfig) or \
                not isinstance(arm.get("overrides", []), (list, ListConfig)):
            shown = OmegaConf.to_container(arm) if OmegaConf.is_config(arm) else arm
            raise ConfigError(f"{key}={shown}: an arm is {{stages: [sft, ..., <stage>], "
                              "overrides: [<key>=<value>, ...]} (overrides optional)")
        stages = [str(s) for s in arm.stages]
        _check_chain(stages, f"{key}.stages")
        if stages[-1] not in policy_start or not set(stages[:-1]) <= set(shared):
            raise ConfigError(f"{key}.stages={stages}: an arm is shared stages "
                              f"({', '.join(shared)}) then one stage that trains a policy "
                              f"from them ({', '.join(policy_start)}), e.g. [sft, reward, ppo]")
        for override in arm.get("overrides", []):
            if str(override).split("=", 1)[0].lstrip("+~") in ("stage", "experiment") or \
                    str(override).startswith("stage."):
                raise ConfigError(f"{key}.overrides has {override!r}: an arm's stages are "
                                  f"{key}.stages; its overrides set that stage's keys")


def _check_objective(cfg: DictConfig) -> None:
    """`objective` must be a metric the stage reports (docs: the README's metrics table)."""
    if cfg.objective is None:
        return
    stage = cfg.stage.name
    # a stage's own metrics (<stage>/..., and perf/ where it logs speed); a pipeline's: its
    # stages' and its own
    owners = [stage, *(cfg.stage.stages if stage == "pipeline" else ())]
    prefixes = tuple(dict.fromkeys(p for name in owners for p in _metric_prefixes(name)))
    if not str(cfg.objective).startswith(prefixes):
        allowed = ", ".join(f"{p}..." for p in prefixes) or f"none ({stage} returns no metric)"
        raise ConfigError(f"objective={cfg.objective!r} is not a metric of stage={stage}; "
                          f"allowed: {allowed} (the README lists the metrics)")


def _metric_prefixes(stage: str) -> tuple[str, ...]:
    """The prefixes of the metrics a stage logs (StageSpec.metrics): sft/, perf/, ..."""
    if stage not in registry.STAGES:
        return ()
    return tuple(dict.fromkeys(m.split("/", 1)[0] + "/" for m in registry.get(stage).metrics))


def _check_stage_shares(cfg: DictConfig) -> None:
    """Every stage that runs needs a positive share of data_mix.split."""
    split = list(cfg.data_mix.split)
    index = {share: i for i, share in enumerate(SHARES)}
    stages = run_stages(cfg)
    needs = [(s, share) for s in stages for share in registry.get(s).shares]
    if ("ppo" in stages) and cfg.ppo.ptx_coef > 0:
        needs.append(("ppo (ppo.ptx_coef > 0 trains on the sft share too)", "sft"))
    for who, share in needs:
        if split[index[share]] <= 0:
            raise ConfigError(f"data_mix.split={split} gives the {share} share 0, but stage "
                              f"{who} reads it; give it a positive share (sft, reward, ppo), "
                              "e.g. data_mix.split=[2,4,4]")


def validate(cfg: DictConfig) -> None:
    """Semantic checks on the composed config; raises ConfigError with one readable line."""
    _check_finite(cfg)
    _allowed(cfg, "stage.name", registry.names())
    if cfg.stage.name == "pipeline":
        _check_chain(list(cfg.stage.stages), "stage.stages")
    _check_algorithms(cfg)
    _check_run_names(cfg)
    _allowed(cfg, "hardware.device", DEVICES)
    _allowed(cfg, "hardware.precision", PRECISIONS)
    _check_hardware(cfg)
    if cfg.hardware.device == "cpu" and cfg.hardware.precision == "fp16":
        raise ConfigError("hardware.precision=fp16 needs hardware.device=cuda; use fp32 or bf16")
    if cfg.zero_stage.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage.stage={cfg.zero_stage.stage} must be 0, 1, 2 or 3")
    _allowed(cfg, "zero_stage.offload_optimizer", OFFLOAD)
    _allowed(cfg, "zero_stage.offload_param", OFFLOAD)
    if cfg.zero_stage.offload_param != "none" and cfg.zero_stage.stage != 3:
        raise ConfigError("zero_stage.offload_param needs zero_stage.stage=3")
    _check_model(cfg)
    _allowed(cfg, "logger.name", ("wandb", "none"))
    _allowed(cfg, "logger.mode", ("offline", "online", "disabled"))
    # data
    _allowed(cfg, "data_mix.overlong", OVERLONG)
    if not cfg.data_mix.sources:
        raise ConfigError("data_mix.sources is empty: list at least one source")
    split = list(cfg.data_mix.split)
    if len(split) != 3 or any(s < 0 for s in split) or sum(split) <= 0:
        raise ConfigError(f"data_mix.split={split} must be 3 non-negative shares "
                          "(sft, reward, ppo), e.g. [2, 4, 4]")
    if not 0.0 <= cfg.data_mix.eval_fraction < 1.0:
        raise ConfigError(f"data_mix.eval_fraction={cfg.data_mix.eval_fraction} must be in [0, 1)")
    _check_stage_shares(cfg)
    if cfg.data_mix.cache_dir is not None and not str(cfg.data_mix.cache_dir).strip():
        raise ConfigError("data_mix.cache_dir is empty; give a folder, or null (the default)")
    for i, src in enumerate(cfg.data_mix.sources):
        key = f"data_mix.sources[{i}]"
        if src.kind not in SOURCE_KINDS:
            raise ConfigError(f"{key}.kind={src.kind!r} is not allowed; choose one of: "
                              f"{', '.join(SOURCE_KINDS)}")
        if src.format not in FORMATS:
            raise ConfigError(f"{key}.format={src.format!r} is not allowed; choose one of: "
                              f"{', '.join(FORMATS)}")
        if src.kind != "synthetic" and not src.path:
            raise ConfigError(f"{key}.path is missing: a {src.kind} source needs a path")
        if src.weight <= 0:
            raise ConfigError(f"{key}.weight={src.weight} must be > 0")
        if not str(src.name).strip():
            raise ConfigError(f"{key}.name is empty; each source needs a name")
        _check_source(src, key)
    names = [src.name for src in cfg.data_mix.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data_mix.sources have duplicate names {names}; each needs its own "
                          "(it seeds the source's shuffle and tags its rows)")
    if cfg.data_mix.max_eval_examples < 0:
        raise ConfigError(f"data_mix.max_eval_examples={cfg.data_mix.max_eval_examples} must "
                          "be >= 0")
    if all(src.eval_only for src in cfg.data_mix.sources):
        raise ConfigError("every data_mix.sources[i] sets eval_only: true, so no stage has rows "
                          "to train on; give at least one source eval_only: false")
    _check_objective(cfg)
    _check_stage_nodes(cfg)
    if cfg.stage.name in ("pipeline", "algorithms"):  # their summary reads eval.num_samples, ...
        check_pass_at_k(cfg)


def _check_stage_nodes(cfg: DictConfig) -> None:
    """The node of each stage the run goes through (the module docstring's rule), and the keys
    of other nodes those stages read."""
    for name in run_stages(cfg):
        spec = registry.get(name)
        for key in spec.also_reads:
            if key.endswith("."):  # a generation node
                _check_generation(cfg, key[:-1])
            else:
                _positive(cfg, key)
        if spec.node_check:
            registry.load(spec.node_check)(cfg)

def check(cfg: DictConfig) -> None:
    """Everything composition cannot catch, before any heavy work: no unknown top-level key
    (a `+key=...` Hydra lets through), then validate()."""
    from rlhf_exp.config.schema import root_nodes

    known = root_nodes() | {"hydra"}
    for key in cfg:
        if key not in known:
            raise ConfigError(f"unknown top-level key {key!r}; allowed: "
                              f"{', '.join(sorted(known - {'hydra'}))}")
    validate(cfg)
