"""Control masks (issue 27): the counts of a mask at random places, per tensor or per tensor
and binade of the base value, checked against numpy on the base's own bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import rlmask
from rlmask.cli import cli
from rlmask.examples import example_path

FINDING1 = Path(example_path("base")).parent.parent / "finding1"


def _binades(base: Path, name: str) -> np.ndarray:
    """The f32 exponent field of every BF16 value of ``name``, from the file's bytes."""
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        t = f.get_tensor(name)
    bits = t.view(dtype=__import__("torch").int16).numpy().astype(np.uint16).astype(np.uint32)
    return ((bits << 16) >> 23) & 0xFF


@pytest.fixture(scope="module")
def subnetwork(tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = tmp_path_factory.mktemp("controls") / "rl.rlmask"
    rlmask.diff(FINDING1 / "base", FINDING1 / "rl-seed1", save_mask=m, progress=False)
    return m


def test_uniform_controls_keep_each_tensors_count(subnetwork: Path) -> None:
    real = rlmask.load_mask(subnetwork)
    a = rlmask.Mask.random_like(real, seed=1)
    b = rlmask.Mask.random_like(real, seed=1)
    c = rlmask.Mask.random_like(real, seed=2)
    assert a.names == real.names and a.counts() == real.counts()
    assert all(np.array_equal(a[n], b[n]) for n in a.names)  # seeded
    assert any(not np.array_equal(a[n], c[n]) for n in a.names)
    # Spread over the whole tensor: the overlap with the real mask is what chance gives.
    o = rlmask.overlap(real, a).total
    assert abs(o["o1"] - o["o1_random"]) < 0.03


def test_matched_controls_keep_each_binades_count(subnetwork: Path) -> None:
    base = FINDING1 / "base"
    real = rlmask.load_mask(subnetwork)
    ctl = rlmask.Mask.random_like(real, base, seed=3)
    for n in real.names:
        exps = _binades(base, n).reshape(-1)
        want = np.bincount(exps[real[n].reshape(-1)], minlength=256)
        got = np.bincount(exps[ctl[n].reshape(-1)], minlength=256)
        assert np.array_equal(want, got), n
    assert any(not np.array_equal(real[n], ctl[n]) for n in real.names)
    # Its overlap with the real mask is the matched baseline's expectation, up to chance.
    t = rlmask.overlap(real, ctl, base=base).total
    assert abs(t["o1"] - t["o1_matched"]) < 0.03


def test_the_command(subnetwork: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.rlmask"
    r = CliRunner().invoke(
        cli,
        [
            "mask",
            "random",
            "--like",
            str(subnetwork),
            "--matched",
            str(FINDING1 / "base"),
            "--seed",
            "5",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.stderr
    made = rlmask.load_mask(out)
    assert made.counts() == rlmask.load_mask(subnetwork).counts()
    assert made.meta["source"] == "random_like" and made.meta["seed"] == "5"
    r = CliRunner().invoke(
        cli, ["mask", "random", "--like", str(subnetwork), "-o", str(subnetwork)]
    )
    assert r.exit_code == 2 and "input" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, other / "model.safetensors")
    r = CliRunner().invoke(
        cli,
        [
            "mask",
            "random",
            "--like",
            str(subnetwork),
            "--matched",
            str(other),
            "-o",
            str(tmp_path / "x.rlmask"),
        ],
    )
    assert r.exit_code == 1 and "has no tensor" in r.stderr and not (tmp_path / "x.rlmask").exists()
