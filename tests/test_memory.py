"""Loading is memory-mapped: a umt5-base-shaped checkpoint (vocab cut to 32128 to keep CI fast)
costs at most 1.2x its file size in peak RSS, measured in a fresh subprocess."""
import json
import subprocess
import sys
import textwrap

import torch

BASE_SHAPE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                  num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def write_random_checkpoint(directory):
    """Random weights under transformers' key names, written without building a model."""
    from safetensors.torch import save_file

    import umt5_fast
    config = umt5_fast.UMT5Config(**BASE_SHAPE)
    with torch.device("meta"):
        skeleton = umt5_fast.UMT5ForConditionalGeneration(config, backend="eager")
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(p.shape, generator=g) * 0.05 for name, p in skeleton.named_parameters()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return sum(t.numel() * t.element_size() for t in state.values())


PROBE = textwrap.dedent("""
    import sys, torch
    import umt5_fast

    def status_bytes(field):  # VmHWM is this process's own peak (ru_maxrss can carry the parent's)
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    torch.ones(1) @ torch.ones(1)  # let torch set up its own allocations first
    before = status_bytes("VmHWM")
    model = umt5_fast.UMT5ForConditionalGeneration.from_pretrained(sys.argv[1], backend="eager")
    checksum = sum(float(p.float().sum()) for p in model.parameters())  # touch every weight
    after = status_bytes("VmHWM")
    ids = torch.tensor([[5, 6, 7, 1]])
    model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=False)
    print(after - before)
""")


def test_loading_base_shaped_checkpoint_peaks_below_1_2x_its_size(tmp_path):
    file_bytes = write_random_checkpoint(tmp_path)
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    peak_growth = int(result.stdout.strip().splitlines()[-1])
    ratio = peak_growth / file_bytes
    print(f"peak RSS growth {peak_growth / 2**20:.0f} MiB for {file_bytes / 2**20:.0f} MiB of weights: {ratio:.2f}x")
    assert ratio <= 1.2, f"loading took {ratio:.2f}x the checkpoint size in peak RSS"
