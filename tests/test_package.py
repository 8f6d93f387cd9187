"""Packaging promises: no torch on import, the bundled example is what its script makes, and the
README's commands are the ones CI runs."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from rlmask.examples import EXAMPLES_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_import_torch() -> None:
    code = "import sys, rlmask; rlmask.diff; assert 'torch' not in sys.modules, 'torch imported'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr


def test_bundled_example_is_reproducible(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_example.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    bundled = EXAMPLES_DIR / "tiny-llama"
    for f in sorted(bundled.rglob("*")):
        if f.is_file():
            assert filecmp.cmp(f, tmp_path / f.relative_to(bundled), shallow=False), f
    total = sum(f.stat().st_size for f in bundled.rglob("*") if f.is_file())
    assert total < 4 * 2**20


def test_readme_commands_are_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = readme.split("## Quickstart", 1)[1].split("```")[1].strip().splitlines()[1:]
    commands = [ln for ln in blocks if ln and not ln.startswith("#")]
    assert len(commands) == 2, commands
    assert commands[1] in ci
    assert "rlmask demo" in commands[0]


def test_import_and_help_do_not_load_the_api() -> None:
    """`import rlmask` and `rlmask --help`/`--version` stay light (issue 14): polars, numpy
    and torch are imported when a command or an API call needs them, not before; a diff
    printed as JSON needs none of them (its totals and records are plain Python), nor the
    mask module (it has no mask)."""
    import subprocess
    import sys

    from rlmask.examples import example_path

    pair = [str(example_path("base")), str(example_path("tuned-seed1"))]
    heavy = "sorted(m for m in ('polars', 'numpy', 'torch', 'rlmask._mask') if m in sys.modules)"
    for argv in (
        [],
        ["--help"],
        ["--version"],
        ["diff", "--help"],
        ["diff", *pair, "--format", "json", "-q"],
    ):
        probe = (
            "import sys, rlmask\n"
            "from rlmask.cli import main\n"
            f"sys.argv = ['rlmask', *{argv!r}]\n"
            "if len(sys.argv) > 1:\n"
            "    try:\n"
            "        main()\n"
            "    except SystemExit as e:\n"
            "        assert not e.code, e.code\n"
            f"print('HEAVY', {heavy}, file=sys.stderr)\n"
        )
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "HEAVY []" in r.stderr, (argv, r.stderr)
        assert argv == [] or r.stdout  # the help or the version was printed
    # Nor does `import rlmask` import typing (with the `re` it imports: 20 ms).
    # (Some environments' site hooks import typing first: forgotten here, so that the probe
    # sees whether rlmask imports it again.)
    probe = (
        "import sys\n"
        "for m in [m for m in sys.modules if m.split('.')[0] == 'typing']:\n"
        "    del sys.modules[m]\n"
        "import rlmask\n"
        "print('typing' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.stdout == "False\n", r.stderr
    # The lazy names resolve to the API, and `dir` lists them.
    import rlmask

    assert rlmask.diff.__module__ == "rlmask._diff" and "overlap_matrix" in dir(rlmask)
