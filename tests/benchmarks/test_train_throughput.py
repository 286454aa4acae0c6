"""Smoke tests of the training-throughput benchmarks on the CPU (tiny configs, 1-2 steps).

They check that the scripts run end to end and report their fields, and that the FLOP
formula behind MFU counts what a real step executes; they never assert a speed (speed
targets live in the benchmarks' own output, RESULTS.md).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import giant_one_gpu, train_throughput
from benchmarks.common import pair_batch, pretrain_task, train_flops
from model.beit3 import BEiT3
from model.config import beit3_preset

torch.set_num_threads(1)
CPU_TINY = ["--device", "cpu", "--batch", "2", "--text-len", "8", "--steps", "2", "--rounds", "2",
            "--warmup", "1", "--threads", "1"]


@pytest.mark.parametrize("variant", [dict(preset="tiny", vocab_size=512),
                                     dict(preset="giant", variant="paper", dim=64, depth=4, num_heads=4,
                                          ffn_dim=256, image_size=56, vocab_size=512)],
                         ids=["tiny-released", "giant-paper-shrunk"])
def test_train_flops_equals_flop_counter_of_a_real_step(variant):
    """MFU's numerator: the formula matches torch's FlopCounterMode on forward + backward of
    the real PretrainTask exactly (math SDPA, so attention's matmuls are visible to it)."""
    variant = dict(variant)
    cfg = beit3_preset(variant.pop("preset"), **variant)
    torch.manual_seed(0)
    task = pretrain_task(BEiT3(cfg), 256)
    batch = pair_batch(cfg, 3, 12, 256, padded=True, seed=0)
    masks = task.masker(batch, generator=0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        task(batch, masks=masks).loss.backward()
    assert counter.get_total_flops() == pytest.approx(train_flops(cfg, batch, masks, 512, 256), rel=1e-9)


def test_pair_batch_pads_captions_after_eos():
    cfg = beit3_preset("tiny", vocab_size=512)
    part = pair_batch(cfg, 6, 10, 256, padded=True, seed=3).pair
    lengths = (~part.padding_mask).sum(1)
    assert part.ids.shape == (6, 10) and part.visual_tokens.shape == (6, cfg.num_patches)
    assert (part.ids[:, 0] == 0).all()
    assert (part.ids[torch.arange(6), lengths - 1] == 2).all()  # </s> closes every caption
    assert (part.ids[part.padding_mask] == 1).all()
    assert part.padding_mask.any(), "padded=True must exercise the padding mask"


def test_train_throughput_cpu_tiny_reports_ours_and_torchscale(capsys):
    result = train_throughput.main(CPU_TINY)
    out = capsys.readouterr().out
    assert "No GPU: CPU run, preset tiny" in out and "ours / torchscale" in out
    assert result["device"] == "cpu" and result["preset"] == "tiny" and result["dtype"] == "float32"
    assert result["image_tokens"] == 37 and result["text_tokens"] == 8
    assert set(result["impls"]) == {"ours", "torchscale"}
    for figures in result["impls"].values():
        assert figures["samples_per_s"] > 0 and 0 < figures["mfu"] < 1.5
        assert figures["steps"] == 2
    assert result["parity_loss_gap"] <= 1e-4 * 10  # losses are ~ln(8192); float32 noise only
    assert len(result["ratio_rounds"]) == 2 and result["ratio"] > 0 and result["ratio_cpu_time"] > 0
    assert result["flops_per_sample"] > 0 and result["peak_flops"] > 0


def test_train_throughput_checkpoint_ours_only_unpadded(capsys):
    result = train_throughput.main(CPU_TINY + ["--checkpoint", "--no-torchscale", "--no-padding"])
    assert set(result["impls"]) == {"ours"} and "ratio" not in result
    assert result["checkpoint"] is True and result["padded"] is False
    assert "ours / torchscale" not in capsys.readouterr().out


@pytest.mark.slow
def test_train_throughput_compiled_layers_run():
    """--compile static: torch.compile (inductor, CPU) of our layers, then the same step."""
    result = train_throughput.main(CPU_TINY + ["--compile", "static", "--no-torchscale"])
    assert result["compile"] == "static" and result["impls"]["ours"]["samples_per_s"] > 0


def test_giant_one_gpu_cpu_shrunk_runs_both_phases(capsys):
    result = giant_one_gpu.main(["--device", "cpu", "--batch", "2", "--ckpt-batch", "2", "--steps", "1",
                                 "--warmup", "0", "--text-len", "8", "--threads", "1"])
    out = capsys.readouterr().out
    assert "No GPU: CPU run of a shrunken paper-variant giant" in out and "activation checkpointing" in out
    assert result["shrunk"] is True
    assert [p["checkpoint"] for p in result["phases"]] == [False, True]
    for phase in result["phases"]:
        assert not phase["oom"] and phase["samples_per_s"] > 0 and math.isfinite(phase["mfu"])
        assert phase["tokens"] == 1 + 16 + 8  # 56 px at patch 14 -> 4x4 grid, plus cls and text
