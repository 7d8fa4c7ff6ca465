"""Suite-wide settings."""

import torch


def pytest_configure(config):
    # The tests run on tiny tensors, two processes at a time (pytest -n 2) on two cores: one
    # thread per process is several times faster than OpenMP teams competing for the cores.
    torch.set_num_threads(1)
