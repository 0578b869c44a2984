"""Every plan row reproduces one diffusers DDPMScheduler.step / DDIMScheduler.step (the oracle) with injected noise.

Metric: max|ours - diffusers| / max|diffusers| over the output tensor (norm-wise, so elements near zero don't
dominate). Our row is evaluated with ddengine.core.reference.reference_step in float64; diffusers runs on float32
tensors. The plan computes alphas_cumprod in float64 from diffusers' float32 betas (a documented choice), so the
oracle scheduler gets the same float64 table (`torch.cumprod(1 - betas.double())`) and keeps its own step code;
test_float32_diffusers_agrees_loosely checks the unmodified float32 scheduler too.
"""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr  # noqa: E402

from ddengine.core.plan import make_plan  # noqa: E402
from ddengine.core.reference import reference_step  # noqa: E402
from ddengine.core.schedule import SchedulerConfig  # noqa: E402

TOL = 1e-5
STEPS = (1, 7, 50, 1000)
SPACINGS = (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0))
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TRAINED_BETAS = (np.linspace(0.0002, 0.025, 1000) ** 1.2).tolist()
SHAPE = (2, 3, 5, 4)


@pytest.fixture(scope="module")
def tensors():
    rng = np.random.default_rng(1234)
    x, m, z = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    m[0, 0] *= 4.0  # some x0 predictions land outside the clip range
    return x, m, z


@pytest.fixture
def ddpm_noise(monkeypatch, tensors):
    """DDPMScheduler draws its noise with randn_tensor: hand it our z instead."""
    z = tensors[2]
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.from_numpy(z.copy()).reshape(shape))


def schedule_kwargs(schedule):
    if schedule == "trained_betas":
        return {"trained_betas": TRAINED_BETAS}
    return {"beta_schedule": schedule}


def oracle(cls, float64_tables=True, zero_snr_betas=None, **kwargs):
    """A diffusers scheduler; with float64_tables its alphas_cumprod is the float64 product of its own betas."""
    sched = cls(**kwargs)
    if zero_snr_betas is not None:
        sched.betas = zero_snr_betas
    if float64_tables:
        sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), dim=0)
        sched.one = torch.tensor(1.0, dtype=torch.float64)
        if hasattr(sched, "final_alpha_cumprod"):
            sched.final_alpha_cumprod = sched.alphas_cumprod[0] if not sched.config.set_alpha_to_one else sched.one
    return sched


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def step_indices(n):
    return sorted({0, n // 2, n - 1})


def compare(plan, sched, tensors, label, failures, step_kwargs=None, tol=TOL):
    """Run the plan against diffusers' step at the first, middle and last index; record failing combinations."""
    x, m, z = tensors
    if not np.array_equal(plan.timesteps, sched.timesteps.numpy()):
        failures.append(f"{label}: timesteps differ")
        return
    if not np.isfinite(plan.coeffs).all():
        failures.append(f"{label}: non-finite coefficients")
    for i in step_indices(len(plan)):
        t = int(plan.timesteps[i])
        out = sched.step(torch.from_numpy(m), t, torch.from_numpy(x), **(step_kwargs or {})).prev_sample.numpy()
        ours = reference_step(x, m, plan.coeffs[i], z)
        err = rel_err(ours, out)
        if not err <= tol:
            failures.append(f"{label} step {i} (t={t}): rel err {err:.3g}")


def compare_ddim(kwargs, n, eta, use_clipped, tensors, label, failures):
    """One DDIM configuration, our plan against diffusers' DDIMScheduler.step with the same noise."""
    plan = make_plan(SchedulerConfig(**kwargs), n, method="ddim", eta=eta, use_clipped_model_output=use_clipped)
    sched = oracle(diffusers.DDIMScheduler, **kwargs)
    sched.set_timesteps(n)
    step_kwargs = dict(eta=eta, use_clipped_model_output=use_clipped, variance_noise=torch.from_numpy(tensors[2]))
    compare(plan, sched, tensors, label, failures, step_kwargs)


def check(failures, total):
    assert total > 0
    assert not failures, f"{len(failures)} of {total} combinations differ from diffusers, first: {failures[:8]}"


def test_ddpm_grid(tensors, ddpm_noise):
    failures, total = [], 0
    schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "trained_betas")
    variances = ("fixed_small", "fixed_small_log", "fixed_large")
    for schedule, pred, var, (spacing, offset), clip, n in itertools.product(
        schedules, PREDICTIONS, variances, SPACINGS, (True, False), STEPS
    ):
        if n == 1000 and offset:
            continue  # reaches t = 1000: see test_leading_offset_full_length_refused
        kwargs = dict(
            schedule_kwargs(schedule),
            prediction_type=pred,
            variance_type=var,
            timestep_spacing=spacing,
            steps_offset=offset,
            clip_sample=clip,
            clip_sample_range=1.5,
        )
        plan = make_plan(SchedulerConfig(**kwargs), n, method="ddpm")
        sched = oracle(diffusers.DDPMScheduler, **kwargs)
        sched.set_timesteps(n)
        compare(plan, sched, tensors, f"ddpm {kwargs} n={n}", failures)
        total += 1
    check(failures, total)


def test_ddim_grid(tensors):
    failures, total = [], 0
    schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas")
    for schedule, pred, eta, (spacing, offset), clip, n in itertools.product(
        schedules, PREDICTIONS, (0.0, 0.5, 1.0), SPACINGS, (True, False), STEPS
    ):
        if n == 1000 and offset:
            continue
        set_alpha_to_one = (n + offset) % 2 == 0  # both settings, spread over the grid
        use_clipped = clip and n == 7
        kwargs = dict(
            schedule_kwargs(schedule),
            prediction_type=pred,
            timestep_spacing=spacing,
            steps_offset=offset,
            clip_sample=clip,
            clip_sample_range=1.0,
            set_alpha_to_one=set_alpha_to_one,
        )
        compare_ddim(
            kwargs, n, eta, use_clipped, tensors, f"ddim eta={eta} clipped_eps={use_clipped} {kwargs} n={n}", failures
        )
        total += 1
    check(failures, total)


def test_ddim_use_clipped_model_output_all_predictions(tensors):
    failures, total = [], 0
    for pred, eta, n in itertools.product(PREDICTIONS, (0.0, 1.0), (1, 50)):
        kwargs = dict(prediction_type=pred, clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing")
        compare_ddim(kwargs, n, eta, True, tensors, f"ddim clipped eps {kwargs} eta={eta} n={n}", failures)
        total += 1
    check(failures, total)


def test_ddim_sigmoid_schedule(tensors):
    """diffusers' DDIMScheduler lacks `sigmoid`; feed it DDPMScheduler's sigmoid betas as trained_betas."""
    betas = diffusers.DDPMScheduler(beta_schedule="sigmoid").betas.numpy().tolist()
    failures, total = [], 0
    for pred, n in itertools.product(PREDICTIONS, STEPS):
        plan = make_plan(SchedulerConfig(beta_schedule="sigmoid", prediction_type=pred), n, eta=0.5)
        sched = oracle(diffusers.DDIMScheduler, trained_betas=betas, prediction_type=pred)
        sched.set_timesteps(n)
        compare(
            plan,
            sched,
            tensors,
            f"ddim sigmoid {pred} n={n}",
            failures,
            dict(eta=0.5, variance_noise=torch.from_numpy(tensors[2])),
        )
        total += 1
    check(failures, total)


def test_zero_snr_v_prediction(tensors, ddpm_noise):
    """Zero terminal SNR: the oracle's betas are diffusers' rescale run in float64 on its own float32 betas."""
    failures, total = [], 0
    for schedule, (spacing, offset), n in itertools.product(
        ("linear", "scaled_linear", "squaredcos_cap_v2"), SPACINGS, STEPS
    ):
        if n == 1000 and offset:
            continue
        kwargs = dict(
            beta_schedule=schedule,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing=spacing,
            steps_offset=offset,
            clip_sample=False,
        )
        betas = rescale_zero_terminal_snr(diffusers.DDPMScheduler(beta_schedule=schedule).betas.double()).float()
        cfg = SchedulerConfig(**kwargs)
        assert cfg.alphas_cumprod()[-1] == 0.0
        ddpm = oracle(diffusers.DDPMScheduler, zero_snr_betas=betas, **kwargs)
        ddpm.set_timesteps(n)
        compare(make_plan(cfg, n, method="ddpm"), ddpm, tensors, f"ddpm zero-snr {kwargs} n={n}", failures)
        ddim = oracle(diffusers.DDIMScheduler, zero_snr_betas=betas, **kwargs)
        ddim.set_timesteps(n)
        compare(
            make_plan(cfg, n, eta=1.0),
            ddim,
            tensors,
            f"ddim zero-snr {kwargs} n={n}",
            failures,
            dict(eta=1.0, variance_noise=torch.from_numpy(tensors[2])),
        )
        total += 2
    check(failures, total)


def test_zero_snr_epsilon_allowed_when_last_timestep_not_visited(tensors):
    kwargs = dict(rescale_betas_zero_snr=True, timestep_spacing="leading")
    betas = rescale_zero_terminal_snr(diffusers.DDIMScheduler().betas.double()).float()
    sched = oracle(diffusers.DDIMScheduler, zero_snr_betas=betas, **kwargs)
    sched.set_timesteps(50)
    failures = []
    compare(
        make_plan(SchedulerConfig(**kwargs), 50),
        sched,
        tensors,
        "ddim zero-snr epsilon leading",
        failures,
        dict(eta=0.0),
    )
    check(failures, 1)


def test_explicit_ddpm_timesteps(tensors, ddpm_noise):
    failures, total = [], 0
    for timesteps in ([999, 800, 500, 120, 3, 0], [600, 599, 1], [0], [999]):
        for var in ("fixed_small", "fixed_large"):
            kwargs = dict(variance_type=var, prediction_type="epsilon")
            plan = make_plan(SchedulerConfig(**kwargs), method="ddpm", timesteps=timesteps)
            sched = oracle(diffusers.DDPMScheduler, **kwargs)
            sched.set_timesteps(timesteps=timesteps)
            compare(plan, sched, tensors, f"ddpm timesteps={timesteps} {var}", failures)
            total += 1
    check(failures, total)


def test_float32_diffusers_agrees_loosely(tensors, ddpm_noise):
    """The unmodified float32 diffusers scheduler differs from the float64 plan only by float32 rounding.

    The bound is loose (1e-3) because float32 `1 - alphas_cumprod[t]` keeps only ~3 digits at t = 1 (where it is
    ~2e-4); e.g. DDIM `sample` prediction divides by its square root (measured 5e-4 at t = 1, below 3e-5 elsewhere).
    """
    failures, total = [], 0
    for schedule, pred, (spacing, offset), n in itertools.product(
        ("linear", "scaled_linear", "squaredcos_cap_v2"), PREDICTIONS, SPACINGS, (1, 7, 50, 999)
    ):
        kwargs = dict(beta_schedule=schedule, prediction_type=pred, timestep_spacing=spacing, steps_offset=offset)
        cfg = SchedulerConfig(**kwargs)
        for cls, plan, step_kwargs in (
            (diffusers.DDPMScheduler, make_plan(cfg, n, method="ddpm"), None),
            (
                diffusers.DDIMScheduler,
                make_plan(cfg, n, eta=1.0),
                dict(eta=1.0, variance_noise=torch.from_numpy(tensors[2])),
            ),
        ):
            sched = oracle(cls, float64_tables=False, **kwargs)
            sched.set_timesteps(n)
            compare(plan, sched, tensors, f"{cls.__name__} float32 {kwargs} n={n}", failures, step_kwargs, tol=1e-3)
            total += 1
    check(failures, total)


def test_ddpm_noise_only_while_t_positive():
    """diffusers draws noise iff the current timestep t > 0 (trailing ends at t=19: sigma = sqrt(1e-20))."""
    leading = make_plan(SchedulerConfig(), 50, method="ddpm")
    assert leading.timesteps[-1] == 0 and leading.coeffs[-1, 8] == 0.0 and (leading.coeffs[:-1, 8] > 0).all()
    trailing = make_plan(SchedulerConfig(timestep_spacing="trailing"), 50, method="ddpm")
    assert trailing.timesteps[-1] == 19 and trailing.coeffs[-1, 8] == pytest.approx(1e-10, rel=1e-9)


def test_ddim_eta_zero_has_no_noise_term():
    plan = make_plan(SchedulerConfig(), 50, eta=0.0)
    assert (plan.coeffs[:, 8] == 0).all()


def test_leading_offset_full_length_refused():
    """leading + steps_offset=1 at n = T reaches t = T; diffusers indexes alphas_cumprod out of range (#10003)."""
    sched = diffusers.DDIMScheduler(steps_offset=1)
    sched.set_timesteps(1000)
    with pytest.raises(IndexError):
        sched.step(torch.zeros(1), 1000, torch.zeros(1))
    for method in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match=r"timestep 1000 is outside the trained range \[0, 999\]"):
            make_plan(SchedulerConfig(steps_offset=1), 1000, method=method)


def test_other_train_lengths(tensors, ddpm_noise):
    failures, total = [], 0
    for T, n, (spacing, offset), pred in itertools.product((10, 250), (1, 3, 10), SPACINGS, PREDICTIONS):
        kwargs = dict(
            num_train_timesteps=T,
            beta_schedule="squaredcos_cap_v2",
            prediction_type=pred,
            timestep_spacing=spacing,
            steps_offset=offset,
        )
        cfg = SchedulerConfig(**kwargs)
        if n == T and offset:
            continue
        for cls, plan, step_kwargs in (
            (diffusers.DDPMScheduler, make_plan(cfg, n, method="ddpm"), None),
            (
                diffusers.DDIMScheduler,
                make_plan(cfg, n, eta=0.5),
                dict(eta=0.5, variance_noise=torch.from_numpy(tensors[2])),
            ),
        ):
            sched = oracle(cls, **kwargs)
            sched.set_timesteps(n)
            compare(plan, sched, tensors, f"{cls.__name__} {kwargs} n={n}", failures, step_kwargs)
            total += 1
    check(failures, total)
