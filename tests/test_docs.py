"""The documentation: a short README whose results table and experiment pages are generated from the runs'
files, a site that builds, and docstrings that only name files that exist."""
import ast
import io
import json
import re
import shutil
import tokenize
from pathlib import Path

import pytest

from safeprobe.errors import UserError
from safeprobe.reporting import pages

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"report.md", "eval.md"}  # names of files safeprobe writes, not files of the repository
FILE_NAME = re.compile(r"(?<![\w./-])([\w./-]+\.(?:py|md|yaml))\b")


def test_the_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


def test_the_results_pages_and_the_readme_table_are_what_the_records_generate(tmp_path):
    experiments = tmp_path / "docs" / "experiments"
    shutil.copytree(ROOT / "docs" / "experiments", experiments)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    written = pages.write_pages(experiments, tmp_path / "README.md")
    assert written, "no results record"
    for page in written:  # the committed pages are up to date: nobody edited them by hand
        assert page.read_text(encoding="utf-8") == (ROOT / "docs" / "experiments" / page.name).read_text(
            encoding="utf-8"), f"{page.name} differs from its record: run `make results`"
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_claims_table_fills_each_verdict_from_its_record_and_names_the_claims_not_run():
    record = json.loads((ROOT / "docs" / "experiments" / "data" / f"{pages.HEADLINE}.json").read_text(encoding="utf-8"))
    name = pages.CLAIMS[0][0]
    text = pages.claims_page({name: {**record, "verdict": "SAP {{sap:harmful_score}} against {{sft:harmful_score}}"}})
    values = pages.figures_by_name(record["results"])
    row = next(line for line in text.splitlines() if line.startswith(f"| {pages.CLAIMS[0][1]} |"))
    assert f"SAP {values['sap:harmful_score']} against {values['sft:harmful_score']}" in row and f"({name}.md)" in row
    for other, claim, _ in pages.CLAIMS[1:]:
        assert f"| {claim} |" in text and f"not run yet (`configs/{other}.yaml`)" in text
        assert (ROOT / "configs" / f"{other}.yaml").is_file()  # every claim names a shipped comparison


def test_a_number_changed_in_a_results_file_changes_the_page_and_the_readme(tmp_path):
    experiments = tmp_path / "docs" / "experiments"
    shutil.copytree(ROOT / "docs" / "experiments", experiments)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    record_path = experiments / "data" / f"{pages.HEADLINE}.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    sst2 = record["results"]["base"]["eval"]["sst2"]
    metric = sst2["metric"]
    sst2[metric] = 0.123
    record_path.write_text(json.dumps(record), encoding="utf-8")
    pages.write_pages(experiments, tmp_path / "README.md")
    page = (experiments / f"{pages.HEADLINE}.md").read_text(encoding="utf-8")
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "12.3%" in page and "12.3%" in readme
    assert "12.3%" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_findings_figures_come_from_the_results(tmp_path):
    record = json.loads((ROOT / "docs" / "experiments" / "data" / f"{pages.HEADLINE}.json").read_text(encoding="utf-8"))
    results = record["results"]
    text = "SFT {{sft:harmful_score}} ({{sft:harmful_score:seeds}}); base {{ base:harmful_score }}."
    before = pages.filled(text, results, "x")
    figures = results["summary"]["default"]["sft"]["figures"]["harmful_score"]
    figures["mean"], figures["values"][0] = 0.987, 0.5
    after = pages.filled(text, results, "x")
    assert before != after and "SFT 98.7% (50, " in after and "{{" not in after


def test_a_findings_placeholder_that_names_no_figure_is_a_one_line_error():
    record = json.loads((ROOT / "docs" / "experiments" / "data" / f"{pages.HEADLINE}.json").read_text(encoding="utf-8"))
    with pytest.raises(UserError, match=r"data/x\.json: findings: no figure 'sap:harmfull_score'.*sap:harmful_score"):
        pages.filled("{{sap:harmfull_score}}", record["results"], "x")


def test_paired_and_sweep_figures_can_be_named(tmp_path):
    record = json.loads((ROOT / "docs" / "experiments" / "data" / f"{pages.HEADLINE}.json").read_text(encoding="utf-8"))
    results = record["results"]
    values = pages.figures_by_name(results)
    paired = pages.against_reference(results, "default")["sap"]
    assert values["sap:harm_removed"] == f"{100 * paired['harm_removed']:.0f}%"
    assert values["sap:harm_change"] == f"{100 * paired['harm_change']['mean']:+.1f}"
    sweep_point = {"value": 0.0001, "n_runs": 1, "n_done": 1, "runs": ["x"],
                   "figures": {"accuracy": {"mean": 0.5, "std": None, "n": 1, "values": [0.5]}}}
    results["sweep_summary"] = {"sft": {"learning_rate": [sweep_point]}}
    assert pages.filled("{{sft[learning_rate=0.0001]:accuracy}}", results, "x") == "50.0%"


def _comments_and_docstrings(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    chunks = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
              if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            chunks.append(ast.get_docstring(node) or "")
    return chunks


def test_docstrings_and_comments_name_only_files_that_exist():
    sources = [*ROOT.glob("safeprobe/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]
    missing = []
    for path in sources:
        for chunk in _comments_and_docstrings(path):
            for name in FILE_NAME.findall(chunk):
                if name in OUTPUTS or Path(name).name in OUTPUTS or re.search(r"[A-Z]{3,}", name):
                    continue  # an output safeprobe writes, or a placeholder such as FILE.yaml
                bases = [ROOT, ROOT / "safeprobe", *path.parents]
                if not any((base / name).exists() for base in bases):
                    missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing
    assert len(sources) > 50  # the glob found the code


def test_the_site_lists_every_page_it_has():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"([\w/-]+\.md)", config))
    present = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").glob("**/*.md")}
    assert present == listed, present ^ listed


PROBE = ("<script>window.addEventListener('load', () => { const images = [...document.images]; "
         "document.body.setAttribute('data-images', images.length); document.body.setAttribute('data-broken', "
         "images.filter(i => !(i.complete && i.naturalWidth > 0)).length); });</script>")


def _loaded_images(html: Path) -> tuple[int, int]:
    """(images, broken images) of `html` as headless Chromium renders it with every network request refused."""
    import subprocess
    probe = html.with_name("probed.html")
    probe.write_text(html.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed (Debian: apt-get install chromium)"
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r'<body data-images="(\d+)" data-broken="(\d+)"', out)
    assert body, out[-500:]
    return int(body[1]), int(body[2])


@pytest.mark.browser
def test_the_demo_report_loads_every_figure_offline_in_chromium(tmp_path):
    from safeprobe.reporting.report import write_report
    record = json.loads((ROOT / "docs" / "experiments" / "data" / f"{pages.HEADLINE}.json").read_text(encoding="utf-8"))
    write_report(tmp_path, record["results"])
    html = tmp_path / "report.html"
    assert not re.search(r'(src|href)="(https?:)?//', html.read_text(encoding="utf-8"))  # nothing fetched
    images, broken = _loaded_images(html)
    assert images >= 1 and broken == 0
    damaged = tmp_path / "damaged.html"  # the check can fail: a corrupt figure is a broken image
    damaged.write_text(html.read_text(encoding="utf-8").replace("base64,", "base64,XX", 1), encoding="utf-8")
    assert _loaded_images(damaged)[1] == 1
