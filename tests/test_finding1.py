"""The Finding 1 study (examples/finding1/study.py) in its --quick form: it completes, and every
figure in its results.json agrees with an independent recomputation on the checkpoints it wrote
(numpy on tensors read by the official safetensors library; rewards and KL by our own decoding;
the precision null by Monte Carlo placements rounded by torch), and its RESULTS.md is exactly
what its report function writes from results.json, the committed one included. The finding
itself is reported by the study, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

import rlmask
from oracle import TORCH_TO_ST, binade, changed, raw_bits, values

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


def _problems(res: dict) -> list[tuple[str, str]]:
    import random

    rng = random.Random(res["eval"]["seed"])
    problems = []
    for _ in range(res["eval"]["problems"]):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        problems.append((f"{a}+{b}=", str(a + b)))
    return problems


def _study_module() -> Any:
    sys.path.insert(0, str(STUDY.parent))
    import study as module

    return module


def test_report_is_written_from_results_alone(study: tuple[Path, dict]) -> None:
    """RESULTS.md is what report() writes from results.json: here, and in the committed copy,
    so that no figure or claim in it was typed by hand."""
    out, res = study
    report = _study_module().report
    assert (out / "RESULTS.md").read_text() == report(res)
    committed = json.loads((STUDY.parent / "results.json").read_text())
    assert (STUDY.parent / "RESULTS.md").read_text() == report(committed)
    # Paths are relative to the output folder, in every part of the file.
    text = (out / "results.json").read_text()
    assert str(out) not in text and "/tmp/" not in text


def test_sparsities_and_rewards_are_recomputed_from_the_checkpoints(
    study: tuple[Path, dict],
) -> None:
    out, res = study
    base = _tensors(out / res["base"]["path"])
    problems = _problems(res)
    kinds = {r["kind"] for r in res["runs"]}
    assert kinds == {"rl", "sft"} and len(res["runs"]) >= 10
    for run in res["runs"]:
        tuned = _tensors(out / run["path"])
        assert run["sparsity_exact"] == pytest.approx(
            _sparsity(_changed(base, tuned, criterion="exact")), abs=1e-12
        )
        assert run["sparsity_tol"] == pytest.approx(
            _sparsity(_changed(base, tuned, tol=1e-5)), abs=1e-12
        )
        got = [int(c) for c in run["reward_scores"]]
        assert len(got) == len(problems) and run["reward_after"] == pytest.approx(np.mean(got))
        # The interval holds the mean and has about the normal approximation's width.
        lo, hi = run["reward_ci95"]
        p = np.mean(got)
        assert lo <= p <= hi
        if 0 < p < 1:
            half = 1.96 * np.sqrt(p * (1 - p) / len(got))
            assert (hi - lo) / 2 == pytest.approx(half, rel=0.3)
    for name in ("rl-seed1", "sft-10-seed1"):
        run = next(r for r in res["runs"] if r["name"] == name)
        assert run["reward_after"] == pytest.approx(_reward(out / run["path"], problems))
    assert res["base"]["accuracy"] == pytest.approx(_reward(out / res["base"]["path"], problems))
    # Provenance travels in the checkpoints' metadata.
    with safe_open(str(out / res["runs"][0]["path"] / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["script"] == "examples/finding1/study.py" and meta["kind"] == "rl"


def _kl(folder: Path, base: Path, problems: list[tuple[str, str]]) -> float:
    """KL(tuned || base) at the answer positions, one problem at a time, in float64."""
    from transformers import LlamaForCausalLM

    vocab = _study_module().VOCAB
    tuned = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ref = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in problems:
            ids = [vocab["<bos>"]] + [vocab[c] for c in prompt + answer] + [vocab["<eos>"]]
            x = torch.tensor([ids])
            p = tuned(x).logits[0].double().log_softmax(-1)
            q = ref(x).logits[0].double().log_softmax(-1)
            first = len(prompt)  # the position of '=' (after <bos>, the prompt's last char)
            for t in range(first, len(ids) - 1):
                total += float((p[t].exp() * (p[t] - q[t])).sum())
                count += 1
    return total / count


def test_kl_displacement_and_the_null_are_recomputed(study: tuple[Path, dict]) -> None:
    out, res = study
    runs = {r["name"]: r for r in res["runs"]}
    problems = _problems(res)
    for name in ("rl-seed1", "sft-20-seed1"):
        run = runs[name]
        want = _kl(out / run["path"], out / res["base"]["path"], problems)
        assert run["kl_from_base"] == pytest.approx(want, rel=1e-3, abs=1e-9)
    base = _tensors(out / res["base"]["path"])
    for name in ("rl-seed1", "rl-seed2"):
        run = runs[name]
        master = _tensors(out / run["master"])
        b = {n: values(*base[n]).astype(np.float64) for n in base}
        m = {n: values(*master[n]).astype(np.float64) for n in master}
        # Median |update| (the inverted-CDF quantile in float32), to bf16 resolution below.
        u = np.concatenate([np.abs(m[n] - b[n]) for n in b]).astype(np.float32)
        exact = np.quantile(u, 0.5, method="inverted_cdf")
        assert exact * (1 - 2**-7) <= run["median_abs_update"] <= exact
        # The null by Monte Carlo: each tensor's updates placed by random permutations,
        # rounded by torch (f64 -> f32 -> bf16), judged by the oracle's criterion.
        rng = np.random.default_rng(0)
        k, draws, numel = 16, [], 0
        for _ in range(k):
            changed_total = 0
            for n in b:
                upd = (m[n] - b[n])[rng.permutation(b[n].size)]
                r = torch.from_numpy(b[n] + upd).float().bfloat16()
                bits = r.view(torch.int16).numpy().view(np.uint16)
                changed_total += int(changed("BF16", base[n][1], "BF16", bits, tol=1e-5).sum())
            draws.append(changed_total)
        numel = sum(x.size for x in b.values())
        mc = 1 - np.mean(draws) / numel
        stderr = np.std(draws, ddof=1) / np.sqrt(k) / numel
        assert abs(run["null_sparsity"] - mc) <= 4 * stderr + 1e-6, (name, mc, stderr)
        # Per binade, the observed counts are the lens's, and the null sums to its total.
        bins = run["null_by_binade"]
        assert sum(x["numel"] for x in bins) == numel
        predicted = sum(x["predicted_changed"] for x in bins)
        assert 1 - predicted / numel == pytest.approx(run["null_sparsity"])


def test_comparisons_overlaps_and_the_seed_excess_are_recomputed(study: tuple[Path, dict]) -> None:
    out, res = study
    runs = {r["name"]: r for r in res["runs"]}
    tr = res["training"]
    rl = [runs[f"rl-seed{s}"] for s in tr["rl"]["seeds"]]
    assert len(rl) >= 3

    def group(steps: int) -> list[dict]:
        return [runs[f"sft-{steps}-seed{s}"] for s in tr["sft"]["seeds"]]

    for key, how in (("kl_from_base", "kl"), ("median_abs_update", "displacement")):
        want = np.log(np.mean([r[key] for r in rl]))
        best = min(
            tr["sft"]["steps"],
            key=lambda st: abs(np.log(np.mean([r[key] for r in group(st)])) - want),
        )
        assert res["matched_sft_steps"][how] == best
    for c in res["comparisons"]:
        g = group(res["matched_sft_steps"][c["match"]])
        d = np.mean([r["sparsity_tol"] for r in rl]) - np.mean([r["sparsity_tol"] for r in g])
        assert c["sparsity_diff"] == pytest.approx(d)
        assert c["ci95"][0] <= c["sparsity_diff"] <= c["ci95"][1]
    base = _tensors(out / res["base"]["path"])
    masks = {r["name"]: _changed(base, _tensors(out / r["path"]), tol=1e-5) for r in rl}
    sft_name = f"sft-{res['matched_sft_steps']['kl']}-seed1"
    masks[sft_name] = _changed(base, _tensors(out / runs[sft_name]["path"]), tol=1e-5)
    numel = sum(x.size for x in masks["rl-seed1"].values())
    binades = {n: binade(base[n][0], base[n][1]) for n in base}

    def figures(a: dict, b: dict) -> dict[str, float]:
        size_a = sum(int(x.sum()) for x in a.values())
        size_b = sum(int(x.sum()) for x in b.values())
        inter = sum(int((a[n] & b[n]).sum()) for n in a)
        expected = 0.0
        for n, e in binades.items():
            for bin_ in np.unique(e):
                sel = e == bin_
                expected += a[n][sel].sum() * b[n][sel].sum() / sel.sum()
        return {
            "o1": inter / size_a,
            "o1_random": size_b / numel,
            "o1_matched": expected / size_a,
            "o2_matched": expected / size_b,
        }

    for o in res["overlaps"]:
        for key, value in figures(masks[o["a"]], masks[o["b"]]).items():
            assert o[key] == pytest.approx(value), (o["a"], o["b"], key)
    excess = [
        figures(masks[a["name"]], masks[b["name"]])
        for a in rl
        for b in rl
        if a["name"] != b["name"]
    ]
    ex = res["seed_overlap_excess"]
    assert ex["pairs"] == len(excess)
    assert ex["mean"] == pytest.approx(np.mean([f["o1"] - f["o1_matched"] for f in excess]))
    assert ex["over_random"]["mean"] == pytest.approx(
        np.mean([f["o1"] - f["o1_random"] for f in excess])
    )
    assert ex["ci95"][0] <= ex["mean"] <= ex["ci95"][1]


def test_rank_trajectory_and_conjecture1_are_recomputed(study: tuple[Path, dict]) -> None:
    out, res = study
    runs = {r["name"]: r for r in res["runs"]}
    base = _tensors(out / res["base"]["path"])
    seed1 = _tensors(out / runs["rl-seed1"]["path"])
    # Rank of the update, per 2-D weight, by numpy.
    fractions, stable = [], []
    for n, (dt, bits) in base.items():
        shape = _shape(out / res["base"]["path"], n)
        if len(shape) != 2:
            continue
        d = (values(*seed1[n]).astype(np.float64) - values(dt, bits).astype(np.float64)).reshape(
            shape
        )
        s = np.linalg.svd(d, compute_uv=False)
        k = min(shape)
        fractions.append(np.linalg.matrix_rank(d) / k)
        stable.append((s**2).sum() / s[0] ** 2 / k if s[0] > 0 else 0.0)
    assert res["rank"]["matrices"] == len(fractions)
    assert res["rank"]["rank_fraction"] == pytest.approx(np.mean(fractions))
    assert res["rank"]["stable_rank_fraction"] == pytest.approx(np.mean(stable))
    # The trajectory of seed 1's run, from its intermediate checkpoints.
    run = (out / runs["rl-seed1"]["path"]).parent
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    steps = [_tensors(c) for c in ckpts]
    vs = [_changed(base, s, tol=1e-5) for s in steps]
    got = res["trajectory"]
    assert [c["step"] for c in got["checkpoints"]] == [int(c.name.split("-")[1]) for c in ckpts]
    assert [c["path"] for c in got["checkpoints"]] == [str(c.relative_to(out)) for c in ckpts]
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
    # Conjecture 1: every mask's run against the full run, within the full run's changes; and
    # outside its mask, each run left every element at the base's bits.
    full_changed = _changed(base, seed1, criterion="exact")
    n_changed = sum(int(x.sum()) for x in full_changed.values())
    full_scores = np.array([int(c) for c in runs["rl-seed1"]["reward_scores"]])
    kinds = [c["mask"] for c in res["conjecture1"]]
    assert kinds == ["full", "subnetwork", "uniform", "matched"]
    for c in res["conjecture1"]:
        tuned = _tensors(out / runs[c["run"]]["path"])
        same = {n: tuned[n][1] == seed1[n][1] for n in base}
        within = sum(int((full_changed[n] & same[n]).sum()) for n in base)
        assert c["identical_within_changed"] == pytest.approx(within / n_changed)
        got = np.array([int(x) for x in runs[c["run"]]["reward_scores"]])
        assert c["reward_diff_vs_full"] == pytest.approx((got - full_scores).mean())
        if c["mask_path"] is None:
            continue
        mask = rlmask.load_mask(out / c["mask_path"])
        for n in base:
            frozen = ~np.asarray(mask[n]).reshape(-1)
            assert np.array_equal(tuned[n][1][frozen], base[n][1][frozen]), (c["mask"], n)
    # The subnetwork is seed 1's own mask; the controls keep its count in every tensor.
    sub = rlmask.load_mask(out / res["conjecture1"][1]["mask_path"])
    for c in res["conjecture1"][2:]:
        control = rlmask.load_mask(out / c["mask_path"])
        for n in sub.names:
            assert int(np.asarray(control[n]).sum()) == int(np.asarray(sub[n]).sum())


def _shape(folder: Path, name: str) -> list[int]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return list(f.get_slice(name).get_shape())


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
