"""Training metrics: one JSON line per logged step, TensorBoard scalars, and a loss-curve PNG.

Only the main process writes. On resume, lines past the checkpoint's step are dropped first, so
``metrics.jsonl`` always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_loss_curves", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file (an empty list when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Append-only metrics of one stage.

    Args:
        folder: the stage's output folder (``metrics.jsonl``, ``tensorboard/``, ``loss.png``).
        enabled: write anything at all (True on the main process only).
        resume_step: drop rows after this step first (the run resumes from that checkpoint);
            ``None`` starts a fresh file.
    """

    def __init__(self, folder: str | Path, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self.path = self.folder / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = [
            r for r in read_metrics(self.path) if resume_step is not None and r.get("step", 0) <= resume_step
        ]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency; stay usable if someone removed it
            self._tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)

    def close(self, title: str | None = None) -> Path | None:
        """Flush TensorBoard and draw ``loss.png``; returns the plot's path."""
        if not self.enabled:
            return None
        if self._tb is not None:
            self._tb.close()
        out = self.folder / "loss.png"
        plot_loss_curves({title or self.folder.name: read_metrics(self.path)}, out)
        return out


def plot_loss_curves(curves: dict[str, list[dict[str, Any]]], out: str | Path, key: str = "loss") -> Path:
    """Draw ``key`` against ``step`` for each named run into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, rows in curves.items():
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=name, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or any(curves.values()):
        ax.legend(frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
