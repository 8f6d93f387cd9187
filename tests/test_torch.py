"""Masked training and the update tracker: frozen elements stay bit-identical for every
optimizer form; tracker figures agree with saved parameter copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import rlmask
from rlmask.torch import UpdateTracker, attach_mask, canonical_name, pack_bits, unpack_bits

OPTIMIZERS: list[tuple[str, type, dict[str, Any]]] = []
for impl in ({}, {"foreach": True}, {"fused": True}):
    tag = next(iter(impl), "default")
    OPTIMIZERS += [
        (
            f"sgd-{tag}",
            torch.optim.SGD,
            {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, **impl},
        ),
        (f"adam-{tag}", torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.01, **impl}),
        (f"adamw-{tag}", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, **impl}),
    ]


def _model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(
        dtype
    )


def _random_mask(model: torch.nn.Module, density: float, seed: int = 1) -> rlmask.Mask:
    g = torch.Generator().manual_seed(seed)
    return rlmask.Mask.from_dict(
        {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}
    )


def _train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    accum: int = 2,
    clip: float | None = 0.5,
    seed: int = 2,
) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randn(4, 16, generator=g).to(dtype)
            loss = model(x).float().square().mean() / accum
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,cls,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_frozen_elements_stay_bit_identical(
    name: str, cls: type, kw: dict[str, Any], dtype: torch.dtype
) -> None:
    model = _model(dtype)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = _random_mask(model, 0.3)
    opt = cls(model.parameters(), **kw)
    handle = attach_mask(model, mask, opt)
    _train(model, opt, steps=30)
    moved = 0
    for n, p in model.named_parameters():
        keep = torch.from_numpy(mask[n])
        same = _bits(p.detach()) == _bits(init[n])
        assert bool(same[~keep].all()), f"{name}: a frozen element of {n} moved"
        moved += int((~same[keep]).sum())
    assert moved > 0.5 * mask.count  # the subnetwork trains
    # Weight decay is back in its place after every step.
    assert all(g["weight_decay"] == kw["weight_decay"] for g in opt.param_groups)
    handle.remove()
    _train(model, opt, steps=3)
    frozen_moved = sum(
        int((_bits(p.detach()) != _bits(init[n]))[~torch.from_numpy(mask[n])].sum())
        for n, p in model.named_parameters()
    )
    assert frozen_moved > 0  # after remove(), ordinary training again


def test_gradients_are_masked_as_produced_and_clipping_sees_them() -> None:
    model = _model(torch.float32)
    mask = _random_mask(model, 0.4)
    x = torch.randn(8, 16)
    model(x).square().mean().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    handle = attach_mask(model, mask)
    model(x).square().mean().backward()
    masked_norm = 0.0
    for n, p in model.named_parameters():
        keep = torch.from_numpy(mask[n])
        assert torch.equal(p.grad, torch.where(keep, full[n], torch.zeros(())))
        masked_norm += float(full[n][keep].double().square().sum())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert float(norm) == pytest.approx(masked_norm**0.5, rel=1e-5)
    assert handle.mask_bytes == sum((p.numel() + 63) // 64 * 8 for p in model.parameters())
    handle.remove()


def test_name_map_and_errors() -> None:
    model = _model(torch.float32)
    mask = _random_mask(model, 0.5)
    prefixed = rlmask.Mask.from_dict({f"model.{n}": mask[n] for n in mask})
    with pytest.raises(rlmask.MaskError) as e:
        attach_mask(model, prefixed)
    assert "no mask entry (0.weight" in str(e.value) and "match no trainable" in str(e.value)
    attach_mask(model, prefixed, name_map={"": "model."}).remove()
    attach_mask(model, prefixed, name_map=lambda n: "model." + n).remove()
    assert canonical_name("module._fsdp_wrapped_module.layers.0._orig_mod.w") == "layers.0.w"
    wrong = rlmask.Mask.from_dict({n: np.ones(4, bool) if n == "0.bias" else mask[n] for n in mask})
    with pytest.raises(rlmask.MaskError, match="shape mismatch: '0.bias'"):
        attach_mask(model, wrong)


def test_a_mask_of_part_of_the_model_needs_an_explicit_choice() -> None:
    """An MLP-only style mask (the second Linear uncovered): refused with a hint that says the
    names match and the mask covers part of the model; "freeze" keeps the uncovered weights
    bit-identical, "train" trains them fully, the masked ones as the mask says either way."""
    model = _model(torch.float32)
    full = _random_mask(model, 0.3)
    part = rlmask.Mask.from_dict({n: full[n] for n in ("0.weight", "0.bias")})
    with pytest.raises(rlmask.MaskError) as e:
        attach_mask(model, part)
    msg = str(e.value)
    assert "2 trainable parameters have no mask entry (2.weight, 2.bias)" in msg
    assert "the names match" in msg and "uncovered='freeze'" in msg and "name_map" not in msg
    with pytest.raises(ValueError, match="uncovered must be"):
        attach_mask(model, part, uncovered="ignore")  # type: ignore[arg-type]

    for choice in ("freeze", "train"):
        model = _model(torch.float32)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        handle = attach_mask(model, part, opt, uncovered=choice)  # type: ignore[arg-type]
        assert (handle.frozen, handle.trained) == (
            (["2.weight", "2.bias"], []) if choice == "freeze" else ([], ["2.weight", "2.bias"])
        )
        _train(model, opt, steps=10)
        params = dict(model.named_parameters())
        for n in ("0.weight", "0.bias"):
            keep = torch.from_numpy(part[n])
            same = _bits(params[n].detach()) == _bits(init[n])
            assert bool(same[~keep].all()) and not bool(same[keep].all()), (choice, n)
        for n in ("2.weight", "2.bias"):
            same = _bits(params[n].detach()) == _bits(init[n])
            if choice == "freeze":
                assert bool(same.all()), n
            else:
                assert float((~same).float().mean()) > 0.9, n
        handle.remove()
    # Names that differ on both sides still point at name_map.
    shifted = rlmask.Mask.from_dict({f"model.{n}": full[n] for n in full})
    with pytest.raises(rlmask.MaskError, match="names differ .* pass name_map"):
        attach_mask(_model(torch.float32), shifted, uncovered="train")


def test_tied_parameters_are_handled_once() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    model = Tied()
    init = model.embed.weight.detach().clone()
    keep = torch.rand(10, 4) < 0.5
    mask = rlmask.Mask.from_dict({"embed.weight": keep, "head.weight": keep})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    handle = attach_mask(model, mask, opt)
    assert len(handle.params) == 1
    for _ in range(5):
        model(torch.arange(10)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.embed.weight.detach()[~keep], init[~keep])
    handle.remove()
    other = rlmask.Mask.from_dict({"embed.weight": keep, "head.weight": ~keep})
    with pytest.raises(rlmask.MaskError, match="different masks"):
        attach_mask(model, other)


def test_pack_unpack_round_trip() -> None:
    for n in (0, 1, 7, 8, 63, 64, 65, 1000):
        flags = torch.rand(n) < 0.5
        packed = pack_bits(flags)
        assert packed.numel() == (n + 63) // 64 * 8
        np.testing.assert_array_equal(
            packed.numpy(), rlmask.Mask.from_dict({"x": flags.numpy()}).packed("x")
        )
        assert torch.equal(unpack_bits(packed, n), flags)


def test_tracker_against_saved_copies(tmp_path: Any) -> None:
    model = _model(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    tol = 1e-3
    tracker = UpdateTracker(model, tol=tol, optimizer=opt)
    copies = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        x = torch.randn(4, 16, generator=g).to(torch.bfloat16)
        sign = -1 if step % 4 == 3 else 1  # some updates undo earlier ones
        (sign * model(x).float().mean()).backward()
        opt.step()
        opt.zero_grad()
        copies.append({n: p.detach().clone() for n, p in model.named_parameters()})
    r = tracker.report()
    names = list(copies[0])
    total = sum(copies[0][n].numel() for n in names)
    assert r.numel == total

    def changed(a: torch.Tensor, b: torch.Tensor, t: float | None) -> torch.Tensor:
        ex = _bits(a) != _bits(b)
        return ex if t is None else ex & ((a.float() - b.float()).abs() > t)

    for k, row in enumerate(r.steps.iter_rows(named=True), start=1):
        cur, prev, first = copies[k], copies[k - 1], copies[0]
        assert row["step"] == k
        assert row["changed_prev_exact"] == sum(
            int(changed(cur[n], prev[n], None).sum()) for n in names
        )
        assert row["changed_prev_tol"] == sum(
            int(changed(cur[n], prev[n], tol).sum()) for n in names
        )
        assert row["changed_start_tol"] == sum(
            int(changed(cur[n], first[n], tol).sum()) for n in names
        )
        assert row["fraction_start_exact"] == pytest.approx(
            sum(int(changed(cur[n], first[n], None).sum()) for n in names) / total
        )
    for exact, label in ((True, "exact"), (False, f"tol={tol:g}")):
        t = None if exact else tol
        ever = {n: torch.zeros_like(copies[0][n], dtype=torch.bool) for n in names}
        for k in range(1, len(copies)):
            for n in names:
                ref = copies[k - 1] if exact else copies[0]
                ever[n] |= changed(copies[k][n], ref[n], t)
        final = {n: changed(copies[-1][n], copies[0][n], t) for n in names}
        n_ever = sum(int(ever[n].sum()) for n in names)
        n_final = sum(int(final[n].sum()) for n in names)
        row = r.categories.filter(r.categories["criterion"] == label).row(0, named=True)
        assert row["never_changed"] == total - n_ever
        assert row["changed_at_end"] == n_final
        assert row["changed_then_returned"] == n_ever - n_final
        assert row["outside_final"] == pytest.approx((n_ever - n_final) / n_ever)
        m = tracker.final_mask(exact=exact)
        for n in names:
            np.testing.assert_array_equal(m[n], final[n].numpy())
            np.testing.assert_array_equal(
                tracker.ever_changed_mask(exact=exact)[n], ever[n].numpy()
            )
    assert r.categories["changed_then_returned"][0] > 0  # the sign flips made some return
    final, ever, returned = (rlmask.load_mask(p) for p in tracker.save_masks(tmp_path))
    row = r.categories.filter(r.categories["criterion"] == f"tol={tol:g}").row(0, named=True)
    assert (final.count, returned.count) == (row["changed_at_end"], row["changed_then_returned"])
    assert ever.count == final.count + returned.count and final.meta["what"] == "final"
    tracker.remove()


def test_trainer_callback_exact_and_clips_the_masked_gradient(tmp_path: Any) -> None:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from rlmask.integrations.transformers import MaskCallback

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = _random_mask(model, 0.2)
    mask.save(tmp_path / "m.rlmask")
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in ids]
    max_norm = 1e-3
    seen: list[float] = []

    class Check(TrainerCallback):  # type: ignore[misc]
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            norm2 = 0.0
            for n, p in kw["model"].named_parameters():
                keep = torch.from_numpy(mask[n])
                assert not bool(p.grad[~keep].any()), f"unmasked gradient in {n}"
                norm2 += float(p.grad.double().square().sum())
            seen.append(norm2**0.5)

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=max_norm,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        gradient_accumulation_steps=2,
    )
    callback = MaskCallback(tmp_path / "m.rlmask")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Check()])
    trainer.train()
    assert len(seen) == 6
    # Clipping scaled the masked gradient to max_grad_norm: the norm it clipped was the
    # masked one (an unmasked norm would have left the masked part below max_grad_norm).
    assert seen == pytest.approx([max_norm] * 6, rel=1e-3)
    moved = 0
    for n, p in model.named_parameters():
        keep = torch.from_numpy(mask[n])
        same = p.detach() == init[n]
        assert bool(same[~keep].all()), n
        moved += int((~same[keep]).sum())
    assert moved > 0
    assert callback.handle is None  # removed when training ended


# ---------------------------------------------------------------------------------------
# Issue 26 (single process): resumed optimizers, every torch.optim optimizer, masters,
# optimizers that would move frozen elements, packed masks checked at construction.


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        dtype
    )


def _mask_of(model: torch.nn.Module, seed: int = 1) -> rlmask.Mask:
    rng = np.random.default_rng(seed)
    return rlmask.Mask.from_dict(
        {n: rng.random(tuple(p.shape)) < 0.3 for n, p in model.named_parameters()}
    )


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g).to(dtype)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


def _frozen_and_trained(model, mask, before) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(frozen elements that moved, trained elements that moved), against the mask's bits
    unpacked by numpy."""
    moved_frozen = moved_trained = 0
    for name, p in model.named_parameters():
        keep = np.unpackbits(mask.packed(name), bitorder="little")[: p.numel()].astype(bool)
        moved = (p.detach().float() != before[name].float()).reshape(-1).numpy()
        moved_frozen += int((moved & ~keep).sum())
        moved_trained += int((moved & keep).sum())
    return moved_frozen, moved_trained


OPTIMIZERS = {
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "SGD nesterov wd": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "Adam amsgrad wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
    "AdamW wd foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=0.1),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "NAdam decoupled": lambda ps: torch.optim.NAdam(
        ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "RMSprop centered momentum": lambda ps: torch.optim.RMSprop(
        ps, lr=1e-3, momentum=0.9, centered=True, weight_decay=0.1
    ),
    "Rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-3),
    "Adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0, weight_decay=0.1),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=0.1),
    "Adafactor (torch)": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1),
    "Adafactor (transformers)": lambda ps: __import__(
        "transformers.optimization", fromlist=["Adafactor"]
    ).Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9),
}


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
@pytest.mark.parametrize("which", sorted(OPTIMIZERS))
def test_frozen_elements_never_move_with_any_optimizer(which: str, resumed: bool) -> None:
    model = _net()
    opt = OPTIMIZERS[which](list(model.parameters()))
    if resumed:  # a warm-up without the mask: momentum and moments now hold every element
        _train_steps(model, opt, 3, seed=5)
    mask = _mask_of(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = attach_mask(model, mask, opt)
    if resumed and which.split()[0] in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"):
        assert handle.zeroed_state > 0  # the momentum that would have pushed them
    _train_steps(model, opt, 10, seed=6)
    frozen_moved, trained_moved = _frozen_and_trained(model, mask, before)
    assert frozen_moved == 0, which
    assert trained_moved > 0.5 * sum(int(mask.counts()[n]) for n in before), which
    handle.remove()


def test_optimizers_that_move_frozen_elements_are_refused() -> None:
    for make in (
        lambda ps: torch.optim.ASGD(ps, lr=1e-2),
        lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2], lr=1e-2),
    ):
        model = _net()
        opt = make(list(model.parameters()))
        mask = _mask_of(model)
        with pytest.raises(rlmask.MaskError, match="would move frozen elements"):
            attach_mask(model, mask, opt)
    # Opted in: ASGD trains, and its shrink moves frozen elements, as the refusal said.
    model = _net()
    opt = torch.optim.ASGD(list(model.parameters()), lr=1e-2, lambd=1e-2)
    mask = _mask_of(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_mask(model, mask, opt, allow_moving_frozen=True)
    _train_steps(model, opt, 3, seed=2)
    assert _frozen_and_trained(model, mask, before)[0] > 0
    # A resumed LBFGS; transformers' Adafactor with weight decay.
    model = _net()
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    lbfgs.step(closure)
    with pytest.raises(rlmask.MaskError, match="LBFGS"):
        attach_mask(model, _mask_of(model), lbfgs)
    from transformers.optimization import Adafactor

    model = _net()
    ada = Adafactor(model.parameters(), lr=1e-2, relative_step=False, weight_decay=0.1)
    with pytest.raises(rlmask.MaskError, match="weight_decay=0"):
        attach_mask(model, _mask_of(model), ada)


def test_the_optimizer_must_hold_the_masked_parameters() -> None:
    model, other = _net(0), _net(1)
    opt = torch.optim.AdamW(other.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(rlmask.MaskError, match="does not hold parameter '0.weight'"):
        attach_mask(model, _mask_of(model), opt)


def test_fp32_masters_behind_a_bf16_model() -> None:
    """The usual mixed-precision layout: the optimizer steps fp32 masters, copied back into a
    bf16 model after each step. With masters= the frozen elements stay put in both."""
    model = _net(dtype=torch.bfloat16)
    masters = {p: p.detach().float().clone().requires_grad_() for p in model.parameters()}
    opt = torch.optim.AdamW(list(masters.values()), lr=1e-2, weight_decay=0.1)
    mask = _mask_of(model)
    with pytest.raises(rlmask.MaskError, match="masters="):
        attach_mask(model, mask, opt)  # without the mapping: refused, naming the parameter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = attach_mask(model, mask, opt, masters=masters)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        model(torch.randn(8, 16, generator=g).bfloat16()).float().pow(2).mean().backward()
        for p, m in masters.items():
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, m in masters.items():
                p.copy_(m)
    frozen_moved, trained_moved = _frozen_and_trained(model, mask, before)
    assert frozen_moved == 0 and trained_moved > 0
    handle.remove()


def test_packed_masks_are_checked_at_construction() -> None:
    bits = np.random.default_rng(0).random(100) < 0.5
    packed = np.packbits(bits, bitorder="little")
    m = rlmask.Mask.from_packed({"w": ((10, 10), "F32", packed)})
    assert np.array_equal(m["w"].reshape(-1), bits)
    for bad, match in (
        (packed.reshape(1, -1), "1-D uint8"),
        (bits.astype(np.uint8), "is the array unpacked"),
        (packed.astype(np.int64), "1-D uint8"),
        (np.full(13, 255, np.uint8), "bits are set past"),
    ):
        with pytest.raises(rlmask.MaskError, match=match):
            rlmask.Mask.from_packed({"w": ((10, 10), "F32", bad)})
