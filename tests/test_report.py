"""The HTML report (eva_bench/report.py). In a real browser: headless Chromium opens every page, built here from the
committed records, tables and figures (results/), and checks that it loads without a console error, that every
figure renders at a non-zero size, that every table lists all the methods of its experiment and that the record links
resolve; a screenshot of each page goes to the test's tmp directory (pytest's ``tmp_path``; its path is printed with
-s). The browser tests are marked slow: they need Debian's chromium and chromium-driver, which `make test` (CI) does
not install; `make test-report` installs them and runs this file. Without a browser: pages from fixture records."""

import html
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from eva_bench import figures, report, results, tables
from tests.test_figures import write_demo
from tests.test_tables import VARIANT_COLUMNS, write_variant_records

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
EXPERIMENTS = tables.experiments(RESULTS)
INSTALL = "`make test-report` installs them (Debian's chromium and chromium-driver) and runs this test"


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    """The report's pages, from the committed records, tables and figures (links relative to those)."""
    out = tmp_path_factory.mktemp("report")
    report.build(RESULTS, out, figures_dir=RESULTS / "figures", tables_dir=RESULTS / "tables")
    return out


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(f"Chromium or ChromeDriver not found on PATH: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log("browser")
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)  # the Debian driver: nothing fetched
    yield driver
    driver.quit()


def open_page(browser, path: Path) -> list[dict]:
    """Load ``path`` (file://) and return the console's SEVERE entries (errors, failed resource loads)."""
    browser.get_log("browser")  # drop what an earlier page left
    browser.get(path.as_uri())
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def rendered_sizes(browser) -> list[tuple[str, float, float, bool]]:
    """(what, width, height, loaded) of every img and inline svg on the page, as laid out."""
    return browser.execute_script("""
        return Array.from(document.querySelectorAll('img, svg')).map(e => {
            const box = e.getBoundingClientRect();
            const loaded = e.tagName.toLowerCase() !== 'img' || (e.complete && e.naturalWidth > 0);
            return [e.getAttribute('src') || e.tagName, box.width, box.height, loaded];
        });""")


def table_words(browser, table) -> set[str]:
    """The words of every cell of ``table``, whether shown or inside a closed <details>."""
    text = browser.execute_script(
        "return Array.from(arguments[0].querySelectorAll('th, td')).map(c => c.textContent).join(' ');", table)
    return set(re.findall(r"\w+", text))  # "P(eva_rot > random)" -> P, eva_rot, random


@pytest.mark.slow
def test_index_links_every_experiment_and_shows_the_bench(browser, pages, tmp_path):
    assert not open_page(browser, pages / "index.html")
    linked = {a.get_attribute("href").rsplit("/", 1)[-1] for a in browser.find_elements("css selector", "td a")}
    assert linked == {f"{name}.html" for name in EXPERIMENTS}
    sizes = rendered_sizes(browser)
    assert sizes and all(w > 0 and h > 0 and ok for _, w, h, ok in sizes), sizes
    browser.save_screenshot(str(tmp_path / "index.png"))
    assert (tmp_path / "index.png").stat().st_size > 0
    print(f"screenshot: {tmp_path / 'index.png'}")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_page(browser, pages, tmp_path, experiment):
    severe = open_page(browser, pages / f"{experiment}.html")
    assert not severe, f"console errors on {experiment}.html: {severe}"

    sizes = rendered_sizes(browser)
    assert sizes, f"{experiment}.html shows no figure: run `make figures`"
    assert all(w > 0 and h > 0 and ok for _, w, h, ok in sizes), f"a figure did not render: {sizes}"

    records = results.load_records(RESULTS, experiment)
    methods = set(records["init"])
    found = browser.find_elements("css selector", "table.stats")
    assert found, f"{experiment}.html shows no table: run `make tables`"
    for table in found + browser.find_elements("css selector", "table.records"):
        missing = methods - table_words(browser, table)
        assert not missing, f"a table of {experiment}.html lacks {sorted(missing)}"

    links = [a.get_attribute("href") for a in browser.find_elements("css selector", "table.records a")]
    assert len(links) == len(records)
    assert all(Path(unquote(urlparse(link).path)).is_file() for link in links)

    browser.save_screenshot(str(tmp_path / f"{experiment}.png"))
    assert (tmp_path / f"{experiment}.png").stat().st_size > 0


def test_markdown_tables_become_html_tables_with_their_alignment():
    text = ("# demo\n\nRuns: 2.\nSecond line <b>.\n\n"
            "| task | rank | eva − random |\n|:--|--:|:--|\n| math | 2 | +0.1 ▲ |")
    out = report.markdown_html(text)
    assert "<h2>demo</h2>" in out and "<p>Runs: 2.<br>Second line &lt;b&gt;.</p>" in out
    assert '<th class=right>rank</th>' in out and "<td class=right>2</td>" in out and "<td>+0.1 ▲</td>" in out


def test_pages_from_fixture_records_link_figures_tables_and_records(tmp_path):
    write_demo(tmp_path / "results", tuned=True)
    figures.write_experiment(tmp_path / "results", "demo", tmp_path / "results" / "figures")
    (tmp_path / "results" / "tables").mkdir()
    (tmp_path / "results" / "tables" / "demo.md").write_text("# demo\n\n| task | random | eva |\n|:--|:--|:--|\n"
                                                             "| math | 2.9 | 2.8 |\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "demo.md").write_text("EVA is ahead (demo table).\n")
    out = tmp_path / "results" / "report"
    written = report.build(tmp_path / "results", out, conf_dir=tmp_path / "conf")
    assert [p.name for p in written] == ["index.html", "demo.html"]
    page = (out / "demo.html").read_text()
    assert "EVA is ahead (demo table)." in page
    assert "tuned: per task x method x rank, the lr of the grid [0.01, 0.02, 0.04]" in page
    assert "12 selection runs" in page and "6 records" not in page and "12 records" in page
    for link in re.findall(r'(?:src|href)="([^"]+)"', page):
        if not link.startswith(("data:", "index.html")):
            assert (out / link).exists(), link  # relative links that resolve from file://
    assert page.count("<img ") == 4 and page.count('<table class="stats">') == 1
    assert "https://" not in page and "<script" not in page  # self-contained


def test_an_experiment_with_variants_shows_its_variants_figure_and_names_its_variants(tmp_path):
    write_variant_records(tmp_path / "results")
    written = figures.write_experiment(tmp_path / "results", "ablation", tmp_path / "results" / "figures")
    assert "variants.svg" in [p.name for p in written]
    out = tmp_path / "results" / "report"
    report.build(tmp_path / "results", out, conf_dir=tmp_path / "conf")
    page = (out / "ablation.html").read_text()
    assert re.search(r'<img src="[^"]*ablation/variants\.svg" alt="variants">', page)
    assert f"<figcaption>variants: {html.escape(figures.caption('variants'))}</figcaption>" in page
    assert f"<dt>methods</dt><dd>{', '.join(VARIANT_COLUMNS)}</dd>" in page  # the tables' columns, in order
    assert page.count("<td>eva rho=1.5</td>") == 6  # its records, 2 ranks x 3 seeds
