"""Records -> paper-style tables: ``results/tables/<experiment>.{md,csv,tex}``.

One row per (task, model, rank, eval metric), one column per init method, cells "mean ± std (n)" over seeds, the
best method per row in bold (lowest for NLL, highest otherwise), and the paper's published numbers beside ours where
the experiment names them (``paper: {table, model}`` in its config).

    python -m eva_bench.tables [--experiment language_cpu]
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import pandas as pd

from .results import LR_ROW, load_records, read_record

KEYS = ["task", "model", "rank", "metric"]
PAPER_DIR = Path(__file__).resolve().parent.parent / "results" / "paper"


def method_order(methods) -> list[str]:
    from .init import INITS

    known = [m for m in INITS if m in set(methods)]
    return known + sorted(set(methods) - set(known))


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("nll", "loss", "mse", "errors"))


def long_format(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, metric) of the successful runs; the newest record wins when a seed was rerun."""
    ok = records[records["status"] == "success"].copy()
    if ok.empty:
        return pd.DataFrame(columns=[*KEYS, "method", "seed", "value"])
    # a method run under two different configs in one experiment gets one column per config
    hashes = ok.groupby(["task", "model", "init", "rank"])["config_hash"].transform("nunique")
    ok["method"] = ok["init"].where(hashes == 1, ok["init"] + "@" + ok["config_hash"])
    ok = ok.sort_values("finished_at").drop_duplicates(["task", "model", "method", "rank", "seed"], keep="last")
    metric_cols = [c for c in ok.columns if c.startswith("metric.") and not c.endswith("/n")]
    long = ok.melt(
        id_vars=["task", "model", "method", "rank", "seed"], value_vars=metric_cols, var_name="metric", value_name="value"
    ).dropna(subset=["value"])
    long["metric"] = long["metric"].str.removeprefix("metric.")
    return long


def group_means(long: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """Per seed, the mean over the tasks of each task group and over all tasks (VTAB's natural / specialized /
    structured and overall averages), as rows of task ``mean: <group>`` / ``mean: all``. A seed that lacks one of
    the group's tasks is left out of that mean, so every mean averages the same tasks. Empty without task groups."""
    if "task_group" not in records or records["task_group"].isna().all():
        return long.iloc[0:0]
    group_of = records.dropna(subset=["task_group"]).drop_duplicates("task").set_index("task")["task_group"]
    long = long[long["task"].isin(group_of.index)].assign(group=lambda d: d["task"].map(group_of))
    parts = [(f"mean: {g}", long[long["group"] == g]) for g in sorted(group_of.unique())] + [("mean: all", long)]
    out = []
    for label, part in parts:
        per_seed = part.groupby(["model", "method", "rank", "seed", "metric"]).agg(
            value=("value", "mean"), tasks=("task", "nunique")).reset_index()
        per_seed = per_seed[per_seed["tasks"] == part["task"].nunique()]
        out.append(per_seed.drop(columns="tasks").assign(task=label))
    return pd.concat(out, ignore_index=True)


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    grouped = long.groupby([*KEYS, "method"])["value"]
    return grouped.agg(mean="mean", std="std", n="count").reset_index()


def paper_numbers(experiment_records: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The published numbers an experiment is compared with (``paper: {table, model}`` in its config)."""
    config = read_record(Path(experiment_records["path"].iloc[0]))["config"]
    paper = config.get("paper")
    if not paper:
        return pd.DataFrame(columns=["eval", "metric", "method", "value"]), ""
    table = pd.read_csv(PAPER_DIR / f"{paper['table']}.csv")
    table = table[table["model"] == paper["model"]]
    return table, f"{paper['table']} ({paper['model']}): {table['source'].iloc[0].split(',')[0]}" if len(table) else ""


def cell(mean: float, std: float, n: int, digits: int) -> str:
    spread = "" if n < 2 or math.isnan(std) else f" ± {std:.{digits}f}"
    return f"{mean:.{digits}f}{spread} ({n})"


def build_table(agg: pd.DataFrame, paper: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The wide table (cells as text, best bold) and a numeric twin of means for LaTeX/CSV consumers."""
    methods = method_order(agg["method"].unique())
    rows, numeric = [], []
    for key, group in agg.groupby(KEYS, sort=True):
        by_method = group.set_index("method")
        digits = 3 if lower_is_better(key[3]) else 1
        means = by_method["mean"]
        shown = means.round(digits)  # compare what the reader sees: ties in print are ties
        best_value = shown.min() if lower_is_better(key[3]) else shown.max()
        best = set(shown.index[shown == best_value]) if shown.nunique() > 1 else set()  # all equal: no bold
        row = dict(zip(KEYS, key))
        for m in methods:
            if m not in by_method.index:
                row[m] = ""
                continue
            r = by_method.loc[m]
            if key[3] == LR_ROW:  # the tuned protocol's chosen lr: one per method and rank (not per seed), unranked
                row[m] = f"{r['mean']:.2g}"
                continue
            text = cell(r["mean"], r["std"], int(r["n"]), digits)
            row[m] = f"**{text}**" if m in best else text
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


def write_tables(results_dir: Path, experiment: str, out_dir: Path) -> Path | None:
    records = load_records(results_dir, experiment)
    if records.empty:
        warnings.warn(f"no records for experiment {experiment!r} under {results_dir}")
        return None
    long = long_format(records)
    means = group_means(long, records)
    agg = aggregate(long)
    paper, paper_source = paper_numbers(records)
    table, _ = build_table(agg, paper)
    sections = [table.to_markdown(index=False)]
    if len(means):  # the task-group averages get a table of their own below the per-task one
        agg_means = aggregate(means)
        means_table, _ = build_table(agg_means, paper)
        sections.append("Task-group averages (per seed, the mean over the group's tasks; then mean ± std over seeds):"
                        "\n\n" + means_table.to_markdown(index=False))
        agg = pd.concat([agg, agg_means], ignore_index=True)
        table = pd.concat([table, means_table], ignore_index=True).fillna("")
    status = records["status"].value_counts().to_dict()

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / experiment
    notes = [
        f"# {experiment}",
        "",
        f"Runs: {len(records)} ({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}). Cells: mean ± std (n seeds)"
        " over successful runs; best per row in bold (lowest NLL, loss, MSE and error count; highest otherwise)."
        " Accuracies in %, NLL in nats (language: per answer token), success rates in [0, 1].",
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
    on = ["task", "metric", "method"] if "task" in paper else ["metric", "method"]
    agg_out = agg.merge(
        paper.rename(columns={"value": "paper"})[[*on[:-2], "eval", "metric", "method", "paper"]].assign(
            metric=lambda d: d["eval"] + "/" + d["metric"]
        ).drop(columns="eval"),
        on=on,
        how="left",
    )
    agg_out.round(6).to_csv(stem.with_suffix(".csv"), index=False)
    latex = table.copy()
    for col in latex.columns:
        latex[col] = latex[col].astype(str).str.replace(r"\*\*(.*)\*\*", r"\\textbf{\1}", regex=True).str.replace(
            "±", r"$\pm$"
        ).str.replace("_", r"\_")
    latex.columns = [str(c).replace("_", r"\_") for c in latex.columns]
    stem.with_suffix(".tex").write_text(latex.to_latex(index=False, escape=False))
    return stem.with_suffix(".md")


def experiments(results_dir: Path) -> list[str]:
    return sorted(p.name for p in results_dir.iterdir() if p.is_dir() and p.name not in {"tables", "paper"})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"), help="the records root")
    parser.add_argument("--out", type=Path, default=None, help="where tables go (default: <results>/tables)")
    parser.add_argument("--experiment", action="append", help="only these experiments (default: all)")
    args = parser.parse_args(argv)
    out = args.out or args.results / "tables"
    for experiment in args.experiment or experiments(args.results):
        path = write_tables(args.results, experiment, out)
        if path:
            print(f"wrote {path} (+ .csv, .tex)")


if __name__ == "__main__":
    main()
