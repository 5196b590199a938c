"""Build: the Python package plus the C++ CPU kernels (csrc/, built by CMakeLists.txt).

The extension is `umt5_fast._C`. Set UMT5_FAST_NO_EXT=1 to skip it (backend="eager" still works);
otherwise a failing build fails the install loudly instead of shipping a silently slower package.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            "cmake", str(ROOT), f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DUMT5_FAST_OUTPUT_DIR={out_dir}", "-DCMAKE_BUILD_TYPE=Release",
        ]
        subprocess.run(config, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


ext_modules = [] if os.environ.get("UMT5_FAST_NO_EXT") == "1" else [CMakeExtension("umt5_fast._C")]

setup(
    name="umt5_fast",
    version="0.1.0",
    description="Fast inference for UMT5 models: Triton GPU kernels, C++ CPU kernels, drop-in transformers API",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # `kernels/` holds the Triton kernels; it ships as `umt5_fast.kernels` because a popular PyPI
    # package is called `kernels` and transformers probes for it. `benchmarks/` ships as
    # `umt5_fast.benchmarks` so that `umt5-fast bench` works from an installed package.
    packages=find_packages(include=["umt5_fast", "umt5_fast.*"]) + ["umt5_fast.kernels", "umt5_fast.benchmarks"],
    package_dir={"umt5_fast": "umt5_fast", "umt5_fast.kernels": "kernels", "umt5_fast.benchmarks": "benchmarks"},
    package_data={"umt5_fast": ["assets/*/*"]},
    install_requires=["torch>=2.4", "safetensors>=0.4", "sentencepiece>=0.1.99", "numpy>=1.24"],
    extras_require={
        # transformers 4.x is the oracle (5.x forces tied embeddings for UMT5); diffusers 0.35 is the
        # newest that works beside it (the WanPipeline drop-in test)
        "test": ["transformers>=4.45,<5", "protobuf", "pytest", "pytest-benchmark", "hypothesis",
                 "diffusers>=0.33,<0.36", "ftfy", "accelerate"],
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib", "ctranslate2>=4.0"],
        "formats": ["gguf>=0.10"],
    },
    entry_points={"console_scripts": ["umt5-fast=umt5_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
