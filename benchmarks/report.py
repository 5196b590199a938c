"""Output: the progress bar, the terminal table, the JSON file and the PNG plots."""
import json
import sys
import time
from pathlib import Path

from .engines import REFERENCE_ENGINE
from .machine import busy_warning


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
class ProgressBar:
    """A one-line text bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, stream=sys.stderr, width: int = 28):
        self.stream, self.width = stream, width
        self.interactive = stream.isatty()
        self.total = self.done = 0
        self.started = time.monotonic()
        self.label = ""

    def start(self, total: int):
        self.total, self.done, self.started = total, 0, time.monotonic()

    def step(self, label: str):
        """A new measurement begins (``done`` counts the finished ones)."""
        if self.label:
            self.done += 1
        self.relabel(label)

    def relabel(self, label: str):
        """The running step's progress, in words."""
        self.label = label
        self._draw()

    def note(self, text: str):
        self._clear()
        print(text, file=self.stream, flush=True)
        if self.label:
            self._draw()

    def finish(self):
        if self.label:
            self.done += 1
            self.label = "done"
            self._draw()
        if self.interactive:
            print(file=self.stream, flush=True)

    def _clear(self):
        if self.interactive:
            self.stream.write("\r\033[K")

    def _draw(self):
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self.started
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{int(elapsed) // 60}:{int(elapsed) % 60:02d}  {self.label}")
        if self.interactive:
            self._clear()
            self.stream.write(line[:200])
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------
# Terminal
# ---------------------------------------------------------------------------------------------
def machine_header(info: dict, preset: str) -> str:
    cpu, versions = info["cpu"], info["versions"]
    gemm = ", ".join(f"{dtype} {rate:.0f}" for dtype, rate in info["gemm_gflops"].items())
    shown = ("torch", "transformers", "ctranslate2", "triton", "umt5_fast")
    version_text = " | ".join(f"{name} {versions.get(name) or 'not installed'}" for name in shown)
    backends = ", ".join(versions.get("umt5_fast_backends") or [])
    return "\n".join([
        f"umt5_fast benchmark, preset {preset}, {info['date']}",
        f"CPU: {cpu['model']} | features: {' '.join(cpu['features']) or 'none of ' + 'avx2/avx512f/amx'} | "
        f"{cpu['physical_cores']} physical cores, {cpu['logical_cpus']} logical CPUs ({cpu['usable_cpus']} usable) | "
        f"{info['threads']} threads for every engine",
    ] + ([f"instruction sets capped at {info['cpu_isa_cap']} for every engine (--cpu-isa; torch runs "
          f"{info['torch_cpu_capability']} kernels)"] if info.get("cpu_isa_cap") else []) + [
        f"measured now: read bandwidth {info['read_bandwidth_gbs']:.1f} GB/s | GEMM GFLOP/s: {gemm}",
        f"versions: {version_text} (backends: {backends})",
    ] + ([busy_warning(info)] if busy_warning(info) else []))


def _number(value, digits=3):
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def correctness_cell(row: dict) -> str:
    if row["engine"] == REFERENCE_ENGINE:
        return "ref"
    if "max_rel_error" in row:
        return "-" if row["max_rel_error"] is None else f"err {row['max_rel_error']:.1e}"
    if "ids_identical" in row:
        return "yes" if row["ids_identical"] else f"no {row['match_fraction']:.2f}"
    return "-"


COLUMNS = (  # (title, cell function, right-aligned)
    ("model", lambda r: r["model"], False),
    ("workload", lambda r: r["workload"], False),
    ("shape", lambda r: r["shape"], False),
    ("engine", lambda r: r["engine"], False),
    ("median ms", lambda r: _number(r.get("median_ms")), True),
    ("p20-p80 ms", lambda r: f"{_number(r['p20_ms'])}-{_number(r['p80_ms'])}" if "p20_ms" in r else "-", True),
    ("tok/s", lambda r: _number(r.get("tokens_per_s")), True),
    ("ms/tok", lambda r: _number(r.get("ms_per_token")), True),
    ("mem MB", lambda r: _number(r.get("footprint_mb")), True),
    ("+peak MB", lambda r: _number(r.get("peak_extra_mb")), True),
    ("+call MB", lambda r: _number(r.get("call_extra_mb")), True),
    ("vs HF", lambda r: _ratio(r.get("speedup_vs_transformers")), True),
    ("vs CT2", lambda r: _ratio(r.get("speedup_vs_ctranslate2")), True),
    ("GB/s", lambda r: _number(r.get("read_bandwidth_gbs")), True),
    ("/floor", lambda r: _ratio(r.get("time_over_floor")), True),
    ("correct", correctness_cell, False),
)

LEGEND = """\
median ms / p20-p80 ms: wall time of one whole call (encoder forward, or generate incl. its encoder)
tok/s: generated tokens (encoder: input tokens) per second; ms/tok: median / new tokens (encoder: / tokens)
mem MB: peak RSS during the workload minus the RSS before loading (weights + work memory; memory-mapped
  weights count once touched); +peak MB: that peak minus the RSS right after loading; +call MB: the
  peak of the timed calls minus the RSS before them (after the warm-up): one call's working memory
vs HF / vs CT2: that engine's median / this median (>1: faster); int8 and w8a8 rows compare with ctranslate2-int8,
  the others with ctranslate2-fp32
GB/s: the workload's read bandwidth, the median of its engines' probes (torch.sum over 512 MiB in each
  engine's process after each of its timed calls; one probe moves by up to 1.5x from process to process)
/floor: median / floor (weights+KV bytes over that bandwidth, or FLOPs over the GEMM rate measured
  at the start); the floor counts the LM head in the engine's weight precision, while umt5_fast's
  greedy steps with a float head read its int8 screen (umt5_fast/lm_head_screen.py), so those rows
  can fall below 1x
correct: generation: ids identical to transformers (yes), else no + mean fraction of tokens before
  the first divergence; encoder: max |out - ref| / max |ref| vs transformers"""


def table(rows: list) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    cells = [[cell(r) for _, cell, _ in COLUMNS] for r in ok]
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (title, _, _) in enumerate(COLUMNS)]

    def line(values):
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, (_, _, right) in zip(values, widths, COLUMNS)).rstrip()

    out = [line([title for title, _, _ in COLUMNS]), "-" * len(line([title for title, _, _ in COLUMNS]))]
    previous = None
    for row, values in zip(ok, cells):
        if previous is not None and (row["model"], row["workload"]) != previous:
            out.append("")
        previous = (row["model"], row["workload"])
        out.append(line(values))
    return "\n".join(out)


def problems(result: dict) -> str:
    lines = [f"FAILED {r['model']} {r['workload']} {r['engine']}: {r['error']}"
             for r in result["rows"] if r["status"] != "ok"]
    reasons = {}
    for s in result["skipped"]:
        reasons.setdefault((s["engine"], s["reason"]), []).append(s["workload"])
    for (engine, reason), names in reasons.items():
        listed = sorted(set(names))
        lines.append(f"skipped {engine} on {', '.join(listed[:6])}{' ...' if len(listed) > 6 else ''}: {reason}")
    return "\n".join(lines)


def print_report(info: dict, result: dict, preset: str, stream=sys.stdout):
    print(machine_header(info, preset), file=stream)
    print(file=stream)
    print(table(result["rows"]) if any(r["status"] == "ok" for r in result["rows"]) else "(no measurements)",
          file=stream)
    extra = problems(result)
    if extra:
        print("\n" + extra, file=stream)
    print("\n" + LEGEND, file=stream)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def write_json(path: Path, info: dict, settings: dict, result: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    document = dict(machine=info, settings=settings, rows=result["rows"], skipped=result["skipped"])
    path.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")


def _series(rows, models, x_key, y_key, where):
    """{model: {label: [(x, y), ...]}} for the ok rows that ``where`` accepts."""
    out = {m: {} for m in models}
    for r in rows:
        if r["status"] == "ok" and where(r):
            out[r["model"]].setdefault(r["engine"], []).append((r[x_key], r[y_key]))
    return out


def _plot(path: Path, title: str, series: dict, xlabel: str, ylabel: str):
    """One subplot per model, one line per engine; log-log axes. Returns the path or None."""
    models = [m for m, lines in series.items() if lines]
    if not models:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for label, points in sorted(series[model].items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({x for points in series[model].values() for x, _ in points})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_title(model)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out_dir: Path, tag: str, rows: list) -> list:
    models = sorted({r["model"] for r in rows})
    greedy = lambda r: r["group"] == "greedy"  # noqa: E731
    plots = [
        (f"{tag}-latency-vs-batch.png", "greedy decoding latency per step",
         _series(rows, models, "batch", "ms_per_token", greedy), "batch size", "ms per generated token"),
        (f"{tag}-throughput-vs-batch.png", "greedy decoding throughput",
         _series(rows, models, "batch", "tokens_per_s", greedy), "batch size", "generated tokens / s"),
    ]
    batches = sorted({r["batch"] for r in rows if r["kind"] == "encoder"})
    for batch in batches:
        plots.append((f"{tag}-encoder-time-vs-length-b{batch}.png", f"encoder forward, batch {batch}",
                      _series(rows, models, "source_length", "median_ms",
                              lambda r, b=batch: r["kind"] == "encoder" and r["batch"] == b),
                      "sequence length", "median ms"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot(out_dir / name, title, series, xl, yl) for name, title, series, xl, yl in plots]
    return [p for p in written if p is not None]
