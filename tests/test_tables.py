"""Tables from records: aggregation over seeds, paired markers (no bold), paper columns, failed runs left out
(golden files)."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from eva_bench import results, tables

GOLDEN = Path(__file__).parent / "golden"
VALUES = {  # (init, rank) -> per-seed (gsm8k/nll, gsm8k/accuracy)
    ("random", 2): [(2.90, 1.0), (2.92, 2.0), (2.94, 3.0)],
    ("eva", 2): [(2.80, 2.0), (2.81, 4.0), (2.85, 3.0)],
    ("random", 8): [(2.70, 5.0), (2.72, 5.0), (2.74, 5.0)],
    ("eva", 8): [(2.75, 6.0), (2.70, 7.0)],  # one seed failed: n = 2
}


def write_fixture_records(root: Path) -> None:
    config = {"paper": {"table": "eva_v5_language", "model": "llama2-7b"}}
    for (init, rank), seeds in VALUES.items():
        for seed, (nll, acc) in enumerate(seeds):
            run = {"experiment": "demo", "task": "math", "model": "tiny", "init": init, "rank": rank, "seed": seed,
                   "config_hash": f"h{rank}"}
            results.write_record(
                root / "demo" / f"{init}-{rank}-{seed}.json",
                {"run": run, "status": "success", "metrics": {"gsm8k/n": 100, "gsm8k/nll": nll, "gsm8k/accuracy": acc},
                 "config": config, "finished_at": f"2026-01-0{seed + 1}"},
            )
    failed = {"experiment": "demo", "task": "math", "model": "tiny", "init": "eva", "rank": 8, "seed": 2,
              "config_hash": "h8"}
    results.write_record(root / "demo" / "eva-8-2.json", {"run": failed, "status": "failed", "error": "boom",
                                                          "config": config})


@pytest.mark.parametrize("suffix", [".md", ".csv", ".tex"])
def test_tables_match_golden(tmp_path, suffix):
    write_fixture_records(tmp_path)
    tables.write_tables(tmp_path, "demo", tmp_path / "tables")
    produced = (tmp_path / "tables" / "demo").with_suffix(suffix).read_text()
    golden = GOLDEN / f"demo{suffix}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(produced)
    assert produced == golden.read_text()


def test_aggregation_numbers(tmp_path):
    write_fixture_records(tmp_path)
    agg = tables.aggregate(tables.long_format(results.load_records(tmp_path, "demo")))
    row = agg[(agg.method == "eva") & (agg["rank"] == 8) & (agg.metric == "gsm8k/accuracy")].iloc[0]
    assert row["n"] == 2 and row["mean"] == 6.5 and row["std"] == pytest.approx(0.7071, abs=1e-4)


def test_newest_record_wins_and_config_variants_get_their_own_column(tmp_path):
    run = {"experiment": "e", "task": "t", "model": "m", "init": "eva", "rank": 2, "seed": 0, "config_hash": "a"}
    results.write_record(tmp_path / "e" / "1.json", {"run": run, "status": "success", "metrics": {"x/nll": 1.0},
                                                     "finished_at": "2026-01-01", "config": {}})
    results.write_record(tmp_path / "e" / "2.json", {"run": {**run, "config_hash": "b"}, "status": "success",
                                                     "metrics": {"x/nll": 2.0}, "finished_at": "2026-01-02",
                                                     "config": {}})
    long = tables.long_format(results.load_records(tmp_path, "e"))
    assert sorted(long["method"]) == ["eva@a", "eva@b"]


def test_lower_is_better_for_nll_only():
    assert tables.lower_is_better("gsm8k/nll") and not tables.lower_is_better("avg/accuracy")
    assert isinstance(tables.method_order(["zzz", "eva", "random"]), list)
    assert tables.method_order(["zzz", "eva", "random"])[:2] == ["random", "eva"]


def test_paper_csv_is_well_formed():
    paper = pd.read_csv(tables.PAPER_DIR / "eva_v5_language.csv")
    assert set(paper.columns) == {"model", "eval", "metric", "method", "value", "source"}
    assert paper["source"].str.contains("2410.07170v5").all()


def test_nothing_is_bold_and_only_paired_verdicts_are_marked():
    agg = pd.DataFrame([
        {"task": "t", "model": "m", "rank": 2, "metric": "y/accuracy", "method": m, "mean": v, "std": 0.0, "n": 3}
        for m, v in (("random", 5.0), ("eva", 5.0), ("pissa", 1.0), ("corda", 9.0))
    ])
    paired = pd.DataFrame([  # eva ties random; pissa is worse; corda's mean is highest but its interval reaches 0
        {"task": "t", "model": "m", "rank": 2, "metric": "y/accuracy", "method": m, "verdict": v}
        for m, v in (("eva", 0), ("pissa", -1), ("corda", 0))
    ])
    table, _ = tables.build_table(agg, pd.DataFrame(columns=["eval", "metric", "method", "value"]), paired)
    row = table.iloc[0]
    assert not any("**" in row[m] for m in ("random", "eva", "pissa", "corda"))
    assert row["random"] == "5.0 ± 0.0 (3)" and row["eva"] == "5.0 ± 0.0 (3)" and row["corda"] == "9.0 ± 0.0 (3)"
    assert row["pissa"] == "1.0 ± 0.0 (3) ▼"


def test_paired_section_and_csv_columns(tmp_path):
    write_fixture_records(tmp_path)
    tables.write_tables(tmp_path, "demo", tmp_path / "tables")
    md = (tmp_path / "tables" / "demo.md").read_text()
    assert "**" not in md and "Student-t interval" in md and "3 seeds rarely suffice" in md
    csv = pd.read_csv(tmp_path / "tables" / "demo.csv")
    eva = csv[(csv.method == "eva") & (csv["rank"] == 2) & (csv.metric == "gsm8k/nll")].iloc[0]
    assert eva["diff"] == pytest.approx(-0.1) and eva["pairs"] == 3  # 2.80 - 2.90, 2.81 - 2.92, 2.85 - 2.94
    assert eva["ci_high"] < 0 and eva["verdict"] == "better"
    assert csv.loc[csv.method == "random", "diff"].isna().all()


def test_which_metrics_are_better_low():
    assert all(tables.lower_is_better(m) for m in ("gsm8k/nll", "train/loss", "validation/action_mse",
                                                    "rollout/errors"))
    assert not any(tables.lower_is_better(m) for m in ("test/accuracy", "rollout/success_rate", "rollout/return"))


def test_an_edited_or_unreadable_record_is_named_in_the_table_header(tmp_path):
    write_fixture_records(tmp_path)
    edited = tmp_path / "demo" / "eva-2-0.json"
    edited.write_text(edited.read_text().replace('"gsm8k/nll": 2.8', '"gsm8k/nll": 1.8'))
    (tmp_path / "demo" / "junk.json").write_text("[]")
    with pytest.warns(UserWarning, match="invalid record left out"):
        tables.write_tables(tmp_path, "demo", tmp_path / "tables")
    header = (tmp_path / "tables" / "demo.md").read_text().split("\n\n|")[0]
    assert "Invalid records, left out" in header and "eva-2-0.json (edited after it was written" in header
    assert "junk.json (not a record (a JSON list))" in header
    assert "Runs: 11 (" in header  # the edited one is not counted


# An ablation (issue 20): plain random, EVA under three rho variants and random under rslora, in one experiment
VARIANT_NLL = {  # (init, variant, rank) -> gsm8k/nll of seeds 0, 1, 2
    ("random", None, 2): [2.90, 2.92, 2.94],
    ("random", "rslora", 2): [2.89, 2.93, 2.92],  # differences -0.01, +0.01, -0.02: an interval across 0
    ("eva", "rho=1", 2): [2.80, 2.81, 2.85],  # all clearly lower: better
    ("eva", "rho=1.5", 2): [2.91, 2.88, 2.97],  # +0.01, -0.04, +0.03: across 0
    ("eva", "rho=3", 2): [2.95, 2.98, 2.99],  # all higher: worse
    ("random", None, 8): [2.70, 2.72, 2.74],
    ("random", "rslora", 8): [2.69, 2.70, 2.72],
    ("eva", "rho=1", 8): [2.66, 2.69, 2.70],
    ("eva", "rho=1.5", 8): [2.65, 2.68, 2.69],
    ("eva", "rho=3", 8): [2.71, 2.74, 2.73],
}
VARIANT_COLUMNS = ["random", "random rslora", "eva rho=1", "eva rho=1.5", "eva rho=3"]


LR_GRID = (0.001, 0.002, 0.004)


def selected_lr(init: str, variant: str | None, rank: int) -> float:
    return LR_GRID[(len(variant or "") + rank) % len(LR_GRID)]  # the lr chosen differs across variants and ranks


def validation_score(init: str, variant: str | None, rank: int, lr: float) -> float:
    return 1.0 if lr == selected_lr(init, variant, rank) else 2.0 + lr  # the chosen lr scores best


def write_variant_records(root: Path, experiment: str = "ablation") -> None:
    """Records of a tuned ablation: every (init, variant, rank) of VARIANT_NLL x 3 seeds, each variant with its
    own config (hash), training curve and selected lr (the tables' lr* row), and its selection runs (seed 0)."""
    for (init, variant, rank), values in VARIANT_NLL.items():
        for lr in LR_GRID:
            run = {"experiment": f"{experiment}/lr_search", "task": "math", "model": "tiny", "init": init,
                   "rank": rank, "seed": 0, "config_hash": f"{init}-{variant}-{rank}-{lr}"}
            results.write_record(root / experiment / "lr_search" / f"{init}-{variant}-{rank}-{lr}.json", {
                "run": run, "status": "success", "config": {"variant": variant, "optim": {"lr": lr}},
                "metrics": {"validation/nll": validation_score(init, variant, rank, lr)}})
        for seed, nll in enumerate(values):
            run = {"experiment": experiment, "task": "math", "model": "tiny", "init": init, "rank": rank,
                   "seed": seed, "config_hash": f"{init}-{variant}-{rank}"}
            record = {"run": run, "status": "success", "metrics": {"gsm8k/n": 10, "gsm8k/nll": nll},
                      "config": {"variant": variant, "optim": {"lr": 0.005, "epochs": 1, "schedule": "cosine"},
                                 "protocol": {"name": "tuned", "lr_grid": [0.002, 0.004], "validation_size": 8,
                                              "selection_seed": 0}},
                      "protocol": {"name": "tuned", "metric": "validation/nll",
                                   "selected_lr": selected_lr(init, variant, rank)},
                      "train": {"optimizer_steps": 30, "examples": 480, "curve": [[10, nll + 1], [20, nll]]},
                      "finished_at": f"2026-01-0{seed + 1}", "seconds": 10.0}
            results.write_record(root / experiment / f"{init}-{variant}-{rank}-{seed}.json", record)


def paired_t(method, base) -> tuple[float, float, float]:
    """method - base seed by seed: mean and 95 % Student-t interval, computed here from its definition."""
    d = np.subtract(method, base)
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def test_methods_order_inits_as_INITS_and_their_variants_naturally():
    shuffled = ["eva rho=3", "lora_da", "eva batches=64", "random rslora", "eva rho=1.5", "eva", "eva batches=4",
                "random", "eva rho=1", "eva batches=16", "eva label_mask", "eva rho=2"]
    assert tables.method_order(shuffled) == [
        "random", "random rslora", "eva", "eva batches=4", "eva batches=16", "eva batches=64", "eva label_mask",
        "eva rho=1", "eva rho=1.5", "eva rho=2", "eva rho=3", "lora_da"]


def test_a_variant_names_its_column_and_the_plain_init_keeps_its_name(tmp_path):
    write_variant_records(tmp_path)
    long = tables.long_format(results.load_records(tmp_path, "ablation"))
    assert tables.method_order(long["method"].unique()) == VARIANT_COLUMNS
    # the same variant label run under two configs still gets one column per config
    run = {"experiment": "e", "task": "t", "model": "m", "init": "eva", "rank": 2, "seed": 0}
    for config_hash in ("a", "b"):
        results.write_record(tmp_path / "e" / f"{config_hash}.json", {
            "run": {**run, "config_hash": config_hash}, "status": "success", "metrics": {"x/nll": 1.0},
            "finished_at": "2026-01-01", "config": {"variant": "rho=2"}})
    assert sorted(tables.long_format(results.load_records(tmp_path, "e"))["method"]) == ["eva rho=2@a",
                                                                                          "eva rho=2@b"]


def test_variants_are_compared_with_plain_random_seed_by_seed(tmp_path):
    write_variant_records(tmp_path)
    tables.write_tables(tmp_path, "ablation", tmp_path / "tables")
    csv = pd.read_csv(tmp_path / "tables" / "ablation.csv")
    nll = csv[(csv.metric == "gsm8k/nll") & (csv["rank"] == 2) & (csv.baseline.fillna("random") == "random")
              ].set_index("method")
    assert sorted(nll.index) == sorted(VARIANT_COLUMNS)
    base = VARIANT_NLL["random", None, 2]
    for (init, variant, _), verdict in {("eva", "rho=1", 2): "better", ("eva", "rho=1.5", 2): "inconclusive",
                                        ("eva", "rho=3", 2): "worse", ("random", "rslora", 2): "inconclusive"}.items():
        row = nll.loc[f"{init} {variant}"]
        mean, low, high = paired_t(VARIANT_NLL[init, variant, 2], base)
        assert row["diff"] == pytest.approx(mean, abs=1e-6) and row["pairs"] == 3
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
        assert row["verdict"] == verdict and (verdict != "inconclusive") == (low > 0 or high < 0)
    assert pd.isna(nll.loc["random", "diff"])  # the baseline itself

    md = (tmp_path / "tables" / "ablation.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| task"))
    assert [c.strip() for c in header.strip("|").split("|")][4:] == VARIANT_COLUMNS
    paired_header = [line for line in md.splitlines() if line.startswith("| task")][1]
    assert [c.strip() for c in paired_header.strip("|").split("|")][4:] == [
        f"{m} − random" for m in VARIANT_COLUMNS[1:]]
    row = next(line for line in md.splitlines() if line.startswith("| math") and "|      2 | gsm8k/nll" in line)
    cells = dict(zip(VARIANT_COLUMNS, [c.strip() for c in row.strip("|").split("|")][4:]))
    assert cells["eva rho=1"].endswith("▲") and cells["eva rho=3"].endswith("▼")
    assert not any(mark in cells[m] for m in ("eva rho=1.5", "random rslora") for mark in "▲▼")

    lr = csv[csv.metric == results.LR_ROW].set_index(["method", "rank"])["mean"]  # each variant's own chosen lr
    for init, variant, rank in VARIANT_NLL:
        method = init if variant is None else f"{init} {variant}"
        assert lr[method, rank] == pytest.approx(selected_lr(init, variant, rank))


def test_a_variant_is_also_compared_with_its_own_plain_init_and_with_random_under_its_setting(tmp_path):
    # the ablation's question (does label masking change EVA?) is eva variant - eva, not only each against random
    nll = {("random", None): [2.90, 2.92, 2.94], ("eva", None): [2.80, 2.85, 2.83],
           ("eva", "label_mask=True"): [2.75, 2.79, 2.80], ("random", "rslora"): [2.91, 2.90, 2.95],
           ("eva", "rslora"): [2.86, 2.84, 2.90]}
    for (init, variant), values in nll.items():
        for seed, value in enumerate(values):
            run = {"experiment": "mask", "task": "math", "model": "tiny", "init": init, "rank": 8, "seed": seed,
                   "config_hash": f"{init}{variant}"}
            results.write_record(tmp_path / "mask" / f"{init}-{variant}-{seed}.json", {
                "run": run, "status": "success", "metrics": {"gsm8k/nll": value}, "config": {"variant": variant},
                "finished_at": f"2026-01-0{seed + 1}"})
    md = tables.write_tables(tmp_path, "mask", tmp_path / "tables").read_text()
    section = md.split("against plain eva")[1]
    header, _, row = [line for line in section.splitlines() if line.startswith("|")][:3]
    assert [c.strip() for c in header.strip("|").split("|")][4:] == ["eva label_mask=True − eva", "eva rslora − eva"]
    mean, low, high = paired_t(nll["eva", "label_mask=True"], nll["eva", None])
    assert row.split("|")[5].strip().startswith(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    assert "against plain random" not in md  # random's variants are in the table against random already
    # under a setting random also ran with, the init comparison within that setting
    section = md.split("Under the same setting, against random rslora")[1]
    header, _, row = [line for line in section.splitlines() if line.startswith("|")][:3]
    assert [c.strip() for c in header.strip("|").split("|")][4:] == ["eva rslora − random rslora"]
    mean, low, high = paired_t(nll["eva", "rslora"], nll["random", "rslora"])
    assert row.split("|")[5].strip().startswith(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    # the CSV carries every comparison, each row naming its baseline column
    csv = pd.read_csv(tmp_path / "tables" / "mask.csv").set_index(["method", "baseline"])
    for method, base in [("eva label_mask=True", "eva"), ("eva rslora", "eva"), ("eva rslora", "random rslora"),
                         ("eva rslora", "random"), ("eva", "random")]:
        init, variant = (method.split(" ", 1) + [None])[:2]
        base_init, base_variant = (base.split(" ", 1) + [None])[:2]
        mean, low, high = paired_t(nll[init, variant], nll[base_init, base_variant])
        assert csv.loc[(method, base), ["diff", "ci_low", "ci_high"]].tolist() == pytest.approx([mean, low, high],
                                                                                                 abs=1e-6)
    assert pd.isna(csv.loc[("eva label_mask=True", "eva"), "mean"])  # a comparison row; the cell row has it
    assert csv.loc[("eva label_mask=True", "random"), "mean"] == pytest.approx(np.mean(nll["eva", "label_mask=True"]))


def test_pair_prints_any_two_columns_paired_by_seed_and_names_the_columns_when_one_is_missing(tmp_path, capsys):
    write_variant_records(tmp_path)
    tables.main(["--results", str(tmp_path), "--experiment", "ablation", "--pair", "eva rho=3", "eva rho=1"])
    row = next(line for line in capsys.readouterr().out.splitlines() if "|      2 | gsm8k/nll" in line)
    mean, low, high = paired_t(VARIANT_NLL["eva", "rho=3", 2], VARIANT_NLL["eva", "rho=1", 2])
    assert row.split("|")[5].strip().startswith(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    with pytest.raises(SystemExit, match="no column eva rho=2; its columns: random, random rslora, eva rho=1"):
        tables.main(["--results", str(tmp_path), "--experiment", "ablation", "--pair", "eva rho=2", "eva rho=1"])


# CW10 (issue 18): the paper's EVA+DoRA mean must land beside the column of the runs swept as {init: eva,
# lora.use_dora: true}, which the sweeper labels variant 'use_dora=True'
CW10_SUCCESS = {  # (init, variant) -> per-seed success on (hammer, push-wall)
    ("random", None): [(0.5, 0.7), (0.6, 0.8)],
    ("eva", None): [(0.6, 0.7), (0.7, 0.8)],
    ("eva", "use_dora=True"): [(0.8, 0.9), (0.7, 0.9)],
}


CW10_TASKS = ("hammer-v3", "push-wall-v3")


def write_cw10_records(root: Path) -> None:
    """CW10_SUCCESS as the records of experiment ``cw10`` (one task group, the paper's CW10 table)."""
    config_of = {variant: {"variant": variant, "paper": {"table": "eva_v5_rl", "model": "dt-mt40"}}
                 for variant in (None, "use_dora=True")}
    for (init, variant), seeds in CW10_SUCCESS.items():
        for seed, per_task in enumerate(seeds):
            for task, success in zip(CW10_TASKS, per_task):
                run = {"experiment": "cw10", "task": task, "model": "dt_cpu", "init": init, "rank": 8, "seed": seed,
                       "config_hash": f"{init}-{variant}", "task_group": "mw_cw10_cpu"}
                results.write_record(root / "cw10" / f"{task}-{init}-{variant}-{seed}.json", {
                    "run": run, "status": "success", "config": config_of[variant],
                    "metrics": {"rollout/success_rate": success, "rollout/n": 20}, "finished_at": "2026-01-01"})


def test_the_papers_eva_dora_mean_lands_beside_the_use_dora_variant_column(tmp_path):
    write_cw10_records(tmp_path)
    tables.write_tables(tmp_path, "cw10", tmp_path / "tables")

    csv = pd.read_csv(tmp_path / "tables" / "cw10.csv")
    cells = csv[csv["mean"].notna()]  # the rows of other baselines carry a difference only
    mean_all = cells[(cells.task == "mean: all") & (cells.metric == "rollout/success_rate")].set_index("method")
    assert mean_all.loc["eva use_dora=True", "mean"] == pytest.approx(np.mean([0.8, 0.9, 0.7, 0.9]))
    assert mean_all["paper"].to_dict() == {"random": 0.86, "eva": 0.90, "eva use_dora=True": 0.94}
    assert csv.loc[~csv.task.str.startswith("mean"), "paper"].isna().all()  # per task the paper states nothing

    md = (tmp_path / "tables" / "cw10.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| task") and "(paper)" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in md.splitlines() if line.startswith("| mean: all") and "rollout/success_rate" in line)
    cells = dict(zip(columns, [c.strip() for c in row.strip("|").split("|")]))
    per_seed = [np.mean(tasks) for tasks in CW10_SUCCESS["eva", "use_dora=True"]]  # the mean over tasks, per seed
    half = scipy.stats.t.ppf(0.975, 1) * np.std(per_seed, ddof=1) / np.sqrt(2)
    assert cells["eva use_dora=True"] == (f"{np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f} (2) "
                                          f"[{np.mean(per_seed) - half:.2f}, {np.mean(per_seed) + half:.2f}]")
    assert cells["eva use_dora=True (paper)"] == "0.94"
    assert "| mean: mw_cw10_cpu" not in md  # one group: its mean is the mean over all tasks, shown once

    # the paper's EVA+DoRA vs EVA question, asked of the group mean too (per seed, paired)
    section = md.split("Task-group averages. The variants of eva against plain eva")[1]
    row = next(line for line in section.splitlines() if line.startswith("| mean: all"))
    dora_minus_eva = [np.mean(d) - np.mean(e) for d, e in zip(CW10_SUCCESS["eva", "use_dora=True"],
                                                                CW10_SUCCESS["eva", None])]
    assert f"{np.mean(dora_minus_eva):+.2f} [" in row
    in_csv = csv[(csv.task == "mean: all") & (csv.baseline == "eva")]
    assert in_csv["diff"].tolist() == pytest.approx([np.mean(dora_minus_eva)])
    assert cells["eva (paper)"] == "0.9" and cells["random (paper)"] == "0.86"


def test_signed_prints_the_sign_of_the_printed_value():
    assert tables.signed(np.float64(0.0) - np.float64(0.005), 2) == "-0.01"  # numpy's round() would say -0.0
    assert tables.signed(np.float64(-0.004), 2) == "+0.00"  # prints as zero: no minus sign
    assert tables.signed(-0.0, 3) == "+0.000" and tables.signed(0.126, 2) == "+0.13"
