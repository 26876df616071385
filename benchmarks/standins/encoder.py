"""The Whisper stand-in: a `WhisperEncoder` pretrained on multilingual ASR of the corpus (CTC over characters) plus
an auxiliary frame-position loss, and the greedy-CTC transcription that measures it (the package docstring says why
both heads exist). The CTC head is kept beside the shipped encoder, only to measure it; POTSA never loads it."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modeling_potsa.processing_potsa import PotsaProcessor
from potsa_training.rows import audio_features
from potsa_training.tiny import tiny_feature_extractor, train_char_tokenizer

from .optimization import cosine_schedule, optimize

CTC_HEAD = "ctc_head.safetensors"


@dataclass
class EncoderRecipe:
    """Size and schedule of the Whisper stand-in."""

    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    # 2,400 steps of 64 hear every clip of the 10-language corpus about five times: 1,200 steps, enough for 6
    # languages (validation CER 7.8%), left 10 languages at 15%.
    steps: int = 2400
    batch_size: int = 64
    learning_rate: float = 2e-3
    window_seconds: int = 3  # the corpus' clips are at most 3 s (`generate_corpus(max_seconds=3.0)`)
    num_mel_bins: int = 40
    position_loss_weight: float = 0.3  # the auxiliary "where am I in the window" loss (package docstring)
    # CPU bfloat16 autocast (losses in float32): ~25% faster steps on a CPU with native bf16 (AVX512-BF16 / AMX),
    # ~20x slower on one without (emulated). None: use it where the CPU has it.
    bfloat16: bool | None = None

    def use_bfloat16(self) -> bool:
        return cpu_has_native_bfloat16() if self.bfloat16 is None else self.bfloat16


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (Linux /proc/cpuinfo flags; False where they cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@torch.no_grad()
def corpus_features(
    dataset: datasets.Dataset, feature_extractor: WhisperFeatureExtractor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of every clip through the real processing path (resampling 22.05 -> 16 kHz included):
    (N, n_mels, frames) float16 and the (N, frames) bool mask of real frames."""
    processor = PotsaProcessor(feature_extractor, train_char_tokenizer(), languages=["xx"], num_query_tokens=1)
    numpy_rows = dataset.with_format("numpy", columns=["audio"])
    features, masks = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="log-mel features", leave=False):
        rows = numpy_rows[start : start + batch_size]["audio"]
        batch = audio_features([{"audio": audio} for audio in rows], processor)
        features.append(batch["input_features"].half())
        masks.append(batch["feature_attention_mask"].bool())
    return torch.cat(features), torch.cat(masks)


class PretrainingEncoder(torch.nn.Module):
    """WhisperEncoder + a linear CTC head over characters + a linear head over frame positions (the position head
    exists only during pretraining)."""

    def __init__(self, config: WhisperConfig, num_symbols: int) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.ctc_head = torch.nn.Linear(config.d_model, num_symbols)
        self.position_head = torch.nn.Linear(config.d_model, config.max_source_positions)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, symbols) CTC log-probabilities and (B, T, T) position logits."""
        frames = self.encoder(features).last_hidden_state
        return self.ctc_head(frames).float().log_softmax(-1), self.position_head(frames).float()


def greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor, symbols: Sequence[str]) -> list[str]:
    """Best-path decoding: the most likely symbol per frame, repeats merged, blanks (symbol 0) dropped."""
    texts = []
    for row, length in zip(log_probs.argmax(-1), lengths.tolist()):
        ids = torch.unique_consecutive(row[:length]).tolist()
        texts.append("".join(symbols[i] for i in ids if i != 0))
    return texts


def character_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Edit distance over characters / reference characters (the usual CER)."""
    errors = 0
    for hypothesis, reference in zip(hypotheses, references):
        previous = list(range(len(reference) + 1))
        for i, h in enumerate(hypothesis, 1):
            current = [i]
            for j, r in enumerate(reference, 1):
                current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r)))
            previous = current
        errors += previous[-1]
    return errors / max(sum(map(len, references)), 1)


def save_ctc_head(head: torch.nn.Linear, symbols: Sequence[str], out_dir: str | Path) -> None:
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(Path(out_dir) / CTC_HEAD), metadata={"symbols": json.dumps(list(symbols), ensure_ascii=False)})  # fmt: skip


def load_ctc_head(encoder_dir: str | Path) -> tuple[torch.nn.Linear, list[str]]:
    """The CTC head shipped beside a stand-in encoder and its symbols (index 0: the blank)."""
    with safe_open(str(Path(encoder_dir) / CTC_HEAD), framework="pt") as handle:
        symbols = json.loads(handle.metadata()["symbols"])
        weight, bias = handle.get_tensor("weight"), handle.get_tensor("bias")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head, symbols


@torch.no_grad()
def asr_quality(
    encoder: WhisperEncoder,
    head: torch.nn.Linear,
    symbols: Sequence[str],
    dataset: datasets.Dataset,
    feature_extractor: WhisperFeatureExtractor,
) -> dict[str, dict[str, float]]:
    """Greedy-CTC character error rate and exact-transcript rate on `dataset`, overall ("all") and per language."""
    features, masks = corpus_features(dataset, feature_extractor)
    encoder.eval()
    hypotheses = []
    for start in range(0, len(features), 256):
        frames = encoder(features[start : start + 256].float()).last_hidden_state
        hypotheses += greedy_ctc(head(frames).log_softmax(-1), masks[start : start + 256, ::2].sum(1), symbols)
    references = [text.lower() for text in dataset["transcript"]]
    by_language: dict[str, list[int]] = defaultdict(list)
    for index, language in enumerate(dataset["language"]):
        by_language[language].append(index)
    quality = {}
    for name, indices in {"all": list(range(len(references))), **dict(sorted(by_language.items()))}.items():
        hyp, ref = [hypotheses[i] for i in indices], [references[i] for i in indices]
        exact = sum(h == r for h, r in zip(hyp, ref)) / max(len(ref), 1)
        quality[name] = {"cer": character_error_rate(hyp, ref), "exact": exact}
    return quality


def train_speech_encoder(
    train: datasets.Dataset,
    validation: datasets.Dataset,
    out_dir: str | Path,
    recipe: EncoderRecipe = EncoderRecipe(),
    seed: int = 0,
    threads: Callable[[], int] = torch.get_num_threads,
) -> dict[str, dict[str, float]]:
    """Pretrain the Whisper stand-in (CTC on multilingual transcripts + frame positions); save encoder, feature
    extractor and CTC head; return its `asr_quality` on `validation`. `threads()` is asked every few steps how many
    CPU threads to use (the LM stand-in may be training beside it)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads())
    feature_extractor = tiny_feature_extractor(recipe.window_seconds, recipe.num_mel_bins)
    features, masks = corpus_features(train, feature_extractor)
    symbols = ["<blank>", *sorted({char for text in train["transcript"] for char in text.lower()})]
    index = {symbol: i for i, symbol in enumerate(symbols)}
    targets = [torch.tensor([index[c] for c in text.lower()]) for text in train["transcript"]]
    frames = feature_extractor.nb_max_frames // 2  # Whisper's stride-2 convolution
    config = WhisperConfig(
        d_model=recipe.hidden_size, encoder_layers=recipe.layers, encoder_attention_heads=recipe.heads,
        encoder_ffn_dim=4 * recipe.hidden_size, decoder_layers=1, decoder_attention_heads=recipe.heads,
        decoder_ffn_dim=4 * recipe.hidden_size, num_mel_bins=recipe.num_mel_bins, max_source_positions=frames,
    )  # fmt: skip
    model = PretrainingEncoder(config, len(symbols))
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.01)
    schedule = cosine_schedule(optimizer, recipe.steps, warmup=recipe.steps // 20)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(frames).repeat(recipe.batch_size)  # (B * T,) the target of the position head
    model.train()
    progress = tqdm(range(recipe.steps), desc="encoder stand-in (CTC + positions)")
    for step in progress:
        if step % 20 == 0:
            torch.set_num_threads(threads())
        batch = torch.randint(len(targets), (recipe.batch_size,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.use_bfloat16()):
            log_probs, position_logits = model(features[batch].float())
        labels = [targets[i] for i in batch.tolist()]
        ctc = F.ctc_loss(
            log_probs.transpose(0, 1), torch.cat(labels), masks[batch, ::2].sum(1),
            torch.tensor([len(t) for t in labels]), zero_infinity=True,
        )  # fmt: skip
        position = F.cross_entropy(position_logits.flatten(0, 1), positions)
        optimize(ctc + recipe.position_loss_weight * position, parameters, optimizer, schedule)
        progress.set_postfix(ctc=f"{ctc.item():.3f}", position=f"{position.item():.2f}")
    model.eval()
    model.encoder.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)
    save_ctc_head(model.ctc_head, symbols, out_dir)
    return asr_quality(model.encoder, model.ctc_head, symbols, validation, feature_extractor)


__all__ = [
    "EncoderRecipe",
    "asr_quality",
    "character_error_rate",
    "corpus_features",
    "load_ctc_head",
    "train_speech_encoder",
]
