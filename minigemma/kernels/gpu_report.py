"""What would this kernel cost on an H100? The real compiler's report on a kernel of your own, no GPU needed.

    report = gpu_report(my_kernel, x, y, n, BLOCK=1024)   # the arguments you would launch it with
    print(report)                                         # registers, spills, shared memory, occupancy, ...

The kernel's source (and any @triton.jit helpers it calls, given as `helpers`) is written to a file and
compiled by Triton for the target (sm_90, an H100, by default; sm_80, an A100) in a separate process
with the interpreter off, exactly as `python -m minigemma.kernels.aot` compiles the package's kernels.
`ptxas`, shipped with Triton, reports the registers each thread needs and the bytes it spills; Triton
reports the shared memory a program needs; the PTX says what `tl.dot` became and how wide each global
load is. Nothing runs: these are the compiler's facts, and what follows from them (programs per SM) is
arithmetic on the GPU's published limits (`utils.H100`, `utils.A100`).

The kernel must be self-contained: the compiler sees its source and its helpers', `triton` and
`triton.language as tl`, nothing else of the notebook (a global it reads is an error, as on a GPU).
Results are cached by source and arguments (`aot.CACHE`), so a notebook run twice compiles once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass

import torch

from minigemma.atomic import write_atomic

from . import aot
from .utils import A100, H100, DeviceProps

TARGETS = {"sm_90": H100, "sm_80": A100}
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclass
class Report:
    """One compile: the compiler's facts and what they mean on the target GPU."""

    name: str
    target: str
    num_warps: int
    num_stages: int
    ok: bool
    error: str | None
    regs: int | None
    spill_bytes: int | None
    shared: int | None
    dot: str
    loads: dict  # load width in bytes -> load instructions (per thread)
    async_copies: dict  # the same for asynchronous copies into shared memory (cp.async)
    programs_per_sm: int | None
    limited_by: str | None
    props: DeviceProps

    @property
    def fits(self) -> bool:
        """Compiles, spills nothing and fits the shared memory one program may have."""
        return self.ok and not self.spill_bytes and self.shared <= self.props.smem_per_block

    def sentences(self) -> list[str]:
        """The report in words, one line per fact."""
        p = self.props
        if not self.ok:
            return [f"does not compile for {p.name}: {self.error}"]
        out = [f"{self.regs} registers per thread (at most 255): a program's {self.num_warps} warps × 32 threads "
               f"hold {self.regs * 32 * self.num_warps:,} of the SM's {p.regs_per_sm:,} registers."]
        if self.spill_bytes:
            out.append(f"SPILLS {self.spill_bytes} B per thread to local memory: values that did not fit in "
                       "registers, stored and reloaded through L1/L2 every time they are used. Use a smaller tile "
                       "or more warps.")
        else:
            out.append("No spills: every live value fits in registers.")
        share = self.shared / p.smem_per_block
        if self.shared > p.smem_per_block:
            out.append(f"SHARED MEMORY {self.shared:,} B per program > the {p.smem_per_block:,} B one program may "
                       f"have on an {p.name}: it cannot launch. Use smaller tiles or fewer stages.")
        else:
            out.append(f"{self.shared:,} B of shared memory per program ({share:.0%} of the {p.smem_per_block:,} B "
                       "one program may have).")
        if self.programs_per_sm:
            n = self.programs_per_sm
            out.append(f"{n} program{'s' if n > 1 else ''} resident per SM at once (limited by {self.limited_by}): "
                       f"{n * self.num_warps} warps among which the SM switches to hide memory latency.")
        else:
            out.append(f"No program fits on an SM (limited by {self.limited_by}).")
        out.append({"wgmma": "tl.dot became wgmma: Hopper's asynchronous warpgroup tensor-core instructions.",
                    "mma": "tl.dot became mma.sync: tensor cores, Ampere's instructions (no wgmma).",
                    "fma": "tl.dot became FMAs on the CUDA cores (float32 'ieee' products): no tensor cores.",
                    "-": "No tl.dot."}[self.dot])
        def listed(d):
            return ", ".join(f"{n} × {w} B" for w, n in sorted(d.items(), key=lambda kv: -int(kv[0])))
        if self.loads:
            widest = max(int(w) for w in self.loads)
            out.append(f"Loads from global memory, per thread: {listed(self.loads)}. " + (
                "16-byte loads: each thread reads 4 consecutive floats (8 bf16) in one instruction, and a warp's "
                "32 threads read 512 contiguous bytes: coalesced." if widest >= 16 else
                "No 16-byte loads: the compiler could not prove that a thread's values are consecutive, so each "
                "is one instruction (strided or unaligned addresses)."))
        if self.async_copies:
            out.append(f"Asynchronous copies into shared memory, per thread: {listed(self.async_copies)} (cp.async: "
                       f"the next loop trips' tiles load while this one computes, {self.num_stages} buffers deep).")
        return out

    def __str__(self) -> str:
        head = (f"{self.name} on {self.props.name} ({self.target}), {self.num_warps} warps, "
                f"{self.num_stages} stages")
        return "\n".join([head] + ["  " + s for s in self.sentences()])


def _python_function(kernel):
    fn = getattr(kernel, "fn", kernel)
    if not inspect.isfunction(fn):
        raise TypeError(f"gpu_report takes a @triton.jit function, got {type(kernel).__name__}")
    return fn


def _is_constexpr(param: inspect.Parameter) -> bool:
    a = param.annotation
    return a is not inspect.Parameter.empty and ("constexpr" in str(a) or getattr(a, "__name__", "") == "constexpr")


def _globals_read(kernel, helpers) -> str:
    """The plain values the kernel and its helpers read as globals, as assignments: a `tl.constexpr` global
    compiles, a plain number does not ("Cannot access global variable"), as on a GPU."""
    import triton.language as tl

    lines = {}
    for f in (*helpers, kernel):
        fn = _python_function(f)
        for name in fn.__code__.co_names:
            v = fn.__globals__.get(name)
            if isinstance(v, tl.constexpr):
                lines[name] = f"{name} = tl.constexpr({v.value!r})"
            elif isinstance(v, (bool, int, float)):
                lines[name] = f"{name} = {v!r}"
    return "\n".join(lines.values())


def _job(kernel, args, constexprs, target, num_warps, num_stages, helpers) -> aot.Job:
    fn = _python_function(kernel)
    params = list(inspect.signature(fn).parameters.values())
    runtime = [p.name for p in params if not _is_constexpr(p)]
    wanted = [p.name for p in params if _is_constexpr(p)]
    if len(args) != len(runtime):
        raise ValueError(f"{fn.__name__} takes {len(runtime)} runtime arguments ({', '.join(runtime)}), "
                         f"got {len(args)}; pass constexprs ({', '.join(wanted)}) by name")
    missing = [n for n in wanted if n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: give the constexpr(s) {', '.join(missing)} by name")
    types, constants = {}, {}
    for name, a in zip(runtime, args):
        if isinstance(a, torch.Tensor):
            if a.dtype not in _TYPES:
                raise ValueError(f"{name}: no Triton pointer type for {a.dtype}")
            types[name] = "*" + _TYPES[a.dtype]
        elif isinstance(a, bool):
            types[name] = "i1"
        elif isinstance(a, int) and a == 1:  # as the JIT specialises it: 1 becomes a constant (a unit stride)
            constants[name] = 1
        elif isinstance(a, int):  # and a multiple of 16 is marked so (what vectorised loads need to know)
            types[name] = ("i64" if abs(a) >= 2 ** 31 else "i32") + (":16" if a % 16 == 0 else ":1")
        elif isinstance(a, float):
            types[name] = "fp32"
        else:
            raise ValueError(f"{name}: a tensor, an int or a float, got {type(a).__name__}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    source = "import triton\nimport triton.language as tl\n\n" + _globals_read(kernel, helpers) + "\n\n" + "\n\n".join(
        textwrap.dedent(inspect.getsource(_python_function(h))) for h in (*helpers, kernel))
    path = aot.CACHE / "learner" / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, source)
    return aot.Job(f"{path}:{fn.__name__}", "forward", target, types,
                   {k: aot.tl_name(v) for k, v in {**constants, **constexprs}.items()}, num_warps, num_stages,
                   [fn.__name__])


def _compile(jobs: list[aot.Job], workers: int) -> list[dict]:
    """`aot.run_jobs` in a fresh Python process: its compile workers are spawned from a plain script, which a
    notebook's kernel (whose main module is not a file) cannot do itself."""
    code = ("import json, sys\nfrom minigemma.kernels import aot\n"
            "jobs = [aot.Job(**d) for d in json.load(sys.stdin)]\n"
            f"print(json.dumps(aot.run_jobs(jobs, {int(workers)})))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([asdict(j) for j in jobs]),
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the compile process failed: {out.stderr.strip()[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_reports(calls: list[tuple], workers: int = 2) -> list[Report]:
    """Several compiles at once: calls is a list of (kernel, args, options), options a dict of constexprs
    and of target, num_warps, num_stages, helpers. One report each, in order."""
    jobs = []
    for kernel, args, options in calls:
        o = dict(options)
        target, warps, stages = o.pop("target", "sm_90"), o.pop("num_warps", 4), o.pop("num_stages", 3)
        jobs.append(_job(kernel, tuple(args), o, target, warps, stages, tuple(o.pop("helpers", ()))))
    out = []
    for job, res in zip(jobs, _compile(jobs, workers)):
        props = TARGETS[job.target]
        occ, limiter = None, None
        if res["ok"]:
            limits = aot.occupancy_limits(props, res["regs"], job.num_warps, res["shared"])
            if not res["shared"]:  # no shared memory: it limits nothing
                limits.pop("shared memory")
            occ = aot.occupancy(props, res["regs"], job.num_warps, res["shared"])
            limiter = " and ".join(k for k, v in limits.items() if v == occ)
        out.append(Report(job.used_by[0], job.target, job.num_warps, job.num_stages, res["ok"], res["error"],
                          res["regs"], res["spill_stores"], res["shared"], res.get("dot", "-"), res.get("loads", {}),
                          res.get("async_copies", {}),
                          occ, limiter, props))
    return out


def gpu_report(kernel, *args, target: str = "sm_90", num_warps: int = 4, num_stages: int = 3, helpers=(),
               **constexprs) -> Report:
    """Compile `kernel` for `target` (no GPU needed) with these launch arguments: tensors give their
    pointer types, ints and floats theirs (an int equal to 1 becomes a constant and a multiple of 16 is
    marked so, as Triton's JIT specialises a launch), constexprs come by name. Returns its `Report`."""
    return gpu_reports([(kernel, args, dict(constexprs, target=target, num_warps=num_warps,
                                            num_stages=num_stages, helpers=helpers))], workers=1)[0]


__all__ = ["Report", "gpu_report", "gpu_reports"]
