"""Argument checks shared by the public functions: each error names the argument."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name, t, *, ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        # "floating" only when every accepted dtype is one (offsets / key_lengths take ints).
        kind = "a floating dtype" if all(d.is_floating_point for d in dtypes) else "dtype"
        raise ValueError(f"{name} must have {kind} ({names}), got {t.dtype}")
    return t


def check_same(name, t, ref_name, ref, *, dtype=True, device=True):
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if device and t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def broadcast_to(name, t, shape):
    """`t.expand(shape)` or a ValueError naming `name` and both shapes."""
    try:
        return t.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} cannot be broadcast to "
                         f"{tuple(shape)}") from None


def mask_kind(mask):
    if mask is None:
        return None
    return "bool" if mask.dtype == torch.bool else "float"


def window_pair(window, name="window"):
    """The one sliding-window normaliser: None -> (-1, -1) (unbounded), an int w -> (w, w), a
    (left, right) pair of ints each >= 0 or -1 -> itself. Bools are refused (True is not a
    window size)."""
    if window is None:
        return -1, -1
    if isinstance(window, int) and not isinstance(window, bool):
        window = (window, window)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)
            or any(w < -1 for w in window)):
        raise ValueError(f"{name} must be None, an int or a (left, right) pair of ints, each "
                         f">= 0 or -1 (unbounded), got {window!r}")
    return int(window[0]), int(window[1])
