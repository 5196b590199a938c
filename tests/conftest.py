import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))
if not torch.cuda.is_available():
    # Triton kernels run in its CPU interpreter; must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cpu_isas():
    try:
        import umt5_fast._C as extension
    except ImportError:  # the modules using every_cpu_isa skip themselves then
        return ["none"]
    return extension.supported_cpu_isas()


@pytest.fixture(params=_cpu_isas())
def every_cpu_isa(request):
    """Run the test with the C++ kernels of each instruction set this CPU has, then restore the
    default (``pytestmark = pytest.mark.usefixtures("every_cpu_isa")``)."""
    import umt5_fast._C as extension
    default = extension.cpu_isa()
    extension.set_cpu_isa(request.param)
    yield request.param
    extension.set_cpu_isa(default)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Build (and cache per session) a random transformers checkpoint: returns (dir, hf_model)."""
    from helpers import make_hf_model, save_hf
    cache = {}

    def make(class_name="UMT5ForConditionalGeneration", seed=0, **overrides):
        key = (class_name, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            model = make_hf_model(class_name, seed=seed, **overrides)
            path = tmp_path_factory.mktemp(class_name)
            cache[key] = (save_hf(model, path), model)
        return cache[key]

    return make
