"""Training: the cache removes the encoder from later epochs, resume equals an uninterrupted run, bad inputs give
clear errors, and a learnable synthetic task is learned."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vip2clip
import vip2clip.training.loop as train_module
from vip2clip.cli import build_parser, main
from vip2clip.cli.train import train_config_from_args
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.index import DatasetIndex
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.metrics import compute_all
from vip2clip.model.checkpoint import load_checkpoint
from vip2clip.training.loop import TrainConfig, build_optimizer, epoch_batches, train

SIZE = 64
FAST = {"batch_size": 4, "lr_fgp": 1e-3}


def tiny_model(**overrides):
    return vip2clip.create_model("tiny", image_size=SIZE, seed=0, top_k=4, **overrides)


@pytest.fixture
def bench(tmp_path: Path) -> DatasetIndex:
    return generate_benchmark(tmp_path / "bench", classes=1, image_size=SIZE, n_test_good=3, n_test_defect=3)


def same_weights(a, b) -> bool:
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_defaults_are_the_release_ones() -> None:
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.lr_prompt, config.lr_fgp, config.seed) == (10, 8, 1e-3, 1e-5, 111)
    assert config.cache and config.cache_dtype == "float16" and TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_train_and_benchmark_read_the_same_training_options() -> None:
    parser = build_parser()
    options = ["--epochs", "3", "--train-batch-size", "5", "--lr-prompt", "0.01", "--lr-fgp", "0.002", "--seed", "7",
               "--no-cache", "--cache-dtype", "float32", "--skip-bad", "--num-workers", "2"]  # fmt: skip
    train_args = parser.parse_args(["train", "--data", "d", "--out", "o", *options])
    bench_args = parser.parse_args(["benchmark", "--test", "a=b", "--out", "o", "--eval-batch-size", "9", *options])
    expected = TrainConfig(epochs=3, batch_size=5, lr_prompt=0.01, lr_fgp=0.002, seed=7, cache=False,
                           cache_dtype="float32", skip_bad=True, num_workers=2)  # fmt: skip
    assert train_config_from_args(train_args) == train_config_from_args(bench_args) == expected
    assert bench_args.eval_batch_size == 9  # the benchmark's inference batch is separate from training's
    defaults = [parser.parse_args(["train", "--data", "d", "--out", "o"]), parser.parse_args(["benchmark", "--test",
                "a=b", "--out", "o"])]  # fmt: skip
    assert [train_config_from_args(args) for args in defaults] == [TrainConfig(), TrainConfig()]


def test_optimizer_groups_and_epoch_order() -> None:
    model = tiny_model()
    groups = build_optimizer(model, TrainConfig()).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_trainable_parameters()
    assert len(build_optimizer(tiny_model(use_fgp=False), TrainConfig()).param_groups) == 1
    first = epoch_batches(list(range(10)), 4, seed=111, epoch=1)
    assert [len(b) for b in first] == [4, 4, 2] and sorted(itertools.chain(*first)) == list(range(10))
    assert (
        first
        == epoch_batches(list(range(10)), 4, seed=111, epoch=1)
        != epoch_batches(list(range(10)), 4, seed=111, epoch=2)
    )


def test_cache_removes_the_encoder_after_the_first_pass(bench: DatasetIndex, tmp_path: Path) -> None:
    model = tiny_model()
    encoded = []
    original = model.backbone.encode_image
    model.backbone.encode_image = lambda images: encoded.append(images.shape[0]) or original(images)
    calls_per_step = []
    forward = model.forward_features
    model.forward_features = lambda features: calls_per_step.append(sum(encoded)) or forward(features)
    result = train(model, bench, out_dir=tmp_path / "out", config=TrainConfig(epochs=2, **FAST))
    assert [r["steps"] for r in result.history] == [2, 2] and len(calls_per_step) == 4
    assert len(set(calls_per_step)) == 1  # no encoder call during any training step of either epoch
    assert sum(encoded) == len(AnomalyDataset(bench, image_size=SIZE))  # one pass over the images
    assert result.cache_bytes > 0 and len(list((tmp_path / "out" / "feature_cache").glob("*/manifest.json"))) == 1
    # Without the cache every step encodes its batch.
    encoded.clear()
    calls_per_step.clear()
    train(model, bench, out_dir=tmp_path / "nocache", config=TrainConfig(epochs=1, cache=False, **FAST))
    assert calls_per_step == [4, 6]  # batches of 4 and 2 images


def test_cached_and_uncached_training_agree(bench: DatasetIndex, tmp_path: Path) -> None:
    cached, uncached = tiny_model(), tiny_model()
    train(cached, bench, out_dir=tmp_path / "a", config=TrainConfig(epochs=2, **FAST))
    train(uncached, bench, out_dir=tmp_path / "b", config=TrainConfig(epochs=2, cache=False, **FAST))
    images = torch.stack([AnomalyDataset(bench, image_size=SIZE)[i]["image"] for i in range(6)])
    a, b = cached.predict(images), uncached.predict(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, atol=5e-3, rtol=0)
    torch.testing.assert_close(a.pred_score, b.pred_score, atol=5e-3, rtol=0)
    assert not same_weights(cached, tiny_model())  # training changed something


def test_resume_after_a_crash_equals_an_uninterrupted_run(bench: DatasetIndex, tmp_path: Path, monkeypatch) -> None:
    config = TrainConfig(epochs=3, **FAST)
    reference = tiny_model()
    train(reference, bench, out_dir=tmp_path / "ref", config=config)

    step = train_module.train_step
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # second step of epoch 2
            raise RuntimeError("simulated crash")
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_model(), bench, out_dir=tmp_path / "run", config=config)
    assert load_checkpoint(tmp_path / "run" / "last.pt").meta["epoch"] == 1
    monkeypatch.setattr(train_module, "train_step", step)
    resumed = tiny_model()
    result = train(resumed, bench, out_dir=tmp_path / "run", config=config, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert same_weights(resumed, reference)
    final = load_checkpoint(result.checkpoint)
    assert final.meta["epoch"] == 3 and final.meta["train_config"] == config.to_dict()
    assert final.meta["backbone"]["fingerprint"] == reference.backbone.fingerprint()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    with pytest.raises(ValueError, match="different training settings"):
        train(tiny_model(), bench, out_dir=tmp_path / "run", config=TrainConfig(epochs=4, batch_size=2), resume=True)


def test_resume_on_other_clip_weights_is_refused(bench: DatasetIndex, tmp_path: Path) -> None:
    train(tiny_model(), bench, out_dir=tmp_path / "run", config=TrainConfig(epochs=1, **FAST))
    clip = tiny_model().backbone.clip
    torch.save({key: value + 0.01 for key, value in clip.state_dict().items()}, tmp_path / "other-clip.pt")
    other = tiny_model(clip_weights=tmp_path / "other-clip.pt")
    recorded = load_checkpoint(tmp_path / "run" / "last.pt").meta["backbone"]["fingerprint"]
    with pytest.raises(ValueError, match="its epochs were trained on CLIP weights with fingerprint") as error:
        train(other, bench, out_dir=tmp_path / "run", config=TrainConfig(epochs=2, **FAST), resume=True)
    assert recorded in str(error.value) and other.backbone.fingerprint() in str(error.value)
    result = train(tiny_model(), bench, out_dir=tmp_path / "run", config=TrainConfig(epochs=2, **FAST), resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_final_checkpoint_loads_with_create_model(bench: DatasetIndex, tmp_path: Path) -> None:
    model = tiny_model(use_vca=False)
    result = train(model, bench, out_dir=tmp_path / "out", config=TrainConfig(epochs=1, **FAST))
    loaded = vip2clip.create_model(checkpoint=result.checkpoint)
    assert loaded.config == model.config and same_weights(loaded, model)
    assert "optimizer" not in load_checkpoint(result.checkpoint).meta  # only last.pt carries the resume state


def tiny_train_cli(data: Path, epochs: int, *extra: str) -> list[str]:
    """`vip2clip train` arguments for the tiny backbone at the tests' image size, batch 4, no progress bars."""
    tiny = ["--backbone", "tiny", "--image-size", str(SIZE), "--top-k", "4", "--train-batch-size", "4", "--no-progress"]
    return ["train", "--data", str(data), "--epochs", str(epochs), *tiny, *extra]


def test_cli_bad_inputs(bench: DatasetIndex, tmp_path: Path, capsys) -> None:
    args = tiny_train_cli(bench.root, epochs=1)
    samples = bench.samples("test")
    corrupt = bench.resolve(samples[0].img_path)
    corrupt.write_bytes(b"garbage")
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert str(corrupt) in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {corrupt}" in out
    # A summary in words, not a raw JSON line: the numbers of every epoch are in train_log.jsonl (said where)
    assert "trained 1 epoch(s); epoch 1: loss" in out and str(tmp_path / "b" / "train_log.jsonl") in out
    assert not any(line.startswith("{") for line in out.splitlines())
    defect = next(s for s in samples if s.anomaly)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bench.resolve(defect.mask_path))
    assert main([*args, "--out", str(tmp_path / "c"), "--skip-bad"]) == 0
    assert "mask is 8x8" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "d"), "--resume", "--skip-bad"]) == 2  # nothing to resume
    assert "cannot resume" in capsys.readouterr().err


def test_unusual_images_and_a_class_without_anomalies_train(tmp_path: Path) -> None:
    index = generate_benchmark(tmp_path / "bench", classes=2, image_size=SIZE, n_test_good=2, n_test_defect=2)
    rgb = [s for s in index.samples("test") if s.cls_name == index.classes()[0]][:3]
    for sample, convert in zip(rgb, ("RGBA", "L", "I;16"), strict=True):
        path = index.resolve(sample.img_path)
        pixels = np.asarray(Image.open(path).convert("L"))
        image = (
            Image.fromarray(pixels.astype(np.uint16) * 257) if convert == "I;16" else Image.open(path).convert(convert)
        )
        image.save(path)
    second = index.classes()[1]
    index.splits["test"][second] = [s for s in index.splits["test"][second] if not s.anomaly]  # normal images only
    result = train(tiny_model(), index, out_dir=tmp_path / "out", config=TrainConfig(epochs=1, **FAST))
    assert result.skipped == [] and result.history[0]["steps"] == 2 and np.isfinite(result.history[0]["total"])


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    index = generate_benchmark(tmp_path / "bench", classes=1, image_size=SIZE, n_test_good=4, n_test_defect=4)
    out = tmp_path / "out"
    args = tiny_train_cli(index.root, 12, "--out", str(out), "--lr-fgp", "1e-3")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "vip2clip", *args], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()
        process.wait()
    assert (out / "last.pt").exists(), (tmp_path / "stderr.txt").read_text()
    done = load_checkpoint(out / "last.pt").meta["epoch"]
    assert 1 <= done < 12, f"the run was not interrupted mid-way (finished {done} epochs)"
    assert main([*args, "--resume"]) == 0
    final = load_checkpoint(out / "checkpoint.pt")
    assert final.meta["epoch"] == 12 and [r["epoch"] for r in final.meta["history"]] == list(range(1, 13))
    reference = vip2clip.create_model("tiny", image_size=SIZE, seed=111, top_k=4)  # the CLI seeds with --seed
    train(reference, index, out_dir=tmp_path / "ref", config=TrainConfig(epochs=12, batch_size=4, lr_fgp=1e-3))
    for key, value in reference.trainable_state_dict().items():
        torch.testing.assert_close(final.state[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_training_learns_bright_defects(tmp_path: Path) -> None:
    size = 96
    train_index = generate_benchmark(
        tmp_path / "train", classes=1, seed=1, image_size=size, n_train_good=0, n_test_good=8, n_test_defect=24
    )
    held_out = generate_benchmark(
        tmp_path / "held", classes=1, seed=2, image_size=size, n_train_good=0, n_test_good=4, n_test_defect=12
    )
    dataset = AnomalyDataset(held_out, image_size=size)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items])

    def pixel_auroc(model) -> float:
        prediction = model.predict(images)
        labels = np.array([item["label"] for item in items])
        masks = torch.stack([item["mask"] for item in items]).numpy()
        return compute_all(labels, prediction.pred_score.numpy(), masks=masks, maps=prediction.anomaly_map.numpy())[
            "pixel_auroc"
        ]

    model = vip2clip.create_model("tiny", image_size=size, seed=0, top_k=8)
    untrained = pixel_auroc(model)
    config = TrainConfig(epochs=12, batch_size=8, lr_prompt=1e-2, lr_fgp=1e-3)  # faster than the release for a test
    result = train(model, train_index, out_dir=tmp_path / "out", config=config)
    losses = [r["total"] for r in result.history]
    assert losses[-1] < 0.9 * losses[0]
    trained = pixel_auroc(model)
    assert trained > 0.65 and trained > untrained + 0.1, (untrained, trained)
