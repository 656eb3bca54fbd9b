"""Property-based tests: the recipe parser never fails with anything but LmmcError and round-trips what
it accepts; masks never keep more than asked; an allocation always meets its budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmmc.allocation import keep_budget, keep_floors
from lmmc.errors import LmmcError
from lmmc.pipeline import load_passes
from lmmc.recipe import parse_recipe
from lmmc.sparsity import NM, nm_mask, row_mask

PASS_NAMES = sorted(load_passes())
KEYS = ["model", "calibration", "passes", "export", "validate", "path", "random", "samples", "eval_samples",
        "batch_size", "max_length", "seed", "sparsity", "nm", "granularity", "p_max", "min_cosine", "latency",
        "min_held_out", "corpus", "checkpoint_dir", "steps", *PASS_NAMES]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["2:4", "1:2", "4:4", "a:b", "", "x", "calib.txt", "../data", "\0"]),
                    st.text(max_size=6))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=5), st.integers(0, 3))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=8)
passes = st.lists(st.one_of(st.sampled_from(PASS_NAMES), st.dictionaries(st.sampled_from(PASS_NAMES), values,
                                                                         min_size=1, max_size=2), values), max_size=3)
recipes = st.fixed_dictionaries({}, optional={
    "model": values,
    "calibration": st.one_of(values, st.fixed_dictionaries({}, optional={k: values for k in (
        "path", "random", "samples", "eval_samples", "batch_size", "max_length", "seed")})),
    "passes": st.one_of(passes, values),
    "export": st.one_of(passes, values),
    "validate": st.one_of(values, st.fixed_dictionaries({}, optional={"min_cosine": values, "latency": values,
                                                                       "min_held_out": values})),
}) | st.dictionaries(keys, values, max_size=4)
# Recipes that mostly make sense, so the round trip is exercised, with a junk key now and then.
fractions = st.floats(0.0, 0.99)
sensible = st.fixed_dictionaries({
    "calibration": st.fixed_dictionaries({"random": st.just(True)}, optional={
        "samples": st.integers(1, 64), "eval_samples": st.integers(2, 64), "batch_size": st.integers(1, 9),
        "max_length": st.one_of(st.none(), st.integers(2, 512)), "seed": st.integers(0, 9)}),
    "passes": st.lists(st.one_of(
        st.fixed_dictionaries({"wanda": st.fixed_dictionaries({}, optional={"sparsity": fractions})}),
        st.fixed_dictionaries({"magnitude": st.fixed_dictionaries({}, optional={
            "nm": st.sampled_from(["1:2", "2:4", "3:8"]), "sparsity": fractions})}),
        st.just("sparsegpt")), max_size=2),
}, optional={
    "export": st.sampled_from([["onnx"], [{"onnx": {"opset": 18}}], []]),
    "validate": st.one_of(st.just(False), st.fixed_dictionaries({}, optional={
        "min_cosine": st.floats(-1, 1), "latency": st.booleans(), "latency_seq": st.integers(1, 512),
        "min_held_out": st.integers(2, 64)})),
    "model": st.text(max_size=8),
    "junk": values,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=recipes | sensible, with_base=st.booleans())
def test_any_mapping_parses_or_raises_lmmc_error_and_round_trips(data, with_base, tmp_path_factory):
    base = tmp_path_factory.getbasetemp() if with_base else None
    try:
        recipe = parse_recipe(data, base=base)
    except LmmcError:
        return
    again = parse_recipe(yaml.safe_load(recipe.dump()))
    assert again == recipe
    assert again.dump() == recipe.dump()


@given(n=st.integers(1, 7), extra=st.integers(1, 7))
def test_a_valid_nm_always_parses_and_prints_back(n, extra):
    nm = NM.parse(f"{n}:{n + extra}")
    assert (nm.n, nm.m) == (n, n + extra) and str(nm) == f"{n}:{n + extra}"


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0.0, 0.99), spread=st.booleans(),
       seed=st.integers(0, 2**16))
def test_row_mask_never_keeps_more_than_asked(rows, cols, sparsity, spread, seed):
    score = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = row_mask(score, sparsity, spread)
    zeros = int((~mask).sum())
    if spread:
        assert zeros == round(sparsity * rows * cols)
    else:
        per_row = math.floor(sparsity * cols + 1e-9)
        assert ((~mask).sum(1) == per_row).all()
    assert int(mask.sum()) <= rows * cols - math.floor(sparsity * rows * cols + 1e-9) + (rows if not spread else 1)
    # the pruned weights are the lowest scores of their row: no kept score below a pruned one in a row
    # (without spread, where a row's cut is a pure per-row threshold)
    if not spread and zeros:
        kept_min = torch.where(mask, score, torch.inf).min(1).values
        cut_max = torch.where(~mask, score, -torch.inf).max(1).values
        assert (cut_max <= kept_min).all()


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 6), n=st.integers(1, 5), extra=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_nm_mask_keeps_exactly_m_minus_n_of_every_group(rows, groups, n, extra, seed):
    nm = NM(n, n + extra)
    score = torch.rand(rows, groups * nm.m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(score, nm)
    kept = mask.reshape(rows, groups, nm.m).sum(2)
    assert (kept == nm.m - nm.n).all()


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=12), data=st.data(),
       sparsity=st.floats(0.0, 0.95), slack=st.floats(0.0, 0.5))
def test_allocation_always_meets_the_budget(sizes, data, sparsity, slack):
    scores = data.draw(st.lists(st.floats(0.0, 1e6), min_size=len(sizes), max_size=len(sizes)))
    p_max = min(1.0, sparsity + slack)
    try:
        keep_floors(sizes, sparsity, p_max)
    except LmmcError:
        assume(False)  # the caps make the target unreachable: refused up front, covered elsewhere
    keep = keep_budget(scores, sizes, sparsity, p_max)
    assert sum(keep) == round((1.0 - sparsity) * sum(sizes))
    for k, n in zip(keep, sizes):
        assert math.ceil((1.0 - p_max) * n - 1e-9) <= k <= n


@given(scores=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=2, max_size=2))
def test_allocation_refuses_non_finite_or_negative_scores(scores):
    assume(not all(math.isfinite(s) and s >= 0 for s in scores))
    with pytest.raises(LmmcError, match="finite, non-negative score"):
        keep_budget(scores, [100, 100], 0.5, 0.6)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 400), st.integers(0, 2**32 - 1))
def test_a_cosine_never_leaves_minus_one_to_one_and_an_embedding_is_one_to_itself(rows, width, seed):
    """float32 put 7 of 64 random embeddings at 1.0000002 to themselves; a mean above 1 read as better than
    identical."""
    import numpy as np

    from lmmc.export.validate import cosine

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, width)).astype(np.float32) * 10.0 ** rng.uniform(-3, 3)
    b = rng.standard_normal((rows, width)).astype(np.float32)
    assert np.all(np.abs(cosine(a, b)) <= 1.0) and np.all(np.abs(cosine(a, -a)) <= 1.0)
    same = cosine(a, a)
    assert same.max() <= 1.0 and same.min() >= 1.0 - 1e-12
