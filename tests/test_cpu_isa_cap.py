"""UMT5_FAST_CPU_ISA: a cap on the instruction sets the C++ kernels use, read when the extension
loads (each case runs in a fresh interpreter), and the benchmarks' --cpu-isa built on it."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import machine

_C = pytest.importorskip("umt5_fast._C")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    """``code`` in a fresh interpreter with ``env`` added; its CompletedProcess."""
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def extension_state(cap):
    """What the extension reports under UMT5_FAST_CPU_ISA=cap, as a dict."""
    done = run_python(
        "import json, umt5_fast._C as C\n"
        "state = dict(selected=C.cpu_isa(), supported=C.supported_cpu_isas(), amx=C.has_amx_attention(),\n"
        "             bf16_attention=C.has_bf16_attention())\n"
        "from umt5_fast.ops import cpu\n"
        "state.update(wide_gemms=cpu.WIDE_GEMMS)\n"
        "print(json.dumps(state))", UMT5_FAST_CPU_ISA=cap)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("cap", ["generic", "avx2", "avx512"])
def test_cap_limits_the_kernels_and_the_paths_built_on_them(cap):
    order = ["generic", "avx2", "avx512"]
    hardware = extension_state("amx")["supported"]  # (this process may run under a cap itself)
    expected = [isa for isa in hardware if order.index(isa) <= order.index(cap)]
    state = extension_state(cap)
    assert state["supported"] == expected
    assert state["selected"] == expected[-1]
    assert state["amx"] is False  # "avx512" means without AMX tiles
    if cap != "avx512":
        assert not (state["bf16_attention"] or state["wide_gemms"])


def test_amx_and_unset_mean_no_cap():
    uncapped = extension_state("")
    assert extension_state("amx") == uncapped
    assert set(_C.supported_cpu_isas()) <= set(uncapped["supported"])  # equal unless this process is capped
    assert uncapped["selected"] == uncapped["supported"][-1]


def test_forcing_an_isa_above_the_cap_names_the_cap():
    done = run_python("import umt5_fast._C as C\nC.set_cpu_isa('avx512')", UMT5_FAST_CPU_ISA="generic")
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ValueError: avx512 is not available") and "UMT5_FAST_CPU_ISA" in message


def test_a_misspelt_cap_fails_the_import_loudly():
    # The package's check: a ValueError at `import umt5_fast`, not an extension silently left out.
    done = run_python("import umt5_fast", UMT5_FAST_CPU_ISA="avx-512")
    assert done.returncode != 0
    assert "ValueError: UMT5_FAST_CPU_ISA must be 'generic', 'avx2', 'avx512' or 'amx', got 'avx-512'" in done.stderr
    # The extension's own check, loading it without the package (as an embedding would).
    done = run_python(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('_C', {_C.__file__!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))", UMT5_FAST_CPU_ISA="sse")
    assert done.returncode != 0
    assert "ImportError: UMT5_FAST_CPU_ISA must be 'generic', 'avx2', 'avx512' or 'amx', got 'sse'" in done.stderr


def test_model_under_a_cap_matches_the_uncapped_model(checkpoint_factory):
    """The whole cpu backend under the avx2 cap: the same logits as without a cap (fp32; both are
    checked against transformers elsewhere), with padding on the left."""
    directory, _ = checkpoint_factory(num_heads=3, d_kv=24, d_model=40, d_ff=56, num_layers=2,
                                      num_decoder_layers=2)
    code = (
        "import sys, torch, umt5_fast._C as C\n"
        "from umt5_fast import UMT5ForConditionalGeneration\n"
        f"model = UMT5ForConditionalGeneration.from_pretrained({str(directory)!r}, backend='cpu')\n"
        "g = torch.Generator().manual_seed(3)\n"
        "ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=g)\n"
        "mask = torch.ones_like(ids); mask[1, :9] = 0\n"
        "labels = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits\n"
        "torch.save(dict(isa=C.cpu_isa(), logits=logits), sys.argv[1] if len(sys.argv) > 1 else 'x')\n")
    results = {}
    for cap in ("avx2", ""):
        path = directory / f"logits-{cap or 'none'}.pt"
        done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "UMT5_FAST_CPU_ISA": cap})
        assert done.returncode == 0, done.stderr
        import torch
        results[cap] = torch.load(path)
    assert results["avx2"]["isa"] in ("avx2", "generic")
    torch.testing.assert_close(results["avx2"]["logits"], results[""]["logits"], rtol=1e-5, atol=1e-5)


def test_the_benchmarks_cap_restarts_the_process_with_every_librarys_cap_set():
    """``--cpu-isa``: oneDNN reads its cap when torch loads, so the run starts again with all of
    them set (and only once: the restarted process finds them set)."""
    if "avx2" not in _C.supported_cpu_isas():
        pytest.skip("no AVX2 here")
    report = ("import os, torch, umt5_fast._C as C; "
              "print(os.environ['ONEDNN_MAX_CPU_ISA'], torch.backends.cpu.get_cpu_capability(), C.cpu_isa())")
    done = run_python("import sys; from benchmarks import machine\n"
                      f"machine.cap_instruction_sets('avx2', [sys.executable, '-c', {report!r}])\n"
                      "print('not restarted')")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["AVX2", "AVX2", "avx2"]
    done = run_python("import sys; from benchmarks import machine\n"
                      "machine.cap_instruction_sets('avx2', [sys.executable, '-c', 'print(1)'])\n"
                      "print('not restarted')", **machine.ISA_CAP_ENVIRONMENT["avx2"])
    assert done.stdout.strip() == "not restarted"
