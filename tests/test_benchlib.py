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


def test_the_interval_resamples_the_processes_not_only_their_rounds():
    from benchlib import median_interval

    # two processes, each steady within itself but 20 % apart: the rounds alone would say the median is
    # known to the digit; the processes say it could be either one's
    mid, low, high = median_interval([[1.0, 1.0, 1.0], [1.2, 1.2, 1.2]])
    assert mid == pytest.approx(1.1)
    assert (low, high) == (1.0, 1.2)
    assert median_interval([[1.1, 1.1], [1.1]]) == (1.1, 1.1, 1.1)
    mid, low, high = median_interval([[1.0, 1.1, 1.2, 1.3]] * 4, resamples=500)
    assert low <= mid <= high and low >= 1.0 and high <= 1.3
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([[], []])


def test_in_processes_runs_fresh_children_and_reads_their_last_line(tmp_path):
    from benchlib import in_processes

    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys\nprint('a line before')\n"
        "print(json.dumps([os.environ['BENCH_PROCESS'], sys.argv[1:]]))\n"
    )
    runs = in_processes(str(script), ["--repeats", "3", "--processes", "2", "--processes=2", "--x"], 2)
    assert [argv for _, argv in runs] == [["--repeats", "3", "--x", "--json"]] * 2
    assert [index for index, _ in runs] == ["0", "1"]  # two processes, each told its index


def test_the_control_sampling_bench_pools_its_processes_rounds(monkeypatch, capsys):
    import bench_control_sampling as bench

    def run(plain, control):
        return {"plain": plain, "control": control, "early": plain}

    runs = [
        {"header": "cpu", "off_from": 5, "rows": {"car": run([1.0, 2.0], [1.1, 2.2])}},
        {"header": "cpu", "off_from": 5, "rows": {"car": run([1.0, 1.0], [1.3, 1.3])}},
    ]
    seen = []
    monkeypatch.setattr(bench, "in_processes", lambda script, argv, n: seen.append((argv, n)) or runs)
    bench.main(["--injectors", "car", "--processes", "2"])
    out = capsys.readouterr().out
    assert seen == [(["--injectors", "car", "--processes", "2"], 2)]
    # rounds' ratios 1.1, 1.1 and 1.3, 1.3: median 1.2, each process's own 1.1 and 1.3; early equals plain
    assert "car           1.20x [1.10, 1.30] (1.10-1.30) 1.00x [1.00, 1.00] (1.00-1.00)" in out
    with pytest.raises(SystemExit):
        bench.parse_args(["--injectors", "car,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--processes", "0"])


def test_the_training_bench_pools_its_processes_rounds(monkeypatch, capsys):
    import bench_train as bench

    runs = [
        {
            "header": "cpu",
            "times": {"varctl": [10.0, 20.0], "official": [11.0, 22.0]},
            "peaks": {"varctl": 2**20, "official": 3 * 2**20},
        },
        {
            "header": "cpu",
            "times": {"varctl": [10.0, 10.0], "official": [9.0, 9.0]},
            "peaks": {"varctl": 2**20, "official": 2**20},
        },
    ]
    monkeypatch.setattr(bench, "in_processes", lambda script, argv, n: runs)
    bench.main(["--official", "DIR", "--processes", "2"])
    out = capsys.readouterr().out
    assert "official: 4 steps, median 10.000s, 9.00-22.00s, peak +2 MiB (processes' medians)" in out
    # rounds' ratios 1.1, 1.1 (first process) and 0.9, 0.9 (second)
    assert "varctl's step is 1.00x [0.90, 1.10] (0.90-1.10) the speed of official" in out
    for run, mfu in zip(runs, (0.30, 0.40)):  # on a GPU: each code's MFU, the processes' median
        run["mfu"] = {"varctl": mfu, "official": mfu / 2}
    bench.main(["--official", "DIR", "--processes", "2"])
    assert "varctl: 4 steps, median 10.000s, 10.00-20.00s, peak +1 MiB, MFU 35.0% (processes' medians)" in (
        capsys.readouterr().out
    )
