"""Language-bias compensation: remove what makes a language's encoder frames *that language* before alignment.

POTSA observes that a frozen speech encoder's outputs carry a large language-specific offset: time-pooled outputs of
different utterances cluster by language more than by content. Subtracting each language's mean vector (estimated
from unlabeled speech only) moves all languages to a shared origin, which is what lets the Q-Former and the OT loss
treat parallel utterances as the same content. Because only audio is needed, a language with no translations at
all can get its vector (zero-shot), and the same centroids identify the language of an unknown utterance.
"""

from __future__ import annotations

import torch
from torch import nn


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

    The rows start at zero (identity) and are set from an estimate (`LanguageBiasEstimator`); the paper's code keeps
    them trainable afterwards, which `PotsaConfig.train_bias` controls.
    """

    def __init__(self, num_languages: int, hidden_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_languages, hidden_size))

    @property
    def num_languages(self) -> int:
        return self.bias.shape[0]

    def forward(self, frames: torch.Tensor, language_ids: torch.Tensor) -> torch.Tensor:
        """frames (B, T, d), language_ids (B,) -> frames - bias[language_ids] broadcast over time."""
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
        return frames - self.bias[language_ids].unsqueeze(1).to(frames.dtype)

    @torch.no_grad()
    def nearest_language(self, pooled: torch.Tensor) -> torch.Tensor:
        """Language id of the nearest bias centroid for each (B, d) time-pooled encoder output.

        The bias rows are language centroids of exactly these pooled vectors, so nearest-centroid classification
        comes for free; it needs every row to have been estimated.
        """
        distances = torch.cdist(pooled.float(), self.bias.float())  # (B, num_languages)
        return distances.argmin(dim=-1)


class LanguageBiasEstimator:
    """Streaming per-language mean of time-pooled encoder outputs (float64 sums: exact over millions of clips).

    Feed it batches with `update`; `means()` gives the table rows and which languages were seen. Under data
    parallelism, `all_reduce()` sums the statistics of every process before reading them.
    """

    def __init__(self, num_languages: int, hidden_size: int) -> None:
        self.sums = torch.zeros(num_languages, hidden_size, dtype=torch.float64)
        self.counts = torch.zeros(num_languages, dtype=torch.float64)

    def update(self, pooled: torch.Tensor, language_ids: torch.Tensor) -> None:
        """pooled (B, d) from `masked_time_mean`, language_ids (B,)."""
        pooled = pooled.detach().to("cpu", torch.float64)
        language_ids = language_ids.detach().to("cpu")
        self.sums.index_add_(0, language_ids, pooled)
        self.counts.index_add_(0, language_ids, torch.ones_like(language_ids, dtype=torch.float64))

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.cat([self.sums, self.counts.unsqueeze(1)], dim=1)
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            stats = stats.to(device)
            torch.distributed.all_reduce(stats)
            self.sums, self.counts = stats[:, :-1].cpu(), stats[:, -1].cpu()

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_languages, d) float32 means and a (num_languages,) bool mask of languages that had any audio."""
        seen = self.counts > 0
        means = self.sums / self.counts.clamp_min(1.0).unsqueeze(1)
        return means.float(), seen


__all__ = ["LanguageBiasCompensation", "LanguageBiasEstimator", "masked_time_mean"]
