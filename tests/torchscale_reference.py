"""torchscale 0.3.0's BEiT3, the reference our backbone is checked and benchmarked against.

torchscale imports fairscale and timm for two small helpers; where those are not
installed (they don't install beside current torch), test-only shims stand in.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SHIMS = Path(__file__).parent / "model" / "torchscale_shims"


def import_torchscale():
    """(EncoderConfig, BEiT3) from torchscale; shims only for what is not installed."""
    if importlib.util.find_spec("torchscale") is None:
        raise RuntimeError("torchscale 0.3.0 is required by the parity tests: "
                           "pip install --no-deps torchscale==0.3.0")
    missing = [m for m in ("fairscale", "timm") if importlib.util.find_spec(m) is None]
    if missing:
        sys.path.insert(0, str(SHIMS))
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3
    finally:
        if missing:
            sys.path.remove(str(SHIMS))
            for name in [n for n in sys.modules if n.split(".")[0] in missing]:
                del sys.modules[name]  # the shims must not leak into other tests
    return EncoderConfig, TorchscaleBEiT3


def torchscale_model(cfg, normalize_output=True):
    """torchscale BEiT3 built like unilm/beit3's _get_base_config, with cfg's shapes."""
    EncoderConfig, TorchscaleBEiT3 = import_torchscale()
    args = EncoderConfig(
        img_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size,
        multiway=True, layernorm_embedding=False, normalize_output=normalize_output,
        no_output_layer=True, drop_path_rate=0.0, encoder_embed_dim=cfg.dim,
        encoder_attention_heads=cfg.num_heads, encoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_layers=cfg.depth, max_source_positions=cfg.max_text_positions,
    )
    return TorchscaleBEiT3(args)
