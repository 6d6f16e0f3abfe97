"""What this CPU computes natively in low precision: bf16 (AVX512-BF16, AMX-BF16) and INT8 (VNNI, AMX-INT8), and
whether it has AVX-512 (which decides the fp32 matrix-product library, `vip2clip.model.linear`).

Read from the kernel's CPU flags (/proc/cpuinfo) without torch, so the torch-free ONNX engine can use it too.
On a CPU without native bf16, bf16 matrix products are emulated (converted to fp32 and back) and run slower than
fp32; without VNNI, INT8 products take several instructions each and an INT8 model gains little or nothing.

`VIP2CLIP_CPU_FEATURES_OFF` (a comma list of `bf16`, `int8`, `avx512`) makes the detection report those
capabilities absent, so a machine with them runs the branches of a machine without them (the test suite once
more with `VIP2CLIP_CPU_FEATURES_OFF=bf16,int8,avx512` exercises an AVX2-only CPU's paths on an AMX Xeon).
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
INT8_FLAGS = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
AVX512_FLAGS = {"avx512f": "AVX-512"}
# Capability name -> whether a flag provides it (what VIP2CLIP_CPU_FEATURES_OFF removes). AVX-512 off removes every
# AVX-512 extension (an AVX2-only CPU has none of them), not AMX.
CAPABILITIES: dict[str, Callable[[str], bool]] = {
    "bf16": BF16_FLAGS.__contains__,
    "int8": INT8_FLAGS.__contains__,
    "avx512": lambda flag: flag.startswith("avx512"),
}
FEATURES_OFF_VARIABLE = "VIP2CLIP_CPU_FEATURES_OFF"


@dataclass(frozen=True)
class CpuFeatures:
    """model: the CPU's name; flags: its feature flags (empty when unknown); known: the flags could be read;
    forced_off: capabilities hidden by VIP2CLIP_CPU_FEATURES_OFF (said in `describe`)."""

    model: str
    flags: frozenset[str]
    known: bool
    forced_off: tuple[str, ...] = ()

    @property
    def bf16(self) -> bool:
        """bf16 matrix products run natively (AVX512-BF16 or AMX-BF16)."""
        return any(flag in self.flags for flag in BF16_FLAGS)

    @property
    def int8(self) -> bool:
        """INT8 matrix products run natively (VNNI or AMX-INT8)."""
        return any(flag in self.flags for flag in INT8_FLAGS)

    @property
    def avx512(self) -> bool:
        """AVX-512 vector units (AVX512F): the CPU class where oneDNN's fp32 products beat MKL's on AMD."""
        return any(flag in self.flags for flag in AVX512_FLAGS)

    def _names(self, table: dict[str, str]) -> str:
        return ", ".join(name for flag, name in table.items() if flag in self.flags)

    def _forced(self, capability: str) -> str:
        return f" ({FEATURES_OFF_VARIABLE} hides it)" if capability in self.forced_off else ""

    def describe_bf16(self) -> str:
        if self.bf16:
            return f"bf16: native ({self._names(BF16_FLAGS)})"
        if not self.known:
            return "bf16: unknown (CPU flags not readable here)"
        return "bf16: not native on this CPU (no AVX512-BF16 or AMX): emulated, slower than fp32" + self._forced("bf16")

    def describe_int8(self) -> str:
        if self.int8:
            return f"int8: native ({self._names(INT8_FLAGS)})"
        if not self.known:
            return "int8: unknown (CPU flags not readable here)"
        return "int8: no VNNI on this CPU: INT8 models run slowly" + self._forced("int8")

    def describe(self) -> str:
        vectors = "AVX-512" if self.avx512 else ("AVX2" if "avx2" in self.flags else "no AVX2")
        vectors += self._forced("avx512") if not self.avx512 else ""
        return f"{self.model}; {vectors}; {self.describe_bf16()}; {self.describe_int8()}"

    def without(self, capabilities: tuple[str, ...]) -> CpuFeatures:
        """These features with `capabilities` (names of CAPABILITIES) reported absent."""
        unknown = sorted(set(capabilities) - set(CAPABILITIES))
        if unknown:
            known = ", ".join(CAPABILITIES)
            raise ValueError(f"{FEATURES_OFF_VARIABLE}: unknown capability {', '.join(unknown)}; use any of {known}")
        hidden = [CAPABILITIES[name] for name in capabilities]
        flags = frozenset(flag for flag in self.flags if not any(provides(flag) for provides in hidden))
        return CpuFeatures(self.model, flags, self.known, tuple(sorted(set(self.forced_off) | set(capabilities))))


def forced_off() -> tuple[str, ...]:
    """The capabilities VIP2CLIP_CPU_FEATURES_OFF names (ValueError for an unknown one)."""
    names = tuple(name.strip().lower() for name in os.environ.get(FEATURES_OFF_VARIABLE, "").split(",") if name.strip())
    CpuFeatures("", frozenset(), False).without(names)  # validates the names
    return names


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """This CPU's name and flags (the first processor's entry of `cpuinfo`; unknown off Linux), less what
    VIP2CLIP_CPU_FEATURES_OFF hides."""
    return _read_features(str(cpuinfo)).without(forced_off())


@functools.cache
def _read_features(cpuinfo: str) -> CpuFeatures:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return CpuFeatures(platform.processor() or platform.machine(), frozenset(), known=False)
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""
    model = fields.get("model name") or platform.processor() or platform.machine()
    return CpuFeatures(model, frozenset(flags.split()), known=bool(flags))


def auto_precision(device_type: str = "cpu", features: CpuFeatures | None = None) -> tuple[str, str]:
    """What `precision="auto"` computes the frozen encoders in on a CPU: ("bf16" | "fp32", why).

    bf16 only where the CPU multiplies bf16 natively: elsewhere it is emulated and slower than fp32, so auto never
    makes a run slower than fp32. Other devices are decided by their own library (`vip2clip.factory`)."""
    if device_type != "cpu":
        raise ValueError(f"auto_precision decides for CPUs; {device_type} is decided by its runtime")
    features = features or cpu_features()
    if features.bf16:
        return "bf16", f"auto: bf16 ({features.describe_bf16()})"
    if not features.known:
        return "fp32", "auto: fp32 (CPU flags not readable here, bf16 may be emulated)"
    return "fp32", f"auto: fp32 ({features.describe_bf16()})"
