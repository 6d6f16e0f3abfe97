"""Two ranks under torchrun (Gloo on the CPU): the feature cache they build is byte-identical to a one-process
build, and each training step's all-reduced gradient is the one-process gradient of the whole batch, also when the
batch splits unevenly or leaves a rank without images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import vip2clip
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.features.cache_key import ARRAY_FILES, MANIFEST
from vip2clip.features.feature_cache import load_or_build_cache

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_ranks_build_the_same_cache_and_weight_gradients_by_images(tmp_path: Path, torchrun, rank_threads) -> None:
    bench = generate_benchmark(tmp_path / "bench", classes=1, image_size=64, n_test_good=4, n_test_defect=3)
    process = torchrun(WORKER, bench.root, tmp_path / "cache2", tmp_path / "result.json")
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    model = vip2clip.create_model("tiny", image_size=64, seed=111, top_k=4)
    with rank_threads(2):
        one = load_or_build_cache(
            model, AnomalyDataset(bench, image_size=64), directory=tmp_path / "cache1", batch_size=3
        )
    two = Path(result["slot"])
    assert two.name == one.directory.name and two.parent == tmp_path / "cache2"
    for name in ARRAY_FILES:
        assert (two / name).read_bytes() == (one.directory / name).read_bytes(), name
    manifests = [json.loads((folder / MANIFEST).read_text()) for folder in (one.directory, two)]
    assert [m.pop("built_with") for m in manifests] == [{"world_size": 1, "device": "cpu"},
                                                         {"world_size": 2, "device": "cpu"}]  # fmt: skip
    assert manifests[0] == manifests[1]

    steps = result["steps"]
    assert [step["shares"] for step in steps] == [[2, 1], [2, 1], [1, 0]]
    for step in steps:
        # Relative to the largest gradient element. float32 rounding alone moves FGP's gradient this much: in one
        # process, the gradient of a batch of 3 and the sum of its 3 single-image gradients differ by 5e-5.
        assert step["difference"] < 3e-4, step
        assert step["loss"] == pytest.approx(step["one_process_loss"], rel=1e-6)
    # Averaging the ranks' mean-loss gradients (weights 1/2, 1/2 instead of 2/3, 1/3) would be visibly wrong.
    assert all(step["naive_difference"] > 1e-3 for step in steps[:2])
    assert np.isfinite([s["naive_difference"] for s in steps]).all()
