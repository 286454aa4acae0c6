"""Checkpoint I/O: official unilm/beit3 weights both ways, and our own safetensors format.

Official layout (weights under 'model', E in {A = vision, B = language}):
``beit3.encoder.layers.{i}.self_attn.{q,k,v}_proj.E.*`` etc. (DESIGN section 3).
Our module names differ (per-expert pre-LNs live with their expert, q/k/v
are fused); ``official_key_map`` is the single table both directions use.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from model.beit3 import BEiT3
from model.config import POSITION_OFFSET, BEiT3Config, beit3_preset
from model.safe_load import load_torch_checkpoint

log = logging.getLogger(__name__)

PREFIX = "beit3."
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "beit3-pipeline"
FORMAT_VERSION = 1
TEXT_EMBED = PREFIX + "text_embed.weight"
OFFICIAL_TEXT_ROWS = 64010  # the text table unilm/beit3 builds (64002 sentencepiece pieces + 8)
_EXPERTS = (("A", "vision"), ("B", "text"))
_WB = ("weight", "bias")


def official_key_map(cfg: BEiT3Config) -> dict[str, tuple[str, ...]]:
    """Our state-dict key -> the official key(s) it holds (q, k, v concatenated on dim 0)."""
    if cfg.variant != "released":
        raise ValueError("only the released variant has an official checkpoint layout; "
                         f"got variant={cfg.variant!r}")
    enc = PREFIX + "encoder."
    keys: dict[str, tuple[str, ...]] = {
        "text_embed.weight": (PREFIX + "text_embed.weight",),
        "vision_embed.proj.weight": (PREFIX + "vision_embed.proj.weight",),
        "vision_embed.proj.bias": (PREFIX + "vision_embed.proj.bias",),
        "vision_embed.cls_token": (PREFIX + "vision_embed.cls_token",),
        "vision_embed.mask_token": (PREFIX + "vision_embed.mask_token",),
        "pos_embed.vision.weight": (enc + "embed_positions.A.weight",),
        "pos_embed.text.weight": (enc + "embed_positions.B.weight",),
    }
    for i in range(cfg.depth):
        ours, theirs = f"layers.{i}.", f"{enc}layers.{i}."
        for e, m in _EXPERTS:
            for p in _WB:
                keys[f"{ours}attn.qkv.{m}.norm.{p}"] = (f"{theirs}self_attn_layer_norm.{e}.{p}",)
                keys[f"{ours}attn.qkv.{m}.proj.{p}"] = tuple(
                    f"{theirs}self_attn.{x}_proj.{e}.{p}" for x in "qkv")
                keys[f"{ours}attn.out.{m}.norm.{p}"] = (f"{theirs}self_attn.inner_attn_ln.{e}.{p}",)
                keys[f"{ours}attn.out.{m}.proj.{p}"] = (f"{theirs}self_attn.out_proj.{e}.{p}",)
                keys[f"{ours}ffn.{m}.norm.{p}"] = (f"{theirs}final_layer_norm.{e}.{p}",)
                keys[f"{ours}ffn.{m}.fc1.{p}"] = (f"{theirs}ffn.{e}.fc1.{p}",)
                keys[f"{ours}ffn.{m}.ffn_norm.{p}"] = (f"{theirs}ffn.{e}.ffn_layernorm.{p}",)
                keys[f"{ours}ffn.{m}.fc2.{p}"] = (f"{theirs}ffn.{e}.fc2.{p}",)
    if cfg.final_norm:
        for e, m in _EXPERTS:
            for p in _WB:
                keys[f"final_norm.{m}.{p}"] = (f"{enc}layer_norm.{e}.{p}",)
    return keys


def _read_official(path_or_state_dict) -> tuple[dict, bool]:
    """-> (flat state dict, whether its tensors belong to the caller and must be copied)."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        checkpoint = load_torch_checkpoint(path_or_state_dict)
        owned_by_caller = False
    elif isinstance(path_or_state_dict, dict):
        checkpoint, owned_by_caller = path_or_state_dict, True
    else:
        raise TypeError(f"expected a path or a state dict, got {type(path_or_state_dict).__name__}")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not any(k.startswith(PREFIX) for k in state):
        raise ValueError(f"no '{PREFIX}*' weights found (expected the official unilm/beit3 "
                         "layout with the weights under 'model')")
    return state, owned_by_caller


def _infer_config(state: dict, preset: str | BEiT3Config, overrides: dict) -> BEiT3Config:
    """A preset name takes image size and final-norm presence from the checkpoint."""
    if isinstance(preset, BEiT3Config):
        return dataclasses.replace(preset, **overrides)
    probe = beit3_preset(preset)
    inferred = {}
    table = state.get(PREFIX + "encoder.embed_positions.A.weight")
    if table is not None:
        grid = round((table.shape[0] - 1 - POSITION_OFFSET) ** 0.5)
        inferred["image_size"] = grid * overrides.get("patch_size", probe.patch_size)
    inferred["final_norm"] = any(k.startswith(PREFIX + "encoder.layer_norm.") for k in state)
    return beit3_preset(preset, **{**inferred, **overrides})


def _name_keys(keys, limit: int = 100) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_official_state_dict(state: dict, cfg: BEiT3Config) -> tuple[dict, list[str]]:
    """Official flat state dict -> (our state dict, ignored non-backbone keys).

    Raises ValueError naming every missing or unexpected backbone key.
    """
    key_map = official_key_map(cfg)
    expected = {k for group in key_map.values() for k in group}
    present = {k for k in state if k.startswith(PREFIX)}
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing backbone keys ({len(missing)}): {_name_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected backbone keys ({len(unexpected)}): {_name_keys(unexpected)}")
        raise ValueError("checkpoint does not match the BEiT-3 config "
                         f"(depth={cfg.depth}, final_norm={cfg.final_norm}): " + "; ".join(parts))
    ours = {}
    for our_key, official in key_map.items():
        tensors = [state[k] for k in official]
        ours[our_key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    ignored = sorted(k for k in state if not k.startswith(PREFIX))
    return ours, ignored


def _model_from_state(cfg: BEiT3Config, state: dict, copy: bool) -> BEiT3:
    """Build on the meta device (no random init) and adopt the given tensors as float32."""
    with torch.device("meta"):
        model = BEiT3(cfg)
    wanted = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in wanted.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise ValueError("tensor shapes do not match the config: " + "; ".join(wrong[:12]))
    state = {k: v.to(dtype=torch.float32, copy=copy) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_official_beit3(path_or_state_dict, preset: str | BEiT3Config = "base", **overrides) -> BEiT3:
    """A BEiT3 (eval mode, float32) holding official unilm/beit3 weights.

    ``preset``: a preset name (image size and final-norm presence are read from
    the checkpoint) or an explicit released-variant config; ``overrides``
    replace config fields (e.g. drop_path for fine-tuning). Task-head keys
    (anything outside ``beit3.``) are ignored and logged.
    """
    state, owned_by_caller = _read_official(path_or_state_dict)
    cfg = _infer_config(state, preset, overrides)
    ours, ignored = convert_official_state_dict(state, cfg)
    if ignored:
        log.warning("load_official_beit3: ignored %d task-head keys: %s", len(ignored),
                    _name_keys(ignored))
    return _model_from_state(cfg, ours, copy=owned_by_caller)


def official_backbone_state(path_or_state_dict, cfg: BEiT3Config) -> tuple[dict, list[str]]:
    """(our backbone state dict for ``cfg``, ignored task-head keys) from an official
    unilm/beit3 checkpoint, to continue training from it. The official text table (64010
    rows) is cut to ``cfg.vocab_size`` rows: ids past the tokenizer's are never used."""
    state, _ = _read_official(path_or_state_dict)
    ours, ignored = convert_official_state_dict(state, cfg)
    table = ours["text_embed.weight"]
    if table.shape[0] < cfg.vocab_size:
        raise ValueError(f"the checkpoint's text table has {table.shape[0]} rows, fewer than the "
                         f"{cfg.vocab_size} ids of the text tokenizer")
    ours["text_embed.weight"] = table[:cfg.vocab_size]
    return ours, ignored


def export_official_beit3(model: BEiT3, text_rows: int | None = None) -> dict:
    """{'model': state dict in the official unilm/beit3 layout} (new tensors, float32 as stored).

    ``text_rows``: the text table is padded with zero rows to this many (the official code
    builds a 64010-row table whatever its sentencepiece model has, and only prints a size
    mismatch, then trains with a random table); the extra ids are never produced by the
    tokenizer. None keeps the model's own size."""
    ours = model.state_dict()
    official = {}
    for our_key, keys in official_key_map(model.config).items():
        tensor = ours[our_key].detach()
        for key, part in zip(keys, tensor.chunk(len(keys), dim=0)):
            official[key] = part.clone()
    table = official[TEXT_EMBED]
    if text_rows is not None and table.shape[0] < text_rows:
        official[TEXT_EMBED] = torch.cat([table, table.new_zeros(text_rows - table.shape[0], table.shape[1])])
    return {"model": official}


def pretrained_files(model: BEiT3) -> dict[str, bytes]:
    """Our own checkpoint as file contents: {config.json, model.safetensors}.

    Bytes so callers can write them anywhere (local, object storage).
    """
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return {
        WEIGHTS_FILE: safetensors_save(tensors, metadata={"format": "pt"}),
        CONFIG_FILE: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }


def model_from_pretrained_files(files: dict[str, bytes], **overrides) -> BEiT3:
    """Inverse of ``pretrained_files``; ``overrides`` replace config fields."""
    meta = json.loads(files[CONFIG_FILE])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{CONFIG_FILE} is not a {FORMAT} checkpoint (format={meta.get('format')!r})")
    cfg = dataclasses.replace(BEiT3Config.from_dict(meta["config"]), **overrides)
    state = safetensors_load(files[WEIGHTS_FILE])
    return _model_from_state(cfg, state, copy=False)


def save_pretrained(model: BEiT3, directory: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` into a local directory, atomically each."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = pretrained_files(model)
    for name in (WEIGHTS_FILE, CONFIG_FILE):  # config last: its presence marks a complete save
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(files[name])
            os.replace(tmp, directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_pretrained(directory: str | os.PathLike, **overrides) -> BEiT3:
    """A BEiT3 (eval mode) from a ``save_pretrained`` directory; no training params needed."""
    directory = Path(directory)
    files = {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    return model_from_pretrained_files(files, **overrides)
