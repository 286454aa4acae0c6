"""report stage: one self-contained HTML page of the whole run.

Sections (each an ``<section id=...>``): the data funnel per source and rejection
reason (metrics/clean.json), sample image-text pairs from the held-out shards with
the patches that block-wise masking hides drawn over them, the visual tokenizer's
codebook usage (metrics/visual_tokenizer.json and the codes in the val shards),
training curves (pretrain.plots_path, inline SVG), and evaluation, pretrained vs
random init (metrics/evaluate.json).

The page needs nothing else: CSS is inline, images are data: URIs, charts are SVG,
there are no scripts and no external requests. It holds no timestamp, so the same
inputs give the same bytes. An input that is missing (a partial run) leaves its
section with a visible note and is listed in the returned metrics, never skipped
silently.

Modules: charts.py (inline SVG charts and HTML helpers); this module reads the inputs and
builds the page.
"""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np

from pipelines.common import storage
from pipelines.common.configs import check
from pipelines.common.metrics import METRICS_DIR
from pipelines.report.charts import CSS, KEPT_COLOR, bar_chart, color_of, esc, legend, line_chart, stacked_bars, table

CODE_ROWS = 50_000      # val rows whose visual tokens are counted for codebook usage
MAX_BARS = 512          # rank-frequency chart: codes averaged into at most this many bars
SAMPLE_PX = 144         # displayed size of a sample image


@dataclass(frozen=True)
class ReportConfig:
    out: str = field(kw_only=True)
    num_samples: int = 6     # image-text pairs shown from the val shards
    seed: int = 0            # seeds the drawn masks

    def __post_init__(self):
        check(bool(self.out), "report.out: must not be empty")
        check(0 <= self.num_samples <= 64, "report.num_samples: must be in [0, 64]")


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    body: str
    missing: tuple[str, ...] = ()


def render_report(cfg: ReportConfig, shards_dir: str, text_tokenizer_dir: str, plots_path: str,
                  masking, metrics_dir: str = METRICS_DIR) -> dict:
    """Write the page to ``cfg.out``; ``masking`` is the pretraining MaskingConfig (ratios, min_block).
    Returns metrics/report.json: sections, inputs that were missing, page size."""
    metric = lambda stage: _json_or_none(storage.join(metrics_dir, f"{stage}.json"))  # noqa: E731
    val = _val_rows(shards_dir, cfg.num_samples)
    sections = [
        funnel_section(metric("clean"), storage.join(metrics_dir, "clean.json")),
        samples_section(val, text_tokenizer_dir, masking, cfg),
        codebook_section(metric("visual_tokenizer"), val, storage.join(metrics_dir, "visual_tokenizer.json")),
        training_section(plots_path, metric("pretrain")),
        evaluation_section(metric("evaluate"), storage.join(metrics_dir, "evaluate.json")),
    ]
    page = render_page(sections)
    storage.write_bytes(cfg.out, page.encode("utf-8"))
    return {"out": cfg.out, "bytes": len(page.encode("utf-8")), "sections": [s.id for s in sections],
            "missing": sorted({m for s in sections for m in s.missing}),
            "samples": len(val["pairs"]), "val_code_rows": int(val["codes"].shape[0])}


def render_page(sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{esc(s.title)}</h2>'
        + "".join(f'<p class="missing">missing input: {esc(m)}</p>' for m in s.missing)
        + f"{s.body}</section>" for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>BEiT-3 pipeline report</title><style>{CSS}</style></head><body>"
            "<header><h1>BEiT-3 pretraining pipeline report</h1>"
            f"<p>data &rarr; tokenizers &rarr; shards &rarr; pretraining &rarr; evaluation</p><nav>{nav}</nav></header>"
            f"<main>{body}</main></body></html>\n")


# ---------------------------------------------------------------- data funnel

def funnel_section(clean: dict | None, path: str) -> Section:
    title = "Data funnel"
    if clean is None:
        return Section("funnel", title, "", (path,))
    sources = clean.get("sources", {})
    reasons = sorted({r for s in sources.values() for r in s.get("rejected_by_reason", {})})
    colours = {r: color_of(i + 1) for i, r in enumerate(reasons)}
    bars = [(name, [("kept", s["kept"], KEPT_COLOR)]
             + [(r, s.get("rejected_by_reason", {}).get(r, 0), colours[r]) for r in reasons])
            for name, s in sources.items()]
    rows = [[name, s.get("kind"), s["rows_in"], s["kept"], s["rejected"],
             *[s.get("rejected_by_reason", {}).get(r, 0) for r in reasons]] for name, s in sources.items()]
    rows.append(["total", "", clean.get("rows_in"), clean.get("kept"), clean.get("rejected"),
                 *[sum(s.get("rejected_by_reason", {}).get(r, 0) for s in sources.values()) for r in reasons]])
    body = (f'<p class="note">Every input row is kept or rejected with a reason '
            f"(rows in = kept + rejected); rejected rows are in the clean stage's rejected/ parts.</p>"
            + stacked_bars(bars) + legend([("kept", KEPT_COLOR)] + [(r, colours[r]) for r in reasons])
            + table(["source", "kind", "rows in", "kept", "rejected", *reasons], rows, numeric_from=2))
    kinds = [f"<div><h3>{esc(kind)}: rows through each step</h3>"
             + table(["step", "in", "dropped", "forwarded"],
                     [[st["step"], st["in"], st["dropped"], st["forwarded"]] for st in info.get("steps", [])]) + "</div>"
             for kind, info in clean.get("kinds", {}).items()]
    return Section("funnel", title, body + f'<div class="row">{"".join(kinds)}</div>')


# ---------------------------------------------------------------- samples

def _val_rows(shards_dir: str, num_pairs: int) -> dict:
    """From the val shards (train if there are none): the first ``num_pairs`` pair rows and the
    visual tokens of up to CODE_ROWS rows -> {"pairs", "codes" (M, N) int, "split", "missing"}.
    Reads batch by batch and only the columns needed, so real shards (MBs of images) stay cheap."""
    out = {"pairs": [], "codes": np.zeros((0, 0), np.int64), "split": None, "missing": []}
    manifest_path = storage.join(shards_dir, "manifest.json")
    if not storage.exists(manifest_path):
        out["missing"] = [manifest_path]
        return out
    shards = storage.read_json(manifest_path)["shards"]
    split = "val" if any(s["split"] == "val" for s in shards) else "train"
    paths = [storage.join(shards_dir, s["path"]) for s in shards if s["split"] == split]
    for batch in _batches(paths, ["id", "modality", "text_ids", "image", "visual_tokens", "source"]):
        if len(out["pairs"]) >= num_pairs:
            break
        out["pairs"] += [r for r in batch.to_pylist() if r["modality"] == "pair"][: num_pairs - len(out["pairs"])]
    codes = []
    for batch in _batches(paths, ["visual_tokens"]):
        codes += [c for c in batch.column("visual_tokens").to_pylist() if c is not None]
        if len(codes) >= CODE_ROWS:
            break
    out["codes"] = np.asarray(codes[:CODE_ROWS], np.int64) if codes else out["codes"]
    out["split"] = split
    return out


def _batches(paths: list[str], columns: list[str], batch_rows: int = 256):
    """Record batches of ``columns`` from the Parquet files in order (local or URIs)."""
    import pyarrow.parquet as pq

    for path in paths:
        fs, p = storage.filesystem(path)
        with fs.open_input_file(p) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)


def samples_section(val: dict, text_tokenizer_dir: str, masking, cfg: ReportConfig) -> Section:
    title = "Samples and masked patches"
    missing = list(val["missing"])
    if missing or not val["pairs"]:
        body = "" if missing else '<p class="missing">no image-text pairs in the shards</p>'
        return Section("samples", title, body, tuple(missing))
    decode = _caption_decoder(text_tokenizer_dir, missing)
    ratio = masking.pair_image_ratio or masking.image_ratio
    cards = []
    for i, row in enumerate(val["pairs"]):
        image, masked, shown, total = masked_views(row["image"], len(row["visual_tokens"]), ratio,
                                                   masking.min_block, cfg.seed + i)
        caption = decode(row["text_ids"])
        cards.append(
            '<div class="sample"><div class="pics">'
            f'<img alt="sample {i}" src="{_data_uri(image)}"><img alt="sample {i} masked" src="{_data_uri(masked)}">'
            f'</div><p>&ldquo;{esc(caption)}&rdquo;</p><p class="note">{shown} of {total} patches masked, '
            f'{len(set(row["visual_tokens"]))} distinct codes, {len(row["text_ids"])} text tokens; '
            f'source {esc(row["source"])}, id {esc(row["id"][:12])}</p></div>')
    body = (f'<p class="note">Pairs from the {esc(val["split"])} shards: the tokenized view, and the same view '
            f"with the patches block-wise masking hides for masked image modeling (ratio {ratio:g}, blocks of "
            f"at least {masking.min_block} patches, seed {cfg.seed}+i).</p>"
            f'<div class="samples">{"".join(cards)}</div>')
    return Section("samples", title, body, tuple(missing))


def masked_views(png: bytes, num_patches: int, ratio: float, min_block: int, seed: int):
    """PNG of a tokenized view -> (view PNG, view with masked patches greyed PNG, masked, total)."""
    import torch
    from PIL import Image, ImageDraw

    from model.masking import block_mask, num_to_mask, token_grid

    grid, _ = token_grid(num_patches)
    with Image.open(io.BytesIO(png)) as img:
        view = img.convert("RGB")
    scale = max(1, math.ceil(SAMPLE_PX / view.width))
    view = view.resize((view.width * scale, view.height * scale), Image.NEAREST)
    k = num_to_mask(ratio, num_patches)
    mask = block_mask(1, (grid, grid), k, min_block=min_block, generator=torch.Generator().manual_seed(seed))[0]
    overlay = Image.new("RGBA", view.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    ph, pw = view.height / grid, view.width / grid
    for index in torch.nonzero(mask).flatten().tolist():
        r, c = divmod(index, grid)
        draw.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], fill=(60, 60, 60, 215),
                       outline=(255, 255, 255, 255))
    masked = Image.alpha_composite(view.convert("RGBA"), overlay).convert("RGB")
    return _png(view), _png(masked), int(mask.sum()), num_patches


def _caption_decoder(text_tokenizer_dir: str, missing: list[str]):
    try:
        from model.text_tokenizer import MODEL_FILE, TextTokenizer

        model_path = storage.join(text_tokenizer_dir, MODEL_FILE)  # local or a URI
        return TextTokenizer.from_bytes(storage.read_bytes(model_path), model_path).decode
    except (OSError, ValueError, RuntimeError):
        missing.append(text_tokenizer_dir)
        return lambda ids: " ".join(map(str, ids))  # the ids themselves, so the sample still shows


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- codebook

VT_KEYS = ("preset", "trained", "teacher", "n_codes", "image_size", "num_train_images", "steps", "final_rec_loss",
           "holdout_utilisation", "holdout_perplexity", "probe_accuracy", "probe_chance")


def codebook_section(vt: dict | None, val: dict, path: str) -> Section:
    title = "Visual tokenizer codebook"
    missing = [path] if vt is None else []
    body = ""
    if vt is not None:
        body += ("<h3>Tokenizer metrics (held-out images)</h3>"
                 + table(["metric", "value"], [[k, vt[k]] for k in VT_KEYS if k in vt]))
    codes = val["codes"]
    if codes.size:
        n_codes = int((vt or {}).get("n_codes") or codes.max() + 1)
        counts = np.bincount(codes.ravel(), minlength=n_codes)
        p = counts[counts > 0] / counts.sum()
        ranked = np.sort(counts)[::-1].astype(float)
        bucket = math.ceil(len(ranked) / MAX_BARS)
        bars = [float(ranked[i:i + bucket].mean()) for i in range(0, len(ranked), bucket)]
        body += (f'<h3>Codes in the {esc(val["split"])} shards</h3>'
                 + table(["metric", "value"], [["images", int(codes.shape[0])], ["tokens", int(codes.size)],
                                               ["codes used", f"{int((counts > 0).sum())} of {n_codes}"],
                                               ["usage", float((counts > 0).mean())],
                                               ["perplexity", float(np.exp(-(p * np.log(p)).sum()))]])
                 + bar_chart(f"code frequency by rank ({bucket} code(s) per bar)", bars))
    elif not val["missing"]:
        body += '<p class="missing">no visual tokens in the shards</p>'
    return Section("codebook", title, body, tuple(missing + val["missing"]))


# ---------------------------------------------------------------- training

def training_section(plots_path: str, pretrain: dict | None) -> Section:
    from pipelines.common.train_csv import read_csv

    title = "Training curves"
    if not storage.exists(plots_path):
        return Section("training", title, "", (plots_path,))
    rows = read_csv(plots_path)
    if not rows:
        return Section("training", title, f'<p class="missing">{esc(plots_path)} has no rows</p>')
    steps = [r["step"] for r in rows]
    cols = lambda prefix: {k: [r.get(k) for r in rows] for k in rows[0] if k.startswith(prefix)  # noqa: E731
                           and any(r.get(k) is not None for r in rows)}
    charts = [line_chart("loss (mean over parts) and per part", steps, cols("loss")),
              line_chart("masked-prediction accuracy", steps, cols("acc_")),
              line_chart("learning rate", steps, {"lr": [r.get("lr") for r in rows]}),
              line_chart("throughput (samples/s)", steps, {"samples/s": [r.get("samples_per_s") for r in rows]})]
    body = "".join(charts)
    if pretrain:
        final = pretrain.get("final", {})
        summary = [["steps", pretrain.get("steps")], ["samples/s", pretrain.get("samples_per_s")],
                   ["train time (s)", pretrain.get("train_time_s")], ["workers", pretrain.get("num_workers")],
                   *[[f"final {k}", v] for k, v in final.items()]]
        body += "<h3>Final values (mean of the last steps)</h3>" + table(["metric", "value"], summary)
    return Section("training", title, body)


# ---------------------------------------------------------------- evaluation

def evaluation_section(ev: dict | None, path: str) -> Section:
    title = "Evaluation: pretrained vs random init"
    if ev is None:
        return Section("evaluation", title, "", (path,))
    rows = []
    for group in ("retrieval", "probe"):
        runs = ev.get(group, {})
        pre, rand = runs.get("pretrained", {}), runs.get("random_init", {})
        for key in pre:
            if isinstance(pre[key], (int, float)) and isinstance(rand.get(key), (int, float)):
                rows.append([f"{group} {key}", float(pre[key]), float(rand[key]), float(pre[key] - rand[key])])
    body = table(["metric", "pretrained", "random init", "difference"], rows)
    parts = ev.get("masked_prediction", {})
    if parts:
        body += ("<h3>Masked prediction on the held-out shards (pretrained model)</h3>"
                 + table(["part", "accuracy", "loss", "masked tokens"],
                         [[k, v.get("acc"), v.get("loss"), v.get("count")] for k, v in parts.items()]))
    data = {g: ev.get(g, {}).get("data") for g in ("retrieval", "probe") if ev.get(g, {}).get("data")}
    if data:
        body += f'<p class="note">evaluation data: {esc(json.dumps(data, sort_keys=True))}</p>'
    return Section("evaluation", title, body)


def _json_or_none(path: str):
    return storage.read_json(path) if storage.exists(path) else None


__all__ = ["ReportConfig", "render_report", "render_page", "masked_views"]
