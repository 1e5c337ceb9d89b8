"""Preflight: what a run's config points at, checked before anything runs.

`validate()` (rlhf_exp/config/validate.py) judges the config on its own; preflight checks what
it points at, in the filesystem and the environment. The dispatcher calls `before_hydra` before
Hydra writes the run dir, so a mistake stops the run with one line and exit code 2 before any
model loads, before a W&B run exists and without touching an existing run dir; each job of a
multirun calls `preflight` again when it starts. The checks, cheap ones first:

    1. output dir        hydra.run.dir (or the sweep dir) can be created; so can the caches;
                         an existing run dir is of this stage (checked last)
    2. launch            multi-node rendezvous; hardware.device=cuda needs enough visible GPUs;
                         model.attn_implementation is one transformers knows
    3. base models       model.path / reward_path / tokenizer_path, those this stage loads: a
                         model dir, or a hub id in the local HF cache (else one short request)
    4. starting points   each stage's start keys (rlhf_exp/registry.py: sft.init_from,
                         ppo.actor_init, ...), eval.from_run/policies/reward_model/reference
    5. data              every source loads (local paths exist), and each stage that runs
                         passes its input check (StageSpec.input_check): pairs for the reward
                         and dpo stages, one global batch (sft, reward, dpo), one rollout
                         (ppo, grpo)
    6. chat stdin        piped text is UTF-8 without control characters (read here, once)
    7. search space      multirun with the Optuna sweeper: n_trials, each distribution, and
                         both ends / every choice of each key compose and validate
    +  rlhf_exp/command/preflight_checks.py: each starting point is of the kind its key loads, the
                         models scoring the policy's tokens share its tokenizer, DPO keeps a
                         pair under overlong=drop, an existing run dir holds this very run

Every failure is a UserError naming the key (or file) and what to change.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp import registry
from rlhf_exp.command import preflight_checks, stdin_prompt
from rlhf_exp.errors import UserError

# A hub id: "name" or "org/name" (huggingface_hub's rules, without the length limit)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")
HUB_TIMEOUT_S = 10  # one request, no retries: offline answers at once instead of after ~1 min


# ----------------------------------------------------------------------------- entry points
def before_hydra(cfg: DictConfig, argv: list[str], compose) -> None:
    """From the dispatcher, before Hydra starts: `cfg` is the run composed as Hydra will compose
    it, with its `hydra` node (for a multirun: the first value of each swept key); `compose`
    composes a list of overrides the same way (the user's config folders included)."""
    multirun = "-m" in argv or "--multirun" in argv
    if cfg.hardware.launcher == "submitit" and not multirun:
        raise UserError("hardware.launcher=submitit runs only as the tasks of a submitit job: add "
                        "-m and hydra/launcher=submitit_slurm (or submitit_local), e.g. "
                        "rlhf-exp -m hardware=slurm ...")
    if multirun:
        check_output_dir(str(cfg.hydra.sweep.dir), "hydra.sweep.dir")
        check_sources(cfg)
        check_search_space(compose, cfg, [a for a in argv if not a.startswith("-") and not
                                          a.lstrip("+~").startswith(("hydra.", "hydra/"))])
        return
    preflight(cfg, Path(str(cfg.hydra.run.dir)))


def preflight(cfg: DictConfig, run_dir: Path, run_dir_stage: str | None = None) -> None:
    """Every check of the module docstring on one composed, validated run config;
    `run_dir_stage`: the stage whose run `run_dir` holds, when not cfg's own (an arm of
    stage=algorithms is checked as its pipeline, but its folder holds its last stage's run)."""
    from rlhf_exp.config import check_rendezvous

    check_output_dir(str(run_dir), "hydra.run.dir")
    check_caches(cfg)
    check_rendezvous(cfg)
    check_hostfile(cfg)
    if not cfg.hardware.dry_run:  # a dry run only prints the command (often on a login node)
        check_device(cfg)
    check_attention(cfg)
    for key, ref in base_models(cfg):
        check_model_source(key, ref, tokenizer=not cfg.model.tokenizer_path)
    if cfg.model.tokenizer_path:
        check_model_source("model.tokenizer_path", cfg.model.tokenizer_path, model=False)
    for key, ref in starting_points(cfg):
        check_starting_point(key, ref, cfg)
    check_sources(cfg)
    check_data(cfg)
    preflight_checks.check_inputs(cfg, starting_points(cfg), _stages(cfg))
    stdin_prompt.clear()
    if cfg.stage.name == "chat" and cfg.chat.prompt is None and sys.stdin is not None \
            and not sys.stdin.isatty():
        stdin_prompt.read_ahead(sys.stdin.buffer)
    check_run_dir(cfg, run_dir, run_dir_stage)
    preflight_checks.check_run_dir_owner(cfg, run_dir, run_dir_stage)


# ----------------------------------------------------------------------------- 1. folders
def check_output_dir(path: str, key: str) -> None:
    """`path` is a writable folder, or one that can be created (nothing is left behind: where
    it would be made, an empty probe dir is created and removed)."""
    target = Path(path).expanduser()
    target = target if target.is_absolute() else Path.cwd() / target
    fix = f"set {key}=<a writable folder>" + (" or launch from a writable directory"
                                              if not Path(path).expanduser().is_absolute() else "")
    long = next((p for p in target.parts if len(p.encode()) > 255), None)
    if long is not None:
        raise UserError(f"{key}={path}: the name {long[:40]}... is longer than 255 bytes; {fix}")
    existing = target
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise UserError(f"{key}={path}: cannot be created: {existing} is a broken link; {fix}")
    if not existing.is_dir():
        raise UserError(f"{key}={path}: cannot be created: {existing} is a file, not a folder; "
                        f"{fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == target else f"cannot be created ({existing} " \
            "is not writable)"
        raise UserError(f"{key}={path}: {what}; {fix}")
    if existing != target:  # root passes os.access everywhere: try it (an empty dir, removed)
        import tempfile

        try:
            os.rmdir(tempfile.mkdtemp(prefix=".rlhf-exp-probe-", dir=existing))
        except OSError as exc:
            raise UserError(f"{key}={path}: cannot be created in {existing} "
                            f"({exc.strerror or exc}); {fix}") from None


def _recorded_stage(run_dir: Path) -> str | None:
    """The stage a run dir belongs to: its result.json, else its saved config."""
    result = run_dir / "result.json"
    try:
        if result.is_file():
            return json.loads(result.read_text()).get("stage")
        for saved in (run_dir / "config_resolved.yaml", run_dir / ".hydra" / "config.yaml"):
            if saved.is_file():
                return OmegaConf.select(OmegaConf.load(saved), "stage.name")
    except Exception:  # unreadable: not ours to judge
        return None
    return None


def check_run_dir(cfg: DictConfig, run_dir: Path, stage: str | None = None) -> None:
    """An existing run dir is one of this stage: a run of another stage would overwrite its
    config, result and checkpoints. A training checkpoint there (or in `resume`) that this run
    would continue must be of this stage and from as many ranks (ZeRO shards per rank)."""
    from rlhf_exp.training import resume

    run_dir, stage = Path(run_dir), stage or cfg.stage.name
    owner = _recorded_stage(run_dir) if run_dir.is_dir() else None
    if owner and owner != stage:
        raise UserError(f"hydra.run.dir={run_dir} holds a {owner} run; a {stage} run there would "
                        "overwrite its files: give a new hydra.run.dir (or leave it unset)")
    world = cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    dirs = ([(s, run_dir / s) for s in _stages(cfg)] if stage in ("pipeline", "algorithms")
            else [(stage, run_dir)])
    for name, where in dirs:
        if not registry.get(name).resumable:  # no training checkpoints to continue
            continue
        sources = [where] + ([Path(cfg.resume).expanduser()] if cfg.resume else [])
        ckpt = next((c for c in map(resume.latest, sources) if c is not None), None)
        if ckpt is None:
            continue
        state = resume.read_state(ckpt)
        if state.get("stage") != name:
            raise UserError(f"{ckpt}: a training checkpoint of stage {state.get('stage')!r}, "
                            f"which a {name} run cannot continue; give a new hydra.run.dir")
        if state.get("world_size") != world:
            raise UserError(f"{ckpt} was saved by {state.get('world_size')} ranks, this run has "
                            f"{world}: resume with the same hardware.nproc_per_node x "
                            "hardware.nnodes (ZeRO shards the optimizer state per rank)")


def check_caches(cfg: DictConfig) -> None:
    """The tokenized-data cache and RLHF_EXP_CACHE (the tiny model, the data cache's default
    place, the offline artifact index) can be written; chat writes neither unless it builds the
    tiny model."""
    from rlhf_exp.modeling.models import cache_root

    if cfg.data_mix.cache and cfg.data_mix.cache_dir and cfg.stage.name != "chat":
        from rlhf_exp.data import resolve_path

        check_output_dir(str(resolve_path(str(cfg.data_mix.cache_dir))), "data_mix.cache_dir")
    if cfg.stage.name != "chat" or not cfg.model.path:
        check_output_dir(str(cache_root()), "RLHF_EXP_CACHE")


# ----------------------------------------------------------------------------- 2. launch
def check_device(cfg: DictConfig) -> None:
    """hardware.device=cuda: enough visible GPUs for the ranks of this node, and bf16 where
    asked."""
    hw = cfg.hardware
    if hw.device != "cuda" or hw.launcher == "submitit":  # submitit: checked in the job
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "this torch is a CPU build" if torch.version.cuda is None else \
            "torch.cuda.is_available() is False"
        raise UserError(f"hardware.device=cuda but no CUDA GPU is usable here ({why}); use "
                        "hardware=cpu, or run on a machine with a GPU")
    if hw.nproc_per_node > count:
        raise UserError(f"hardware.nproc_per_node={hw.nproc_per_node} but this machine shows "
                        f"{count} GPU(s); set hardware.nproc_per_node<={count} (or check "
                        "CUDA_VISIBLE_DEVICES)")
    if hw.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("hardware.precision=bf16 but this GPU has no bf16 support; use "
                        "hardware.precision=fp16 or fp32")


def check_attention(cfg: DictConfig) -> None:
    """model.attn_implementation: one transformers knows (or a hub kernel, org/name), and
    flash attention only on cuda."""
    name = str(cfg.model.attn_implementation)
    if "/" in name:  # a kernel from the hub (transformers' `kernels` integration)
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known:
        raise UserError(f"model.attn_implementation={name!r} is not an attention "
                        f"implementation; choose one of: {', '.join(known)}")
    if name.startswith("flash_attention") and cfg.hardware.device != "cuda":
        raise UserError(f"model.attn_implementation={name} needs hardware.device=cuda; use sdpa "
                        "or eager on cpu")


# ----------------------------------------------------------------------------- 3. base models
def _stages(cfg: DictConfig) -> list[str]:
    from rlhf_exp.config import run_stages

    return run_stages(cfg)


def base_models(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, value) of the model.path / model.reward_path this run loads. A stage that starts
    from a checkpoint, or from the stage before it in a pipeline, does not load its base; the
    tiny model (path null) is built locally."""
    stages, m = _stages(cfg), cfg.model
    bases = {base for name, key, base in _unset_starts(cfg, stages) if base}
    policy = "policy" in bases or (cfg.stage.name == "eval" and cfg.eval.include_base)
    reward = "reward" in bases
    refs, path = [], m.path
    if path and m.get("fetch") and (policy or (reward and not m.reward_path)):
        # hub or fetched copy; neither: names fetch
        from rlhf_exp.modeling.models import resolve_base_path

        path = resolve_base_path(m)
    if policy and path:
        refs.append(("model.path", str(path)))
    if reward and (m.reward_path or path):
        refs.append(("model.reward_path", str(m.reward_path)) if m.reward_path
                    else ("model.path", str(path)))
    return list(dict.fromkeys(refs))


def _unset_starts(cfg: DictConfig, stages: list[str]) -> list[tuple[str, str, str | None]]:
    """(stage, key, base) of each start key (StartKey) the stages leave unset and no earlier
    stage of the chain hands over: the stage then starts from its base model (`base`)."""
    out = []
    for i, name in enumerate(stages):
        before = stages[:i]
        for start in registry.get(name).starts:
            handed = (start.handoff == "policy" and any(
                registry.get(s).trains_policy for s in before)) or start.handoff in before
            if not OmegaConf.select(cfg, start.key) and not handed:
                out.append((name, start.key, start.base))
    return out


def _is_local(ref: str) -> bool:
    """A path rather than a hub id or W&B artifact name: it exists, is spelled like a path, or
    its parent folder exists (a typo in the last part is still a path)."""
    path = Path(ref).expanduser()
    return (ref.startswith(("/", ".", "~")) or path.exists()
            or (len(path.parts) > 1 and path.parent.is_dir()))


def check_model_source(key: str, ref: str, tokenizer: bool = True, model: bool = True) -> None:
    """A local model dir (config.json, or a LoRA adapter whose base is there too) with a
    tokenizer, or a hub id that is cached or reachable."""
    if _is_local(ref) or not HUB_ID.match(ref):
        check_model_dir(key, ref, tokenizer=tokenizer, model=model)
    else:
        _check_hub_model(key, ref)


def check_model_dir(key: str, ref: str, tokenizer: bool = True, model: bool = True) -> None:
    path = Path(ref).expanduser()
    what = "a model dir (with config.json)" if model else "a tokenizer dir"
    if not path.exists():
        raise UserError(f"{key}={ref}: no such directory; give {what} or a hub id")
    if not path.is_dir():
        raise UserError(f"{key}={ref}: is a file; give {what}")
    if model:
        config, adapter = path / "config.json", path / "adapter_config.json"
        if not config.is_file() and not adapter.is_file():
            raise UserError(f"{key}={ref}: not a model dir (no config.json or "
                            "adapter_config.json in it)")
        try:
            json.loads((config if config.is_file() else adapter).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{key}={ref}: {(config if config.is_file() else adapter).name} is "
                            f"not readable JSON ({exc})") from None
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"{key}={ref}: holds no weights (*.safetensors or *.bin); is the "
                            "download or the copy complete?")
        if not config.is_file():
            _check_adapter_base(key, adapter)
    if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{key}={ref}: holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
                        "; add one, or set model.tokenizer_path")


def check_hostfile(cfg: DictConfig) -> None:
    """hardware.hostfile (deepspeed's launcher, several nodes) is a file here; `~` expands, as
    the launch command passes it expanded (rlhf_exp/command/launch.py)."""
    hostfile = cfg.hardware.hostfile
    if hostfile and not Path(hostfile).expanduser().is_file():
        raise UserError(f"hardware.hostfile={hostfile}: no such file")


def _check_adapter_base(key: str, adapter: Path) -> None:
    """A LoRA adapter checkpoint is rebuilt on its base model: that must exist too."""
    try:
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: {adapter} is unreadable ({exc})") from None
    if not base:
        raise UserError(f"{key}: {adapter} names no base_model_name_or_path (the model the "
                        "adapter belongs to)")
    check_model_source(f"{key} (the base of its LoRA adapter)", str(base), tokenizer=False)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _check_hub_model(key: str, ref: str) -> None:
    """Cached: fine. Not cached: offline says so at once; online one request (no retries)
    tells a missing model from an unreachable hub."""
    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(ref, f), str)
           for f in ("config.json", "adapter_config.json")):
        return
    where = (f"{key}={ref}: no such local directory, and not in the Hugging Face cache "
             f"({constants.HF_HUB_CACHE})")
    fix = f"download it once with network access (hf download {ref}), or give a local model dir"
    if _hub_offline():
        raise UserError(f"{where}; the hub is off (HF_HUB_OFFLINE): {fix}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(ref, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise UserError(f"{key}={ref}: no such local directory, and no such model on the "
                        "Hugging Face hub (a private one needs `hf auth login`)") from None
    except Exception as exc:  # network: DNS, refused, timeout, proxy, 5xx
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"{where}, and the hub is unreachable ({reason}): {fix}") from None


# ----------------------------------------------------------------------------- 4. starting points
def starting_points(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, reference) of every checkpoint this run starts from, as the user gave them (a
    pipeline fills the later stages' from the earlier ones' outputs itself)."""
    refs = []
    for stage in _stages(cfg):
        keys = registry.get(stage).start_keys
        refs += [(k, str(OmegaConf.select(cfg, k))) for k in keys if OmegaConf.select(cfg, k)]
    if cfg.stage.name == "eval":
        refs += _eval_references(cfg)
    return refs


def _eval_references(cfg: DictConfig) -> list[tuple[str, str]]:
    """stage=eval: its explicit policies, reward model and reference, and what eval.from_run
    finds (the stage resolves them the same way)."""
    ev = cfg.eval
    if not any(ev.policies.values()) and not ev.from_run and not ev.include_base:
        raise UserError("stage=eval has no policy to evaluate: set eval.from_run=<pipeline run "
                        "dir>, eval.policies.<name>=<path or artifact>, or eval.include_base=true")
    refs = [(f"eval.policies.{name}", str(ref)) for name, ref in ev.policies.items() if ref]
    names = {str(n) for n, ref in ev.policies.items() if ref} | (
        {"base"} if ev.include_base else set())
    if ev.from_run:
        from rlhf_exp.stages.eval import discover_run

        found = discover_run(str(ev.from_run))  # a UserError naming eval.from_run
        refs += [(f"eval.from_run={ev.from_run} ({name})", path)
                 for name, path in found.policies.items() if name not in names]
        names |= set(found.policies)
        if found.reward_model and not ev.reward_model:
            refs.append((f"eval.from_run={ev.from_run} (reward model)", str(found.reward_model)))
    if ev.reward_model:
        refs.append(("eval.reward_model", str(ev.reward_model)))
    if ev.reference and str(ev.reference) not in names:
        refs.append(("eval.reference", str(ev.reference)))
    return refs


def _online(cfg: DictConfig) -> bool:
    return cfg.logger.name == "wandb" and \
        os.environ.get("WANDB_MODE", cfg.logger.mode) == "online"


def check_starting_point(key: str, ref: str, cfg: DictConfig) -> None:
    """A checkpoint dir, a run dir (its checkpoints/final) or a W&B artifact name, resolved as
    the stage will (rlhf_exp/training/tracking.py resolve_init). Online, an artifact name that is
    not in the local index is left to W&B (fetched when the run starts)."""
    from rlhf_exp.training.tracking import InitError, resolve_init

    try:
        path, _ = resolve_init(ref, None)
    except InitError as exc:
        if Path(ref).expanduser().exists():  # there, but neither a checkpoint nor a run dir
            raise UserError(f"{key}={exc}") from None
        if _is_local(ref):
            raise UserError(f"{key}={ref}: no such checkpoint or run dir") from None
        if _online(cfg):
            return
        raise UserError(f"{key}={exc}") from None
    check_model_dir(key, str(path), tokenizer=not cfg.model.tokenizer_path)


# ----------------------------------------------------------------------------- 5. data
def check_sources(cfg: DictConfig) -> None:
    """Each local source's path is there and of a type we read; a hub source given a local
    copy has it (the rows themselves are checked when they load, in check_data)."""
    from rlhf_exp.data.sources import LOCAL_SUFFIXES, local_hub_dir, resolve_path

    if cfg.stage.name == "chat":
        return
    for i, src in enumerate(cfg.data_mix.sources):
        key = f"data_mix.sources[{i}]"
        if src.kind == "hub" and src.path:
            try:
                local_hub_dir(str(src.path))  # a local copy that is not there fails here
            except UserError as exc:
                raise UserError(f"{key}.path={exc}") from None
        if src.kind != "local":
            continue
        try:
            path = resolve_path(str(src.path))
        except UserError as exc:
            raise UserError(f"{key}.path: {exc}") from None
        if not path.exists():
            raise UserError(f"{key}.path={src.path!r}: no such file or folder ({path}); "
                            "relative paths start from the directory you launched in")
        if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{key}.path={src.path!r}: unsupported file type "
                            f"{path.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")


def check_data(cfg: DictConfig) -> None:
    """Every source loads (bad rows are DataErrors naming file and line) and each stage that
    runs gets what it needs: its input check (StageSpec.input_check, below)."""
    for name in _stages(cfg):
        hook = registry.get(name).input_check
        if hook:
            registry.load(hook)(cfg, name)


def _world(cfg: DictConfig) -> int:
    return cfg.hardware.nproc_per_node * cfg.hardware.nnodes


def stage_data(cfg: DictConfig, stage: str):
    """The rows of the share of data_mix.split the stage reads (dpo: the reward share's)."""
    from rlhf_exp.data import build_stage_data

    return build_stage_data(cfg.data_mix, registry.get(stage).shares[0], cfg.seed)


def check_eval_data(cfg: DictConfig, stage: str) -> None:
    """stage=eval: the held-out prompts it compares the policies on."""
    if cfg.eval.from_run and cfg.eval.match_run:
        return  # the run's own data_mix is used: it loaded when that run ran
    if not stage_data(cfg, stage).eval:
        raise UserError(f"stage=eval: the ppo share's held-out slice is empty; raise "
                        f"data_mix.eval_fraction (now {cfg.data_mix.eval_fraction})")


def check_loop_data(cfg: DictConfig, name: str) -> None:
    """A train-loop stage (sft, reward, dpo): at least one global batch of rows (pairs for a
    stage on the reward share)."""
    from rlhf_exp.data.mix import require_pairs

    world = _world(cfg)
    data = stage_data(cfg, name)
    node = cfg[name]
    pairs = registry.get(name).shares[0] == "reward"
    rows = len(data.train) - (require_pairs(data, cfg.data_mix, name) if pairs else 0)
    batch = node.micro_batch_size_per_device * node.gradient_accumulation_steps * world
    if rows < batch:
        unit = "pairs" if pairs else "examples"
        raise UserError(f"{name}: the data gives {rows} training {unit}, fewer than one "
                        f"global batch of {batch} ({name}.micro_batch_size_per_device x "
                        f"{name}.gradient_accumulation_steps x {world} ranks); lower "
                        "them or add data")


def check_dpo_data(cfg: DictConfig, name: str) -> None:
    """DPO: one global batch of pairs, and under data_mix.overlong=drop at least one training
    pair within dpo.max_len / max_prompt_len, counted with the policy's tokenizer (the stage's
    tokenization, its cache shared)."""
    from rlhf_exp.data import cache_dir as data_cache_dir
    from rlhf_exp.data.tokenize import tokenize_pairs

    check_loop_data(cfg, name)
    if cfg.data_mix.overlong != "drop":
        return
    dc = cfg[name]
    tokenizer = preflight_checks.policy_tokenizer(cfg, name, _stages(cfg))
    kept, dropped = tokenize_pairs(stage_data(cfg, name).train, tokenizer,
                                   cfg.model.prompt_template, dc.max_prompt_len, dc.max_len,
                                   "drop", data_cache_dir(cfg.data_mix))
    if not kept:
        raise UserError(f"{name}: all {dropped} training pairs are longer than {name}.max_len="
                        f"{dc.max_len} / max_prompt_len={dc.max_prompt_len} and "
                        "data_mix.overlong=drop; raise the limits or use overlong=truncate")


def check_kto_data(cfg: DictConfig, name: str) -> None:
    """KTO: the reward share gives at least one global batch of unpaired rows (a pair gives
    two), and under data_mix.overlong=drop at least one within kto.max_len / max_prompt_len
    (the stage's tokenization, its cache shared)."""
    from rlhf_exp.data import cache_dir as data_cache_dir
    from rlhf_exp.data.unpaired import tokenize_unpaired, unpaired_rows

    kc, world = cfg[name], _world(cfg)
    rows = unpaired_rows(stage_data(cfg, name).train)
    batch = kc.micro_batch_size_per_device * kc.gradient_accumulation_steps * world
    if len(rows) < batch:
        raise UserError(f"{name}: the reward share gives {len(rows)} unpaired training rows (a "
                        "preference pair gives two; formats preference, hh, chat with "
                        f"chosen/rejected, or unpaired), fewer than one global batch of {batch} "
                        f"({name}.micro_batch_size_per_device x "
                        f"{name}.gradient_accumulation_steps x {world} ranks)")
    if cfg.data_mix.overlong != "drop":
        return
    tokenizer = preflight_checks.policy_tokenizer(cfg, name, _stages(cfg))
    kept, dropped = tokenize_unpaired(rows, tokenizer, cfg.model.prompt_template,
                                      kc.max_prompt_len, kc.max_len, "drop",
                                      kc.micro_batch_size_per_device,
                                      data_cache_dir(cfg.data_mix))
    if not kept:
        raise UserError(f"{name}: all {dropped} training rows are longer than {name}.max_len="
                        f"{kc.max_len} / max_prompt_len={kc.max_prompt_len} and "
                        "data_mix.overlong=drop; raise the limits or use overlong=truncate")


def check_ppo_data(cfg: DictConfig, name: str) -> None:
    """PPO: its reward functions work on real rows, one rollout of prompts, and SFT rows for
    the ptx term."""
    from rlhf_exp.data import build_stage_data

    world, pc = _world(cfg), cfg.ppo
    data = stage_data(cfg, name)
    if pc.reward_functions:
        from rlhf_exp.rl import rewards

        rewards.load(pc.reward_functions, "ppo.reward_functions", data.train[:4])
    if len(data.train) < pc.rollout_batch_size:
        raise UserError(f"ppo: the data_mix's ppo share has {len(data.train)} prompts, "
                        f"fewer than ppo.rollout_batch_size={pc.rollout_batch_size}")
    if pc.ptx_coef > 0:
        sft_rows = build_stage_data(cfg.data_mix, "sft", cfg.seed).train
        micro = min(pc.micro_batch_size_per_device,
                    pc.rollout_batch_size // (pc.num_minibatches * world))
        if len(sft_rows) < world * micro:
            raise UserError(f"ppo.ptx_coef={pc.ptx_coef} needs SFT examples: the "
                            f"data_mix's sft share has {len(sft_rows)}, fewer than "
                            f"{world * micro} (one micro-batch per rank)")


def check_grpo_data(cfg: DictConfig, name: str) -> None:
    """GRPO: see _check_grpo_data (a pipeline with a reward stage hands GRPO its model)."""
    _check_grpo_data(cfg, stage_data(cfg, name).train,
                     handed_a_reward_model=any(s in registry.reward_model_stages()
                                               for s in _stages(cfg)))


def _check_grpo_data(cfg: DictConfig, rows: list[dict], handed_a_reward_model: bool) -> None:
    """Enough prompts for one step, and rewards that work on these rows (the default reward is
    the task's gold reward; a pipeline with a reward stage hands GRPO its reward model)."""
    from rlhf_exp.rl import rewards
    from rlhf_exp.stages import grpo

    if len(rows) < cfg.grpo.prompts_per_step:
        raise UserError(f"grpo: the data_mix's ppo share has {len(rows)} prompts, fewer than "
                        f"grpo.prompts_per_step={cfg.grpo.prompts_per_step}")
    if handed_a_reward_model and cfg.grpo.reward_functions is None:
        return  # the reward model the pipeline trains is the reward
    grpo.check_default_reward_fits(cfg, rows[:4])
    rewards.load(grpo.reward_function_nodes(cfg), "grpo.reward_functions", rows[:4])


# ----------------------------------------------------------------------------- 6. chat stdin
read_piped_prompt = stdin_prompt.read_piped_prompt  # the check, where it was


# ----------------------------------------------------------------------------- 7. search space
def check_search_space(compose, cfg: DictConfig, arguments: list[str]) -> None:
    """A multirun with the Optuna sweeper (hydra_plugins/rlhf_exp_optuna_sweeper): its settings,
    each distribution, and every choice / both ends of every interval as a composed, validated
    config, before the first trial starts."""
    sweeper = cfg.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("OptunaSweeper"):
        return
    from hydra_plugins.rlhf_exp_optuna_sweeper.optuna_sweeper import (
        check_settings,
        probe_values,
        search_space,
    )
    from rlhf_exp.config import check

    check_settings(sweeper.direction, sweeper.n_trials, sweeper.n_jobs)
    params = OmegaConf.to_container(sweeper.params, resolve=True) if sweeper.params else {}
    space, fixed = search_space(params, arguments)
    for key, dist in space.items():
        for value in probe_values(dist):
            # a composition error (unknown key, wrong type) goes up as it is: the dispatcher
            # words it as one line
            cfg = compose([*fixed, f"{key}={value}"])
            try:
                check(cfg)
            except UserError as exc:
                raise UserError(f"Optuna search space {key} at {value}: {exc}") from None
