"""`mm info`: component tables of the presets, with the published parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mm.model.info import describe


def _mm(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mm.cli", *args], capture_output=True, text=True, check=True)
    return out.stdout


def test_json_output_of_the_405b_text_model():
    info = json.loads(_mm("info", "--preset", "llama3.1-405b", "--json"))
    assert set(info) == {"preset", "total_params", "components"}
    assert info["preset"] == "llama3.1-405b"
    assert round(info["total_params"] / 1e9, 3) == 405.853
    assert info["components"] == [{"name": "backbone", "params": info["total_params"], "frozen": True}]


def test_table_output_names_every_component():
    table = _mm("info", "--preset", "llama3-8b")
    for word in ("backbone", "image_encoder", "image_adapter", "bf16 memory", "8.030B"):
        assert word in table


def test_unknown_preset_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "mm.cli", "info", "--preset", "llama9"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "unknown preset 'llama9'" in out.stderr


@pytest.mark.parametrize("preset", ["llama3.2-11b-vision", "llama3.2-90b-vision"])
def test_vision_presets_count_as_transformers_does(preset):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    text = {"llama3.2-11b-vision": (4096, 40, 32, 14336), "llama3.2-90b-vision": (8192, 100, 64, 28672)}[
        preset
    ]
    d, layers, heads, ffn = text
    cross = list(range(3, layers, 5))
    config = MllamaConfig(
        vision_config={"image_size": 560},  # the released tiles
        text_config={
            "hidden_size": d,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": ffn,
            "cross_attention_layers": cross,
        },
    )
    with torch.device("meta"):
        ref = MllamaForConditionalGeneration(config)
    assert describe(preset)["total_params"] == sum(p.numel() for p in ref.parameters())


def test_published_vision_counts():
    # Released config.json files use 560 px tiles: 10.670B and 88.593B parameters.
    assert round(describe("llama3.2-11b-vision")["total_params"] / 1e9, 3) == 10.670
    assert round(describe("llama3.2-90b-vision")["total_params"] / 1e9, 3) == 88.593
    # The 10.643B / 88.566B often quoted are transformers' default MllamaConfig, whose tiles are 448 px:
    # the difference is the tile-position table and the position embedding (1601 vs 1025 tokens).
    from mm import ModelConfig

    for preset, quoted in (("llama3.2-11b-vision", 10.643), ("llama3.2-90b-vision", 88.566)):
        cfg = ModelConfig.preset(preset)
        small = cfg.replace(image_encoder=cfg.image_encoder.replace(image_size=448))
        from mm.model.multimodal import MultimodalModel

        with torch.device("meta"):
            count = sum(p.numel() for p in MultimodalModel(small).parameters())
        assert round(count / 1e9, 3) == quoted


def test_paper_presets_have_the_papers_component_sizes():
    comps = {c["name"]: c["params"] for c in describe("llama3-405b")["components"]}
    assert 0.80e9 < comps["image_encoder"] < 0.90e9  # "a total of 850M parameters" (section 7.2)
    assert 95e9 < comps["image_adapter"] < 105e9  # "approximately 100B parameters" at 405B
    assert round(comps["backbone"] / 1e9, 3) == 405.853
