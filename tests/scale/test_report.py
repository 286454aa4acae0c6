"""The report stage's page in a real headless browser (Debian's chromium)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.pipelines.report_fixtures import write_report_inputs
from tests.project import copy_project, run
from tests.scale.browser import chromium, load_page

pytestmark = pytest.mark.slow

# What a reader sees: each section's heading and height, every image decoded, the charts,
# and the rows of the evaluation table.
PAGE_FACTS = """JSON.stringify({
  sections: [...document.querySelectorAll("main > section")].map(s => ({
    id: s.id, title: s.querySelector("h2").textContent, height: s.getBoundingClientRect().height})),
  images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth})),
  charts: [...document.querySelectorAll("svg.chart")].map(s => s.getBoundingClientRect().width),
  lines: document.querySelectorAll("#training polyline").length,
  evaluation: [...document.querySelectorAll("#evaluation tbody tr td:first-child")].map(td => td.textContent),
  missing: document.querySelectorAll(".missing").length,
})"""


def test_report_stage_page_loads_in_chromium(tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    inputs = write_report_inputs(str(tmp_path / "inputs"), real_training=True)
    project = copy_project(str(tmp_path / "project"))
    for src, dst in ((inputs["shards"], "data/shards"), (inputs["text_tokenizer"], "data/text_tokenizer"),
                     (inputs["metrics"], "metrics"), (os.path.dirname(inputs["plots"]), "plots")):
        shutil.copytree(src, os.path.join(project, dst))
    run(project, "python", "-m", "stages.report")  # the dvc stage's command, params.yaml's paths
    metrics = json.loads(open(os.path.join(project, "metrics", "report.json")).read())
    assert metrics["missing"] == [] and metrics["samples"] > 0

    page = load_page(os.path.join(project, "report", "index.html"), PAGE_FACTS)
    assert page["console_errors"] == [] and page["exceptions"] == []
    assert all(url.startswith(("file://", "data:")) for url in page["requests"]), page["requests"]
    facts = json.loads(page["value"])
    assert [s["id"] for s in facts["sections"]] == ["funnel", "samples", "codebook", "training", "evaluation"]
    assert all(s["height"] > 80 for s in facts["sections"]), facts["sections"]
    assert len(facts["images"]) == 2 * metrics["samples"] and all(i["ok"] for i in facts["images"])
    assert len(facts["charts"]) >= 6 and all(w > 100 for w in facts["charts"])
    assert facts["lines"] >= 4 and facts["missing"] == 0
    assert "retrieval mean_r1" in facts["evaluation"] and "probe top1" in facts["evaluation"]
