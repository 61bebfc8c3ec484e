"""The HTML report: every section filled, nothing outside the page, and a real browser renders it.

One tiny project (3 BraTS-layout cases of 20x24x16, a 3-iteration run, its predictions and a robustness
table) serves every test. The Chromium test installs Debian's ``chromium`` when it is missing (as root,
with apt-get) and is skipped, with the reason, when that is impossible.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ciml.cli import main
from ciml.errors import CimlError
from ciml.evaluation.robustness import evaluate_robustness
from ciml.explain import explain_cases
from ciml.inference import InferenceSettings, predict_folder
from ciml.report import SECTIONS, write_report
from ciml.training.engine import TrainSettings, train

SHAPE = (20, 24, 16)
AFFINE = np.diag([-1.5, -1.5, 2.0, 1.0])
MODALITIES = ("flair", "t1", "t1ce", "t2")
CPU = InferenceSettings(device="cpu")
CHROMIUM = Path("/usr/bin/chromium")
HEADER_RGB = (0x1F, 0x3B, 0x57)  # table header background in the report's CSS


def write_cases(root: Path, n_cases: int = 3) -> Path:
    """BraTS layout: a sphere tumour (labels 2 > 1 > 4 inwards), brighter in every modality."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), axis=-1)
    for n in range(n_cases):
        rng = np.random.default_rng(n)
        folder = root / f"case{n}"
        folder.mkdir(parents=True)
        distance = np.linalg.norm(grid - rng.uniform([8, 9, 6], [12, 15, 10]), axis=-1)
        label = np.where(distance < 6, 2, 0).astype(np.uint8)
        label[distance < 4] = 1
        label[(distance >= 3) & (distance < 4)] = 4
        for i, modality in enumerate(MODALITIES):
            values = (100 + (label > 0) * (30 + 10 * i) + rng.normal(0, 5, SHAPE)).astype(np.float32)
            nib.save(nib.Nifti1Image(values, AFFINE), folder / f"case{n}_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), folder / f"case{n}_seg.nii.gz")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """Data, a trained run (3 iterations), predictions of the data and a two-subset robustness table."""
    root = tmp_path_factory.mktemp("project")
    data = write_cases(root / "data")
    run = train(
        TrainSettings(
            task="brats2020", data=data, out=root / "run", iterations=3, patch_size=(16, 16, 16),
            widths=(4, 8), batch_size=2, validate_every=3, max_validation_cases=1, device="cpu",
            progress=False,
        )
    )  # fmt: skip
    predict_folder(run, data, root / "pred", settings=CPU, progress=False)
    subsets = [MODALITIES, ("flair", "t1")]  # without t1ce, ET comes from the preset's fallback owners
    table = evaluate_robustness(run, data, settings=CPU, subsets=subsets, progress=False)
    table.write(run.path / "robustness")
    return {"root": root, "data": data, "run": run.path, "pred": root / "pred"}


@pytest.fixture(scope="module")
def report(project) -> Path:
    out = project["root"] / "report.html"
    write_report(project["run"], out, pred_dir=project["pred"], ref_dir=project["data"], settings=CPU)
    return out


def embedded_images(html: str) -> list[tuple[bytes, int, int]]:
    """(PNG bytes, width attribute, height attribute) of every <img> in the page."""
    pattern = r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)" height="(\d+)"'
    found = re.findall(pattern, html)
    return [(base64.b64decode(data), int(w), int(h)) for data, w, h in found]


def test_every_section_is_filled_and_nothing_leaves_the_page(report):
    html = report.read_text(encoding="utf-8")
    for section, _ in SECTIONS:
        assert f'<section id="{section}">' in html
    assert 'class="missing"' not in html  # every input was given: no section is empty
    evaluation = html[html.index('id="evaluation"') : html.index('id="cases"')]
    assert all(f"<td>{region}</td>" in evaluation for region in ("WT", "TC", "ET")) and "±" in evaluation
    robustness = html[html.index('id="robustness"') : html.index('id="training"')]
    table, contributions = robustness.split("Marginal contribution of each modality")
    assert "flair+t1" in table and "subset average" in table and '<td class="num">n/a' not in table
    assert "<td>t1ce</td>" in contributions  # n/a here: two subsets differing in two modalities pair none
    configuration = html[html.index('id="configuration"') :]
    assert "t1ce (mri)" in configuration and "TC, ET" in configuration  # the task decomposition

    images = embedded_images(html)
    assert len(images) == len(re.findall(r"<img\b", html)) >= 1 + 3 + 3  # training, 3 cases, explanation
    for png, width, height in images:
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.size == (width, height)
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", html)
    assert not re.search(r"url\(|<script|<link|@import", html, re.IGNORECASE)


def test_missing_inputs_are_named_and_reports_are_never_overwritten(project, tmp_path, capsys):
    out = tmp_path / "bare.html"
    write_report(project["run"], out, explain_cases=0)
    html = out.read_text(encoding="utf-8")
    for section in ("evaluation", "cases", "explanations"):
        block = html[html.index(f'<section id="{section}">') :]
        assert block.index('class="missing"') < block.index("</section>")
    assert "--pred" in html and "ciml explain" in html
    with pytest.raises(CimlError, match="already exists"):
        write_report(project["run"], out, explain_cases=0)
    assert out.read_text(encoding="utf-8") == html

    run, pred = str(project["run"]), str(project["pred"])
    assert main(["report", "--run", run, "--pred", pred, "--out", str(tmp_path / "x.html")]) == 1
    assert "--pred: predictions and references go together" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()
    assert main(["report", "--run", run, "--out", str(tmp_path / "c.html"), "--explain-cases", "0"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "c.html").is_file()


def test_explanations_written_by_ciml_explain_are_embedded(project, tmp_path):
    explain_cases(project["run"], ["case2"], tmp_path / "explained", settings=CPU, progress=False)
    out = write_report(project["run"], tmp_path / "r.html", explanations=tmp_path / "explained")
    html = out.read_text(encoding="utf-8")
    gradcam = (tmp_path / "explained" / "case2" / "gradcam.png").read_bytes()
    assert base64.b64encode(gradcam).decode() in html and "<h3>case2</h3>" in html
    with pytest.raises(CimlError, match="explanation.json"):
        write_report(project["run"], tmp_path / "s.html", explanations=tmp_path)


# ------------------------------------------------------------------------------------- the browser


def _install_chromium() -> str | None:
    """Install Debian's chromium once; None on success, else why it could not be installed."""
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        return f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt, "update"], [apt, "install", "-y", "chromium"]):
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                env=environment,
                timeout=1200,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(command)}` failed: {exc}"
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed: {done.stderr.strip()[-300:]}"
    return None if CHROMIUM.exists() else f"apt-get installed chromium but {CHROMIUM} is missing"


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        reason = _install_chromium()
        if reason is not None:
            pytest.skip(f"headless Chromium unavailable: {reason}")
    return CHROMIUM


def screenshot(browser: Path, page: Path, folder: Path) -> np.ndarray:
    """The page as Chromium draws it in a 1200x2000 window, RGB."""
    shot = folder / "screenshot.png"
    command = [
        str(browser), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={folder / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
        "--force-device-scale-factor=1", "--hide-scrollbars", page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}"
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def find_image(shot: np.ndarray, picture: np.ndarray) -> tuple[int, int] | None:
    """Top-left corner where ``picture`` appears in ``shot`` pixel for pixel (within 3 levels), or None."""
    height, width = picture.shape[:2]
    # anchor: the most colourful pixel of the picture, so few screenshot pixels share its colour
    saturation = picture.max(-1) - picture.min(-1)
    row, column = np.unravel_index(int(saturation.argmax()), saturation.shape)
    candidates = np.argwhere(np.abs(shot - picture[row, column]).max(-1) <= 3)
    for y, x in candidates[:5000]:
        top, left = int(y) - row, int(x) - column
        if top < 0 or left < 0 or top + height > shot.shape[0] or left + width > shot.shape[1]:
            continue
        if np.abs(shot[top : top + height, left : left + width] - picture).mean() < 2.0:
            return top, left
    return None


@pytest.mark.slow
def test_headless_chromium_shows_the_table_and_the_images(chromium, report, tmp_path):
    shot = screenshot(chromium, report, tmp_path)
    assert shot.shape == (2000, 1200, 3)
    luminance = shot.mean(-1)
    assert shot.std() > 20 and (luminance < 240).mean() > 0.05  # not a blank page

    # the first case's overlay, drawn 1:1 where the page places it, full of image-like variety
    html = report.read_text(encoding="utf-8")
    cases = html[html.index('<section id="cases">') :]
    png, width, height = embedded_images(cases)[0]
    with Image.open(io.BytesIO(png)) as image:
        picture = np.asarray(image.convert("RGB")).astype(np.int16)
    corner = find_image(shot, picture)
    assert corner is not None, "the case overlay is not in the screenshot"
    top, left = corner
    region = shot[top : top + height, left : left + width]
    colours = np.unique(region.reshape(-1, 3), axis=0)
    assert len(colours) > 200 and region.std() > 30
    assert ((region[..., 0] - region[..., 2]) > 80).sum() > 20  # red of labels or errors, not only greys

    # the evaluation table: its dark header band, then rows with dark text
    band = np.all(np.abs(shot - np.array(HEADER_RGB)) <= 3, axis=-1).sum(1) > 150
    header_rows = np.flatnonzero(band)
    assert header_rows.size >= 10, "no table header drawn"
    first_header = header_rows[0]
    assert first_header < top, "the evaluation table comes before the case overlays"
    below = luminance[first_header + 12 : first_header + 120]
    text_rows = ((below < 100).sum(1) > 5).sum()
    assert text_rows >= 20, "the table's body rows hold no dark text"
