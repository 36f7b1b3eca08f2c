"""The weights, preprocessor and generation defaults of an imported Llama 3.2 Vision folder.

A model read from a Hugging Face Mllama folder or from Meta's layout answers at once: its tokenizer,
image settings, multi-image rule and stop tokens come from the files beside the weights, as the
reference implementations read them.

* Hugging Face: ``tokenizer.json`` (or ``tokenizer.model``), ``tokenizer_config.json``
  (``model_max_length``), ``preprocessor_config.json`` (``MllamaImageProcessor``: tile size, tiles,
  mean/std, resampling) and ``generation_config.json`` (stop tokens, sampling).
* Meta: ``tokenizer.model`` and ``params.json`` (``vision_chunk_size``, ``vision_max_num_chunks``);
  Meta's image transform normalises with CLIP's mean and std and resizes bilinearly, and generation
  stops at the tokenizer's ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``.

Both resize and normalise images as Meta's reference transform does (``backend="pil"``), and both
use Meta's multi-image rule (``"most_recent"``: a text token sees the most recent image, a run
of adjacent images counting as one), which the released models were trained with; it is saved with
the model like every other preprocessing setting.

The weights of either layout go into a model built on the meta device through
:func:`assign_imported` (strict, in one dtype), the text backbone recording the folder it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm.datasets.preprocessing import Preprocessor
from mm.model.config import ModelConfig
from mm.model.generation import GenerationDefaults
from mm.text_backbone.checkpoint import CheckpointError, assign_strict, read_json

__all__ = [
    "IMPORTED_IMAGE_BACKEND",
    "IMPORTED_MASK_MODE",
    "assign_imported",
    "backbone_tensors",
    "hf_folder_preprocessing",
    "meta_folder_preprocessing",
]

#: The multi-image rule of Llama 3.2 Vision (Meta's ``create_vision_mask``, Hugging Face's processor).
IMPORTED_MASK_MODE = "most_recent"
#: Images are resized and normalised as Meta's reference transform does (PIL), what the weights saw.
IMPORTED_IMAGE_BACKEND = "pil"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")


def assign_imported(model, tensors, path: Path, layout: str, *, dtype, device) -> None:
    """Assign ``tensors`` (``(mm name, tensor, file)``) into ``model`` (a
    :class:`~mm.MultimodalModel` or its :class:`~mm.text_backbone.TextBackbone`, built on the meta
    device): every weight, nothing else, in one dtype; its backbone's ``source`` names the folder and
    ``layout`` (``"mllama"``, ``"meta_vision"``)."""
    assign_strict(model, tensors, dtype=dtype, device=device, source=path, one_dtype=True)
    backbone = getattr(model, "backbone", model)
    backbone.source = {"path": str(path.resolve()), "format": layout}


def backbone_tensors(tensors):
    """The text backbone's among a multimodal model's ``(name, tensor, file)``, named as the backbone
    names them."""
    for name, t, file in tensors:
        if name.startswith("backbone."):
            yield name[len("backbone.") :], t, file


def _tokenizer(path: Path, config: ModelConfig, names=_TOKENIZER_FILES):
    from mm.text_backbone.tokenizer import load_tokenizer

    found = next((path / n for n in names if (path / n).is_file()), None)
    if found is None:
        return None
    try:
        tokenizer = load_tokenizer(found)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the tokenizer {found}: {e}") from None
    if tokenizer.vocab_size != config.text.vocab_size:
        raise CheckpointError(
            f"the tokenizer {found} has {tokenizer.vocab_size} tokens; the model's vocabulary has "
            f"{config.text.vocab_size}"
        )
    return tokenizer


def _check_tiles(image, config: ModelConfig, where: str) -> None:
    enc = config.image_encoder
    if image.tile_size != enc.image_size:
        raise CheckpointError(
            f"{where}: tiles of {image.tile_size} px, but the image encoder takes {enc.image_size} px tiles"
        )
    if image.max_tiles != enc.max_num_tiles:
        raise CheckpointError(
            f"{where}: up to {image.max_tiles} tiles per image, but the image encoder takes {enc.max_num_tiles}"
        )


def hf_folder_preprocessing(
    path: Path, config: ModelConfig
) -> tuple[Preprocessor | None, GenerationDefaults | None]:
    """Preprocessor and generation defaults of a Hugging Face Mllama folder.

    Returns ``(None, …)`` for the preprocessor when the folder holds no tokenizer (weights only).

    Raises:
        CheckpointError: a file that cannot be read, or settings that disagree with the weights.
    """
    from mm.datasets.image_processing import ImageProcessor

    generation = None
    if (path / "generation_config.json").is_file():
        try:
            generation = GenerationDefaults.from_hf(read_json(path / "generation_config.json"))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/generation_config.json: {e}") from None
    tokenizer = _tokenizer(path, config)
    if tokenizer is None:
        return None, generation
    enc = config.image_encoder
    if (path / "preprocessor_config.json").is_file():
        try:
            hf_image = ImageProcessor.from_hf_config(read_json(path / "preprocessor_config.json"))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/preprocessor_config.json: {e}") from None
        _check_tiles(hf_image, config, f"{path}/preprocessor_config.json")
        image = ImageProcessor.from_dict({**hf_image.to_dict(), "backend": IMPORTED_IMAGE_BACKEND})
    else:
        image = ImageProcessor(
            tile_size=enc.image_size, max_tiles=enc.max_num_tiles, backend=IMPORTED_IMAGE_BACKEND
        )
    max_len = config.text.max_seq_len
    if (path / "tokenizer_config.json").is_file():
        declared = read_json(path / "tokenizer_config.json").get("model_max_length")
        if isinstance(declared, int) and 0 < declared < max_len:
            max_len = declared
    preprocessor = Preprocessor(tokenizer, image, mask_mode=IMPORTED_MASK_MODE, max_seq_len=max_len)
    if generation is None:
        generation = GenerationDefaults(stop_token_ids=config.text.eos_token_ids or tokenizer.stop_ids)
    return preprocessor, generation


def meta_folder_preprocessing(
    path: Path, config: ModelConfig
) -> tuple[Preprocessor | None, GenerationDefaults | None]:
    """Preprocessor and generation defaults of Meta's Llama 3.2 Vision folder (``tokenizer.model``)."""
    from mm.datasets.image_processing import ImageProcessor

    tokenizer = _tokenizer(path, config, names=("tokenizer.model",))
    if tokenizer is None:
        return None, None
    enc = config.image_encoder
    image = ImageProcessor(
        tile_size=enc.image_size, max_tiles=enc.max_num_tiles, backend=IMPORTED_IMAGE_BACKEND
    )
    preprocessor = Preprocessor(
        tokenizer, image, mask_mode=IMPORTED_MASK_MODE, max_seq_len=config.text.max_seq_len
    )
    return preprocessor, GenerationDefaults(stop_token_ids=tokenizer.stop_ids)
