"""Run logs: a JSONL line per iteration (every loss term, validation Dice, time) and ``progress.png``.

The JSONL file is what ``progress.png`` and the report are drawn from; TensorBoard gets the same
scalars when it is installed and asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ciml.files import atomic_path, write_text_atomic

LOG_FILE = "log.jsonl"
PLOT_FILE = "progress.png"


class RunLogger:
    """Writes one fold's log; a disabled logger (non-zero DDP ranks) does nothing."""

    def __init__(self, folder: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self.writer = _tensorboard_writer(self.folder / "tensorboard")

    @property
    def path(self) -> Path:
        return self.folder / LOG_FILE

    def on_step(self, trainer: Any, record: dict[str, Any]) -> None:
        """Trainer callback: append the iteration's record (flushed, so a kill loses at most one line)."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "iteration":
                    self.writer.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        """Flush and close TensorBoard's event file (the JSONL log is flushed line by line anyway)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def truncate_after(self, iteration: int) -> None:
        """After a resume, drop lines of iterations the checkpoint does not contain (they will be redone)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in read_log(self.path) if line.get("iteration", 0) <= iteration]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def record_rank_checksums(self, checksums: list[float]) -> None:
        """Log every rank's parameter checksum at the end: DDP ranks must agree exactly."""
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps({"event": "end", "rank_parameter_checksums": checksums}) + "\n")

    def plot(self) -> Path | None:
        if not self.enabled or not self.path.is_file():
            return None
        return plot_progress(read_log(self.path), self.folder / PLOT_FILE)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The log's records; a torn last line (killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_progress(records: list[dict[str, Any]], path: Path) -> Path:
    """Loss terms (segmentation per segmentor, KL) and validation Dice against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "iteration" in r and "loss" in r]
    figure, (loss_ax, kl_ax, dice_ax) = plt.subplots(1, 3, figsize=(15, 4))
    iterations = [r["iteration"] for r in steps]
    for key in ["loss", "seg"] + sorted({k for r in steps for k in r if k.startswith("seg/")}):
        loss_ax.plot(iterations, [r.get(key, float("nan")) for r in steps], label=key, lw=1)
    kl_ax.plot(iterations, [r.get("kl", 0.0) for r in steps], label="KL (nats/voxel, all gates)", lw=1)
    validated = [r for r in steps if any(k.startswith("val/") for k in r)]
    for key in sorted({k for r in validated for k in r if k.startswith("val/dice/")}):
        dice_ax.plot(
            [r["iteration"] for r in validated], [r.get(key) for r in validated], "o-", label=key, ms=3
        )
    # fixed corners: matplotlib's loc="best" searches every plotted point (seconds for a long run)
    panels = (
        (loss_ax, "training loss", "upper right"),
        (kl_ax, "information sent", "upper right"),
        (dice_ax, "validation Dice", "lower right"),
    )
    for ax, title, corner in panels:
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc=corner)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=90)
    plt.close(figure)
    return path


def _tensorboard_writer(folder: Path):
    """A SummaryWriter when TensorBoard is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("TensorBoard is not installed; logging to log.jsonl and progress.png only")
        return None
    return SummaryWriter(str(folder))
