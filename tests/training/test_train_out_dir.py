"""One training output folder holds one run: a finished run is not overwritten silently, the log never mixes runs,
and a full disk while saving a checkpoint is a clean error that keeps the previous checkpoint."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import vip2clip
import vip2clip.utils.fileio as fileio
from vip2clip.cli import main
from vip2clip.data.index import DatasetIndex
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model.checkpoint import load_checkpoint
from vip2clip.training.loop import TrainConfig, train

SIZE = 64
FAST = {"batch_size": 4, "lr_fgp": 1e-3}


@pytest.fixture
def bench(tmp_path: Path) -> DatasetIndex:
    return generate_benchmark(tmp_path / "bench", classes=1, image_size=SIZE, n_test_good=2, n_test_defect=2)


def cli(bench: DatasetIndex, out: Path, epochs: int, *extra: str) -> int:
    tiny = ["--backbone", "tiny", "--image-size", str(SIZE), "--top-k", "4", "--train-batch-size", "4", "--no-progress"]
    return main(["train", "--data", str(bench.root), "--out", str(out), "--epochs", str(epochs), *tiny, *extra])


def log_epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_a_finished_run_is_refused_unless_resume_or_overwrite(bench: DatasetIndex, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli(bench, out, 1) == 0
    finished = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert cli(bench, out, 2, "--lr", "0.01") == 2
    err = capsys.readouterr().err
    assert f"{out} holds a finished training run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoint.pt").read_bytes() == finished and log_epochs(out) == [1]
    assert cli(bench, out, 2, "--overwrite", "--resume") == 2  # one or the other
    assert cli(bench, out, 2, "--overwrite") == 0
    assert log_epochs(out) == [1, 2]  # the new run's epochs only, not [1, 1, 2]
    assert load_checkpoint(out / "checkpoint.pt").meta["epoch"] == 2
    assert cli(bench, out, 3, "--resume") == 0 and log_epochs(out) == [1, 2, 3]
    # The benchmark trains into OUT/train: the same rule, with its own advice.
    argv = ["benchmark", "--train", f"b={bench.root}", "--test", f"b={bench.root}", "--out", str(tmp_path),
            "--epochs", "1", "--backbone", "tiny", "--image-size", str(SIZE), "--no-progress"]  # fmt: skip
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "checkpoint.pt").write_bytes(finished)
    assert main(argv) == 2
    assert "holds an earlier training run: pass --overwrite to train again" in capsys.readouterr().err


def test_the_log_is_rewritten_from_the_checkpoint_on_resume(bench: DatasetIndex, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def model():
        return vip2clip.create_model("tiny", image_size=SIZE, seed=0, top_k=4)

    train(model(), bench, out_dir=out, config=TrainConfig(epochs=2, **FAST))
    # Killed after epoch 2's checkpoint, in the middle of its log line: the log lacks epoch 2.
    lines = (out / "train_log.jsonl").read_text().splitlines()
    (out / "train_log.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    (out / "checkpoint.pt").unlink()
    train(model(), bench, out_dir=out, config=TrainConfig(epochs=3, **FAST), resume=True)
    assert log_epochs(out) == [1, 2, 3]
    assert [r["epoch"] for r in load_checkpoint(out / "checkpoint.pt").meta["history"]] == [1, 2, 3]


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(
    bench: DatasetIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "run"
    assert cli(bench, out, 1) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "checkpoint.pt")}
    create = fileio._create_temp

    def full_disk_for_checkpoints(path: Path):  # /dev/full: every write fails with ENOSPC, as on a full disk
        return (os.open("/dev/full", os.O_WRONLY), str(path) + ".tmp") if path.suffix == ".pt" else create(path)

    monkeypatch.setattr(fileio, "_create_temp", full_disk_for_checkpoints)
    capsys.readouterr()
    assert cli(bench, out, 2, "--resume") == 2
    err = capsys.readouterr().err
    assert f"vip2clip train: error: cannot write {out / 'last.pt'}: No space left on device" in err
    assert "Traceback" not in err and "enforce fail" not in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in out.iterdir() if path.is_file()) == ["checkpoint.pt", "last.pt",
                                                                              "train_log.jsonl"]  # fmt: skip


def test_a_diverged_run_stops_without_saving_nan_weights(bench: DatasetIndex, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli(bench, out, 4, "--lr", "1e8", "--lr-fgp", "1e8") == 2  # was: exit 0 and a NaN checkpoint.pt
    match = re.search(
        r"training diverged in epoch (\d) \(loss nan\); its weights are not saved", capsys.readouterr().err
    )
    assert match and not (out / "checkpoint.pt").exists()
    if int(match.group(1)) > 1:  # the last finite epoch stays, loadable
        kept = load_checkpoint(out / "last.pt")
        assert kept.meta["epoch"] == int(match.group(1)) - 1
        assert all(torch.isfinite(value).all() for value in kept.state.values() if value.is_floating_point())
