"""The Finding 1 study (examples/finding1/study.py) in its --quick form: it completes, and every
figure in its results.json agrees with an independent recomputation on the checkpoints it wrote
(numpy on tensors read by the official safetensors library; rewards by our own greedy decoding).
The finding itself is reported by the study, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from oracle import TORCH_TO_ST, binade, changed, raw_bits

STUDY = Path(__file__).resolve().parent.parent / "examples" / "finding1" / "study.py"


def _tensors(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            out[name] = (TORCH_TO_ST[t.dtype], raw_bits(t))
    return out


def _changed(base: dict, tuned: dict, **kw: object) -> dict[str, np.ndarray]:
    return {n: changed(base[n][0], base[n][1], tuned[n][0], tuned[n][1], **kw) for n in base}


def _sparsity(flags: dict[str, np.ndarray]) -> float:
    return 1 - sum(int(f.sum()) for f in flags.values()) / sum(f.size for f in flags.values())


def _reward(folder: Path, problems: list[tuple[str, str]]) -> float:
    """Exact-answer accuracy, by our own greedy decoding token by token."""
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(STUDY.parent))
    from study import VOCAB  # the vocabulary only

    inverse = {v: k for k, v in VOCAB.items()}
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ok = 0
    with torch.no_grad():
        for prompt, answer in problems:
            ids = [VOCAB["<bos>"]] + [VOCAB[c] for c in prompt]
            text = ""
            for _ in range(4):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == VOCAB["<eos>"]:
                    break
                ids.append(nxt)
                text += inverse[nxt] if nxt > 2 else ""
            ok += text == answer
    return ok / len(problems)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("finding1")
    r = subprocess.run(
        [sys.executable, str(STUDY), "--quick", "--out", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_sparsities_and_rewards_are_recomputed_from_the_checkpoints(
    study: tuple[Path, dict],
) -> None:
    out, res = study
    base = _tensors(out / res["base"]["path"])
    import random

    rng = random.Random(res["eval"]["seed"])
    problems = []
    for _ in range(res["eval"]["problems"]):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        problems.append((f"{a}+{b}=", str(a + b)))
    kinds = {r["kind"] for r in res["runs"]}
    assert kinds == {"rl", "sft"} and len(res["runs"]) >= 7
    for run in res["runs"]:
        tuned = _tensors(out / run["path"])
        assert run["sparsity_exact"] == pytest.approx(
            _sparsity(_changed(base, tuned, criterion="exact")), abs=1e-12
        )
        assert run["sparsity_tol"] == pytest.approx(
            _sparsity(_changed(base, tuned, tol=1e-5)), abs=1e-12
        )
    for run in res["runs"][:2] + [r for r in res["runs"] if r["kind"] == "sft"]:
        assert run["reward_after"] == pytest.approx(_reward(out / run["path"], problems))
    assert res["runs"][0]["reward_before"] == pytest.approx(
        _reward(out / res["base"]["path"], problems)
    )
    # Provenance travels in the checkpoints' metadata.
    with safe_open(str(out / res["runs"][0]["path"] / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["script"] == "examples/finding1/study.py" and meta["kind"] == "rl"


def test_overlaps_trajectory_and_conjecture1_are_recomputed(study: tuple[Path, dict]) -> None:
    out, res = study
    base = _tensors(out / res["base"]["path"])
    path = {r["name"]: out / r["path"] for r in res["runs"]}
    masks = {
        n: _changed(base, _tensors(path[n]), tol=1e-5) for n in ("rl-seed1", "rl-seed2", "sft")
    }
    for o in res["overlaps"]:
        a, b = masks[o["a"]], masks[o["b"]]
        size_a = sum(int(x.sum()) for x in a.values())
        size_b = sum(int(x.sum()) for x in b.values())
        numel = sum(x.size for x in a.values())
        inter = sum(int((a[n] & b[n]).sum()) for n in a)
        expected = 0.0
        for n in a:
            e = binade(base[n][0], base[n][1])
            for bin_ in np.unique(e):
                sel = e == bin_
                expected += a[n][sel].sum() * b[n][sel].sum() / sel.sum()
        assert o["o1"] == pytest.approx(inter / size_a)
        assert o["o1_random"] == pytest.approx(size_b / numel)
        assert o["o1_matched"] == pytest.approx(expected / size_a)
        assert o["o2_matched"] == pytest.approx(expected / size_b)
    # The trajectory of seed 1's run, from its intermediate checkpoints.
    run = path["rl-seed1"].parent
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    steps = [_tensors(c) for c in ckpts]
    vs = [_changed(base, s, tol=1e-5) for s in steps]
    got = res["trajectory"]
    assert [c["step"] for c in got["checkpoints"]] == [int(c.name.split("-")[1]) for c in ckpts]
    assert [c["changed_vs_base"] for c in got["checkpoints"]] == [
        sum(int(x.sum()) for x in v.values()) for v in vs
    ]
    ever = {n: np.logical_or.reduce([v[n] for v in vs]) for n in base}
    final = vs[-1]
    assert got["categories"] == {
        "never": sum(int((~ever[n]).sum()) for n in base),
        "returned": sum(int((ever[n] & ~final[n]).sum()) for n in base),
        "final": sum(int(final[n].sum()) for n in base),
    }
    # Conjecture 1: the subnetwork run against the full run, bit for bit.
    c1 = res["conjecture1"]
    full, sub = _tensors(path["rl-seed1"]), _tensors(path["rl-subnetwork"])
    assert c1["identical_to_full"] == pytest.approx(
        _sparsity(_changed(full, sub, criterion="exact"))
    )
    assert c1["mask_density"] == pytest.approx(1 - _sparsity(masks["rl-seed1"]))
    # Outside the mask, the subnetwork run left every element at the base's bits.
    for n in base:
        frozen = ~masks["rl-seed1"][n]
        assert np.array_equal(sub[n][1][frozen], base[n][1][frozen]), n


def test_sync_cost_of_every_step_agrees_with_the_checkpoints(study: tuple[Path, dict]) -> None:
    """The per-step sync figures of seed 1's run (measured in memory by SyncCostCallback on the
    bf16 casts): at each saved step, the share changed since the start is what numpy finds
    between the base and that step's checkpoint file, bit for bit."""
    out, res = study
    sync = res["sync"]
    base = _tensors(out / res["base"]["path"])
    numel = sum(v[1].size for v in base.values())
    assert sync["full_bytes"] == 2 * numel  # bf16
    run = out / next(r["path"] for r in res["runs"] if r["name"] == "rl-seed1")
    ckpts = sorted(run.parent.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts
    for c in ckpts:
        k = sync["steps"].index(int(c.name.split("-")[1]))
        flags = _changed(base, _tensors(c), criterion="exact")
        want = sum(int(f.sum()) for f in flags.values())
        assert sync["changed_since_start"][k] * numel == pytest.approx(want, abs=0.5)
    for plain, compact, share in zip(
        sync["plain_bytes"], sync["compact_bytes"], sync["changed_since_last"], strict=True
    ):
        # Plain: at most 6 bytes per changed element, whole tensors capping it.
        assert compact <= plain <= 6 * share * numel + 1e-6
