"""Killing a stage (SIGTERM, SIGKILL) never leaves partial output visible; the rerun completes.

For demo_data, clean, text_tokenizer and visual_tokenizer (tokenize and pack resume
after kills: tests/pipelines/test_tokenize.py, test_pack.py). Each test starts from a
*previous* complete output whose every file differs from the new one, so any mix of old
and new files is caught; the stages never read their own old output, which is why a
stand-in with different bytes serves as well as a real run with other params. Each stage
is killed twice, once with each signal, at two kinds of random point (which signal gets
which kind is drawn too, so every pairing comes up across runs):

1. at an exact point of the output phase: the stage is paused right after its k-th write
   into its output (k drawn at random among the reference output's files; work folders and
   metrics are not counted), then killed;
2. at a random moment of a plain run (uniform over the stage's reference duration).

After each kill out_dir must be the previous output, absent, or the complete new output
(never anything else: no missing or extra file, no temp file). The rerun must then write
exactly the reference output of an uninterrupted run and clear the killed runs' leftovers.
The seed of the kill points is printed and named in every failure message; set
RELIABILITY_KILL_SEED to replay one.
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import time

import pytest

from pipelines.common import storage
from tests.project import files_under, run
from tests.reliability.conftest import project_with_inputs
from tests.reliability.processes import kill, log_tail, start_stage, wait_for

SEED = int(os.environ.get("RELIABILITY_KILL_SEED", random.SystemRandom().randrange(2**31)))
# tiny_repro times these stages with nothing beside them; it starts other work from tokenize on
OUT_DIR = {"demo_data": "data/demo", "clean": "data/clean",
           "text_tokenizer": "data/text_tokenizer", "visual_tokenizer": "data/visual_tokenizer"}
# what each stage reads (visual_tokenizer: the cleaned images and the demo's probe ImageFolder)
INPUTS = {"demo_data": [], "clean": ["data/demo"], "text_tokenizer": ["data/clean"],
          "visual_tokenizer": ["data/clean", "data/demo"]}


def write_files(root: str, files: dict[str, bytes]) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)


def visible_state(out: str, previous: dict, expected: dict, context: str) -> str:
    """'absent', 'previous' or 'new'; anything else is a partial output and fails."""
    if not os.path.lexists(out):
        return "absent"
    got = files_under(out)
    if got == previous:
        return "previous"
    if got == expected:
        return "new"
    missing = sorted(set(expected) - set(got))[:5]
    extra = sorted(set(got) - set(expected))[:5]
    changed = sorted(r for r in set(got) & set(expected) if got[r] != expected[r])[:5]
    raise AssertionError(f"{context}: partial output visible in {out}: {len(got)} files, "
                         f"missing {missing}, extra {extra}, differing {changed}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(OUT_DIR))
def test_killed_stage_shows_old_or_no_output_then_rerun_matches(tiny_template, tiny_repro, tmp_path, stage):
    rng = random.Random(f"{SEED}/{stage}")
    project = project_with_inputs(tiny_template, tiny_repro.root, str(tmp_path / "project"), INPUTS[stage])
    out = os.path.join(project, OUT_DIR[stage])
    expected = files_under(os.path.join(tiny_repro.root, OUT_DIR[stage]))
    previous = {rel: f"previous run's {rel}\n".encode() for rel in expected}
    previous["previous-run-only.txt"] = b"not written by this run\n"
    write_files(out, previous)
    log = str(tmp_path / "stage.log")
    at_write, at_time = rng.sample([signal.SIGTERM, signal.SIGKILL], 2)

    # 1. paused right after its k-th write, then killed
    k = rng.randint(1, len(expected))
    marker = str(tmp_path / "writes")
    context = f"{stage} {at_write.name} after write {k} of {len(expected)} (RELIABILITY_KILL_SEED={SEED})"
    proc = start_stage(project, stage, log, pause_after_write=k, marker=marker, out_dir=out)
    reached = wait_for(lambda: _read(marker + ".paused") == str(k), proc, timeout=300)
    assert reached, f"{context}: never reached that write\n{log_tail(log)}"
    outcome = kill(proc, at_write)
    state = visible_state(out, previous, expected, context)
    print(f"{context}: out_dir {state}, {outcome}")

    # 2. killed at a random moment of a plain run
    delay = rng.uniform(0, tiny_repro.durations[stage])
    context = f"{stage} {at_time.name} at {delay:.1f}s (RELIABILITY_KILL_SEED={SEED})"
    proc = start_stage(project, stage, log)
    start = time.time()
    wait_for(lambda: time.time() - start >= delay, proc, timeout=delay + 1, poll_s=0.05)
    outcome = kill(proc, at_time)
    state = visible_state(out, previous, expected, context)
    print(f"{context}: {'killed' if outcome['was_running'] else 'had finished'}, out_dir {state}, {outcome}")

    # 3. the rerun completes with the reference bytes and clears the killed runs' leftovers
    run(project, "python", "-m", f"stages.{stage}")
    assert files_under(out) == expected, f"{stage}: rerun after kills differs from the reference"
    assert not glob.glob(glob.escape(out) + ".tmp-*"), "staging leftovers of killed runs remain"
    assert os.path.exists(os.path.join(project, "metrics", f"{stage}.json"))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def test_publish_dir_swaps_whole_directories(tmp_path):
    """The swap the stages above rely on: stale staging dirs of killed runs are cleared, the
    previous output is replaced as a whole, nothing is left beside it."""
    out = str(tmp_path / "out")
    write_files(out, {"old-only.txt": b"old", "a.parquet": b"old a"})
    os.makedirs(out + ".tmp-deadbeef")  # a killed run's staging dir
    staging = storage.staging_dir(out)
    assert not os.path.exists(out + ".tmp-deadbeef") and files_under(out)["a.parquet"] == b"old a"
    storage.write_bytes(os.path.join(staging, "a.parquet"), b"new a")
    storage.publish_dir(staging, out)
    assert files_under(out) == {"a.parquet": b"new a"}
    assert os.listdir(tmp_path) == ["out"]

    staging = storage.staging_dir(str(tmp_path / "fresh"))  # no previous output
    storage.write_bytes(os.path.join(staging, "b.json"), b"{}")
    storage.publish_dir(staging, str(tmp_path / "fresh"))
    assert files_under(str(tmp_path / "fresh")) == {"b.json": b"{}"}
