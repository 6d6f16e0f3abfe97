"""Shared fixtures: a tiny random CLIP built by open_clip's own classes (no network), small images, and one tiny
model trained on a synthetic benchmark for the practitioner tests (predict, serve)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vip2clip
from vip2clip.data.index import DatasetIndex

TINY_SIZE = 64  # 4x4 patch grid with the tiny backbone's 16-pixel patches
TRAINED_SIZE = 96  # the trained tiny model's input and image size: a 6x6 grid, enough to localise defects


@pytest.fixture(scope="session")
def tiny_model():
    """A ViP²-CLIP on the tiny random backbone (shared: tests must not modify it)."""
    return vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=0, top_k=4)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=generator)


@dataclass(frozen=True)
class TrainedTiny:
    """checkpoint: a tiny model trained on one synthetic benchmark (seed 1); unseen: another one (seed 2, other
    look) with train/good images to calibrate on and a labelled test split, for zero-shot checks."""

    checkpoint: Path
    unseen: DatasetIndex


@pytest.fixture(scope="session")
def trained_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TrainedTiny:
    """Trained once per session (about a minute on 2 cores) for every test that needs a model that has learned."""
    from vip2clip.data.synthetic import generate_benchmark
    from vip2clip.training.loop import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    sizes = {"classes": 1, "image_size": TRAINED_SIZE}
    train_index = generate_benchmark(root / "train", seed=1, n_train_good=0, n_test_good=8, n_test_defect=24, **sizes)
    unseen = generate_benchmark(root / "unseen", seed=2, n_train_good=20, n_test_good=8, n_test_defect=8, **sizes)
    model = vip2clip.create_model("tiny", image_size=TRAINED_SIZE, seed=0, top_k=8)
    config = TrainConfig(epochs=12, batch_size=8, lr_prompt=1e-2, lr_fgp=1e-3)  # faster than the release's
    result = train(model, train_index, out_dir=root / "run", config=config)
    return TrainedTiny(result.checkpoint, unseen)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint `vip2clip demo` trains (tiny random CLIP, 128 px, 'textured' synthetic set; a few seconds)."""
    from vip2clip.apps.demo import run_offline_demo

    return run_offline_demo(tmp_path_factory.mktemp("demo") / "demo", echo=lambda line: None).checkpoint


@pytest.fixture(scope="session")
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """Runs `torchrun --standalone --nproc-per-node N ARGS...` (free ports, Gloo on the CPU) with this checkout's
    vip2clip importable; returns the finished process (text stdout/stderr). torchrun's own default of one thread
    per rank is left to vip2clip, which gives each rank its share of the cores (`threads_per_rank`)."""
    import vip2clip

    source = str(Path(vip2clip.__file__).resolve().parents[1])

    def run(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   *map(str, args)]  # fmt: skip
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def rank_threads() -> Callable[[int], contextlib.AbstractContextManager]:
    """`with rank_threads(2):` computes in this process with the threads each of 2 ranks on this machine uses:
    matrix products round alike only with the same thread count, so a one-process reference must match it to be
    compared bit for bit."""
    from vip2clip.utils.distributed import threads_per_rank

    @contextlib.contextmanager
    def threads(world_size: int) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads_per_rank(world_size))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return threads


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_report_header(config) -> list[str]:
    """The CPU class the suite ran on and the paths it chose there (a failure on one class is read with this)."""
    return _cpu_report()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """`pytest -q` (CI, the README) prints no header: the same lines close the run there."""
    if config.get_verbosity() < 0:
        for line in _cpu_report():
            terminalreporter.write_line(line)


def _cpu_report() -> list[str]:
    from vip2clip.model.linear import fp32_library
    from vip2clip.utils.cpu_features import FEATURES_OFF_VARIABLE, auto_precision, cpu_features

    forced = os.environ.get(FEATURES_OFF_VARIABLE)
    return [
        f"vip2clip cpu: {cpu_features().describe()}" + (f" [{FEATURES_OFF_VARIABLE}={forced}]" if forced else ""),
        f"vip2clip paths: {auto_precision('cpu')[1]}; {fp32_library()[1]}",
    ]
