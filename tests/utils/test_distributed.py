"""The process-group helpers without a process group: shares, the one-process world, torchrun's environment.
(Several ranks for real: tests/cli/test_torchrun.py and tests/training/test_distributed_training.py.)"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
import torch

from vip2clip.cli import main
from vip2clip.utils.distributed import (
    LOCAL,
    init_from_env,
    share_range,
    threads_per_rank,
    torchrun_env,
    wait_for_exit,
)


@pytest.mark.parametrize(("n", "size", "unit"), list(itertools.product([0, 1, 5, 7, 16, 23], [1, 2, 3, 8], [1, 3, 8])))
def test_shares_are_disjoint_contiguous_whole_batches_covering_everything(n: int, size: int, unit: int) -> None:
    shares = [share_range(n, rank=rank, size=size, unit=unit) for rank in range(size)]
    assert [i for share in shares for i in share] == list(range(n))  # in rank order: the original order
    batches = [len(range(0, len(share), unit)) for share in shares]
    assert max(batches) - min(batches) <= 1 and batches == sorted(batches, reverse=True)  # the first take more
    for share in filter(None, shares):
        assert share.start % unit == 0 and (share.stop % unit == 0 or share.stop == n)  # one-process batches


def test_bad_shares_are_errors() -> None:
    with pytest.raises(ValueError):
        share_range(4, rank=2, size=2)
    with pytest.raises(ValueError):
        share_range(4, rank=0, size=2, unit=0)


def test_the_one_process_world_does_everything_locally() -> None:
    assert not LOCAL.distributed and LOCAL.is_main and LOCAL.share(10, 4) == range(10)
    assert LOCAL.gather("x") == ["x"] and LOCAL.all_gather(1) == [1] and LOCAL.broadcast({"a": 1}) == {"a": 1}
    tensor = torch.ones(3)
    assert LOCAL.sum_(tensor) is tensor and torch.equal(tensor, torch.ones(3))
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.full((2,), 3.0)
    extra = torch.tensor([2.0])
    assert LOCAL.sum_gradients([parameter], extra) is extra and torch.equal(parameter.grad, torch.full((2,), 3.0))
    with LOCAL.main_first():
        LOCAL.barrier()
    assert LOCAL.describe(torch.device("cpu")) == {"world_size": 1, "device": "cpu"}
    assert LOCAL.describe("cuda:1") == {"world_size": 1, "device": "cuda"}


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() is None and init_from_env("cpu") is LOCAL
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env("cuda") is LOCAL  # one process: no group, whatever the device
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="torchrun"):
        torchrun_env()
    monkeypatch.setenv("RANK", "3")
    assert torchrun_env() == {"RANK": 3, "WORLD_SIZE": 4, "LOCAL_RANK": 3, "LOCAL_WORLD_SIZE": 4}


def test_cpu_threads_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a value above torchrun's default of 1 is the user's
    assert threads_per_rank(2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cores = threads_per_rank(1)
    assert cores >= 1 and threads_per_rank(2) == max(1, cores // 2) and threads_per_rank(10**6) == 1


def test_one_process_commands_refuse_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["synth", "--out", str(tmp_path / "s"), "--classes", "1"]) == 2
    assert "runs in one process; start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_rank_0_can_wait_for_the_other_ranks_to_exit() -> None:
    """What lets rank 0 exit 1 (predict's result) only after the other ranks are gone, so that torchrun does not
    SIGTERM one still shutting down: an exited child not yet reaped (a zombie) counts as exited, a running one is
    waited for until it exits or the timeout passes."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    while finished.poll() is None:
        time.sleep(0.01)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.5)  # exited, never waited for: a zombie
    start = time.monotonic()
    wait_for_exit([zombie.pid, finished.pid], timeout=10)
    assert time.monotonic() - start < 1
    zombie.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    start = time.monotonic()
    wait_for_exit([sleeper.pid], timeout=10)
    assert 0.3 < time.monotonic() - start < 5
    sleeper.wait()
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = time.monotonic()
    wait_for_exit([stuck.pid], timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 3
    stuck.kill()
    stuck.wait()
