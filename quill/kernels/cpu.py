"""Which build of the C kernels this CPU runs: its instruction-set flags and the variant they allow.

Each variant is the same C sources compiled with its own `-m` flags and macro (quill/csrc). The flags come from
/proc/cpuinfo's `flags` line (Linux names: `avx512_vnni`, `avx512_bf16`); the kernel only lists a flag there
when it also saves the registers it needs (XSAVE state), so a listed flag is usable.
`QUILL_ISA=avx2|avx512|avx512bf16|auto` overrides the choice; asking for a variant the CPU cannot run is an
error, never a crash in the kernels.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from quill.errors import InvalidParameter

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the CPU flags it needs, its compiler flags and the macro its code keys on."""

    name: str
    needs: tuple[str, ...]
    cflags: tuple[str, ...]
    summary: str


AVX2 = Variant("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"),
               "AVX2 + FMA: 256-bit fp32 FMAs, int8 weights against int16 activations with vpmaddwd")
AVX512 = Variant("avx512", (*AVX2.needs, "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                 (*AVX2.cflags, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DQUILL_AVX512=1"),
                 "AVX-512 VNNI: int8 weights against int16 activations with vpdpwssd, u8 x int8 with vpdpbusd")
# Ice Lake and Cascade Lake have VNNI without BF16: they run AVX512, whose bf16 weights widen to fp32 FMAs
AVX512_BF16 = Variant("avx512bf16", (*AVX512.needs, "avx512_bf16"),
                      (*AVX512.cflags, "-mavx512bf16", "-DQUILL_AVX512_BF16=1"),
                      f"{AVX512.summary}, bf16 x bf16 with vdpbf16ps")
VARIANTS = {v.name: v for v in (AVX512_BF16, AVX512, AVX2)}  # best first: `auto` takes the first the CPU runs


@dataclass(frozen=True)
class CPU:
    """What /proc/cpuinfo says about the first processor: its model name and its flags."""

    model: str
    flags: frozenset[str]

    def missing(self, variant: Variant) -> list[str]:
        """The flags `variant` needs that this CPU lacks (empty: it can run it)."""
        return [f for f in variant.needs if f not in self.flags]


def parse_cpuinfo(text: str) -> CPU:
    """The model name and flags of the first processor listed in a /proc/cpuinfo text."""
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    return CPU(model, flags or frozenset())


# the flags torch's own CPU capability check implies, where there is no /proc/cpuinfo (another OS)
_TORCH_CAPABILITY_FLAGS = {"AVX2": AVX2.needs, "AVX512": (*AVX2.needs, "avx512f", "avx512bw", "avx512vl")}


def this_cpu() -> CPU:
    """This machine's CPU: /proc/cpuinfo's first processor; without it, what torch's capability check implies
    (no flags off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CPU(platform.processor() or platform.machine(), frozenset())
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        return CPU(platform.processor(), frozenset(_TORCH_CAPABILITY_FLAGS.get(capability, ())))


def choose_variant(cpu: CPU, requested: str | None = None) -> Variant | None:
    """The variant to load for `cpu`: `requested` (avx2, avx512, avx512bf16, auto; default $QUILL_ISA, else
    auto), or None when the CPU runs none of them (no AVX2: the torch path serves). Raises InvalidParameter for
    an unknown name or a variant the CPU lacks a flag for."""
    name = (requested if requested is not None else os.environ.get("QUILL_ISA", "auto")).strip().lower() or "auto"
    if name == "auto":
        return next((v for v in VARIANTS.values() if not cpu.missing(v)), None)
    variant = VARIANTS.get(name)
    if variant is None:
        raise InvalidParameter(f"QUILL_ISA={name!r} is not a kernel variant (choose from auto, "
                               f"{', '.join(sorted(VARIANTS))})", "QUILL_ISA")
    missing = cpu.missing(variant)
    if missing:
        raise InvalidParameter(f"QUILL_ISA={name}: this CPU lacks {', '.join(missing)}", "QUILL_ISA")
    return variant
