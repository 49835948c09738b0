"""Records -> paper-style tables: ``results/tables/<experiment>.{md,csv,tex}``.

One row per (task, model, rank, eval metric), one column per init method, cells "mean ± std (n)" over seeds, and the
paper's published numbers beside ours where the experiment names them (``paper: {table, model}`` in its config).
Every method is compared with random seed by seed (eva_bench/stats.py): a table of paired differences with 95 %
intervals and seeds needed follows each table, and a method is marked ▲ (better) or ▼ (worse) only where that
interval excludes 0; nothing is bold. Task groups also get rliable's IQM and probability of improvement.

    python -m eva_bench.tables [--experiment language_cpu]
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from pathlib import Path

import pandas as pd

from . import stats
from .results import LR_ROW, load_records, read_record
from .stats import lower_is_better  # noqa: F401  (tables.lower_is_better: the direction, now shared with stats)

KEYS = ["task", "model", "rank", "metric"]
GROUP_KEYS = ["group", "model", "rank", "metric"]
PAPER_DIR = Path(__file__).resolve().parent.parent / "results" / "paper"
BASELINE = "random"  # every comparison is against plain LoRA, seed by seed
MARKS = {stats.BETTER: " ▲", stats.WORSE: " ▼", stats.TIE: ""}
POI_TOL = 0.005  # PoI prints with 2 decimals: an interval that prints as reaching 0.50 is not marked
WORDS = {stats.BETTER: "better", stats.WORSE: "worse", stats.TIE: "inconclusive"}  # the CSV's verdict


NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


def split_method(method: str) -> tuple[str, str, str]:
    """A column name "eva rho=1.5@<hash>" as (init, variant, hash); "" where absent."""
    label, _, config = method.partition("@")
    init, _, variant = label.partition(" ")
    return init, variant, config


def natural_key(text: str) -> tuple:
    # numbers compare as numbers: rho=1 < rho=1.5 < rho=2, batches=4 < batches=16; the rest as text
    return tuple((0, float(part), "") if i % 2 else (1, 0.0, part) for i, part in enumerate(NUMBER.split(text)))


def method_order(methods) -> list[str]:
    """Inits in INITS order (unknown ones after, alphabetically), each followed by its variants in natural order."""
    from .init import INITS

    known = list(INITS)

    def key(method):
        init, variant, config = split_method(method)
        place = (0, known.index(init), "") if init in known else (1, 0, init)
        return place, variant != "", natural_key(variant), config

    return sorted(set(methods), key=key)


def digits(metric: str) -> int:
    """Decimals printed: NLL, loss and MSE 3; success rates in [0, 1] 2 (0.1 steps hide most differences);
    accuracies in % 1."""
    return 3 if lower_is_better(metric) else 2 if metric.endswith("success_rate") else 1


def print_tol(metric: str) -> float:
    return 0.5 * 10 ** -digits(metric)  # a bound that prints as 0 counts as 0: no marker on a printed tie


def signed(value: float, places: int) -> str:
    """``value`` with its sign, "+0.00" for anything that prints as zero. Zero is judged on the printed text:
    numpy's round() halves to even (round(np.float64(-0.005), 2) is -0.0) where the format rounds -0.005 to -0.01."""
    text = f"{value:+.{places}f}"
    return "+" + text[1:] if float(text) == 0 else text


def method_name(init: str, variant: str | None) -> str:
    """A run's column: "eva rho=1.5" for a run with a variant; the plain init keeps its name (random: the
    baseline)."""
    return init if variant is None or pd.isna(variant) else f"{init} {variant}"


def method_names(records: pd.DataFrame) -> pd.Series:
    variants = records["variant"] if "variant" in records else [None] * len(records)
    return pd.Series([method_name(i, v) for i, v in zip(records["init"], variants)], index=records.index, dtype=object)


def long_format(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, metric) of the successful runs; the newest record wins when a seed was rerun."""
    ok = records[records["status"] == "success"].copy()
    if ok.empty:
        return pd.DataFrame(columns=[*KEYS, "method", "seed", "value"])
    ok["method"] = method_names(ok)
    # a method run under two different configs in one experiment (and no variant to tell them apart) gets one
    # column per config
    hashes = ok.groupby(["task", "model", "method", "rank"])["config_hash"].transform("nunique")
    ok["method"] = ok["method"].where(hashes == 1, ok["method"] + "@" + ok["config_hash"])
    ok = ok.sort_values("finished_at").drop_duplicates(["task", "model", "method", "rank", "seed"], keep="last")
    metric_cols = [c for c in ok.columns if c.startswith("metric.") and not c.endswith("/n")]
    long = ok.melt(
        id_vars=["task", "model", "method", "rank", "seed"], value_vars=metric_cols, var_name="metric", value_name="value"
    ).dropna(subset=["value"])
    long["metric"] = long["metric"].str.removeprefix("metric.")
    return long


def group_means(long: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """Per seed, the mean over the tasks of each task group (with several groups) and over all tasks (VTAB's
    natural / specialized / structured and overall averages), as rows of task ``mean: <group>`` / ``mean: all``. A
    seed that lacks one of the group's tasks is left out of that mean, so every mean averages the same tasks. Empty
    without task groups."""
    if "task_group" not in records or records["task_group"].isna().all():
        return long.iloc[0:0]
    group_of = records.dropna(subset=["task_group"]).drop_duplicates("task").set_index("task")["task_group"]
    long = long[long["task"].isin(group_of.index)].assign(group=lambda d: d["task"].map(group_of))
    groups = sorted(group_of.unique()) if group_of.nunique() > 1 else []  # one group's mean is the mean of all
    parts = [(f"mean: {g}", long[long["group"] == g]) for g in groups] + [("mean: all", long)]
    out = []
    for label, part in parts:
        per_seed = part.groupby(["model", "method", "rank", "seed", "metric"]).agg(
            value=("value", "mean"), tasks=("task", "nunique")).reset_index()
        per_seed = per_seed[per_seed["tasks"] == part["task"].nunique()]
        out.append(per_seed.drop(columns="tasks").assign(task=label))
    return pd.concat(out, ignore_index=True)


def group_scores(long: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """The per-seed scores of each group of tasks, as rows of (group, unit: the group's task): the VTAB groups and
    RL suites (``task_group``; also ``all`` when there are several), and the eval sets of a task whose records
    average them (``avg/<metric>``: the seven commonsense sets). Empty without either."""
    parts = []
    if "task_group" in records and records["task_group"].notna().any():
        group_of = records.dropna(subset=["task_group"]).drop_duplicates("task").set_index("task")["task_group"]
        grouped = long[long["task"].isin(group_of.index)].assign(group=lambda d: d["task"].map(group_of))
        parts.append(grouped.assign(unit=grouped["task"]))
        if group_of.nunique() > 1:
            parts.append(grouped.assign(unit=grouped["task"], group="all"))
    split = long["metric"].str.split("/", n=1, expand=True).reindex(columns=[0, 1])
    sets = long.assign(unit=split[0], name=split[1], pair=long["task"] + "\t" + split[1].fillna(""))
    averaged = sets.loc[sets["unit"] == "avg", "pair"].unique()  # (task, metric) pairs the records average
    sets = sets[sets["pair"].isin(averaged) & (sets["unit"] != "avg")]
    parts.append(sets.assign(group=sets["task"], metric=sets["name"]))
    scores = pd.concat(parts, ignore_index=True) if parts else long.iloc[0:0]
    return scores[scores["metric"] != LR_ROW][[*GROUP_KEYS, "unit", "method", "seed", "value"]]


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    """Per cell: mean, std and n over seeds, and the mean's 95 % Student-t interval (mean_low, mean_high)."""
    grouped = long.groupby([*KEYS, "method"])["value"]
    agg = grouped.agg(mean="mean", std="std", n="count").reset_index()
    half = stats.t_half_width(agg["std"], agg["n"])
    return agg.assign(mean_low=agg["mean"] - half, mean_high=agg["mean"] + half)


def paper_numbers(experiment_records: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The published numbers an experiment is compared with (``paper: {table, model}`` in its config)."""
    config = read_record(Path(experiment_records["path"].iloc[0]))["config"]
    paper = config.get("paper")
    if not paper:
        return pd.DataFrame(columns=["eval", "metric", "method", "value"]), ""
    table = pd.read_csv(PAPER_DIR / f"{paper['table']}.csv")
    table = table[table["model"] == paper["model"]]
    return table, f"{paper['table']} ({paper['model']}): {table['source'].iloc[0].split(',')[0]}" if len(table) else ""


def cell(mean: float, std: float, n: int, digits: int, interval: tuple[float, float] | None = None) -> str:
    spread = "" if n < 2 or math.isnan(std) else f" ± {std:.{digits}f}"
    shown = "" if interval is None or n < 2 else f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return f"{mean:.{digits}f}{spread} ({n}){shown}"


def build_table(agg: pd.DataFrame, paper: pd.DataFrame, paired: pd.DataFrame | None = None,
                intervals: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The wide table (cells as text, ▲/▼ where ``paired`` says a method differs from random; ``intervals``: each
    mean's 95 % interval too) and a numeric twin of means for LaTeX/CSV consumers. Nothing is bold: the best mean of
    three seeds is often a tie."""
    methods = method_order(agg["method"].unique())
    verdicts = {} if paired is None else paired.set_index([*KEYS, "method"])["verdict"].to_dict()
    rows, numeric = [], []
    for key, group in agg.groupby(KEYS, sort=True):
        by_method = group.set_index("method")
        means = by_method["mean"]
        row = dict(zip(KEYS, key))
        for m in methods:
            if m not in by_method.index:
                row[m] = ""
                continue
            r = by_method.loc[m]
            if key[3] == LR_ROW:  # the tuned protocol's chosen lr: one per method and rank (not per seed), unranked
                row[m] = f"{r['mean']:.2g}"
                continue
            row[m] = cell(r["mean"], r["std"], int(r["n"]), digits(key[3]),
                          (r["mean_low"], r["mean_high"]) if intervals else None) + MARKS[verdicts.get((*key, m), 0)]
        eval_name, metric = key[3].split("/", 1) if "/" in key[3] else ("", key[3])
        match = paper[(paper["eval"] == eval_name) & (paper["metric"] == metric)]
        if "task" in paper:  # per-task published numbers (vision: the VTAB averages are rows of their own)
            match = match[match["task"] == key[0]]
        for _, p in match.iterrows():
            row[f"{p['method']} (paper)"] = f"{p['value']:g}"  # as published (59.7 %, a 0.86 success rate)
        rows.append(row)
        numeric.append({**dict(zip(KEYS, key)), **means.to_dict()})
    table = pd.DataFrame(rows).fillna("")
    return table, pd.DataFrame(numeric)


def paired_cell(r, places: int) -> str:
    if r["pairs"] < 2:
        return f"{signed(r['diff'], places)} (1 pair)" if r["pairs"] else ""
    need = "—" if pd.isna(r["seeds_needed"]) else (">1000" if r["seeds_needed"] > 1000 else int(r["seeds_needed"]))
    return (f"{signed(r['diff'], places)} [{signed(r['ci_low'], places)}, {signed(r['ci_high'], places)}]"
            f"{MARKS[r['verdict']]} need {need}")


def paired_table(paired: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per (task, model, rank, metric), one column per method: its paired difference from ``baseline``."""
    methods = method_order(paired["method"].unique())
    rows = []
    for key, group in paired.groupby(KEYS, sort=True):
        by_method = group.set_index("method")
        row = dict(zip(KEYS, key))
        for m in methods:
            row[f"{m} − {baseline}"] = "" if m not in by_method.index else paired_cell(by_method.loc[m],
                                                                                        digits(key[3]))
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate_tables(agg: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rliable's IQM per method and its probability of improvement over random, one row per (group, model, rank,
    metric)."""
    methods = method_order(agg["method"].unique())
    iqm_rows, poi_rows = [], []
    for key, group in agg.groupby(GROUP_KEYS, sort=True):
        by_method = group.set_index("method")
        places = digits(key[3])
        label = {**dict(zip(GROUP_KEYS, key)), "tasks": int(group["tasks"].iloc[0])}
        iqm, poi = dict(label), dict(label)
        for m in methods:
            r = by_method.loc[m] if m in by_method.index else None
            iqm[m] = "" if r is None else (f"{r['iqm']:.{places}f} [{r['iqm_low']:.{places}f}, "
                                           f"{r['iqm_high']:.{places}f}] ({int(r['seeds'])})")
            if m != BASELINE:
                poi[f"P({m} > {BASELINE})"] = "" if r is None or pd.isna(r["poi"]) else (
                    f"{r['poi']:.2f} [{r['poi_low']:.2f}, {r['poi_high']:.2f}]{MARKS[r['verdict']]}")
        iqm_rows.append(iqm)
        poi_rows.append(poi)
    return pd.DataFrame(iqm_rows), pd.DataFrame(poi_rows)


def paired_with_random(long: pd.DataFrame) -> pd.DataFrame:
    return stats.paired_differences(long[long["metric"] != LR_ROW], KEYS, BASELINE, tol=print_tol)


def column_parts(long: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Each row's column split as split_method does: (init, variant, config hash)."""
    split = long["method"].map(split_method)
    return split.str[0], split.str[1], split.str[2]


def paired_with_plain(long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """An ablation's own question: each variant of an init (other than random, whose variants the random table
    already compares) against that init's plain column, seed by seed. {init: paired differences}."""
    init, variant, config = column_parts(long)
    out = {}
    for name in method_order(init[(variant != "") & (init != BASELINE)].unique()):
        own = long[(init == name) & (config == "") & (long["metric"] != LR_ROW)]
        if name in set(own["method"]):
            out[name] = stats.paired_differences(own, KEYS, name, tol=print_tol)
    return out


def pair_table(results_dir: Path, experiment: str, method: str, base: str) -> pd.DataFrame:
    """Any two columns of an experiment, ``method`` − ``base``, paired by seed as the tables pair with random."""
    long = long_format(load_records(results_dir, experiment))
    missing = {method, base} - set(long["method"])
    if missing:
        raise SystemExit(f"{experiment}: no column {', '.join(sorted(missing))}; its columns: "
                         f"{', '.join(method_order(long['method'].unique()))}")
    both = long[long["method"].isin([method, base]) & (long["metric"] != LR_ROW)]
    return paired_table(stats.paired_differences(both, KEYS, base, tol=print_tol), baseline=base)


def paired_with_random_variant(long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Where random ran under a variant too (use_rslora=True), each other init's same variant against it: the init
    comparison under that setting. {random's column: paired differences}."""
    init, variant, config = column_parts(long)
    out = {}
    for label in sorted(set(variant[(init == BASELINE) & (variant != "") & (config == "")]), key=natural_key):
        same = long[(variant == label) & (config == "") & (long["metric"] != LR_ROW)]
        if same["method"].nunique() > 1:
            out[f"{BASELINE} {label}"] = stats.paired_differences(same, KEYS, f"{BASELINE} {label}", tol=print_tol)
    return out


def other_comparisons(long: pd.DataFrame) -> dict[str, tuple[str, pd.DataFrame]]:
    """The paired comparisons beside "method − random", each under its heading: {baseline column: (heading,
    differences)}."""
    out = {init: (f"The variants of {init} against plain {init} (paired as above: the ablation's question):", own)
           for init, own in paired_with_plain(long).items()}
    out |= {base: (f"Under the same setting, against {base} (paired as above):", same)
            for base, same in paired_with_random_variant(long).items()}
    return {base: (heading, differences) for base, (heading, differences) in out.items() if len(differences)}


PAIRED_NOTE = (
    "Paired differences from random: method − random on the seeds both have (same data order, same calibration"
    " batches), mean [95 % Student-t interval]; ▲ better, ▼ worse where the interval excludes 0 as printed. A"
    " t-interval, not a percentile bootstrap: with 3 seeds the bootstrap interval is about the range of the differences"
    " and excludes 0 whenever all three agree in sign, 1 time in 4 with no effect at all (the CSV carries it too, as"
    " boot_low/boot_high)."
    " need: seeds a paired difference of this mean and spread would need to exclude 0 at 95 % with 80 % power"
    " (n = ((1.96 + 0.84) · sd / |mean|)², at least 2, raised until the t quantiles with n − 1 degrees of freedom"
    " replace 1.96 and 0.84; — where the spread or the mean is 0): 3 seeds rarely suffice."
)
AGGREGATE_NOTE = (
    "Aggregates over each group's tasks (rliable): IQM, the interquartile mean of all (seed, task) scores, [95 %"
    " interval] (seeds); and P(method > random), the probability that the method beats random on a task (Mann-Whitney"
    " over seed pairs, ties count half; lower is better for NLL and loss), averaged over tasks, ▲/▼ where its"
    f" interval excludes 0.5. Intervals: stratified percentile bootstrap, {stats.RESAMPLES:,} resamples of the seeds"
    f" within each task (the same seeds for both methods), fixed RNG seed {stats.SEED}; with 3 seeds per task they are"
    " optimistic."
    " IQM pools raw scores: compare it across methods, not across metrics whose tasks have different scales (returns)."
)
CSV_COLUMNS = ["task", "model", "rank", "metric", "method", "mean", "std", "n", "mean_low", "mean_high", "paper",
               "baseline", "diff", "diff_sd", "pairs", "ci_low", "ci_high", "boot_low", "boot_high", "seeds_needed",
               "verdict", "tasks", "seeds", "iqm", "iqm_low", "iqm_high", "poi", "poi_low", "poi_high"]


def write_tables(results_dir: Path, experiment: str, out_dir: Path) -> Path | None:
    records = load_records(results_dir, experiment)
    if records.empty:
        warnings.warn(f"no records for experiment {experiment!r} under {results_dir}")
        return None
    long = long_format(records)
    means = group_means(long, records)
    agg, paired = aggregate(long), paired_with_random(long)
    paper, paper_source = paper_numbers(records)
    table, _ = build_table(agg, paper, paired)
    sections = [table.to_markdown(index=False)]
    if len(paired):
        sections.append(f"{PAIRED_NOTE}\n\n{paired_table(paired).to_markdown(index=False)}")
    other_baselines = other_comparisons(long)  # baseline column -> (heading, paired differences)
    for base, (heading, differences) in other_baselines.items():
        sections.append(f"{heading}\n\n{paired_table(differences, baseline=base).to_markdown(index=False)}")
    if len(means):  # the task-group averages get a table of their own below the per-task one
        agg_means, paired_means = aggregate(means), paired_with_random(means)
        means_table, _ = build_table(agg_means, paper, paired_means, intervals=True)
        sections.append("Task-group averages (per seed, the mean over the group's tasks; then, over seeds, mean ± std"
                        " (seeds) [the mean's 95 % Student-t interval]):"
                        "\n\n" + means_table.to_markdown(index=False))
        if len(paired_means):
            sections.append("Task-group averages, paired differences from random (as above):\n\n"
                            + paired_table(paired_means).to_markdown(index=False))
        for base, (heading, differences) in other_comparisons(means).items():
            sections.append(f"Task-group averages. {heading}\n\n"
                            + paired_table(differences, baseline=base).to_markdown(index=False))
            if base in other_baselines:  # the CSV gets both, told apart by task
                differences = pd.concat([other_baselines[base][1], differences], ignore_index=True)
            other_baselines[base] = (heading, differences)
        agg = pd.concat([agg, agg_means], ignore_index=True)
        paired = pd.concat([paired, paired_means], ignore_index=True)
        table = pd.concat([table, means_table], ignore_index=True).fillna("")
    scores = group_scores(long, records)
    groups = stats.aggregates(scores, GROUP_KEYS, BASELINE, tol=POI_TOL) if len(scores) else pd.DataFrame()
    if len(groups):
        iqm_table, poi_table = aggregate_tables(groups)
        sections.append(f"{AGGREGATE_NOTE}\n\n{iqm_table.to_markdown(index=False)}\n\n"
                        f"{poi_table.to_markdown(index=False)}")
    status = records["status"].value_counts().to_dict()

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / experiment
    notes = [
        f"# {experiment}",
        "",
        f"Runs: {len(records)} ({', '.join(f'{v} {k}' for k, v in sorted(status.items()))})."
        " Cells: mean ± std (n seeds) over successful runs; nothing bold: ▲ marks a method better than random, ▼ worse,"
        " only where the 95 % interval of its paired difference from random (tables below) excludes 0 (better: lower"
        " NLL, loss, MSE and error count; higher otherwise). Accuracies in %, NLL in nats (language: per answer token),"
        " success rates in [0, 1].",
    ]
    if paper_source:
        notes.append(f"Paper columns: {paper_source}; see results/paper/README.md.")
    if records.attrs.get("invalid"):  # unreadable, malformed or edited records: named, never silently dropped
        listed = ", ".join(f"{Path(p).name} ({why})" for p, why in records.attrs["invalid"])
        notes.append(f"Invalid records, left out (rerun them: the sweep redoes each one): {listed}.")
    bad = records[records["status"] != "success"]
    if len(bad):
        listed = ", ".join(f"{Path(p).stem} ({s})" for p, s in zip(bad["path"], bad["status"]))
        notes.append(f"Not in the means: {listed}.")
    stem.with_suffix(".md").write_text("\n".join(notes) + "\n\n" + "\n\n".join(sections) + "\n")
    write_csv(stem.with_suffix(".csv"), agg, paired, groups, paper, other_baselines)
    latex = table.copy()
    for col in latex.columns:
        latex[col] = latex[col].astype(str).str.replace("±", r"$\pm$").str.replace("_", r"\_").str.replace(
            "▲", r"$\blacktriangle$").str.replace("▼", r"$\blacktriangledown$")  # amssymb
    latex.columns = [str(c).replace("_", r"\_") for c in latex.columns]
    stem.with_suffix(".tex").write_text(latex.to_latex(index=False, escape=False))
    return stem.with_suffix(".md")


def write_csv(path: Path, agg: pd.DataFrame, paired: pd.DataFrame, groups: pd.DataFrame, paper: pd.DataFrame,
              other_baselines: dict[str, tuple[str, pd.DataFrame]] | None = None):
    """One row per cell (mean, std, n, paper; for methods other than random its paired difference from random), then
    one per group aggregate (task ``aggregate: <group>``: IQM, and PoI over random), then one per paired difference
    from another column (``other_baselines``: a variant against its plain init; no mean, std or n). ``baseline``
    names the column each difference is taken from; verdict: better, worse or inconclusive (the interval includes 0;
    PoI's includes 0.5)."""
    on = ["task", "metric", "method"] if "task" in paper else ["metric", "method"]
    out = agg.merge(
        paper.rename(columns={"value": "paper"})[[*on[:-2], "eval", "metric", "method", "paper"]].assign(
            metric=lambda d: d["eval"] + "/" + d["metric"]
        ).drop(columns="eval"),
        on=on,
        how="left",
    ).merge(paired.assign(baseline=BASELINE), on=[*KEYS, "method"], how="left")
    if len(groups):
        aggregates = groups.assign(task="aggregate: " + groups["group"]).drop(columns="group")
        aggregates.loc[aggregates["poi"].notna(), "baseline"] = BASELINE  # PoI is over random; IQM stands alone
        out = pd.concat([out, aggregates], ignore_index=True)
    for base, (_, differences) in (other_baselines or {}).items():
        out = pd.concat([out, differences.assign(baseline=base)], ignore_index=True)
    out = out.reindex(columns=CSV_COLUMNS)
    out["verdict"] = out["verdict"].map(WORDS)
    for col in ("n", "pairs", "seeds_needed", "tasks", "seeds"):
        out[col] = out[col].astype("Int64")  # counts, not floats; empty where they do not apply
    out.round(6).to_csv(path, index=False)


def experiments(results_dir: str | Path) -> list[str]:
    """Folders of ``results_dir`` holding records (not tables/, figures/, report/ or paper/)."""
    return sorted(p.name for p in Path(results_dir).iterdir() if p.is_dir() and any(p.glob("*.json")))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"), help="the records root")
    parser.add_argument("--out", type=Path, default=None, help="where tables go (default: <results>/tables)")
    parser.add_argument("--experiment", action="append", help="only these experiments (default: all)")
    parser.add_argument("--pair", nargs=2, metavar=("METHOD", "BASE"),
                        help="print METHOD − BASE (two columns, e.g. 'eva rho=2' 'eva rho=1'), paired by seed, for "
                             "each experiment instead of writing tables")
    args = parser.parse_args(argv)
    if args.pair:
        for experiment in args.experiment or experiments(args.results):
            print(f"# {experiment}\n\n{pair_table(args.results, experiment, *args.pair).to_markdown(index=False)}")
        return
    out = args.out or args.results / "tables"
    for experiment in args.experiment or experiments(args.results):
        path = write_tables(args.results, experiment, out)
        if path:
            print(f"wrote {path} (+ .csv, .tex)")


if __name__ == "__main__":
    main()
