"""ViP-VCA, the visual-conditioned adapter (paper Sec. 4.1, Eqs. 2-5).

Two prompts, normal and anomalous: "[v1..v_e] good [z1..z_r]" and "[w1..w_e] damaged [z1..z_r]", with
z_i = o_i + a_i where o_i are learnable generic tokens and a_i = h_i(f + b) come from a Meta-Net of r
Linear-ReLU-Linear heads applied to the image's normalised global feature f plus a learnable bias b.
The fixed parts of each sentence (start token, state word, end token and padding) are CLIP token
embeddings kept as buffers, so that checkpoints reproduce them exactly.
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import tokenize
from torch import nn

STATES = ("normal", "anomalous")
PLACEHOLDER = "X"


class MetaNet(nn.Module):
    """r independent Linear(D->hidden)-ReLU-Linear(hidden->D) heads on (global feature + bias)."""

    def __init__(self, dim: int, *, hidden: int, n_heads: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)) for _ in range(n_heads)
        )

    def forward(self, global_feature: torch.Tensor) -> torch.Tensor:
        """[B, D] -> dynamic tokens [B, r, D]."""
        conditioned = global_feature + self.bias
        return torch.stack([head(conditioned) for head in self.heads], dim=1)


class VisualConditionedPrompts(nn.Module):
    """Builds the two prompt sentences as token embeddings [B, 2, 77, D] plus their end-of-text positions.

    With `use_vca=False` the generic tokens stay static (no Meta-Net): the paper's ViP²-CLIP_re variant.
    """

    def __init__(
        self,
        token_dim: int,
        *,
        n_context: int = 7,
        n_dynamic: int = 3,
        metanet_hidden: int = 384,
        use_vca: bool = True,
        context_length: int = 77,
    ) -> None:
        super().__init__()
        self.n_context, self.n_dynamic, self.use_vca = n_context, n_dynamic, use_vca
        self.context_length = context_length
        self.context_normal = nn.Parameter(torch.randn(n_context, token_dim) * 0.02)
        self.context_anomalous = nn.Parameter(torch.randn(n_context, token_dim) * 0.02)
        self.generic = nn.Parameter(torch.randn(n_dynamic, token_dim) * 0.02)
        self.metanet = (
            MetaNet(token_dim, hidden=metanet_hidden, n_heads=n_dynamic) if use_vca and n_dynamic > 0 else None
        )
        for state in STATES:
            # Placeholders; `set_sentences` fills them from the tokenizer, checkpoints overwrite them.
            self.register_buffer(f"prefix_{state}", torch.zeros(1, 1, token_dim))
            self.register_buffer(f"state_{state}", torch.zeros(1, 1, token_dim))
            self.register_buffer(
                f"suffix_{state}", torch.zeros(1, context_length - 2 - n_context - n_dynamic, token_dim)
            )
            self.register_buffer(f"tokens_{state}", torch.zeros(1, context_length, dtype=torch.long))
        self._refresh_eot()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def set_sentences(self, state_words: tuple[str, str], embed_tokens) -> None:
        """Tokenise "X X ... {word} X X X" per state and keep the fixed parts' embeddings as buffers.

        embed_tokens: token ids [1, 77] -> embeddings [1, 77, D] (the frozen CLIP's token embedding).
        """
        for state, word in zip(STATES, state_words, strict=True):
            sentence = " ".join([PLACEHOLDER] * self.n_context + [word] + [PLACEHOLDER] * self.n_dynamic)
            tokens = tokenize([sentence], context_length=self.context_length).to(self.context_normal.device)
            n_word = int(tokens.argmax(-1)) - 1 - self.n_context - self.n_dynamic
            if n_word < 1:
                raise ValueError(f"state word {word!r} tokenises to nothing")
            embedded = embed_tokens(tokens).to(self.context_normal.dtype)
            start_suffix = 1 + self.n_context + n_word + self.n_dynamic
            self.set_buffers(
                state,
                prefix=embedded[:, :1],
                word=embedded[:, 1 + self.n_context : 1 + self.n_context + n_word],
                suffix=embedded[:, start_suffix:],
                tokens=tokens,
            )

    def set_buffers(
        self, state: str, *, prefix: torch.Tensor, word: torch.Tensor, suffix: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        """Replace one state's fixed parts (shapes may change with the state word's token count)."""
        expected = 1 + self.n_context + word.shape[1] + self.n_dynamic + suffix.shape[1]
        if expected != tokens.shape[1]:
            raise ValueError(f"{state} prompt parts add up to {expected} positions, tokens have {tokens.shape[1]}")
        for name, value in (("prefix", prefix), ("state", word), ("suffix", suffix), ("tokens", tokens)):
            setattr(self, f"{name}_{state}", value.detach().clone())
        self._refresh_eot()

    def _refresh_eot(self) -> None:
        # Python ints, read from the token buffers whenever they change (set_buffers, load_state_dict): the text
        # length must be known without reading tensors inside the forward, which torch.export cannot trace.
        self.eot = tuple(int(getattr(self, f"tokens_{state}").argmax(-1)) for state in STATES)

    @property
    def text_length(self) -> int:
        """Positions up to and including the later end-of-text token (13 for the paper's prompts)."""
        return max(self.eot) + 1

    def eot_positions(self) -> torch.Tensor:
        """[2]: index of the end-of-text token (highest id) in the normal and anomalous sentences."""
        return torch.tensor(self.eot, device=self.tokens_normal.device)

    def generic_tokens(self, global_feature: torch.Tensor | None) -> torch.Tensor:
        """z = o (+ Meta-Net(f) with VCA): [B, r, D], or [1, r, D] for static prompts."""
        static = self.generic.unsqueeze(0)
        if self.metanet is None:
            return static
        if global_feature is None:
            raise ValueError("visual-conditioned prompts need the image's global feature")
        return static + self.metanet(global_feature.to(static.dtype))

    def forward(self, global_feature: torch.Tensor | None = None, n_positions: int | None = None) -> torch.Tensor:
        """-> prompt embeddings [B, 2, L, D] (B = 1 without VCA); L = n_positions or 77."""
        z = self.generic_tokens(global_feature)
        batch = z.shape[0]
        sentences = []
        for state, context in zip(STATES, (self.context_normal, self.context_anomalous), strict=True):
            word = getattr(self, f"state_{state}")
            suffix = getattr(self, f"suffix_{state}")
            if n_positions is not None:
                suffix = suffix[:, : n_positions - (1 + self.n_context + word.shape[1] + self.n_dynamic)]
            parts = [
                getattr(self, f"prefix_{state}").expand(batch, -1, -1),
                context.unsqueeze(0).expand(batch, -1, -1),
                word.expand(batch, -1, -1),
                z.expand(batch, -1, -1),
                suffix.expand(batch, -1, -1),
            ]
            sentences.append(torch.cat(parts, dim=1))
        return torch.stack(sentences, dim=1)


def _refresh_after_load(module: VisualConditionedPrompts, incompatible_keys: object) -> None:
    """load_state_dict post-hook: the token buffers may have changed."""
    module._refresh_eot()
