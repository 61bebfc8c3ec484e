"""Every registered network's numerics, pinned: a stored input and the outputs it must keep producing.

segmentation_models.pytorch's ``test_preserve_forward_output`` is the model. For each name in
``ciml.models.model_names()`` and each of a 3D and a 2D case (brats2020 spec, widths (4, 8), input
1x4x8x8x8 or 1x4x16x16 stored in the fixture), the network is built with ``torch.manual_seed(0)`` and its
parameters then shifted by seeded uniform noise (so the zero-initialised message projections carry
messages and the weights are not only the initialiser's). Then, as a training step would:

* training mode, noise seeded: every segmentor's logits (every other voxel per axis, to keep the
  fixture small), the KL and its per-gate terms, the loss terms (beta 0.1, target ``input > 0``), the
  gradient norm of every parameter and the buffers (the gates' running prior) after the update;
* evaluation mode, with that updated prior: every segmentor's full logits (owned and fallback), the KL
  and its per-gate terms.

A change in any of these, through initialisation order, layer maths, the gates or the loss, fails a test.
When numerics change on purpose, regenerate the fixture and commit it with the change::

    PYTHONPATH=src python tests/models/test_numerics.py --regenerate

``--check`` compares without pytest and prints each entry's worst deviation, as a fraction of the
tolerance, which is how the tolerance was chosen across CPU ISAs and thread counts, e.g.::

    DNNL_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=2 \\
        PYTHONPATH=src python tests/models/test_numerics.py --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from ciml.losses import CIMLLoss
from ciml.models import build_model, model_names

FIXTURE = Path(__file__).parent / "data" / "forward_outputs.pt"
REGENERATE = "PYTHONPATH=src python tests/models/test_numerics.py --regenerate"
# Worst deviation measured (--check) on AVX-512, AVX2 and SSE4.1/default, 1 and 2 threads: 0.12 of this.
RTOL, ATOL = 1e-4, 1e-5

TASK = "brats2020"
WIDTHS = (4, 8)
CASES = {"3d": (1, 4, 8, 8, 8), "2d": (1, 4, 16, 16)}
NOISE = 0.05  # half-width of the uniform shift added to every parameter
BETA = 0.1


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {case: torch.rand(shape, generator=generator) * 4 - 2 for case, shape in CASES.items()}


def _model(name: str, spatial_dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, TASK, widths=WIDTHS, spatial_dims=spatial_dims)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():  # uniform, not normal: bit-identical on every CPU ISA
            parameter.add_((torch.rand(parameter.shape, generator=generator) * 2 - 1) * NOISE)
    return model


def _outputs(prefix: str, output, every_other_voxel: bool = False) -> dict[str, torch.Tensor]:
    def crop(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float()
        return t[(..., *(slice(None, None, 2),) * (t.dim() - 2))].clone() if every_other_voxel else t.clone()

    out = {f"{prefix}/logits/{k}": crop(v) for k, v in output.logits.items()}
    out.update({f"{prefix}/fallback/{k}": crop(v) for k, v in output.fallback_logits.items()})
    out.update({f"{prefix}/kl_terms/{k}": v.detach().float().clone() for k, v in output.kl_terms.items()})
    out[f"{prefix}/kl"] = output.kl.detach().float().clone()
    return out


def record(name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the fixture stores for network ``name`` on input ``x`` (see the module docstring)."""
    model = _model(name, x.dim() - 2)
    target = (x[:, :3] > 0).float()  # brats2020's three regions
    model.train()
    torch.manual_seed(3)  # the gates' training noise
    output = model(x)
    terms = CIMLLoss(["WT", "TC", "ET"], beta=BETA)(output, target)
    terms.total.backward()
    out = _outputs("train", output, every_other_voxel=True)
    out.update({f"train/loss/{k}": torch.tensor(v) for k, v in terms.as_dict().items()})
    out["train/grad_norms"] = torch.stack(
        [p.grad.norm() if p.grad is not None else torch.tensor(0.0) for p in model.parameters()]
    )
    buffers = [b.flatten().float() for b in model.buffers()]
    out["train/buffers"] = torch.cat(buffers) if buffers else torch.zeros(0)
    model.eval()
    with torch.no_grad():
        out.update(_outputs("eval", model(x)))
    return out


def _pack(tensors: dict[str, torch.Tensor]) -> dict:
    """One flat tensor per entry (hundreds of small tensors would double the file's size)."""
    keys = sorted(tensors)
    return {
        "keys": keys,
        "shapes": [list(tensors[k].shape) for k in keys],
        "values": torch.cat([tensors[k].flatten() for k in keys]),
    }


def _unpack(packed: dict) -> dict[str, torch.Tensor]:
    sizes = [torch.Size(s).numel() for s in packed["shapes"]]
    parts = packed["values"].split(sizes)
    return {k: v.view(s) for k, v, s in zip(packed["keys"], parts, packed["shapes"], strict=True)}


def entries() -> list[tuple[str, str]]:
    return [(case, name) for case in CASES for name in model_names()]


def regenerate(path: Path = FIXTURE) -> None:
    inputs = _inputs()
    fixture = {
        "torch": str(torch.__version__),
        "inputs": inputs,
        "outputs": {f"{case}/{name}": _pack(record(name, inputs[case])) for case, name in entries()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB, {len(fixture['outputs'])} entries)")


def _load() -> dict:
    if not FIXTURE.exists():
        pytest.fail(f"missing {FIXTURE}; create it with `{REGENERATE}`")
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return _load()


def _compare(stored: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], entry: str) -> None:
    if sorted(stored) != sorted(fresh):
        pytest.fail(
            f"{entry}: the outputs changed shape (stored {sorted(set(stored) - set(fresh))} missing now, "
            f"new {sorted(set(fresh) - set(stored))}); if that is on purpose, `{REGENERATE}`"
        )
    for key in stored:
        torch.testing.assert_close(
            fresh[key],
            stored[key],
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, key=key: f"{entry} {key}: {m}\nIf numerics changed on purpose: `{REGENERATE}`",
        )


@pytest.mark.parametrize("case, name", entries(), ids=[f"{c}-{n}" for c, n in entries()])
def test_preserve_forward_output(fixture, case, name):
    entry = f"{case}/{name}"
    if entry not in fixture["outputs"]:
        pytest.fail(f"no stored outputs for registered network {entry!r} in {FIXTURE.name}; `{REGENERATE}`")
    torch.testing.assert_close(fixture["inputs"][case], _inputs()[case], rtol=0, atol=0)
    _compare(_unpack(fixture["outputs"][entry]), record(name, fixture["inputs"][case]), entry)


def test_the_fixture_covers_exactly_the_registry(fixture):
    expected = {f"{case}/{name}" for case, name in entries()}
    stale = sorted(set(fixture["outputs"]) - expected)
    assert not stale, f"stored outputs for networks no longer registered: {stale}; `{REGENERATE}`"


def test_a_missing_entry_fails_saying_how_to_regenerate(fixture):
    with pytest.raises(pytest.fail.Exception, match="no stored outputs.*--regenerate"):
        test_preserve_forward_output({**fixture, "outputs": {}}, "3d", "ciml")


def test_the_fixture_is_small():
    assert FIXTURE.stat().st_size < 400 * 1024  # fixtures stay well under the 1 MB the project allows


def test_the_training_step_is_deterministic():
    """Same seed, same noise: two runs agree exactly, so the stored training outputs are meaningful."""
    x = _inputs()["3d"]
    first, second = record("ciml", x), record("ciml", x)
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=key)


def check() -> int:
    """Compare every entry without pytest; print its worst |fresh - stored| / (ATOL + RTOL * |stored|)."""
    stored = torch.load(FIXTURE, weights_only=True)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {capability}")
    worst_all = 0.0
    for case, name in entries():
        entry = f"{case}/{name}"
        fresh = record(name, stored["inputs"][case])
        worst, where = 0.0, ""
        for key, value in _unpack(stored["outputs"][entry]).items():
            ratio = (
                ((fresh[key] - value).abs() / (ATOL + RTOL * value.abs())).max().item()
                if value.numel()
                else 0
            )
            if ratio > worst:
                worst, where = ratio, key
        worst_all = max(worst_all, worst)
        print(f"{entry:20s} worst {worst:.4f} of the tolerance ({where})")
    print(f"overall worst {worst_all:.4f} of the tolerance (rtol {RTOL}, atol {ATOL})")
    return 0 if worst_all <= 1 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--regenerate", action="store_true", help=f"rewrite {FIXTURE.name} from the current code"
    )
    group.add_argument(
        "--check", action="store_true", help="compare against the fixture and print deviations"
    )
    args = parser.parse_args()
    if args.regenerate:
        regenerate()
    else:
        sys.exit(check())
