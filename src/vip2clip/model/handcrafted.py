"""CLIP's own prompts, untrained: the zero-shot CLIP baseline (Table 4's row without any module, our reading).

The paper does not describe the CLIP it prints in Table 4's first row and in the CLIP column of Tables 10-21.
We take CLIP as it is used zero-shot: hand-written sentences for the two states, each state's text feature the
mean of its sentences' (normalised) features over a template ensemble, as CLIP's prompt ensembling (Radford et
al., 2021, Sec. 3.1.4) and WinCLIP do. The templates are a subset of CLIP's ImageNet ensemble that WinCLIP's
list also holds, with "the {state} object" where CLIP names a class: ViP²-CLIP is told no class name (its
evaluation gives the model none), so the baseline gets none either; baselines that put the class name into the
sentence (AnomalyCLIP's CLIP column) may score higher. The state words are the model's (`state_words`: good /
damaged for the paper's model, Table 6's pairs otherwise). Everything after the text features (patch similarity
at the tapped layers, temperature, smoothing, the image score) is the model's own, set by its other options.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.tokenizer import tokenize

from vip2clip.model.backbone import FrozenCLIP

NOTHING_TO_TRAIN = (
    "this model uses CLIP's hand-written prompts (text_prompts 'handcrafted', e.g. the clip-zero-shot preset): it "
    "has nothing to train; test it without a checkpoint"
)
TEMPLATES = (
    "a photo of the {} object.",
    "a cropped photo of the {} object.",
    "a close-up photo of the {} object.",
    "a bright photo of the {} object.",
    "a dark photo of the {} object.",
    "a blurry photo of the {} object.",
    "a low resolution photo of the {} object.",
    "a jpeg corrupted photo of the {} object.",
)


def handcrafted_sentences(state_words: tuple[str, str]) -> list[list[str]]:
    """Per state (normal, anomalous), the sentences whose features are averaged."""
    return [[template.format(word) for template in TEMPLATES] for word in state_words]


def handcrafted_text(backbone: FrozenCLIP, state_words: tuple[str, str]) -> torch.Tensor:
    """The two states' text features [1, 2, D] (L2-normalised): each the normalised mean of its sentences'."""
    device = backbone.clip.token_embedding.weight.device
    context_length = int(backbone.clip.positional_embedding.shape[0])
    states = []
    for sentences in handcrafted_sentences(state_words):
        tokens = tokenize(sentences, context_length=context_length).to(device)
        eot = tokens.argmax(dim=-1)
        features = backbone.encode_prompts(backbone.embed_tokens(tokens), eot, n_positions=int(eot.max()) + 1)
        states.append(F.normalize(features.float().mean(dim=0), dim=-1))
    return torch.stack(states).unsqueeze(0)
