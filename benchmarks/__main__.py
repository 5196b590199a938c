"""``python -m benchmarks`` / ``umt5-fast bench``: the umt5_fast benchmark sweep (see README.md)."""
import argparse
import datetime
import fnmatch
import importlib.util
import os
import sys
from pathlib import Path

from . import machine, report
from .engines import DEFAULT_ENGINES, all_engines
from .models import PRESET_CONFIGS, default_cache_dir, preset_model, user_model
from .suite import PRESETS, run_sweep, settings_for
from .workloads import catalog, select


def comma_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def at_least(minimum, kind=int):
    """An argparse type: a number of ``kind`` >= ``minimum``."""
    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        prog="umt5-fast bench" if __package__.startswith("umt5_fast.") else "python -m benchmarks",
        description="Benchmark umt5_fast against transformers and CTranslate2 on this CPU.",
        epilog="presets: " + "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()))
    parser.add_argument("--preset", choices=list(PRESETS), default="sweep", help="what to run (default: sweep)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset",
                        help="same as --preset quick (a few minutes on 2 cores)")
    parser.add_argument("--models", type=comma_list,
                        help=f"model presets, comma-separated ({', '.join(PRESET_CONFIGS)})")
    parser.add_argument("--model", action="append", metavar="DIR", default=[],
                        help="a transformers UMT5 checkpoint directory to benchmark (repeatable)")
    parser.add_argument("--engines", type=comma_list,
                        help="engine names or shell patterns, comma-separated (see --list)")
    parser.add_argument("--workloads", type=comma_list,
                        help="workload names, shell patterns or groups (encoder, greedy, sample, beam, long)")
    parser.add_argument("--new-tokens", type=at_least(1), help="tokens generated per sequence (forced: min == max)")
    parser.add_argument("--source-length", type=at_least(1), help="source tokens of the generation workloads")
    parser.add_argument("--threads", type=at_least(1), default=machine.default_threads(),
                        help="compute threads for every engine (default: physical cores usable here)")
    parser.add_argument("--cpu-isa", choices=list(machine.ISA_CAP_ENVIRONMENT),
                        help="hold every engine to these instruction sets (torch, MKL, oneDNN, CTranslate2 "
                             "and umt5_fast alike), to measure what a CPU without the newer ones runs")
    parser.add_argument("--warmup", type=at_least(0), help="untimed runs before timing")
    parser.add_argument("--repeats", type=at_least(1), help="timed runs (fewer, >= 3, when one run exceeds the budget)")
    parser.add_argument("--time-budget", type=at_least(0.0, float), dest="time_budget_s",
                        help="seconds of timed runs to aim for per measurement")
    parser.add_argument("--sequential", action="store_true",
                        help="measure one engine at a time (default: the engines of a workload are loaded side by "
                             "side and take turns, so that the host's drift cancels out of their ratios)")
    parser.add_argument("--timeout", type=at_least(1.0, float), default=1800.0,
                        help="seconds an engine may take to load and warm up, or to run one call, before it is abandoned")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where JSON and PNGs go")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="random-weight checkpoints and CTranslate2 conversions")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="list models, workloads and engines, then exit")
    return parser


def choose_engines(patterns, preset_engines):
    """The engines matching ``patterns`` (default: the preset's); unavailable ones are kept, to be
    reported as skipped with their reason."""
    engines = all_engines()
    names = [e.name for e in engines]
    if patterns:
        unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
        if unmatched:
            raise SystemExit(f"bench: no engine matches {', '.join(unmatched)}; engines: {', '.join(names)}")
        chosen = [e for e in engines if any(fnmatch.fnmatch(e.name, p) for p in patterns)]
    else:
        chosen = [e for e in engines if e.name in preset_engines]
    return chosen


def list_everything(workloads):
    print("models:", ", ".join(PRESET_CONFIGS), "(or --model DIR)")
    print("workloads:")
    for w in workloads:
        print(f"  {w.name:14s} {w.group:8s} {w.shape}")
    print("engines (* = default):")
    for e in all_engines():
        mark = "*" if e.name in DEFAULT_ENGINES else " "
        print(f" {mark}{e.name:22s} {'unavailable: ' + e.missing if e.missing else 'available'}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cpu_isa:
        argv = sys.argv[1:] if argv is None else list(argv)
        machine.cap_instruction_sets(args.cpu_isa, [sys.executable, "-m", __package__] + argv)
    preset = PRESETS[args.preset]
    workloads = catalog(args.source_length or preset.source_length, args.new_tokens or preset.new_tokens)
    if args.list:
        list_everything(workloads)
        return 0
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        # Said before the sweep, not after minutes of it.
        print("note: matplotlib is not installed, so no plots (pip install -e '.[bench]'; "
              "--no-plots silences this)", file=sys.stderr)
        args.no_plots = True
    try:
        workloads = select(workloads, args.workloads or preset.workloads)
        models = [preset_model(name) for name in (args.models or ([] if args.model else preset.models))]
        models += [user_model(directory) for directory in args.model]
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from exc
    engines = choose_engines(args.engines, preset.engines)
    # Every engine, torch or not, gets the same thread count; spawned measurements inherit this.
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                      TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    settings = settings_for(preset, args.threads, args.cache_dir, args.timeout, interleave=not args.sequential,
                            warmup=args.warmup, repeats=args.repeats, time_budget_s=args.time_budget_s)

    progress = report.ProgressBar()
    progress.note(f"probing memory bandwidth and GEMM rate on {args.threads} threads ...")
    gemm_dtypes = ["float32"] + sorted({e.gemm_dtype for e in engines} - {"float32"})
    info = machine.describe_machine(args.threads, gemm_dtypes, quick=args.preset == "quick")
    info["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    print(report.machine_header(info, args.preset), file=sys.stderr)

    result = run_sweep(models, workloads, engines, settings, info, progress)

    report.print_report(info, result, args.preset)
    json_path = args.out / f"{args.preset}.json"
    settings_record = dict(preset=args.preset, models=[m.name for m in models],
                           workloads=[w.name for w in workloads], engines=[e.name for e in engines],
                           threads=settings.threads, warmup=settings.warmup, repeats=settings.repeats,
                           time_budget_s=settings.time_budget_s, interleave=settings.interleave,
                           argv=sys.argv[1:] if argv is None else argv)
    report.write_json(json_path, info, settings_record, result)
    written = [json_path] + ([] if args.no_plots else report.write_plots(args.out, args.preset, result["rows"]))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
