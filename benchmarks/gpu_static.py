"""GPU static report: compile every Triton kernel configuration for sm_80/sm_90 without a GPU and
read registers, shared memory, spills and tensor-core instructions from the cubins; read the
built CUDA extension (fastattn/_C*.so) the same way.

    python -m benchmarks.gpu_static [--json PATH] [--arch 80 90] [--only NAME ...] [--jobs N]

Record: {"source": "triton"|"cuda", "kernel", "config", "arch": "sm_80"|"sm_90", "registers",
"shared_bytes", "spill_stores", "spill_loads", "mma": {"HMMA": n, "HGMMA": n}} plus
"stack_bytes" / "local_bytes" (cuobjdump's STACK and LOCAL: per-thread stack frame and local
memory, > 0 when ptxas spilled). Spills are counted as STL / LDL instructions in the SASS.
"""

import argparse
import glob
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("softmax", "layer_norm", "rotary", "attention")   # reported first, if present
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # max dynamic shared memory per block
MMA_OPS = ("HMMA", "HGMMA")

# Compile caches stay under /tmp.
os.environ["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                              f"fastattn-gpu-static-{os.getuid()}")


def _tool(name):
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise RuntimeError(f"gpu_static: {name} not found in the triton wheel ({path})")
    return path


def _kernels_package():
    """fastattn.kernels, installed or straight from the repo's kernels/ directory."""
    try:
        return importlib.import_module("fastattn.kernels")
    except ImportError:
        pass
    if "fastattn" not in sys.modules:
        try:
            importlib.import_module("fastattn")
        except ImportError:
            import types
            pkg = types.ModuleType("fastattn")
            pkg.__path__ = [os.path.join(REPO, "fastattn")]
            sys.modules["fastattn"] = pkg
    spec = importlib.util.spec_from_file_location(
        "fastattn.kernels", os.path.join(REPO, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(REPO, "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastattn.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def kernel_modules():
    """{name: module} for every public kernels module with static_variants() (a module that
    does not exist yet, e.g. attention, is simply absent)."""
    import pkgutil
    pkg = _kernels_package()
    names = [n for n in KERNEL_MODULES if importlib.util.find_spec(f"fastattn.kernels.{n}")]
    names += sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                    if not m.name.startswith("_") and m.name not in KERNEL_MODULES
                    and m.name != "static_variant")
    mods = {}
    for name in names:
        mod = importlib.import_module(f"fastattn.kernels.{name}")
        if hasattr(mod, "static_variants"):
            mods[name] = mod
    return mods


def _run(args):
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"gpu_static: {' '.join(args)} failed:\n{res.stderr}")
    return res.stdout


def _count(sass, op):
    """Instructions whose opcode is `op` (any modifiers: HMMA.16816.F32 counts as HMMA)."""
    return len(re.findall(rf"[\s}}]{op}(?:\.[\w.]+)?\s", sass))


def _resource_usage(text):
    """{function: {"REG": n, "SHARED": n, "LOCAL": n, ...}} per arch from --dump-resource-usage."""
    out, arch = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if "REG:" in line:
            vals = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            out[(arch, func)] = vals
    return out


def _sass_functions(text):
    """{(arch, function): sass text} from cuobjdump -sass."""
    out, arch, func = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch, func = int(m.group(1)), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            func = m.group(1)
            out[(arch, func)] = []
            continue
        if func is not None and (arch, func) in out:
            out[(arch, func)].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _cubin_record(cubin, dynamic_shared, name):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = _resource_usage(_run([_tool("cuobjdump"), "--dump-resource-usage", path]))
        sass = _run([_tool("cuobjdump"), "-sass", path])
    finally:
        os.unlink(path)
    by_name = {func: vals for (_, func), vals in usage.items()}
    vals = by_name.get(name) or max(by_name.values(), key=lambda v: v.get("REG", 0))
    return {
        "registers": vals.get("REG", 0),
        "shared_bytes": vals.get("SHARED", 0) + dynamic_shared,
        "spill_stores": _count(sass, "STL"),
        "spill_loads": _count(sass, "LDL"),
        "stack_bytes": vals.get("STACK", 0),
        "local_bytes": vals.get("LOCAL", 0),
        "mma": {op: _count(sass, op) for op in MMA_OPS},
    }


def compile_variant(variant, arch):
    """Compile one StaticVariant for sm_<arch> and return its record."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fastattn.kernels._compat import ast_source

    src = ast_source(variant.kernel, variant.signature, variant.constexprs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages,
               **variant.options}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    rec = {"source": "triton", "kernel": variant.name, "config": variant.config,
           "arch": f"sm_{arch}"}
    rec.update(_cubin_record(compiled.asm["cubin"], compiled.metadata.shared,
                            compiled.metadata.name))
    return rec


def _sample(variants, per_kernel):
    """Up to per_kernel variants of each kernel name, spread over its list (always including
    the last, usually the biggest tile)."""
    by_name = {}
    for v in variants:
        by_name.setdefault(v.name, []).append(v)
    out = []
    for vs in by_name.values():
        if len(vs) <= per_kernel:
            out += vs
        else:
            step = (len(vs) - 1) / (per_kernel - 1) if per_kernel > 1 else 0
            out += [vs[-1 - round(i * step)] for i in range(per_kernel)][::-1]
    return out


def _compile_job(job):
    module_name, arch, index = job
    variant = kernel_modules()[module_name].static_variants(arch)[index]
    return compile_variant(variant, arch)


def triton_records(archs=(80, 90), only=None, per_kernel=None, jobs=1):
    """Records for the Triton kernels. only: module or kernel names (e.g. "softmax",
    "rms_norm_fwd"); per_kernel: sample that many configurations of each kernel."""
    work = []
    for module_name, mod in kernel_modules().items():
        for arch in archs:
            variants = list(enumerate(mod.static_variants(arch)))
            if only:
                variants = [(i, v) for i, v in variants
                            if module_name in only or v.name in only]
            if per_kernel:
                keep = {id(v) for v in _sample([v for _, v in variants], per_kernel)}
                variants = [(i, v) for i, v in variants if id(v) in keep]
            work += [(module_name, arch, i) for i, _ in variants]
    if jobs > 1 and len(work) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(_compile_job, work))
    return [_compile_job(job) for job in work]


def extension_path():
    paths = sorted(glob.glob(os.path.join(REPO, "fastattn", "_C*.so")))
    return paths[0] if paths else None


def _demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        out = res.stdout.splitlines()
        if res.returncode == 0 and len(out) == len(names):
            return out
    except OSError:
        pass
    return list(names)


def cuda_records(archs=(80, 90), only=None, so_path=None):
    """Records for the CUDA kernels in the built extension (none if it is not built)."""
    so_path = so_path or extension_path()
    if so_path is None:
        return []
    try:
        usage = _resource_usage(_run([_tool("cuobjdump"), "--dump-resource-usage", so_path]))
    except RuntimeError as e:
        if "does not contain device code" in str(e):     # a CPU-only build
            return []
        raise
    sass = _sass_functions(_run([_tool("cuobjdump"), "-sass", so_path]))
    keys = sorted(k for k in usage if k[0] in archs)
    names = _demangle([f for _, f in keys])
    records = []
    for (arch, func), pretty in zip(keys, names):
        # "void ns::(anonymous namespace)::kernel<float, 4>(Params)" -> "ns::kernel"
        short = re.sub(r"^void |\(anonymous namespace\)::", "", pretty.split("(fastattn")[0])
        short = short.split("<")[0].split("(")[0]
        if short.startswith("fastattn::"):
            short = short[len("fastattn::"):]
        if only and not any(o in pretty for o in only):
            continue
        vals, code = usage[(arch, func)], sass.get((arch, func), "")
        records.append({
            "source": "cuda", "kernel": short, "config": pretty, "arch": f"sm_{arch}",
            "registers": vals.get("REG", 0), "shared_bytes": vals.get("SHARED", 0),
            "spill_stores": _count(code, "STL"), "spill_loads": _count(code, "LDL"),
            "stack_bytes": vals.get("STACK", 0), "local_bytes": vals.get("LOCAL", 0),
            "mma": {op: _count(code, op) for op in MMA_OPS},
        })
    return records


def collect(archs=(80, 90), only=None, per_kernel=None, jobs=1):
    """Every record (Triton then CUDA); the benchmark CLI folds this into its output."""
    archs = tuple(int(a) for a in archs)
    return triton_records(archs, only, per_kernel, jobs) + cuda_records(archs, only)


def problems(record):
    """What is wrong with a record ([] when it is clean)."""
    arch = int(record["arch"].split("_")[1])
    bad = []
    if record["spill_stores"] or record["spill_loads"] or record.get("local_bytes", 0) \
            or record.get("stack_bytes", 0):
        bad.append("spills")
    if record["shared_bytes"] > SHARED_LIMIT.get(arch, SHARED_LIMIT[80]):
        bad.append("shared memory over the sm_%d limit" % arch)
    if record["registers"] > 255:
        bad.append("registers > 255")
    return bad


def format_table(records):
    head = f"{'source':6} {'arch':5} {'kernel':32} {'regs':>4} {'smem':>7} {'STL':>4} {'LDL':>4} " \
           f"{'HMMA':>5} {'HGMMA':>5}  config"
    lines = [head, "-" * len(head)]
    for r in records:
        flag = "  <-- " + ", ".join(problems(r)) if problems(r) else ""
        lines.append(f"{r['source']:6} {r['arch']:5} {r['kernel'][-32:]:32} {r['registers']:4d} "
                     f"{r['shared_bytes']:7d} {r['spill_stores']:4d} {r['spill_loads']:4d} "
                     f"{r['mma']['HMMA']:5d} {r['mma']['HGMMA']:5d}  {r['config']}{flag}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the records to this file")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    ap.add_argument("--only", nargs="+", help="module or kernel names (softmax, rms_norm_fwd, ...)")
    ap.add_argument("--per-kernel", type=int, help="sample this many configurations per kernel")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    args = ap.parse_args(argv)
    records = collect(args.arch, args.only, args.per_kernel, args.jobs)
    print(format_table(records))
    bad = [r for r in records if problems(r)]
    print(f"\n{len(records)} records, {len(bad)} with problems")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
