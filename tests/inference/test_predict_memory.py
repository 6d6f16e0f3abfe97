"""`predict`'s peak memory per pixel of the image (docs/practitioners.md, "Memory"): measured in a fresh process
(Linux' `clear_refs` / `VmHWM`) on a 4 MP image with the tiny backbone, with overlays, panels and raw maps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Run in a child process: the decoded image, its map, mask and overlay are the only full-size things alive, and
# the test's own process (other tests' arrays, allocator state) does not blur the peak.
_MEASURE = r"""
import gc, json, re, sys
from pathlib import Path
import numpy as np
from PIL import Image
import vip2clip
from vip2clip.runs.folder_run import OutputOptions, predict_folder
from vip2clip.inference.predictor import Predictor, Thresholds
from vip2clip.scoring.tiling import TileConfig

root, width, height = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
columns = np.linspace(0, 255, width, dtype=np.float32)[None, :]
pixels = np.stack(np.broadcast_arrays((rows + columns) / 2, rows, columns), axis=-1).astype(np.uint8)
Image.fromarray(pixels).save(root / "large.png", compress_level=1)
Image.fromarray(pixels[:64, :64]).save(root / "small.png")
del pixels
model = vip2clip.create_model("tiny", image_size=64, seed=0, top_k=4)
options = OutputOptions(overlays=True, panels=True, raw_maps=True)
status = Path("/proc/self/status")
peaks = {}
for name, tiling in (("whole", None), ("tiled", TileConfig(1024))):
    predictor = Predictor(model, Thresholds(0.5, 0.5, "test"), tiling=tiling)
    predict_folder(predictor, [root / "small.png"], out_dir=root / f"warm_{name}", options=options)  # first-call work
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1))
    predict_folder(predictor, [root / "large.png"], out_dir=root / f"out_{name}", options=options)
    peaks[name] = (int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) - before) * 1024
print(json.dumps(peaks))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux' clear_refs to reset VmHWM")
def test_predict_peak_memory_per_pixel_stays_within_the_documented_bound(tmp_path: Path) -> None:
    width, height = 2500, 1600  # 4 MP
    pixels = width * height
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), str(width), str(height)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    print({name: f"{peak / pixels:.1f} bytes per pixel" for name, peak in peaks.items()})
    for name, peak in peaks.items():
        # The bound of docs/practitioners.md: the decoded image (PIL keeps 4 bytes per RGB pixel), the float32 map
        # (4), the bool mask (1) and the overlay being written (4) are 13 bytes per pixel; everything else is drawn
        # in strips or at a preview's size. 16 bytes per pixel + 64 MiB leaves room for the allocator. The overlay
        # drawn in float64 at full size (before this bound) took about 130 bytes per pixel.
        assert peak < 16 * pixels + 64 * 2**20, f"{name}: {peak / pixels:.1f} bytes per pixel"
    assert (tmp_path / "out_whole" / "overlays" / "large_png.png").is_file()
