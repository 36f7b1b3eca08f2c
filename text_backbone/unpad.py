"""Right-padded rows computed as one packed row of their real tokens.

Shapes: b rows, s tokens per row, N real tokens in all, d model width.

A right-padded batch (the training collator's layout) spends the padding's share of every product
and norm on positions whose outputs nothing reads: their labels are ignored, and no real token
attends to a later position. Without a cache, mm therefore runs such a batch as one packed row of
its real tokens: each row becomes one sample of the row (``sequence_ids``), attending causally to
itself from position 0, exactly what it computes at its real positions when padded. The outputs go
back to ``[b, s, ...]`` with zeros at the padding, so the padding's hidden states are zero and its
logits are zero (padded, they would be whatever the padding happened to attend to).

A batch is unpadded only when nothing it computes at a real position can change: every row's real
tokens come first, and every label at a padded position is ignored (-100). Left padding, a row
without tokens, and anything else run padded as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Unpadding"]


@dataclass(frozen=True)
class Unpadding:
    """Where the real tokens of a right-padded ``[b, s]`` batch sit.

    Attributes:
        index: ``[N]`` flat positions (in ``b * s``) of the real tokens, row after row.
        sequence_ids: ``[1, N]`` the row each real token comes from (the packed row's samples).
        lengths: each row's number of real tokens (its span of the packed row).
        shape: ``(b, s)``.
    """

    index: torch.Tensor
    sequence_ids: torch.Tensor
    lengths: tuple[int, ...]
    shape: tuple[int, int]

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None) -> Unpadding | None:
        """The unpadding of a right-padded batch, or ``None`` when it must run padded.

        Args:
            attention_mask: ``[b, s]``, 1 on real tokens and 0 on padding.
            labels: ``[b, s]`` targets, if any: each one at a padded position must be -100.

        Returns:
            ``None`` without padding, or when a row's real tokens do not all come before its
            padding, a row has none, the mask holds values other than 0 and 1, or a padded
            position carries a label.
        """
        if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[1] < 2:
            return None
        mask = attention_mask
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                return None
            mask = mask.bool()
        if bool(mask.all()) or not bool(mask[:, 0].all()):
            return None
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):  # a real token after padding
            return None
        if labels is not None and (labels.shape != mask.shape or bool((labels[~mask] != -100).any())):
            return None
        b, s = mask.shape
        lengths = mask.sum(dim=1)  # [b]
        index = mask.flatten().nonzero().squeeze(1)  # [N]
        rows = torch.arange(b, device=mask.device).repeat_interleave(lengths)
        return cls(index=index, sequence_ids=rows[None], lengths=tuple(lengths.tolist()), shape=(b, s))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, ...]`` to the real tokens' ``[1, N, ...]``."""
        return x.flatten(0, 1).index_select(0, self.index)[None]

    def pack_optional(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """:meth:`pack`, passing ``None`` through."""
        return None if x is None else self.pack(x)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, N, ...]`` back to ``[b, s, ...]``, zeros at the padding."""
        b, s = self.shape
        rest = x.shape[2:]
        flat = x.new_zeros((b * s, *rest)).index_copy(0, self.index, x[0])
        return flat.view(b, s, *rest)
