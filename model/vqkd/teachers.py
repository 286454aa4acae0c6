"""Teachers for VQ-KD training: what the decoder learns to reconstruct per patch.

Every teacher is a frozen module with
    ``teacher(x) -> (features (B, N, D), weights (B, N) or None)``
for images x (B, 3, S, S) in [0, 1]; N is the tokenizer's patch grid (row-major)
and ``teacher.dim`` is D. ``weights`` (optional) scale each patch's loss.

- :class:`ColourHOGTeacher` (the demo default) and :class:`HOGTeacher` need no weights at all.
- :class:`FrozenViTTeacher` runs a user-supplied frozen network from a local path: a
  timm/DINO ViT, a whole exported network (``vit``), or OpenAI CLIP's image tower
  (``clip``, BEiT v2's teacher; model/vqkd/clip.py).

The images a network teacher sees are normalised with per-channel statistics, named in
:data:`NORM_STATS` or given as (mean, std); see :func:`norm_stats`.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from model.safe_load import load_torch_checkpoint
from model.vqkd import load_strict
from model.vqkd.clip import clip_visual_from_state
from model.vqkd.vit import ViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORM_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
              "openai_clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}
# Each network teacher's own statistics, used when none are asked for.
DEFAULT_NORM = {"vit": "imagenet", "clip": "openai_clip"}


def norm_stats(norm) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A name in NORM_STATS, or a (mean, std) pair of 3 numbers each -> (mean, std)."""
    if isinstance(norm, str):
        if norm not in NORM_STATS:
            raise ValueError(f"unknown normalisation {norm!r}; choose one of {sorted(NORM_STATS)} "
                             "or give (mean, std)")
        return NORM_STATS[norm]
    mean, std = (tuple(float(v) for v in s) for s in norm)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalisation needs 3 means and 3 stds > 0, got mean {mean}, std {std}")
    return mean, std


class HOGTeacher(nn.Module):
    """Colour-aware histogram of oriented gradients per patch, computed in torch.

    Per RGB channel: central-difference gradients, unsigned orientation soft-binned
    into ``bins`` bins, magnitudes summed over ``cells x cells`` cells of each patch.
    The patch descriptor (3 * cells^2 * bins values) is l2-normalised *jointly* over
    the three channels, so which channels carry an edge (i.e. its colours) survives.
    The weight of a patch is its descriptor norm before normalisation plus ``floor``
    (small next to a strong edge's norm): flat patches (most of a simple scene's
    background) teach almost nothing and barely count.
    """

    def __init__(self, patch_size: int = 16, cells: int = 2, bins: int = 9, floor: float = 0.002):
        super().__init__()
        if patch_size % cells:
            raise ValueError(f"HOGTeacher: patch_size {patch_size} not divisible by cells {cells}")
        self.patch_size, self.cells, self.bins, self.floor = patch_size, cells, bins, floor
        self.dim = 3 * cells * cells * bins

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._patch_histograms(x)  # (B, N, 3*c*c*bins)
        norm = feats.norm(dim=-1)  # (B, N)
        feats = feats / (norm.unsqueeze(-1) + 1e-6)
        weights = norm + self.floor  # per image: independent of the rest of the batch
        return feats, weights

    def _patch_histograms(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unnormalised descriptors (B, N, 3 * cells^2 * bins)."""
        B, C, H, W = x.shape
        if C != 3 or H % self.patch_size or W % self.patch_size:
            raise ValueError(f"{type(self).__name__}: expected (B, 3, H, W) with H, W multiples of "
                             f"{self.patch_size}, got {tuple(x.shape)}")
        return self._per_patch(self._cell_histograms(x.float()))  # from (B, 3, bins, H/cell, W/cell)

    def _per_patch(self, cells: torch.Tensor) -> torch.Tensor:
        """Per-cell values (B, 3, F, H/cell, W/cell) -> one row per patch (B, N, 3 * cells^2 * F),
        ordered channel, cell row, cell column, value."""
        B, C, F_, ch, cw = cells.shape
        c = self.cells
        gh, gw = ch // c, cw // c
        patches = cells.view(B, C, F_, gh, c, gw, c).permute(0, 3, 5, 1, 4, 6, 2)
        return patches.reshape(B, gh * gw, C * c * c * F_)

    def _cell_histograms(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        nb, cell = self.bins, self.patch_size // self.cells
        xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
        gx = xp[:, :, 1:-1, 2:] - xp[:, :, 1:-1, :-2]  # central differences, (B, 3, H, W)
        gy = xp[:, :, 2:, 1:-1] - xp[:, :, :-2, 1:-1]
        mag = torch.sqrt(gx * gx + gy * gy)
        pos = torch.remainder(torch.atan2(gy, gx), math.pi) * (nb / math.pi)  # unsigned, in [0, nb)
        lo = pos.floor()
        frac = pos - lo
        lo = lo.long() % nb
        # Soft-bin every pixel straight into its (image, channel, bin, cell) slot with
        # bincount: no (B, 3, bins, H, W) intermediate, so cheaper on CPU than a scatter or
        # grouped conv over one.
        ch, cw = H // cell, W // cell
        rows = torch.arange(H, device=x.device).div(cell, rounding_mode="floor")
        cols = torch.arange(W, device=x.device).div(cell, rounding_mode="floor")
        cell_id = rows.view(H, 1) * cw + cols.view(1, W)  # (H, W)
        base = torch.arange(B * 3, device=x.device).view(B, 3, 1, 1) * nb
        size = B * 3 * nb * ch * cw
        hist = torch.bincount(((base + lo) * (ch * cw) + cell_id).reshape(-1),
                              (mag * (1 - frac)).reshape(-1), minlength=size)
        hist += torch.bincount(((base + (lo + 1) % nb) * (ch * cw) + cell_id).reshape(-1),
                               (mag * frac).reshape(-1), minlength=size)
        return (hist / (cell * cell)).to(x.dtype).view(B, 3, nb, ch, cw)


class ColourHOGTeacher(HOGTeacher):
    """Each cell's mean colour plus a HOG term, for every patch alike: the demo's default teacher.

    Descriptor per patch: the colour-aware HOG histogram (per-pixel mean gradient magnitudes,
    about 0.3 for a sharp edge) scaled by ``1 / (norm + edge_scale)``, then the mean RGB of
    each of its cells minus 0.5. At the default edge_scale (5) the orientation term is a
    twentieth of the colour term, so codes follow colours first and edges second; a smaller
    edge_scale weights edges more (RESULTS.md: demo pretraining). No per-patch weights: a
    flat patch has a definite target (its colour). With the plain HOG teacher a flat patch
    teaches nothing, so its code is whatever the encoder happens to give it, an arbitrary
    function of grey level and noise that masked image modeling cannot predict from the
    visible patches; on simple scenes most patches are flat.
    """

    def __init__(self, patch_size: int = 16, cells: int = 2, bins: int = 9, edge_scale: float = 5.0):
        super().__init__(patch_size, cells, bins)
        self.edge_scale = edge_scale
        self.dim = 3 * cells * cells * (bins + 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        hist = self._patch_histograms(x)  # (B, N, 3*c*c*bins)
        edges = hist / (hist.norm(dim=-1, keepdim=True) + self.edge_scale)
        colour = F.avg_pool2d(x.float(), self.patch_size // self.cells) - 0.5  # (B, 3, H/cell, W/cell)
        colour = self._per_patch(colour.unsqueeze(2))  # (B, N, 3*c*c)
        return torch.cat([edges, colour.to(edges.dtype)], dim=-1), None


class FrozenViTTeacher(nn.Module):
    """A frozen ViT whose patch tokens are the targets. Accepted files (local path):

    1. A whole network: a ``torch.export`` program (``torch.export.save``, ``.pt2``) or
       a TorchScript archive (``torch.jit.save``), e.g. a wrapper around CLIP or DINO
       that returns patch tokens. It is called on images resized to ``input_size`` and
       normalised with ``mean``/``std`` (``build_teacher``'s ``norm``) and must return token
       features (B, T, D) - if T is a square plus one, the first (cls) token is
       dropped - or a feature map (B, D, h, w). Export with a dynamic batch dimension.
    2. A timm / DINO / DeiT style ViT state dict: ``.safetensors``, or a ``torch.load``
       file (``weights_only=True``) holding the weights at the top level or under
       'model', 'state_dict' or 'teacher' (DINO), with keys ``patch_embed.proj.*``,
       ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
       mlp.fc1,mlp.fc2}.*`` and a final ``norm.*`` (a leading ``module.`` or
       ``backbone.`` is stripped; classifier ``head.*`` keys ignored). Heads default to
       dim / 64 (every ViT-S/B/L/H); LayerNorm eps 1e-6 (timm, DINO). The k part of
       the fused qkv bias is dropped: it adds the same term to every key's logit, so
       softmax ignores it and the output is unchanged.
    3. (``clip``, :meth:`from_clip`) OpenAI CLIP's ViT image tower: its state dict, bare
       or under ``visual.`` in a whole CLIP checkpoint, in any file of 2., or OpenAI's own
       released TorchScript archive (only its weights are read). Targets are BEiT v2's:
       patch tokens after ``ln_post``, times ``proj``.

    Outputs (the final-normed patch tokens; CLIP's projected ones) are bilinearly
    resampled to the tokenizer's ``grid`` when the teacher's own patch grid differs.
    """

    def __init__(self, net: nn.Module, dim: int, grid: int, input_size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net, self.dim, self.grid, self.input_size = net, dim, grid, input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.training = False

    @classmethod
    def from_path(cls, path: str, grid: int, input_size: int | None = None, num_heads: int | None = None,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD) -> "FrozenViTTeacher":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher checkpoint not found: {path}")
        net = _load_program(path)
        if net is not None:
            if input_size is None:
                raise ValueError("a torch.export / TorchScript teacher needs input_size (its image size)")
            with torch.no_grad():
                dim = _tokens_to_grid(net(torch.zeros(1, 3, input_size, input_size)), grid).shape[-1]
            return cls(net, dim, grid, input_size, mean, std)
        net = vit_from_timm_state(_read_state(path), num_heads=num_heads).eval()
        return cls(net, net.fc_norm.weight.shape[0], grid, input_size or net.image_size, mean, std)

    @classmethod
    def from_clip(cls, path: str, grid: int, input_size: int | None = None, num_heads: int | None = None,
                  mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> "FrozenViTTeacher":
        """OpenAI CLIP's image tower at ``path`` (see 3. above); dim = its ``proj`` width."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher checkpoint not found: {path}")
        net = clip_visual_from_state(_read_clip_state(path), num_heads=num_heads)
        return cls(net, net.output_dim, grid, input_size or net.image_size, mean, std)

    def train(self, mode: bool = True):
        """Always frozen in eval mode; the net was put in eval mode (or exported so) at load."""
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False).clamp(0, 1)
        out = self.net((x - self.mean) / self.std)
        return _tokens_to_grid(out.float(), self.grid), None


def vit_from_timm_state(state: dict[str, torch.Tensor], num_heads: int | None = None,
                        eps: float = 1e-6) -> ViT:
    """Build our BEiT-style ViT from a timm/DINO ViT state dict (see FrozenViTTeacher)."""
    state = {_strip(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError("not a ViT state dict: needs patch_embed.proj.weight and pos_embed; "
                         f"found e.g. {sorted(state)[:8]}")
    proj = state["patch_embed.proj.weight"]
    dim, patch = proj.shape[0], proj.shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    net = ViT(grid * patch, patch, proj.shape[1], dim, depth, num_heads or max(1, dim // 64),
              mlp_ratio, eps)
    converted = {}
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            prefix = k[: -len("qkv.bias")]
            converted[prefix + "q_bias"], _, converted[prefix + "v_bias"] = v.chunk(3)
        elif k.startswith("norm."):
            converted["fc_norm." + k[len("norm."):]] = v  # LN is per token: same on patch tokens
        else:
            converted[k] = v
    load_strict(net, converted, source="ViT teacher")
    return net


def _tokens_to_grid(out: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, T, D) tokens or (B, D, h, w) map -> (B, grid*grid, D) patch features."""
    if out.dim() == 4:
        fmap = out
    elif out.dim() == 3:
        T = out.shape[1]
        side = math.isqrt(T)
        if side * side != T:
            side = math.isqrt(T - 1)
            if side * side != T - 1:
                raise ValueError(f"teacher returned {T} tokens: neither a square grid nor one plus a square")
            out = out[:, 1:]
        fmap = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    else:
        raise ValueError(f"teacher output must be (B, T, D) or (B, D, h, w), got {tuple(out.shape)}")
    if fmap.shape[-1] != grid or fmap.shape[-2] != grid:
        fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)


def _load_program(path: str):
    """A torch.export program or TorchScript archive at ``path`` as a callable; None if neither."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.split("/", 1)[-1].startswith("models/") or n.endswith("serialized_exported_program.json")
           for n in names):
        return torch.export.load(path).module()
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return torch.jit.load(path, map_location="cpu").eval()
    return None


def _read_clip_state(path: str) -> dict[str, torch.Tensor]:
    """OpenAI releases CLIP as a TorchScript archive of the whole model: read its weights."""
    program = _load_program(path)
    if isinstance(program, torch.jit.ScriptModule):
        return program.state_dict()
    if program is not None:
        raise ValueError(f"{path}: a torch.export program; teacher 'clip' needs CLIP weights "
                         "(use teacher 'vit' for a whole exported network)")
    return _read_state(path)


def _read_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    raw = load_torch_checkpoint(path)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            return raw[key]
    if isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw
    raise ValueError(f"{path}: no ViT weights found (top level, 'model', 'state_dict' or 'teacher')")


def _strip(key: str) -> str:
    for prefix in ("module.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def build_teacher(kind: str, grid: int, patch_size: int, checkpoint: str | None = None,
                  input_size: int | None = None, norm=None) -> nn.Module:
    """``hog_colour`` or ``hog`` (no weights), ``vit`` or ``clip`` (``checkpoint`` = a local file,
    see FrozenViTTeacher). ``norm``: a NORM_STATS name or (mean, std) for a network teacher;
    None = the teacher's own (DEFAULT_NORM). The HOG teachers read raw pixels and take none."""
    if kind in PIXEL_TEACHERS:
        if norm is not None:
            raise ValueError(f"teacher {kind!r} reads raw pixels: it takes no normalisation")
        return PIXEL_TEACHERS[kind](patch_size=patch_size)
    if kind not in DEFAULT_NORM:
        raise ValueError(f"unknown teacher {kind!r}; choose one of {sorted(PIXEL_TEACHERS) + sorted(DEFAULT_NORM)}")
    if not checkpoint:
        raise ValueError(f"teacher {kind!r} needs a checkpoint path")
    mean, std = norm_stats(DEFAULT_NORM[kind] if norm is None else norm)
    load = FrozenViTTeacher.from_clip if kind == "clip" else FrozenViTTeacher.from_path
    return load(checkpoint, grid=grid, input_size=input_size, mean=mean, std=std)


# Teachers computed from the pixels alone (no checkpoint, no normalisation).
PIXEL_TEACHERS = {"hog": HOGTeacher, "hog_colour": ColourHOGTeacher}


__all__ = ["HOGTeacher", "ColourHOGTeacher", "PIXEL_TEACHERS", "FrozenViTTeacher", "vit_from_timm_state", "build_teacher", "norm_stats",
           "NORM_STATS", "DEFAULT_NORM", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD"]
