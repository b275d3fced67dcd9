"""Compile babai's Triton kernels ahead of time for an NVIDIA GPU this machine does not have.

``triton.compile`` with a ``GPUTarget`` runs the whole NVIDIA pipeline (TTIR → TTGIR → LLVM
IR → PTX → cubin, with the ``ptxas`` Triton ships) and needs no driver and no device. What a
cubin tells without running it: whether a kernel compiles for the target at all, its
registers and spills (``ptxas -v``), shared memory, the resulting occupancy, and its SASS
(which global loads are vectorized, whether ``tl.dot`` became tensor-core MMA).

Occupancy on sm_90: 65,536 registers per SM allocated per warp in units of 256, at most 64
warps and 32 blocks per SM, 227 KiB of shared memory per SM.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_REGS_PER_SM, _REG_UNIT, _MAX_WARPS, _MAX_BLOCKS, _SMEM_PER_SM = 65536, 256, 64, 32, 227 * 1024


def compile_kernel(fn, args: Mapping[str, object], *, arch: int = 90, num_warps: int = 4,
                   num_stages: int = 3, divisible: tuple[str, ...] = ()):
    """The ``CompiledKernel`` of a ``@triton.jit`` function (or autotuned one) for
    ``sm_<arch>``. ``args`` names every parameter: a string is a runtime type (``"*fp16"``,
    ``"i32"``), anything else a ``constexpr`` value. Pointers, and the integers named in
    ``divisible``, are specialized as multiples of 16, as a launch with 16-byte-aligned
    tensors and such sizes specializes them."""
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    missing = [a for a in fn.arg_names if a not in args]
    if missing:
        raise ValueError(f"compile_kernel({fn.__name__}): no type or value for {missing}")
    signature = {a: args[a] if isinstance(args[a], str) else "constexpr" for a in fn.arg_names}
    constexprs = {(i,): args[a] for i, a in enumerate(fn.arg_names)
                  if not isinstance(args[a], str)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if isinstance(args[a], str) and (args[a].startswith("*") or a in divisible)}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


@dataclass
class Usage:
    """What ptxas and the SASS say about one compiled kernel."""

    registers: int
    spill_stores: int  # bytes
    spill_loads: int
    shared: int  # bytes per block (Triton's dynamic shared memory)
    num_warps: int
    instructions: Counter = field(default_factory=Counter)  # memory / MMA opcodes in SASS

    @property
    def warps_per_sm(self) -> int:
        """Resident warps per SM (sm_90 limits; registers, warps, blocks, shared memory)."""
        per_warp = -(-self.registers * 32 // _REG_UNIT) * _REG_UNIT
        blocks = min(_REGS_PER_SM // per_warp // self.num_warps, _MAX_WARPS // self.num_warps,
                     _MAX_BLOCKS, _SMEM_PER_SM // self.shared if self.shared else _MAX_BLOCKS)
        return blocks * self.num_warps

    def count(self, prefix: str) -> int:
        """SASS instructions whose opcode starts with ``prefix`` (e.g. ``"LDG"``, ``"HMMA"``)."""
        return sum(n for op, n in self.instructions.items() if op.startswith(prefix))


def _tool(name: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = Path(get_ptxas(arch).path)
    return str(ptxas if name == "ptxas" else ptxas.with_name(name))


_OPS = re.compile(r"\b((?:LDG|STG|LDS|STS|LDSM|LDGSTS|ATOMG|RED|HMMA|HGMMA|IMMA|UTMALDG)"
                  r"(?:\.[A-Z0-9_]+)*)")


def usage(kernel, arch: int = 90) -> Usage:
    """Registers and spills from ``ptxas -v`` on the kernel's PTX, opcode counts from its
    SASS (``cuobjdump -sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([_tool("ptxas", arch), "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(Path(tmp, "v.o"))],
                             capture_output=True, text=True, check=True).stderr
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump", arch), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    ops = Counter(m.group(1) for line in sass.splitlines() if "/*" in line
                  for m in [_OPS.search(line.split("*/", 1)[-1])] if m)
    return Usage(regs, int(spills.group(1)), int(spills.group(2)), kernel.metadata.shared,
                 kernel.metadata.num_warps, ops)


@dataclass
class Launch:
    """One kernel as babai launches it: the function, its argument types and constants, and
    the launch options (one per autotune config)."""

    name: str
    fn: object
    args: dict
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple[str, ...] = ()

    def compile(self, arch: int = 90):
        return compile_kernel(self.fn, self.args, arch=arch, num_warps=self.num_warps,
                              num_stages=self.num_stages, divisible=self.divisible)


_MM_DIVISIBLE = ("N", "K", "G", "row_bytes", "z_bytes")  # 4096-class shapes, group 64


def _configs(name: str, kernel, args: dict) -> list[Launch]:
    """One launch per autotune config that survives the kernel's pruning for ``args``."""
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, {}, **args)
    return [Launch(f"{name} {_label(c.kwargs)} w{c.num_warps}s{c.num_stages}", kernel,
                   {**args, **c.kwargs}, c.num_warps, c.num_stages, _MM_DIVISIBLE)
            for c in configs]


def _label(meta: Mapping[str, int]) -> str:
    return "×".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")
                    if k in meta)


def launches(bits: int = 4, group_size: int = 64, dtype: str = "bf16",
             which: tuple[str, ...] = ("decode", "prefill", "dequant", "outliers", "hptq"),
             ) -> list[Launch]:
    """Every kernel × autotune config babai launches for ``bits``-bit codes, ``group_size``
    groups and ``dtype`` activations (the types ``kernels/register.py`` passes)."""
    from . import huffman, outliers
    from .dequant import dequant_kernel
    from .matmul import decode_kernel, prefill_kernel

    ints = dict.fromkeys(("M", "N", "K", "G", "row_bytes", "z_bytes", "M_BUCKET"), "i32")
    mm = dict(x_ptr=f"*{dtype}", perm_ptr="*i64", packed_ptr="*u8", s_ptr="*fp16",
              z_ptr="*u8", bias_ptr=f"*{dtype}", **ints, BITS=bits, GROUP=group_size,
              HAS_PERM=True, HAS_BIAS=False, FP32_DOT=dtype == "fp32")
    out = []
    if "decode" in which:
        out += _configs("decode", decode_kernel, {**mm, "out_ptr": "*fp32"})
    if "prefill" in which:
        out += _configs("prefill", prefill_kernel, {**mm, "out_ptr": f"*{dtype}"})
    if "dequant" in which:
        out += _configs("dequant", dequant_kernel, dict(
            packed_ptr="*u8", s_ptr="*fp16", z_ptr="*u8", w_ptr=f"*{dtype}", N="i32", K="i32",
            G="i32", row_bytes="i32", z_bytes="i32", BITS=bits, GROUP=group_size))
    if "outliers" in which:
        csr = dict(ptr_ptr="*i32", idx_ptr="*i16", val_ptr="*i32", s_ptr="*fp16",
                   GROUP=group_size, BLOCK_J=outliers.BLOCK_J)
        out.append(Launch("outlier matmul (M ≤ 16)", outliers._outlier_matmul, dict(
            csr, x_ptr=f"*{dtype}", perm_ptr="*i64", out_ptr="*fp32", M="i32", N="i32",
            K="i32", G="i32", HAS_PERM=True, BLOCK_M=16)))
        out.append(Launch("outlier scatter", outliers._outlier_scatter, dict(
            csr, w_ptr=f"*{dtype}", K="i32", G="i32")))
    if "hptq" in which:
        stream = dict(stream_ptr="*u8", offsets_ptr="*i32", table_ptr="*i32",
                      n_chunks="i32", nbytes="i32", chunk="i32", max_len="i32",
                      BLOCK_C=huffman.BLOCK_C)
        out.append(Launch("huffman decode", huffman._huffman_decode, dict(
            stream, out_ptr="*i32", n="i32")))
        out.append(Launch("hptq matmul (M = 1)", huffman._hptq_matmul, dict(
            stream, x_ptr="*fp32", scale_ptr="*fp32", y_ptr="*fp32", M="i32", N="i32",
            K="i32", scale_stride="i32", BLOCK_M=1)))
    return out
