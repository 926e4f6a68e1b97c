"""The package itself: what was built, fastdl.info(), backend settings, and the
Triton kernels shipping as the private fastdl._kernels package."""
import os
import subprocess
import sys

import pytest
import torch

import fastdl
from fastdl import _backend


def test_extension_built_and_reports_itself():
    assert _backend._C is not None, f"fastdl._C did not load: {_backend.C_ERROR}"
    # Built with CUDA exactly when torch has CUDA, unless FASTDL_NO_CUDA was set.
    if torch.version.cuda is None:
        assert not _backend.WITH_CUDA and _backend.CUDA_ARCHS == "none"


def test_info_lists_every_op_and_device(capsys):
    fastdl.info()
    out = capsys.readouterr().out
    assert f"torch        {torch.__version__}" in out
    for op in _backend.OPS:
        assert any(line.startswith(op) for line in out.splitlines()), op


def test_python_m_fastdl_info_runs():
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fastdl.info"],
                         capture_output=True, text=True, check=True)
    assert "fastdl._C" in out.stdout and "activation" in out.stdout


def test_kernels_are_a_private_subpackage():
    kernels = _backend.load_kernels("activation")
    assert kernels.__name__ == "fastdl._kernels.activation"
    import importlib.util
    # Never a top-level `kernels` (a different project owns that name on PyPI)
    # unless it is our source checkout sitting on sys.path.
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        assert os.path.dirname(spec.origin) == os.path.join(os.path.dirname(os.path.dirname(fastdl.__file__)),
                                                             "kernels")


def test_env_backend_is_read_and_checked():
    code = "import fastdl; print(fastdl.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTDL_BACKEND": "torch"})
    assert out.stdout.strip() == "torch"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTDL_BACKEND": "fast"})
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


@pytest.mark.parametrize("name", ["cuda", "cpu", "triton", "torch", "auto"])
def test_use_backend_restores(name):
    before = fastdl.get_backend()
    with fastdl.use_backend(name):
        assert fastdl.get_backend() == name
    assert fastdl.get_backend() == before
