"""The rlmask command: output formats, exit codes, atomic files, one real subprocess run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from rlmask.cli import cli
from rlmask.examples import example_path

BASE, TUNED = str(example_path("base")), str(example_path("tuned-seed1"))


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_json_is_the_report_contract() -> None:
    """The CLI's JSON against the numpy oracle on the files read by the official library."""
    from oracle import expected_report, load_checkpoint

    code, out, _ = run("diff", BASE, TUNED, "--sweep", "--format", "json", "-q")
    assert code == 0
    got = json.loads(out)
    sweep = list(rlmask.DEFAULT_SWEEP)
    base = load_checkpoint(sorted(Path(BASE).glob("*.safetensors")))
    tuned = load_checkpoint(sorted(Path(TUNED).glob("*.safetensors")))
    want = expected_report(base, tuned, sweep)
    assert got["tolerances"] == sweep and got["criterion"] == "absolute"
    assert {t["name"]: t["changed"] for t in got["tensors"]} == want
    numel = sum(bits.size for _, bits in base.values())
    assert got["numel"] == numel
    assert got["changed"] == [sum(c[k] for c in want.values()) for k in range(4)]
    assert got["sparsity"] == [pytest.approx(1 - c / numel) for c in got["changed"]]
    assert {"only_in_base", "only_in_tuned", "tied", "skipped", "dtype_mismatch", "renamed"} <= set(
        got
    )


def test_table_output_and_breakdowns() -> None:
    report = rlmask.diff(BASE, TUNED, progress=False)
    code, out, _ = run("diff", BASE, TUNED)
    assert code == 0
    assert f"{report.numel:,} floating elements" in out
    assert f"{100 * report.sparsity:7.3f}%" in out
    code, out, _ = run("diff", BASE, TUNED, "--by", "layer")
    assert code == 0 and "sparsity_unweighted_mean" in out
    table = out.split("by layer:")[1].splitlines()
    assert [ln.split()[0] for ln in table[3:]] == ["0", "1", "2", "3"]
    code, out, _ = run("diff", BASE, TUNED, "--by", "module")
    assert "q_proj" in out and "lm_head" in out


def test_csv_and_parquet_files(tmp_path: Path) -> None:
    out_csv = tmp_path / "layers.csv"
    code, _, _ = run("diff", BASE, TUNED, "--by", "layer", "--format", "csv", "-o", str(out_csv))
    assert code == 0
    df = pl.read_csv(out_csv)
    want = rlmask.diff(BASE, TUNED, progress=False).by_layer()
    assert df["changed"].to_list() == want["changed"].to_list()
    out_pq = tmp_path / "tensors.parquet"
    code, _, _ = run(
        "diff", BASE, TUNED, "--format", "parquet", "-o", str(out_pq), "--by", "tensor"
    )
    assert code == 0
    assert pl.read_parquet(out_pq)["name"].len() == 39
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_plot_and_file_permissions(tmp_path: Path) -> None:
    png = tmp_path / "fig3.png"
    code, _, err = run("diff", BASE, TUNED, "--plot", str(png), "-q")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = tmp_path / "r.json"
    assert run("diff", BASE, TUNED, "--format", "json", "-o", str(out))[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it


def test_usage_errors_exit_2() -> None:
    """Each usage error: exit 2, nothing on stdout, and a message saying what is wrong."""
    cases = [
        (["diff", BASE], "Missing argument 'TUNED'"),
        (["diff", BASE, TUNED, "--criterion", "relative"], "needs eta"),
        (["diff", BASE, TUNED, "--format", "parquet"], "--format parquet needs -o FILE"),
        (["diff", BASE, TUNED, "--tolerances", "1e-5,x"], "is not a comma-separated list"),
        (["diff", BASE, TUNED, "--include", "("], "invalid include regex '('"),
    ]
    for args, want in cases:
        code, out, err = run(*args)
        assert (code, out) == (2, ""), args
        assert want in err and "Traceback" not in err, (args, err)


def test_data_errors_exit_1_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b'\x05\0\0\0\0\0\0\0{"w":')
    code, _, err = run("diff", BASE, str(bad))
    assert code == 1
    assert "Traceback" not in err and str(bad) in err
    code, _, err = run("diff", BASE, str(tmp_path / "nowhere"))
    assert code == 1 and "cannot find checkpoint" in err


def test_failed_run_leaves_output_untouched(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3), "v": torch.zeros(5)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(4), "v": torch.ones(5)}, tmp_path / "b.safetensors")
    out = tmp_path / "out.json"
    out.write_text("previous")
    code, _, err = run(
        "diff",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
        "--format",
        "json",
        "-o",
        str(out),
    )
    assert code == 1 and "tensor 'w'" in err
    assert out.read_text() == "previous"
    code, _, _ = run(
        "diff",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
        "--format",
        "json",
        "-o",
        str(out),
        "--skip-mismatched",
    )
    assert code == 0 and json.loads(out.read_text())["skipped"][0]["name"] == "w"


def test_demo_tells_the_story_on_trained_checkpoints() -> None:
    from oracle import changed, load_checkpoint
    from rlmask.examples import trained_path

    code, out, _ = run("demo")
    assert code == 0
    for command in ("$ rlmask diff", "$ rlmask overlap", "--by magnitude", "$ rlmask trajectory"):
        assert command in out
    # The figures printed are those of the bundled files, recomputed here with numpy.
    base = load_checkpoint([trained_path("base") / "model.safetensors"])
    for name in ("rl-seed1", "rl-seed2", "sft"):
        tuned = load_checkpoint([trained_path(name) / "model.safetensors"])
        flags = [changed(base[n][0], base[n][1], *tuned[n], criterion="exact") for n in base]
        sparsity = 1 - sum(int(f.sum()) for f in flags) / sum(f.size for f in flags)
        assert f"{name:<9} sparsity {100 * sparsity:6.2f}% exact" in out
    # Provenance travels with the bundled weights.
    from safetensors import safe_open

    with safe_open(str(trained_path("rl-seed1") / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["script"] == "examples/finding1/study.py" and meta["kind"] == "rl"


def test_help() -> None:
    code, out, _ = run("diff", "--help")
    assert code == 0 and "--sweep" in out and "Examples" in out


def test_installed_command_in_a_subprocess(tmp_path: Path) -> None:
    # The console script installed for this interpreter (PATH may hold another, or a shim).
    beside = Path(sys.executable).with_name("rlmask")
    exe = str(beside) if beside.exists() else shutil.which("rlmask")
    assert exe, "the rlmask console script is not installed"
    out = tmp_path / "r.json"
    p = subprocess.run(
        [exe, "diff", BASE, TUNED, "--format", "json", "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # stderr is not a terminal: no progress bar
    assert json.loads(out.read_text())["numel"] == 250_432
    p = subprocess.run(
        [exe, "diff", BASE, str(tmp_path / "missing")], capture_output=True, text=True, check=False
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_module_entry_point_matches() -> None:
    for entry in (["-c", "from rlmask.cli import main; main()"], ["-m", "rlmask"]):
        p = subprocess.run(
            [sys.executable, *entry, "--version"], capture_output=True, text=True, check=False
        )
        assert p.returncode == 0 and rlmask.__version__ in p.stdout


def test_ctrl_c_while_the_command_line_loads() -> None:
    """Ctrl-C in the first tenth of a second (while click and the commands are imported) exits
    130 with the commands' one line, not a traceback."""
    probe = """
import os, signal, sys
class Interrupt:  # SIGINT arrives as rlmask.cli is imported
    def find_spec(self, name, path=None, target=None):
        if name == "rlmask.cli":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, Interrupt())
import rlmask.__main__
"""
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert (p.returncode, p.stdout, p.stderr) == (
        130,
        "",
        "rlmask: interrupted; nothing was written\n",
    )


def test_the_console_entry_collects_while_the_command_runs() -> None:
    """The console script's module turns the cyclic collector off while the command line is
    imported; the command itself runs with it on (a long run's cycles are collected)."""
    probe = """
import gc, sys
import rlmask.__main__ as entry
assert not gc.isenabled()
command = entry.main.__globals__["cli"].main
def report(*args, **kwargs):
    print("collecting:", gc.isenabled())
    return command(*args, **kwargs)
entry.main.__globals__["cli"].main = report
entry.main()
"""
    p = subprocess.run(
        [sys.executable, "-c", probe, "--version"], capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("collecting: True\n") and rlmask.__version__ in p.stdout


# The entry point with an exit handler registered while the command runs, as a library the
# command imports would register one.
WITH_HANDLER = """
import atexit, sys
import rlmask.cli as c
command = c.cli.main
def with_handler(*args, **kwargs):
    atexit.register(sys.stdout.write, "handler ran\\n")  # left in the buffer
    return command(*args, **kwargs)
c.cli.main = with_handler
c.main()
"""


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["diff", BASE, TUNED, "--format", "json"], 0),
        (["diff", BASE, "/nonexistent"], 1),
        (["diff", BASE, TUNED, "--tol", "x"], 2),
        (["--version"], 0),
    ],
)
def test_exit_skips_teardown_but_not_handlers_or_output(args: list[str], code: int) -> None:
    """`main` ends the process without the interpreter's teardown; the exit code, every byte
    of output and the other exit handlers (which run before it) are those of the command run
    by click with the ordinary exit."""
    ordinary = "from rlmask.cli import cli; cli.main(prog_name='rlmask')"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    want, got = (
        subprocess.run(
            [sys.executable, "-c", program, *args], capture_output=True, check=False, env=buffered
        )
        for program in (ordinary, WITH_HANDLER)
    )
    assert want.returncode == code, want.stderr
    assert (got.returncode, got.stdout, got.stderr) == (
        code,
        want.stdout + b"handler ran\n",
        want.stderr,
    )


@pytest.mark.parametrize("level", ["total", "layer", "module", "tensor"])
def test_every_level_renders(level: str) -> None:
    assert run("diff", BASE, TUNED, "--by", level, "--format", "csv")[0] == 0
