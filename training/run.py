"""Train one POTSA stage.

    accelerate launch training/run.py --config training/configs/stage3_potsa.yaml [key=value ...]
    python training/run.py --config training/configs/tiny_stage3_potsa.yaml output_dir=runs/x max_steps=20

Stages (the paper's recipe; each starts from the previous stage's checkpoint through `init_from`):
1. ASR pretraining (`task: transcribe`), 2. S2TT training (`task: translate`), 3. multilingual POTSA fine-tuning
(`task: translate`, bias compensation estimated first, OT loss with the UCB layer scheduler).
Resume an interrupted run with `resume_from_checkpoint=<output_dir>/checkpoint-N` (or `true` for the latest):
optimizer, scheduler, RNG and the UCB state come back. Needs the training library installed (`pip install -e .`
in a clone installs it as `potsa_training`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from pathlib import Path
from typing import Any

import transformers
import yaml
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from modeling_potsa import PotsaConfig, PotsaForSpeechTranslation, PotsaProcessor
from potsa_training.arguments import DataArguments, ModelArguments, Settings, load_settings, parse_settings
from potsa_training.bias_estimation import apply_language_bias, estimate_language_bias
from potsa_training.collator import PotsaCollator
from potsa_training.encoder_cache import cache_encoder_outputs
from potsa_training.evaluation import eval_batches, evaluate_model, write_results
from potsa_training.sources import first_per_language, load_source, select_languages, spread_sentences
from potsa_training.tiny import build_tiny_potsa
from potsa_training.trainer import PotsaTrainer
from potsa_training.validation import validate_examples

logger = logging.getLogger("potsa.run")
CONFIGS = Path(__file__).resolve().parent / "configs"


def stage_that_writes(checkpoint: str) -> str | None:
    """The stage config under training/configs whose `output_dir` is `checkpoint`, if one is."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        settings = yaml.safe_load(path.read_text()) or {}
        if isinstance(settings, dict) and str(settings.get("output_dir", "")).rstrip("/") == checkpoint.rstrip("/"):
            return str(path.relative_to(CONFIGS.parents[1]))
    return None


def load_checkpoint(checkpoint: str, dtype: str | None) -> tuple[PotsaForSpeechTranslation, PotsaProcessor]:
    """A previous stage's checkpoint; a folder that does not exist (yet) is named as such, with the stage that
    makes it, instead of surfacing as a failed Hub download."""
    try:
        return PotsaForSpeechTranslation.from_pretrained(checkpoint, dtype=dtype), PotsaProcessor.from_pretrained(checkpoint)
    except OSError as error:
        if os.path.isdir(checkpoint):
            raise
        stage = stage_that_writes(checkpoint)
        made_by = f" It is made by `python training/run.py --config {stage}`: run that stage first." if stage else ""
        raise ValueError(
            f"`init_from` {checkpoint!r}: no such local checkpoint folder, and no Hub repo could be loaded under that "
            f"name ({type(error).__name__}).{made_by}"
        ) from error


def load_model(model_args: ModelArguments, overrides: dict[str, Any], languages: list[str] | None):
    """1. The model and processor: a previous stage's checkpoint, base models from a config file, or tiny."""
    if model_args.init_from:
        model, processor = load_checkpoint(model_args.init_from, model_args.model_dtype)
    elif not model_args.model_config:
        raise ValueError("Set `model_config` (a PotsaConfig YAML, or 'tiny') or `init_from` (a checkpoint).")
    elif model_args.model_config == "tiny":
        model, processor = build_tiny_potsa(languages=languages or ("en", "es", "ja", "ko", "ru", "zh"))
    else:
        settings = {**yaml.safe_load(Path(model_args.model_config).read_text()), **overrides}
        # Sub-configs come from the base checkpoints themselves (their config.json only), so they always match.
        config = PotsaConfig.from_base_models(settings.pop("encoder_model_id"), settings.pop("text_model_id"), **settings)
        processor = PotsaProcessor.from_base_models(config)
        model = PotsaForSpeechTranslation.from_base_models(config, dtype=model_args.model_dtype)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    model.config._validate()
    model.freeze_base_models()
    model.bias_compensation.requires_grad_(model.config.use_bias_compensation and model_args.train_bias)
    return model, processor


def prepare_data(
    data_args: DataArguments, model: Any, processor: Any, evaluates_during_training: bool = True
) -> tuple[Any, dict[str, Any], dict]:
    """2. The train set with the zero-shot protocol applied, the evaluation sets (`eval_split` when training
    evaluates or no `test_split` takes the final report; `test_split`), all validated, and the language groups to
    report."""
    zero_shot = list(data_args.zero_shot_languages)
    seen = data_args.train_languages or [code for code in model.config.languages if code not in zero_shot]
    load = functools.partial(load_source, data_args.data_source, data_args.data_path)
    if data_args.zero_shot_protocol == "strict":
        train = select_languages(load(split=data_args.train_split), seen)
    else:  # zero-shot audio joins the OT pairs, without its translations
        train = select_languages(load(split=data_args.train_split), seen + zero_shot)
        labels = [text if code in seen else None for text, code in zip(train["translation"], train["language"])]
        train = train.remove_columns("translation").add_column("translation", labels)
    if data_args.max_train_samples:
        train = spread_sentences(train, data_args.max_train_samples)
    train, report = validate_examples(train, model.config.languages, processor, on_bad_data=data_args.on_bad_data)
    logger.info("training data: %d utterances; %s", len(train), report)
    evaluation = {}
    needs_eval_split = evaluates_during_training or not data_args.test_split
    for role, split in (("eval", data_args.eval_split if needs_eval_split else None), ("test", data_args.test_split)):
        if split:
            dataset = select_languages(load(split=split), seen + zero_shot)
            if data_args.max_eval_samples:
                dataset = spread_sentences(dataset, data_args.max_eval_samples)
            evaluation[role] = validate_examples(dataset, model.config.languages, processor, data_args.on_bad_data)[0]
    groups = {"seen": seen, "zero_shot": zero_shot, **data_args.report_groups}
    return train, evaluation, groups


def bias_audio(data_args: DataArguments, model: Any, processor: Any) -> Any:
    """Unlabeled audio of every language the model knows, zero-shot ones included (their audio, never labels):
    the first `bias_max_per_language` utterances of each (all without a cap), checked before use."""
    audio = load_source(data_args.data_source, data_args.data_path, split=data_args.train_split)
    audio = select_languages(audio, model.config.languages)
    if data_args.bias_max_per_language is not None:
        audio = first_per_language(audio, data_args.bias_max_per_language)
    return validate_examples(audio, model.config.languages, processor, on_bad_data="skip")[0]


def run(argv: list[str] | None = None) -> PotsaTrainer:
    """Parse the settings, prepare model and data, train, save and evaluate; returns the trainer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="stage YAML (see training/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that replace the YAML's")
    cli = parser.parse_args(argv)
    settings: Settings = parse_settings(load_settings(cli.config, cli.overrides))
    model_args, data_args, training_args = settings.model, settings.data, settings.training
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    model, processor = load_model(model_args, settings.config_overrides, data_args.train_languages)
    settings.alignment.check_model(model.config)
    with training_args.main_process_first(desc="data preparation and encoder cache"):
        evaluates = training_args.eval_strategy != "no"
        train, evaluation, groups = prepare_data(data_args, model, processor, evaluates)
        audio_for_bias = bias_audio(data_args, model, processor) if data_args.estimate_bias else None
        # 3. Optional encoder-output cache: the encoder is frozen, so its outputs are computed once (one directory
        # serves every split and later runs; only missing utterances are encoded).
        cache = None
        for dataset in (train, *evaluation.values(), audio_for_bias) if data_args.encoder_cache_dir else ():
            if dataset is not None:
                cache = cache_encoder_outputs(model, dataset, processor, data_args.encoder_cache_dir)

    # 4. Bias compensation (before stage 3, or to add a language), on every process together (it is sharded).
    if audio_for_bias is not None:
        biases = estimate_language_bias(
            model, audio_for_bias, processor, max_per_language=data_args.bias_max_per_language, encoder_cache=cache
        )
        apply_language_bias(model, biases, processor)
    if cache is not None:  # rows then carry a cache key instead of audio
        train = cache.keyed_dataset(train)
        evaluation = {role: cache.keyed_dataset(dataset) for role, dataset in evaluation.items()}
    collator = PotsaCollator(processor, task=data_args.task, encoder_cache=cache)

    trainer = PotsaTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation.get("eval"),
        data_collator=collator,
        processing_class=processor,
        alignment_args=settings.alignment,
        pair_ratio=data_args.pair_ratio,
        eval_groups=groups,
        eval_category_sets=data_args.report_category_sets,
        eval_task=data_args.task,
        generation_kwargs=training_args.generation_kwargs(),
    )
    # 5. Train (resumable), save the trainable parts + processor + code, and report on the final split.
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", True):
        resume = get_last_checkpoint(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    final = evaluation.get("test", evaluation.get("eval"))
    if final is not None and trainer.is_world_process_zero():
        batches = eval_batches(final, collator, training_args.per_device_eval_batch_size, data_args.task)
        evaluated = evaluate_model(
            model, processor, batches, groups, data_args.task, category_sets=data_args.report_category_sets,
            **training_args.generation_kwargs(),
        )  # fmt: skip
        split = data_args.report_split
        recorded = {"split": split, "alignment": settings.alignment.to_dict()}
        table = write_results(evaluated, training_args.output_dir, f"{Path(cli.config).stem} on {split}", recorded)
        trainer.save_metrics("eval", evaluated.flat_metrics("eval_"))
        logger.info("results: %s\n%s", table, table.read_text())
    return trainer


if __name__ == "__main__":
    run()
