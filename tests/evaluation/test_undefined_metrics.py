"""Undefined metrics in `vip2clip test` are said in one sentence of ours (class, metric, why), not as a Python
warning with a source file and line (issue 17 item 11)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model.checkpoint import save_checkpoint


def test_undefined_metrics_are_one_sentence_each(tiny_model, tmp_path: Path, caplog) -> None:
    index = generate_benchmark(tmp_path / "bench", classes=1, seed=0, image_size=32, n_train_good=0, n_test_good=0,
                               n_test_defect=2)  # fmt: skip
    for sample in index.samples("test"):  # every pixel a defect: the pixel metrics are undefined by construction
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(index.resolve(sample.mask_path))
    checkpoint = save_checkpoint(tmp_path / "c.pt", tiny_model.config, state=tiny_model.trainable_state_dict())
    argv = ["test", "--data", str(index.root), "--checkpoint", str(checkpoint), "--backbone", "tiny",
            "--image-size", "32", "--no-progress", "--out", str(tmp_path / "out")]  # fmt: skip
    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert not [w for w in escaped if "undefined" in str(w.message)], [str(w.message) for w in escaped]
    said = [record.getMessage() for record in caplog.records]
    assert ("class texture_0: image_auroc, image_ap and image_f1 are undefined (only anomalous images, one label): "
            "'-' in the tables, left out of the means") in said  # fmt: skip
    assert ("class texture_0: pixel_auroc is undefined (every pixel is a defect pixel): '-' in the tables, left out "
            "of the means") in said  # fmt: skip
