"""Named presets: the table is valid and names the paper's variants; create_model applies a preset's switches
as defaults that explicit arguments override."""

from __future__ import annotations

import pytest

import vip2clip
from vip2clip.config import ModelConfig
from vip2clip.model import presets
from vip2clip.model.presets import Preset, get_preset


def test_every_preset_builds_a_valid_config_and_the_ablations_differ() -> None:
    names = vip2clip.list_models()
    assert names[0] == "vip2clip" and "tiny" in names
    configs = {name: get_preset(name).model_config() for name in names}
    assert configs["vip2clip"] == ModelConfig()
    switches = {(c.use_vca, c.use_fgp, c.use_utpa) for n, c in configs.items() if n.startswith("ablation-")}
    assert len(switches) == 7  # every combination of the three modules except all three (that is "vip2clip")
    assert configs["state-perfect-flawed"].state_words == ("perfect", "flawed")
    assert {row for name in names for row in get_preset(name).paper if row.startswith("Table 6")} == {
        "Table 6 good/damaged", "Table 6 normal/abnormal", "Table 6 perfect/flawed", "Table 6 flawless/imperfect"
    }  # fmt: skip


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ValueError, match="ablation-utpa"):
        get_preset("ablation-utp")
    with pytest.raises(ValueError, match="unknown model options"):
        Preset(name="bad", backbone="tiny", image_size=None, config={"use_vcaa": False}, paper=(), description="")


def test_create_model_applies_a_preset_and_explicit_options_win(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {
        "tiny-static": Preset(
            name="tiny-static",
            backbone="tiny",
            image_size=64,
            config={"use_vca": False, "top_k": 3},
            paper=(),
            description="test",
        )
    }
    monkeypatch.setattr(presets, "_table", lambda: table)
    model = vip2clip.create_model("tiny-static")
    assert (model.config.backbone, model.config.image_size, model.config.use_vca, model.config.top_k) == (
        "tiny", 64, False, 3
    )  # fmt: skip
    model = vip2clip.create_model("tiny-static", image_size=32, top_k=5)
    assert (model.config.image_size, model.config.use_vca, model.config.top_k) == (32, False, 5)
