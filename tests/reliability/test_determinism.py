"""Two clean runs of the demo's data stages (the session's `dvc repro` and a `dvc repro pack`
in a second fresh project copy, `second_data_run`, which runs alongside other work) record
identical hashes in dvc.lock for every data output."""
from __future__ import annotations

import pytest

from tests.project import DATA_STAGES, read_lock

pytestmark = pytest.mark.slow


def data_outs(lock: dict) -> dict[str, dict]:
    """stage -> {out path: (md5, size, nfiles)} for the stage's data outputs (metrics, which
    hold timings, are not data)."""
    return {stage: {o["path"]: (o["md5"], o.get("size"), o.get("nfiles"))
                    for o in lock["stages"][stage]["outs"] if o["path"].startswith("data/")}
            for stage in DATA_STAGES}


def test_two_clean_runs_give_identical_dvc_lock_hashes(tiny_repro, second_data_run):
    assert second_data_run.wait() == DATA_STAGES
    first, second = data_outs(tiny_repro.lock), data_outs(read_lock(second_data_run.root))
    for stage in DATA_STAGES:
        assert first[stage], f"{stage}: no data output in dvc.lock"
        assert second[stage] == first[stage], f"{stage}: outputs differ between two clean runs"
