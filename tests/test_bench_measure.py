"""benchmarks/measure.py's pure logic: the ratios every benchmark reports, the round order, the NOISY mark.
(No timing is asserted: the rounds run stand-in callables.)"""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("measure", Path(__file__).parents[1] / "benchmarks" / "measure.py")
measure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(measure)


def test_paired_ratio_best_median_and_cpu():
    ours = dict(times=[2.0, 1.0, 4.0], cpu_times=[3.0, 2.0, 5.0])
    peer = dict(times=[3.0, 4.0, 4.0], cpu_times=[6.0, 7.0, 8.0])
    r = measure.paired_ratio(ours, peer)
    assert r["paired"] == [1.5, 4.0, 1.0]  # each round's peer / ours, exact in binary
    assert r["paired_median"] == 1.5
    assert r["best"] == 3.0  # best peer 3.0 / best ours 1.0, from different rounds
    assert r["cpu_best"] == 3.0  # 6.0 / 2.0


def test_paired_ratio_needs_the_same_rounds():
    with pytest.raises(ValueError):
        measure.paired_ratio(dict(times=[1.0, 2.0], cpu_times=[1.0, 2.0]), dict(times=[1.0], cpu_times=[1.0]))


def test_cpu_ratio_is_undefined_when_our_cpu_time_read_zero():
    r = measure.paired_ratio(dict(times=[1.0], cpu_times=[0.0]), dict(times=[2.0], cpu_times=[1.0]))
    assert r["best"] == 2.0 and r["cpu_best"] != r["cpu_best"]  # nan


def test_median_of_an_even_number_of_rounds_is_the_mean_of_the_middle_two():
    r = measure.paired_ratio(dict(times=[1.0] * 4, cpu_times=[1.0] * 4), dict(times=[1, 2, 3, 8], cpu_times=[1] * 4))
    assert r["paired_median"] == 2.5


@pytest.mark.parametrize(
    ("loads", "cores", "noisy"),
    [([0.5, 2.9], 2, False), ([3.0], 2, False), ([0.2, 3.01], 2, True), ([7.9, 8.1], 2, True), ([20.0], 16, False)],
)
def test_noisy_above_one_and_a_half_per_core_at_any_reading(loads, cores, noisy):
    assert measure.is_noisy(loads, cores) is noisy
    assert measure.verdict(loads, cores).startswith("NOISY" if noisy else "quiet")


def test_verdict_gives_the_load_range():
    assert measure.verdict([4.04, 0.96, 2.0], 2) == "NOISY: load 1.0-4.0 on 2 cores (noisy above 3.0)"


def test_rounds_alternate_the_order_of_the_sides():
    assert measure.round_order(["ours", "theirs"], 0) == ["ours", "theirs"]
    assert measure.round_order(["ours", "theirs"], 1) == ["theirs", "ours"]
    assert measure.round_order(["a", "b", "c"], 2) == ["a", "b", "c"]


def test_bench_records_every_round_its_loads_and_writes_the_verdict(tmp_path, monkeypatch):
    readings = iter([0.5, 1.0, 1.2, 1.4, 3.5, 2.0])  # start, two rounds (before, after), finish
    monkeypatch.setattr(measure, "load", lambda: next(readings))
    calls = []
    bench = measure.Bench(threads={"torch": 2})
    rows = bench.rounds({"ours": lambda: calls.append("ours"), "peer": lambda: calls.append("peer")}, 2)
    assert calls == ["ours", "peer", "peer", "ours"]
    assert all(len(r["times"]) == 2 and len(r["cpu_times"]) == 2 for r in rows.values())
    bench.show_ratio("ours", "peer")
    result = bench.finish(tmp_path / "out.json", {"note": 1})
    assert result["loads"] == [0.5, 1.0, 1.2, 1.4, 3.5, 2.0]
    assert result["noisy"] is (1.5 * result["machine"]["cores"] < 3.5)
    assert result["machine"]["threads"] == {"torch": 2}
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["note"] == 1 and set(written["ratios"]) == {"peer / ours"}
