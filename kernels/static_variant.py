"""Description of one compiled configuration of a Triton kernel, for the GPU static report.

Each kernels module exposes `static_variants(arch: int) -> list[StaticVariant]`: every
configuration its launcher or autotuner may pick on that arch (80 or 90). The report
(`python -m benchmarks.gpu_static`) compiles each with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` and reads registers, shared memory, spills and MMA
instructions from the cubin.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StaticVariant:
    kernel: object            # the @triton.jit function
    name: str                 # e.g. "attention_fwd"
    config: str               # human-readable, e.g. "fp16 d=64 causal BM=128 BN=64 w=4 s=3"
    signature: dict           # ASTSource signature: arg name -> "*fp16", "i32", "fp32", "constexpr", ...
    constexprs: dict          # arg name -> value for every tl.constexpr argument
    num_warps: int = 4
    num_stages: int = 3
    options: dict = field(default_factory=dict)   # extra compile options, if any
