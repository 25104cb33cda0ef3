"""tools/benchlib.py: the statistics the benchmarks print."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from benchlib import interleaved, paired_speedup  # noqa: E402


def test_rounds_alternate_their_order():
    assert interleaved(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]


def test_the_paired_speedup_follows_a_drifting_machine():
    # the other code takes 1.1x as long as the base in each round; the machine is 3x slower in rounds 2-4 and
    # speeds up again between the two calls of round 4
    base, other = [1.0, 3.0, 3.0, 3.0, 1.0], [1.1, 3.3, 3.3, 1.1, 1.1]
    # (the two medians, 1.1 and 3.0, come from different rounds: their ratio would say 0.37x)
    assert paired_speedup(base, other) == pytest.approx(1.1)
    assert paired_speedup([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == 0.5
    with pytest.raises(ValueError, match="one time of each code per round"):
        paired_speedup([1.0, 2.0], [1.0])
