"""A saved folder loads only when its config.json, its weights and the backbone it refers to agree.

Each test tampers with a freshly saved tiny model in one way and expects one `CheckpointError` of one
line naming the value that disagrees and what it disagrees with; or, where the rule is to cast (an
explicit ``dtype=``), a model that answers with an image. The classes:

* config and weights: ``adapters.safetensors`` records the config it was written with; a
  shape-preserving change in ``config.json`` (placement of blocks, eps, feature layers) is refused;
* config and backbone: ``config.text`` must equal the referenced backbone's own config;
* dtypes: without ``dtype=``, every weight must already have the backbone's dtype;
* values: every config number, bool and list is checked at construction, naming the key;
* tokenizer files: unreadable or invalid ones are named;
* preprocessing and generation settings: malformed or disagreeing ones are named by key.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from mm_testing import tiny_av_preprocessor
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor
from mm.datasets.preprocessing import Preprocessor
from mm.text_backbone import ByteTokenizer, TextConfig
from mm.text_backbone.checkpoint import CheckpointError
from mm.text_backbone.tokenizer import load_tokenizer

STOPS = (257, 264, 265)  # the tiny preset's stop ids


def _open_gates(model: MultimodalModel) -> MultimodalModel:
    with torch.no_grad():
        model.backbone.lm_head.weight[list(STOPS)] = 0.0  # answers run to the token limit
        for block in [*model.image_blocks, *model.video_blocks]:
            block.attn_gate.fill_(1.0)
            block.mlp_gate.fill_(1.0)
    return model


def tiny_model(layers=(1, 3)) -> MultimodalModel:
    """The tiny preset with image blocks before layers 1 and 3, gates open, a byte tokenizer."""
    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny").replace(cross_attention_layers=layers)).eval()
    model.preprocessor = Preprocessor(
        ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4), max_images=3
    )
    return _open_gates(model)


def tiny_av_model() -> MultimodalModel:
    """The tiny-av preset (video blocks before layers 1 and 3, speech), with audio settings saved."""

    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    model.preprocessor = tiny_av_preprocessor()
    return _open_gates(model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    tiny_model().save_pretrained(folder, copy_backbone=True)
    return folder


@pytest.fixture(scope="module")
def saved_av(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved_av") / "model"
    tiny_av_model().save_pretrained(folder, copy_backbone=True)
    return folder


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    """A fresh copy of the saved tiny model, to tamper with."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


@pytest.fixture
def av_folder(saved_av, tmp_path) -> Path:
    return Path(shutil.copytree(saved_av, tmp_path / "av"))


# ---------------------------------------------------------------------------------------- helpers
def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def set_key(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


def set_config(folder: Path, dotted: str, value) -> None:
    """Change one value of the model config in ``config.json`` (``"text.num_layers"``)."""
    edit_json(folder / "config.json", lambda meta: set_key(meta["config"], dotted, value))


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(file, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def rewrite_tensors(file: Path, change=lambda tensors: None, metadata=None) -> None:
    """Rewrite a safetensors file after ``change(tensors)``, keeping its metadata unless given."""
    tensors, meta = read_tensors(file)
    change(tensors)
    save_file(tensors, file, metadata=meta if metadata is None else metadata)


def refused(folder: Path, *fragments: str, **kwargs) -> str:
    """Loading fails with one CheckpointError of one line that holds every fragment."""
    with pytest.raises(CheckpointError) as caught:
        MultimodalModel.from_pretrained(folder, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def image_question(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8)
    picture = Image.fromarray(pixels.numpy())
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What is it?"}],
        }
    ]


def answers_with_an_image(model: MultimodalModel) -> str:
    """`model.chat` about an image runs through the image blocks without error."""
    answer = model.chat(image_question(), max_new_tokens=4)
    assert isinstance(answer, str) and answer
    return answer


def image_logits(model: MultimodalModel) -> torch.Tensor:
    batch = model.preprocessor.prompts([image_question()])
    batch.pop("attention_mask", None)
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------------------- round trip
def test_an_untouched_folder_loads_with_the_same_logits(saved):
    original = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder this version wrote loads without any warning
        loaded = MultimodalModel.from_pretrained(saved)
    assert loaded.config == original.config
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(image_logits(loaded), image_logits(original))
    assert loaded.chat(image_question(), max_new_tokens=4) == original.chat(
        image_question(), max_new_tokens=4
    )


def test_an_untouched_av_folder_loads_with_the_same_weights(saved_av):
    original = tiny_av_model()
    loaded = MultimodalModel.from_pretrained(saved_av)
    assert loaded.config == original.config
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.preprocessor.settings() == original.preprocessor.settings()


def test_the_weights_record_the_config_they_were_written_with(saved):
    _, metadata = read_tensors(saved / "adapters.safetensors")
    assert metadata["format"] == "pt"
    recorded = json.loads(metadata["mm_config"])
    assert ModelConfig.from_dict(recorded) == tiny_model().config


# ---------------------------------------------------------------------------------------- config vs weights
def test_moved_cross_attention_blocks_are_refused(folder):
    # The case: [1, 3] -> [1, 2] keeps every shape and used to answer differently.
    set_config(folder, "cross_attention_layers", [1, 2])
    refused(
        folder,
        "config.json says cross_attention_layers [1, 2], but adapters.safetensors was written for [1, 3]",
    )


@pytest.mark.parametrize(
    ("key", "value", "written"),
    [
        ("image_encoder.norm_eps", 1e-6, "1e-05"),
        ("image_encoder.intermediate_layers", [2, 1], "[1, 2]"),
        ("cross_attention_layers", [0, 3], "[1, 3]"),
    ],
)
def test_shape_preserving_changes_of_the_config_are_refused(folder, key, value, written):
    set_config(folder, key, value)
    refused(folder, f"config.json says {key} {json.dumps(value)}", f"was written for {written}")


def test_moved_video_blocks_are_refused(av_folder):
    set_config(av_folder, "video.cross_attention_layers", [0, 2])
    refused(av_folder, "video.cross_attention_layers [0, 2]", "adapters.safetensors was written for [1, 3]")


def test_another_video_group_size_is_named_before_any_shape(av_folder):
    set_config(av_folder, "video.group_size", 8)
    refused(av_folder, "config.json says video.group_size 8, but adapters.safetensors was written for 4")


def test_weights_of_another_placement_are_refused(folder, tmp_path):
    # Same shapes, other placement: the weights file of a model with blocks before layers 0 and 2.
    tiny_model(layers=(0, 2)).save_pretrained(tmp_path / "other", copy_backbone=True)
    shutil.copy(tmp_path / "other" / "adapters.safetensors", folder / "adapters.safetensors")
    refused(folder, "cross_attention_layers [1, 3]", "written for [0, 2]")


def test_an_unreadable_recorded_config_is_refused(folder):
    rewrite_tensors(folder / "adapters.safetensors", metadata={"format": "pt", "mm_config": "{not json"})
    refused(folder, "adapters.safetensors", "mm_config")


def test_a_folder_without_a_recorded_config_loads_with_a_warning(folder):
    # Folders written before the weights recorded their config: loaded as before, with a warning
    # that config.json's shape-preserving settings cannot be checked against the weights.
    rewrite_tensors(folder / "adapters.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="records no mm_config"):
        loaded = MultimodalModel.from_pretrained(folder)
    assert torch.equal(image_logits(loaded), image_logits(tiny_model()))


def test_missing_and_extra_tensors_are_named(folder):
    file = folder / "adapters.safetensors"
    rewrite_tensors(file, lambda t: t.pop("image_blocks.1.mlp_gate"))
    refused(folder, "missing tensors ['image_blocks.1.mlp_gate']")
    rewrite_tensors(
        file, lambda t: t.update({"image_blocks.1.mlp_gate": torch.zeros(1), "extra.w": torch.ones(2)})
    )
    refused(folder, "unexpected tensor 'extra.w'", "adapters.safetensors")


# ---------------------------------------------------------------------------------------- config vs backbone
def test_a_deeper_text_config_than_the_backbone_is_refused(folder):
    # The case: text.num_layers 5 used to load the 4-layer backbone silently.
    set_config(folder, "text.num_layers", 5)
    refused(folder, "text.num_layers 5", "4")


def test_a_deeper_text_config_is_refused_by_the_backbone_in_an_old_folder(folder):
    rewrite_tensors(folder / "adapters.safetensors", metadata={"format": "pt"})
    set_config(folder, "text.num_layers", 5)
    with pytest.warns(UserWarning, match="records no mm_config"):
        refused(folder, "config.json says text.num_layers 5, but the backbone at", "has 4")


@pytest.mark.parametrize(
    ("hf_key", "value", "field", "ours"),
    [("rope_theta", 20000.0, "text.rope_theta", "10000.0"), ("rms_norm_eps", 1e-6, "text.norm_eps", "1e-05")],
)
def test_a_backbone_whose_own_config_differs_is_refused(folder, hf_key, value, field, ours):
    # The weights (and so the digest) are unchanged; the backbone's config.json says otherwise.
    def change(hf):
        hf[hf_key] = value
        if hf.get("rope_parameters") and hf_key == "rope_theta":
            hf["rope_parameters"]["rope_theta"] = value

    edit_json(folder / "backbone" / "config.json", change)
    refused(folder, f"config.json says {field} {ours}, but the backbone at", f"has {value}")


# ---------------------------------------------------------------------------------------- dtypes
def test_fp16_adapters_beside_an_fp32_backbone_are_refused_or_cast_on_request(folder):
    # The case: fp16 adapters loaded, then failed inside chat with a dtype error.
    rewrite_tensors(folder / "adapters.safetensors", lambda t: t.update({k: v.half() for k, v in t.items()}))
    refused(folder, "adapters.safetensors", "float16", "the backbone is float32", "dtype=")
    model = MultimodalModel.from_pretrained(folder, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    answers_with_an_image(model)


def test_one_bf16_gate_among_fp32_adapters_is_refused(folder):
    file = folder / "adapters.safetensors"
    rewrite_tensors(
        file, lambda t: t.update({"image_blocks.0.attn_gate": t["image_blocks.0.attn_gate"].bfloat16()})
    )
    refused(folder, "'image_blocks.0.attn_gate'", "bfloat16", "float32")
    answers_with_an_image(MultimodalModel.from_pretrained(folder, dtype=torch.float32))


def test_a_backbone_with_mixed_dtypes_is_refused(folder):
    rewrite_tensors(
        folder / "backbone" / "model.safetensors",
        lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}),
    )
    refused(folder, "'norm.weight'", "float16", "float32")


def test_a_bf16_folder_loads_in_bf16_and_answers(tmp_path):
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path / "bf16", copy_backbone=True)
    model = MultimodalModel.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    answers_with_an_image(model)


def test_an_imported_mllama_folder_with_mixed_dtypes_is_refused(tmp_path):
    from mm_testing import make_hf_mllama

    make_hf_mllama(tmp_path / "mllama")
    (file,) = (tmp_path / "mllama").glob("*.safetensors")
    name = "multi_modal_projector.bias"
    rewrite_tensors(file, lambda t: t.update({name: t[name].half()}))
    refused(tmp_path / "mllama", "'projector.bias'", "float16", "float32")
    assert MultimodalModel.from_pretrained(tmp_path / "mllama", dtype=torch.float32).dtype == torch.float32


def test_bad_values_in_an_imported_mllama_config_are_named(tmp_path):
    from mm_testing import make_hf_mllama

    make_hf_mllama(tmp_path / "mllama")
    edit_json(tmp_path / "mllama" / "config.json", lambda hf: hf["text_config"].update(rms_norm_eps=-1.0))
    refused(tmp_path / "mllama", "config.json", "norm_eps must be a positive number, got -1.0")


# ---------------------------------------------------------------------------------------- values
VALUE_CASES = [
    # The two cases.
    ("text.vocab_size", -1, "text.vocab_size must be a positive int, got -1"),
    ("text.embed_dim", "128", "text.embed_dim must be an int, got the string '128'"),
    # Variants.
    ("text.head_dim", 32.0, "text.head_dim must be an int, got the float 32.0"),
    ("text.num_layers", True, "text.num_layers must be an int, got the bool True"),
    ("text.num_kv_heads", 0, "text.num_kv_heads must be a positive int, got 0"),
    ("text.norm_eps", -1e-5, "text.norm_eps must be a positive number, got -1e-05"),
    ("text.rope_theta", "1e4", "text.rope_theta must be a number, got the string '1e4'"),
    ("text.tie_embeddings", 0, "text.tie_embeddings must be a bool, got the int 0"),
    (
        "text.eos_token_ids",
        [257, 999],
        "text.eos_token_ids[1] must be a token id below vocab_size 272, got 999",
    ),
    ("text.bos_token_id", "256", "text.bos_token_id must be an int, got the string '256'"),
    ("text.rope_scaling", {"factor": 0}, "text.rope_scaling.factor must be a positive number, got 0"),
    ("text.max_seq_len", None, "text.max_seq_len must be an int, got None"),
    ("image_encoder.width", 0, "image_encoder.width must be a positive int, got 0"),
    (
        "image_encoder.num_global_layers",
        -1,
        "image_encoder.num_global_layers must be a non-negative int, got -1",
    ),
    (
        "image_encoder.supported_aspect_ratios",
        [[1, "2"]],
        "image_encoder.supported_aspect_ratios[0][1] must be an int",
    ),
    ("image_encoder.intermediate_layers", "12", "image_encoder.intermediate_layers must be a list of ints"),
    ("cross_attention_layers", [1, "3"], "cross_attention_layers[1] must be an int, got the string '3'"),
    (
        "cross_attention_intermediate_dim",
        352.0,
        "cross_attention_intermediate_dim must be an int, got the float 352.0",
    ),
    ("num_extra_tokens", -8, "num_extra_tokens must be a non-negative int, got -8"),
]


@pytest.mark.parametrize(("key", "value", "message"), VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_bad_config_values_are_named(folder, key, value, message):
    set_config(folder, key, value)
    refused(folder, f"{folder}/config.json", message)


AV_VALUE_CASES = [
    ("video.group_size", "4", "video.group_size must be an int, got the string '4'"),
    ("video.num_heads", 3, "video.num_heads 3 does not divide"),
    (
        "video.cross_attention_layers",
        [1, 1.5],
        "video.cross_attention_layers[1] must be an int, got the float 1.5",
    ),
    ("speech.encoder.dropout", 1.5, "speech.encoder.dropout must be a number in [0, 1), got 1.5"),
    ("speech.encoder.rotary", "yes", "speech.encoder.rotary must be a bool, got the string 'yes'"),
    (
        "speech.encoder.conv_norm",
        "batch",
        "speech.encoder.conv_norm must be one of ['layer', 'group'], got 'batch'",
    ),
    ("speech.adapter.conv_stride", 0, "speech.adapter.conv_stride must be a positive int, got 0"),
    ("speech.adapter.output_dim", "128", "speech.adapter.output_dim must be an int, got the string '128'"),
]


@pytest.mark.parametrize(("key", "value", "message"), AV_VALUE_CASES, ids=[c[0] for c in AV_VALUE_CASES])
def test_bad_video_and_speech_values_are_named(av_folder, key, value, message):
    set_config(av_folder, key, value)
    refused(av_folder, message)


def test_values_are_checked_in_python_too():
    tiny = TextConfig.preset("tiny").to_dict()
    with pytest.raises(ValueError, match=r"^vocab_size must be a positive int, got -1$"):
        TextConfig(**{**tiny, "vocab_size": -1})
    with pytest.raises(ValueError, match=r"^text.vocab_size must be a positive int, got -1$"):
        ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), "text": {**tiny, "vocab_size": -1}})
    with pytest.raises(ValueError, match="embed_dim must be an int, got the string '128'"):
        TextConfig(**{**tiny, "embed_dim": "128"})
    # Ints where floats are expected are accepted as the same number.
    assert TextConfig(**{**tiny, "rope_theta": 10000}).rope_theta == 10000.0


# ---------------------------------------------------------------------------------------- tokenizer
def test_an_invalid_tokenizer_json_is_named(folder):
    # The case: a JSONDecodeError that named no file.
    (folder / "mm_tokenizer.json").write_text("{not json")
    refused(folder, "mm_tokenizer.json", "not valid JSON")


def test_a_garbage_tokenizer_model_is_named(folder):
    (folder / "mm_tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"IQ== 0\nthis is not a ranks line\n")
    refused(folder, "tokenizer.model", "line 2")


def test_an_invalid_hf_tokenizer_json_is_named(folder):
    (folder / "mm_tokenizer.json").unlink()
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    refused(folder, "tokenizer.json")


def test_a_missing_tokenizer_is_named(folder):
    (folder / "mm_tokenizer.json").unlink()
    refused(folder, f"no tokenizer in {folder}")


def test_a_tokenizer_of_another_vocabulary_is_refused(folder):
    import base64

    (folder / "mm_tokenizer.json").unlink()
    ranks = b"".join(b"%s %d\n" % (base64.b64encode(bytes([i])), i) for i in range(256))
    (folder / "tokenizer.model").write_bytes(ranks)
    refused(folder, "tokenizer.model", "512 tokens", "272")


def test_load_tokenizer_names_the_file(tmp_path):
    bad = tmp_path / "mm_tokenizer.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="mm_tokenizer.json is not valid JSON"):
        load_tokenizer(bad)


# ---------------------------------------------------------------------------------------- settings
PREPROCESSING_CASES = [
    ("max_seq_len", "2048", "preprocessing.max_seq_len must be an int, got the string '2048'"),
    ("max_images", 0, "preprocessing.max_images must be a positive int, got 0"),
    ("mask_mode", "every", "preprocessing.mask_mode must be one of"),
    ("image", {"tile_size": "28"}, "preprocessing.image: tile_size must be a positive int"),
    ("image", [28], "preprocessing.image must be a mapping or null"),
    ("encoder_tiles", [4], "preprocessing.encoder_tiles must be"),
    ("video", {"num_frames": 0}, "preprocessing.video: "),
    ("audio_tokens", {"stack": "4"}, "preprocessing.audio_tokens"),
]


@pytest.mark.parametrize(
    ("key", "value", "message"), PREPROCESSING_CASES, ids=[c[0] for c in PREPROCESSING_CASES]
)
def test_bad_preprocessing_settings_are_named(folder, key, value, message):
    edit_json(folder / "config.json", lambda meta: meta["preprocessing"].update({key: value}))
    refused(folder, f"{folder}/config.json", message)


def test_preprocessing_that_is_not_a_mapping_is_named(folder):
    edit_json(folder / "config.json", lambda meta: meta.update(preprocessing=[1]))
    refused(folder, "preprocessing must be a mapping")


def test_a_tile_size_the_encoder_cannot_take_is_refused(folder):
    edit_json(folder / "config.json", lambda meta: meta["preprocessing"]["image"].update(tile_size=56))
    refused(folder, "preprocessing.image.tile_size 56", "28")


def test_audio_settings_that_disagree_with_the_speech_adapter_are_refused(av_folder):
    edit_json(
        av_folder / "config.json", lambda meta: meta["preprocessing"]["audio_tokens"].update(conv_stride=4)
    )
    refused(av_folder, "preprocessing.audio_tokens.conv_stride 4", "speech.adapter.conv_stride 2")


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ({"stop_token_ids": [999]}, "generation.stop_token_ids: 999 is not a token of this model"),
        ({"temperature": "hot"}, "generation"),
        ([0.5], "generation"),
    ],
)
def test_bad_generation_settings_are_named(folder, generation, message):
    edit_json(folder / "config.json", lambda meta: meta.update(generation=generation))
    refused(folder, message)
