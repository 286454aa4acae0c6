"""Summary, verdicts and tables of benchmarks.growth.

Verdicts (issue 14 item 6), for every stage, between the largest scale L and the second
largest M (100x and 10x by default):

- driver: peak RSS of the stage's driver process, L / M <= 1.1 (it holds O(files + tasks),
  never O(rows));
- CPU per row: CPU seconds of the stage's whole process tree / the stage's input rows (from
  its metrics: clean ``rows_in``, tokenize the ``*_rows_in`` sums, pack ``rows``), L / M <= 1.3
  (linear). A fixed start-up cost (Ray, worker imports) makes this easy, so the marginal CPU
  per row, (CPU(L) - CPU(M)) / (rows(L) - rows(M)) over the same between the first scale and
  M, is printed beside it (with three scales or more);
- dedup bytes per row (clean): ``dedup.bytes_read`` (the key partition files the dedup shard
  tasks read) / rows in, L / M <= 1.3 (flat: every key is read once, whatever the shards);
- largest worker: peak RSS of the largest single Ray worker, at every scale, <= its bound

      bound = (its peak at the first scale, 1x) + ALLOWANCE_FACTOR x unit

  where ``unit`` is what one task of the stage may hold by the configuration the benchmark
  passes to it (benchmarks.growth.stage_configs):

      clean     max(part_bytes, unit_bytes, dedup_shard_rows x DEDUP_ROW_BYTES)
      tokenize  rows_per_task (images: rounded up to batch_size) x ROW_BYTES
      pack      max(shard_rows x ROW_BYTES, ARROW_PER_DECODED x scatter_bytes)

  ROW_BYTES bounds one tokenized (= packed) row: the view's raw pixels 3 x S^2 (its PNG is
  no larger, give or take headers) + its codes 2 x (S / patch)^2 + 4 x max(max_text_tokens,
  max_caption_tokens) token ids + ROW_FIXED_BYTES (id, modality, source), with S and patch of
  the VQ-KD preset the benchmark makes; ARROW_PER_DECODED bounds the Arrow bytes a scatter
  task holds per decoded Parquet byte of its unit (dictionary-encoded token ids decode to
  2.4x: a 600k-row text unit of 39 MiB decoded is 94 MiB in Arrow; PNG bytes 1x); DEDUP_ROW_BYTES is the memory per row of a dedup
  shard (its keys, exact entries and candidate groups: ~2 KiB, measured on an earlier 10x
  run, benchmarks/RESULTS.md). The 1x peak is the fixed part (interpreter, pyarrow, Ray
  worker, imports, the 1x data); the allowance is what may grow with the data. No
  measurement above 1x enters the bound.
"""
from __future__ import annotations

import math

from benchmarks.common import print_table
from benchmarks.data_common import load_note, mib, ratio

DRIVER_LIMIT = 1.1        # driver peak RSS, largest / second-largest scale
CPU_PER_ROW_LIMIT = 1.3   # CPU s per row, largest / second-largest scale
DEDUP_BYTES_LIMIT = 1.3   # clean's dedup bytes read per row, largest / second-largest scale
MEMORY_LIMIT = 1.3        # issue 8 item 5: every peak at 10x within 1.3x of 1x
ALLOWANCE_FACTOR = 2      # a task's unit, plus one copy of it (decoded / encoded)
DEDUP_ROW_BYTES = 2048
ROW_FIXED_BYTES = 256
ARROW_PER_DECODED = 3
MODALITIES = ("text", "image", "pair")


def stage_rows(stage: str, metrics: dict) -> int:
    """The stage's input rows, from its metrics."""
    if stage == "clean":
        return metrics["rows_in"]
    if stage == "tokenize":
        return sum(metrics.get(f"{kind}_rows_in", 0) for kind in MODALITIES)
    return metrics["rows"]


def row_bytes(tokenize_cfg, vqkd_cfg) -> int:
    """Upper bound of one tokenized (and packed) row's bytes (see the module docstring)."""
    view = 3 * vqkd_cfg.image_size ** 2 + 2 * (vqkd_cfg.image_size // vqkd_cfg.patch_size) ** 2
    return view + 4 * max(tokenize_cfg.max_text_tokens, tokenize_cfg.max_caption_tokens) + ROW_FIXED_BYTES


def allowances(configs: dict, vqkd_cfg) -> dict[str, tuple[int, str]]:
    """{stage: (allowance bytes, its formula with the values)} from the stages' configs."""
    clean, tok, pack = configs["clean"], configs["tokenize"], configs["pack"]
    row = row_bytes(tok, vqkd_cfg)
    dedup = clean.dedup_shard_rows * DEDUP_ROW_BYTES
    task_rows = -(-tok.rows_per_task // tok.batch_size) * tok.batch_size
    f = ALLOWANCE_FACTOR
    return {
        "clean": (f * max(clean.part_bytes, clean.unit_bytes, dedup),
                  f"{f} x max(part_bytes {mib(clean.part_bytes)}, unit_bytes {mib(clean.unit_bytes)}, "
                  f"dedup_shard_rows {clean.dedup_shard_rows} x {DEDUP_ROW_BYTES} B = {mib(dedup)})"),
        "tokenize": (f * task_rows * row,
                     f"{f} x rows_per_task {task_rows} x {row} B per row = {mib(f * task_rows * row)}"),
        "pack": (f * max(pack.shard_rows * row, ARROW_PER_DECODED * pack.scatter_bytes),
                 f"{f} x max(shard_rows {pack.shard_rows} x {row} B per row = {mib(pack.shard_rows * row)}, "
                 f"{ARROW_PER_DECODED} x scatter_bytes {mib(pack.scatter_bytes)})"),
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _check(value: float, limit: float) -> dict:
    return {"ratio": value, "limit": limit, "ok": bool(math.isfinite(value) and value <= limit)}


def _marginal(runs: dict, a: int, b: int) -> float:
    """CPU seconds per row added from scale a to scale b (the fixed start-up cost cancels)."""
    return ratio(runs[b]["cpu_s"] - runs[a]["cpu_s"], runs[b]["rows"] - runs[a]["rows"])


def stage_verdicts(runs: dict, scales: list[int], allowance: tuple[int, str]) -> dict:
    """The verdicts of one stage (``runs``: {scale: measurement}); see the module docstring."""
    first, mid, last = scales[0], scales[-2], scales[-1]
    per_row = {s: ratio(runs[s]["cpu_s"], runs[s]["rows"]) for s in scales}
    out = {"driver_rss": _check(ratio(runs[last]["peak_driver_rss"], runs[mid]["peak_driver_rss"]), DRIVER_LIMIT),
           "cpu_per_row": _check(ratio(per_row[last], per_row[mid]), CPU_PER_ROW_LIMIT)}
    if len(scales) >= 3:
        out["cpu_per_row"]["marginal_ratio"] = ratio(_marginal(runs, mid, last), _marginal(runs, first, mid))
    peak = max(runs[s]["peak_worker_rss"] for s in scales)
    bound = runs[first]["peak_worker_rss"] + allowance[0]
    out["worker_rss"] = {"peak": peak, "bound": bound, "formula": f"x{first} peak + {allowance[1]}",
                         "ok": bool(peak <= bound)}
    if "dedup_bytes_read" in runs[last]:
        per = {s: ratio(runs[s]["dedup_bytes_read"], runs[s]["rows"]) for s in (mid, last)}
        out["dedup_bytes_per_row"] = _check(ratio(per[last], per[mid]), DEDUP_BYTES_LIMIT)
    return out


def summarize(results: dict, allowance: dict) -> dict:
    """Add totals, the line fit, issue 8's memory ratios and the verdicts to ``results``; print."""
    scales, stages = results["scales"], results["stages"]
    first, last = scales[0], scales[-1]
    mid = 10 if 10 in scales else scales[len(scales) // 2]
    for runs in stages.values():
        for r in runs.values():
            r["cpu_per_row"] = ratio(r["cpu_s"], r["rows"])
    total = {s: sum(stages[st][s]["wall_s"] for st in stages) for s in scales}
    total_cpu = {s: sum(stages[st][s]["cpu_s"] for st in stages) for s in scales}
    results["total_wall_s"], results["total_cpu_s"] = total, total_cpu
    results["time_ratio"] = ratio(total[last], total[first])
    results["cpu_ratio"] = ratio(total_cpu[last], total_cpu[first])
    if len(scales) >= 3:  # least-squares line CPU = fixed + per_x * scale; residuals show curvature
        fixed, per_x = linear_fit(scales, [total_cpu[s] for s in scales])
        results["cpu_fit"] = {"fixed_s": fixed, "per_1x_s": per_x, "max_residual": max(
            abs(total_cpu[s] - fixed - per_x * s) / total_cpu[s] for s in scales)}
    results["memory_ratios"] = {st: {key: ratio(stages[st][mid][key], stages[st][first][key])
                                     for key in ("peak_driver_rss", "peak_worker_rss", "peak_tree_pss")}
                                for st in stages}
    results["memory_scale"] = mid
    results["verdicts"] = {st: stage_verdicts(stages[st], scales, allowance[st]) for st in stages}
    results["all_ok"] = all(v["ok"] for checks in results["verdicts"].values() for v in checks.values())
    print_growth(results)
    print_verdicts(results)
    return results


def print_growth(results: dict) -> None:
    """The corpus, the per-stage table and the issue 7 / issue 8 ratios."""
    scales, stages, corpus = results["scales"], results["stages"], results["corpus"]
    print(f"growth: {load_note()}")
    print("clean metrics per scale: " + "; ".join(
        f"x{s} rows_in {r['metrics'].get('rows_in')}, kept {r['metrics'].get('kept')}, rejected "
        f"{r['metrics'].get('rejected')}, dedup shards {r.get('dedup_shards')}"
        for s, r in stages.get("clean", {}).items()))
    print("corpus per scale: " + "; ".join(f"x{s} {c['pairs']} pairs, {c['images']} images, {c['docs']} docs, "
                                           f"{c['rows']} short rows, {c['bytes'] / 1e6:.1f} MB, "
                                           f"generated in {c['seconds']:.0f} s"
                                           for s, c in corpus.items()))
    rows = []
    for st in stages:
        for s in scales:
            r = stages[st][s]
            dedup = f"{ratio(r['dedup_bytes_read'], r['rows']):.1f}" if "dedup_bytes_read" in r else ""
            rows.append([st, f"x{s}", r["rows"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                         f"{1e6 * r['cpu_per_row']:.1f}", mib(r["peak_driver_rss"]), mib(r["peak_worker_rss"]),
                         mib(r["peak_tree_pss"]), dedup, f"{r['load']:.0f}"])
    print_table(["stage", "scale", "rows in", "wall s", "CPU s", "CPU us/row", "driver RSS", "max worker RSS",
                 "tree PSS", "dedup B/row", "load"], rows)
    first, last = scales[0], scales[-1]
    print(f"time x{last} / x{first}: wall {results['time_ratio']:.2f}x, CPU {results['cpu_ratio']:.2f}x "
          f"(limit {20 * last / 16:.0f}x for {last}x data)")
    if "cpu_fit" in results:
        f = results["cpu_fit"]
        print(f"CPU s of the stages = {f['fixed_s']:.1f} fixed (Ray starts, worker imports) + "
              f"{f['per_1x_s']:.2f} per 1x of data; largest residual {100 * f['max_residual']:.0f}% "
              "(small = linear)")
    mid = results["memory_scale"]
    for st, r in results["memory_ratios"].items():
        print(f"peak memory x{mid} / x{first}, {st}: driver {r['peak_driver_rss']:.2f}x, largest worker "
              f"{r['peak_worker_rss']:.2f}x, tree PSS {r['peak_tree_pss']:.2f}x (limit {MEMORY_LIMIT}x)")


def print_verdicts(results: dict) -> None:
    """Issue 14 item 6: one line per stage and check."""
    scales = results["scales"]
    mid, last = scales[-2], scales[-1]

    def mark(check: dict) -> str:
        return "ok" if check["ok"] else "FAILED"
    for st, v in results["verdicts"].items():
        c = v["cpu_per_row"]
        marginal = f", marginal {c['marginal_ratio']:.2f}x" if "marginal_ratio" in c else ""
        print(f"verdict {st}: driver RSS x{last} / x{mid} {v['driver_rss']['ratio']:.2f}x (<= {DRIVER_LIMIT}) "
              f"{mark(v['driver_rss'])}; CPU s per row {c['ratio']:.2f}x{marginal} (<= {CPU_PER_ROW_LIMIT}) {mark(c)}")
        w = v["worker_rss"]
        print(f"verdict {st}: largest worker {mib(w['peak'])} <= bound {mib(w['bound'])} = {w['formula']}: {mark(w)}")
        if "dedup_bytes_per_row" in v:
            d = v["dedup_bytes_per_row"]
            print(f"verdict {st}: dedup bytes read per row x{last} / x{mid} {d['ratio']:.2f}x "
                  f"(<= {DEDUP_BYTES_LIMIT}) {mark(d)}")
    print(f"growth verdicts: {'all met' if results['all_ok'] else 'NOT all met'}")


__all__ = ["summarize", "allowances", "stage_rows", "linear_fit", "stage_verdicts"]
