"""The multi-process harness turns failures, dead ranks and hung ranks into failed cases in time."""

import time

import pytest

from dist_lora.testing import launch
from dist_lora.testing.multiprocess import Layout


def test_layout_names():
    assert Layout.parse("tp2-pp2-sp") == Layout(2, 2, True)
    assert Layout.parse("pp4") == Layout(1, 4, False)
    with pytest.raises(ValueError, match="tpN"):
        Layout.parse("dp2")


@pytest.fixture(scope="module")
def outcome():
    start = time.monotonic()
    result = launch("tests.testing.faulty_checks", world_size=2, timeout=20, collective_timeout=5)
    return result, time.monotonic() - start


def test_passing_and_failing_checks_are_reported_per_case(outcome):
    result, _ = outcome
    assert result.verdict("passes[tp1]") == (True, "")
    ok, message = result.verdict("fails_on_rank_1[tp1]")
    assert not ok and "[rank 1]" in message and "rank 1 disagrees" in message


def test_hung_and_dead_ranks_fail_within_the_deadline(outcome):
    result, elapsed = outcome
    assert not result.verdict("rank_1_hangs[tp2]")[0]
    ok, message = result.verdict("rank_1_dies[tp2]")
    assert not ok and "did not finish" in message
    assert result.problem is not None
    assert elapsed < 40, f"the launch took {elapsed:.0f} s"
