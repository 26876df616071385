"""The Qwen2 stand-in: a causal LM pretrained on the corpus' train-split text with the two in-context abilities a
SpeechLLM relies on, text translation and copying, in the layout of the demo's soft prompt (package docstring)."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from potsa_training.tiny import TINY_TASK_INSTRUCTIONS, train_char_tokenizer

from .optimization import cosine_schedule, optimize

TEXT_FILLER = "_"  # an empty soft-prompt slot in the stand-in LLM's text tasks


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
    """Pretrain the LLM stand-in (`recipe.architecture`) on (transcript, translation) text pairs of the train split;
    save it with its character tokenizer; report its text-translation exact match on validation pairs. Transcripts
    longer than the soft prompt are left out of the prompted tasks."""
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
    schedule = cosine_schedule(optimizer, recipe.steps, warmup=recipe.steps // 20)
    rng = random.Random(seed)
    model.train()
    progress = tqdm(range(recipe.steps), desc="LLM stand-in (text, translate, copy)")
    for _ in progress:
        input_ids, labels, prefix_mask = _language_model_batch(encoded, tokenizer, recipe, rng)
        embeddings = model.get_input_embeddings()(input_ids)  # (B, S, d)
        scale = recipe.embedding_noise * embeddings.detach().pow(2).mean().sqrt()
        embeddings = embeddings + scale * torch.randn_like(embeddings) * prefix_mask.unsqueeze(-1)
        attention_mask = (input_ids != tokenizer.pad_token_id).long()
        loss = model(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels).loss
        optimize(loss, parameters, optimizer, schedule)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"loss": loss.item(), "text_translation_exact": text_translation_accuracy(model, tokenizer, validation_pairs)}


@torch.no_grad()
def text_translation_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]],
    prefix_length: int = LanguageModelRecipe.prefix_length,
) -> float:
    """Exact match of greedy "T=" -> Z on held-out pairs (T spread as in training): the ability the soft prompt
    will have to use."""
    filler = tokenizer.convert_tokens_to_ids(TEXT_FILLER)
    translate = tokenizer.convert_tokens_to_ids(TINY_TASK_INSTRUCTIONS["translate"])
    rng = random.Random(0)
    prompts, references = [], []
    for transcript, translation in pairs:
        ids = tokenizer.encode(transcript, add_special_tokens=False)
        if len(ids) <= prefix_length:
            prompts.append(_spread(ids, prefix_length, filler, rng) + [translate])
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


__all__ = [
    "LanguageModelRecipe",
    "language_model_text",
    "text_translation_accuracy",
    "train_language_model",
]
