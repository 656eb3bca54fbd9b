"""Global allocation: ECoFLaP's keep-budget rule against hand computations, the zeroth- and first-order
scores against autograd, one budget over both towers of CLIP and SigLIP, OWL's rule, the report, and
bad input -> one clear error, exit 2."""

import json
import random
import time

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from lmmc.passes.ecoflap import first_order_scores, zeroth_order_scores
from lmmc.passes.owl import owl_ratios

from lmmc.adapters import get_adapter, prunable_linears
from lmmc.allocation import build_groups, keep_budget, keep_budget_ratios
from lmmc.artifact import Artifact
from lmmc.cli import main
from lmmc.data import random_calibration
from lmmc.errors import LmmcError
from lmmc.modelio import make_student
from lmmc.objectives import Objective, objective_batches
from lmmc.pipeline import get_pass, run_pass
from lmmc.recipe import CalibrationConfig, parse_recipe
from lmmc.sparsity import sparsity_summary
from tests.conftest import TINY_KINDS, save_tiny, tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread: on a busy shared CPU each op's thread barrier
    costs more than its arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_artifact(kind: str, tmp_path=None, samples: int = 8) -> Artifact:
    teacher = tiny_model(kind)
    adapter = get_adapter(teacher.config.model_type)
    art = Artifact(model_ref=kind, adapter=adapter, teacher=teacher, student=make_student(teacher), workdir=tmp_path)
    art.calib = random_calibration(CalibrationConfig(samples=samples, eval_samples=4, batch_size=4), teacher, adapter)
    return art


def run(art: Artifact, name: str, **config):
    return run_pass(get_pass(name)(get_pass(name).Config(**config)), art)


# ---- the keep-budget rule, by hand -------------------------------------------------------------


def test_keep_budget_matches_hand_computation():
    # K = 0.5 * 400 = 200; floors ceil(0.3 * N) = 30, 30, 60 -> R = 80, handed out 1/8, 3/8, 4/8.
    assert keep_budget([1, 3, 4], [100, 100, 200], 0.5, 0.7) == [40, 60, 100]
    ratios = keep_budget_ratios({"a": 1, "b": 3, "c": 4}, {"a": 100, "b": 100, "c": 200}, 0.5, 0.7)
    assert ratios == pytest.approx({"a": 0.6, "b": 0.4, "c": 0.5})


def test_keep_budget_caps_a_full_group_and_hands_the_rest_on():
    # K = 150; floors 20 each -> R = 90; shares 4.5, 4.5, 81 -> 5, 5, and 80 (capped at N = 100).
    assert keep_budget([1, 1, 18], [100, 100, 100], 0.5, 0.8) == [25, 25, 100]


def test_keep_budget_takes_back_the_rounding_overshoot():
    # K = 18; floors ceil(0.25 * 12) = 3 -> R = 9; shares 4.5, 2.25, 2.25 round up to 5, 3, 3 (one
    # hand-out of 11 > 9): the two groups rounded up the most (by 0.75) give one back each.
    keep = keep_budget([2, 1, 1], [12, 12, 12], 0.5, 0.75)
    assert keep == [8, 5, 5]
    assert [1 - k / 12 for k in keep] == pytest.approx([1 / 3, 7 / 12, 7 / 12])


def test_keep_budget_meets_the_budget_and_respects_p_max_on_random_scores():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        sizes = [rng.randint(50, 5000) for _ in range(n)]
        scores = [rng.random() ** 3 * 100 for _ in range(n)]
        p = rng.uniform(0.1, 0.8)
        p_max = min(1.0, p + rng.uniform(0.02, 0.3))
        keep = keep_budget(scores, sizes, p, p_max)
        assert sum(keep) == round((1 - p) * sum(sizes))
        assert all(0 <= k <= size for k, size in zip(keep, sizes))
        assert all(1 - k / size <= p_max + 1e-12 for k, size in zip(keep, sizes))


def test_keep_budget_with_all_scores_zero_stays_proportional_to_room():
    assert keep_budget([0, 0], [100, 300], 0.5, 0.75) == [50, 150]


@pytest.mark.parametrize("sparsity, p_max, sizes, match", [
    (0.6, 0.5, [100, 100], "below the target"),
    (0.5, 0.5, [3, 3], "cannot be reached"),  # floors 2 + 2 > K = 3
    (0.5, 1.5, [100], "at most 1"),
])
def test_keep_budget_bad_input(sparsity, p_max, sizes, match):
    with pytest.raises(LmmcError, match=match):
        keep_budget([1.0] * len(sizes), sizes, sparsity, p_max)


# ---- groups ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, expected", [
    ("bert", {"layer": 12, "block": 2, "tower": 1, "model": 1}),
    ("clip", {"layer": 24, "block": 4, "tower": 2, "model": 1}),
])
def test_groups_per_granularity(kind, expected):
    model = tiny_model(kind)
    linears = prunable_linears(model, get_adapter(model.config.model_type))
    for granularity, count in expected.items():
        groups = build_groups(linears, granularity)
        assert len(groups) == count
        assert sorted(pl.param for g in groups.values() for pl in g) == sorted(pl.param for pl in linears)


# ---- scores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_zeroth_order_estimate_equals_the_directional_derivative(kind):
    """|L(W + εz) − L(W − εz)| / 2ε must equal |⟨∂L/∂W, z⟩| for the same z (float64, ε = 1e-4)."""
    art = make_artifact(kind)
    model = art.student.double()
    objective = Objective(model, art.adapter)
    step = objective_batches(art.calib, art.adapter, 4, 4)[0]
    if "image" in step:
        step["image"] = {k: v.double() for k, v in step["image"].items()}
    pl = next(p for p in prunable_linears(model, art.adapter) if p.role == "v" and p.block == 1)
    before = pl.module.weight.detach().clone()
    got = zeroth_order_scores(objective, [pl], [step], 1e-4, seed=3, device=torch.device("cpu"))[pl.param]
    assert torch.equal(pl.module.weight, before)  # restored bit for bit

    z = torch.randn(pl.module.weight.shape, generator=torch.Generator().manual_seed(3)).double()
    targets = objective.targets(step, torch.device("cpu"))
    tower = art.adapter.tower(pl.tower)
    loss = objective.loss(pl.tower, objective.embed(tower, objective.inputs(tower, step, torch.device("cpu"))), targets)
    (grad,) = torch.autograd.grad(loss, [pl.module.weight])
    expected = float((grad * z).sum().abs())
    assert expected > 1e-3  # the loss has a real slope at the current weights
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_replaying_the_blocks_before_a_perturbed_matrix_changes_no_score(kind, monkeypatch):
    """The blocks before a perturbed matrix hand back their unperturbed outputs instead of computing them:
    the scores are those of whole forwards, bit for bit."""
    from contextlib import nullcontext

    from lmmc.passes import ecoflap

    art = make_artifact(kind)
    objective = Objective(art.student, art.adapter)
    steps = objective_batches(art.calib, art.adapter, 8, 4)
    linears = prunable_linears(art.student, art.adapter)
    first = linears[0]  # in block 0: replayed, it no longer runs for the matrices of the blocks after it
    calls = []
    first.module.register_forward_hook(lambda *args: calls.append(1))
    replayed = zeroth_order_scores(objective, linears, steps, 1e-3, seed=0, device=torch.device("cpu"))
    monkeypatch.setattr(ecoflap, "_replayed", lambda *args: nullcontext())
    runs = len(calls)
    whole = zeroth_order_scores(objective, linears, steps, 1e-3, seed=0, device=torch.device("cpu"))
    assert replayed == whole and min(whole.values()) > 0
    later = sum(pl.tower == first.tower and pl.block > 0 for pl in linears)
    assert runs == (len(calls) - runs) - 2 * len(steps) * later and later > 0
    assert all("forward" not in vars(b) for b in art.student.modules())  # every block computes again


def test_first_order_scores_equal_hand_computation():
    art = make_artifact("bert")
    objective = Objective(art.student, art.adapter)
    steps = objective_batches(art.calib, art.adapter, 8, 4)
    linears = prunable_linears(art.student, art.adapter)
    got = first_order_scores(objective, linears, steps, torch.device("cpu"))
    pl = linears[7]
    grads = []
    for step in steps:
        targets = objective.targets(step, torch.device("cpu"))
        tower = art.adapter.towers[0]
        inputs = objective.inputs(tower, step, torch.device("cpu"))
        loss = objective.loss("text", objective.embed(tower, inputs), targets)
        grads.append(torch.autograd.grad(loss, [pl.module.weight])[0].abs())
    expected = float((pl.module.weight.detach().abs() * torch.stack(grads).mean(0)).sum())
    assert got[pl.param] == pytest.approx(expected, rel=1e-5)
    assert all(p.requires_grad for p in art.student.parameters())  # flags restored


# ---- one budget over both towers ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("order, granularity", [(0, "layer"), (1, "layer"), (0, "block")])
def test_dual_encoder_allocation_spans_both_towers_under_one_budget(tmp_path, kind, order, granularity):
    art = make_artifact(kind, tmp_path)
    alloc = run(art, "ecoflap", sparsity=0.6, order=order, granularity=granularity, samples=8, batch_size=4).metrics
    params = {pl.param for pl in prunable_linears(art.student, art.adapter)}
    assert set(art.allocation) == params
    assert set(alloc["per_tower"]) == {"text", "vision"}
    assert alloc["planned_sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert all(row["sparsity"] <= 0.7 + 1e-9 for row in alloc["groups"])
    assert len({round(v, 6) for v in art.allocation.values()}) > 1  # scores moved the budget around

    pruned = run(art, "wanda").metrics
    assert pruned["targets"] == "allocation"
    assert pruned["sparsity"] == pytest.approx(0.6, abs=0.005)
    achieved = sparsity_summary(art.student, art.adapter)
    for tower in ("text", "vision"):
        assert pruned["sparsity_per_tower"][tower] == pytest.approx(achieved["sparsity_per_tower"][tower])
        assert pruned["sparsity_per_tower"][tower] == pytest.approx(alloc["per_tower"][tower]["sparsity"], abs=0.005)
    # The budget holds to the weight: each group loses N_g - k_g, and the model N - round(0.4 N).
    linears = prunable_linears(art.student, art.adapter)
    groups = build_groups(linears, alloc["granularity"])
    for row in alloc["groups"]:
        zeros = sum(int((pl.module.weight == 0).sum()) for pl in groups[row["group"]])
        assert zeros == round(row["sparsity"] * row["params"])
    total = sum(pl.module.weight.numel() for pl in linears)
    assert sum(int((pl.module.weight == 0).sum()) for pl in linears) == total - round(0.4 * total)


def test_ecoflap_on_fewer_samples_than_it_asks_for_says_so():
    # the pass scored on what the calibration set held and its metrics said samples: 8, without a word
    asked = run(make_artifact("bert"), "ecoflap", sparsity=0.5, samples=8, batch_size=4).metrics
    short = run(make_artifact("bert"), "ecoflap", sparsity=0.5, samples=64, batch_size=4).metrics
    assert asked["samples"] == short["samples"] == 8 and "warnings" not in asked
    assert short["warnings"] == ["ecoflap scored on 8 calibration samples, fewer than its samples = 64: the "
                                 "calibration set holds 8; raise calibration.samples, or lower ecoflap's samples"]
    lone = run(make_artifact("bert"), "ecoflap", sparsity=0.5, samples=5, batch_size=4).metrics
    assert lone["samples"] == 4 and lone["warnings"] == [
        "ecoflap scored on 4 calibration samples, fewer than its samples = 5: a last batch of one sample, which has "
        "none to contrast with, is left out; make samples no multiple of batch_size = 4 plus one"]


def test_report_table_and_plot(tmp_path):
    art = make_artifact("clip", tmp_path)
    metrics = run(art, "ecoflap", sparsity=0.5, granularity="block", samples=8, batch_size=4).metrics
    rows = metrics["groups"]
    groups = build_groups(prunable_linears(art.student, art.adapter), "block")
    assert [r["group"] for r in rows] == list(groups) == ["text.0", "text.1", "vision.0", "vision.1"]
    for row in rows:
        members = [pl.param for pl in groups[row["group"]]]
        sizes = [pl.module.weight.numel() for pl in groups[row["group"]]]
        assert sum(art.allocation[p] * n for p, n in zip(members, sizes)) == pytest.approx(row["sparsity"] * sum(sizes))
        assert all(abs(art.allocation[p] - row["sparsity"]) * n < 1 for p, n in zip(members, sizes))
        assert row["score"] == pytest.approx(sum(metrics["matrix_scores"][p] for p in members))
        assert row["params"] == sum(pl.module.weight.numel() for pl in groups[row["group"]])
    for tower, entry in metrics["per_tower"].items():
        mine = [r for r in rows if r["tower"] == tower]
        assert entry["sparsity"] == pytest.approx(sum(r["sparsity"] * r["params"] for r in mine) / entry["params"])
    assert metrics["p_max"] == pytest.approx(0.6) and metrics["samples"] == 8
    png = tmp_path / metrics["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    json.dumps(metrics)  # lands in report.json as is


def test_uniform_sets_every_matrix_to_the_target():
    art = make_artifact("vit")
    metrics = run(art, "uniform", sparsity=0.45).metrics
    for pl in prunable_linears(art.student, art.adapter):
        assert abs(art.allocation[pl.param] - 0.45) * pl.module.weight.numel() < 1
    assert metrics["per_tower"]["vision"]["sparsity"] == pytest.approx(0.45)
    assert run(art, "wanda").metrics["sparsity"] == pytest.approx(0.45, abs=1e-3)


def test_an_allocation_below_the_zeros_a_pruner_left_is_said():
    # wanda 2:4 then an allocation: a matrix given less than its 50 % keeps its zeros, and the budget is missed
    art = make_artifact("bert")
    run(art, "magnitude", nm="2:4")
    metrics = run(art, "uniform", sparsity=0.3).metrics
    [warning] = metrics["warnings"]
    assert "uniform gives 12 matrices less sparsity than the zeros an earlier pruner left in them" in warning
    assert ": 0.300 against 0.500); they keep their zeros, so the student ends sparser than the 0.3 budget" in warning
    assert run(art, "magnitude").metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # gradual pruning that stays at or above what the pruner left meets the budget, and says nothing
    art = make_artifact("bert")
    run(art, "magnitude", sparsity=0.3)
    assert "warnings" not in run(art, "uniform", sparsity=0.6).metrics
    assert run(art, "wanda").metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)


# ---- OWL ----------------------------------------------------------------------------------------


def test_owl_rule_matches_hand_computation():
    # outlier ratios 1 %, 3 %, 2 % -> scaled to [0, 2λ] = 0, 0.16, 0.08; mean 0.08; keep = scaled - 0.08 + 0.5
    ratios = owl_ratios({"a": 0.01, "b": 0.03, "c": 0.02}, {"a": 10, "b": 10, "c": 10}, 0.5, 0.08)
    assert ratios == pytest.approx({"a": 0.58, "b": 0.42, "c": 0.5})
    # unequal sizes: the shift is size-weighted, so the budget still holds
    sizes = {"a": 100, "b": 300, "c": 50}
    ratios = owl_ratios({"a": 0.01, "b": 0.03, "c": 0.02}, sizes, 0.6, 0.08)
    assert sum(ratios[g] * n for g, n in sizes.items()) / sum(sizes.values()) == pytest.approx(0.6)
    assert ratios["b"] < ratios["c"] < ratios["a"]
    # b's sparsity is 0.05 - lam: the message names the largest lam that fits, and a lam under it does
    with pytest.raises(LmmcError, match="give a lam below 0.0500, which keeps them inside here"):
        owl_ratios({"a": 0.0, "b": 1.0}, {"a": 1, "b": 1}, 0.05, 0.2)
    assert owl_ratios({"a": 0.0, "b": 1.0}, {"a": 1, "b": 1}, 0.05, 0.0499) == pytest.approx({"a": 0.0999, "b": 0.0001})


def test_owl_pass_meets_the_budget_on_both_towers():
    art = make_artifact("clip")
    metrics = run(art, "owl", sparsity=0.5, granularity="block").metrics
    assert metrics["planned_sparsity"] == pytest.approx(0.5)
    spread = [r["sparsity"] for r in metrics["groups"]]
    assert max(spread) - min(spread) == pytest.approx(2 * 0.08, abs=1e-3)  # min-max scaled to [0, 2λ]
    assert run(art, "wanda").metrics["sparsity"] == pytest.approx(0.5, abs=0.005)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_owl_then_wanda_zeroes_exactly_the_global_budget(granularity):
    """Each group rounded its own count of zeros: 0.6 came out as 0.59982 on the tiny CLIP."""
    art = make_artifact("clip")
    run(art, "owl", sparsity=0.6, granularity=granularity)
    run(art, "wanda")
    zeros = sum(int((~mask).sum()) for mask in art.masks.values())
    assert zeros == round(0.6 * sum(mask.numel() for mask in art.masks.values()))


# ---- bad input ----------------------------------------------------------------------------------


def _compile(tmp_path, passes: list) -> Result:
    model_dir = tmp_path / "teacher"
    save_tiny("bert", model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": {"random": True, "samples": 8, "eval_samples": 32, "batch_size": 4},
                                      "passes": passes}))
    return CliRunner().invoke(main, ["compile", str(model_dir), "-r", str(recipe), "-o", str(tmp_path / "out")])


@pytest.mark.parametrize("passes, message", [
    ([{"ecoflap": {"sparsity": 0.6, "p_max": 0.5}}, "wanda"], "p_max (0.5) is below the target sparsity (0.6)"),
    ([{"ecoflap": {"sparsity": 0.6, "granularity": "head"}}, "wanda"], "granularity"),
    ([{"ecoflap": {"sparsity": 0.6}}, {"wanda": {"nm": "2:4"}}], "fixes every matrix at 2/4"),
    ([{"sparsegpt": {"nm": "4:4"}}], "N:M needs 0 < N < M, got 4:4"),
    # tiny BERT's q is 32 x 32: a 70 % cap keeps ceil(0.3 * 1024) = 308 > 307.2, so 70 % is out of reach
    ([{"ecoflap": {"sparsity": 0.7, "p_max": 0.7, "samples": 4, "batch_size": 4}}, "wanda"], "cannot be reached"),
    # W ± εz with ε = 1e30 overflows every loss: the scores are NaN, which would allocate nothing meaningful
    ([{"ecoflap": {"sparsity": 0.5, "epsilon": 1e30, "samples": 4, "batch_size": 4}}, "wanda"], "lower 'epsilon'"),
    # settings of the zeroth-order estimate did nothing at order 1
    ([{"ecoflap": {"sparsity": 0.5, "order": 1, "epsilon": 1e-2, "seed": 3}}, "wanda"],
     "epsilon and seed set the zeroth-order estimate's random directions, and order 1 computes gradients instead; "
     "remove epsilon and seed, or use order 0"),
])
def test_bad_allocation_input_exits_2_with_one_clear_error(tmp_path, passes, message):
    result = _compile(tmp_path, passes)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_recipe_check_rejects_nm_after_an_allocation_before_loading():
    with pytest.raises(LmmcError, match="drop the allocation pass"):
        parse_recipe({"calibration": {"random": True}, "passes": [{"owl": {}}, {"sparsegpt": {"nm": "2:4"}}]})


# ---- end to end on the real MiniLM ----------------------------------------------------------------


@pytest.mark.e2e
def test_minilm_allocation_beats_uniform_wanda_at_60_percent(minilm):
    """First-order scores here (2 s); the zeroth-order figures are in benchmarks/allocation.py."""
    from lmmc.adapters import TowerModule
    from lmmc.data import load_calibration
    from lmmc.modelio import load_teacher
    from tests.conftest import CORPUS

    teacher, adapter, preprocessor = load_teacher(str(minilm))
    cfg = CalibrationConfig(samples=128, eval_samples=256, batch_size=16)
    calib = load_calibration(cfg, str(CORPUS), {"text"}, preprocessor)

    @torch.no_grad()
    def embeddings(model):
        runner = TowerModule(model, adapter.towers[0])
        return torch.cat([runner(b["input_ids"], b["attention_mask"])[1] for b in calib.eval_batches("text")])

    reference = embeddings(teacher)

    def held_out_cosine(*passes) -> tuple[float, Artifact]:
        art = Artifact(model_ref="minilm", adapter=adapter, teacher=teacher, student=make_student(teacher), calib=calib)
        for name, config in passes:
            run(art, name, **config)
        return float(torch.nn.functional.cosine_similarity(embeddings(art.student), reference).mean()), art

    uniform, _ = held_out_cosine(("wanda", {"sparsity": 0.6}))
    allocated, art = held_out_cosine(("ecoflap", {"sparsity": 0.6, "order": 1}), ("wanda", {}))
    assert allocated >= uniform + 0.015  # measured +0.027
    by_role = {}
    for pl in prunable_linears(art.student, adapter):
        by_role.setdefault(pl.role, []).append(art.allocation[pl.param])
    mean = {role: sum(v) / len(v) for role, v in by_role.items()}
    assert max(mean["v"], mean["o"]) < min(mean["q"], mean["k"])  # values and outputs are kept denser


@pytest.mark.timed
@pytest.mark.parametrize("slow_at", [1, 2])
def test_scores_run_on_the_thread_count_that_ran_the_probe_faster(slow_at):
    """The zeroth-order scores' thread count is timed, not fixed: one thread for small forwards on busy
    cores, all of them for a base-size model on a many-core server."""
    from lmmc.sparsity import fastest_cpu_threads

    torch.set_num_threads(2)
    seen = []

    def probe():
        seen.append(torch.get_num_threads())
        time.sleep(0.03 if torch.get_num_threads() == slow_at else 0.001)
    with fastest_cpu_threads(probe, torch.device("cpu")) as chosen:
        inside = torch.get_num_threads()
    assert chosen == inside == 3 - slow_at
    assert sorted(seen) == [1] * 4 + [2] * 4  # one warm-up and three timed runs of each, in turns
    assert torch.get_num_threads() == 2  # restored after the work
    with fastest_cpu_threads(probe, torch.device("meta")) as chosen:  # off the CPU nothing is timed
        assert chosen == 2 and len(seen) == 8
