"""A user's own install: the wheel in a fresh virtual environment, run from an empty directory
on presets kept in the user's own folder, with one and with two ranks."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from tests.conftest import CHILD_DROP_ENV, ROOT, make_user_conf

SHIPPED = ("rlhf_exp/conf/config.yaml", "rlhf_exp/conf/experiment/demo.yaml",
           "rlhf_exp/conf/hydra/sweeper/optuna.yaml", "rlhf_exp/data/examples/sort_pairs.jsonl",
           "hydra_plugins/rlhf_exp_optuna_sweeper/optuna_sweeper.py",
           # the tiny families and the hub-schema samples (also the tiny tokenizers' corpus)
           "rlhf_exp/conf/model/tiny-gpt2.yaml", "rlhf_exp/conf/data_mix/trl_conversational.yaml",
           "rlhf_exp/data/examples/hub_samples/hh_rlhf/helpful-base/train.jsonl",
           "rlhf_exp/data/examples/hub_samples/rm_static/data/train-00000-of-00001.parquet",
           "rlhf_exp/data/examples/hub_samples/ultrafeedback_binarized/dataset_dict.json",
           "rlhf_exp/data/examples/hub_samples/ultrafeedback_binarized/train_prefs/"
           "data-00000-of-00001.arrow", "rlhf_exp/data/examples/instructions/pairs.jsonl")


def clean_copy(dest: Path) -> Path:
    """The checkout's files as a clone has them (tracked, or new and not ignored): pip builds in
    the source tree, and a build/ left there must not end up in later wheels."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src, dst = ROOT / rel, dest / rel
        if not src.exists() and not src.is_symlink():  # deleted, not yet committed
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)  # conf -> rlhf_exp/conf stays a link
    return dest


def build_wheel(out: Path, source: Path) -> Path:
    """`pip wheel` of `source`. Offline with the setuptools that `make setup` installs (dev
    extra); with an older one (< 68 cannot build wheels alone) pip fetches a newer one."""
    offline = int(version("setuptools").split(".")[0]) >= 68
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           *(["--no-build-isolation"] if offline else []), "-w", str(out),
                           str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("rlhf_exp-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's installed dependencies (torch & co.,
    through a .pth file: no download) but not this checkout; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    # directories only: the .pth files in them (this checkout's editable install) stay unread
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    return python


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_a_user_preset_on_one_and_two_ranks(tmp_path):
    wheel = build_wheel(tmp_path / "dist", clean_copy(tmp_path / "clone"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names, sorted(names)
    python = fresh_venv(tmp_path / "venv")
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--ignore-installed", str(wheel)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exe = tmp_path / "venv" / "bin" / "rlhf-exp"

    work = tmp_path / "empty"  # the user's shell: no checkout, no conf/ here
    work.mkdir()
    conf = make_user_conf(tmp_path / "my_project")
    # Nothing may be compiled: a stale `lock` of a killed DeepSpeed build (which used to make
    # every later run wait forever) sits in the extensions dir, and the compilers on PATH only
    # write down that they were called
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    compilers, called = tmp_path / "compilers", tmp_path / "compiler_calls.log"
    compilers.mkdir()
    for name in ("gcc", "cc", "g++", "c++", "ninja"):
        (compilers / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {called}\nexit 1\n')
        (compilers / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (*CHILD_DROP_ENV, "CC", "CXX")}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), PYTHONPATH="",
               PATH=f"{compilers}{os.pathsep}{env.get('PATH', '')}")

    def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout)

    where = subprocess.run([python, "-c", "import rlhf_exp; print(rlhf_exp.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel, not this checkout
    plugins = run("--info", "plugins", timeout=120)
    assert "OptunaSweeper" in plugins.stdout, plugins.stdout[-2000:] + plugins.stderr[-2000:]

    one = run("--config-dir", str(conf), "experiment=myexp", "hydra.run.dir=outputs/one")
    two = run("hydra.searchpath=[file://../my_project/conf]", "experiment=myexp",
              "hardware.nproc_per_node=2", "hydra.run.dir=outputs/two")
    for proc, name, ranks in ((one, "one", 1), (two, "two", 2)):
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "Traceback" not in out and "ninja" not in out and "g++" not in out
        assert f"global batch {8 * ranks} (micro 8 x accum 1 x {ranks} ranks)" in out
        run_dir = work / "outputs" / name
        resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
        assert (resolved["model"]["name"], resolved["model"]["tiny"]["hidden_size"],
                resolved["data_mix"]["name"], resolved["seed"]) == ("mytiny", 64, "mysort", 4242)
        model = json.loads((run_dir / "checkpoints" / "final" / "config.json").read_text())
        assert model["hidden_size"] == 64
        assert (run_dir / "rlhf-exp.log").exists()
    assert sorted(p.name for p in extensions.rglob("*")) == ["deepspeed_shm_comm", "lock"]
    assert not called.exists(), called.read_text()

    # a tiny family built from the installed package's corpus (a fresh model cache), trained
    # on a hub-schema sample read from the package, as a user with a local mirror would
    family = subprocess.run(
        [str(exe), "stage=sft", "model=tiny-gpt2", "data_mix=hh_rlhf", "logger=none",
         "data_mix.sources.0.path=pkg://rlhf_exp/data/examples/hub_samples/hh_rlhf",
         "sft.max_steps=2", "sft.micro_batch_size_per_device=4", "sft.eval_every=0",
         "hydra.run.dir=outputs/family"], cwd=work, capture_output=True, text=True, timeout=300,
        env={**env, "RLHF_EXP_CACHE": str(tmp_path / "fresh_cache")})
    assert family.returncode == 0, (family.stdout + family.stderr)[-4000:]
    model = json.loads((work / "outputs" / "family" / "checkpoints" / "final" /
                        "config.json").read_text())
    assert model["model_type"] == "gpt2"
    assert list((tmp_path / "fresh_cache").rglob("tokenizer.json"))

    # what each rank composed: the launch line hands every rank the user's folder; the ranks
    # ran with the launcher's config digest (a rank composing anything else stops the run)
    launch = next(ln for ln in two.stdout.splitlines() if "launching 2 ranks" in ln)
    rank_args = shlex.split(launch.split(": ", 2)[2])
    rank_args = rank_args[rank_args.index("rlhf_exp") + 1:]
    assert "hydra.searchpath=[file://../my_project/conf]" in rank_args
    shown = run(*rank_args, "--cfg", "job", timeout=120)
    assert shown.returncode == 0, shown.stderr
    rank_cfg = yaml.safe_load(shown.stdout)
    assert (rank_cfg["model"]["tiny"]["hidden_size"], rank_cfg["seed"]) == (64, 4242)
