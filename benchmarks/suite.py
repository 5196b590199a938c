"""The sweep: presets, one fresh subprocess per measurement, and the comparison columns.

Each (model, workload, engine) is measured in its own spawned process: load, note the RSS, reset
the peak-RSS mark, warm up, time the repeats, read the peak. A fresh process is the simplest
honest way to give every engine the same start (no allocator caches or page-cache advantage from
an earlier engine in the same process) and a peak that belongs to that engine alone.
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
                               engines=CPU_TARGET_ENGINES, new_tokens=32),
}


@dataclass(frozen=True)
class Settings:
    threads: int
    warmup: int
    repeats: int
    time_budget_s: float
    timeout_s: float
    cache_dir: Path


@dataclass(frozen=True)
class Job:
    """One measurement, sent to a fresh process (everything here pickles)."""
    model: str
    checkpoint_dir: str
    ctranslate2_dir: Optional[str]
    workload: Workload
    engine: str
    threads: int
    warmup: int
    repeats: int
    time_budget_s: float
    timed: bool = True  # False: a single run whose output is the correctness reference


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


def run_in_subprocess(func, *args, timeout_s: Optional[float] = None):
    """``func(*args)`` in a fresh spawned Python process; its return value, or SubprocessFailed."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_subprocess_entry, args=(sender, func, args), daemon=True)
    process.start()
    sender.close()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not receiver.poll(0.5):  # also wakes up when the child dies (end of file)
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                raise SubprocessFailed(f"timed out after {timeout_s:.0f} s")
        try:
            status, payload = receiver.recv()
        except EOFError:
            process.join(timeout=10)
            code = process.exitcode
            why = " (killed: out of memory?)" if code == -9 else ""
            raise SubprocessFailed(f"process exited with code {code}{why} before reporting") from None
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
        receiver.close()
    if status == "error":
        raise SubprocessFailed(payload.strip())
    return payload


# ---------------------------------------------------------------------------------------------
# Inside the measuring process
# ---------------------------------------------------------------------------------------------
def measure(job: Job) -> dict:
    import torch
    torch.set_num_threads(job.threads)
    engine = engine_by_name(job.engine)
    config = read_config(job.checkpoint_dir)
    workload = job.workload
    ids, mask = make_inputs(workload, config["vocab_size"], config.get("eos_token_id", 1))
    rss_start = machine.current_rss_mb()
    start = time.perf_counter()
    engine.load(job.checkpoint_dir, job.ctranslate2_dir, workload.kind, job.threads)
    load_s = time.perf_counter() - start
    rss_loaded = machine.current_rss_mb()
    peak_is_per_workload = machine.reset_peak_rss()

    def run():
        if workload.kind == "encoder":
            return engine.encode(ids, mask)
        return engine.generate(ids, mask, workload.new_tokens, workload.num_beams, workload.top_k)

    if not job.timed:
        return dict(output=run())
    repeats, output = job.repeats, None
    for _ in range(job.warmup):
        start = time.perf_counter()
        output = run()
        one_run = time.perf_counter() - start
        repeats = max(MIN_REPEATS, min(job.repeats, int(job.time_budget_s / max(one_run, 1e-9))))
    # Steady state: weights that loading only mapped are resident after the warm-up, so the peak of
    # the timed calls over the RSS before them is one call's working memory, whatever the loading style.
    peak_through_warmup, rss_warm = machine.peak_rss_mb(), machine.current_rss_mb()
    call_peak_is_separate = machine.reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = run()
        times.append(time.perf_counter() - start)
    peak_of_calls = machine.peak_rss_mb()
    # The memory bandwidth of a shared machine moves by 1.5x within minutes: the floor of this
    # measurement uses the bandwidth read right after it, in the same process (after the RSS reads).
    read_bandwidth = machine.measure_read_bandwidth(size_bytes=1 << 29, repeats=3)
    return dict(times_s=times, output=output, load_s=load_s, rss_start_mb=rss_start, rss_loaded_mb=rss_loaded,
                read_bandwidth_gbs=read_bandwidth / 1e9,
                peak_rss_mb=max(peak_through_warmup, peak_of_calls), peak_is_per_workload=peak_is_per_workload,
                call_extra_mb=peak_of_calls - rss_warm if call_peak_is_separate else None)


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


def measured_row(row: dict, result: dict, workload: Workload, floor_s: float) -> dict:
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
                read_bandwidth_gbs=result["read_bandwidth_gbs"], floor_ms=floor_s * 1e3,
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


def plan_jobs(models, workloads, engines):
    """(model, workload, engine, timed) in run order: transformers first in each workload, so its
    outputs are there to check the others; an untimed transformers run when it is not selected."""
    names = [e.name for e in engines]
    reference = engine_by_name(REFERENCE_ENGINE)
    for model in models:
        for workload in workloads:
            runnable = [e for e in engines if not e.unsupported_reason(workload)]
            if runnable and REFERENCE_ENGINE not in names and not reference.missing:
                yield model, workload, reference, False
            for engine in sorted(engines, key=lambda e: e.name != REFERENCE_ENGINE):
                yield model, workload, engine, True


def run_sweep(models, workloads, engines, settings: Settings, machine_info: dict, progress) -> dict:
    """Measure everything; returns ``{"rows": [...], "skipped": [...]}``."""
    gemm_rates = {dtype: gflops * 1e9 for dtype, gflops in machine_info["gemm_gflops"].items()}
    jobs = list(plan_jobs(models, workloads, engines))
    progress.start(sum(1 for _, workload, engine, _ in jobs if not engine.unsupported_reason(workload)))
    rows, skipped, prepared, references = [], [], {}, {}
    for model, workload, engine, timed in jobs:
        reason = engine.unsupported_reason(workload)
        if reason:
            skipped.append(dict(model=model.name, workload=workload.name, engine=engine.name, reason=reason))
            continue
        if model.name not in prepared:
            prepared[model.name] = prepare_model(model, engines, settings.cache_dir, progress)
        files = prepared[model.name]
        progress.step(f"{model.name} {workload.name} {engine.name}" + ("" if timed else " (reference only)"))
        row = dict(base_row(model.name, workload, engine), timed=timed)
        try:
            if files.error_for(engine):
                raise SubprocessFailed(files.error_for(engine))
            job = Job(model.name, str(files.checkpoint_dir), files.ctranslate2_dir and str(files.ctranslate2_dir),
                      workload, engine.name, settings.threads, settings.warmup, settings.repeats,
                      settings.time_budget_s, timed)
            result = run_in_subprocess(measure, job, timeout_s=settings.timeout_s)
        except SubprocessFailed as exc:
            rows.append(dict(row, status="error", error=_last_line(exc)))
            continue
        key = (model.name, workload.name)
        if engine.name == REFERENCE_ENGINE:
            references[key] = result["output"]
        if not timed:
            continue
        row_rates = Rates(result["read_bandwidth_gbs"] * 1e9, gemm_rates[engine.gemm_dtype])
        floor_s = floor_seconds(files.shape, workload, row_rates, engine.weight_bytes, engine.activation_bytes)
        row = measured_row(row, result, workload, floor_s)
        if key in references and not (workload.top_k and engine.family == "ctranslate2"):
            # (CTranslate2 samples from its own generator: its ids are not transformers' to compare)
            row.update(compare_outputs(workload.kind, result["output"], references[key]))
        rows.append(row)
    progress.finish()
    add_speedups(rows)
    return dict(rows=rows, skipped=skipped)


def settings_for(preset: SweepPreset, threads: int, cache_dir: Path, timeout_s: float, **overrides) -> Settings:
    values = dict(warmup=preset.warmup, repeats=preset.repeats, time_budget_s=preset.time_budget_s)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(threads=threads, cache_dir=Path(cache_dir), timeout_s=timeout_s, **values)
