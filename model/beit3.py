"""The BEiT-3 Multiway Transformer backbone (DESIGN section 3).

Sequence = [vision cls, patches..., text tokens...]; attention is joint over
the whole sequence, while layer norms, projections and FFNs are per-modality
experts chosen by the split position (see model.multiway).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import MultiwayAttention
from model.config import BEiT3Config
from model.embeddings import PositionTables, VisionEmbedding
from model.multiway import Multiway, drop_path, ffn_expert, routed


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated to +-2 std by the inverse CDF.

    Same distribution as torch.nn.init.trunc_normal_(std=std, a=-2std, b=2std),
    without its rejection loop, which is slow on the CPU for tables as large as
    the 64010-row text embedding; pretraining heads can use it too.
    """
    bound = math.erf(2.0 / math.sqrt(2.0))  # CDF mass within +-2 std, mapped to [-1, 1]
    tensor.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2.0))
    return tensor.clamp_(-2 * std, 2 * std)


class MultiwayBlock(nn.Module):
    """Pre-LN block: x + attn(x), then x + ffn(x), each with stochastic depth."""

    def __init__(self, cfg: BEiT3Config, drop_path_rate: float, has_vl_expert: bool):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.attn = MultiwayAttention(cfg, shared=cfg.variant == "paper")

        def expert():
            return ffn_expert(cfg.dim, cfg.ffn_dim, cfg.layernorm_eps)

        self.ffn = Multiway(expert(), expert(), vl=expert() if has_vl_expert else None)

    def forward(self, x: torch.Tensor, split: int,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        x = x + drop_path(self.attn(x, split, attn_mask), self.drop_path_rate, self.training)
        return x + drop_path(self.ffn(x, split), self.drop_path_rate, self.training)


class BEiT3(nn.Module):
    """BEiT-3 backbone: ``encode(image, text, ...)`` -> final hidden states (B, T, D)."""

    def __init__(self, config: BEiT3Config):
        super().__init__()
        cfg = self.config = config
        self.num_patches = cfg.num_patches
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.pos_embed = PositionTables(cfg)
        # drop path rises linearly from 0 at the first layer to cfg.drop_path at the last
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_vl = cfg.depth - cfg.vl_expert_layers
        self.layers = nn.ModuleList(
            MultiwayBlock(cfg, rates[i], has_vl_expert=i >= first_vl) for i in range(cfg.depth)
        )
        if cfg.final_norm:
            self.final_norm = Multiway(nn.LayerNorm(cfg.dim, eps=cfg.layernorm_eps),
                                       nn.LayerNorm(cfg.dim, eps=cfg.layernorm_eps))
        else:
            self.final_norm = nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh weights for pretraining from scratch.

        Linear and embedding tables: truncated normal, std 0.02; biases 0;
        LayerNorms 1/0; cls and mask tokens: truncated normal 0.02. Then the
        Magneto sub-LN scaling that torchscale applies for subln=True: fc1,
        fc2, out_proj and v_proj weights times sqrt(log(2 * depth)).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                trunc_normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for token in (self.vision_embed.cls_token, self.vision_embed.mask_token):
            trunc_normal_(token, std=0.02)
        gain = math.sqrt(math.log(2 * self.config.depth))
        dim = self.config.dim
        for name, param in self.named_parameters():
            if not name.endswith("weight"):
                continue
            if ".fc1." in name or ".fc2." in name or (".attn.out." in name and ".proj." in name):
                param.mul_(gain)
            elif ".attn.qkv." in name and ".proj." in name:
                param[2 * dim:].mul_(gain)  # the v rows of the fused q/k/v projection

    def forward(self, image=None, text=None, text_padding_mask=None, image_mask=None):
        return self.encode(image, text, text_padding_mask, image_mask)

    def encode(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states, vision cls and patches first, then text.

        image (B, 3, H, W) in [-1, 1]; text (B, L) long ids; text_padding_mask
        (B, L) bool, True = padding; image_mask (B, N) bool, True = the patch
        is replaced by the mask token. Returns (B, T, D) with T = [1 + N] + [L].
        """
        x, split = self._embed(image, text, image_mask)
        attn_mask = self._attention_mask(text_padding_mask, text, split)
        for layer in self.layers:
            if self.config.checkpoint_activations and torch.is_grad_enabled():
                # non-reentrant checkpointing replays the RNG, so drop path is identical
                x = checkpoint(layer, x, split, attn_mask, use_reentrant=False)
            else:
                x = layer(x, split, attn_mask)
        return routed(self.final_norm, x, split)

    def _embed(self, image, text, image_mask) -> tuple[torch.Tensor, int]:
        """-> tokens + positions (B, T, D) and the split (number of vision tokens)."""
        if image is None and text is None:
            raise ValueError("encode needs an image, a text or both")
        if image_mask is not None and image is None:
            raise ValueError("image_mask given without an image")
        parts = []
        if image is not None:
            parts.append(self.vision_embed(image, image_mask))
        if text is not None:
            if text.dim() != 2:
                raise ValueError(f"text must be (batch, length) ids, got shape {tuple(text.shape)}")
            if text.shape[1] > self.config.max_text_len:
                raise ValueError(f"text has {text.shape[1]} tokens; at most "
                                 f"{self.config.max_text_len} fit the position table")
            parts.append(self.text_embed(text))
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"image batch {parts[0].shape[0]} != text batch {parts[1].shape[0]}")
        split = parts[0].shape[1] if image is not None else 0
        num_text = text.shape[1] if text is not None else 0
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return x + self.pos_embed(split, num_text).to(x.dtype), split

    @staticmethod
    def _attention_mask(text_padding_mask, text, split: int) -> torch.Tensor | None:
        """(B, L) True = padding -> (B, 1, 1, T) True = may be attended to, or None."""
        if text_padding_mask is None:
            return None
        if text is None:
            raise ValueError("text_padding_mask given without text")
        if text_padding_mask.shape != text.shape or text_padding_mask.dtype != torch.bool:
            raise ValueError(f"text_padding_mask must be bool of shape {tuple(text.shape)}, got "
                             f"{text_padding_mask.dtype} {tuple(text_padding_mask.shape)}")
        keep = ~text_padding_mask
        if split:
            keep = torch.cat([keep.new_ones(keep.shape[0], split), keep], dim=1)
        return keep[:, None, None, :]
