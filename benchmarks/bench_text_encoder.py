"""Text-encoder benchmark: the umt5-xxl encoder of Wan 2.x video pipelines, loaded from each
single-file format (``umt5_fast.formats``), against transformers bf16 on this CPU. Not run in CI.

    python -m benchmarks.bench_text_encoder               # umt5-xxl shape: ~31 GB of files, hours on 2 cores
    python -m benchmarks.bench_text_encoder --layers 2    # a 2-layer variant (same widths and vocab): minutes

Random weights are written once per shape under ``--cache-dir`` (``text-encoder-<N>L/``), streamed
one tensor at a time:

- ``model.safetensors`` + ``config.json``: bf16. transformers loads the directory; umt5_fast loads the
  file alone, which is also exactly ComfyUI's ``umt5_xxl_bf16.safetensors`` layout (same names);
- ``umt5_xxl_fp8_e4m3fn.safetensors`` and ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (ComfyUI fp8,
  legacy per-tensor ``scale_weight``), embedding and norms in bf16 as in ComfyUI's files;
- ``umt5-xxl-encoder-Q8_0.gguf`` (llama.cpp ``t5encoder``; token embedding Q8_0 too, norms F32).

Each engine runs in its own fresh process (``suite.run_in_subprocess``) with bf16 compute: load
time, peak RSS growth while loading, RSS held after loading, then one warm-up 1x512 call and the
timed 1x512 and 4x512 encodes (the peak column includes them). Every engine starts cold: its files
are evicted from the page cache first (``posix_fadvise``), and ``cold_start_s`` = load + the first
encode - a warm encode of the same shape is set against ``read_s``, one plain read of the files.
"""
import argparse
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch

from .machine import current_rss_mb, peak_rss_mb
from .models import default_cache_dir
from .suite import SubprocessFailed, run_in_subprocess

XXL_SHAPE = dict(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6)
SEQUENCE_LENGTH = 512
BATCHES = (1, 4)
FILES = {  # engine -> file (relative to the shape's directory)
    "transformers bf16": ".",
    "umt5_fast bf16": "model.safetensors",
    "umt5_fast fp8": "umt5_xxl_fp8_e4m3fn.safetensors",
    "umt5_fast fp8 scaled": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "umt5_fast gguf Q8_0": "umt5-xxl-encoder-Q8_0.gguf",
    "umt5_fast w8a8": "model.safetensors",  # the bf16 file, quantised to int8 at load (quantize="w8a8")
}
QUANTIZE = {"umt5_fast w8a8": "w8a8"}
FP8_SCALE = 1 / 4096  # the scaled file stores weight / FP8_SCALE (random weights ~0.02: well inside e4m3's range)


# ---------------------------------------------------------------------------------------------
# Random-weight files, streamed
# ---------------------------------------------------------------------------------------------
def encoder_tensors(config):
    """(name, shape) of every UMT5 encoder tensor, transformers' names, in checkpoint order."""
    import umt5_fast
    with torch.device("meta"):
        skeleton = umt5_fast.UMT5EncoderModel(config, backend="eager")
    return [(name, tuple(p.shape)) for name, p in skeleton.named_parameters()]


def is_linear(name: str) -> bool:
    return name.rsplit(".", 2)[-2] in ("q", "k", "v", "o", "wi_0", "wi_1", "wo")


def tiled(pool: np.ndarray, count: int) -> np.ndarray:
    """``count`` values repeating a random ``pool``: random enough for timing, and fast to make."""
    return np.resize(pool, count)


def write_safetensors(path: Path, entries):
    """Stream a safetensors file: ``entries`` = [(name, torch dtype, shape, make() -> numpy bytes)]."""
    from umt5_fast.loading import _SAFETENSORS_DTYPES
    dtype_names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": dtype_names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, _, _, make in entries:
            make().tofile(f)


def write_files(directory: Path, config):
    directory.mkdir(parents=True, exist_ok=True)
    tensors = encoder_tensors(config)
    rng = np.random.default_rng(0)
    normal = (rng.standard_normal(1 << 20) * 0.02).astype(np.float32)
    bf16 = torch.from_numpy(normal).to(torch.bfloat16).view(torch.int16).numpy()
    fp8 = {scale: torch.from_numpy(normal / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
           for scale in (1.0, FP8_SCALE)}

    def numel(shape):
        return int(np.prod(shape, dtype=np.int64))

    def bf16_entry(name, shape):
        return name, torch.bfloat16, shape, lambda: tiled(bf16, numel(shape))

    if not (directory / "model.safetensors").is_file():
        print(f"writing {directory / 'model.safetensors'}")
        write_safetensors(directory / "model.safetensors", [bf16_entry(n, s) for n, s in tensors])
        config.save_pretrained(directory)
    for file, scale in (("umt5_xxl_fp8_e4m3fn.safetensors", None),
                        ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", FP8_SCALE)):
        if (directory / file).is_file():
            continue
        print(f"writing {directory / file}")
        entries = []
        for name, shape in tensors:
            if not is_linear(name):
                entries.append(bf16_entry(name, shape))
                continue
            pool = fp8[scale or 1.0]
            entries.append((name, torch.float8_e4m3fn, shape, lambda shape=shape, pool=pool: tiled(pool, numel(shape))))
            if scale is not None:
                scale_name = name[: -len("weight")] + "scale_weight"
                entries.append((scale_name, torch.float32, (), lambda scale=scale: np.array(scale, np.float32)))
        if scale is not None:
            entries.append(("scaled_fp8", torch.float8_e4m3fn, (0,), lambda: np.zeros(0, np.uint8)))
        write_safetensors(directory / file, entries)
    gguf_path = directory / FILES["umt5_fast gguf Q8_0"]
    if not gguf_path.is_file():
        print(f"writing {gguf_path}")
        write_gguf_q8_0(gguf_path, config, tensors, normal)


def write_gguf_q8_0(path: Path, config, tensors, normal):
    """llama.cpp's t5encoder layout (see umt5_fast/formats/gguf.py): Q8_0 matrices, F32 norms, F16 bias tables."""
    import gguf
    from umt5_fast.formats.gguf import TENSOR_NAMES
    T = gguf.GGMLQuantizationType
    q8_row = gguf.quants.quantize(normal[: 1 << 16].reshape(1, -1), T.Q8_0).reshape(-1)  # 2048 blocks
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_context_length(512)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_key_length(config.d_kv)
    writer.add_value_length(config.d_kv)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
    makers = []
    for name, shape in tensors:
        gguf_name = TENSOR_NAMES.theirs(name)
        if len(shape) == 1:
            array = lambda shape=shape: np.ones(shape, np.float32)  # noqa: E731
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), 4 * shape[0])
        elif "relative_attention_bias" in name:
            array = lambda shape=shape: tiled(normal, int(np.prod(shape))).astype(np.float16).reshape(shape)  # noqa: E731
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float16), 2 * int(np.prod(shape)))
        else:
            byte_shape = (shape[0], shape[1] // 32 * 34)
            array = lambda byte_shape=byte_shape: tiled(q8_row, byte_shape[0] * byte_shape[1]).reshape(byte_shape)  # noqa: E731
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                                   raw_dtype=T.Q8_0)
        makers.append(array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for make in makers:
        writer.write_tensor_data(make())
    writer.close()


# ---------------------------------------------------------------------------------------------
# Inside the measuring process
# ---------------------------------------------------------------------------------------------
def measure(engine: str, path: str, vocab_size: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    if engine.startswith("transformers"):
        import transformers

        def load():
            return transformers.UMT5EncoderModel.from_pretrained(path, dtype=torch.bfloat16).eval()
    else:
        import umt5_fast

        def load():
            return umt5_fast.UMT5EncoderModel.from_pretrained(path, dtype=torch.bfloat16, progress=False,
                                                              quantize=QUANTIZE.get(engine))
    before = current_rss_mb()
    start = time.perf_counter()
    model = load()
    result = {"load_s": time.perf_counter() - start, "load_peak_mb": peak_rss_mb() - before,
              "loaded_mb": current_rss_mb() - before}
    generator = torch.Generator().manual_seed(0)

    def encode(batch):
        ids = torch.randint(2, vocab_size, (batch, SEQUENCE_LENGTH), generator=generator)
        mask = torch.ones_like(ids)
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        return time.perf_counter() - start

    # Warm-up (first-call allocations, kernel selection) and, with the files evicted from the page
    # cache by the driver, the cold read of every weight the encoder touches.
    result["first_encode_s"] = encode(1)
    for batch in BATCHES:
        result[f"encode_{batch}x{SEQUENCE_LENGTH}_s"] = encode(batch)
    result["peak_mb"] = peak_rss_mb() - before
    return result


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=XXL_SHAPE["num_layers"],
                        help="encoder layers (umt5-xxl: 24); widths and vocab stay xxl's")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where the files are written")
    parser.add_argument("--engines", default=",".join(FILES), help=f"comma-separated subset of: {', '.join(FILES)}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per engine")
    args = parser.parse_args(argv)
    import umt5_fast
    config = umt5_fast.UMT5Config(**dict(XXL_SHAPE, num_layers=args.layers))
    directory = args.cache_dir / f"text-encoder-{args.layers}L"
    write_files(directory, config)
    engines = [e.strip() for e in args.engines.split(",")]
    unknown = [e for e in engines if e not in FILES]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {list(FILES)}")
    rows = []
    for engine in engines:
        path = directory / FILES[engine]
        files = [path / "model.safetensors"] if path.is_dir() else [path]
        read_s = cold_read_seconds(files)
        print(f"{engine}: {path} (a cold read of the file takes {read_s:.1f} s)", flush=True)
        evict_from_page_cache(files)  # the engine starts cold
        try:
            row = run_in_subprocess(measure, engine, str(path), config.vocab_size, args.threads, timeout_s=args.timeout)
            # load and the first encode, less a warm encode of the same shape: the I/O of a cold start
            row["cold_start_s"] = row["load_s"] + row["first_encode_s"] - row[f"encode_1x{SEQUENCE_LENGTH}_s"]
            row["cold_vs_read"] = row["cold_start_s"] / read_s
        except SubprocessFailed as exc:
            row = {"error": str(exc).splitlines()[-1]}
        rows.append(dict(engine=engine, file_gb=sum(f.stat().st_size for f in files) / 1e9, read_s=read_s, **row))
    print_table(rows, config, args.threads)
    out = directory / "results.json"
    out.write_text(json.dumps({"layers": args.layers, "threads": args.threads, "rows": rows}, indent=2))
    print(f"results: {out}")


def evict_from_page_cache(files):
    """Drop the files' clean pages from the page cache (no process maps them between engines), so
    the next reader starts cold, as after a reboot; Linux ``posix_fadvise``, best effort."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read_seconds(files) -> float:
    """Seconds to read the files once from disk (the yardstick of a cold load)."""
    evict_from_page_cache(files)
    buffer = bytearray(16 << 20)
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


def print_table(rows, config, threads):
    timed = [f"encode_{batch}x{SEQUENCE_LENGTH}_s" for batch in BATCHES]
    columns = [("file_gb", 8, 2), ("read_s", 7, 1), ("cold_start_s", 13, 1), ("cold_vs_read", 13, 2), ("load_s", 8, 1),
               ("load_peak_mb", 13, 0), ("loaded_mb", 10, 0), ("peak_mb", 9, 0)]
    columns += [(name, 15, 2) for name in timed]
    print(f"\numt5-xxl-shaped encoder, {config.num_layers} layers, bf16 compute, {threads} threads")
    print(f"{'engine':<22}" + "".join(f"{name:>{width}}" for name, width, _ in columns))
    reference = next((r for r in rows if r["engine"].startswith("transformers") and "error" not in r), None)
    for row in rows:
        if "error" in row:
            print(f"{row['engine']:<22}failed: {row['error']}")
            continue
        line = f"{row['engine']:<22}" + "".join(f"{row[name]:>{width}.{digits}f}" for name, width, digits in columns)
        if reference is not None and row is not reference:
            line += "   vs transformers: " + ", ".join(f"{reference[name] / row[name]:.2f}x" for name in timed)
        print(line)


if __name__ == "__main__":
    main()
