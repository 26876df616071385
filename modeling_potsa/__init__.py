"""potsa: POTSA cross-lingual speech alignment for speech-to-text translation, Hugging Face Hub-native.

Importing the package registers the classes with transformers' Auto classes, so that `AutoConfig`, `AutoModel` and
`AutoProcessor` resolve "potsa" in this process, and `pipeline("speech-translation", model=..., processor=...)` builds
the speech-translation pipeline; checkpoints also carry the code (`auto_map`, `custom_pipelines`) for
`trust_remote_code=True` loading without the package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_potsa import PotsaConfig
from .modeling_potsa import PotsaForSpeechTranslation, PotsaOutput, PotsaPreTrainedModel
from .pipeline_potsa import PotsaSpeechTranslationPipeline
from .processing_potsa import PotsaProcessor

AutoConfig.register(PotsaConfig.model_type, PotsaConfig, exist_ok=True)
AutoModel.register(PotsaConfig, PotsaForSpeechTranslation, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(PotsaConfig, PotsaForSpeechTranslation, exist_ok=True)
AutoProcessor.register(PotsaConfig, PotsaProcessor, exist_ok=True)
PotsaConfig.register_for_auto_class()
PotsaForSpeechTranslation.register_for_auto_class("AutoModel")
PotsaProcessor.register_for_auto_class()
# Only the descriptive name in-process: "translation" stays free for other models here; checkpoints get both names.
PIPELINE_REGISTRY.register_pipeline(
    "speech-translation", pipeline_class=PotsaSpeechTranslationPipeline, pt_model=AutoModel
)

__version__ = "0.1.0"
__all__ = [
    "PotsaConfig",
    "PotsaForSpeechTranslation",
    "PotsaOutput",
    "PotsaPreTrainedModel",
    "PotsaProcessor",
    "PotsaSpeechTranslationPipeline",
]
