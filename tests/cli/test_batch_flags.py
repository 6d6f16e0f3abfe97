"""One meaning per flag: `--batch-size` is the inference batch; the training batch is `--train-batch-size` in train,
benchmark and study, where the old `--batch-size` still works with a notice on stderr."""

from __future__ import annotations

import pytest

from vip2clip.cli import build_parser
from vip2clip.cli.train import train_config_from_args
from vip2clip.config import TrainConfig

TRAINING_COMMANDS = {
    "train": ["train", "--data", "d", "--out", "o"],
    "benchmark": ["benchmark", "--test", "a=d", "--out", "o"],
    "study": ["study", "modules"],
}
INFERENCE_COMMANDS = {
    "test": ["test", "--data", "d", "--out", "o"],
    "predict": ["predict", "images", "--out", "o"],
    "calibrate": ["calibrate", "images", "--out", "o.json"],
    "serve": ["serve"],
}


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_the_training_batch_is_train_batch_size(command: str, capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args([*TRAINING_COMMANDS[command], "--train-batch-size", "3"])
    assert train_config_from_args(args).batch_size == 3
    assert capsys.readouterr().err == ""
    default = build_parser().parse_args(TRAINING_COMMANDS[command])
    assert train_config_from_args(default).batch_size == TrainConfig().batch_size


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_the_old_spelling_still_trains_with_that_batch_and_says_it_will_go(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    args = build_parser().parse_args([*TRAINING_COMMANDS[command], "--batch-size", "5"])
    assert train_config_from_args(args).batch_size == 5
    assert capsys.readouterr().err == (
        f"--batch-size is now --train-batch-size in `vip2clip {command}` (the training batch); the old spelling "
        "will go\n"
    )


@pytest.mark.parametrize("command", INFERENCE_COMMANDS)
def test_batch_size_is_the_inference_batch_elsewhere(command: str, capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args([*INFERENCE_COMMANDS[command], "--batch-size", "2"])
    batch = args.eval_batch_size if command == "test" else args.batch_size
    assert batch == 2 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):  # no training here: the training flag is unknown
        build_parser().parse_args([*INFERENCE_COMMANDS[command], "--train-batch-size", "2"])


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_help_says_which_batch_each_flag_is(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--train-batch-size N training images per step" in text
    assert "--batch-size N deprecated spelling of --train-batch-size (the training batch here; it will go)" in text
    assert "--batch-size is the inference batch of test, predict, calibrate and serve" in text
