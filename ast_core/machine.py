"""A one-line description of the machine a number was measured on (CPU model, cores, memory, torch threads, GPU):
written beside every reported result, because the numbers differ between machines (floating-point kernels
depend on the CPU, the thread count and the torch build)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe_machine(device: str = "cpu") -> str:
    """E.g. ``'AMD EPYC 7B13, 2 logical cores, 24 GiB RAM, torch 2.14.1 on 2 threads'`` (plus the GPU's name
    when `device` is a CUDA device)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    meminfo = Path("/proc/meminfo")
    memory = f", {int(meminfo.read_text().split()[1]) / 2**20:.0f} GiB RAM" if meminfo.exists() else ""
    gpu = f"; GPU {torch.cuda.get_device_name(torch.device(device))}" if str(device).startswith("cuda") else ""
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} logical cores{memory}, torch {torch.__version__.split('+')[0]} on "
            f"{threads} thread{'s' if threads > 1 else ''}{gpu}")
