"""A Llama 3.2 Vision folder in Hugging Face's layout (written by transformers itself) answers at once:
its tokenizer, image settings, multi-image rule, stop tokens and sampling defaults come from its files."""

from __future__ import annotations

import json

import pytest
import torch
from meta_reference import META_TOKENIZER
from mm_testing import make_hf_mllama, random_images

from mm import MultimodalModel

STOPS = [128001, 128008, 128009]


def _llama3_tokenizer_json(folder):
    """Write tokenizer.json / tokenizer_config.json for the real Llama 3 vocabulary with transformers,
    Meta's special-token table and <|image|> at 128256 (as Llama 3.2 Vision's Hugging Face folders)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(META_TOKENIZER)).converted()
    named = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128004: "<|finetune_right_pad_id|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
    }
    names = [named.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in [*names, "<|image|>"]])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
    )
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import GenerationConfig, MllamaImageProcessor

    folder = tmp_path_factory.mktemp("Llama-3.2-11B-Vision-Instruct-tiny")
    make_hf_mllama(folder, vocab_size=128256, bos_token_id=128000, eos_token_id=STOPS, pad_token_id=128004)
    hf_tok = _llama3_tokenizer_json(folder)
    MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4).save_pretrained(folder)
    GenerationConfig(
        bos_token_id=128000,
        eos_token_id=STOPS,
        pad_token_id=128004,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    ).save_pretrained(folder)
    return folder, hf_tok


def test_hf_folder_comes_back_ready_to_answer(hf_folder):
    folder, hf_tok = hf_folder
    model = MultimodalModel.from_pretrained(folder)
    pre = model.preprocessor
    assert pre is not None
    assert pre.tokenizer.vocab_size == 128256 and pre.tokenizer.image_id == 128256
    text = "Llama 3.2 Vision reads <|eot_id|> as text here, and 12345 digits."
    assert pre.tokenizer.encode(text) == hf_tok.encode(
        text, add_special_tokens=False, split_special_tokens=True
    )
    assert (pre.image_processor.tile_size, pre.image_processor.max_tiles) == (28, 4)
    assert pre.image_processor.backend == "pil"  # Meta's transform, which the weights were trained with
    assert pre.mask_mode == "most_recent"  # Meta's (and transformers') multi-image rule
    assert pre.max_seq_len == 512  # the model's context (max_position_embeddings), below model_max_length
    defaults = model.generation_defaults
    assert defaults.stop_token_ids == tuple(STOPS)
    assert (defaults.temperature, defaults.top_p) == (0.6, 0.9)
    assert set(model.stop_token_ids) == set(STOPS)


def test_mm_ask_on_the_hf_folder(hf_folder, tmp_path, capsys):
    from mm.cli import main

    folder, _ = hf_folder
    picture = tmp_path / "x.png"
    random_images([(40, 30)], seed=3)[0].save(picture)
    args = ["ask", "--model", str(folder), "--image", str(picture), "What is this?", "--max-new-tokens", "4"]
    assert main([*args, "--json", "--temperature", "0"]) == 0
    greedy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--json", "--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"] == greedy["answer"]
    # Without --temperature the folder's generation_config.json decides: sampling at 0.6.
    assert main([*args, "--json", "--seed", "1"]) == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sampled["tokens"] >= 1


def test_imported_settings_survive_save_and_export(hf_folder, tmp_path):
    folder, _ = hf_folder
    model = MultimodalModel.from_pretrained(folder)
    model.save_pretrained(tmp_path / "adapter")  # refers to the HF folder for the backbone
    again = MultimodalModel.from_pretrained(tmp_path / "adapter")
    assert again.preprocessor.settings() == model.preprocessor.settings()
    assert again.generation_defaults == model.generation_defaults
    model.export_hf(tmp_path / "hf")
    for name in ("tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    back = MultimodalModel.from_pretrained(tmp_path / "hf")
    assert back.generation_defaults == model.generation_defaults
    assert back.preprocessor.image_processor.to_dict() == model.preprocessor.image_processor.to_dict()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())


def test_weights_only_folder_says_what_is_missing(tmp_path):
    make_hf_mllama(tmp_path)
    model = MultimodalModel.from_pretrained(tmp_path)
    assert model.preprocessor is None
    with pytest.raises(ValueError, match="no preprocessor"):
        model.chat([{"role": "user", "content": "hi"}])


def test_tokenizer_of_another_vocabulary_is_refused(hf_folder, tmp_path):
    from mm.text_backbone.checkpoint import CheckpointError

    make_hf_mllama(tmp_path)  # vocabulary of 300
    (tmp_path / "tokenizer.model").write_bytes(META_TOKENIZER.read_bytes())
    with pytest.raises(CheckpointError, match="128256 tokens; the model's vocabulary has 300"):
        MultimodalModel.from_pretrained(tmp_path)
