"""The benchmark sweep (benchmarks/suite.py): engines in their own processes, the engines of a
workload timed in turns, errors reported per engine, one bandwidth per workload."""
import json
import statistics

import pytest

pytest.importorskip("transformers")
suite = pytest.importorskip("benchmarks.suite")
bench_main = pytest.importorskip("benchmarks.__main__")


class RecordingProgress:
    def __init__(self):
        self.steps, self.labels = [], []

    def step(self, label):
        self.steps.append(label)
        self.labels.append(label)

    def relabel(self, label):
        self.labels.append(label)


def fake_job(engine):
    return suite.Job("m", "/nowhere", None, None, engine, 1, 0, 5, 1.0)


def test_engines_take_turns_and_a_failing_engine_leaves_the_others_measured(monkeypatch):
    """Round r times each engine once, from the r-th on; an engine stops after its own repeats; one
    that fails to load or dies mid-way gets its error, and the rest finish."""
    calls, finished, abandoned = [], [], []
    repeats = {"a": 3, "b": 2, "c": 3, "dies": 3}

    class FakeEngineProcess:
        def __init__(self, job, timeout_s):
            if job.engine == "no-load":
                raise suite.SubprocessFailed("Traceback ...\nValueError: cannot load")
            self.name, self.repeats, self.calls = job.engine, repeats[job.engine], 0

        def call(self):
            if self.name == "dies" and self.calls == 1:
                raise suite.SubprocessFailed("process exited with code -9 (killed: out of memory?) before reporting")
            calls.append(self.name)
            self.calls += 1

        def finish(self):
            finished.append(self.name)
            return dict(times_s=[0.1] * self.calls)

        def abandon(self):
            abandoned.append(self.name)

    monkeypatch.setattr(suite, "EngineProcess", FakeEngineProcess)
    monkeypatch.setattr(suite, "SETTLE_S", 0.0)
    progress = RecordingProgress()
    results = suite.measure_in_turns([fake_job(n) for n in ("a", "no-load", "b", "dies", "c")], 10.0, progress, "w")
    # engines in load order a, b, dies, c; round 0 from a, round 1 from b, round 2 from dies (gone)
    assert calls == ["a", "b", "dies", "c",
                     "b", "c", "a",
                     "c", "a"]
    assert finished == ["a", "b", "c"] and abandoned == ["dies"]
    assert set(results) == {"a", "b", "c", "dies", "no-load"}
    assert [len(results[n]["times_s"]) for n in ("a", "b", "c")] == [3, 2, 3]
    assert "cannot load" in str(results["no-load"]) and "out of memory" in str(results["dies"])
    # one progress step per job (run_sweep's total counts them so), the rounds as relabels
    assert len(progress.steps) == 5 and any("round 3/3" in label for label in progress.labels)


def test_a_measuring_process_reports_its_error():
    with pytest.raises(suite.SubprocessFailed, match="ValueError: unknown engine 'no-such-engine'"):
        suite.EngineProcess(fake_job("no-such-engine"), timeout_s=120)
    with pytest.raises(suite.SubprocessFailed, match="ZeroDivisionError"):
        suite.run_in_subprocess(divmod, 1, 0, timeout_s=120)


@pytest.mark.parametrize("order", ["turns", "sequential"])
def test_sweep_on_the_tiny_model(tmp_path, order):
    """The command line end to end: both engines measured the repeats asked for, transformers' ids
    reproduced, one bandwidth for the workload's floors."""
    out = tmp_path / "out"
    argv = ["--models", "tiny", "--workloads", "greedy-b1", "--new-tokens", "4", "--threads", "1",
            "--engines", "umt5_fast-cpu-fp32,transformers-fp32", "--warmup", "1", "--repeats", "3",
            "--time-budget", "60", "--no-plots", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert bench_main.main(argv + (["--sequential"] if order == "sequential" else [])) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["settings"]["interleave"] == (order == "turns")
    rows = {row["engine"]: row for row in record["rows"]}
    assert set(rows) == {"umt5_fast-cpu-fp32", "transformers-fp32"}
    assert all(row["status"] == "ok" and row["repeats"] == 3 and len(row["times_ms"]) == 3 for row in rows.values())
    assert rows["umt5_fast-cpu-fp32"]["ids_identical"] is True
    # a probe after each timed call (Linux restarts the peak RSS after it); the floors' bandwidth is
    # the median of the workload's probes, each row's own the median of its process's
    probes = {engine: row["read_bandwidth_probes_gbs"] for engine, row in rows.items()}
    assert all(len(p) == 3 and min(p) > 0 for p in probes.values())
    assert all(row["own_read_bandwidth_gbs"] == statistics.median(probes[e]) for e, row in rows.items())
    assert all(row["call_extra_mb"] < 256 and row["peak_extra_mb"] < 256 for row in rows.values())  # not 512 MiB
    bandwidths = {row["read_bandwidth_gbs"] for row in rows.values()}
    assert bandwidths == {statistics.median(probes["umt5_fast-cpu-fp32"] + probes["transformers-fp32"])}
