"""Files and provenance: atomic writes (nothing a user wrote is ever half-overwritten) and a
description of the machine that produced a result."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary_path)``, then rename it to ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))




def machine() -> dict[str, Any]:
    """Python, torch, processor, cores, threads (and the GPU): what a figure was measured on."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
