"""Shared test setup: Triton interpreter on GPU-less machines, seeds, the
(device, backend) cases each op is tested on, and one tolerance table."""
import os

import torch

# Triton reads this when imported, and fastdl imports triton lazily: set it
# before anything else so CPU-only machines run the Triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check numerics: each autotuned Triton kernel runs its first config
# instead of timing every config for every test shape (minutes of GPU time).
# The benchmarks autotune, and check every provider before timing it.
os.environ.setdefault("FASTDL_AUTOTUNE", "0")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

import fastdl  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NO_GPU = "needs a CUDA GPU (none visible on this machine)"


def backend_cases(triton: bool = True, native_cpu: bool = True):
    """pytest params of (device, backend) for every backend of an op.

    CUDA cases are always listed and skipped, with the reason, when no GPU is
    visible, so a CPU run shows what it did not check.
    """
    cases = []
    if native_cpu:
        cases.append(pytest.param("cpu", "cpu", id="cpu-cpp"))
    if triton:
        cases.append(pytest.param("cpu", "triton", id="cpu-triton_interp", marks=[
            pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
            pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "(set by this conftest only where no GPU is visible)")]))
    cases.append(pytest.param("cpu", "torch", id="cpu-torch"))
    gpu = pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
    cases.append(pytest.param("cuda", "cuda", id="cuda-cuda", marks=[gpu, pytest.mark.gpu]))
    if triton:
        cases.append(pytest.param("cuda", "triton", id="cuda-triton", marks=[gpu, pytest.mark.gpu]))
    cases.append(pytest.param("cuda", "torch", id="cuda-torch", marks=[gpu, pytest.mark.gpu]))
    return cases


# Per output dtype: what one rounding of an fp32-exact result allows, with a
# little room (the interpreter rounds to bf16 toward zero: up to 1 ulp).
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}

# Relative L2 error allowed for reductions (bias/weight grads), per dtype of
# the values reduced.
REL_L2 = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype=None, msg=""):
    """Elementwise check against a higher-precision reference, per-dtype tolerance."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{msg}\n{m}")


def assert_rel_l2(actual, expected, dtype, msg=""):
    """Relative L2 check for reductions, whose elementwise error grows with
    size: ||a - e|| <= REL_L2 * ||e|| + atol * sqrt(n), atol from TOL."""
    a, e = actual.double().flatten(), expected.double().flatten()
    assert a.shape == e.shape, f"{msg}: shape {a.shape} != {e.shape}"
    if e.numel() == 0:
        return
    err = (a - e).norm().item()
    bound = REL_L2[dtype] * e.norm().item() + TOL[dtype]["atol"] * e.numel() ** 0.5
    assert err <= bound, f"{msg}: L2 error {err:.3g} > {bound:.3g} (||expected|| {e.norm().item():.3g})"


def pytest_collection_modifyitems(config, items):
    # The >2^31-element tests take most of the machine's memory: run them last,
    # so their memory pressure cannot disturb other tests.
    items.sort(key=lambda item: item.get_closest_marker("large") is not None)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    yield
    fastdl._backend._choice.clear()
    fastdl._backend._choice[None] = "auto"
