"""Independent processes sharing one --cache-dir (issue 10 item 5): real processes started at the same moment.

Before caches were keyed by their settings and published by rename, a second run with another image size rebuilt
the arrays of the first in place while it had them memory-mapped: the first crashed with a bus error (SIGBUS), or
trained on the other run's features.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vip2clip
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.index import DatasetIndex
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.features.cache_key import cache_key
from vip2clip.features.feature_cache import FeatureCache, load_or_build_cache, open_cache

WORKER = Path(__file__).with_name("cache_worker.py")
SRC = str(Path(vip2clip.__file__).resolve().parents[1])


@pytest.fixture
def bench(tmp_path: Path) -> DatasetIndex:
    return generate_benchmark(tmp_path / "bench", classes=1, image_size=64, n_test_good=3, n_test_defect=3)


def start(bench: DatasetIndex, cache: Path, sync: Path, name: str, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(WORKER), str(bench.root), str(cache), str(sync), name, *options]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def release(sync: Path, names: list[str], processes: list[subprocess.Popen]) -> None:
    """Wait until every worker is ready (imports done, model built), then let them all start at once."""
    for name, process in zip(names, processes, strict=True):
        while not (sync / f"{name}.ready").exists():
            assert process.poll() is None, process.communicate()
    (sync / "go").touch()


def _model(size: int, layers: tuple[int, ...] | None = None):
    return vip2clip.create_model("tiny", image_size=size, seed=0, top_k=4, feature_layers=layers)


def _build(bench: DatasetIndex, cache: Path, size: int, layers: tuple[int, ...] | None = None) -> FeatureCache:
    return load_or_build_cache(
        _model(size, layers), AnomalyDataset(bench, image_size=size), directory=cache, batch_size=2
    )


def _is_valid(bench: DatasetIndex, slot: str | Path, size: int, layers: tuple[int, ...] | None = None) -> bool:
    return open_cache(Path(slot), cache_key(_model(size, layers), AnomalyDataset(bench, image_size=size))) is not None


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"worker exited {process.returncode} (-7 is a bus error):\n{err[-3000:]}"
    return {**json.loads(out.strip().splitlines()[-1]), "log": err}


@pytest.mark.slow
def test_runs_with_other_settings_share_a_cache_dir_without_crashing(bench: DatasetIndex, tmp_path: Path) -> None:
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    # Process A builds its cache and then reads it until told to stop. Meanwhile this process builds other settings
    # (B) into the same directory, then rebuilds A's own slot after an image changed (C). A must keep reading its
    # rows intact, and every cache must end up right.
    reader = start(bench, cache, sync, "a", "--read-until", str(sync / "stop"), "--delay", "0")
    release(sync, ["a"], [reader])
    while not (sync / "a.opened").exists():
        assert reader.poll() is None, reader.communicate()
    b = _build(bench, cache, 32, (1, 2))
    assert _is_valid(bench, b.directory, 32, (1, 2))
    victim = bench.resolve(bench.samples("test")[0].img_path)
    Image.fromarray(255 - np.asarray(Image.open(victim).convert("RGB"))).save(victim)
    c = _build(bench, cache, 64)
    (sync / "stop").touch()
    a = finish(reader)
    assert a["reads"] > 0 and a["rows"] == len(b) == len(c) == 6
    assert Path(a["slot"]) != b.directory and Path(a["slot"]) == c.directory  # other settings: another slot
    checksum = float(np.abs(c.features(list(range(6))).patch_tokens[0].numpy()).sum())
    assert checksum != a["checksum"]  # C replaced A's cache; A read its old, intact files meanwhile
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(
        [b.directory.name, c.directory.name]
    )  # no build folders left
    assert _is_valid(bench, c.directory, 64)  # and B's slot reads as stale now: its image changed after it was built
    assert not _is_valid(bench, b.directory, 32, (1, 2))


@pytest.mark.slow
def test_two_builders_of_one_cache_at_once_leave_one_valid_cache(
    bench: DatasetIndex, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    other = start(bench, cache, sync, "a")  # builds in another process, released together with this one
    model = _model(64)
    encoded, encode = [], model.backbone.encode_image

    def slow_encode(images):  # this test's own model: builds of 3 batches that overlap with the other process's
        time.sleep(0.2)
        encoded.append(images.shape[0])
        return encode(images)

    model.backbone.encode_image = slow_encode
    release(sync, ["a"], [other])
    caplog.set_level(logging.INFO, logger="vip2clip.features.cache_store")
    ours = load_or_build_cache(model, AnomalyDataset(bench, image_size=64), directory=cache, batch_size=2)
    theirs = finish(other)
    assert Path(theirs["slot"]) == ours.directory
    assert theirs["checksum"] == float(np.abs(ours.features(list(range(6))).patch_tokens[0].numpy()).sum())
    assert theirs["encoded"] + sum(encoded) == 6  # one built it; the other waited for its lock, then reused it
    waited = "waiting for another process that is building it"
    assert waited in caplog.text or waited in theirs["log"]  # the builds did overlap
    assert _is_valid(bench, ours.directory, 64)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [ours.directory.name]
