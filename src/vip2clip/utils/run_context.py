"""What a long run carries besides its data: where it reports progress and which processes share the work."""

from __future__ import annotations

from dataclasses import dataclass

from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.progress import Progress, silent


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """Passed as one `run=` argument through evaluation, training, the feature cache and folder runs instead of
    threading each part. `progress`: the command line's bars (silent for library calls); `world`: the torchrun
    process group (one process by default)."""

    progress: Progress = silent
    world: World = LOCAL


LOCAL_RUN = RunContext()
