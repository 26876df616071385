"""potsa: POTSA cross-lingual speech alignment for speech-to-text translation, Hugging Face Hub-native.

Importing the package registers the classes with transformers' Auto classes, so that `AutoConfig`, `AutoModel` and
`AutoProcessor` resolve "potsa" in this process; checkpoints also carry the code (`auto_map`) for
`trust_remote_code=True` loading without the package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq, AutoProcessor

from .configuration_potsa import PotsaConfig
from .modeling_potsa import PotsaForSpeechTranslation, PotsaOutput, PotsaPreTrainedModel
from .processing_potsa import PotsaProcessor

AutoConfig.register(PotsaConfig.model_type, PotsaConfig, exist_ok=True)
AutoModel.register(PotsaConfig, PotsaForSpeechTranslation, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(PotsaConfig, PotsaForSpeechTranslation, exist_ok=True)
AutoProcessor.register(PotsaConfig, PotsaProcessor, exist_ok=True)
PotsaConfig.register_for_auto_class()
PotsaForSpeechTranslation.register_for_auto_class("AutoModel")
PotsaProcessor.register_for_auto_class()

__version__ = "0.1.0"
__all__ = ["PotsaConfig", "PotsaForSpeechTranslation", "PotsaOutput", "PotsaPreTrainedModel", "PotsaProcessor"]
