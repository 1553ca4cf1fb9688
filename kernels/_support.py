"""What the Triton launchers can run, shared by their `unsupported()` functions and launchers."""

import torch

from ._compat import interpreting


def device_reason(device, min_capability=None):
    """Why Triton kernels cannot run on `device`, or None. Non-CUDA tensors need the
    interpreter; with `min_capability` ((major, minor)) only CPU and CUDA devices of at least
    that compute capability are accepted."""
    device = torch.device(device)
    if device.type != "cuda" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if min_capability is None:
        return None
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type}"
    if device.type == "cuda" and torch.cuda.is_available() \
            and torch.cuda.get_device_capability(device) < tuple(min_capability):
        return "needs compute capability {}.{} or newer".format(*min_capability)
    return None


def assert_runnable(*tensors):
    """Launcher-side assertion (the public functions choose the backend with `unsupported`)."""
    for t in tensors:
        reason = device_reason(t.device)
        assert reason is None, reason


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
    if device is not None:
        return device_reason(device)
    return None
