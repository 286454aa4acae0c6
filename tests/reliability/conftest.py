"""Shared by the reliability tests: the session's uninterrupted `dvc repro` of the TINY demo
(`tiny_repro`, tests/conftest.py), also the end-to-end tests' first run.

Its outputs are the reference every killed or disturbed run must reproduce byte for
byte, its dvc.lock is the first of the two runs the determinism test compares, and
its per-stage durations size the random kill times. Fresh projects are cloned from
`tiny_template`, so all of them run the same code even while the working tree is
being edited.
"""
from __future__ import annotations

import os
import shutil

from tests.project import clone


def project_with_inputs(template: str, reference: str, path: str, inputs: list[str]) -> str:
    """A fresh project (no outputs) holding copies of ``inputs`` (paths relative to the
    project) taken from the reference run, so one stage can run on its own."""
    project = clone(template, path)
    for rel in inputs:
        shutil.copytree(os.path.join(reference, rel), os.path.join(project, rel))
    return project
