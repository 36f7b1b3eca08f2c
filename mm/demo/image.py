"""The image phase of ``mm demo``: the frozen text model learns to see generated shapes.

1. Pre-train the image encoder on its own (:func:`pretrain_image_encoder`), before any adapter
   exists, as the paper starts from a pre-trained ViT (Llama 3 paper, section 7.2).
2. Write the training pictures as files (captions, then questions about colour, shape, count and
   position; :mod:`mm.demo.image_data`) and pack them into webdataset shards, the real data path
   (PNG files -> ``mm data pack`` shards -> streaming -> the staged trainer).
3. Run the image stages of the ``tiny-demo`` recipe (``mm/recipes/tiny-demo.yaml``): pre-training
   on captions and questions, then annealing; the backbone stays frozen.

:func:`image_qa_accuracy` scores a model on held-out pictures, every one holding a
colour-shape-quadrant combination never seen in training, through ``mm eval`` (the ``vqav2`` task).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mm.demo.scenes import caption

__all__ = [
    "ImagePhase",
    "caption",
    "image_qa_accuracy",
    "pretrain_image_encoder",
    "run_image_phase",
    "write_image_data",
]


def pretrain_image_encoder(config, samples, *, steps: int, batch: int, seed: int, progress: bool):
    """Pre-train the demo's image encoder before any adapter exists.

    The paper starts from a contrastively pre-trained ViT-H/14 (section 7.2). The demo's stand-in is
    supervised attribute tagging on the training images: from the mean of the encoder's patch
    features, linear heads name the colour, shape and quadrant of a lone shape and the number of
    shapes. The heads are thrown away; only the encoder is kept.

    Returns:
        ``(encoder, losses)``: the encoder in eval mode and the loss of every step.
    """
    from mm.datasets.image_processing import ImageProcessor
    from mm.demo.scenes import COLOURS, POSITIONS, SHAPES, quadrant
    from mm.encoders import ImageEncoder

    torch.manual_seed(seed)
    encoder = ImageEncoder(config)
    heads = torch.nn.ModuleDict(
        {k: torch.nn.Linear(encoder.output_dim, 4) for k in ("colour", "shape", "position", "count")}
    )
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=1e-3, weight_decay=0.01)
    proc = ImageProcessor(tile_size=config.image_size, max_tiles=config.max_num_tiles)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="image encoder", disable=not progress, unit="step"):
        chunk = [samples[i] for i in torch.randint(0, len(samples), (batch,), generator=gen).tolist()]
        labels = {k: torch.full((batch,), -100) for k in heads}
        for i, s in enumerate(chunk):
            labels["count"][i] = len(s.scene.shapes) - 1
            if len(s.scene.shapes) == 1:
                item = s.scene.shapes[0]
                labels["colour"][i] = COLOURS.index(item.colour)
                labels["shape"][i] = SHAPES.index(item.shape)
                labels["position"][i] = POSITIONS.index(quadrant(item.x, item.y))
        images = proc([[s.image] for s in chunk])
        features = encoder(
            images.pixel_values, images.aspect_ratio_ids, images.aspect_ratio_mask
        )  # [b, 1, t, p, D]
        pooled = features.flatten(1, 3).mean(dim=1)  # [b, D]
        loss = sum(torch.nn.functional.cross_entropy(heads[k](pooled), labels[k]) for k in heads)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return encoder.eval(), losses


def write_image_data(out: Path, *, caption_samples: int, qa_samples: int, seed: int) -> dict[str, Any]:
    """Generate the training pictures, write them as files under ``out/raw`` (captions as
    ``KEY.png`` + ``KEY.txt``, questions as ``KEY.png`` + ``KEY.json``) and pack them into shards
    under ``out/data``.

    Returns:
        Per folder (``captions``, ``qa``), its samples and shards, for the report.
    """
    from mm.datasets.shards import pack
    from mm.demo.image_data import make_image_qa, write_image_qa_folder

    raw, shards = out / "raw", out / "data"
    for folder in (raw, shards):
        shutil.rmtree(folder, ignore_errors=True)
    caps = make_image_qa(caption_samples, split="train", seed=seed + 1)
    (raw / "captions").mkdir(parents=True)
    for i, sample in enumerate(caps):
        key = f"{i:06d}"
        sample.image.save(raw / "captions" / f"{key}.png")
        (raw / "captions" / f"{key}.txt").write_text(caption(sample.scene))
    qa = make_image_qa(qa_samples, split="train", seed=seed + 2)
    write_image_qa_folder(qa, raw / "qa")
    info = {}
    for name in ("captions", "qa"):
        result = pack(raw / name, shards / name, shard_bytes="4MB")
        info[name] = {"samples": result.samples, "shards": len(result.shards)}
    return info


def image_qa_accuracy(model, samples, out: Path, model_dir: Path) -> dict[str, Any]:
    """Score image questions through ``mm eval``: written as a VQAv2 split under
    ``out/eval-data/image-qa``, scored by the ``vqav2`` task (VQA accuracy; ten copies of the answer
    make it exact match after VQAv2's normaliser), the question asked alone as the demo trains.

    Returns:
        ``accuracy``, ``per_kind`` (from the per-sample scores), ``examples`` (the first eight
        questions, their answers and the model's) and ``eval`` (task, metric, command).
    """
    from mm.demo.eval_sets import per_kind, score, write_vqav2

    data = write_vqav2(samples, out / "eval-data" / "image-qa")
    scored = score(model, model_dir, "vqav2", data, out / "eval" / "image-qa", prompt="", max_new_tokens=12)
    result = scored.result
    examples = [
        {"question": s.question, "answer": s.answer, "model": r.prediction}
        for s, r in zip(samples[:8], result.samples)
    ]
    return {
        "accuracy": result.score,
        "per_kind": per_kind([s.kind for s in samples], [r.score for r in result.samples]),
        "examples": examples,
        "eval": scored.provenance(),
    }


@dataclass(frozen=True)
class ImagePhase:
    """What the image phase leaves for the stages after it and for the report.

    Attributes:
        model_dir: the model after the last image stage.
        stages: the image-encoder pre-training and every image stage, as the report lists stages.
        results: the image stages' :class:`~mm.training.trainer.StageResult` s.
        data: the shards written (:func:`write_image_data`).
    """

    model_dir: Path
    stages: list[dict[str, Any]]
    results: list[Any]
    data: dict[str, Any]


def run_image_phase(
    out: Path,
    backbone_dir: Path,
    *,
    encoder_samples: int,
    encoder_steps: int,
    caption_samples: int,
    qa_samples: int,
    pretrain_steps: int,
    anneal_steps: int,
    seed: int,
    progress: bool,
) -> ImagePhase:
    """Pre-train the image encoder (saved as ``out/image-encoder.safetensors``), write the image
    data, and run the ``tiny-demo`` recipe's image stages on the frozen backbone in
    ``backbone_dir`` (runs under ``out/runs``, loss plots under ``out/plots``)."""
    from mm.demo.image_data import make_image_qa
    from mm.model.config import ModelConfig
    from mm.training.metrics import plot_loss_curves, read_metrics
    from mm.training.recipe import load_recipe
    from mm.training.trainer import Trainer

    t0 = time.perf_counter()
    encoder, losses = pretrain_image_encoder(
        ModelConfig.preset("tiny-demo").image_encoder,
        make_image_qa(encoder_samples, split="train", seed=seed + 4),
        steps=encoder_steps,
        batch=32,
        seed=seed,
        progress=progress,
    )
    encoder_file = out / "image-encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, encoder_file)
    encoder_stage = {
        "name": "image-encoder",
        "steps": encoder_steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": losses[-1],
    }
    plot_loss_curves(
        {"image encoder": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]},
        out / "plots" / "image-encoder.png",
    )

    data = write_image_data(out, caption_samples=caption_samples, qa_samples=qa_samples, seed=seed)
    recipe = load_recipe("tiny-demo").with_paths(
        BACKBONE=str(backbone_dir.resolve()),
        ENCODER=str(encoder_file.resolve()),
        DATA=str((out / "data").resolve()),
    )
    steps = {"image-pretrain": pretrain_steps, "image-anneal": anneal_steps}
    recipe = dataclasses.replace(
        recipe, stages=tuple(dataclasses.replace(s, steps=steps.get(s.name, s.steps)) for s in recipe.stages)
    )
    results = Trainer(recipe, output_dir=out / "runs", progress=progress).run(
        replace=True
    )  # a rerun starts afresh
    curves = {r.name: read_metrics(out / "runs" / r.name / "metrics.jsonl") for r in results}
    plot_loss_curves(curves, out / "plots" / "image-stages.png")
    return ImagePhase(
        model_dir=Path(results[-1].model_dir),
        stages=[
            encoder_stage,
            *[
                {"name": r.name, "steps": r.steps, "seconds": round(r.seconds, 2), "final_loss": r.final_loss}
                for r in results
            ],
        ],
        results=results,
        data=data,
    )
