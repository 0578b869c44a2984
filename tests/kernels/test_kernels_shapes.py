"""The specialised multistep bodies (kernels/step.h dd_shape, docs/math.md "Specialised bodies") against the general
program: the oracle is kernels/step_host.c built with -DDD_GENERAL_BODY, whose multistep rows all run dd_step_terms.

Contract: x' bit-identical wherever the general x' is finite (signed zeros included), non-finite exactly where the
general x' is, the same nonfinite_step; the slots and x0_out identical up to the payload of a NaN."""

import numpy as np
import pytest

from ddengine.core.plan import METHODS, make_plan
from ddengine.core.rows import (
    CLIP,
    NUM_COLUMNS,
    PH0,
    PS,
    Q0,
    SH0,
    SIGMA,
    SL,
    SLOTS,
    SX,
    WRITE_D,
    WRITE_S,
    is_multistep,
)
from ddengine.kernels import _step
from ddengine.kernels.host import image_records
from tests.kernels.kernel_builds import build_and_load

MULTISTEP_METHODS = [m for m in METHODS if any(is_multistep(r) for r in make_plan({}, 6, method=m).coeffs)]
PER_IMAGE = 2053  # one 2048-element block and a partial one


@pytest.fixture(scope="module")
def general(tmp_path_factory):
    """The oracle build: the general multistep body, portable (no ISA clones: those agree, test_kernels_isa.py)."""
    module = build_and_load(tmp_path_factory.mktemp("general"), ["-DDD_GENERAL_BODY", "-DDD_NO_CLONES"])
    assert module.row_shape(make_plan({}, 6, method="unipc").rows_float32()[1])["general_body"] == 1
    return module


def solver_tables():
    """(name, float32 table) of every multistep method on a few schedules, prediction types, clips and step counts."""
    configs = [
        {"prediction_type": "epsilon"},
        {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"},
        {"prediction_type": "epsilon", "clip_sample": True, "beta_schedule": "scaled_linear"},
    ]
    for method in MULTISTEP_METHODS:
        for i, config in enumerate(configs):
            for steps in (4, 13):
                yield f"{method}-{i}-{steps}", make_plan({"num_train_timesteps": 1000, **config}, steps, method=method)


def signed_zeros(rng, a, share):
    """a with a `share` of its entries set to +0.0 or -0.0."""
    mask = rng.random(a.shape) < share
    a[mask] = np.where(rng.random(int(mask.sum())) < 0.5, np.float32(0.0), np.float32(-0.0))
    return a


def only_zeros(rng, arrays):
    """Every entry of the arrays ±0: element i (the last axis) is +0 in all of them, -0 in all, or of random signs,
    a third of the elements each, so that the terms of an element are often zeros of one sign."""
    pattern = rng.integers(0, 3, arrays[0].shape[-1])
    for a in arrays:
        negative = np.where(pattern == 2, True, np.where(pattern == 1, False, rng.random(a.shape) < 0.5))
        a[...] = np.where(negative, np.float32(-0.0), np.float32(0.0))
    return arrays


def random_inputs(rng, batch, guided, zero_share=0.05, zeros=False):
    """x, model_out (own rows, then the guided images' unconditional rows), slots, images (guidance 3.5 where guided);
    with `zeros`, every input ±0 (only_zeros)."""
    rows = batch + int(np.sum(guided))
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in [(batch, PER_IMAGE), (rows, PER_IMAGE)]]
    arrays.append(rng.standard_normal((batch, SLOTS, PER_IMAGE)).astype(np.float32))
    x, model_out, slots = only_zeros(rng, arrays) if zeros else [signed_zeros(rng, a, zero_share) for a in arrays]
    images = image_records(rng.integers(0, 2**63, batch, dtype=np.uint64))
    images["uncond"] = np.where(guided, batch + np.cumsum(guided) - 1, -1)
    images["guidance"] = np.where(guided, 3.5, 0.0)
    return x, model_out, slots, images


def run_both(general, table, x, model_out, slots, images, keep_x0=False, threads=1):
    """One step on copies of the inputs with the installed (shaped) and the general build: {name: outputs}."""
    out = {}
    for name, k in (("shaped", _step), ("general", general)):
        y, s, im = x.copy(), slots.copy(), images.copy()
        x0 = np.zeros_like(x) if keep_x0 else None
        k.step(y, model_out, table, im, slots=s, x0_out=x0, threads=threads)
        out[name] = {"x": y, "slots": s, "x0": x0, "nonfinite_step": im["nonfinite_step"]}
    return out["shaped"], out["general"]


def same_bits_or_both_nan(a, b):
    """Bitwise equal, a NaN matching any NaN."""
    return np.array_equal(a.view(np.uint32), b.view(np.uint32)) or bool(
        np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b)))
    )


def assert_same(shaped, general, what):
    """The contract: finite x' bit for bit, non-finite in the same places; slots and x0 bitwise but for NaN payloads."""
    x, ref = shaped["x"], general["x"]
    assert np.array_equal(np.isfinite(x), np.isfinite(ref)), what
    finite = np.isfinite(ref)
    assert np.array_equal(x[finite].view(np.uint32), ref[finite].view(np.uint32)), what
    assert same_bits_or_both_nan(shaped["slots"], general["slots"]), what
    if general["x0"] is not None:
        assert same_bits_or_both_nan(shaped["x0"], general["x0"]), what
    assert np.array_equal(shaped["nonfinite_step"], general["nonfinite_step"]), what


def test_every_solver_row_runs_a_specialised_body():
    for name, plan in solver_tables():
        method = name.rsplit("-", 2)[0]
        for i, row in enumerate(plan.rows_float32()):
            shape = _step.row_shape(row)
            reads = [k for k in range(3) if row[SH0 + k] != 0 or row[PH0 + k] != 0]
            assert shape["nh"] == len(reads) and list(shape["slots"]) == reads, (name, i)
            if method.startswith("dpmpp") or (method == "plms" and i >= 2):
                assert shape["has_s"] == 0 and shape["kpe"] == 0, (name, i, shape)
            if method == "unipc":
                assert shape["has_s"] == 1 and shape["kp0"] + shape["kpx"] + shape["kpe"] == 0, (name, i, shape)
            general = _step.row_shape(row, keep_x0=True)  # x0_out runs the general shape
            assert general["nh"] == 3 and general["has_s"] and general["kp0"] and general["zy"] == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_solver_rows_match_the_general_body_bit_for_bit(general, threads):
    rng = np.random.default_rng(threads)
    for name, plan in solver_tables():
        table = plan.rows_float32()
        batch = len(table)  # every row of the plan at once, half of them guided
        x, model_out, slots, images = random_inputs(rng, batch, rng.random(batch) < 0.5)
        images["row"] = np.arange(batch)
        assert_same(*run_both(general, table, x, model_out, slots, images, threads=threads), name)


@pytest.mark.parametrize("keep_x0", [False, True])
def test_solver_rows_on_signed_zeros_match_the_general_body(general, keep_x0):
    """Inputs of ±0 only: every term is a zero, so x', d and s are zeros, the sign of each fixed by the terms dropped."""
    rng = np.random.default_rng(17)
    for name, plan in solver_tables():
        table = plan.rows_float32()
        x, model_out, slots, images = random_inputs(rng, len(table), rng.random(len(table)) < 0.5, zeros=True)
        images["row"] = np.arange(len(table))
        shaped, ref = run_both(general, table, x, model_out, slots, images, keep_x0=keep_x0)
        assert_same(shaped, ref, name)


def random_table(rng, rows=48):
    """Random multistep rows of every shape: with s or without (every s column 0), each H slot read or not, p0, px,
    pe or any other coefficient 0 at times; every zero +0 or -0 at random; random writes; some rows noisy, clipped."""
    table = rng.uniform(-1.5, 1.5, (rows, NUM_COLUMNS)).astype(np.float32)
    table[:, :WRITE_D] *= rng.random((rows, WRITE_D)) >= 0.25  # any coefficient may be 0
    table[:, SIGMA] = np.where(rng.random(rows) < 0.2, 0.6, 0.0)
    table[:, CLIP] = np.where(rng.random(rows) < 0.3, 1.0, 0.0)
    no_s = rng.random(rows) < 0.5
    table[no_s, SX : SH0 + 3] = 0.0
    table[no_s, PS] = 0.0
    unread = rng.random((rows, 3)) < 0.4
    for k in range(3):
        table[unread[:, k], SH0 + k] = 0.0
        table[unread[:, k], PH0 + k] = 0.0
    table[(table == 0) & (rng.random(table.shape) < 0.5)] = -0.0
    table[:, WRITE_D] = rng.integers(-1, 3, rows)
    table[:, WRITE_S] = np.where(no_s, 0, rng.integers(0, 2, rows))
    table[0, Q0:WRITE_D], table[0, WRITE_D], table[0, WRITE_S] = 0.0, 0.0, 0.0  # a row that only writes H0
    return table


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("keep_x0", [False, True])
def test_random_rows_of_every_shape_match_the_general_body(general, zeros, keep_x0):
    rng = np.random.default_rng([zeros, keep_x0])
    shapes = set()
    for trial in range(24):
        table = random_table(rng)
        shapes |= {tuple(sorted(_step.row_shape(r).items())) for r in table if _step.row_shape(r) is not None}
        batch = len(table)
        x, model_out, slots, images = random_inputs(rng, batch, rng.random(batch) < 0.5, zeros=zeros)
        images["row"] = np.arange(batch)
        shaped, ref = run_both(general, table, x, model_out, slots, images, keep_x0=keep_x0, threads=1 + trial % 2)
        assert_same(shaped, ref, trial)
        if zeros:  # both zeros come out: the -0 of x' where every term is -0, +0 where one is +0
            assert np.signbit(ref["x"]).any() and (~np.signbit(ref["x"])).any()
    assert len(shapes) >= 10  # many of the bodies were exercised


def test_the_dropped_zeros_sum_to_the_general_bodys_zero(general):
    """Rows of positive coefficients and zeros on inputs all -0 (or all +0): every term is a zero whose sign the row
    fixes, so x' is -0 exactly where all of them are; the zeros of sl, ps, sh_k, ph_k (those the shape reasons about)
    are +0 or -0 evenly, the others +0 (times -0: -0), so that every case of the sign analysis occurs."""
    rng = np.random.default_rng(23)
    table = np.abs(random_table(rng, rows=3000))
    analysed = np.zeros(NUM_COLUMNS, bool)
    analysed[[SL, PS, SH0, SH0 + 1, SH0 + 2, PH0, PH0 + 1, PH0 + 2]] = True
    negative = analysed & (rng.random(table.shape) < 0.5)
    table[:, :WRITE_D] = np.where((table[:, :WRITE_D] == 0) & negative[:, :WRITE_D], -0.0, table[:, :WRITE_D])
    table[:, SIGMA] = 0.0
    batch, n = len(table), 16
    x = np.where(np.arange(n) < n // 2, np.float32(-0.0), np.float32(0.0)) * np.ones((batch, 1), np.float32)
    slots = np.repeat(x[:, None, :], SLOTS, axis=1)
    images = image_records(np.arange(batch, dtype=np.uint64))
    images["row"] = np.arange(batch)
    outs = []
    for module in (_step, general):
        y, s = x.copy(), slots.copy()
        module.step(y, x.copy(), table, images.copy(), slots=s)
        outs.append((y, s))
    (y, s), (ref, ref_s) = outs
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(s.view(np.uint32), ref_s.view(np.uint32))
    assert 0.05 < np.signbit(ref).mean() < 0.95  # both signs of zero came out


def non_finite(rng, a, share):
    """a with a `share` of its entries NaN, +inf or -inf."""
    mask = rng.random(a.shape) < share
    a[mask] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), int(mask.sum()))
    return a


@pytest.mark.parametrize("source", ["x", "model_out", "slots", "overflow"])
def test_non_finite_inputs_behave_as_in_the_general_body(general, source):
    """NaN / inf in x, the model outputs or the slots, or finite inputs whose terms overflow: x' non-finite exactly
    where the general body's is, the same nonfinite_step, the same slots but for NaN payloads."""
    rng = np.random.default_rng(len(source))
    tables = [plan.rows_float32() for _, plan in solver_tables()] + [random_table(rng) for _ in range(3)]
    for table in tables:
        batch = len(table)
        x, model_out, slots, images = random_inputs(rng, batch, rng.random(batch) < 0.5)
        images["row"], images["step"] = np.arange(batch), 5
        if source == "overflow":
            for a in (x, model_out, slots):
                big = rng.random(a.shape) < 0.01
                a[big] = np.copysign(np.float32(3e38), a[big])
        else:
            non_finite(rng, {"x": x, "model_out": model_out, "slots": slots}[source], 0.001)
        shaped, ref = run_both(general, table, x, model_out, slots, images)
        assert_same(shaped, ref, source)
        assert (ref["nonfinite_step"] == 5).any()
