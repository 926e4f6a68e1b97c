"""Builds the fastdl._C extension; all static metadata lives in pyproject.toml.

CUDA sources are compiled whenever torch was built with CUDA and nvcc is found;
no visible GPU is needed. Otherwise (or with FASTDL_NO_CUDA=1) only the C++ CPU
kernels are built, and fastdl.info() says so.

Environment:
  FASTDL_NO_CUDA=1         build the CPU kernels only
  FASTDL_CUDA_ARCHS="8.0;9.0a"   archs to build for (default sm_80 and sm_90a)
  MAX_JOBS                 parallel compile jobs (default: sized to cores and memory)
"""
import glob
import os

from setuptools import setup


def _default_jobs() -> int:
    # nvcc on torch headers peaks around 3 GiB per job.
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 3)))


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    rel = lambda paths: sorted(os.path.relpath(p, root) for p in paths)  # noqa: E731
    cpp_sources = rel(glob.glob(os.path.join(root, "csrc", "*.cpp")))
    cu_sources = rel(glob.glob(os.path.join(root, "csrc", "*.cu")))
    include_dirs = [os.path.join(root, "csrc")]

    no_cuda = os.environ.get("FASTDL_NO_CUDA", "0") == "1"
    with_cuda = not no_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    archs = os.environ.get("FASTDL_CUDA_ARCHS", "8.0;9.0a")
    cxx_flags = ["-O3", f"-DFASTDL_WITH_CUDA={int(with_cuda)}"]

    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    if not with_cuda:
        reason = ("FASTDL_NO_CUDA=1" if no_cuda else
                  "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
        print(f"fastdl: building the CPU kernels only ({reason})")
        return [CppExtension("fastdl._C", cpp_sources, include_dirs=include_dirs,
                             define_macros=[("FASTDL_CUDA_ARCHS", '"none"')],
                             extra_compile_args={"cxx": cxx_flags})]

    # cpp_extension turns TORCH_CUDA_ARCH_LIST into -gencode flags; it would
    # otherwise probe the visible GPU, and a build box has none.
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"fastdl: building CUDA kernels for {archs} and the CPU kernels")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                  f"-DFASTDL_WITH_CUDA=1"]
    return [CUDAExtension("fastdl._C", cpp_sources + cu_sources, include_dirs=include_dirs,
                          define_macros=[("FASTDL_CUDA_ARCHS", f'"{archs}"')],
                          extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
