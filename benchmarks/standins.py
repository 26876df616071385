"""Pretrained stand-ins for Whisper and Qwen2, made offline on the parallel-speech corpus.

POTSA freezes a pretrained speech encoder and a pretrained LLM. Random weights make freezing meaningless, so the
tiny recipe first pretrains small models of the same classes, then the POTSA stages freeze them exactly as the real
recipe freezes Whisper-large-v3 and Qwen2.5-7B:

- the encoder stand-in: a `WhisperEncoder` trained on multilingual ASR of the corpus (every language, as Whisper
  is multilingual) with a CTC head over transcript characters, plus a small auxiliary head that predicts each
  frame's position in the window. Whisper's encoder feeds a cross-attending decoder, so its outputs say where in
  the window each frame is; a CTC-only encoder has no use for that and washes it out, and a Q-Former reading such
  frames cannot tell "3 1 4" from "4 1 3" (measured: exact match on digit strings and dates fell by a third).
  Both heads are dropped afterwards, as Whisper's decoder is by POTSA.
- the LLM stand-in: a `Qwen2ForCausalLM` trained on the *train-split* text of the corpus only (never a test
  target: that would leak): plain sentences, and the two in-context abilities a real LLM brings to a SpeechLLM,
  in the format of the demo's prompt ([24 soft tokens][instruction][answer]): text translation "T=Z" and copying
  "T:T", where the transcript T is spread over the 24 slots in order with fillers between (as a soft prompt lays
  speech out over its queries) and its embeddings carry noise (as a soft prompt only approximates token
  embeddings). It knows every corpus language's text, as Qwen knows German and Korean, so zero-shot languages are
  unseen only as *speech*. A model trained on plain text alone cannot be steered by a soft prompt (a prototype's
  Q-Former never left the LM's unconditional loss); with these abilities the POTSA stages mean what they mean at
  real size: ASR pretraining teaches the Q-Former to write transcript-like soft prompts (":"), S2TT then asks for
  translations ("=").

Both are saved with `save_pretrained` next to their feature extractor / tokenizer, so `PotsaConfig.from_base_models`
and `PotsaForSpeechTranslation.from_base_models` load them by path exactly as they load hub ids.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modeling_potsa.processing_potsa import PotsaProcessor
from potsa_training.rows import audio_features
from potsa_training.tiny import TINY_TASK_INSTRUCTIONS, tiny_feature_extractor, train_char_tokenizer

TEXT_FILLER = "_"  # an empty soft-prompt slot in the stand-in LLM's text tasks


@dataclass
class EncoderRecipe:
    """Size and schedule of the Whisper stand-in."""

    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 2e-3
    window_seconds: int = 3  # the corpus' clips are at most 3 s (`generate_corpus(max_seconds=3.0)`)
    num_mel_bins: int = 40
    position_loss_weight: float = 0.3  # the auxiliary "where am I in the window" loss (module docstring)
    # CPU bfloat16 autocast (losses in float32): ~25% faster steps on a CPU with native bf16 (AVX512-BF16 / AMX),
    # ~20x slower on one without (emulated). None: use it where the CPU has it.
    bfloat16: bool | None = None

    def use_bfloat16(self) -> bool:
        return cpu_has_native_bfloat16() if self.bfloat16 is None else self.bfloat16


@dataclass
class LanguageModelRecipe:
    """Architecture, size, schedule and data mix of the LLM stand-in."""

    architecture: str = "qwen2"  # any causal-LM model_type with Llama-style config fields ("llama", "mistral", ...)
    hidden_size: int = 128
    layers: int = 2
    heads: int = 2  # 64-wide heads learn copying in 600 steps; 32-wide ones had not after 800 (0% vs 100% exact)
    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 3e-3
    prefix_length: int = 24  # = num_query_tokens of the POTSA model that will prompt it
    task_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # translate, copy, plain text
    embedding_noise: float = 0.5  # std of the noise on prefix embeddings, relative to their RMS


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (Linux /proc/cpuinfo flags; False where they cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimize(loss: torch.Tensor, parameters: list[torch.nn.Parameter], optimizer, schedule) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


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


class _PretrainingEncoder(torch.nn.Module):
    """WhisperEncoder + a linear CTC head over characters + a linear head over frame positions (both heads exist
    only during pretraining)."""

    def __init__(self, config: WhisperConfig, num_symbols: int) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.ctc_head = torch.nn.Linear(config.d_model, num_symbols)
        self.position_head = torch.nn.Linear(config.d_model, config.max_source_positions)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, symbols) CTC log-probabilities and (B, T, T) position logits."""
        frames = self.encoder(features).last_hidden_state
        return self.ctc_head(frames).float().log_softmax(-1), self.position_head(frames).float()


def _greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor, symbols: Sequence[str]) -> list[str]:
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


def train_speech_encoder(
    train: datasets.Dataset,
    validation: datasets.Dataset,
    out_dir: str | Path,
    recipe: EncoderRecipe = EncoderRecipe(),
    seed: int = 0,
    threads: Callable[[], int] = torch.get_num_threads,
) -> dict[str, float]:
    """Pretrain the Whisper stand-in (CTC on multilingual transcripts + frame positions); save encoder + feature
    extractor; report the greedy-CTC character error rate and exact transcripts on `validation`. `threads()` is
    asked every few steps how many CPU threads to use (the LM stand-in may be training beside it)."""
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
    model = _PretrainingEncoder(config, len(symbols))
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.01)
    schedule = _cosine_schedule(optimizer, recipe.steps, warmup=recipe.steps // 20)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(frames).repeat(recipe.batch_size)  # (B * T,) the target of the position head
    model.train()
    progress = tqdm(range(recipe.steps), desc="encoder stand-in (CTC + positions)", leave=False)
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
        _optimize(ctc + recipe.position_loss_weight * position, parameters, optimizer, schedule)
        progress.set_postfix(ctc=f"{ctc.item():.3f}", position=f"{position.item():.2f}")
    model.eval()
    report = {"encoder_ctc_loss": ctc.item(), **_validation_asr(model, validation, feature_extractor, symbols)}
    model.encoder.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)
    return report


@torch.no_grad()
def _validation_asr(
    model: _PretrainingEncoder, validation: datasets.Dataset, feature_extractor: WhisperFeatureExtractor,
    symbols: list[str],
) -> dict[str, float]:
    features, masks = corpus_features(validation, feature_extractor)
    hypotheses = []
    for start in range(0, len(features), 256):
        log_probs, _ = model(features[start : start + 256].float())
        hypotheses += _greedy_ctc(log_probs, masks[start : start + 256, ::2].sum(1), symbols)
    references = [text.lower() for text in validation["transcript"]]
    exact = sum(h == r for h, r in zip(hypotheses, references)) / max(len(references), 1)
    return {"encoder_validation_cer": character_error_rate(hypotheses, references), "encoder_validation_exact": exact}


def _spread(tokens: list[int], slots: int, filler: int, rng: random.Random) -> list[int]:
    """`tokens` in order over `slots` positions, fillers between them at random places."""
    row = [filler] * slots
    for position, token in zip(sorted(rng.sample(range(slots), len(tokens))), tokens):
        row[position] = token
    return row


def _language_model_batch(
    pairs: Sequence[tuple[list[int], list[int]]], tokenizer: PreTrainedTokenizerFast, recipe: LanguageModelRecipe,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of the stand-in's three tasks, right-padded: translate "T=Z", copy "T:T" (T spread over the
    `prefix_length` slots where the soft prompt will sit) and plain text "Z" or "T". Returns input ids, labels
    (the prefix is not predicted: at POTSA time it is the soft prompt) and the (B, S) mask of prefix positions."""
    filler = tokenizer.convert_tokens_to_ids(TEXT_FILLER)
    translate, copy = (tokenizer.convert_tokens_to_ids(TINY_TASK_INSTRUCTIONS[t]) for t in ("translate", "transcribe"))
    rows, prefixes = [], []
    for transcript, translation in rng.sample(pairs, recipe.batch_size):
        task = rng.choices(range(3), weights=recipe.task_weights)[0]
        if task < 2:
            prefix = _spread(transcript, recipe.prefix_length, filler, rng)
            rows.append(prefix + [translate] + translation if task == 0 else prefix + [copy] + transcript)
            prefixes.append(recipe.prefix_length)
        else:
            rows.append(rng.choice([transcript, translation]))
            prefixes.append(0)
        rows[-1] = rows[-1] + [tokenizer.eos_token_id]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    prefix_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, prefix) in enumerate(zip(rows, prefixes)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, prefix : len(row)] = torch.tensor(row[prefix:])
        prefix_mask[i, :prefix] = True
    return input_ids, labels, prefix_mask


def train_language_model(
    pairs: Sequence[tuple[str, str]],
    validation_pairs: Sequence[tuple[str, str]],
    out_dir: str | Path,
    recipe: LanguageModelRecipe = LanguageModelRecipe(),
    seed: int = 0,
) -> dict[str, float]:
    """Pretrain the LLM stand-in (`recipe.architecture`) on (transcript, translation) text pairs of the train split; save it with its
    character tokenizer; report its text-translation exact match on validation pairs. Transcripts longer than the
    soft prompt are left out of the prompted tasks."""
    torch.manual_seed(seed)
    texts = [text for pair in pairs for text in pair] + [TEXT_FILLER, *TINY_TASK_INSTRUCTIONS.values()]
    tokenizer = train_char_tokenizer(texts)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    encoded = [(encode(t), encode(z)) for t, z in pairs]
    encoded = [(t, z) for t, z in encoded if len(t) <= recipe.prefix_length]
    config = AutoConfig.for_model(
        recipe.architecture, vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=2 * recipe.hidden_size, num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads // 2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.01)
    schedule = _cosine_schedule(optimizer, recipe.steps, warmup=recipe.steps // 20)
    rng = random.Random(seed)
    model.train()
    progress = tqdm(range(recipe.steps), desc="LLM stand-in (text, translate, copy)", leave=False)
    for _ in progress:
        input_ids, labels, prefix_mask = _language_model_batch(encoded, tokenizer, recipe, rng)
        embeddings = model.get_input_embeddings()(input_ids)  # (B, S, d)
        scale = recipe.embedding_noise * embeddings.detach().pow(2).mean().sqrt()
        embeddings = embeddings + scale * torch.randn_like(embeddings) * prefix_mask.unsqueeze(-1)
        attention_mask = (input_ids != tokenizer.pad_token_id).long()
        loss = model(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels).loss
        _optimize(loss, parameters, optimizer, schedule)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    accuracy = _text_translation_accuracy(model, tokenizer, validation_pairs, recipe)
    return {"lm_loss": loss.item(), "lm_text_translation_exact": accuracy}


@torch.no_grad()
def _text_translation_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]],
    recipe: LanguageModelRecipe,
) -> float:
    """Exact match of greedy "T=" -> Z on held-out pairs (T spread as in training): the ability the soft prompt
    will have to use."""
    filler = tokenizer.convert_tokens_to_ids(TEXT_FILLER)
    translate = tokenizer.convert_tokens_to_ids(TINY_TASK_INSTRUCTIONS["translate"])
    rng = random.Random(0)
    prompts, references = [], []
    for transcript, translation in pairs:
        ids = tokenizer.encode(transcript, add_special_tokens=False)
        if len(ids) <= recipe.prefix_length:
            prompts.append(_spread(ids, recipe.prefix_length, filler, rng) + [translate])
            references.append(translation)
    model.eval()
    output = model.generate(torch.tensor(prompts), max_new_tokens=16, do_sample=False)  # same length: no padding
    hypotheses = tokenizer.batch_decode(output[:, len(prompts[0]) :], skip_special_tokens=True)
    return sum(h == r for h, r in zip(hypotheses, references)) / max(len(references), 1)


def language_model_text(
    corpus: datasets.DatasetDict,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The LLM stand-in's text: the distinct (transcript, translation) pairs of the train split (never a test
    target), and the validation split's pairs for its check."""
    pairs = sorted(set(zip(corpus["train"]["transcript"], corpus["train"]["translation"])))
    return pairs, list(zip(corpus["validation"]["transcript"], corpus["validation"]["translation"]))


def _train_language_model_single_threaded(*args) -> dict[str, float]:
    """`train_language_model` on one CPU thread, timed (run in a child process)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = train_language_model(*args)
    return {**report, "llm_seconds": time.perf_counter() - start}


def build_standins(
    corpus: datasets.DatasetDict,
    out_dir: str | Path,
    encoder_recipe: EncoderRecipe = EncoderRecipe(),
    language_model_recipe: LanguageModelRecipe = LanguageModelRecipe(),
    seed: int = 0,
) -> dict[str, float]:
    """Both stand-ins under `out_dir/encoder` and `out_dir/llm`; returns their quality and wall times.

    They are independent, so they train at the same time: the LM in a child process on one core, the encoder here
    on the other core until the LM is done, then on all of them. Small models use a second thread poorly (measured
    on 2 cores: 1.3x for the encoder's step), so two single-threaded jobs get more done than one after the other."""
    out_dir = Path(out_dir)
    pairs, validation = language_model_text(corpus)
    all_threads = torch.get_num_threads()
    start = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        language_model = pool.submit(
            _train_language_model_single_threaded, pairs, validation, out_dir / "llm", language_model_recipe, seed
        )

        def threads() -> int:
            return all_threads if language_model.done() else max(all_threads - 1, 1)

        report = train_speech_encoder(
            corpus["train"], corpus["validation"], out_dir / "encoder", encoder_recipe, seed, threads
        )
        report["encoder_seconds"] = time.perf_counter() - start
        report.update(language_model.result())
    torch.set_num_threads(all_threads)
    return report


__all__ = [
    "EncoderRecipe",
    "LanguageModelRecipe",
    "build_standins",
    "character_error_rate",
    "corpus_features",
    "language_model_text",
]
