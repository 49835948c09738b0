"""A static HTML report of the records: ``results/report/index.html``, linking one page per experiment
(``results/report/<experiment>.html``).

    python -m eva_bench.report [--results results] [--out results/report]

Each page says what was run (from the records and their configs), what it supports (a few sentences kept beside the
experiment's config, ``conf/experiment/<experiment>.md``), then shows its figures (eva_bench/figures.py), its tables
(``results/tables/<experiment>.md``, eva_bench/tables.py) and links every record. It renders what is on disk: run
``make report`` to rebuild tables and figures first. Self-contained: no script, no font or style from the network;
figures, tables and records are linked by relative paths, so the pages read from file://.
"""

from __future__ import annotations

import argparse
import html
import os
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from . import figures, tables
from .assets import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf" / "experiment"  # <experiment>.md: what its tables support, beside its config
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
dl.run { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.run dt { font-weight: bold; } dl.run dd { margin: 0; }
.supports { background: #f4f7fb; border-left: 4px solid #4a7ab5; padding: 0.2em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 0.15em 0.4em; white-space: nowrap; }
th { background: #f0f0f0; } td.right, th.right { text-align: right; }
p.note { font-size: 0.9em; color: #444; }
"""


def url(target: Path, page_dir: Path) -> str:
    """A relative link from a page in ``page_dir`` to ``target``: works from file:// and from any web root."""
    return quote(Path(os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())).as_posix())


def document(title: str, body: str) -> str:
    # the empty icon keeps the browser from asking for /favicon.ico (an error in the console under file://)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f'<link rel="icon" href="data:,">\n<link rel="stylesheet" href="style.css">\n</head>\n<body>\n{body}\n'
            f'</body>\n</html>\n')


def markdown_html(text: str) -> str:
    """The markdown tables.py and the experiment notes write, as HTML: headings, paragraphs and pipe tables (the
    only constructs they use; anything else is shown as escaped text)."""
    parts = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if len(lines) >= 2 and all(line.startswith("|") for line in lines):
            parts.append(pipe_table(lines))
        elif block.startswith("#"):
            level = min(len(block) - len(block.lstrip("#")) + 1, 6)  # "# x" -> h2: the page holds the h1
            parts.append(f"<h{level}>{html.escape(block.lstrip('#').strip())}</h{level}>")
        else:
            parts.append(f"<p>{'<br>'.join(html.escape(line) for line in lines)}</p>")
    return "\n".join(parts)


def pipe_table(lines: list[str]) -> str:
    """A markdown pipe table (header, alignment row, rows) as an HTML table; ``---:`` columns align right."""
    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    header, align, rows = cells(lines[0]), cells(lines[1]), [cells(line) for line in lines[2:]]
    right = [a.endswith(":") and not a.startswith(":") for a in align]

    def row(values, tag):
        return "<tr>" + "".join(f'<{tag}{" class=right" if r else ""}>{html.escape(v)}</{tag}>'
                                for v, r in zip(values, right)) + "</tr>"

    body = "\n".join(row(r, "td") for r in rows)
    return f'<div class="scroll"><table class="stats">\n<thead>{row(header, "th")}</thead>\n<tbody>\n{body}\n' \
           f"</tbody></table></div>"


def listing(values) -> str:
    return ", ".join(str(v) for v in values)


def by_task(records: list[dict], value) -> str:
    """``value(record)`` per task, as "a (task1, task2), b (task3)", or just "a" when all tasks agree."""
    seen: dict = {}
    for record in records:
        seen.setdefault(value(record), set()).add(record["run"]["task"])
    if len(seen) == 1:
        return str(next(iter(seen)))
    return "; ".join(f"{v} ({', '.join(sorted(t))})" for v, t in sorted(seen.items(), key=lambda kv: str(kv[0])))


def fixed_lr(record: dict) -> str:
    """The config's ``optim.lr``: the lr of the fixed protocol (a tuned record keeps it; its choice is apart)."""
    return f"{record['config']['optim']['lr']:g}"


def protocol_text(exp: figures.Experiment) -> str:
    """Fixed: the one lr every method trains at. Tuned: the grid, the selection metric and split, the chosen lrs."""
    records = exp.records
    chosen = [r["protocol"]["selected_lr"] for r in records if (r.get("protocol") or {}).get("selected_lr")]
    if not chosen:
        return f"fixed: every method at lr {by_task(records, fixed_lr)}"
    config = records[0]["config"]["protocol"]
    grid = listing(f"{lr:g}" for lr in config.get("lr_grid") or [])
    return (f"tuned: per task x method x rank, the lr of the grid [{grid}] with the best "
            f"{figures.selection_metric(exp)} on a validation split held out of the training data (validation_size "
            f"{config.get('validation_size')}, selection seed {config.get('selection_seed')}; {len(exp.selection)} "
            f"selection runs), then "
            f"every seed at that lr on the whole training split; chosen lrs range {min(chosen):g} to {max(chosen):g} "
            f"(the tables' lr* rows; the fixed protocol's lr: {by_task(records, fixed_lr)})")


def training_text(records: list[dict]) -> str:
    def length(r):
        train, config = r.get("train") or {}, r["config"]
        batch = (config.get("data") or {}).get("batch_size")
        return (f"{train.get('optimizer_steps')} optimizer steps, {train.get('examples')} examples seen"
                f"{f', batch {batch}' if batch else ''}, {config['optim'].get('epochs')} epoch(s), "
                f"{config['optim'].get('schedule')} schedule")

    return by_task([r for r in records if r["status"] == "success"], length)


def what_was_run(exp: figures.Experiment) -> list[tuple[str, str]]:
    frame = exp.frame
    groups = dict(zip(frame["task"], frame["task_group"])) if "task_group" in frame else {}
    tasks = [f"{t} ({groups[t]})" if isinstance(groups.get(t), str) else t for t in sorted(frame["task"].unique())]
    status = frame["status"].value_counts().sort_index()
    commits = sorted({((r.get("provenance") or {}).get("git") or {}).get("commit") or "?" for r in exp.records})
    finished = sorted(str(f) for f in frame.get("finished_at", pd.Series(dtype=str)).dropna())
    seconds = sum(r.get("seconds") or 0 for r in exp.records)
    methods = tables.method_order(tables.method_names(frame).unique()) if figures.has_variants(exp) else []
    return [
        ("model", listing(sorted(frame["model"].unique()))),
        ("tasks", listing(tasks)),
        ("inits", listing(tables.method_order(frame["init"].unique()))),
        *([("methods", listing(methods))] if methods else []),  # an ablation's columns, as the tables name them
        ("ranks", listing(sorted(int(r) for r in frame["rank"].unique()))),
        ("seeds", listing(sorted(int(s) for s in frame["seed"].unique()))),
        ("lr protocol", protocol_text(exp)),
        ("runs", f"{len(frame)} ({', '.join(f'{n} {s}' for s, n in status.items())})"),
        ("training", training_text(exp.records)),
        ("run time", f"{seconds / 3600:.2f} h summed over the runs (selection runs not counted)"),
        ("code", f"git {listing(c[:10] for c in commits)}; finished "
                 f"{finished[0][:10] if finished else '?'} to {finished[-1][:10] if finished else '?'}"),
    ]


def records_table(exp: figures.Experiment, page_dir: Path) -> str:
    rows = []
    frame = exp.frame.assign(method=tables.method_names(exp.frame))  # a variant beside its init: "eva rho=1.5"
    for _, r in frame.sort_values(["task", "method", "rank", "seed"]).iterrows():
        path = Path(r["path"])
        rows.append(f"<tr><td>{html.escape(r['task'])}</td><td>{html.escape(r['method'])}</td><td>{r['rank']}</td>"
                    f"<td>{r['seed']}</td><td>{html.escape(r['status'])}</td>"
                    f'<td><a href="{url(path, page_dir)}">{html.escape(path.name)}</a></td></tr>')
    return ('<div class="scroll"><table class="records">\n<thead><tr><th>task</th><th>init</th><th>rank</th>'
            "<th>seed</th><th>status</th><th>record</th></tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody></table></div>")


def experiment_page(exp: figures.Experiment, results_dir: Path, out_dir: Path, figures_dir: Path, tables_dir: Path,
                    conf_dir: Path) -> str:
    name = html.escape(exp.name)
    parts = [f'<p><a href="index.html">All experiments</a></p>\n<h1>{name}</h1>']

    parts.append("<h2>What was run</h2>\n<dl class=\"run\">" + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in what_was_run(exp)) + "</dl>")

    note = conf_dir / f"{exp.name}.md"
    supports = markdown_html(note.read_text()) if note.exists() else (
        f"<p>Nothing written yet: add a few sentences to conf/experiment/{name}.md.</p>")
    parts.append(f'<h2>What this supports</h2>\n<div class="supports">{supports}</div>')

    shown = [(n, figures_dir / exp.name / f"{n}.svg") for n in figures.FIGURES]
    shown = [(n, path) for n, path in shown if path.exists()]
    parts.append("<h2>Figures</h2>\n" + ("\n".join(
        f'<figure><img src="{url(path, out_dir)}" alt="{html.escape(n)}">'
        f"<figcaption>{html.escape(n)}: {html.escape(figures.caption(n))}</figcaption></figure>"
        for n, path in shown) or "<p>No figures: run <code>make figures</code>.</p>"))

    table = tables_dir / f"{exp.name}.md"
    if table.exists():
        links = " ".join(f'<a href="{url(table.with_suffix(s), out_dir)}">{s[1:]}</a>' for s in (".md", ".csv", ".tex")
                         if table.with_suffix(s).exists())
        text = table.read_text().split("\n", 1)[-1]  # without its "# <experiment>" heading: the page has one
        parts.append(f"<h2>Tables</h2>\n<p class=\"note\">From {html.escape(table.name)} ({links}).</p>\n"
                     + markdown_html(text))
    else:
        parts.append("<h2>Tables</h2>\n<p>No tables: run <code>make tables</code>.</p>")

    selection = results_dir / exp.name / "lr_search"
    extra = (f' The tuned protocol\'s {len(exp.selection)} selection runs are in <a href="{url(selection, out_dir)}">'
             f"{html.escape(exp.name)}/lr_search/</a>.") if exp.selection else ""
    parts.append(f"<h2>Records</h2>\n<p>{len(exp.frame)} records, one JSON file per run.{extra}</p>\n"
                 f"<details><summary>every record</summary>\n{records_table(exp, out_dir)}\n</details>")
    return document(f"{exp.name}: eva_bench report", "\n".join(parts))


def index_page(experiments: list[figures.Experiment], out_dir: Path, figures_dir: Path) -> str:
    rows = "\n".join(
        f'<tr><td><a href="{quote(e.name)}.html">{html.escape(e.name)}</a></td><td>{len(e.frame)}</td>'
        f"<td>{html.escape(listing(sorted(e.frame['model'].unique())))}</td>"
        f"<td>{html.escape(listing(sorted(e.frame['task'].unique())))}</td>"
        f"<td>{html.escape(listing(tables.method_order(e.frame['init'].unique())))}</td>"
        f"<td>{'tuned' if e.selection else 'fixed'}</td></tr>" for e in experiments)
    parts = [
        "<h1>eva_bench: LoRA initialization methods compared</h1>",
        "<p>One page per experiment: what was run, what it supports, figures, tables with paired statistics against"
        " random, and every run record. Built from the committed records by <code>make report</code>.</p>",
        '<div class="scroll"><table class="experiments">\n<thead><tr><th>experiment</th><th>runs</th><th>model</th>'
        f"<th>tasks</th><th>inits</th><th>lr protocol</th></tr></thead>\n<tbody>\n{rows}\n</tbody></table></div>",
    ]
    bench = [(n, figures_dir / "bench" / f"{n}.svg") for n in figures.BENCH_FIGURES]
    for n, path in bench:
        if path.exists():
            parts.append(f'<h2>Init cost</h2>\n<figure><img src="{url(path, out_dir)}" alt="{html.escape(n)}">'
                         f"<figcaption>{html.escape(figures.caption(n))} (bench/results/)</figcaption></figure>")
    return document("eva_bench report", "\n".join(parts))


def build(results_dir: Path, out_dir: Path, figures_dir: Path | None = None, tables_dir: Path | None = None,
          conf_dir: Path = CONF_DIR, names: list[str] | None = None) -> list[Path]:
    """Write the index and one page per experiment into ``out_dir``; returns the pages written."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    figures_dir = Path(figures_dir or results_dir / "figures")
    tables_dir = Path(tables_dir or results_dir / "tables")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "style.css").write_text(STYLE.lstrip())  # one stylesheet beside the pages, which all sit in out_dir
    loaded = [figures.load(results_dir, name) for name in names or tables.experiments(results_dir)]
    loaded = [e for e in loaded if len(e.frame)]
    written = []
    for exp in loaded:
        path = out_dir / f"{exp.name}.html"
        path.write_text(experiment_page(exp, results_dir, out_dir, figures_dir, tables_dir, conf_dir))
        written.append(path)
    index = out_dir / "index.html"
    index.write_text(index_page(loaded, out_dir, figures_dir))
    return [index, *written]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"), help="the records root")
    parser.add_argument("--out", type=Path, default=None, help="where the pages go (default: <results>/report)")
    parser.add_argument("--experiment", action="append", help="only these experiments (default: all)")
    args = parser.parse_args(argv)
    for path in build(args.results, args.out or args.results / "report", names=args.experiment):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
