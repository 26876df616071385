r"""Language-bias compensation: remove what makes a language's encoder frames *that language* before alignment.

POTSA observes that a frozen speech encoder's outputs carry a large language-specific offset: time-pooled outputs of
different utterances cluster by language more than by content. Subtracting each language's mean vector (estimated
from unlabeled speech only) moves all languages to a shared origin, which is what lets the Q-Former and the OT loss
treat parallel utterances as the same content. Because only audio is needed, a language with no translations at
all can get its vector (zero-shot), and the same centroids identify the language of an unknown utterance.

Is the bias only an offset? The "affine" mode also equalises each language's per-dimension spread: with
``mu_l`` and ``sigma_l`` the mean and standard deviation of language ``l``'s time-pooled outputs and ``sigma_ref``
the root-mean-square of ``sigma_l`` over the languages of the first estimate,

.. math::

    x \mapsto (x - \mu_l) \odot s_l, \qquad s_l = \sigma_{\text{ref}} / \sigma_l

so every language has the same spread, ``sigma_ref``, while the frames keep the encoder's overall scale (dividing
by ``sigma_l`` alone would blow frames up: the spread of *pooled* vectors is far below that of frames). ``s_l``
is stored directly (a multiplicative table, 1 = identity) so that it trains like the bias, and ``sigma_ref`` is
kept so that a language added later is scaled to the same reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import initialization as init

COMPENSATION_MODES = ("mean", "affine")
_MAX_SCALE = 100.0  # a language that barely varies in a dimension is stretched at most this much there


def masked_time_mean(frames: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid frames.

    Args:
        frames: (B, T, d) encoder outputs.
        frame_mask: (B, T) bool, True for frames that belong to the audio (not padding); None = all valid.

    Returns:
        (B, d) time-pooled vectors, in float32 so that averages over many utterances do not lose precision.
    """
    frames = frames.float()
    if frame_mask is None:
        return frames.mean(dim=1)
    weights = frame_mask.to(frames.dtype).unsqueeze(-1)  # (B, T, 1)
    counts = weights.sum(dim=1).clamp_min(1.0)  # (B, 1)
    return (frames * weights).sum(dim=1) / counts


class LanguageBiasCompensation(nn.Module):
    """A (num_languages, hidden_size) table; row `l` is subtracted from every frame of an utterance in language `l`.

    The rows start at zero (identity) and are set from an estimate (training's `estimate_language_bias`); the paper's code keeps
    them trainable afterwards, which training's `train_bias` controls. In "affine" mode (module docstring) a second
    table, ``scale``, multiplies the centred frames, and the buffer ``reference_std`` (zeros until the first
    estimate) is the spread the scales aim at. A "mean" module has neither, so its checkpoints are the paper's.

    Args:
        num_languages (`int`): rows of the tables.
        hidden_size (`int`): width of the encoder frames.
        mode (`str`, *optional*, defaults to `"mean"`): one of `COMPENSATION_MODES`.
    """

    def __init__(self, num_languages: int, hidden_size: int, mode: str = "mean") -> None:
        super().__init__()
        if mode not in COMPENSATION_MODES:
            raise ValueError(f"Unknown bias compensation mode {mode!r}; choose one of {COMPENSATION_MODES}.")
        self.bias = nn.Parameter(torch.zeros(num_languages, hidden_size))
        self.register_parameter("scale", None)
        self.register_buffer("reference_std", None)
        if mode == "affine":
            self.enable_affine()

    @property
    def num_languages(self) -> int:
        return self.bias.shape[0]

    @property
    def mode(self) -> str:
        return "mean" if self.scale is None else "affine"

    def enable_affine(self) -> None:
        """Switch to affine compensation in place, starting from identity scales (nothing changes until they are
        set): how a "mean" checkpoint continues with ``bias_compensation_mode="affine"``. The scales train when the
        bias does."""
        if self.scale is not None:
            return
        self.scale = nn.Parameter(torch.ones_like(self.bias), requires_grad=self.bias.requires_grad)
        self.reference_std = torch.zeros(self.bias.shape[1], dtype=self.bias.dtype, device=self.bias.device)

    def reset_parameters(self) -> None:
        """Identity: zero bias, unit scales, no reference yet (transformers' guarded init keeps loaded tensors, so a
        "mean" checkpoint loaded into an affine model gets identity scales, not uninitialised memory)."""
        init.zeros_(self.bias)
        if self.scale is not None:
            init.ones_(self.scale)
            init.zeros_(self.reference_std)

    @property
    def has_reference(self) -> bool:
        return self.reference_std is not None and bool((self.reference_std > 0).any())

    @torch.no_grad()
    def set_reference_std(self, language_stds: Iterable[torch.Tensor]) -> None:
        """``sigma_ref``: the root-mean-square over languages of their (d,) per-dimension spreads."""
        stds = torch.stack([std.to(self.bias) for std in language_stds])  # (languages estimated, d)
        self.reference_std = stds.pow(2).mean(dim=0).sqrt()

    @torch.no_grad()
    def set_language_std(self, row: int, std: torch.Tensor | None) -> None:
        """Scale language ``row`` to the reference spread, ``scale[row] = reference_std / std`` (``None``: identity),
        at most `_MAX_SCALE` per dimension (a dimension every language leaves constant gets 0: it carries nothing).

        ``row == scale.shape[0]`` appends a row: a language just added to the bias table (``add_language``).
        """
        if self.scale is None:
            raise ValueError("Language spreads need affine mode: call `enable_affine()` first.")
        if std is not None and not self.has_reference:
            raise ValueError("No reference spread yet: call `set_reference_std` with the languages' spreads first.")
        if row == self.scale.shape[0] < self.num_languages:
            grown = torch.cat([self.scale.detach(), torch.ones_like(self.scale[:1])])
            self.scale = nn.Parameter(grown, requires_grad=self.scale.requires_grad)
        if std is None:
            self.scale[row] = 1.0
            return
        floor = (self.reference_std / _MAX_SCALE).clamp_min(torch.finfo(self.bias.dtype).tiny)
        self.scale[row] = self.reference_std / torch.maximum(std.to(self.bias), floor)

    def forward(self, frames: torch.Tensor, language_ids: torch.Tensor) -> torch.Tensor:
        """frames (B, T, d), language_ids (B,) -> frames - bias[language_ids] broadcast over time (affine mode:
        then times scale[language_ids])."""
        if language_ids.ndim != 1 or language_ids.shape[0] != frames.shape[0]:
            raise ValueError(
                f"`language_ids` must have shape ({frames.shape[0]},) (one id per utterance), got "
                f"{tuple(language_ids.shape)}."
            )
        if language_ids.numel() and (language_ids.min() < 0 or language_ids.max() >= self.num_languages):
            raise ValueError(
                f"`language_ids` must be in [0, {self.num_languages}); got {language_ids.tolist()}. Use "
                "`config.language_id(code)` to map language codes to ids."
            )
        centred = frames - self.bias[language_ids].unsqueeze(1).to(frames.dtype)
        if self.scale is None:
            return centred
        if self.scale.shape[0] != self.num_languages:
            raise ValueError(
                f"The bias table has {self.num_languages} languages but the scale table {self.scale.shape[0]}: a "
                "language was added without its spread. Add languages with training's `apply_language_bias`, or "
                "call `set_language_std(row, std)` for the new row."
            )
        return centred * self.scale[language_ids].unsqueeze(1).to(frames.dtype)

    @torch.no_grad()
    def nearest_language(self, pooled: torch.Tensor) -> torch.Tensor:
        """Language id of the nearest bias centroid for each (B, d) time-pooled encoder output.

        The bias rows are language centroids of exactly these pooled vectors, so nearest-centroid classification
        comes for free; it needs every row to have been estimated.
        """
        distances = torch.cdist(pooled.float(), self.bias.float())  # (B, num_languages)
        return distances.argmin(dim=-1)


__all__ = ["COMPENSATION_MODES", "LanguageBiasCompensation", "masked_time_mean"]
