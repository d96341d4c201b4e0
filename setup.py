"""Builds r1mega's CUDA kernels (kernels/csrc) ahead of time where CUDA torch, a CUDA toolkit
and a GPU (or TORCH_CUDA_ARCH_LIST) are present at install time (`pip install
--no-build-isolation -e .`, which scripts/setup.sh uses on such machines; the test is
r1mega/ops/kernel_sources.py's `ahead_of_time`). Anywhere else r1mega installs without them,
and a GPU machine builds them just in time on first use (r1mega/ops/kernels.py). The rest of
the package metadata is in pyproject.toml."""

import runpy
from pathlib import Path

from setuptools import setup


def kernel_build() -> dict:
    """setup() arguments for the r1mega._kernels extension, or none where it cannot be built."""
    root = Path(__file__).resolve().parent
    spec = runpy.run_path(str(root / "r1mega" / "ops" / "kernel_sources.py"))
    if not spec["ahead_of_time"]():
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # bindings.cpp stringifies the macro (no quotes to survive the build's shell)
    define = f"-DR1MEGA_SOURCES_DIGEST={spec['digest']()}"
    ext = CUDAExtension("r1mega._kernels", [str(p.relative_to(root)) for p in spec["sources"]()],
                        depends=[str(p.relative_to(root)) for p in spec["headers"]()],
                        extra_compile_args={"cxx": [*spec["CXX_FLAGS"], define], "nvcc": spec["NVCC_FLAGS"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":
    setup(**kernel_build())
