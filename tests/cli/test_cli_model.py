"""`vip2clip info` in-process and as a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vip2clip.cli import main


def test_info_reports_parameters_and_weights(capsys):
    assert main(["info", "--backbone", "tiny"]) == 0
    out = capsys.readouterr().out
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
    path = save_checkpoint(tmp_path / "tiny.pt", model.config, model.trainable_state_dict())
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
    """Dataset commands (convert, validate) must start fast: the CLI loads the model stack only when needed."""
    code = (
        "import sys; from vip2clip.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
