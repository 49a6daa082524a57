"""How close a float tensor recomputed here must be to a committed fixture made on another machine.

The rule (docs/testing.md, "Floats against committed fixtures"; the numbers live in tests/fixture_tolerance.json,
which the Rust tests read too):
- integer tensors (token ids), and bytes made by integer arithmetic or copying, must be equal;
- a float tensor may differ by `ulps * eps(dtype) * max|want|`, where `ulps` is
  - `ulps_elementwise` for values that are one or two transcendentals per element (randn draws, normal_-initialised
    weights, schedule exponentials): each libm / SIMD kernel is within about an ulp of the exact value, and the
    factors they multiply (Box-Muller's radius, a weight's std) scale that to a few ulps of the tensor's magnitude;
  - `ulps_per_evaluation` times the number of chained graph evaluations (a text encoder, each transformer call, the
    VAE) for network outputs: their reductions sum in an order set by SIMD width, blocking and thread count, and
    their transcendentals (exp, tanh, erf) differ in the last bit between kernel paths, so each evaluation adds a
    few dozen ulps of its output's magnitude (measured, docs/testing.md); the errors of chained evaluations add up.
The magnitude, not each element, sets the scale: a small element may be the difference of large intermediates.

Every comparison is recorded; conftest.py prints the largest ones at the end of the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RULE = json.loads((Path(__file__).resolve().parents[2] / "tests" / "fixture_tolerance.json").read_text())
ELEMENTWISE = 0  # `evaluations` of a value computed element by element


@dataclass
class Comparison:
    what: str
    max_abs: float
    tolerance: float

    @property
    def share(self) -> float:
        """How much of the tolerance the difference used (0 = equal, 1 = at the limit)."""
        return self.max_abs / self.tolerance if self.tolerance else (0.0 if self.max_abs == 0 else float("inf"))


RECORDED: list[Comparison] = []


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def tolerance(want, evaluations: int = ELEMENTWISE) -> float:
    """The largest |got - want| the rule allows for `want` (float), computed with `evaluations` chained graph
    evaluations, or element by element (0)."""
    want = _numpy(want)
    ulps = RULE["ulps_elementwise"] if evaluations == ELEMENTWISE else RULE["ulps_per_evaluation"] * evaluations
    finite = want[np.isfinite(want)].astype(np.float64)
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    return ulps * float(np.finfo(want.dtype).eps) * scale


def assert_matches_fixture(what: str, got, want, evaluations: int = ELEMENTWISE) -> Comparison:
    """`got` (recomputed here) against `want` (committed): same dtype and shape; integers equal; floats within
    `tolerance(want, evaluations)`. Records the comparison and returns it."""
    got, want = _numpy(got), _numpy(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, fixture {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, fixture {want.shape}"
    if not np.issubdtype(want.dtype, np.floating):
        assert np.array_equal(got, want), f"{what}: integer values differ from the fixture"
        return Comparison(what, 0.0, 0.0)
    # Infinities (an attention mask's -inf) and NaN must sit at the same places with the same values.
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite), f"{what}: non-finite values at other places than the fixture's"
    assert np.array_equal(got[~finite], want[~finite], equal_nan=True), f"{what}: other non-finite values"
    g, w = got[finite].astype(np.float64), want[finite].astype(np.float64)
    diff = float(np.abs(g - w).max()) if w.size else 0.0
    c = Comparison(what, diff, tolerance(want, evaluations))
    RECORDED.append(c)
    assert diff <= c.tolerance, \
        f"{what}: max abs diff {diff:.3e} > {c.tolerance:.3e} (docs/testing.md, evaluations={evaluations})"
    return c


def golden_evaluations(key: str) -> int:
    """The chained graph evaluations behind a golden tensor that is not stacked per step (see
    `assert_golden_matches`): the text encoders' and the VAE encoder's outputs are one evaluation, values derived
    from them by elementwise arithmetic too; noise, schedules and preprocessed pixels none."""
    if key in ("noise", "noise_packed", "posterior_eps", "sigmas", "timesteps", "sigmas_full", "timesteps_full",
               "init_image"):
        return ELEMENTWISE
    if key.removeprefix("negative_") in ("prompt_embeds", "pooled_prompt_embeds") or key in (
            "image_latent_mean", "image_latent_std", "image_latents_sample", "image_latents", "x_t", "x_t_packed"):
        return 1
    raise KeyError(f"no evaluation count for golden tensor {key!r}: add it to golden_evaluations")


# Golden tensors stacked over the steps ([steps, ...]): step k's entry follows the text encoding and k + 1
# transformer calls; `image` follows every step and the VAE decode.
PER_STEP = ("latents", "noise_pred_cond", "noise_pred_uncond")


def assert_golden_matches(what: str, got: dict, want: dict) -> None:
    """Every tensor of a regenerated golden file against the committed one, each with its evaluation count."""
    assert set(got) == set(want), f"{what}: tensors {sorted(got)} vs fixture {sorted(want)}"
    steps = len(want["latents"])
    for key, w in want.items():
        g = got[key]
        if key in PER_STEP:
            assert len(g) == len(w), f"{what} {key}: {len(g)} steps, fixture {len(w)}"
            for k in range(len(w)):
                assert_matches_fixture(f"{what} {key}[{k}]", g[k], w[k], evaluations=k + 2)
        elif key == "image":
            assert_matches_fixture(f"{what} {key}", g, w, evaluations=steps + 2)
        elif not np.issubdtype(_numpy(w).dtype, np.floating):
            assert_matches_fixture(f"{what} {key}", g, w)
        else:
            assert_matches_fixture(f"{what} {key}", g, w, evaluations=golden_evaluations(key))
