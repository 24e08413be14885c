"""Host-to-device copies that do not wait for the GPU.

``tensor.to("cuda")`` and ``torch.tensor(data, device="cuda")`` copy synchronously: the host waits
until the stream has drained, so a copy issued after a forward was launched would stall the host for
the whole forward. An asynchronous copy from ordinary (pageable) host memory is staged by the CUDA
driver before the call returns, so the source may be reused or freed at once; ordered on the stream,
the kernels after it see the data. Off CUDA this is a plain ``to``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(
    data: np.ndarray | Sequence, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``data`` (a numpy array, or nested Python numbers) as a tensor on ``device``, copied asynchronously."""
    host = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    return host.to(device, non_blocking=True)
