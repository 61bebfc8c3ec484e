"""PNG figures of explanations and predictions: axial slices through the tumour, and share bar charts.

Every function returns PNG bytes (a matplotlib ``Figure`` rendered off-screen, no pyplot state), so the
same figure can be written to disk or embedded in the HTML report. Volumes are ``[X, Y, Z]`` arrays in
RAS orientation (the preprocessed grid, or a NIfTI brought to its closest canonical orientation); an
axial slice is shown with anterior up and the patient's right on the right (neurological convention).

Example:
    >>> k = tumour_slice(mask)                                          # doctest: +SKIP
    >>> png = case_overlay_png(images, reference, prediction, k)       # doctest: +SKIP
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ciml.explain.gradcam import Contribution

matplotlib.use("Agg")

DPI = 90
PANEL_INCHES = 1.55
#: Error classes of the case overlay: (code, name, RGB).
ERROR_CLASSES = (
    (1, "correct", (0.1, 0.75, 0.2)),
    (2, "false positive", (1.0, 0.45, 0.0)),
    (3, "false negative", (0.15, 0.35, 0.95)),
    (4, "wrong label", (0.9, 0.2, 0.9)),
)
_LABEL_COLOURS = ((0.95, 0.2, 0.15), (0.2, 0.8, 0.25), (1.0, 0.85, 0.1), (0.2, 0.5, 1.0), (0.85, 0.3, 0.9))


# --------------------------------------------------------------------------------------------- helpers


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes at :data:`DPI` on a white background."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def tumour_slice(mask: np.ndarray) -> int:
    """Axial index (last axis) with the most mask voxels; the middle slice when the mask is empty."""
    counts = np.asarray(mask).reshape(-1, mask.shape[-1]).astype(bool).sum(0)
    return int(counts.argmax()) if counts.any() else mask.shape[-1] // 2


def axial(volume: np.ndarray, index: int) -> np.ndarray:
    """Slice ``index`` of the last axis, turned so anterior is up and the patient's right is right."""
    return np.rot90(np.asarray(volume)[:, :, index])


def window(image: np.ndarray) -> tuple[float, float]:
    """Display range: 1st and 99th percentiles of the nonzero voxels (of all voxels if none)."""
    values = image[image != 0] if np.any(image != 0) else image.ravel()
    low, high = np.percentile(values, (1, 99)) if values.size else (0.0, 1.0)
    return float(low), float(high if high > low else low + 1.0)


def robust_max(arrays: Sequence[np.ndarray], percentile: float = 99.5) -> float:
    """Colour-scale top: a high percentile of the positive values, so a few hot voxels wash nothing out."""
    positive = [np.asarray(a)[np.asarray(a) > 0] for a in arrays]
    values = np.concatenate(positive) if positive else np.zeros(0)
    return float(np.percentile(values, percentile)) if values.size else 1.0


def _grid(rows: int, columns: int, height: float = PANEL_INCHES) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(PANEL_INCHES * columns, height * rows + 0.35), layout="constrained")
    axes = np.atleast_2d(np.asarray(figure.subplots(rows, columns, squeeze=False)))
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, axes


def _background(ax, image: np.ndarray, index: int, limits: tuple[float, float]) -> None:
    ax.imshow(axial(image, index), cmap="gray", vmin=limits[0], vmax=limits[1], interpolation="nearest")


def _overlay(ax, values: np.ndarray, cmap, vmax: float, floor: float = 0.05) -> None:
    """``values`` in colour where they exceed ``floor`` of ``vmax``; transparent elsewhere."""
    shown = np.ma.masked_less_equal(values, floor * vmax)
    ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=vmax, alpha=0.6, interpolation="nearest")


def _contour(ax, mask: np.ndarray, colour: str = "cyan") -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.8)


def _labels_rgba(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Label map -> RGBA image: each nonzero label value its colour, background transparent."""
    rgba = np.zeros((*labels.shape, 4))
    for i, value in enumerate(values):
        rgba[labels == value] = (*_LABEL_COLOURS[i % len(_LABEL_COLOURS)], 0.75)
    return rgba


# ----------------------------------------------------------------------------------------- per case


def error_map(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Per voxel: 0 background in both, else the code of :data:`ERROR_CLASSES`."""
    ref, pred = reference > 0, prediction > 0
    codes = np.zeros(reference.shape, np.uint8)
    codes[ref & pred & (reference == prediction)] = 1
    codes[~ref & pred] = 2
    codes[ref & ~pred] = 3
    codes[ref & pred & (reference != prediction)] = 4
    return codes


def case_overlay_png(
    images: Mapping[str, np.ndarray],
    reference: np.ndarray | None,
    prediction: np.ndarray,
    index: int,
    label_values: Sequence[int],
    title: str = "",
) -> bytes:
    """Input modalities, reference, prediction and errors on axial slice ``index``.

    Args:
        images: modality -> volume (may be empty when only label maps are available).
        reference: reference label map, or None (no reference and error panels then).
        prediction: predicted label map on the same grid.
        label_values: nonzero label values, in legend order (each gets its colour).
    """
    panels = [*images, "prediction"] if reference is None else [*images, "reference", "prediction", "errors"]
    figure, axes = _grid(1, len(panels), PANEL_INCHES + 0.25)
    base = next(iter(images.values())) if images else None
    limits = window(base) if base is not None else (0.0, 1.0)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel in images:
            _background(ax, images[panel], index, window(images[panel]))
        else:
            if base is not None:
                _background(ax, base, index, limits)
            else:
                ax.imshow(np.zeros(axial(prediction, index).shape), cmap="gray", vmin=0, vmax=1)
            if panel == "errors":
                codes = axial(error_map(reference, prediction), index)
                ax.imshow(_error_rgba(codes))
            else:
                labels = reference if panel == "reference" else prediction
                ax.imshow(_labels_rgba(axial(labels, index), label_values))
        ax.set_title(panel, fontsize=9)
    handles = [Patch(color=_LABEL_COLOURS[i % len(_LABEL_COLOURS)], label=f"label {v}")
               for i, v in enumerate(label_values)]  # fmt: skip
    if reference is not None:
        handles += [Patch(color=rgb, label=name) for _, name, rgb in ERROR_CLASSES]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    return png_bytes(figure)


def _error_rgba(codes: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*codes.shape, 4))
    for code, _, rgb in ERROR_CLASSES:
        rgba[codes == code] = (*rgb, 0.8)
    return rgba


# ----------------------------------------------------------------------------------- explanations


def contributions_png(
    images: Mapping[str, np.ndarray], contributions: Sequence[Contribution], index: int, title: str = ""
) -> bytes:
    """One row per segmentor and region, one column per modality: its map over its own image.

    Each row shares one colour scale (:func:`robust_max` of its maps), so the modalities of a row compare; the
    cyan line is the explained (predicted) mask, the percentage the modality's share.

    Args:
        images: modality -> preprocessed volume.
        contributions: the rows; their maps and masks are on the volumes' grid.
    """
    modalities = list(images)
    figure, axes = _grid(len(contributions), len(modalities))
    for row, contribution in zip(axes, contributions, strict=True):
        vmax = robust_max([v.numpy() for v in contribution.maps.values()])
        fractions = contribution.fractions
        for ax, modality in zip(row, modalities, strict=True):
            _background(ax, images[modality], index, window(images[modality]))
            if modality in contribution.maps:
                _overlay(ax, axial(contribution.maps[modality].numpy(), index), "inferno", vmax)
            _contour(ax, axial(contribution.mask.numpy(), index))
            share = fractions.get(modality, 0.0)
            ax.set_title(f"{modality} -> {contribution.name}: {100 * share:.0f}%", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return png_bytes(figure)


def information_png(
    images: Mapping[str, np.ndarray],
    information: Mapping[str, np.ndarray],
    totals: Mapping[str, float],
    index: int,
    title: str = "",
) -> bytes:
    """Rows: receivers; columns: senders; each panel the message's KL map (nats per voxel).

    All panels share one colour scale (:func:`robust_max`), so a brighter message carried more information
    there; the title gives the message's mean (its share of the loss's KL term).
    """
    pairs = [name.split("<-") for name in information]
    receivers = list(dict.fromkeys(r for r, _ in pairs))
    senders = [m for m in images if any(s == m for _, s in pairs)]
    figure, axes = _grid(len(receivers), len(senders))
    vmax = robust_max(list(information.values()))
    image = None
    for r, receiver in enumerate(receivers):
        for s, sender in enumerate(senders):
            ax, name = axes[r, s], f"{receiver}<-{sender}"
            if name not in information:
                continue
            _background(ax, images[receiver], index, window(images[receiver]))
            image = ax.imshow(
                np.ma.masked_less_equal(axial(information[name], index), 0.02 * vmax),
                cmap="viridis", vmin=0.0, vmax=vmax, alpha=0.7, interpolation="nearest",
            )  # fmt: skip
            ax.set_title(f"{receiver} <- {sender}: {totals.get(name, 0.0):.3g}", fontsize=7)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.6, label="nats per voxel")
    if title:
        figure.suptitle(title, fontsize=10)
    return png_bytes(figure)


def fractions_png(contributions: Sequence[Contribution], modalities: Sequence[str], title: str = "") -> bytes:
    """Grouped bars: for each segmentor and region, each modality's share of the contribution."""
    names = [c.name for c in contributions]
    figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 2.8), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(1, len(modalities))
    colours = matplotlib.colormaps["tab10"]
    positions = np.arange(len(names))
    for i, modality in enumerate(modalities):
        shares = [c.fractions.get(modality, 0.0) for c in contributions]
        ax.bar(positions + (i - (len(modalities) - 1) / 2) * width, shares, width, label=modality,
               color=colours(i % 10))  # fmt: skip
    ax.set_xticks(positions, names, fontsize=8, rotation=20 if len(names) > 6 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of contribution")
    ax.legend(fontsize=7, ncol=len(modalities), loc="upper center", bbox_to_anchor=(0.5, 1.18), frameon=False)
    if title:
        ax.set_title(title, fontsize=10, pad=22)
    return png_bytes(figure)
