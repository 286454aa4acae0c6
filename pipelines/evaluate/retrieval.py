"""Image-text retrieval as BEiT-3's retrieval fine-tuning does it (unilm/beit3 BEiT3ForRetrieval).

The whole model is fine-tuned with a symmetric contrastive (CLIP) loss over the
cls states of separately encoded images and captions, projected by
``vision_head`` / ``language_head`` (Linear D -> D, no bias) and scaled by
``exp(logit_scale)``; then image->text and text->image recall@k on held-out pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.batch import pad_texts
from model.beit3 import BEiT3
from model.optim import param_groups, warmup_cosine
from pipelines.common.seeding import mix_seed

RECALL_AT = (1, 5, 10)


class RetrievalModel(nn.Module):
    """Backbone + the official retrieval heads (names as in unilm/beit3)."""

    def __init__(self, backbone: BEiT3, pool: str = "cls"):
        super().__init__()
        dim = backbone.config.dim
        self.beit3 = backbone
        self.pool = pool
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        for head in (self.vision_head, self.language_head):
            nn.init.trunc_normal_(head.weight, std=0.02)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D), unit norm."""
        hidden = self.beit3.encode(image=images)  # (B, 1 + N, D)
        pooled = hidden[:, 0] if self.pool == "cls" else hidden[:, 1:].mean(1)
        return F.normalize(self.vision_head(pooled), dim=-1)

    def embed_texts(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids with <s> first -> (B, D), unit norm."""
        hidden = self.beit3.encode(text=ids, text_padding_mask=padding_mask)  # (B, L, D)
        if self.pool == "cls":
            pooled = hidden[:, 0]
        else:  # mean over the real tokens
            keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)
        return F.normalize(self.language_head(pooled), dim=-1)

    def contrastive_loss(self, images, ids, padding_mask) -> torch.Tensor:
        """Symmetric InfoNCE over the batch: image i matches caption i."""
        img, txt = self.embed_images(images), self.embed_texts(ids, padding_mask)
        logits = self.logit_scale.exp() * img @ txt.t()  # (B, B)
        target = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@dataclass(frozen=True)
class RetrievalData:
    images: torch.Tensor          # (N, 3, S, S) in [-1, 1]
    captions: list[list[int]]     # token ids, <s> ... </s>
    caption_image: torch.Tensor   # (C,) long: the image of each caption


def finetune(model: RetrievalModel, data: RetrievalData, cfg, pad_id: int, seed: int, device) -> list[float]:
    """cfg: RetrievalConfig. Each step: batch_size images (epoch-wise shuffled), one of each
    image's captions at random. Returns the loss of every step."""
    heads = [p for n, p in model.named_parameters() if not n.startswith("beit3.")]
    groups = param_groups(model.beit3, cfg.weight_decay)
    for g in groups:
        g["lr_base"] = cfg.lr
    groups.append({"params": heads, "weight_decay": 0.0, "lr_base": cfg.head_lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    by_image = [[] for _ in range(len(data.images))]
    for j, i in enumerate(data.caption_image.tolist()):
        by_image[i].append(j)
    order, losses = torch.empty(0, dtype=torch.long), []
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(data.images), generator=gen)])
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        picks = [by_image[i][int(torch.randint(len(by_image[i]), (1,), generator=gen))] for i in idx.tolist()]
        ids, pad = pad_texts([data.captions[j] for j in picks], pad_id)
        for g in optimizer.param_groups:
            g["lr"] = g["lr_base"] * warmup_cosine(step, cfg.steps, cfg.warmup_steps)
        torch.manual_seed(mix_seed(seed, step))  # drop path, if any
        loss = model.contrastive_loss(data.images[idx].to(device), ids.to(device), pad.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, cfg.steps // 10) == 0:  # ~10 progress lines per fine-tune
            print(f"evaluate: retrieval fine-tune step {step + 1}/{cfg.steps} | loss {losses[-1]:.4f}", flush=True)
    return losses


@torch.no_grad()
def recall(model: RetrievalModel, data: RetrievalData, pad_id: int, device, chunk: int = 128) -> dict:
    """Embed the held-out images and captions, then recall_at."""
    model.eval()
    img = torch.cat([model.embed_images(data.images[i:i + chunk].to(device)) for i in range(0, len(data.images), chunk)])
    txt = []
    for i in range(0, len(data.captions), chunk):
        ids, pad = pad_texts(data.captions[i:i + chunk], pad_id)
        txt.append(model.embed_texts(ids.to(device), pad.to(device)))
    return recall_at(img @ torch.cat(txt).t(), data.caption_image.to(img.device))


def recall_at(sims: torch.Tensor, caption_image: torch.Tensor) -> dict:
    """sims (N_img, N_txt) similarities; caption_image (N_txt,) the image of each caption.
    i2t R@k: share of images with any of their captions among their top k captions;
    t2i R@k: share of captions with their image among their top k images."""
    out = {}
    images = torch.arange(sims.shape[0], device=sims.device)
    for k in RECALL_AT:
        top_txt = sims.topk(min(k, sims.shape[1]), dim=1).indices      # (N_img, k)
        i2t = (caption_image[top_txt] == images[:, None]).any(1)
        top_img = sims.t().topk(min(k, sims.shape[0]), dim=1).indices  # (N_txt, k)
        t2i = (top_img == caption_image[:, None]).any(1)
        out[f"i2t_r{k}"] = round(float(i2t.float().mean()), 4)
        out[f"t2i_r{k}"] = round(float(t2i.float().mean()), 4)
    out["mean_r1"] = round((out["i2t_r1"] + out["t2i_r1"]) / 2, 4)
    return out


def evaluate_retrieval(backbone: BEiT3, train: RetrievalData, test: RetrievalData, cfg, pad_id: int,
                       seed: int, device) -> dict:
    """Fine-tune a fresh RetrievalModel around ``backbone`` (heads seeded by ``seed``), then recall."""
    torch.manual_seed(seed)
    model = RetrievalModel(backbone, cfg.pool).to(device)
    losses = finetune(model, train, cfg, pad_id, seed, device)
    result = recall(model, test, pad_id, device)
    tail = losses[-min(10, len(losses)):]
    result["final_train_loss"] = round(sum(tail) / len(tail), 4)
    return result
