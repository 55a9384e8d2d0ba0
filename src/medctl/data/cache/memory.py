"""What one preprocessing worker needs in memory, and what there is: the bound the pool is sized by."""

from __future__ import annotations

import numpy as np

from medctl.config import PreprocessConfig
from medctl.devices import available_memory
from medctl.errors import DataError

WORKER_BASE_BYTES = 2**30  # a worker's interpreter, torch and MONAI, on top of its volume


def worker_memory_bytes(voxels: int) -> int:
    """The bound one worker stays under: 3x the source volume as float32, plus the interpreter."""
    return 3 * 4 * int(voxels) + WORKER_BASE_BYTES


def memory_budget(memory_gb: float) -> int:
    """``memory_gb`` in bytes, or (0) the memory available now (:func:`medctl.devices.available_memory`)."""
    return int(memory_gb * 2**30) if memory_gb else available_memory()


def check_output_fits(settings: PreprocessConfig, memory_gb: float) -> None:
    """DataError before any sample is read when one cached volume of ``spatial_size`` cannot be made in the
    memory there is: the float32 output, the intensity step's copy and the cast (3x), plus the interpreter."""
    if settings.slices or not settings.spatial_size:
        return
    voxels = int(np.prod(settings.spatial_size, dtype=np.float64))
    need, budget = worker_memory_bytes(voxels), memory_budget(memory_gb)
    if need <= budget:
        return
    where = "data.preprocess.memory_gb" if memory_gb else "available now"
    raise DataError(
        f"data.preprocess.spatial_size {list(settings.spatial_size)} makes each cached volume {voxels:,} voxels "
        f"({4 * voxels / 2**30:.1f} GiB as float32; ~{need / 2**30:.1f} GiB while it is made), more than the "
        f"{budget / 2**30:.1f} GiB {where}: lower data.preprocess.spatial_size"
    )
