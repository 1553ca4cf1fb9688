"""What the row-wise Triton launchers can run, shared by their `unsupported()` functions."""

import os

import torch


def dtype_device_reason(case, tensor_keys, dtypes):
    """Why a call described by `case` (docs/backend-contract.md) cannot run, or None.

    dtype/device come from the case keys, else from the tensors named in `tensor_keys`.
    """
    dtype, device = case.get("dtype"), case.get("device")
    for key in tensor_keys:
        t = case.get(key)
        if isinstance(t, torch.Tensor):
            dtype, device = dtype or t.dtype, device or t.device
    if dtype is not None and dtype not in dtypes:
        return f"dtype {dtype}"
    if device is not None and torch.device(device).type != "cuda" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1"
    return None
