"""Image-text retrieval as BEiT-3's retrieval fine-tuning does it (unilm/beit3 BEiT3ForRetrieval).

The whole model is fine-tuned with a symmetric contrastive (CLIP) loss over the
cls states of separately encoded images and captions, projected by
``vision_head`` / ``language_head`` (Linear D -> D, no bias) and scaled by
``exp(logit_scale)``; then image->text and text->image recall@k on held-out pairs.

Images stay on disk (``RetrievalData.images`` is a lazy ``ImageFiles``): each fine-tune step
decodes its own batch, recall embeds the test images batch by batch, and recall@k ranks
the (N_img, N_txt) similarities a block of rows or columns at a time, so memory follows the
batch and the embedding matrices, not the number of images.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.batch import pad_texts
from model.beit3 import BEiT3
from model.optim import param_groups, warmup_cosine
from pipelines.common.eval_data import ImageFiles, prefetched
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
    images: ImageFiles            # N images, loaded per batch as (B, 3, S, S) in [-1, 1]
    captions: list[list[int]]     # token ids, <s> ... </s>
    caption_image: torch.Tensor   # (C,) long: the image of each caption


def sample_steps(data: RetrievalData, batch_size: int, steps: int, gen: torch.Generator
                 ) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Per step: (B,) image indices (epoch-wise shuffled: a fresh permutation when fewer than
    B are left) and the index of one caption of each image, drawn at random; all from ``gen``."""
    by_image = [[] for _ in range(len(data.images))]
    for j, i in enumerate(data.caption_image.tolist()):
        by_image[i].append(j)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(data.images), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx, [by_image[i][int(torch.randint(len(by_image[i]), (1,), generator=gen))] for i in idx.tolist()]


def _step_batch(data: RetrievalData, sample: tuple[torch.Tensor, list[int]], pad_id: int):
    """(idx, picks) -> images (B, 3, S, S), ids (B, L), padding mask (B, L): decoded from disk."""
    idx, picks = sample
    ids, pad = pad_texts([data.captions[j] for j in picks], pad_id)
    return data.images.load(idx), ids, pad


def finetune(model: RetrievalModel, data: RetrievalData, cfg, pad_id: int, seed: int, device) -> list[float]:
    """cfg: RetrievalConfig. Each step: batch_size images (epoch-wise shuffled), one of each
    image's captions at random (``sample_steps``). Returns the loss of every step."""
    heads = [p for n, p in model.named_parameters() if not n.startswith("beit3.")]
    groups = param_groups(model.beit3, cfg.weight_decay)
    for g in groups:
        g["lr_base"] = cfg.lr
    groups.append({"params": heads, "weight_decay": 0.0, "lr_base": cfg.head_lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    batches = prefetched(lambda sample: _step_batch(data, sample, pad_id),
                         sample_steps(data, cfg.batch_size, cfg.steps, gen))
    losses = []
    model.train()
    for step, (images, ids, pad) in enumerate(batches):
        for g in optimizer.param_groups:
            g["lr"] = g["lr_base"] * warmup_cosine(step, cfg.steps, cfg.warmup_steps)
        torch.manual_seed(mix_seed(seed, step))  # drop path, if any
        loss = model.contrastive_loss(images.to(device), ids.to(device), pad.to(device))
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
    """Embed the held-out images (read from disk chunk by chunk) and captions, then recall@k."""
    model.eval()
    img = torch.cat([model.embed_images(x.to(device)) for x in data.images.batches(chunk)])  # (N_img, D)
    txt = []
    for i in range(0, len(data.captions), chunk):
        ids, pad = pad_texts(data.captions[i:i + chunk], pad_id)
        txt.append(model.embed_texts(ids.to(device), pad.to(device)))
    txt = torch.cat(txt)  # (N_txt, D)
    return _recall(lambda rows: img[rows] @ txt.t(), lambda cols: txt[cols] @ img.t(), len(img),
                   data.caption_image.to(img.device))


def recall_at(sims: torch.Tensor, caption_image: torch.Tensor) -> dict:
    """sims (N_img, N_txt) similarities; caption_image (N_txt,) the image of each caption.
    i2t R@k: share of images with any of their captions among their top k captions;
    t2i R@k: share of captions with their image among their top k images."""
    return _recall(lambda rows: sims[rows], lambda cols: sims[:, cols].t(), sims.shape[0], caption_image)


def _recall(image_rows: Callable[[slice], torch.Tensor], caption_rows: Callable[[slice], torch.Tensor],
            num_images: int, caption_image: torch.Tensor, block: int = 256) -> dict:
    """recall_at without the whole similarity matrix: image_rows(s) gives the (b, N_txt)
    similarities of images s, caption_rows(s) the (b, N_img) ones of captions s; ``block``
    rows at a time, so the peak is block x max(N_img, N_txt) instead of N_img x N_txt."""
    num_captions = len(caption_image)
    hits = {f"{d}_r{k}": 0 for k in RECALL_AT for d in ("i2t", "t2i")}
    for start in range(0, num_images, block):
        rows = slice(start, min(start + block, num_images))
        sims = image_rows(rows)  # (b, N_txt)
        images = torch.arange(rows.start, rows.stop, device=sims.device)
        for k in RECALL_AT:
            top_txt = sims.topk(min(k, num_captions), dim=1).indices  # (b, k)
            hits[f"i2t_r{k}"] += int((caption_image[top_txt] == images[:, None]).any(1).sum())
    for start in range(0, num_captions, block):
        cols = slice(start, min(start + block, num_captions))
        sims = caption_rows(cols)  # (b, N_img)
        for k in RECALL_AT:
            top_img = sims.topk(min(k, num_images), dim=1).indices  # (b, k)
            hits[f"t2i_r{k}"] += int((top_img == caption_image[cols, None]).any(1).sum())
    out = {}
    for k in RECALL_AT:  # float32 shares, as a mean over a float32 hit vector gives them
        out[f"i2t_r{k}"] = round(float(torch.tensor(float(hits[f"i2t_r{k}"])) / num_images), 4)
        out[f"t2i_r{k}"] = round(float(torch.tensor(float(hits[f"t2i_r{k}"])) / num_captions), 4)
    out["mean_r1"] = round((out["i2t_r1"] + out["t2i_r1"]) / 2, 4)
    return out


def evaluate_retrieval(make_backbone: Callable[[], BEiT3], train: RetrievalData, test: RetrievalData, cfg,
                       pad_id: int, seed: int, device) -> dict:
    """Fine-tune a fresh RetrievalModel around ``make_backbone()`` (heads seeded by ``seed``) at
    each lr of ``cfg.lr_grid`` (or ``cfg.lr`` alone); the run with the lowest training loss over
    its last 10 steps is scored on ``test``, which never takes part in the choice. A pretrained
    backbone and a random one fine-tune best at different rates in a short run, so one fixed
    rate would compare the rate, not the initialisations."""
    best = None
    grid_losses = {}
    for lr in cfg.lr_grid or (cfg.lr,):
        run_cfg = dataclasses.replace(cfg, lr=lr, head_lr=cfg.head_lr * lr / cfg.lr)
        torch.manual_seed(seed)
        model = RetrievalModel(make_backbone(), cfg.pool).to(device)
        losses = finetune(model, train, run_cfg, pad_id, seed, device)
        tail = losses[-min(10, len(losses)):]
        grid_losses[lr] = round(sum(tail) / len(tail), 4)
        if best is None or grid_losses[lr] < grid_losses[best[0]]:
            best = (lr, model)  # only the best run's model is kept
        del model
    lr, model = best
    result = recall(model, test, pad_id, device)
    result["final_train_loss"] = grid_losses[lr]
    result["lr"] = lr
    if len(grid_losses) > 1:
        result["lr_grid_train_loss"] = {f"{k:g}": v for k, v in grid_losses.items()}
    return result
