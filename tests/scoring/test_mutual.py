"""Batch zero-shot (mutual scoring): the pure rule against a naive implementation, its invariants (never itself,
identical images, chunking, batch order), the Predictor option, tiling, references and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vip2clip.inference.assembly import ModelSpec, PredictorSpec
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.inference.predictor import Predictor
from vip2clip.inference.thresholds import Thresholds
from vip2clip.scoring.mutual import (
    MutualRule,
    alike_share,
    choose_others,
    mutual_distances,
    smallest_share_mean,
)
from vip2clip.scoring.mutual_group import score_group
from vip2clip.scoring.references import ReferenceMemory
from vip2clip.scoring.tiling import TileConfig

EXPLICIT = Thresholds(0.5, 0.5, "given explicitly")  # mutual scores are never judged against the default 0.5


def _tokens(n: int, patches: int = 12, width: int = 16, layers: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, layers, patches, width, generator=generator)
    return list(torch.nn.functional.normalize(raw, dim=-1).half())


def _naive(tokens: list[torch.Tensor], others: list[list[int]], share: float) -> list[torch.Tensor]:
    """The rule written out: per layer, patch and other image, 1 - max cosine; smallest share; layer mean."""
    result = []
    for i, mine in enumerate(others):
        per_layer = []
        for layer in range(tokens[i].shape[0]):
            columns = []
            for j in mine:
                similarity = tokens[i][layer].float() @ tokens[j][layer].float().T
                columns.append((1 - similarity.amax(dim=1)).clamp(0, 1))
            table = torch.stack(columns, dim=1)  # [P, K]
            k = max(1, math.ceil(share * len(mine)))
            per_layer.append(table.sort(dim=1).values[:, :k].mean(dim=1))
        result.append(torch.stack(per_layer).mean(dim=0))
    return result


def _images(count: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_distances_equal_the_naive_rule_with_and_without_chunking() -> None:
    tokens = _tokens(7)
    keys = [str(i) for i in range(7)]
    for others in (choose_others(keys, max_others=64, seed=0), choose_others(keys, max_others=4, seed=3)):
        expected = _naive(tokens, others, 0.3)
        for budget in (1, 5, 12 * 12, 1 << 24):  # one similarity at a time ... everything at once
            actual = mutual_distances(tokens, others, share=0.3, budget=budget)
            for a, e in zip(actual, expected, strict=True):
                torch.testing.assert_close(a, e, atol=1e-6, rtol=0)


def test_an_image_is_never_compared_with_itself() -> None:
    # Random tokens in 16 dimensions: every other image is far; the image itself would be at distance 0.
    tokens = _tokens(4)
    others = choose_others([str(i) for i in range(4)], max_others=64, seed=0)
    assert all(i not in mine for i, mine in enumerate(others))
    distances = mutual_distances(tokens, others, share=0.01)  # the smallest distance only: itself would give 0
    assert min(float(d.min()) for d in distances) > 0.2


def test_sample_of_others_is_symmetric_bounded_and_independent_of_order() -> None:
    keys = [f"image{i}" for i in range(20)]
    others = choose_others(keys, max_others=6, seed=5)
    assert all(len(mine) == 6 and i not in mine for i, mine in enumerate(others))
    assert all(i in others[j] for i, mine in enumerate(others) for j in mine)  # symmetric: one matrix per pair
    order = np.random.default_rng(0).permutation(20)
    shuffled = choose_others([keys[k] for k in order], max_others=6, seed=5)
    as_keys = {keys[order[i]]: {keys[order[j]] for j in mine} for i, mine in enumerate(shuffled)}
    assert as_keys == {keys[i]: {keys[j] for j in mine} for i, mine in enumerate(others)}
    assert choose_others(keys, max_others=6, seed=6) != others  # the seed chooses the sample
    all_others = [[j for j in range(5) if j != i] for i in range(5)]
    assert choose_others(keys[:5], max_others=6, seed=5) == all_others


def test_smallest_share_mean_and_alike_share() -> None:
    table = torch.tensor([[0.1, 0.9, 0.5, 0.3], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(smallest_share_mean(table, 0.5), torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(smallest_share_mean(table, 0.01), torch.tensor([0.1, 0.0]))  # at least one
    assert alike_share([0.1, 0.1, 0.12, 0.11, 0.5, 0.6]) == pytest.approx(4 / 6)


def test_identical_normal_images_give_a_flat_map(tiny_model) -> None:
    image = _images(1)[0]
    group = score_group(Predictor(tiny_model, EXPLICIT, mutual=MutualRule()), [image] * 4)
    for i in range(4):
        _scores, maps = group.mutual(i)
        assert float(maps.abs().max()) < 2e-3  # float16 tokens: identical patches at distance ~0 everywhere
    plain = Predictor(tiny_model).predict([image])[0]
    fused = Predictor(tiny_model, EXPLICIT, mutual=MutualRule()).predict([image] * 4)
    for result in fused:  # the fused map is the zero-shot map scaled by (1 - weight), plus a flat ~0
        np.testing.assert_allclose(result.anomaly_map, 0.25 * plain.anomaly_map, atol=2e-3)
    assert group.report.n_images == 4 and group.report.others_per_image == 3


def test_batch_order_does_not_change_scores(tiny_model) -> None:
    images = _images(6)
    for rule in (MutualRule(), MutualRule(max_others=2)):  # all others, and a seeded sample of 2 of 5
        predictor = Predictor(tiny_model, EXPLICIT, batch_size=4, mutual=rule)
        forward = predictor.predict(images)
        order = [3, 0, 5, 1, 4, 2]
        shuffled = predictor.predict([images[k] for k in order])
        for position, k in enumerate(order):
            assert shuffled[position].pred_score == pytest.approx(forward[k].pred_score, abs=1e-6)
            # The zero-shot maps are held as float16: another batch composition may round one value differently.
            np.testing.assert_allclose(shuffled[position].anomaly_map, forward[k].anomaly_map, atol=1e-4)


def test_fused_outputs_follow_the_rule_and_are_recorded(tiny_model) -> None:
    images = _images(5)
    rule = MutualRule(share=0.5, weight=0.6)
    predictor = Predictor(tiny_model, EXPLICIT, mutual=rule)
    group = score_group(predictor, images)
    plain = Predictor(tiny_model).predict(images)
    for i, result in enumerate(predictor.predict(images)):
        _scores, maps = group.mutual(i)
        expected_map = 0.4 * plain[i].anomaly_map + 0.6 * maps[0].numpy()
        np.testing.assert_allclose(result.anomaly_map, expected_map, atol=1e-3)  # zero-shot maps kept as float16
        assert result.pred_score == pytest.approx(0.4 * plain[i].pred_score + 0.6 * float(maps[0].max()), abs=1e-5)
    assert predictor.identity.mutual == rule.to_dict()
    assert Predictor(tiny_model).identity.mismatches(predictor.identity)  # a calibration without it is refused


def test_fewer_than_three_images_are_refused_with_the_reason(tiny_model) -> None:
    predictor = Predictor(tiny_model, EXPLICIT, mutual=MutualRule())
    with pytest.raises(ValueError, match=r"2 readable image.*at least 3"):
        predictor.predict(_images(2))


def test_an_engine_without_patch_tokens_is_refused(tiny_model) -> None:
    class ScoresOnly:  # what an exported graph gives: scores and maps, no tokens
        config = tiny_model.config

        def predict(self, images):
            return tiny_model.predict(images)

    with pytest.raises(ValueError, match="mutual scoring needs the encoder's patch tokens"):
        Predictor(ScoresOnly(), EXPLICIT, mutual=MutualRule()).predict(_images(3))


def test_tiles_are_compared_with_all_tiles_of_the_other_images(tiny_model) -> None:
    images = [*_images(3, size=96), _images(1, size=128, seed=1)[0]]  # sizes differ: tile grids differ
    tiling = TileConfig(64, 0.25)
    predictor = Predictor(tiny_model, EXPLICIT, tiling=tiling, mutual=MutualRule())
    results = predictor.predict(images)
    assert [r.anomaly_map.shape for r in results] == [(96, 96)] * 3 + [(128, 128)]
    group = score_group(predictor, images)
    assert [len(units) for units in group.zero_shot] == [4, 4, 4, 9]
    assert all(np.isfinite(r.pred_score) for r in results)


def test_mutual_scoring_on_top_of_reference_images(tiny_model) -> None:
    references = _images(2, seed=7)
    tokens = tiny_model.encode_image(torch.stack([_preprocess(r) for r in references])).patch_tokens
    memory = ReferenceMemory(tokens=tuple(t.reshape(-1, t.shape[-1]).half() for t in tokens), files=())
    images = _images(4)
    both = Predictor(tiny_model, EXPLICIT, references=memory, mutual=MutualRule()).predict(images)
    with_references = Predictor(tiny_model, references=memory).predict(images)
    group = score_group(Predictor(tiny_model, EXPLICIT, references=memory, mutual=MutualRule()), images)
    for i, result in enumerate(both):  # the mutual map is fused with the references' fused map
        expected = 0.25 * with_references[i].anomaly_map + 0.75 * group.mutual(i)[1][0].numpy()
        np.testing.assert_allclose(result.anomaly_map, expected, atol=1e-3)
    identity = Predictor(tiny_model, EXPLICIT, references=memory, mutual=MutualRule()).identity
    assert identity.references is not None and identity.mutual is not None
    assert PredictorIdentity.from_dict(identity.to_dict()) == identity


def _preprocess(image: Image.Image) -> torch.Tensor:
    from vip2clip.data.transforms import preprocess

    return preprocess(image, 64)


def test_predict_mutual_on_a_tensor_batch_equals_the_predictor(tiny_model) -> None:
    import vip2clip

    images = _images(4)
    batch = torch.stack([_preprocess(image) for image in images])
    prediction = vip2clip.predict_mutual(tiny_model, batch, rule=vip2clip.MutualRule())
    results = Predictor(tiny_model, EXPLICIT, mutual=vip2clip.MutualRule()).predict(images)
    for i, result in enumerate(results):  # the Predictor holds zero-shot maps as float16
        assert float(prediction.pred_score[i]) == pytest.approx(result.pred_score, abs=1e-5)
        np.testing.assert_allclose(prediction.anomaly_map[i].numpy(), result.anomaly_map, atol=1e-3)
    with pytest.raises(ValueError, match="at least 3 images"):
        vip2clip.predict_mutual(tiny_model, batch[:2])


def test_the_assembly_spec_carries_the_rule_and_refuses_it_for_an_onnx_model(tmp_path) -> None:
    rule = MutualRule(share=0.5)
    thresholds = {"image_threshold": 0.5, "pixel_threshold": 0.5}  # mutual scores are never judged uncalibrated
    predictor = Predictor.from_checkpoint(None, backbone="tiny", image_size=32, mutual=rule, **thresholds)
    assert predictor.mutual == rule and predictor.identity.mutual == rule.to_dict()
    with pytest.raises(ValueError, match="an ONNX export does not output"):
        PredictorSpec(model=ModelSpec(onnx=tmp_path / "model.onnx"), mutual=rule)
