"""The reward-hacking alarm at work (docs/alarm.md, docs/alarm.png): PPO against a weak reward
model, once with the KL term off and once with the default KL, on the tiny model.

    python bench/plot_alarm.py                      # docs/alarm.png, the table on stdout
    python bench/plot_alarm.py --seed 7 --out /tmp/alarm_seed7.png

Steps (all real runs, W&B offline in a temp dir): SFT (40 steps), a reward model trained
`--rm-steps` steps only (weak: it ranks the SFT policy's answers barely better than chance),
then PPO from them for `--steps` steps, held-out eval every 5 steps on 64 prompts, the alarm
at its defaults (`ppo.alarm.action=warn`, so both curves run to the end): `ppo.kl.coef=0`, then
the default `ppo.kl.coef`. The plot: held-out gold reward and the proxy (the reward model's
held-out score) against the step, the step the proxy_gold alarm fired at marked.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = "data_mix.sources.0.synthetic.num_examples=3000"
PPO = ["ppo.eval_every=5", "ppo.eval_num_prompts=64", "ppo.eval_batch_size=64",
       "ppo.rollout_batch_size=16", "ppo.micro_batch_size_per_device=16",
       "logger.table_every=0", "logger.log_checkpoints=false"]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf_exp.cli import CONF_DIR, check

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    check(cfg)
    return cfg


def curves(run_dir: Path) -> dict[str, list[float]]:
    """step, gold, proxy of every held-out eval of a PPO run (read back from its W&B run)."""
    from rlhf_exp.training.wandb_reader import read_runs

    (run,) = read_runs(run_dir / "wandb")
    rows = [r for r in run.history if "ppo/eval_gold_reward" in r]
    return {"step": [r["ppo/step"] if "ppo/step" in r else 0 for r in rows],
            "gold": [r["ppo/eval_gold_reward"] for r in rows],
            "proxy": [r["ppo/eval_reward_score"] for r in rows]}


def plot(runs: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True)
    for ax, (label, r) in zip(axes, runs.items()):
        c = r["curves"]
        ax.plot(c["step"], c["gold"], "o-", color="tab:green", label="held-out gold reward")
        ax.set_xlabel("PPO step")
        ax.set_title(label)
        twin = ax.twinx()
        twin.plot(c["step"], c["proxy"], "s--", color="tab:blue",
                  label="proxy: reward model's held-out score")
        twin.set_ylabel("proxy (reward-model score)", color="tab:blue")
        fired = r["alarms"].get("proxy_gold")
        if fired is not None:
            ax.axvline(fired, color="tab:red", lw=2)
            ax.text(fired, max(c["gold"]), f" proxy_gold alarm\n step {fired}",
                    color="tab:red", va="top")
    lines, more = axes[0].get_legend_handles_labels(), fig.axes[-1].get_legend_handles_labels()
    fig.legend(lines[0] + more[0], lines[1] + more[1], loc="lower center", ncol=2, fontsize=9)
    axes[0].set_ylabel("held-out gold reward", color="tab:green")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--rm-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "alarm.png")
    args = p.parse_args()

    from rlhf_exp.stages import ppo, reward, sft

    work = Path(tempfile.mkdtemp(prefix="plot_alarm_"))
    os.environ.setdefault("RLHF_EXP_CACHE", str(work / "cache"))
    common = [DATA, f"seed={args.seed}", "experiment_name=alarm_demo"]
    sft.train(compose("stage=sft", *common, "sft.max_steps=40", "sft.eval_every=0"),
              work / "sft")
    reward.train(compose("stage=reward", *common, f"reward.max_steps={args.rm_steps}",
                         "reward.eval_every=0", f"reward.init_from={work / 'sft'}"),
                 work / "reward")
    runs = {}
    for label, kl in (("KL off (ppo.kl.coef=0)", ["ppo.kl.coef=0"]),
                      ("default KL (ppo.kl.coef=0.1)", [])):
        run_dir = work / f"ppo_{len(runs)}"
        _, _, result = ppo.train(compose("stage=ppo", *common, *PPO, f"ppo.steps={args.steps}",
                                         f"ppo.actor_init={work / 'sft'}",
                                         f"ppo.critic_init={work / 'reward'}", *kl), run_dir)
        runs[label] = {"curves": curves(run_dir), "alarms": result.alarms}
    plot(runs, args.out)
    print(f"\n# seed {args.seed}, reward model {args.rm_steps} steps, PPO {args.steps} steps; "
          f"plot: {args.out}")
    for label, r in runs.items():
        c = r["curves"]
        print(f"\n{label}: alarms {r['alarms'] or 'none'}\n")
        print("| step | gold | proxy |\n|---:|---:|---:|")
        for s, g, x in zip(c["step"], c["gold"], c["proxy"]):
            print(f"| {s} | {g:.3f} | {x:.4f} |")


if __name__ == "__main__":
    main()
