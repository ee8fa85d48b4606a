"""`pytest benchmarks`: the perfml.bench case registry through pytest-benchmark.

Interpret mode is turned off here on CPU machines: it runs the Triton kernels through numpy, which
is right for testing kernel code (tests/conftest.py turns it on) and meaningless for timing. With
it off, perfml on CPU means the C++ kernels when perfml._C is built and the reference otherwise,
which is what a CPU user runs. It must happen before anything imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)


def pytest_addoption(parser):
    parser.addoption(
        "--perfml-quick",
        action="store_true",
        help="benchmark only the cases' --quick sizes (on CUDA: the headline shape)",
    )
