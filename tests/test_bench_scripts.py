"""The benchmark scripts still run against today's step functions and config nodes (a bench is
not run by any other test, so a renamed or added key would break it silently: bench_packing's
DPO case once lacked `dpo.simpo_gamma`). One timed micro-batch per case on the tiny model."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.conftest import ROOT


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # loads the tiny model and trains one micro-batch per case
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "grpo", "ppo"])
def test_bench_packing_cases_run_both_layouts(stage):
    bench = _bench("bench_packing")
    for packed in (False, True):
        out = bench.one_case("sort", stage, packed, micro=4, steps=1, warmup=0)
        assert out["layout"] == ("packed" if packed else "padded")
        assert out["tokens"] > 0 and math.isfinite(out["tokens_per_s"]), out
