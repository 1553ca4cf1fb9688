"""The torch versions fastattn supports, checked once at import.

Supported and tested: torch >= TORCH_FLOOR (`make test-compat` runs the suite on the floor,
`make test` on requirements.txt's pin). The Python side needs torch.library.custom_op,
register_fake and register_autograd (torch 2.4) at import: older torch gets an ImportError that
names the floor instead of an AttributeError from deep inside fastattn.ops; 2.4 and 2.5 import
with a warning (untested). Triton-version differences live in kernels/_compat.py.
"""

import warnings

import torch

TORCH_FLOOR = (2, 6)
# torch.library APIs fastattn.ops calls at import time
REQUIRED_LIBRARY_APIS = ("custom_op", "register_fake", "register_autograd")
# ... and those of the triton twins (fastattn/ops/_triton.py), both from torch 2.6: on an older
# torch (untested) no twin is registered and compiled graphs keep the opaque fastattn ops
TRITON_OP_APIS = ("triton_op", "wrap_triton")
HAS_TRITON_OP = all(hasattr(torch.library, name) for name in TRITON_OP_APIS)


def parse_version(text):
    """'2.6.0+cu124' -> (2, 6); unknown parts count as 0."""
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) if piece else ""
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))


def torch_version():
    return parse_version(torch.__version__)


def check_torch(version=None, library=None):
    """Raise ImportError when this torch lacks what fastattn needs; warn below the tested floor.
    `version` / `library` stand in for torch.__version__ / torch.library in tests."""
    version = torch.__version__ if version is None else version
    library = torch.library if library is None else library
    floor = ".".join(map(str, TORCH_FLOOR))
    missing = [name for name in REQUIRED_LIBRARY_APIS if not hasattr(library, name)]
    if missing:
        raise ImportError(f"fastattn needs torch >= {floor} (torch.library."
                          f"{', torch.library.'.join(missing)} missing); found torch {version}")
    if parse_version(version) < TORCH_FLOOR:
        warnings.warn(f"fastattn is tested with torch >= {floor}; found torch {version}",
                      RuntimeWarning, stacklevel=3)


check_torch()


def register_ordered_effect(op):
    """Mark the OpOverload `op` as having an ordered side effect, so that torch.compile keeps
    it in the graph (threaded through effect tokens) although it returns nothing. The private
    torch._higher_order_ops.effects._register_effectful_op has this form from torch 2.6 on (it
    is also torch.library._register_effectful_op from 2.9)."""
    from torch._higher_order_ops import effects
    effects._register_effectful_op(op, effects._EffectType.ORDERED)
