"""report: one self-contained page with every section, masks as pretraining draws them."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from model.masking import num_to_mask
from model.task import MaskingConfig
from pipelines.common import storage
from pipelines.report import ReportConfig, masked_views, render_report
from tests.pipelines.report_fixtures import write_report_inputs

SECTIONS = ["funnel", "samples", "codebook", "training", "evaluation"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_report_inputs(str(tmp_path_factory.mktemp("report_inputs")))


def render(inputs, out, **cfg):
    return render_report(ReportConfig(out=str(out), **cfg), inputs["shards"], inputs["text_tokenizer"],
                         inputs["plots"], MaskingConfig(), metrics_dir=inputs["metrics"])


def test_page_has_every_section_and_needs_nothing_else(inputs, tmp_path):
    metrics = render(inputs, tmp_path / "index.html", num_samples=4)
    page = (tmp_path / "index.html").read_text()
    assert metrics["sections"] == SECTIONS and metrics["missing"] == []
    assert [m for m in re.findall(r'<section id="(\w+)"', page)] == SECTIONS
    assert "<script" not in page and "http://" not in page and "https://" not in page and "url(" not in page
    sources = re.findall(r'<img alt="[^"]*" src="([^"]+)"', page)
    assert len(sources) == 2 * metrics["samples"] == 8  # each sample: its view and the masked view
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # funnel totals, per-reason columns, evaluation rows and the training charts are on the page
    assert ">260<" in page and ">missing_caption<" in page and ">retrieval mean_r1<" in page
    assert page.count("<polyline") >= 4 and page.count("<svg") >= 6
    assert metrics["val_code_rows"] > 0 and "codes used" in page


def test_same_inputs_give_the_same_bytes(inputs, tmp_path):
    render(inputs, tmp_path / "a.html")
    render(inputs, tmp_path / "b.html")
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()


def test_masked_view_hides_exactly_the_pretraining_count(inputs):
    row = storage.read_parquet(storage.list_files(storage.join(inputs["shards"], "val"))[0]).to_pylist()
    row = next(r for r in row if r["modality"] == "pair")
    n = len(row["visual_tokens"])
    view, masked, shown, total = masked_views(row["image"], n, 0.4, 1, seed=3)
    assert (shown, total) == (num_to_mask(0.4, n), n)
    a, b = (np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in (view, masked))
    side, grid = a.shape[0], int(n ** 0.5)
    patch = side // grid
    changed = (a != b).any(2).reshape(grid, patch, grid, patch).any(axis=(1, 3))  # (grid, grid)
    assert int(changed.sum()) == shown


def test_missing_inputs_are_shown_and_listed(inputs, tmp_path):
    empty = {**inputs, "metrics": str(tmp_path / "no-metrics"), "plots": str(tmp_path / "none.csv")}
    metrics = render(empty, tmp_path / "index.html")
    assert metrics["sections"] == SECTIONS
    assert metrics["missing"] == sorted([str(tmp_path / "none.csv")] + [
        str(tmp_path / "no-metrics" / f"{s}.json") for s in ("clean", "evaluate", "visual_tokenizer")])
    page = (tmp_path / "index.html").read_text()
    assert page.count('class="missing">missing input:') == 4
    assert metrics["samples"] > 0  # the shards were there, so the samples still show
