"""Suite-wide settings."""

import os

import torch

# The tests call the momres command in their own process; it would tell glibc to keep freed
# memory (memory.keep_freed_memory) for the rest of the process, under the resident-memory tests.
os.environ["MOMRES_KEEP_FREED_MEMORY"] = "0"


def pytest_configure(config):
    # The tests run on tiny tensors, two processes at a time (pytest -n 2) on two cores: one
    # thread per process is several times faster than OpenMP teams competing for the cores.
    torch.set_num_threads(1)
