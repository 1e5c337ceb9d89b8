"""`rlhf-exp --help`: the app, how to call it, and its config groups, one line each.

The options listed are those the run would see (the app's `conf/` plus a user's folder given
with --config-dir or hydra.searchpath), so a user's own presets show up too. Hydra's own page
stays at `rlhf-exp --hydra-help`.
"""

from __future__ import annotations

from rlhf_exp import registry
from rlhf_exp.command import composition

# group -> what choosing one of its options decides (README: "Config groups"); the stages'
# nodes (sft, reward, ppo, grpo, dpo, eval, chat) are described by the stage registry
GROUPS = {
    "stage": "which runner: pipeline or one stage",
    "model": "base model (hub id or local dir), LoRA",
    "data_mix": "data sources, weights, stage split",
    "hardware": "device, precision, ranks, launcher",
    "zero_stage": "DeepSpeed ZeRO stage and offload",
    "logger": "W&B (offline by default) or none",
    "experiment": "a preset for a whole run",
    "hparams_search": "an Optuna search (runs as -m)",
}

HEADER = """\
rlhf-exp: RLHF experiments on DeepSpeed and Hugging Face transformers (SFT, reward model, PPO,
GRPO/RLOO, DPO, chained as a pipeline), composed with Hydra from config groups; every key can be
overridden on the command line.

usage:
  rlhf-exp [group=option ...] [key=value ...]   one run (default: the pipeline, tiny model, CPU)
  rlhf-exp -m key=a,b [group=x,y ...]           a sweep: one job per combination
  rlhf-exp ... --cfg job                        print the composed config, run nothing
  rlhf-exp --config-dir DIR ...                 also use your own options: DIR/<group>/<name>.yaml
"""

FOOTER = """\
keys: key=value sets any key (seed=7 sft.lr=3e-4 hardware.nproc_per_node=2); `rlhf-exp --cfg job`
lists them all, conf/<group>/*.yaml documents them.
your own options: --config-dir DIR or hydra.searchpath=[file://DIR] (README: "Your own project").
more: README.md and docs/; Hydra's own flags: rlhf-exp --hydra-help"""


def text(inv: composition.Invocation) -> str:
    """The help page for this command line's search path (its overrides are not applied: a
    mistake in them must not hide the help)."""
    try:
        cfg = composition.compose(inv, [o for o in inv.overrides
                                        if o.split("=", 1)[0] == "hydra.searchpath"])
    except Exception as exc:  # noqa: BLE001 - a broken search path still gets a help page
        return f"{HEADER}\n(config groups unavailable: {exc})\n\n{FOOTER}"
    repo = composition.repository(cfg)
    choices = cfg.hydra.runtime.choices
    from hydra.core.object_type import ObjectType

    groups = [g for g in repo.get_group_options("", results_filter=ObjectType.GROUP)
              if g != "hydra"]
    described = {**GROUPS, **registry.help_lines()}
    ordered = [g for g in described if g in groups] + sorted(g for g in groups
                                                             if g not in described)
    lines = ["config groups (group=option, * = default):"]
    for group in ordered:
        default = choices.get(group)
        opts = [f"{o}*" if o == default else o for o in composition.options(repo, group)]
        lines.append(f"  {group:<15} {described.get(group, 'your own group'):<38} "
                     f"{', '.join(opts)}")
    return "\n".join([HEADER, *lines, "", FOOTER])
