"""The unit tier stays one: an unmarked test that starts a subprocess or builds a training
engine fails with what to do (tests/conftest.py), and tests using a training fixture are slow."""

from __future__ import annotations

CONFTEST = """
from tests.conftest import (TRAINING_FIXTURES, pytest_collection_modifyitems,  # noqa: F401
                            pytest_runtest_call, pytest_runtest_setup)
import pytest

@pytest.fixture
def sft_run():
    raise AssertionError("a training fixture must not run in the unit tier")
"""

SAMPLES = """
import subprocess
from rlhf_exp.training import engine

def test_starts_a_subprocess():
    subprocess.run(["true"], check=True)

def test_swallows_the_refusal():
    try:
        subprocess.run(["true"], check=True)
    except Exception:
        pass  # the guard still fails the test

def test_trains():
    engine.build_train_engine(None, None)

def test_uses_a_training_fixture(sft_run):
    pass

def test_plain():
    assert 1 + 1 == 2
"""


def test_guard_fails_unmarked_tests_that_launch_or_train(pytester, monkeypatch):
    from tests.conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_samples=SAMPLES)
    result = pytester.runpytest_inprocess("-m", "not slow", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=3, deselected=1)  # the fixture user is slow
    text = result.stdout.str()
    assert "test_starts_a_subprocess starts a subprocess but is not marked slow" in text
    assert "test_swallows_the_refusal starts a subprocess but is not marked slow" in text
    assert "test_trains trains a model but is not marked slow" in text
