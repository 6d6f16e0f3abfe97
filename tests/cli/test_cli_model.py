"""`vip2clip info` in-process and as a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vip2clip.cli import main


def test_info_reports_parameters_and_weights(capsys, caplog):
    assert main(["info", "--backbone", "tiny"]) == 0
    out = capsys.readouterr().out
    # The tiny backbone's own default size (a multiple of its 16-px patches), not ViT-L/14's 518 and a warning
    assert '"image_size": 128' in out and "not a multiple" not in caplog.text
    assert "trainable parameters: 30,369" in out
    assert "backbone weights: random init" in out
    assert "backbone parameters requiring grad: 0" in out


def test_info_without_weights_explains_the_options(capsys):
    assert main(["info", "--backbone", "ViT-B-16"]) == 2
    err = capsys.readouterr().err
    assert "--clip-weights" in err and "--random-init" in err


def test_info_missing_weights_file_is_a_clear_error(capsys, tmp_path):
    assert main(["info", "--backbone", "tiny", "--clip-weights", str(tmp_path / "ViT-L-14-336px.pt")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_info_vit_l14_subprocess_reports_the_paper_count():
    result = subprocess.run(
        [sys.executable, "-m", "vip2clip", "info", "--backbone", "ViT-L-14-336", "--random-init"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "trainable parameters: 4,149,121" in result.stdout
    assert "backbone parameters requiring grad: 0" in result.stdout


def test_backbone_comes_from_the_checkpoint(capsys, tmp_path):
    import vip2clip
    from vip2clip.model.checkpoint import save_checkpoint

    model = vip2clip.create_model("tiny", image_size=64, seed=0, n_context=5)
    path = save_checkpoint(tmp_path / "tiny.pt", model.config, state=model.trainable_state_dict())
    assert main(["info", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "backbone: tiny" in out and '"n_context": 5' in out


def test_bad_image_error_survives_pickling():
    import pickle

    from vip2clip.data.images import BadImageError

    error = pickle.loads(pickle.dumps(BadImageError("/data/x.png", "truncated")))
    assert str(error) == "/data/x.png: truncated" and error.problem == "truncated"


def test_compile_flag_compiles_the_encoders(monkeypatch, capsys):
    from vip2clip.model.vip2clip import ViP2CLIP

    calls = []
    monkeypatch.setattr(ViP2CLIP, "compile_encoders", lambda self, **options: calls.append(self) or self)
    assert main(["info", "--backbone", "tiny", "--compile"]) == 0
    assert len(calls) == 1
    assert main(["info", "--backbone", "tiny"]) == 0
    assert len(calls) == 1


def test_building_the_parser_imports_neither_torch_nor_open_clip():
    """Dataset commands (convert, validate) must start fast: the CLI loads the model stack (and the ONNX
    packages) only when needed."""
    heavy = "{'torch', 'open_clip', 'onnx', 'onnxruntime', 'onnxscript', 'openvino'}"
    code = (
        f"import sys; from vip2clip.cli import build_parser; build_parser(); print(sorted({heavy} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _not_checkpoints(folder, tiny_model):
    """Files people pass by mistake, and what the error must say about each."""
    import json

    import torch

    from vip2clip.model.checkpoint import save_checkpoint

    good = save_checkpoint(folder / "good.pt", tiny_model.config, state=tiny_model.trainable_state_dict()).read_bytes()
    files = {
        "empty.pt": (b"", "is not a {} file (it is empty)"),
        "results.json": (json.dumps({"image_auroc": 0.9}).encode(), "is not a {} file (it holds JSON)"),
        "garbage.pt": (bytes(range(7, 200)), "is not a {} file (it holds unknown binary data)"),
        "truncated.pt": (good[: len(good) // 2], "is not a readable {} file: it is truncated or damaged"),
        "cut_short.pt": (good[:30], "is not a readable {} file: it is truncated or damaged"),  # once "[Errno 22]"
    }
    torch.save(torch.nn.Linear(2, 2), folder / "module.pt")
    cases = {name: message for name, (data, message) in files.items()}
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    cases["module.pt"] = "is not a readable {} file: it holds Python objects other than tensors"
    return cases


def test_files_that_are_not_checkpoints_or_weights_say_so(capsys, tmp_path, tiny_model):
    for name, message in _not_checkpoints(tmp_path, tiny_model).items():
        for flag, what in (("--checkpoint", "checkpoint"), ("--clip-weights", "CLIP weights")):
            assert main(["info", "--backbone", "tiny", flag, str(tmp_path / name)]) == 2
            err = capsys.readouterr().err
            assert f"{tmp_path / name} {message.format(what)}" in err, err
            assert "weights_only" not in err and "Errno" not in err and "miniz" not in err


def test_image_sizes_that_cannot_work_are_refused_before_building(capsys, tmp_path, tiny_model, caplog):
    from vip2clip.model.checkpoint import save_checkpoint

    assert main(["info", "--backbone", "tiny", "--image-size", "65"]) == 2
    err = capsys.readouterr().err
    assert "image size 65 is not a multiple of the tiny backbone's patch size 16" in err and "use 64 or 80" in err
    assert main(["info", "--backbone", "tiny", "--image-size", "20000"]) == 2  # `predict` took 24 GB of RAM with it
    assert "image_size 20000 is larger than 2048" in capsys.readouterr().err
    path = save_checkpoint(tmp_path / "at64.pt", tiny_model.config, state=tiny_model.trainable_state_dict())
    assert main(["info", "--checkpoint", str(path), "--image-size", "96"]) == 0
    assert f"checkpoint {path} was trained at 64 px; running it at 96 px changes its scores" in caplog.text
