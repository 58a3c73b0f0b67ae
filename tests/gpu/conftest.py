"""GPU-only tests: each module marks itself `cuda` and is skipped where torch sees no CUDA device.

Parity on a GPU compares like with like: deterministic algorithms and no TF32, in the reference and the
engine alike (cuBLAS needs its workspace setting before it starts, hence at import)."""

import os

import pytest

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")


@pytest.fixture(autouse=True)
def deterministic_cuda():
    import torch

    if not torch.cuda.is_available():
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.are_deterministic_algorithms_enabled())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, where an op has no such kernel
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.use_deterministic_algorithms(before[2])
