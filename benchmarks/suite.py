"""The sweep: presets, one spawned process per engine, the engines of a workload timed in turns.

Each (model, workload, engine) is measured in its own spawned process: load, note the RSS, reset
the peak-RSS mark, warm up, then the timed calls, then the peak. A fresh process is the simplest
honest way to give every engine the same start (no allocator caches or page-cache advantage from
an earlier engine in the same process) and a peak that belongs to that engine alone.

The engines of one workload are loaded side by side and take turns: round r times one call of
each (starting from the r-th engine), so every engine samples the same minutes of the host. A
shared machine's speed drifts by 10-15% over minutes, and engines timed one after another would
carry that drift into their ratios. ``--sequential`` measures one engine at a time instead (for
models too large to hold several copies of at once).
"""
import multiprocessing
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import machine
from .engines import DEFAULT_ENGINES, REFERENCE_ENGINE, engine_by_name
from .models import (BenchModel, checkpoint_ready, ctranslate2_ready, ensure_checkpoint, ensure_ctranslate2_model,
                     read_config)
from .workloads import ModelShape, Rates, Workload, floor_seconds, make_inputs

MIN_REPEATS = 3  # a median and a spread need a few samples, whatever the time budget says
# A pause before each timed call of the turns: the OpenMP threads of the engine that ran last spin
# for a few ms before they sleep (libgomp's default, in torch and CTranslate2 alike), which would
# take cores from the next engine's call.
SETTLE_S = 0.1


@dataclass(frozen=True)
class SweepPreset:
    description: str
    models: tuple
    workloads: Optional[tuple] = None  # patterns for workloads.select; None: every workload
    engines: tuple = DEFAULT_ENGINES
    source_length: int = 64
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    time_budget_s: float = 60.0  # per measurement: fewer repeats (>= MIN_REPEATS) when runs are slow


CPU_TARGET_ENGINES = ("umt5_fast-cpu-fp32", "umt5_fast-cpu-int8", "umt5_fast-cpu-w8a8", "umt5_fast-cpu-bf16",
                      "umt5_fast-cpu-bf16-model",
                      REFERENCE_ENGINE,
                      "ctranslate2-fp32", "ctranslate2-int8")
PRESETS = {
    "sweep": SweepPreset("every model, workload and engine", models=("umt5-small", "umt5-base")),
    "quick": SweepPreset("smoke run in a few minutes: umt5-small, greedy bs=1 and one encoder shape",
                         models=("umt5-small",), workloads=("greedy-b1", "enc-1x512"), new_tokens=16,
                         repeats=3, time_budget_s=10.0),
    "generation": SweepPreset("issue 4: greedy, top-k sampling (50) and beam 4, each at bs=1 / bs=16, 64 "
                              "source tokens, 32 new tokens",
                              models=("umt5-small",), workloads=("greedy-b1", "greedy-b16", "sample-top50-b1",
                                                                 "sample-top50-b16", "beam4-b1", "beam4-b16"),
                              new_tokens=32),
    "cpu-targets": SweepPreset("issue 6: fp32 / int8 / w8a8 / bf16 at bs=1 and 16, encoder 8x128 and 1x4096",
                               models=("umt5-small",),
                               workloads=("greedy-b1", "greedy-b16", "enc-8x128", "enc-1x4096"),
                               engines=CPU_TARGET_ENGINES, new_tokens=32,
                               repeats=7),  # (its ratios are judged against targets: a steadier median)
}


@dataclass(frozen=True)
class Settings:
    threads: int
    warmup: int
    repeats: int
    time_budget_s: float
    timeout_s: float
    cache_dir: Path
    interleave: bool = True  # the engines of a workload take turns (False: one engine at a time)


@dataclass(frozen=True)
class Job:
    """One engine on one workload, sent to its measuring process (everything here pickles)."""
    model: str
    checkpoint_dir: str
    ctranslate2_dir: Optional[str]
    workload: Workload
    engine: str
    threads: int
    warmup: int
    repeats: int
    time_budget_s: float


# ---------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------
class SubprocessFailed(RuntimeError):
    pass


def _subprocess_entry(connection, func, args):
    try:
        connection.send(("ok", func(*args)))
    except BaseException:  # noqa: BLE001  (the parent reports it; the child must not hang)
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


class Subprocess:
    """A spawned Python process running ``target(connection, *args)``, answering over a pipe with
    ("ok", payload) or ("error", traceback) messages."""

    def __init__(self, target, *args):
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe(duplex=True)
        self.process = context.Process(target=target, args=(child_end, *args), daemon=True)
        self.process.start()
        child_end.close()

    def receive(self, timeout_s: Optional[float] = None):
        """The next payload; SubprocessFailed for an error, a timeout (the process is killed) or a
        process that died."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.connection.poll(0.5):  # also wakes up when the child dies (end of file)
            if deadline is not None and time.monotonic() > deadline:
                self.close(kill=True)
                raise SubprocessFailed(f"timed out after {timeout_s:.0f} s")
        try:
            status, payload = self.connection.recv()
        except EOFError:
            self.process.join(timeout=10)
            code = self.process.exitcode
            why = " (killed: out of memory?)" if code == -9 else ""
            raise SubprocessFailed(f"process exited with code {code}{why} before reporting") from None
        if status == "error":
            raise SubprocessFailed(payload.strip())
        return payload

    def request(self, command, timeout_s: Optional[float] = None):
        try:
            self.connection.send(command)
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise SubprocessFailed("the process is gone") from None
        return self.receive(timeout_s)

    def close(self, kill: bool = False):
        """Waits for the process to end (10 s at most, then kills it); ``kill``: kills it now."""
        if not kill:
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def run_in_subprocess(func, *args, timeout_s: Optional[float] = None):
    """``func(*args)`` in a fresh spawned Python process; its return value, or SubprocessFailed."""
    process = Subprocess(_subprocess_entry, func, args)
    try:
        return process.receive(timeout_s)
    finally:
        process.close()


# ---------------------------------------------------------------------------------------------
# Inside the measuring process
# ---------------------------------------------------------------------------------------------
class Measurement:
    """One engine on one workload, inside its measuring process: loading (the constructor), the
    warm-up, timed calls one at a time (so that engines in other processes can take turns), each
    followed by a probe of the read bandwidth, and the memory read at the end."""

    def __init__(self, job: Job):
        import torch
        torch.set_num_threads(job.threads)
        self.job = job
        self.engine = engine_by_name(job.engine)
        config = read_config(job.checkpoint_dir)
        self.ids, self.mask = make_inputs(job.workload, config["vocab_size"], config.get("eos_token_id", 1))
        self.rss_start = machine.current_rss_mb()
        start = time.perf_counter()
        self.engine.load(job.checkpoint_dir, job.ctranslate2_dir, job.workload.kind, job.threads)
        self.load_s = time.perf_counter() - start
        self.rss_loaded = machine.current_rss_mb()
        self.peak_is_per_workload = machine.reset_peak_rss()
        self.times, self.output = [], None

    def run(self):
        workload = self.job.workload
        if workload.kind == "encoder":
            return self.engine.encode(self.ids, self.mask)
        return self.engine.generate(self.ids, self.mask, workload.new_tokens, workload.num_beams, workload.top_k)

    def warm_up(self) -> int:
        """The warm-up runs; returns the number of timed calls the time budget allows."""
        job, repeats = self.job, self.job.repeats
        for _ in range(job.warmup):
            start = time.perf_counter()
            self.output = self.run()
            one_run = time.perf_counter() - start
            repeats = max(MIN_REPEATS, min(job.repeats, int(job.time_budget_s / max(one_run, 1e-9))))
        # Steady state: weights that loading only mapped are resident after the warm-up, so the peak of
        # the timed calls over the RSS before them is one call's working memory, whatever the loading style.
        self.peak_through_warmup, self.rss_warm = machine.peak_rss_mb(), machine.current_rss_mb()
        self.call_peak_is_separate = machine.reset_peak_rss()
        self.peak_of_calls, self.bandwidths_gbs = 0.0, []
        return repeats

    def timed_call(self) -> float:
        start = time.perf_counter()
        self.output = self.run()
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        if self.call_peak_is_separate:
            # The memory bandwidth of a shared machine moves by 1.5x within minutes, so it is probed
            # after every call, in the minutes of the calls; the probe's buffer then leaves the
            # calls' peak RSS (kept so far, then restarted).
            self.peak_of_calls = max(self.peak_of_calls, machine.peak_rss_mb())
            self.probe_bandwidth()
            machine.reset_peak_rss()
        return elapsed

    def probe_bandwidth(self):
        self.bandwidths_gbs.append(machine.measure_read_bandwidth(size_bytes=1 << 29, repeats=2) / 1e9)

    def finish(self) -> dict:
        peak_of_calls = max(self.peak_of_calls, machine.peak_rss_mb())
        if not self.bandwidths_gbs:  # (no peak reset here: one probe, after the RSS reads)
            self.probe_bandwidth()
        return dict(times_s=self.times, output=self.output, load_s=self.load_s, rss_start_mb=self.rss_start,
                    rss_loaded_mb=self.rss_loaded, read_bandwidths_gbs=self.bandwidths_gbs,
                    peak_rss_mb=max(self.peak_through_warmup, peak_of_calls),
                    peak_is_per_workload=self.peak_is_per_workload,
                    call_extra_mb=peak_of_calls - self.rss_warm if self.call_peak_is_separate else None)


def reference_output(job: Job):
    """One untimed call's output (transformers' ids or hidden states, to check the others against)."""
    return Measurement(job).run()


def _engine_worker(connection, job: Job):
    """A measuring process: loads and warms up (answers the number of timed calls), then answers
    "call" with one call's seconds until "finish", which it answers with ``Measurement.finish``."""
    try:
        measurement = Measurement(job)
        connection.send(("ok", measurement.warm_up()))
        while (command := connection.recv()) == "call":
            connection.send(("ok", measurement.timed_call()))
        if command != "finish":
            raise ValueError(f"unknown command {command!r}")
        connection.send(("ok", measurement.finish()))
    except EOFError:  # the parent went away
        pass
    except BaseException:  # noqa: BLE001  (the parent reports it; the child must not hang)
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


class EngineProcess:
    """An engine's measuring process, loaded and warmed up; ``call`` times one call in it."""

    def __init__(self, job: Job, timeout_s: float):
        self.timeout_s = timeout_s
        self.process = Subprocess(_engine_worker, job)
        try:
            self.repeats = self.process.receive(timeout_s)
        except SubprocessFailed:
            self.process.close()
            raise
        self.calls = 0

    def call(self):
        self.process.request("call", self.timeout_s)
        self.calls += 1

    def finish(self) -> dict:
        try:
            return self.process.request("finish", self.timeout_s)
        finally:
            self.process.close()

    def abandon(self):
        self.process.close(kill=True)


# ---------------------------------------------------------------------------------------------
# Rows and comparisons (parent process)
# ---------------------------------------------------------------------------------------------
def compare_outputs(kind: str, output: np.ndarray, reference: np.ndarray) -> dict:
    """Encoder: max |ours - ref| / max |ref|. Generation: identical ids, and the mean fraction of
    each row's new tokens before its first divergence from transformers."""
    if kind == "encoder":
        if output.shape != reference.shape:
            return dict(max_rel_error=None, note=f"shape {output.shape} != {reference.shape}")
        ours, ref = output.astype(np.float64), reference.astype(np.float64)
        return dict(max_rel_error=float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)))
    width = reference.shape[1]
    fractions = []
    for ours, ref in zip(output, reference):
        ours = list(ours[:width]) + [-1] * max(0, width - len(ours))
        differs = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
        fractions.append((differs[0] if differs else width) / width)
    identical = output.shape == reference.shape and bool((output == reference).all())
    return dict(ids_identical=identical, match_fraction=float(np.mean(fractions)))


def base_row(model: str, workload: Workload, engine) -> dict:
    return dict(model=model, workload=workload.name, group=workload.group, shape=workload.shape,
                kind=workload.kind, batch=workload.batch, source_length=workload.source_length,
                new_tokens=workload.new_tokens, num_beams=workload.num_beams, engine=engine.name,
                family=engine.family, precision=engine.precision)


def measured_row(row: dict, result: dict, workload: Workload, floor_s: float, bandwidth_gbs: float) -> dict:
    times_ms = [t * 1e3 for t in result["times_s"]]
    median = statistics.median(times_ms)
    return dict(row, status="ok", repeats=len(times_ms), times_ms=times_ms, median_ms=median,
                p20_ms=float(np.percentile(times_ms, 20)), p80_ms=float(np.percentile(times_ms, 80)),
                tokens_per_s=workload.output_tokens / (median / 1e3), ms_per_token=median / workload.steps,
                load_s=result["load_s"], rss_loaded_mb=result["rss_loaded_mb"],
                load_mb=result["rss_loaded_mb"] - result["rss_start_mb"], peak_rss_mb=result["peak_rss_mb"],
                footprint_mb=result["peak_rss_mb"] - result["rss_start_mb"],
                peak_extra_mb=result["peak_rss_mb"] - result["rss_loaded_mb"],
                call_extra_mb=result.get("call_extra_mb"),
                peak_is_per_workload=result["peak_is_per_workload"],
                read_bandwidth_gbs=bandwidth_gbs, own_read_bandwidth_gbs=statistics.median(result["read_bandwidths_gbs"]),
                read_bandwidth_probes_gbs=result["read_bandwidths_gbs"],
                floor_ms=floor_s * 1e3,
                time_over_floor=median / (floor_s * 1e3))


def ctranslate2_counterpart(precision: str) -> str:
    """The CTranslate2 engine an engine of ``precision`` is compared with (bf16: CT2 has none on CPU;
    CT2's int8 quantises activations too, as w8a8 does)."""
    return "ctranslate2-int8" if precision in ("int8", "w8a8") else "ctranslate2-fp32"


def add_speedups(rows: list):
    """``speedup_vs_transformers`` / ``speedup_vs_ctranslate2`` = their median / this median."""
    medians = {(r["model"], r["workload"], r["engine"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            continue
        key = (row["model"], row["workload"])
        reference = medians.get(key + (REFERENCE_ENGINE,))
        row["speedup_vs_transformers"] = None if reference is None else reference / row["median_ms"]
        counterpart = ctranslate2_counterpart(row["precision"])
        ct2 = medians.get(key + (counterpart,)) if row["family"] != "ctranslate2" else None
        row["speedup_vs_ctranslate2"] = None if ct2 is None else ct2 / row["median_ms"]
        row["ctranslate2_compared"] = counterpart if ct2 is not None else None


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
@dataclass
class PreparedModel:
    """A model's files, ready to measure, or why they are not."""
    checkpoint_dir: Optional[Path] = None
    shape: Optional[ModelShape] = None
    ctranslate2_dir: Optional[Path] = None
    checkpoint_error: Optional[str] = None
    ctranslate2_error: Optional[str] = None

    def error_for(self, engine) -> Optional[str]:
        if self.checkpoint_error:
            return self.checkpoint_error
        return self.ctranslate2_error if engine.family == "ctranslate2" else None


def _last_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1]


def prepare_model(model: BenchModel, engines: list, cache_dir: Path, progress) -> PreparedModel:
    """Make the checkpoint (and the CTranslate2 conversion when a CTranslate2 engine will run)."""
    prepared = PreparedModel()
    if not checkpoint_ready(model, cache_dir):
        progress.note(f"{model.name}: writing a random-weight checkpoint to {model.checkpoint_dir(cache_dir)}")
    try:
        prepared.checkpoint_dir = run_in_subprocess(ensure_checkpoint, model, cache_dir)
        prepared.shape = ModelShape.from_config(read_config(prepared.checkpoint_dir))
    except (SubprocessFailed, OSError, KeyError) as exc:
        prepared.checkpoint_error = "checkpoint: " + _last_line(exc)
        return prepared
    if any(e.family == "ctranslate2" and not e.missing for e in engines):
        if not ctranslate2_ready(model, cache_dir):
            progress.note(f"{model.name}: converting to CTranslate2 into {model.ctranslate2_dir(cache_dir)}")
        try:
            prepared.ctranslate2_dir = run_in_subprocess(ensure_ctranslate2_model, model, cache_dir)
        except SubprocessFailed as exc:
            prepared.ctranslate2_error = "CTranslate2 conversion failed: " + _last_line(exc)
    return prepared


def measure_in_turns(jobs: list, timeout_s: float, progress, label: str) -> dict:
    """Loads every job's engine in its own process, then times them in turns (see the module
    docstring): ``{engine name: Measurement.finish's dict, or the SubprocessFailed that ended it}``.
    One progress step per job (its loading); the rounds relabel the last one."""
    results, running = {}, {}
    try:
        for job in jobs:
            progress.step(f"{label} {job.engine}: loading, warming up")
            try:
                running[job.engine] = EngineProcess(job, timeout_s)
            except SubprocessFailed as exc:
                results[job.engine] = exc
        names, rounds = list(running), max((p.repeats for p in running.values()), default=0)
        for r in range(rounds):
            progress.relabel(f"{label}: timing {len(names)} engine(s), round {r + 1}/{rounds}")
            for name in names[r % len(names):] + names[:r % len(names)]:
                process = running.get(name)
                if process is None or process.calls >= process.repeats:
                    continue
                time.sleep(SETTLE_S)
                try:
                    process.call()
                except SubprocessFailed as exc:
                    results[name] = exc
                    running.pop(name).abandon()
        for name in list(running):
            try:
                results[name] = running[name].finish()
            except SubprocessFailed as exc:
                results[name] = exc
            del running[name]
    finally:  # (an interrupted sweep leaves no loaded engine behind)
        for process in running.values():
            process.abandon()
    return results


@dataclass
class WorkloadPlan:
    """One model and workload: the engines to time (transformers first, so that its row leads), whether
    transformers runs once untimed for the reference outputs, and the engines skipped with reasons."""
    model: BenchModel
    workload: Workload
    engines: list
    reference_only: bool
    skipped: list


def plan_workloads(models, workloads, engines) -> list:
    names = [e.name for e in engines]
    reference = engine_by_name(REFERENCE_ENGINE)
    plans = []
    for model in models:
        for workload in workloads:
            reasons = {e.name: e.unsupported_reason(workload) for e in engines}
            runnable = [e for e in sorted(engines, key=lambda e: e.name != REFERENCE_ENGINE) if not reasons[e.name]]
            skipped = [dict(model=model.name, workload=workload.name, engine=e.name, reason=reasons[e.name])
                       for e in engines if reasons[e.name]]
            reference_only = bool(runnable) and REFERENCE_ENGINE not in names and not reference.missing
            plans.append(WorkloadPlan(model, workload, runnable, reference_only, skipped))
    return plans


def run_sweep(models, workloads, engines, settings: Settings, machine_info: dict, progress) -> dict:
    """Measure everything; returns ``{"rows": [...], "skipped": [...]}``."""
    gemm_rates = {dtype: gflops * 1e9 for dtype, gflops in machine_info["gemm_gflops"].items()}
    plans = plan_workloads(models, workloads, engines)
    # one step per untimed reference run and per engine (its loading, or why it cannot run)
    progress.start(sum(p.reference_only + len(p.engines) for p in plans))
    rows, skipped, prepared = [], [], {}
    for plan in plans:
        model, workload = plan.model, plan.workload
        skipped += plan.skipped
        if not plan.engines:
            continue
        if model.name not in prepared:
            prepared[model.name] = prepare_model(model, engines, settings.cache_dir, progress)
        files = prepared[model.name]
        label = f"{model.name} {workload.name}"

        def job_for(engine):
            return Job(model.name, str(files.checkpoint_dir), files.ctranslate2_dir and str(files.ctranslate2_dir),
                       workload, engine.name, settings.threads, settings.warmup, settings.repeats,
                       settings.time_budget_s)

        reference_output_of_workload = None
        if plan.reference_only:
            progress.step(f"{label} {REFERENCE_ENGINE} (reference only)")
            try:
                if not files.checkpoint_error:
                    reference_output_of_workload = run_in_subprocess(
                        reference_output, job_for(engine_by_name(REFERENCE_ENGINE)),
                        timeout_s=settings.timeout_s)
            except SubprocessFailed:
                pass  # the rows go without a correctness check
        jobs = []
        for engine in plan.engines:
            if files.error_for(engine):
                progress.step(f"{label} {engine.name}: cannot run")
            else:
                jobs.append(job_for(engine))
        results = {}
        for batch in ([jobs] if settings.interleave else [[job] for job in jobs]):
            results.update(measure_in_turns(batch, settings.timeout_s, progress, label))
        reference = results.get(REFERENCE_ENGINE)
        if isinstance(reference, dict):
            reference_output_of_workload = reference["output"]
        # One bandwidth for the workload's floors, the median of its engines' probes (one after each
        # call): one probe moves by up to 1.5x from process to process (where its buffer lands) and
        # over minutes.
        probes = [gbs for r in results.values() if isinstance(r, dict) for gbs in r["read_bandwidths_gbs"]]
        bandwidth_gbs = statistics.median(probes) if probes else None
        for engine in plan.engines:
            row = base_row(model.name, workload, engine)
            result = results.get(engine.name, SubprocessFailed(files.error_for(engine) or "not measured"))
            if isinstance(result, SubprocessFailed):
                rows.append(dict(row, status="error", error=_last_line(result)))
                continue
            row_rates = Rates(bandwidth_gbs * 1e9, gemm_rates[engine.gemm_dtype])
            floor_s = floor_seconds(files.shape, workload, row_rates, engine.weight_bytes, engine.activation_bytes)
            row = measured_row(row, result, workload, floor_s, bandwidth_gbs)
            if reference_output_of_workload is not None and not (workload.top_k and engine.family == "ctranslate2"):
                # (CTranslate2 samples from its own generator: its ids are not transformers' to compare)
                row.update(compare_outputs(workload.kind, result["output"], reference_output_of_workload))
            rows.append(row)
    progress.finish()
    add_speedups(rows)
    return dict(rows=rows, skipped=skipped)


def settings_for(preset: SweepPreset, threads: int, cache_dir: Path, timeout_s: float, interleave: bool = True,
                 **overrides) -> Settings:
    values = dict(warmup=preset.warmup, repeats=preset.repeats, time_budget_s=preset.time_budget_s)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(threads=threads, cache_dir=Path(cache_dir), timeout_s=timeout_s, interleave=interleave, **values)
