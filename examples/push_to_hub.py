"""Publish a POTSA checkpoint on the Hugging Face Hub: build the exact folder, then `upload_folder` it.

    python -m examples.push_to_hub --checkpoint DIR --repo-id USER/NAME [--results results.json] [--dry-run OUT_DIR]
                                   [--unmerged]

The folder is written by the same `save_pretrained` calls a user's load relies on, never copied by hand:

- config.json with `auto_map` and `custom_pipelines` ("translation", "speech-translation");
- the code files (`modeling_potsa/*.py` that the model and processor import, pipeline_potsa.py included), so that
  `trust_remote_code=True` works without `pip install potsa`;
- model.safetensors with the trained weights only. The frozen encoder and LLM are loaded from `encoder_model_id` /
  `text_model_id` at `from_pretrained`; only a self-contained bundle (ids unset, or saved with
  `include_base_weights=True`, like the tiny demo) carries them;
- LoRA adapters, if the model was trained with them, merged into the LLM weights they adapt (as Ultravox publishes),
  so that users need no peft. An adapter is a delta on a frozen weight that `text_model_id` reloads, so the merged
  weights of exactly those modules go into model.safetensors and config.json says so (`use_lora=False`,
  `merged_lora_modules`); they replace the base LLM's at load. The default q/k/v/o targets are every layer's
  attention projections (`python -m benchmarks.real_widths` counts them at Qwen2.5-7B's size). `--unmerged`
  publishes the adapters as they are instead (small; loading needs peft, and they stay trainable);
- the processor and tokenizer files;
- README.md rendered from model_card.md with the config and the evaluation's results.json (`training/evaluation.py`
  `write_results`): scores are never typed by hand.

Loading the checkpoint loads its frozen base models too (from the local cache), which doubles as the check that it
loads at all. `--dry-run OUT_DIR` writes the folder and lists it without uploading.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from modeling_potsa import PotsaForSpeechTranslation, PotsaProcessor
from modeling_potsa.configuration_potsa import PotsaConfig

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_card.md"


def _eval_results(results: dict[str, Any], config: PotsaConfig, dataset: str, dataset_name: str) -> list[EvalResult]:
    """model-index entries: BLEU per source language (the language code stands in for the dataset config)."""
    target = config.target_language
    return [
        EvalResult(
            task_type="translation",
            task_name=f"Speech translation into {config.language_name(target)}",
            dataset_type=dataset,
            dataset_name=dataset_name,
            dataset_config=code,
            metric_type="bleu",
            metric_value=round(scores["bleu"], 2),
            metric_name=f"BLEU ({code} -> {target})",
        )
        for code, scores in results["per_language"].items()
    ]


def _is_hub_id(model_id: str | None) -> bool:
    """A Hub repo id ("name" or "owner/name"), not a local path such as the demo's stand-ins (runs/standins/llm):
    the card's `base_model` may only name Hub models."""
    if not model_id or Path(model_id).exists():
        return False
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


def render_model_card(
    model: PotsaForSpeechTranslation,
    processor: PotsaProcessor,
    repo_id: str,
    results: dict[str, Any] | None = None,
    dataset: str = "google/fleurs",
    dataset_name: str = "FLEURS",
    license_id: str = "apache-2.0",
) -> ModelCard:
    """README.md of the Hub repo: model_card.md filled from the model's config and `results` (a results.json)."""
    config = model.config
    results = results or {}
    sources = list(config.languages)
    bundled = config.base_weights_in_checkpoint or not (config.encoder_model_id and config.text_model_id)
    base_models = [model_id for model_id in (config.encoder_model_id, config.text_model_id) if _is_hub_id(model_id)]
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        language=sorted({*sources, config.target_language}),
        license=license_id,
        library_name="transformers",
        pipeline_tag="translation",
        tags=["speech-translation", "audio", "potsa", "optimal-transport", "custom_code"],
        base_model=base_models or None,
        datasets=[dataset],
        model_name=model_name,
        eval_results=_eval_results(results, config, dataset, dataset_name) if results.get("per_language") else None,
    )
    qformer = config.qformer_config
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        languages=sources,
        source_language_names=", ".join(config.language_name(code) for code in sources),
        target_language=config.target_language,
        target_language_name=config.language_name(config.target_language),
        example_language=sources[0],
        encoder=config.encoder_model_id or f"{config.encoder_config.model_type} (bundled)",
        language_model=config.text_model_id or f"{config.text_config.model_type} (bundled)",
        qformer_layers=qformer.num_hidden_layers,
        qformer_width=qformer.hidden_size,
        num_query_tokens=config.num_query_tokens,
        stored_parameters=sum(tensor.numel() for tensor in model.state_dict().values()),  # what save_pretrained writes
        total_parameters=model.num_parameters_by_part()["total"],
        weights_bundled=bundled,
        merged_lora_modules=list(config.merged_lora_modules),
        lora_adapters=config.use_lora,
        window_seconds=f"{processor.max_seconds:g}",
        dataset_name=dataset_name,
        bleu_tokenize="zh" if config.target_language == "zh" else "13a",
        per_language=results.get("per_language", {}),
        groups=results.get("groups", {}),
        alignment=results.get("alignment", {}),
        training_settings=results.get("settings", {}).get("alignment", {}),
        evaluation_split=results.get("settings", {}).get("split"),
    )


def merge_lora_adapters(model: PotsaForSpeechTranslation) -> None:
    """Fold the LLM's LoRA adapters into the weights they adapt and drop peft from the model, in place; the config
    then says that the checkpoint stores those merged weights (`merged_lora_modules`) and needs no peft."""
    if not model.config.use_lora:
        raise ValueError("This model has no LoRA adapters to merge (`config.use_lora` is False).")
    model.language_model = model.language_model.merge_and_unload()
    config = model.config
    config.merged_lora_modules = sorted({*config.merged_lora_modules, *config.lora_target_modules})
    config.use_lora = False
    model.freeze_base_models()


def build_release_folder(
    checkpoint: str | Path,
    out_dir: str | Path,
    repo_id: str,
    results: dict[str, Any] | None = None,
    merge_lora: bool = True,
    **card_kwargs: Any,
) -> list[tuple[str, int]]:
    """Write everything the Hub repo will hold into an empty `out_dir`; returns (file name, bytes) sorted by name.
    LoRA adapters are merged unless `merge_lora=False` (see the module docstring)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty: every file in it would be uploaded. Use a new directory.")
    model = PotsaForSpeechTranslation.from_pretrained(checkpoint)
    if merge_lora and model.config.use_lora:
        merge_lora_adapters(model)
    processor = PotsaProcessor.from_pretrained(checkpoint)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    render_model_card(model, processor, repo_id, results, **card_kwargs).save(out_dir / "README.md")
    return sorted((path.name, path.stat().st_size) for path in out_dir.iterdir())


def main(argv: list[str] | None = None) -> list[tuple[str, int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a directory written by save_pretrained")
    parser.add_argument("--repo-id", required=True, help="USER/NAME of the Hub model repo")
    parser.add_argument("--results", type=Path, help="results.json of training/evaluation.py for the model card")
    parser.add_argument("--dataset", default="google/fleurs", help="Hub id of the evaluation dataset")
    parser.add_argument("--dataset-name", default="FLEURS", help="its display name in the model card")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--dry-run", type=Path, metavar="OUT_DIR", help="write the folder here and do not upload")
    parser.add_argument(
        "--unmerged", action="store_true", help="publish LoRA adapters as they are (loading needs peft)"
    )
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results else None
    card_kwargs = {"dataset": args.dataset, "dataset_name": args.dataset_name}
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.dry_run or Path(scratch)
        files = build_release_folder(
            args.checkpoint, folder, args.repo_id, results, merge_lora=not args.unmerged, **card_kwargs
        )
        for name, size in files:
            print(f"{size:>14,}  {name}")
        print(f"{sum(size for _, size in files):>14,}  total ({len(files)} files in {folder})")
        if args.dry_run is None:
            api = HfApi()
            api.create_repo(args.repo_id, private=args.private, exist_ok=True)
            commit = api.upload_folder(repo_id=args.repo_id, folder_path=folder, commit_message="Upload POTSA model")
            print(f"uploaded: {commit}")
    return files


if __name__ == "__main__":
    main()
