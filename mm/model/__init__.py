"""The composition: a frozen text backbone with encoders and adapters around it (Llama 3 paper,
sections 7-8) — its configuration and presets, its components, the image, video and speech paths,
generation and chat."""

from mm.datasets.inputs import AudioInputs, VideoInputs
from mm.model.config import ModelConfig, SpeechConfig, VideoAdapterConfig
from mm.model.generation import GenerationDefaults
from mm.model.multimodal import MultimodalModel, MultimodalOutput, VisionState

__all__ = [
    "AudioInputs",
    "GenerationDefaults",
    "ModelConfig",
    "MultimodalModel",
    "MultimodalOutput",
    "SpeechConfig",
    "VideoAdapterConfig",
    "VideoInputs",
    "VisionState",
]
