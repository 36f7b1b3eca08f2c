"""What ``mm serve`` does once before it takes requests, so its first request is answered as fast as
the ones after it.

A process builds some things on its first answer and keeps them (CPU, fp32):

* the blocked copy of every weight multiplied with more than four rows
  (:func:`mm.text_backbone.linear.packed`): the backbone's at a prompt's prefill, the image
  encoder's, projector's and cross-attention blocks' at its first image, the video aggregator's
  and the speech encoder's and adapter's at their first video or audio;
* the greedy head's int8 screen of the output matrix
  (:class:`~mm.text_backbone.greedy_head.ScreenedHead`), after timing its kernel once.

Measured with the ``mm bench --size small`` model (Llama 3 vocabulary) and Llama 3's tokenizer on 2
threads of an AMD EPYC, a request being ``complete`` with a 200 x 180 image and 32 new tokens:

* without a warm-up, a process's first request took 0.85-0.91 s and the next ones 0.41-0.44 s;
* after :func:`warm_up` (0.52-0.62 s, once: 0.42-0.52 s of it the text request, which builds the
  head's screen), the first took 0.43-0.48 s and the next ones 0.42-0.48 s

(the bench's folder loaded with ``from_pretrained``, given a ``Preprocessor`` of that tokenizer and
an ``ImageProcessor`` of 112-pixel tiles, at most 4; three processes each, alternated).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mm.model.multimodal import MultimodalModel

__all__ = ["warm_up", "warm_up_conversations"]


def warm_up_conversations(model: MultimodalModel) -> dict[str, list[dict[str, Any]]]:
    """One short conversation per input the model reads: text always; an image, a video (its
    frames) and a clip of audio where the model and its preprocessor read them. The media are
    made here (a gradient; a second of a tone), nothing is read from disk."""
    import torch
    from PIL import Image

    pre = model.preprocessor
    if pre is None:
        raise ValueError("the model has no preprocessor (tokenizer and media settings) to warm up with")
    out: dict[str, list[dict[str, Any]]] = {"text": [{"role": "user", "content": "Say hello."}]}

    def asking(part: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]

    if model.image_encoder is not None and pre.image_processor is not None:
        side = pre.image_processor.tile_size
        ramp = torch.linspace(0, 255, side).to(torch.uint8)
        across, down = ramp.expand(side, side), ramp[:, None].expand(side, side)
        image = Image.fromarray(torch.stack([across, down, 255 - across], dim=-1).numpy(), "RGB")
        out["image"] = asking({"type": "image", "image": image})
        if model.video_aggregator is not None and pre.video is not None:
            out["video"] = asking({"type": "video", "video": [image] * pre.video.num_frames})
    if model.speech_encoder is not None and pre.audio is not None:
        rate = pre.audio.sample_rate
        wave = 0.1 * torch.sin(2 * torch.pi * 440.0 * torch.arange(rate) / rate)
        out["audio"] = asking({"type": "audio", "audio": wave})
    return out


def warm_up(
    model: MultimodalModel,
    max_new_tokens: int = 2,
    on_error: Callable[[str, Exception], None] | None = None,
) -> dict[str, float]:
    """Answer each of :func:`warm_up_conversations` greedily (``max_new_tokens`` each), the way a
    request is answered; returns the seconds each took, by input.

    A request that fails raises a ``ValueError`` naming its input, or with ``on_error`` is passed to
    it (``on_error(input, error)``) and the others still run (``mm serve`` warns and serves: a
    client's request with that input then gets the error as it did without a warm-up)."""
    from mm.model.chat import complete

    seconds = {}
    for kind, messages in warm_up_conversations(model).items():
        start = time.perf_counter()
        try:
            complete(model, messages, max_new_tokens=max_new_tokens, temperature=0.0)
        except Exception as e:
            if on_error is None:
                raise ValueError(f"the warm-up request with {kind} failed: {e}") from e
            on_error(kind, e)
            continue
        seconds[kind] = time.perf_counter() - start
    return seconds
