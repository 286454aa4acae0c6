"""pretrain's data side: the per-modality order, how workers split the global batch and the
masks, and text chunks that keep the loss of one block."""
from __future__ import annotations

import pytest
import torch

from pipelines.common.shards import ShardIndex
from pipelines.pretrain.data import MixedStream, ModalityOrder, worker_positions
from tests.pipelines.pretrain_fixtures import tiny_corpus, tiny_job  # noqa: F401  (tiny_corpus is a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/pipelines/conftest.py


# ----------------------------------------------------------------------------- data order

def test_order_visits_every_row_once_per_epoch_and_is_a_function_of_the_seed():
    index = ShardIndex(("a", "b", "c"), {"text": (5, 0, 7), "image": (1, 1, 1), "pair": (0, 0, 0)})
    order = ModalityOrder(index, "text", seed=3)
    epoch0 = [order.locate(p) for p in range(12)]
    epoch1 = [order.locate(p) for p in range(12, 24)]
    assert sorted((s, r) for _, s, r in epoch0) == [(0, r) for r in range(5)] + [(2, r) for r in range(7)]
    assert sorted(epoch1[i][1:] for i in range(12)) == sorted(e[1:] for e in epoch0)
    assert [e[1:] for e in epoch0] != [e[1:] for e in epoch1]  # reshuffled per epoch
    assert [ModalityOrder(index, "text", seed=3).locate(p) for p in range(24)] == epoch0 + epoch1
    assert [ModalityOrder(index, "text", seed=4).locate(p) for p in range(12)] != epoch0


def test_workers_split_the_global_batch_exactly():
    assert list(worker_positions(5, 8, 0, 2)) + list(worker_positions(5, 8, 1, 2)) == list(worker_positions(5, 8, 0, 1))
    with pytest.raises(ValueError, match="divisible"):
        worker_positions(0, 9, 0, 2)


def test_two_streams_see_the_rows_of_one(tiny_corpus):
    from pipelines.common.shards import split_index

    index = split_index(tiny_corpus["shards"], "train")
    batch = {"text": 4, "image": 2, "pair": 6}
    one = MixedStream(index, batch, 0, 0, 1)
    two = [MixedStream(index, batch, 0, r, 2) for r in range(2)]
    for step in (0, 7, 31):  # 31 crosses several epochs of every modality
        ids = [r["id"] for r in one.rows(step)]
        halves = [[r["id"] for r in s.rows(step)] for s in two]
        for m in batch:
            assert [i for i in ids if f"-{m}-" in i] == [i for h in halves for i in h if f"-{m}-" in i]


def test_masks_do_not_depend_on_the_worker_count(tiny_corpus, tmp_path):
    from pipelines.pretrain.loop import PretrainLoop

    job = tiny_job(tiny_corpus, str(tmp_path), batch={"text": 4, "image": 4, "pair": 4})

    def masks(rank, world, step):
        loader = PretrainLoop(job, rank, world, torch.device("cpu"), None, None).loader
        try:
            batch, m, _, _ = loader._load(step)
        finally:
            loader.close()
        lengths = {"text": (~batch.text.padding_mask).sum(1), "pair": (~batch.pair.padding_mask).sum(1)}
        text = [row[:n].tolist() for row, n in zip(m.text.selected, lengths["text"])]
        caption = [row[:n].tolist() for row, n in zip(m.pair_text.selected, lengths["pair"])]
        return text, caption, m.image, m.pair_image

    for step in (0, 5):
        one = masks(0, 1, step)
        halves = [masks(r, 2, step) for r in (0, 1)]
        assert one[0] == halves[0][0] + halves[1][0] and one[1] == halves[0][1] + halves[1][1]
        assert torch.equal(one[2], torch.cat([halves[0][2], halves[1][2]]))
        assert torch.equal(one[3], torch.cat([halves[0][3], halves[1][3]]))
        assert one[2].sum(1).tolist() == [round(0.4 * 4)] * 4  # 40% of the 2x2 grid


def test_text_chunks_keep_the_loss_and_gradients_of_one_block(tiny_corpus, tmp_path):
    from pipelines.pretrain.data import split_text_part
    from pipelines.pretrain.loop import PretrainLoop, StepModule

    loop = PretrainLoop(tiny_job(tiny_corpus, str(tmp_path), batch={"text": 8, "image": 4, "pair": 4}),
                        0, 1, torch.device("cpu"), None, None)
    batch, masks, _, _ = loop.loader._load(3)
    loop.loader.close()
    step = StepModule(loop.task)
    results = {}
    for chunks in (1, 4):
        loop.task.zero_grad()
        loss, outs = step(split_text_part(batch, masks, chunks))
        loss.backward()
        results[chunks] = (loss.detach(), [p.grad.clone() for p in loop.task.parameters()])
    reference = loop.task(batch, masks=masks).loss  # PretrainTask's own loss on the whole batch
    assert torch.allclose(results[1][0], reference) and torch.allclose(results[4][0], reference, atol=1e-6)
    for g1, g4 in zip(results[1][1], results[4][1]):
        assert torch.allclose(g1, g4, atol=1e-6)
