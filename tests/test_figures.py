"""Figures from records (eva_bench/figures.py): each figure draws what the records hold, figures that do not apply are
not written (and a stale one is removed), and the SVGs are byte-identical from run to run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from eva_bench import figures, results
from tests.test_tables import (CW10_SUCCESS, CW10_TASKS, VARIANT_COLUMNS, VARIANT_NLL, paired_t, selected_lr,
                               write_cw10_records, write_variant_records)

NLL = {  # (init, rank) -> gsm8k/nll of seeds 0, 1, 2
    ("random", 2): [2.90, 2.92, 2.97],
    ("eva", 2): [2.80, 2.81, 2.85],
    ("random", 8): [2.70, 2.72, 2.74],
    ("eva", 8): [2.65, 2.70, 2.66],
    ("eva_rot", 2): [2.88, 2.86, 2.95],
    ("eva_rot", 8): [2.71, 2.69, 2.75],
}
RANKS = {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.down_proj": 1,
         "model.layers.1.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 2}
VARIANCE = {"model.layers.1.mlp.down_proj": 0.4, "model.layers.0.self_attn.q_proj": 0.9,
            "model.layers.0.mlp.down_proj": 0.5, "model.layers.1.self_attn.q_proj": 0.7}
GRID = (0.01, 0.02, 0.04)
VALIDATION = {"random": (3.0, 2.8, 2.9), "eva": (2.7, 2.75, 3.1)}  # selection score at each lr of GRID


def curve(seed: int, init: str) -> list:
    return [[10, 3.0 + 0.1 * seed], [20, 2.5 + 0.1 * seed + (init == "eva") * 0.2], [30, 2.0 + 0.1 * seed]]


def write_demo(root: Path, experiment: str = "demo", inits=("random", "eva"), tuned: bool = False) -> None:
    """Records of a tiny experiment: math on one model, ``inits`` x ranks {2, 8} x 3 seeds; EVA with its init report;
    under ``tuned``, the selection runs and each final run's protocol (the lr of GRID with the lowest score)."""
    for (init, rank), values in NLL.items():
        if init not in inits:
            continue
        for seed, nll in enumerate(values):
            run = {"experiment": experiment, "task": "math", "model": "tiny", "init": init, "rank": rank,
                   "seed": seed, "config_hash": f"h{rank}{init}"}
            record = {"run": run, "status": "success", "metrics": {"gsm8k/nll": nll, "gsm8k/n": 10},
                      "config": {"optim": {"lr": 0.005, "epochs": 1, "schedule": "cosine"}},
                      "train": {"curve": curve(seed, init), "optimizer_steps": 30, "examples": 480},
                      "finished_at": f"2026-01-0{seed + 1}", "seconds": 10.0}
            if init == "eva":
                record["init_report"] = {"method": "eva", "ranks": RANKS,
                                         "details": {"explained_variance": VARIANCE}}
            if tuned:
                scores = dict(zip(GRID, VALIDATION[init]))
                record["protocol"] = {"name": "tuned", "metric": "validation/nll", "grid": scores,
                                      "selected_lr": min(scores, key=scores.get)}
                record["config"]["protocol"] = {"name": "tuned", "lr_grid": list(GRID), "validation_size": 8,
                                                "selection_seed": 0}
            results.write_record(root / experiment / f"{init}-{rank}-{seed}.json", record)
        for lr, score in zip(GRID, VALIDATION[init]) if tuned else ():  # one selection run per lr, seed 0
            run = {"experiment": f"{experiment}/lr_search", "task": "math", "model": "tiny", "init": init,
                   "rank": rank, "seed": 0, "config_hash": f"{init}{rank}{lr}"}
            results.write_record(root / experiment / "lr_search" / f"{init}-{rank}-{lr}.json",
                                 {"run": run, "status": "success", "metrics": {"validation/nll": score},
                                  "config": {"optim": {"lr": lr}}})


def labelled_lines(ax) -> dict:
    """The data lines of ``ax`` by legend label (caps, markers of choice and guides are labelled "_...")."""
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def t_interval(values) -> tuple[float, float]:
    values = np.asarray(values)
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def test_rank_figure_has_one_line_per_init_with_the_seed_means_and_t_intervals(tmp_path):
    write_demo(tmp_path)
    fig = figures.rank_figure(figures.load(tmp_path, "demo"))
    ax = fig.axes[0]
    drawn = {c.get_label(): c.lines for c in ax.containers}  # one errorbar per init: (line, caps, (bars,))
    assert list(drawn) == ["random", "eva"]  # the tables' method order
    for init, (line, _, _) in drawn.items():
        assert np.allclose(line.get_ydata(), [np.mean(NLL[init, 2]), np.mean(NLL[init, 8])])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "8"]
    segments = drawn["eva"][2][0].get_segments()
    for rank, segment in zip((2, 8), segments):
        assert np.allclose(sorted(segment[:, 1]), t_interval(NLL["eva", rank]))


def test_lr_curves_draw_one_point_per_selection_run_and_star_the_chosen_lr(tmp_path):
    write_demo(tmp_path, tuned=True)
    exp = figures.load(tmp_path, "demo")
    fig = figures.lr_curves_figure(exp)
    points = sum(len(line.get_xdata()) for ax in fig.axes for line in labelled_lines(ax).values())
    assert points == len(exp.selection) == 2 * 2 * len(GRID)
    for ax in fig.axes[:2]:  # r = 2 and r = 8 of the one task
        assert np.allclose(labelled_lines(ax)["eva"].get_ydata(), VALIDATION["eva"])
        stars = sorted(tuple(line.get_xdata()) for line in ax.get_lines() if line.get_label() == "_chosen")
        assert stars == [(0.01,), (0.02,)]  # eva's best validation lr, random's


def test_tasks_figure_draws_each_task_and_the_group_mean_per_method_with_t_intervals(tmp_path):
    write_cw10_records(tmp_path)
    fig = figures.tasks_figure(figures.load(tmp_path, "cw10"))
    (ax,) = fig.axes  # one rank, one main metric
    assert [t.get_text() for t in ax.get_xticklabels()] == [*CW10_TASKS, "mean: all"]
    drawn = {c.get_label(): c.lines for c in ax.containers}
    assert list(drawn) == ["random", "eva", "eva use_dora=True"]
    for (init, variant), seeds in CW10_SUCCESS.items():
        line, _, (bars,) = drawn[init if variant is None else f"{init} {variant}"]
        per_task = np.array(seeds)  # seeds x tasks
        columns = [*per_task.T, per_task.mean(axis=1)]  # each task's seeds, then the per-seed mean over tasks
        assert np.allclose(line.get_ydata(), [c.mean() for c in columns])
        for segment, values in zip(bars.get_segments(), columns):
            assert np.allclose(sorted(segment[:, 1]), t_interval(values))
    x = [list(c.lines[0].get_xdata()) for c in ax.containers]
    assert all(a[0] < b[0] for a, b in zip(x, x[1:]))  # methods side by side, not on top of each other


def test_figures_that_do_not_apply_return_none(tmp_path):
    write_demo(tmp_path)
    exp = figures.load(tmp_path, "demo")
    assert figures.lr_curves_figure(exp) is None  # fixed protocol: no selection runs
    assert figures.controls_figure(exp) is None  # not a *_controls experiment
    assert figures.tasks_figure(exp) is None  # no task group (language)
    write_demo(tmp_path, experiment="no_eva", inits=("random",))
    assert figures.eva_ranks_figure(figures.load(tmp_path, "no_eva")) is None


def test_eva_heatmaps_lay_out_ranks_and_explained_variance_by_layer_and_module(tmp_path):
    write_demo(tmp_path)
    fig = figures.eva_ranks_figure(figures.load(tmp_path, "demo"))
    ranks, variance = fig.axes[0].images[0].get_array(), fig.axes[1].images[0].get_array()  # row r = 2
    assert np.array_equal(ranks, [[3, 1], [2, 2]])  # layers 0, 1 x q_proj, down_proj
    assert np.allclose(variance, [[0.9, 0.5], [0.7, 0.4]])  # the same layout, whatever the dict's order
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["self_attn.q_proj", "mlp.down_proj"]


def test_eva_heatmaps_show_each_variant_of_eva_apart(tmp_path):
    # rho changes how EVA redistributes its budget: one heatmap row per rank and variant, in the tables' order
    realised = {"rho=10": {"model.layers.0.self_attn.q_proj": 8}, "rho=2": {"model.layers.0.self_attn.q_proj": 5},
                None: {"model.layers.0.self_attn.q_proj": 4}}
    for variant, ranks in realised.items():
        for seed in (1, 0):  # the lowest seed is drawn, whatever the files' order
            run = {"experiment": "rho", "task": "math", "model": "tiny", "init": "eva", "rank": 4, "seed": seed,
                   "config_hash": f"h{variant}"}
            results.write_record(tmp_path / "rho" / f"{variant}-{seed}.json", {
                "run": run, "status": "success", "metrics": {"gsm8k/nll": 2.0}, "config": {"variant": variant},
                "init_report": {"method": "eva", "ranks": {k: v + seed for k, v in ranks.items()}}})
    fig = figures.eva_ranks_figure(figures.load(tmp_path, "rho"))
    rows = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("realised rank")]
    assert [ax.get_title() for ax in rows] == [f"realised rank ({m}, r = 4, math, seed 0)"
                                               for m in ("eva", "eva rho=2", "eva rho=10")]
    assert [ax.images[0].get_array()[0, 0] for ax in rows] == [4, 5, 8]


def test_eva_heatmaps_draw_one_row_for_columns_with_the_same_allocation(tmp_path):
    # rho 1.5, 2 and 3 often give one allocation: a single row names them all; a different one keeps its own row
    realised = {"rho=3": 5, "rho=2": 5, None: 4}
    for variant, q_rank in realised.items():
        run = {"experiment": "rho", "task": "math", "model": "tiny", "init": "eva", "rank": 4, "seed": 0,
               "config_hash": f"h{variant}"}
        results.write_record(tmp_path / "rho" / f"{variant}.json", {
            "run": run, "status": "success", "metrics": {"gsm8k/nll": 2.0}, "config": {"variant": variant},
            "init_report": {"method": "eva", "ranks": {"model.layers.0.self_attn.q_proj": q_rank}}})
    fig = figures.eva_ranks_figure(figures.load(tmp_path, "rho"))
    rows = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("realised rank")]
    assert [ax.get_title() for ax in rows] == ["realised rank (eva, r = 4, math, seed 0)",
                                               "realised rank (eva rho=2 = eva rho=3, r = 4, math, seed 0)"]


def test_loss_figure_draws_the_mean_curve_and_the_seed_range(tmp_path):
    write_demo(tmp_path)
    fig = figures.loss_figure(figures.load(tmp_path, "demo"))
    eva = labelled_lines(fig.axes[0])["eva"]
    assert np.allclose(eva.get_xdata(), [10, 20, 30])
    assert np.allclose(eva.get_ydata(), np.mean([[y for _, y in curve(s, "eva")] for s in range(3)], axis=0))


def test_controls_figure_shows_paired_differences_from_eva_and_from_random(tmp_path):
    write_demo(tmp_path, experiment="demo_controls", inits=("random", "eva", "eva_rot"))
    fig = figures.controls_figure(figures.load(tmp_path, "demo_controls"))
    from_eva, from_random = fig.axes[:2]
    assert "from eva" in from_eva.get_title() and "from random" in from_random.get_title()
    # rank 2, eva_rot - eva, seed by seed: the point's x; methods listed in the tables' order, random first
    assert [t.get_text() for t in from_eva.get_yticklabels()] == ["random", "eva_rot"]
    r2 = from_eva.containers[0]
    diff = np.mean(np.subtract(NLL["eva_rot", 2], NLL["eva", 2]))
    assert np.isclose(r2.lines[0].get_xdata()[1], diff)


def test_svgs_are_byte_identical_from_run_to_run_and_keep_text(tmp_path):
    write_demo(tmp_path, tuned=True)
    first = figures.write_experiment(tmp_path, "demo", tmp_path / "a")
    second = figures.write_experiment(tmp_path, "demo", tmp_path / "b")
    assert [p.name for p in first] == ["rank.svg", "lr_curves.svg", "eva_ranks.svg", "loss.svg"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    text = first[0].read_text()
    assert "<text" in text and "LoRA rank r" in text and "<dc:date>" not in text


def test_cli_writes_each_experiment_and_removes_a_stale_figure(tmp_path):
    write_demo(tmp_path)
    stale = tmp_path / "figures" / "demo" / "lr_curves.svg"
    stale.parent.mkdir(parents=True)
    stale.write_text("<svg/>")  # from an earlier, tuned, version of the records
    figures.main(["--results", str(tmp_path), "--experiment", "demo"])
    assert sorted(p.name for p in stale.parent.iterdir()) == ["eva_ranks.svg", "loss.svg", "rank.svg"]


def test_init_cost_figure_from_the_newest_bench_record(tmp_path):
    bench = {"machine": {"cpu": "test cpu", "torch_threads": 1}, "results": {"vit": {
        "random": {"seconds": 0.1, "forwards_seconds": 0.0, "calibration_batches": 0},
        "eva": {"seconds": 3.0, "forwards_seconds": 2.0, "calibration_batches": 16},
        "broken": {"error": "FileNotFoundError"}}}}
    (tmp_path / "init-2026-01-01.json").write_text(json.dumps({"machine": {}, "results": {"vit": {}}}))
    (tmp_path / "init-2026-02-01.json").write_text(json.dumps(bench))
    ax = figures.init_cost_figure(tmp_path).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["random", "eva"]  # by cost; the failed one left out
    totals, forwards = ax.containers
    assert [bar.get_width() for bar in totals] == [0.1, 3.0] and [bar.get_width() for bar in forwards] == [0.0, 2.0]
    assert figures.init_cost_figure(tmp_path / "none") is None


def test_captions_come_from_the_figure_functions():
    for name in [*figures.FIGURES, *figures.BENCH_FIGURES]:
        assert figures.caption(name) and "\n" not in figures.caption(name)


def test_variants_figure_draws_each_variant_against_random_per_task_and_rank(tmp_path):
    write_variant_records(tmp_path)
    fig = figures.variants_figure(figures.load(tmp_path, "ablation"))
    ranks = sorted({rank for _, _, rank in VARIANT_NLL})
    assert [ax.get_title() for ax in fig.axes] == [f"math, r = {r}" for r in ranks]  # one panel per (task, rank)
    compared = VARIANT_COLUMNS[1:]  # all but random itself, in the tables' order
    for ax, rank in zip(fig.axes, ranks):
        assert [t.get_text() for t in ax.get_xticklabels()] == compared
        drawn = {c.get_label(): c for c in ax.containers}
        assert list(drawn) == compared  # one point each
        assert "lower is better" in ax.get_ylabel()
        assert any(np.allclose(line.get_ydata(), 0) and len(set(line.get_xdata())) > 1 for line in ax.get_lines())
        for x, method in enumerate(compared):
            init, variant = method.split(" ")
            mean, low, high = paired_t(VARIANT_NLL[init, variant, rank], VARIANT_NLL["random", None, rank])
            line, _, (bars,) = drawn[method].lines
            assert np.allclose(line.get_xdata(), [x]) and np.allclose(line.get_ydata(), [mean])
            assert np.allclose(sorted(bars.get_segments()[0][:, 1]), [low, high])
            assert drawn[method].lines[0].get_color() == figures.color(init)  # a variant in its init's colour


def test_variants_figure_is_written_only_for_an_experiment_with_variants(tmp_path):
    write_variant_records(tmp_path)
    write_demo(tmp_path)
    assert "variants.svg" in [p.name for p in figures.write_experiment(tmp_path, "ablation", tmp_path / "figures")]
    assert "variants.svg" not in [p.name for p in figures.write_experiment(tmp_path, "demo", tmp_path / "figures")]
    assert figures.variants_figure(figures.load(tmp_path, "demo")) is None
    assert figures.color("eva rho=1.5") == figures.color("eva") != figures.color("random rslora")


def test_loss_and_lr_curves_draw_each_variant_apart(tmp_path):
    write_variant_records(tmp_path)
    exp = figures.load(tmp_path, "ablation")
    ranks = sorted({rank for _, _, rank in VARIANT_NLL})
    loss = figures.loss_figure(exp)
    for ax, rank in zip(loss.axes, ranks):
        lines = labelled_lines(ax)
        assert list(lines) == VARIANT_COLUMNS
        assert np.allclose(lines["eva rho=1.5"].get_ydata(), [np.mean(VARIANT_NLL["eva", "rho=1.5", rank]) + 1,
                                                              np.mean(VARIANT_NLL["eva", "rho=1.5", rank])])
    lr_curves = figures.lr_curves_figure(exp)
    for ax, rank in zip(lr_curves.axes, ranks):
        assert list(labelled_lines(ax)) == VARIANT_COLUMNS
        stars = sorted(float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_label() == "_chosen")
        assert stars == sorted(selected_lr(init, variant, rank) for init, variant, r in VARIANT_NLL if r == rank)
