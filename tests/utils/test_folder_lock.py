"""One run at a time in an output folder (issue 27 bad item 2: two `study` runs into one --out both trained the
same unit, train_log.jsonl ended with repeated epochs): the second run is refused, naming the folder and the
first run's pid; the lock goes with the process, also when it is killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.utils.folder_lock import LOCK_NAME, FolderBusyError, exclusive_folder

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress"]
TRAINING = ["--epochs", "1", "--train-batch-size", "4"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("lock_data")
    sizes = {"classes": 1, "image_size": 48, "n_train_good": 0, "n_test_good": 2, "n_test_defect": 2}
    for name, seed in (("a", 1), ("b", 2)):
        generate_benchmark(base / name, seed=seed, **sizes)
    return {"a": base / "a", "b": base / "b"}


def _commands(roots: dict[str, Path]) -> dict[str, list[str]]:
    study_data = ["--data", f"mvtec={roots['a']}", f"visa={roots['b']}"]
    return {
        "study": ["study", "top-k", *study_data, "--variants", "k1", *TRAINING],
        "train": ["train", "--data", str(roots["a"]), "--resume", *TRAINING],
        "benchmark": ["benchmark", "--train", f"a={roots['a']}", "--test", f"b={roots['b']}", *TRAINING],
        "predict": ["predict", str(roots["a"])],  # resumes from its journal
    }


@pytest.mark.parametrize("command", ["study", "train", "benchmark", "predict"])
def test_a_second_run_into_a_busy_folder_is_refused(command: str, roots, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    with exclusive_folder(out, "first run"):  # another open file: flock refuses it as it would another process
        assert main([*_commands(roots)[command], "--out", str(out), *MODEL_ARGS]) == 2
        assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME]  # nothing of the second run was written
    error = capsys.readouterr().err
    assert f"{out} is in use by another run (pid {os.getpid()})" in error and f"vip2clip {command}" in error
    assert not out.exists()  # the first run created the folder for its lock and wrote nothing: removed again


def test_a_run_that_ends_leaves_its_results_but_no_lock_file(roots, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(roots["a"]), "--out", str(out), *TRAINING, *MODEL_ARGS]) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / LOCK_NAME).exists()


def test_the_lock_is_released_when_its_process_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = "from vip2clip.utils.folder_lock import exclusive_folder\nimport sys, time\n"
    holder += "with exclusive_folder(sys.argv[1], 'x'):\n    print('held', flush=True)\n    time.sleep(120)\n"
    process = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        refused = pytest.raises(FolderBusyError, match=rf"in use by another run \(pid {process.pid}\)")
        with refused, exclusive_folder(out, "vip2clip study"):
            pass
    finally:
        process.kill()  # no exit handler runs: the operating system drops the lock
        process.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(process.pid)  # left by the killed run, but no lock
    deadline = time.monotonic() + 10
    while True:
        try:
            with exclusive_folder(out, "vip2clip study"):
                assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
                break
        except FolderBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not (out / LOCK_NAME).exists() and out.is_dir()  # a run removes its lock file; OUT was there before
