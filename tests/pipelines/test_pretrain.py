"""pretrain: config checks, the lr schedule, reproducible and exactly resumed runs, 1 vs 2 workers, a
killed worker, exports (the data order and masks: test_pretrain_data.py)."""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.safe_load import UnsafeCheckpointError
from pipelines.common import storage
from pipelines.common.configs import ParamsError, build
from pipelines.common.ray_session import RayConfig
from pipelines.common.train_csv import read_csv
from pipelines.pretrain import PretrainConfig, run_pretraining
from pipelines.pretrain.loop import lr_at
from tests.pipelines.pretrain_fixtures import (  # noqa: F401  (tiny_corpus is a fixture)
    VISUAL_CODES,
    tiny_corpus,
    tiny_job,
    tiny_pretrain_params,
    train_in_process,
)
from tests.reliability.processes import committed_step

LOSS_KEYS = ("loss", "loss_text_mlm", "loss_image_mim", "loss_pair_mlm", "loss_pair_mim")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/pipelines/conftest.py


def curve(rows: list[dict]) -> list[list[float]]:
    return [[r["step"], *(r[k] for k in LOSS_KEYS)] for r in rows]


# ----------------------------------------------------------------------------- config and schedule

# the required output paths, for configs built from a few keys
PATHS = {"out_dir": "unused", "checkpoint_dir": "unused", "plots_path": "unused"}


def test_config_checks_name_the_key(tmp_path):
    with pytest.raises(ParamsError, match=r"pretrain\.batch\.text.*divisible"):
        build(PretrainConfig, tiny_pretrain_params(str(tmp_path), num_workers=3), "pretrain")
    with pytest.raises(ParamsError, match=r"pretrain\.stepz: unknown key"):
        build(PretrainConfig, {**PATHS, "stepz": 3}, "pretrain")
    with pytest.raises(ParamsError, match=r"pretrain\.strategy"):
        build(PretrainConfig, {**PATHS, "strategy": "zero3"}, "pretrain")
    with pytest.raises(ParamsError, match=r"pretrain\.masking"):
        build(PretrainConfig, {**PATHS, "masking": {"text_ratio": 1.5}}, "pretrain")


def test_lr_is_scaled_warmed_up_and_decayed(tmp_path):
    cfg = build(PretrainConfig, tiny_pretrain_params(str(tmp_path), lr=1e-3, lr_reference_batch=24,
                                                     steps=100, warmup_steps=10, min_lr=0.0), "pretrain")
    assert cfg.peak_lr == pytest.approx(5e-4)  # global batch 12 at reference 24
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(5e-5) and lrs[9] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-6


def test_run_name_follows_the_trajectory_not_the_runtime(tiny_corpus, tmp_path):
    base = tiny_job(tiny_corpus, str(tmp_path))["run_name"]
    assert tiny_job(tiny_corpus, str(tmp_path), num_workers=2, log_every=5)["run_name"] == base
    assert tiny_job(tiny_corpus, str(tmp_path), lr=5e-4)["run_name"] != base


def test_run_name_changes_when_the_shards_are_rebuilt_with_other_codes(tiny_corpus, tmp_path):
    """Same shard names and row counts, other contents (the shards of a retrained visual
    tokenizer): a new run, never a resume of the old run's finished checkpoint."""
    shards = shutil.copytree(tiny_corpus["shards"], tmp_path / "shards")
    manifest = storage.read_json(str(shards / "manifest.json"))
    entry = manifest["shards"][0]
    path = str(shards / entry["path"])
    table = pq.read_table(path)
    codes = [c and [(x + 1) % VISUAL_CODES for x in c] for c in table.column("visual_tokens").to_pylist()]
    column = table.schema.get_field_index("visual_tokens")
    table = table.set_column(column, table.schema.field(column), pa.array(codes, table.schema.field(column).type))
    entry["sha256"] = storage.sha256(storage.write_parquet(table, path))
    storage.write_json(str(shards / "manifest.json"), manifest)
    rebuilt = tiny_job({**tiny_corpus, "shards": str(shards)}, str(tmp_path))["run_name"]
    assert rebuilt != tiny_job(tiny_corpus, str(tmp_path))["run_name"]


# ----------------------------------------------------------------------------- the loop in-process

def test_fixed_seed_reproduces_the_loss_curve(tiny_corpus, tmp_path):
    first, _ = train_in_process(tiny_job(tiny_corpus, str(tmp_path), steps=6))
    second, _ = train_in_process(tiny_job(tiny_corpus, str(tmp_path), steps=6))
    assert curve(first.history) == curve(second.history)
    assert first.history[-1]["loss"] < first.history[0]["loss"]
    other, _ = train_in_process(tiny_job(tiny_corpus, str(tmp_path), steps=6, seed=1))
    assert curve(other.history) != curve(first.history)


def test_resume_continues_at_the_exact_next_sample(tiny_corpus, tmp_path):
    job = tiny_job(tiny_corpus, str(tmp_path), steps=8, checkpoint_every=3, log_samples=True)
    full, saved = train_in_process(job, keep_dir=str(tmp_path / "ckpts"))
    assert sorted(saved) == [3, 6, 8]
    resumed, _ = train_in_process(job, resume_dir=saved[3])
    assert resumed.resumed_from == 3
    assert resumed.samples == full.samples  # steps 1-3 from the checkpoint, 4-8 trained again
    assert torch.allclose(torch.tensor(curve(resumed.history)), torch.tensor(curve(full.history)), rtol=1e-5)
    for key, value in full.task.state_dict().items():
        assert torch.allclose(value, resumed.task.state_dict()[key], atol=1e-6), key


def test_a_checkpoint_that_would_run_code_is_refused(tiny_corpus, tmp_path):
    job = tiny_job(tiny_corpus, str(tmp_path), steps=2, checkpoint_every=2)
    _, saved = train_in_process(job, keep_dir=str(tmp_path / "ckpts"))

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    with open(os.path.join(saved[2], "state", ".metadata"), "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(UnsafeCheckpointError, match=".metadata: refused to load"):
        train_in_process(job, resume_dir=saved[2])
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- Ray Train

@pytest.mark.slow
def test_two_workers_train_like_one(tiny_corpus, tmp_path, ray_local):
    """Ray Train with two workers against the same loop run with one worker in this process
    (one thread, like a Ray worker; a one-worker Ray run is the end-to-end tests' `dvc repro`)."""
    params = tiny_pretrain_params(str(tmp_path / "w2"), num_workers=2, steps=10)
    cfg = build(PretrainConfig, params, "pretrain")
    summary = run_pretraining(cfg, tiny_corpus["shards"], tiny_corpus["text_tokenizer"], RayConfig())
    assert summary["steps"] == 10 and summary["num_workers"] == 2
    assert {"config.json", "model.safetensors", "heads.safetensors", "task.json",
            "beit3_official.pth"} <= set(os.listdir(cfg.out_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, _ = train_in_process(tiny_job(tiny_corpus, str(tmp_path / "w1"), steps=10))
    finally:
        torch.set_num_threads(threads)
    one, two = torch.tensor(curve(single.history)), torch.tensor(curve(read_csv(cfg.plots_path)))
    assert one.shape == two.shape == (10, 1 + len(LOSS_KEYS))
    # Step 1: same initial weights, samples and masks; only the sums' order differs.
    assert torch.allclose(one[0], two[0], rtol=1e-5)
    # Later steps differ only through float reduction order and the per-worker mean of the
    # text MLM loss (a worker averages over its own masked tokens).
    assert torch.allclose(one, two, rtol=0.02), (one - two).abs().max()
    assert one[-1, 1] < one[0, 1]


def same_samples(a: list[dict], b: list[dict]) -> bool:
    """The same sample ids at every step (workers list a step's ids rank by rank)."""
    return [(s["step"], sorted(s["ids"])) for s in a] == [(s["step"], sorted(s["ids"])) for s in b]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sharded_and_replicated_runs_resume_exactly(tiny_corpus, tmp_path, strategy):
    """Two gloo ranks without Ray: the checkpoint of a DDP / FSDP run restores model and
    optimizer state exactly (DCP: every rank saves and reloads its own shard), and resumes
    on another number of workers."""
    from tests.pipelines.pretrain_fixtures import run_distributed

    job = tiny_job(tiny_corpus, str(tmp_path), steps=8, checkpoint_every=4, log_samples=True,
                   strategy=strategy, num_workers=2)
    full = run_distributed(job, 2, str(tmp_path / "full"))
    resumed = run_distributed(job, 2, str(tmp_path / "resumed"), resume_dir=str(tmp_path / "full" / "step-4"))
    assert resumed["resumed_from"] == 4 and resumed["samples"] == full["samples"]
    assert torch.allclose(torch.tensor(curve(resumed["history"])), torch.tensor(curve(full["history"])), rtol=1e-5)
    single, saved = train_in_process(tiny_job(tiny_corpus, str(tmp_path), steps=8, log_samples=True),
                                     keep_dir=str(tmp_path / "single"))
    assert torch.allclose(torch.tensor(curve(full["history"])), torch.tensor(curve(single.history)), rtol=0.02)
    # the sharded checkpoint of 2 workers resumes on 1 (DCP reshards), and 1 worker's on 2
    one_of_two, _ = train_in_process(tiny_job(tiny_corpus, str(tmp_path / "w1"), steps=8, log_samples=True),
                                     resume_dir=str(tmp_path / "full" / "step-4"))
    assert one_of_two.resumed_from == 4 and same_samples(one_of_two.samples, full["samples"])
    assert torch.allclose(torch.tensor(curve(one_of_two.history)), torch.tensor(curve(full["history"])), rtol=0.02)
    if strategy == "fsdp":
        two_of_one = run_distributed(job, 2, str(tmp_path / "w2"), resume_dir=saved[4])
        assert two_of_one["resumed_from"] == 4 and same_samples(two_of_one["samples"], single.samples)
        assert torch.allclose(torch.tensor(curve(two_of_one["history"])), torch.tensor(curve(single.history)),
                              rtol=0.02)


def test_gradient_accumulation_gives_the_update_of_one_batch(tiny_corpus, tmp_path):
    """k micro-batches then one optimizer step = one step on the whole global batch (drop
    path 0): the same loss curve within float tolerance, from the same data and masks."""
    curves = {}
    for k in (1, 2, 4):
        job = tiny_job(tiny_corpus, str(tmp_path / f"k{k}"), batch={"text": 8, "image": 4, "pair": 4},
                       grad_accum_steps=k, steps=5, checkpoint_every=5)
        loop, _ = train_in_process(job)
        curves[k] = torch.tensor([[r["loss"], r["loss_text_mlm"], r["loss_pair_mim"]] for r in loop.history])
    assert torch.allclose(curves[2], curves[1], rtol=1e-4, atol=1e-5)
    assert torch.allclose(curves[4], curves[1], rtol=1e-4, atol=1e-5)
    assert curves[1][0, 0] != curves[1][-1, 0]  # it trains


def test_the_training_log_grows_while_the_run_trains(tiny_corpus, tmp_path):
    from pipelines.pretrain.loop import PretrainLoop

    job = tiny_job(tiny_corpus, str(tmp_path), steps=6, checkpoint_every=3)
    seen = {}

    def report(metrics, directory):  # called at every checkpoint, mid-run
        seen[int(metrics["step"])] = read_csv(job["live_csv"])

    PretrainLoop(job, 0, 1, torch.device("cpu"), report, None).run()
    assert [len(seen[3]), len(seen[6])] == [3, 6]
    assert [r["step"] for r in seen[6]] == [1, 2, 3, 4, 5, 6] and seen[6][:3] == seen[3]
    assert all(r["loss"] is not None and r["lr"] > 0 for r in seen[6])


def _kill_a_train_worker_after(checkpoint_dir: str, step: int, timeout: float = 300.0) -> dict:
    """In a thread: once Ray Train has committed the checkpoint of ``step``, SIGKILL one Ray
    Train worker process; the returned dict gets its pid, or what the watcher last saw. Set
    ``killed["stop"]`` to end the watch."""
    import threading

    import psutil

    killed = {"stop": threading.Event(), "seen": {}}

    def train_workers() -> list[int]:
        pids = []
        # this session's Ray runs under this process: never touch another run's workers
        for proc in psutil.Process().children(recursive=True):
            try:  # a short-lived child may be gone (or a zombie) between listing and reading
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    pids.append(proc.pid)
            except psutil.Error:
                continue
        return pids

    def watch():
        try:
            watch_until_killed()
        except Exception as error:  # shown by the test's assertion, not lost in the thread
            killed["seen"]["error"] = repr(error)

    def watch_until_killed():
        deadline = time.time() + timeout
        while time.time() < deadline and not killed["stop"].is_set():
            committed = committed_step(checkpoint_dir)
            killed["seen"] = {"committed_step": committed}
            if committed >= step:
                workers = train_workers()
                killed["seen"]["workers"] = workers
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed["pid"] = workers[0]
                    return
            time.sleep(0.05)

    killed["thread"] = threading.Thread(target=watch, daemon=True)
    killed["thread"].start()
    return killed


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_last_checkpoint(tiny_corpus, tmp_path, ray_local):
    """pretrain.max_failures: Ray Train replaces a SIGKILLed worker and resumes from the last
    checkpoint by itself; the finished run's curve is the uninterrupted run's (the same loop
    run in this process, one thread like the Ray worker)."""
    # long enough that Ray Train's commit of an early checkpoint is seen well before the end
    overrides = {"steps": 64, "checkpoint_every": 8, "max_failures": 2}
    cfg = build(PretrainConfig, tiny_pretrain_params(str(tmp_path / "killed"), **overrides), "pretrain")
    killer = _kill_a_train_worker_after(cfg.checkpoint_dir, step=8)
    summary = run_pretraining(cfg, tiny_corpus["shards"], tiny_corpus["text_tokenizer"], RayConfig())
    killer["stop"].set()
    killer["thread"].join()
    assert killer.get("pid"), f"no train worker was killed; the watcher last saw {killer['seen']}"
    assert summary["steps"] == 64 and 8 <= summary["resumed_from_step"] < 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, _ = train_in_process(tiny_job(tiny_corpus, str(tmp_path / "reference"), **overrides))
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(torch.tensor(curve(read_csv(cfg.plots_path))), torch.tensor(curve(reference.history)),
                          rtol=1e-5)


def test_the_export_of_a_sharded_checkpoint_holds_the_trained_weights(tiny_corpus, tmp_path):
    """The exported model (gathered from the DCP checkpoint in one process) is exactly the
    task the loop trained, heads included."""
    from pipelines.common.task_files import load_exported_task
    from pipelines.pretrain.checkpoints import export_from_checkpoint

    loop, saved = train_in_process(tiny_job(tiny_corpus, str(tmp_path), steps=4, checkpoint_every=4),
                                   keep_dir=str(tmp_path / "ckpts"))
    assert sorted(os.listdir(os.path.join(saved[4], "state"))) == [".metadata", "__0_0.distcp"]
    export_from_checkpoint(saved[4], str(tmp_path / "model"))
    exported = load_exported_task(str(tmp_path / "model")).state_dict()
    trained = loop.task.state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_a_peak_lr_far_above_the_papers_fails_unless_allowed(tmp_path):
    """lr scales with global batch / lr_reference_batch: the paper's batch (2048 per
    modality) at the demo's reference batch would be 64x the paper's peak lr."""
    params = tiny_pretrain_params(str(tmp_path), batch={"text": 2048, "image": 2048, "pair": 2048},
                                  lr_reference_batch=96)
    with pytest.raises(ParamsError, match=r"peak lr is 0\.064 .* 64x the paper's .*pretrain\.allow_high_lr"):
        build(PretrainConfig, params, "pretrain")
    assert build(PretrainConfig, {**params, "allow_high_lr": True}, "pretrain").peak_lr == pytest.approx(0.064)
    assert build(PretrainConfig, {**params, "lr_reference_batch": 6144}, "pretrain").peak_lr == pytest.approx(1e-3)


def test_the_paper_variant_exports_its_own_layout(tiny_corpus, tmp_path):
    from pipelines.common.task_files import OFFICIAL_FILE, load_exported_task
    from pipelines.pretrain.checkpoints import export_from_checkpoint
    from tests.pipelines.pretrain_fixtures import TINY_MODEL

    job = tiny_job(tiny_corpus, str(tmp_path), steps=2, checkpoint_every=2,
                   model={"preset": "tiny", "variant": "paper", "overrides": {**TINY_MODEL, "vl_expert_layers": 1}})
    loop, saved = train_in_process(job, keep_dir=str(tmp_path / "ckpts"))
    assert export_from_checkpoint(saved[2], str(tmp_path / "model")) is False
    assert not (tmp_path / "model" / OFFICIAL_FILE).exists()
    task = load_exported_task(str(tmp_path / "model"))
    assert task.model.config.variant == "paper"
    assert all(torch.equal(v, loop.task.state_dict()[k]) for k, v in task.state_dict().items())


def test_a_patch_14_model_trains_on_patch_16_codes_of_the_same_grid(tiny_corpus, tmp_path):
    """The giant's pairing at demo scale: the shards' 32-px patch-16 views (2x2 codes) feed a
    patch-14 model at 28 px (2x2 patches): views are resized, codes are the targets as they
    are. A grid mismatch fails before training, naming both grids."""
    from tests.pipelines.pretrain_fixtures import TINY_MODEL

    model = {"preset": "tiny", "overrides": {**TINY_MODEL, "patch_size": 14, "image_size": 28}}
    loop, _ = train_in_process(tiny_job(tiny_corpus, str(tmp_path / "p14"), steps=3, checkpoint_every=3,
                                        model=model))
    assert loop.task.model.config.patch_size == 14 and len(loop.history) == 3
    assert all(r["loss"] is not None and r["loss_image_mim"] is not None for r in loop.history)
    wrong = {"preset": "tiny", "overrides": {**TINY_MODEL, "patch_size": 14, "image_size": 42}}
    with pytest.raises(ValueError, match=r"patch grid is 3x3 .* the visual tokenizer's is 2x2"):
        tiny_job(tiny_corpus, str(tmp_path / "bad"), model=wrong)


def test_init_from_an_official_checkpoint_continues_from_its_weights(tiny_corpus, tmp_path):
    """A random-weight torchscale BEiT3 saved in the official layout (text table of 64010
    rows) seeds the backbone through pretrain.init_from: the first step's encoder outputs
    are torchscale's, the heads are reported as new, and the run trains on."""
    from pipelines.pretrain.loop import PretrainLoop
    from tests.pipelines.pretrain_fixtures import TINY_MODEL
    from tests.torchscale_reference import torchscale_model

    probe = tiny_job(tiny_corpus, str(tmp_path / "probe"))
    config = PretrainLoop(probe, 0, 1, torch.device("cpu"), None, None).task.model.config
    torch.manual_seed(1)
    reference = torchscale_model(dataclasses.replace(config, vocab_size=64010)).eval()
    path = str(tmp_path / "beit3_official.pth")
    torch.save({"model": {"beit3." + k: v for k, v in reference.state_dict().items()}}, path)

    job = tiny_job(tiny_corpus, str(tmp_path / "run"), steps=2, checkpoint_every=2, init_from=path,
                   model={"preset": "tiny", "overrides": dict(TINY_MODEL)})
    loop = PretrainLoop(job, 0, 1, torch.device("cpu"), lambda *_: None, None)
    assert loop.initialized_from["new"] == sorted(k for k in loop.task.state_dict() if k.startswith("heads."))
    assert all(k.startswith("model.") for k in loop.initialized_from["loaded"])
    batch, _, _, _ = loop.loader.source[0]
    pair = batch.pair
    with torch.no_grad():
        ours = loop.task.model.eval().encode(image=pair.pixels, text=pair.ids, text_padding_mask=pair.padding_mask)
        theirs = reference(textual_tokens=pair.ids, visual_tokens=pair.pixels,
                           text_padding_position=pair.padding_mask)["encoder_out"]
    keep = torch.cat([torch.ones(pair.ids.shape[0], ours.shape[1] - pair.ids.shape[1], dtype=torch.bool),
                      ~pair.padding_mask], 1)
    assert (ours - theirs)[keep].abs().max() < 1e-4
    loop.task.train()
    loop.run()
    assert len(loop.history) == 2 and loop.history[-1]["loss"] is not None
