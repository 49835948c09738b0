"""Figures from the run records: ``results/figures/<experiment>/<figure>.svg``, and the init methods' cost from the
bench records under ``results/figures/bench/``.

    python -m eva_bench.figures [--results results] [--experiment NAME ...] [--out results/figures]

Each figure is one small function of an experiment's records (``FIGURES``; the bench's in ``BENCH_FIGURES``) that
returns a matplotlib figure, or None where it does not apply (no tuned protocol, no EVA run, not a controls
experiment): its SVG is then removed, so a figure on disk always matches the records. Statistics are the tables'
(eva_bench/tables.py, eva_bench/stats.py): the same successful runs, task-group means and paired Student-t intervals.

The SVGs keep their text as text (diffable, searchable) and are byte-reproducible: a fixed hash salt for the ids, no
date in the metadata, fixed colours and sorted inputs. The first line of each function's docstring is its caption
(the report shows it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import stats, tables  # noqa: E402
from .assets import REPO_ROOT  # noqa: E402
from .protocol import VALIDATION_METRIC  # noqa: E402
from .results import load_records, read_record  # noqa: E402

plt.rcParams.update({
    "svg.hashsalt": "eva_bench",  # element ids from a fixed salt, not a random one: same records, same bytes
    "svg.fonttype": "none",  # text stays text in the SVG (not glyph paths): diffable, and small
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
})
SVG_METADATA = {"Date": None}  # no creation date: byte-identical output on every run

# the headline metric of each domain (language math / commonsense, vision, RL); other metrics stay in the tables
MAIN_METRICS = ("gsm8k/nll", "avg/accuracy", "test/accuracy", "rollout/success_rate")
CONTROL_BASELINES = ("eva", "random")  # controls ask: how far from EVA, how far from plain LoRA?
# one colour per method in every figure; methods not named here take a tab10 colour by their place in INITS
COLORS = {"random": "#4d4d4d", "eva": "#d62728", "lora_da": "#1f77b4", "ailora": "#2ca02c", "eva_rot": "#ff7f0e",
          "eva_perm": "#9467bd", "random_orth": "#8c564b"}
MARKERS = "osD^v"  # one per method in a panel: variants share their init's colour, not its marker
LAYER = re.compile(r"\.(\d+)\.")  # "model.layers.3.self_attn.q_proj": layer 3, module type "self_attn.q_proj"
BENCH_DIR = REPO_ROOT / "bench" / "results"


@dataclass
class Experiment:
    """One experiment's valid records: ``frame`` (load_records' rows, for the tables' statistics), ``records`` (the
    same runs' full records: curves, init reports, configs) and ``selection`` (the tuned protocol's lr_search runs)."""

    name: str
    frame: pd.DataFrame
    records: list[dict] = field(default_factory=list)
    selection: list[dict] = field(default_factory=list)


def load(results_dir: str | Path, name: str) -> Experiment:
    root = Path(results_dir)
    frame = load_records(root, name)
    records = [read_record(Path(p)) for p in frame["path"]] if len(frame) else []
    selection = [r for r in map(read_record, sorted((root / name / "lr_search").glob("*.json"))) if r is not None]
    return Experiment(name, frame, records, selection)


def color(method: str) -> str:
    from .init import INITS

    base = tables.split_method(method)[0]  # "eva rho=1.5", "eva@<hash>": a variant of eva keeps eva's colour
    known = list(INITS)
    return COLORS.get(base, f"C{known.index(base) % 10}" if base in known else "C9")


def method_of(record: dict) -> str:
    """A full record's column in the tables: its init, and its variant where it has one."""
    return tables.method_name(record["run"]["init"], (record.get("config") or {}).get("variant"))


def metric_label(metric: str) -> str:
    return f"{metric} ({'lower' if stats.lower_is_better(metric) else 'higher'} is better)"


def legend(ax) -> None:
    """The methods' legend right of the first row's last panel: outside the data, never over it."""
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def grid(rows: int, cols: int, width: float = 3.6, height: float = 2.8):
    """A rows x cols panel grid as a 2-D array of axes, whatever the shape."""
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def main_scores(exp: Experiment) -> pd.DataFrame:
    """Per seed, the main metrics in the tables' long format (task, model, method, rank, seed, metric, value). With
    task groups (vision, RL) the per-seed group means replace the tasks, as in the tables' group rows."""
    if exp.frame.empty:
        return pd.DataFrame(columns=["task", "model", "method", "rank", "seed", "metric", "value"])
    long = tables.long_format(exp.frame)
    means = tables.group_means(long, exp.frame)
    if len(means):
        long = means
    return long[long["metric"].isin(MAIN_METRICS)]


def mean_and_interval(values) -> tuple[float, float, float]:
    """Mean over seeds and its 95 % Student-t interval (the tables' interval; the mean itself below 2 seeds)."""
    values = np.asarray(values, dtype=float)
    low, high = stats.t_interval(values)
    mean = float(values.mean())
    return (mean, mean, mean) if math.isnan(low) else (mean, low, high)


def rank_figure(exp: Experiment):
    """Main metric against LoRA rank per init: mean over seeds, 95 % Student-t interval (points dodged sideways)."""
    scores = main_scores(exp)
    if scores.empty:
        return None
    panels = sorted(scores.groupby(["task", "metric"]).groups)
    fig, axes = grid(1, len(panels))
    for ax, (task, metric) in zip(axes[0], panels):
        part = scores[(scores["task"] == task) & (scores["metric"] == metric)]
        methods = tables.method_order(part["method"].unique())
        ranks = sorted(part["rank"].unique())
        for i, method in enumerate(methods):
            rows = [(r, *mean_and_interval(g["value"])) for r, g in part[part["method"] == method].groupby("rank")]
            r, mean, low, high = (np.array(c, dtype=float) for c in zip(*rows))
            dodge = 2 ** (0.06 * (i - (len(methods) - 1) / 2))  # a small sideways shift, so the bars do not overlap
            ax.errorbar(r * dodge, mean, yerr=[mean - low, high - mean], label=method, color=color(method),
                        marker="o", markersize=4, capsize=3, linewidth=1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(metric_label(metric))
        ax.set_title(f"{task}", fontsize=9)
    legend(axes[0][-1])
    fig.suptitle(f"{exp.name}: mean over seeds, 95 % t-interval", fontsize=10)
    fig.tight_layout()
    return fig


def tasks_figure(exp: Experiment):
    """Per task and per task-group mean (vision, RL): the main metric of each method, mean over seeds with its 95 %
    Student-t interval, one panel per rank and metric.

    The rank figure shows only the group means; this one shows which tasks carry a difference, or sit at a floor or
    ceiling where no init can differ."""
    if exp.frame.empty:
        return None
    long = tables.long_format(exp.frame)
    means = tables.group_means(long, exp.frame)
    if means.empty:
        return None
    columns = ["task", "method", "rank", "seed", "metric", "value"]
    scores = pd.concat([long[columns], means[columns]], ignore_index=True)
    scores = scores[scores["metric"].isin(MAIN_METRICS)]
    tasks = sorted(long["task"].unique()) + sorted(means["task"].unique())  # the group means last, on the right
    panels = sorted(scores.groupby(["metric", "rank"]).groups)
    fig, axes = grid(len(panels), 1, width=max(6.0, 0.8 * len(tasks)), height=3.2)
    for ax, (metric, rank) in zip(axes[:, 0], panels):
        part = scores[(scores["metric"] == metric) & (scores["rank"] == rank)]
        methods = tables.method_order(part["method"].unique())
        by_method = dict(list(part.groupby("method")))
        for i, method in enumerate(methods):
            offset = 0.7 * ((i + 0.5) / len(methods) - 0.5)  # methods side by side within a task's slot
            values = by_method[method].groupby("task")["value"]
            rows = sorted((tasks.index(task) + offset, *mean_and_interval(v)) for task, v in values)  # left to right
            x, mean, low, high = (np.array(c, dtype=float) for c in zip(*rows))
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], label=method, color=color(method),
                        marker=MARKERS[i % len(MARKERS)], markersize=3.5, capsize=2, linestyle="none", linewidth=1.0)
        ax.axvline(len(tasks) - means["task"].nunique() - 0.5, color="0.75", linewidth=0.8)  # tasks | means
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(f"r = {rank}", fontsize=9)
    legend(axes[0][0])
    fig.suptitle(f"{exp.name}: per task and task-group mean\nmean over seeds, 95 % t-interval", fontsize=10)
    fig.tight_layout()
    return fig


def selection_metric(exp: Experiment) -> str:
    """The validation metric the tuned protocol chose by, as its final records name it."""
    for record in exp.records:
        metric = (record.get("protocol") or {}).get("metric")
        if metric:
            return metric
    return VALIDATION_METRIC


def lr_curves_figure(exp: Experiment):
    """Tuned protocol: each selection run's validation score against its lr, per method; ★ the lr chosen, dotted the
    fixed protocol's lr."""
    if not exp.selection:
        return None
    metric = selection_metric(exp)
    points = pd.DataFrame([
        {**r["run"], "method": method_of(r), "lr": r["config"]["optim"]["lr"], "value": r["metrics"][metric]}
        for r in exp.selection if r["status"] == "success" and metric in r["metrics"]  # diverged: no score to draw
    ])
    if points.empty:
        return None
    chosen = {(r["run"]["task"], method_of(r), r["run"]["rank"]): r["protocol"]["selected_lr"]
              for r in exp.records if (r.get("protocol") or {}).get("selected_lr") is not None}
    # the final records' config holds the lr before selection replaced it: the fixed protocol's lr
    fixed = {r["run"]["task"]: r["config"]["optim"]["lr"] for r in exp.records}
    tasks, ranks = sorted(points["task"].unique()), sorted(points["rank"].unique())
    fig, axes = grid(len(tasks), len(ranks), width=3.8, height=2.6)
    for row, task in zip(axes, tasks):
        for ax, rank in zip(row, ranks):
            part = points[(points["task"] == task) & (points["rank"] == rank)]
            for method in tables.method_order(part["method"].unique()):
                # one line per selection seed (the protocol uses one), one point per selection run
                for k, (_, runs) in enumerate(part[part["method"] == method].groupby("seed")):
                    runs = runs.sort_values("lr")
                    ax.plot(runs["lr"], runs["value"], marker="o", markersize=3, linewidth=1, color=color(method),
                            label=method if k == 0 else f"_{method}")
                    lr = chosen.get((task, method, rank))
                    if lr is not None and (runs["lr"] == lr).any():
                        ax.plot([lr], runs.loc[runs["lr"] == lr, "value"].iloc[:1], marker="*", markersize=11,
                                linestyle="none", color=color(method), label="_chosen")
            if task in fixed:
                ax.axvline(fixed[task], color="0.5", linestyle=":", linewidth=1, label="_fixed")
            ax.set_xscale("log")
            grid_lrs = sorted(part["lr"].unique())
            ax.set_xticks(grid_lrs, [f"{lr:g}" for lr in grid_lrs], rotation=40, fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{task}, r = {rank}", fontsize=9)
            ax.set_xlabel("learning rate")
            ax.set_ylabel(metric_label(metric), fontsize=8)
    legend(axes[0][-1])
    fig.suptitle(f"{exp.name}: lr selection on the validation split (★ chosen; dotted: the fixed protocol's lr)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def layer_grid(values: dict, like: dict | None = None) -> tuple[list, list, np.ndarray]:
    """{module name: value} -> (layers, module types, a layers x types matrix, NaN where a layer lacks a type); rows
    and columns in the order of the modules of ``like`` (default: ``values``), so two heatmaps line up."""
    cells = {}
    for name, value in values.items():
        cells[layer_and_kind(name)] = value
    keys = [layer_and_kind(name) for name in (like or values)]
    layers = sorted(dict.fromkeys(k[0] for k in keys), key=lambda x: (isinstance(x, str), x))
    kinds = list(dict.fromkeys(k[1] for k in keys))
    matrix = np.array([[cells.get((layer, kind), np.nan) for kind in kinds] for layer in layers], dtype=float)
    return layers, kinds, matrix


def layer_and_kind(name: str) -> tuple:
    match = LAYER.search(name)
    return (int(match.group(1)), name[match.end():]) if match else ("other", name)


def heatmap(ax, layers, kinds, matrix, fmt: str, cmap: str, title: str):
    image = ax.imshow(matrix, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    for (i, j), value in np.ndenumerate(matrix):
        if not math.isnan(value):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=6, color="white"
                    if value < np.nanmean(matrix) else "black")
    return image


def eva_ranks_figure(exp: Experiment):
    """EVA's realised rank per layer and module type, and the explained variance of its components: one row per rank
    and allocation (each column's first task, lowest seed). Columns with the same allocation, as rho 1.5/2/3 often
    have, share a row that names them all; its variances are the first column's (theirs differ by solver noise)."""
    eva = sorted((r for r in exp.records if r["run"]["init"] == "eva" and (r.get("init_report") or {}).get("ranks")),
                 key=lambda r: (r["run"]["rank"], r["run"]["task"], r["run"]["seed"]))
    picked = {}
    for record in eva:  # EVA redistributes a budget of r x layers, and a variant (rho, calibration) changes how
        picked.setdefault((record["run"]["rank"], method_of(record)), record)
    if not picked:
        return None
    columns = tables.method_order({method for _, method in picked})  # the tables' order: rho=1 < rho=1.5 < rho=2
    rows = {}  # (rank, allocation) -> (the columns showing it, the first one's record)
    for (rank, method), record in sorted(picked.items(), key=lambda item: (item[0][0], columns.index(item[0][1]))):
        run = record["run"]
        allocation = json.dumps([record["init_report"]["ranks"], run["task"], run["seed"]], sort_keys=True)
        rows.setdefault((rank, allocation), ([], record))[0].append(method)
    fig, axes = grid(len(rows), 2, width=4.6, height=3.2)
    for row, ((rank, _), (methods, record)) in zip(axes, rows.items()):
        report, run = record["init_report"], record["run"]
        where = f"{' = '.join(methods)}, r = {rank}, {run['task']}, seed {run['seed']}"
        image = heatmap(row[0], *layer_grid(report["ranks"]), "g", "viridis", f"realised rank ({where})")
        fig.colorbar(image, ax=row[0], shrink=0.8)
        variance = (report.get("details") or {}).get("explained_variance")
        if variance:
            image = heatmap(row[1], *layer_grid(variance, like=report["ranks"]), ".2f", "magma",
                            "explained variance of its components")
            fig.colorbar(image, ax=row[1], shrink=0.8)
        else:
            row[1].set_axis_off()
    fig.suptitle(f"{exp.name}: EVA's rank redistribution", fontsize=10)
    fig.tight_layout()
    return fig


def loss_figure(exp: Experiment):
    """Training loss per method: mean over seeds, the band from the lowest to the highest seed."""
    rows = [{**r["run"], "method": method_of(r), "step": step, "loss": loss} for r in exp.records
            if r["status"] == "success"
            for step, loss in (r.get("train") or {}).get("curve") or [] if loss is not None]
    if not rows:
        return None
    curves = pd.DataFrame(rows)
    tasks, ranks = sorted(curves["task"].unique()), sorted(curves["rank"].unique())
    fig, axes = grid(len(tasks), len(ranks), width=3.6, height=2.4)
    for row, task in zip(axes, tasks):
        for ax, rank in zip(row, ranks):
            part = curves[(curves["task"] == task) & (curves["rank"] == rank)]
            for method in tables.method_order(part["method"].unique()):
                by_step = part[part["method"] == method].groupby("step")["loss"]
                summary = by_step.agg(["mean", "min", "max"])
                ax.plot(summary.index, summary["mean"], color=color(method), linewidth=1.2, label=method)
                ax.fill_between(summary.index, summary["min"], summary["max"], color=color(method), alpha=0.15,
                                linewidth=0)
            ax.set_title(f"{task}, r = {rank}", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
    legend(axes[0][-1])
    fig.suptitle(f"{exp.name}: training loss, mean over seeds (band: min to max)", fontsize=10)
    fig.tight_layout()
    return fig


def controls_figure(exp: Experiment):
    """Controls: each method's paired difference from EVA and from random, per rank, with its 95 % t-interval
    (the tables' statistic: seed by seed)."""
    if not exp.name.endswith("_controls"):
        return None
    scores = main_scores(exp)
    panels = sorted(scores.groupby(["task", "metric"]).groups) if len(scores) else []
    baselines = [b for b in CONTROL_BASELINES if b in set(scores["method"])]
    if not panels or not baselines:
        return None
    fig, axes = grid(len(panels), len(baselines), width=4.2, height=2.6)
    for row, (task, metric) in zip(axes, panels):
        part = scores[(scores["task"] == task) & (scores["metric"] == metric)]
        for ax, baseline in zip(row, baselines):
            diffs = stats.paired_differences(part, tables.KEYS, baseline)
            methods = tables.method_order(diffs["method"].unique())
            ranks = sorted(diffs["rank"].unique())
            for k, rank in enumerate(ranks):
                d = diffs[diffs["rank"] == rank].set_index("method").reindex(methods)
                y = np.arange(len(methods)) + 0.15 * (k - (len(ranks) - 1) / 2)
                low, high = (d["ci_low"].fillna(d["diff"]), d["ci_high"].fillna(d["diff"]))
                ax.errorbar(d["diff"], y, xerr=[d["diff"] - low, high - d["diff"]], linestyle="none",
                            marker="os^D"[k % 4], markersize=4, capsize=2, color=f"C{k}", label=f"r = {rank}")
            ax.axvline(0, color="0.6", linewidth=0.8)
            ax.set_yticks(range(len(methods)), methods)
            ax.set_xlabel(f"method − {baseline}: {metric_label(metric)}", fontsize=8)
            ax.set_title(f"{task}: paired difference from {baseline}", fontsize=9)
    legend(axes[0][-1])
    fig.suptitle(f"{exp.name}: paired differences over seeds, 95 % t-interval", fontsize=10)
    fig.tight_layout()
    return fig


def has_variants(exp: Experiment) -> bool:
    return "variant" in exp.frame and exp.frame["variant"].notna().any()


def variants_figure(exp: Experiment):
    """Variants (ablations): each variant's paired difference from random in the main metric, per task and rank,
    mean over seeds with its 95 % t-interval (the tables' statistic: seed by seed)."""
    if not has_variants(exp):
        return None
    scores = main_scores(exp)
    diffs = tables.paired_with_random(scores) if len(scores) else pd.DataFrame()
    if diffs.empty:  # no random run to compare with
        return None
    panels = sorted(diffs.groupby(["task", "metric"]).groups)
    ranks = sorted(diffs["rank"].unique())
    fig, axes = grid(len(panels), len(ranks), width=max(3.6, 0.5 * diffs["method"].nunique() + 1), height=2.8)
    for row, (task, metric) in zip(axes, panels):
        for ax, rank in zip(row, ranks):
            part = diffs[(diffs["task"] == task) & (diffs["metric"] == metric) & (diffs["rank"] == rank)]
            methods = tables.method_order(part["method"].unique())
            d = part.set_index("method").reindex(methods)
            low, high = d["ci_low"].fillna(d["diff"]), d["ci_high"].fillna(d["diff"])  # one pair: no interval
            for x, method in enumerate(methods):
                ax.errorbar([x], [d.loc[method, "diff"]], yerr=[[d.loc[method, "diff"] - low[method]],
                                                                  [high[method] - d.loc[method, "diff"]]],
                            linestyle="none", marker="o", markersize=4, capsize=3, color=color(method), label=method)
            ax.axhline(0, color="0.6", linewidth=0.8)
            ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(methods) - 0.5)
            ax.set_ylabel(f"method − {tables.BASELINE}\n{metric_label(metric)}", fontsize=8)
            ax.set_title(f"{task}, r = {rank}", fontsize=9)
    fig.suptitle(f"{exp.name}: paired difference from {tables.BASELINE} over seeds, 95 % t-interval", fontsize=10)
    fig.tight_layout()
    return fig


def init_cost_figure(bench_dir: Path):
    """Each init method's wall time against the plain forward passes over the calibration batches it read (the
    newest init benchmark)."""
    found = sorted(Path(bench_dir).glob("init-*.json"))
    if not found:
        return None
    import json

    bench = json.loads(found[-1].read_text())
    setups = sorted(bench["results"])
    fig, axes = grid(1, len(setups), width=4.4, height=3.6)
    for ax, setup in zip(axes[0], setups):
        methods = {m: v for m, v in bench["results"][setup].items() if "seconds" in v}  # a failed method has "error"
        order = sorted(methods, key=lambda m: methods[m]["seconds"])
        y = np.arange(len(order))
        ax.barh(y, [methods[m]["seconds"] for m in order], color="#9ecae1", label="init, total")
        ax.barh(y, [methods[m]["forwards_seconds"] for m in order], height=0.4, color="#08519c",
                label="its forward passes (plain model)")
        for i, m in enumerate(order):
            batches = methods[m].get("calibration_batches") or 0
            ax.text(methods[m]["seconds"], i, f" {batches} batches" if batches else " data-free", va="center",
                    fontsize=7)
        ax.set_yticks(y, order)
        ax.set_xlabel("seconds")
        ax.set_title(setup, fontsize=9)
        ax.set_xlim(0, max(methods[m]["seconds"] for m in order) * 1.35)  # room for the labels
    axes[0][0].legend(fontsize=8, frameon=False, loc="lower right")
    machine = bench.get("machine", {})
    fig.suptitle(f"init cost ({found[-1].name}: {machine.get('cpu', '?')}, {machine.get('torch_threads', '?')} "
                 "threads)", fontsize=10)
    fig.tight_layout()
    return fig


FIGURES = {  # file name -> figure of one experiment (None where it does not apply)
    "rank": rank_figure,
    "tasks": tasks_figure,
    "lr_curves": lr_curves_figure,
    "eva_ranks": eva_ranks_figure,
    "loss": loss_figure,
    "controls": controls_figure,
    "variants": variants_figure,
}
BENCH_FIGURES = {"init_cost": init_cost_figure}  # file name -> figure of the bench records


def caption(name: str) -> str:
    function = FIGURES.get(name) or BENCH_FIGURES[name]
    return " ".join(function.__doc__.split("\n\n")[0].split())


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata=SVG_METADATA, bbox_inches="tight")
    plt.close(fig)
    return path


def write(figures: dict, out_dir: Path, argument) -> list[Path]:
    """Each figure of ``figures`` drawn from ``argument`` into ``out_dir``; one that does not apply is removed."""
    written = []
    for name, function in figures.items():
        path = out_dir / f"{name}.svg"
        fig = function(argument)
        if fig is None:
            path.unlink(missing_ok=True)  # a stale figure would no longer match the records
        else:
            written.append(save(fig, path))
    return written


def write_experiment(results_dir: Path, experiment: str, out_dir: Path) -> list[Path]:
    return write(FIGURES, out_dir / experiment, load(results_dir, experiment))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"), help="the records root")
    parser.add_argument("--experiment", action="append", help="only these experiments (default: all, and the bench)")
    parser.add_argument("--out", type=Path, default=None, help="where figures go (default: <results>/figures)")
    parser.add_argument("--bench", type=Path, default=BENCH_DIR, help="the bench records (init-*.json)")
    args = parser.parse_args(argv)
    out = args.out or args.results / "figures"
    for experiment in args.experiment or tables.experiments(args.results):
        for path in write_experiment(args.results, experiment, out):
            print(f"wrote {path}")
    if not args.experiment:  # the bench figure belongs to no experiment: drawn with the full set
        for path in write(BENCH_FIGURES, out / "bench", args.bench):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
