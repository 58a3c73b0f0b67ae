"""GPU-only tests: each module marks itself `cuda` and is skipped where torch sees no CUDA device."""


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")
