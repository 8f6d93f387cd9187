"""The fuzzer of ``tests/fuzzing.py``, a few thousand cases per run: mutated safetensors headers,
index files and mask metadata never crash, hang or raise anything but an rlmask error, and every
file that rlmask and the official safetensors reader judge differently is one of the explained
kinds (``fuzzing.STRICTER``). ``bench/fuzz.py`` runs millions by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

import fuzzing


@pytest.mark.parametrize(("kind", "cases"), [("header", 3000), ("index", 1000), ("mask", 2000)])
def test_mutated_inputs_fail_cleanly(kind: str, cases: int, tmp_path: Path) -> None:
    tally = fuzzing.run(kind, range(cases), tmp_path)
    assert tally.cases == cases
    assert tally.crashes == [] and tally.hangs == []
    assert set(tally.outcomes) <= {"ok", "error"}
    # The mutations must reach both sides: accepted files go through the report too.
    assert tally.outcomes["ok"] >= 10 and tally.outcomes["error"] > 0.5 * cases
    unexplained = [k for k in tally.disagreements if "unexplained" in k]
    assert unexplained == [], unexplained


def test_the_explained_disagreements_are_real(tmp_path: Path) -> None:
    """Each kind in fuzzing.STRICTER is met by the mutations, and the official reader accepts
    the file that rlmask refuses (so the table in bench/RESULTS.md stays true)."""
    tally = fuzzing.run("header", range(3000), tmp_path)
    seen = {k.removeprefix("rlmask refuses: ") for k in tally.disagreements}
    repeated = ("__metadata__ key", "appears more than once")
    assert seen >= {fuzzing.STRICTER[k] for k in repeated}
    assert seen <= set(fuzzing.STRICTER.values())
