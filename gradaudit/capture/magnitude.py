"""Size and finiteness of any gradient: dense, sparse (through its stored values) or complex (through magnitudes).

Every reading is made without a warning: a complex tensor is never cast to a real dtype, and no op is called that a
sparse layout lacks (`torch.isfinite`, `any` and `equal` have no sparse kernels).
"""

from __future__ import annotations

import math

import torch

_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def stored_values(tensor: torch.Tensor) -> torch.Tensor:
    """The elements a tensor stores: a sparse COO tensor's values once duplicates are summed, else the tensor."""
    if tensor.layout == torch.sparse_coo:
        return tensor.coalesce().values()
    if tensor.layout in _COMPRESSED:
        return tensor.values()
    return tensor


def _magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    values = stored_values(tensor.detach())
    return values.abs() if values.dtype.is_complex else values


def norm_unread(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-norm as a 0-d tensor, unread: in the tensor's own precision (half precision: in float32), without the
    copy a cast to double makes (20x slower on a 38M-element gradient)."""
    values = _magnitudes(tensor)
    return torch.linalg.vector_norm(values, dtype=torch.float32 if values.dtype.itemsize < 4 else None)


def read_all(values: list[torch.Tensor]) -> list[float]:
    """0-d tensors as floats, one read (one device synchronisation) per device; cast to double per dtype, not per
    value (10,000 parameters: one cast, not 10,000)."""
    by_device: dict[torch.device, dict[torch.dtype, list[int]]] = {}
    for index, value in enumerate(values):
        by_device.setdefault(value.device, {}).setdefault(value.dtype, []).append(index)
    found = [0.0] * len(values)
    for by_dtype in by_device.values():
        indices = [index for group in by_dtype.values() for index in group]
        stacked = [torch.stack([values[i] for i in group]).double() for group in by_dtype.values()]
        for index, number in zip(indices, torch.cat(stacked).tolist(), strict=True):
            found[index] = number
    return found


def norm(tensor: torch.Tensor) -> float:
    """The 2-norm (`norm_unread`, read); in double when that overflows or the tensor holds NaN/Inf."""
    size = float(norm_unread(tensor))
    return size if math.isfinite(size) else float(_magnitudes(tensor).double().norm())


def squared_norm(tensor: torch.Tensor) -> float:
    """The sum of squared magnitudes."""
    return norm(tensor) ** 2


def all_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(stored_values(tensor.detach())).all())


def all_zero(tensor: torch.Tensor) -> bool:
    return not bool(stored_values(tensor.detach()).any())


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same elements, whatever their layouts."""
    if a.layout != torch.strided or b.layout != torch.strided:
        return a.shape == b.shape and torch.equal(a.to_dense(), b.to_dense())
    return torch.equal(a, b)
