"""BEiT v2 VQ-KD visual tokenizer, key-compatible with the released checkpoints.

Module names follow unilm/beit2 (modeling_vqkd.py, modeling_finetune.py,
norm_ema_quantizer.py), so ``state_dict()`` *is* the official layout:

    encoder.{cls_token,pos_embed,patch_embed.proj.*,fc_norm.*}
    encoder.blocks.{i}.{norm1,norm2,attn.qkv.weight,attn.q_bias,attn.v_bias,
                        attn.proj.*,mlp.fc1.*,mlp.fc2.*}
    decoder.* (same ViT on the code grid: patch 1, in_chans = code_dim)
    quantize.embedding.{weight,cluster_size,embed_avg,initted}, quantize.cluster_size
    encode_task_layer.{0,2}.*, decode_task_layer.{0,2}.*

Inference (``codes``) reproduces the reference ``get_codebook_indices``:
x in [0, 1] -> x*255/127.5 - 1 -> encoder patch tokens through fc_norm ->
float32 task layer -> l2-normalise -> argmin of the squared distance to the
codebook rows. Training lives in model/vqkd/train.py.

Modules: vit.py (the BEiT-style ViT of the encoder, decoder and ViT teacher), clip.py (OpenAI
CLIP's image tower, BEiT v2's teacher), teachers.py (HOG and frozen-network teachers, their
input normalisation), train.py (k-means init, EMA codebook, dead-code restarts,
the training loop, code metrics); this module holds the VQKD model, its quantizer and its
checkpoint I/O.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.safe_load import load_torch_checkpoint
from model.vqkd.vit import ViT

STATE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DROPPED_PREFIXES = ("loss", "teacher", "scaling")  # training-only parts of the released files


@dataclass(frozen=True)
class VQKDConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 768
    decoder_depth: int = 3
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    n_codes: int = 8192
    code_dim: int = 32
    out_dim: int = 512  # teacher feature size (CLIP ViT-B/16: 512; HOG: its descriptor size)
    ln_eps: float = 1e-6

    def __post_init__(self):
        positive = ("image_size", "patch_size", "in_chans", "encoder_dim", "encoder_depth",
                    "encoder_heads", "decoder_dim", "decoder_depth", "decoder_heads",
                    "n_codes", "code_dim", "out_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"VQKDConfig.{name}: must be > 0, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"VQKDConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        for dim, heads in (("encoder_dim", "encoder_heads"), ("decoder_dim", "decoder_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"VQKDConfig: {dim} must be divisible by {heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


# Released tokenizer (vqkd_encoder_base_decoder_3x768x12_clip); the 1x variant is
# decoder_depth=1. `tiny` is the CPU demo: 96 px / patch 16 -> 36 codes per image.
VQKD_PRESETS = {
    "official-base": {},
    "tiny": dict(image_size=96, encoder_dim=128, encoder_depth=2, encoder_heads=4,
                 decoder_dim=128, decoder_depth=1, decoder_heads=4, n_codes=512, out_dim=108),
}


def vqkd_preset(name: str, **overrides) -> VQKDConfig:
    if name not in VQKD_PRESETS:
        raise ValueError(f"unknown VQ-KD preset {name!r}; choose one of {sorted(VQKD_PRESETS)}")
    return VQKDConfig(**{**VQKD_PRESETS[name], **overrides})


# ---------------------------------------------------------------- the quantizer

class EmbeddingEMA(nn.Module):
    """Codebook storage in the reference layout (rows l2-normalised; updated by EMA, not SGD)."""

    def __init__(self, n_codes: int, code_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_codes, code_dim), requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(n_codes), requires_grad=False)
        self.embed_avg = nn.Parameter(torch.zeros(n_codes, code_dim), requires_grad=False)
        self.register_buffer("initted", torch.zeros(1))  # 1.0 once k-means has filled the rows


class NormEMAVectorQuantizer(nn.Module):
    def __init__(self, n_codes: int, code_dim: int):
        super().__init__()
        self.embedding = EmbeddingEMA(n_codes, code_dim)
        self.register_buffer("cluster_size", torch.zeros(n_codes))  # EMA usage statistic

    @property
    def n_codes(self) -> int:
        return self.embedding.weight.shape[0]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(M, C) l2-normalised float32 -> (M,) index of the closest codebook row.

        Same formula and rounding as the reference, (|z|^2 + |e|^2) - 2 z.e: addmm
        adds -2 (z e^T) to the same sum, and scaling by -2 is exact, so the distances
        are bit-identical (tested) while the (M, K) matrix is written once, not three
        times. Rows go in chunks whose distances stay in cache on CPU (bounded memory
        on GPU); a row's result does not depend on the chunk it is in.
        """
        e = self.embedding.weight
        ee = e.pow(2).sum(dim=1)  # (K,)
        zz = z.pow(2).sum(dim=1, keepdim=True)  # (M, 1)
        K = e.shape[0]
        chunk = max(1, (1 << 26) // K if z.is_cuda else (1 << 17) // K)
        out = [torch.addmm(zz[i:i + chunk] + ee, z[i:i + chunk], e.t(), beta=1, alpha=-2).argmin(dim=1)
               for i in range(0, z.shape[0], chunk)]
        return out[0] if len(out) == 1 else torch.cat(out)


# ---------------------------------------------------------------- VQ-KD

class VQKD(nn.Module):
    def __init__(self, config: VQKDConfig):
        super().__init__()
        c = config
        self.config = c
        self.encoder = ViT(c.image_size, c.patch_size, c.in_chans, c.encoder_dim, c.encoder_depth,
                           c.encoder_heads, c.mlp_ratio, c.ln_eps)
        self.decoder = ViT(c.grid, 1, c.code_dim, c.decoder_dim, c.decoder_depth,
                           c.decoder_heads, c.mlp_ratio, c.ln_eps)
        self.quantize = NormEMAVectorQuantizer(c.n_codes, c.code_dim)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(c.encoder_dim, c.encoder_dim), nn.Tanh(), nn.Linear(c.encoder_dim, c.code_dim))
        self.decode_task_layer = nn.Sequential(
            nn.Linear(c.decoder_dim, c.decoder_dim), nn.Tanh(), nn.Linear(c.decoder_dim, c.out_dim))
        for layer in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    # -- forward pieces (shared by inference and training)
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> l2-normalised float32 code vectors (B, N, code_dim)."""
        h = self.encoder(x * 255.0 / 127.5 - 1.0)  # the reference's pre_process, op for op
        with _autocast_off(h.device):
            z = self.encode_task_layer(h.float())
        return F.normalize(z, p=2, dim=-1)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised vectors (B, N, code_dim) -> teacher-space predictions (B, N, out_dim)."""
        B, N, C = z_q.shape
        g = self.config.grid
        return self.decode_task_layer(self.decoder(z_q.transpose(1, 2).reshape(B, C, g, g)))

    @torch.no_grad()
    def codes(self, x: torch.Tensor, autocast_dtype: torch.dtype | None = None,
              channels_last: bool = False) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> LongTensor (B, N) of code indices, row-major.

        ``autocast_dtype`` (e.g. torch.bfloat16) runs the encoder in reduced precision;
        the task layer and the nearest-code search stay float32 as in the reference.
        """
        x = x.to(self.encoder.pos_embed.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            z = self.encode(x)
        B, N, C = z.shape
        return self.quantize.nearest(z.reshape(B * N, C)).view(B, N)

    # -- checkpoints
    @classmethod
    def from_official(cls, path, config: VQKDConfig | None = None) -> "VQKD":
        """Load a released BEiT v2 tokenizer .pth (1x or 3x decoder); ``path`` or a file object.

        Weights under 'model' or 'state_dict'; keys starting with loss/teacher/scaling
        are dropped; everything else must match exactly. ``config`` defaults to the
        one read off the tensor shapes (heads = dim / 64, as in every released model).
        """
        raw = load_torch_checkpoint(path)
        state = _unwrap(raw, path)
        state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
        model = cls(config or config_from_state(state))
        load_strict(model, state, source=str(path))
        return model.eval()

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in the released layout (our module names are that layout)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def serialize(self) -> dict[str, bytes]:
        """What ``save`` writes: {'model.safetensors': weights, 'config.json': architecture}."""
        from safetensors.torch import save

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = json.dumps({"model_type": "vqkd", **dataclasses.asdict(self.config)}, indent=2)
        return {STATE_FILE: save(state, metadata={"format": "pt"}), CONFIG_FILE: (config + "\n").encode()}

    def save(self, directory: str) -> None:
        """Write model.safetensors + config.json into ``directory`` (each atomically, config last)."""
        os.makedirs(directory, exist_ok=True)
        for name, data in self.serialize().items():
            _atomic(directory, name, data)

    @classmethod
    def deserialize(cls, files: dict[str, bytes], source: str = "VQ-KD bytes") -> "VQKD":
        """The inverse of ``serialize``: a model (eval mode, CPU) from those two files' bytes."""
        from safetensors.torch import load

        data = json.loads(files[CONFIG_FILE])
        data.pop("model_type", None)
        model = cls(VQKDConfig(**data))
        load_strict(model, load(files[STATE_FILE]), source=source)
        return model.eval()

    @classmethod
    def load(cls, directory: str, map_location: str = "cpu") -> "VQKD":
        """What ``save`` wrote into ``directory``."""
        files = {}
        for name in (CONFIG_FILE, STATE_FILE):
            with open(os.path.join(directory, name), "rb") as f:
                files[name] = f.read()
        return cls.deserialize(files, source=directory).to(map_location)


def config_from_state(state: dict[str, torch.Tensor]) -> VQKDConfig:
    """Read the architecture off an official-layout state dict's tensor shapes."""
    def get(key):
        if key not in state:
            raise ValueError(f"not a VQ-KD checkpoint: missing key {key!r}")
        return state[key]

    def depth(prefix):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.blocks\.(\d+)\.", k))}
        return max(ids) + 1 if ids else 0

    proj = get("encoder.patch_embed.proj.weight")  # (D, C, p, p)
    enc_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    grid = math.isqrt(get("encoder.pos_embed").shape[1] - 1)
    dec_dim = get("decoder.pos_embed").shape[-1]
    codebook = get("quantize.embedding.weight")
    return VQKDConfig(
        image_size=grid * patch, patch_size=patch, in_chans=in_chans,
        encoder_dim=enc_dim, encoder_depth=depth("encoder"), encoder_heads=max(1, enc_dim // 64),
        decoder_dim=dec_dim, decoder_depth=depth("decoder"), decoder_heads=max(1, dec_dim // 64),
        mlp_ratio=get("encoder.blocks.0.mlp.fc1.weight").shape[0] / enc_dim,
        n_codes=codebook.shape[0], code_dim=codebook.shape[1],
        out_dim=get("decode_task_layer.2.weight").shape[0],
    )


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with one error naming every missing/unexpected/mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatch", shapes)) if keys]
        raise ValueError(f"{source}: checkpoint does not match the VQ-KD model; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _unwrap(raw, path) -> dict[str, torch.Tensor]:
    if isinstance(raw, dict):
        for key in ("model", "state_dict"):
            if isinstance(raw.get(key), dict):
                return dict(raw[key])
        if "encoder.pos_embed" in raw:  # a bare state dict (e.g. official_state_dict())
            return dict(raw)
    found = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
    raise ValueError(f"{path}: expected the weights under 'model' or 'state_dict'; found {found}")


def _atomic(directory: str, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _autocast_off(device: torch.device):
    return torch.autocast(device.type, enabled=False)


__all__ = ["VQKD", "VQKDConfig", "VQKD_PRESETS", "vqkd_preset", "config_from_state",
           "load_strict"]
