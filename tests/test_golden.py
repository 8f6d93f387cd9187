"""Golden snapshots of every JSON contract (design §4, §6, §7, §9; issue 28): the JSON of diff,
trajectory, overlap, survey, rank, mask info and patch info on the bundled Finding 1 example,
compared with the files in tests/golden/. A refactor that changes a key or a figure fails here.

Floats compare to 1e-9 relative (rank's and spectrum's to 1e-5: BLAS libraries differ in the
last bits); everything else exactly. Run with ``RLMASK_UPDATE_GOLDEN=1`` to rewrite the files
after a deliberate change, and review the diff before committing it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from rlmask.cli import cli
from rlmask.examples import trained_path

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RLMASK_UPDATE_GOLDEN") == "1"
# Keys whose values depend on the machine or the build, not on the inputs.
VOLATILE = {"rlmask_version", "created"}


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<volatile>" if k in VOLATILE else _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _same(got: Any, want: Any, rel: float, where: str = "$") -> None:
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), where
        assert got == pytest.approx(want, rel=rel, abs=1e-12), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{where}: keys differ"
        for k in want:
            _same(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, rel, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example copied into a folder of its own, with the masks and the patch the
    contracts are read from; commands run from inside it, so every path is relative."""
    root = tmp_path_factory.mktemp("golden")
    for name in ("base", "rl-seed1", "rl-seed2", "sft", "run-seed1"):
        shutil.copytree(trained_path(name), root / name)
    (root / "survey.csv").write_text("name,base,tuned\nseed1,base,rl-seed1\nsft,base,sft\n")
    return root


def _run(example: Path, args: list[str], parse: bool = True) -> Any:
    cwd = os.getcwd()
    os.chdir(example)
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if parse else None


CASES = {
    "diff": ["diff", "base", "rl-seed1", "--format", "json", "--sweep"],
    "diff-magnitude": ["diff", "base", "sft", "--by", "magnitude", "--format", "json"],
    "trajectory": ["trajectory", "base", "run-seed1", "--format", "json"],
    "survey": ["survey", "survey.csv", "--no-cache", "--format", "json"],
    "rank": ["rank", "base", "rl-seed1", "--device", "cpu", "--format", "json"],
    "spectrum": ["spectrum", "base", "sft", "--device", "cpu", "--format", "json"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_json_is_the_golden_file(example: Path, case: str) -> None:
    # Singular values and vectors: BLAS libraries differ in the last bits.
    _check(case, _run(example, CASES[case]), rel=1e-5 if case in ("rank", "spectrum") else 1e-9)


def test_mask_overlap_and_patch_json_are_the_golden_files(example: Path) -> None:
    for seed in ("rl-seed1", "rl-seed2"):
        _run(example, ["diff", "base", seed, "--save-mask", f"{seed}.rlmask", "-q"], parse=False)
    _check("mask-info", _run(example, ["mask", "info", "rl-seed1.rlmask", "--format", "json"]))
    overlap = ["overlap", "rl-seed1.rlmask", "rl-seed2.rlmask", "--base", "base", "--format"]
    _check("overlap", _run(example, [*overlap, "json"]))
    _run(example, ["patch", "create", "base", "rl-seed1", "-o", "seed1.rlpatch"], parse=False)
    _check("patch-info", _run(example, ["patch", "info", "seed1.rlpatch", "--format", "json"]))


def _check(case: str, got: Any, rel: float = 1e-9) -> None:
    got = _normalise(got)
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=False) + "\n")
    assert path.exists(), f"no golden file {path}: run with RLMASK_UPDATE_GOLDEN=1"
    _same(got, json.loads(path.read_text()), rel)
