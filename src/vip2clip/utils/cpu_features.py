"""What this CPU computes natively in low precision: bf16 (AVX512-BF16, AMX-BF16) and INT8 (VNNI, AMX-INT8).

Read from the kernel's CPU flags (/proc/cpuinfo) without torch, so the torch-free ONNX engine can use it too.
On a CPU without native bf16, bf16 matrix products are emulated (converted to fp32 and back) and run slower than
fp32; without VNNI, INT8 products take several instructions each and an INT8 model gains little or nothing.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
INT8_FLAGS = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}


@dataclass(frozen=True)
class CpuFeatures:
    """model: the CPU's name; flags: its feature flags (empty when unknown); known: the flags could be read."""

    model: str
    flags: frozenset[str]
    known: bool

    @property
    def bf16(self) -> bool:
        """bf16 matrix products run natively (AVX512-BF16 or AMX-BF16)."""
        return any(flag in self.flags for flag in BF16_FLAGS)

    @property
    def int8(self) -> bool:
        """INT8 matrix products run natively (VNNI or AMX-INT8)."""
        return any(flag in self.flags for flag in INT8_FLAGS)

    def _names(self, table: dict[str, str]) -> str:
        return ", ".join(name for flag, name in table.items() if flag in self.flags)

    def describe_bf16(self) -> str:
        if self.bf16:
            return f"bf16: native ({self._names(BF16_FLAGS)})"
        if not self.known:
            return "bf16: unknown (CPU flags not readable here)"
        return "bf16: not native on this CPU (no AVX512-BF16 or AMX): emulated, slower than fp32"

    def describe_int8(self) -> str:
        if self.int8:
            return f"int8: native ({self._names(INT8_FLAGS)})"
        if not self.known:
            return "int8: unknown (CPU flags not readable here)"
        return "int8: no VNNI on this CPU: INT8 models run slowly"

    def describe(self) -> str:
        return f"{self.model}; {self.describe_bf16()}; {self.describe_int8()}"


@functools.cache
def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """This CPU's name and flags (the first processor's entry of `cpuinfo`; unknown off Linux)."""
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
