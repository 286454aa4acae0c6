"""params.yaml -> one frozen, validated :class:`Params`; the only YAML parsing.

Validated as a whole before any stage does work: an unknown key, a missing
key, a wrong type or an out-of-range value fails naming the dotted key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from pipelines.clean import CleanConfig
from pipelines.clean.sources import SourceConfig
from pipelines.common import dvc_stage
from pipelines.common.configs import ParamsError, build, check
from pipelines.common.ray_session import RayConfig
from pipelines.common.storage import is_uri
from pipelines.demo_data import DemoDataConfig
from pipelines.evaluate import EvaluateConfig
from pipelines.pack import PackConfig
from pipelines.pretrain import PretrainConfig
from pipelines.report import ReportConfig
from pipelines.text_tokenizer import TextTokenizerConfig
from pipelines.tokenize import TokenizeConfig
from pipelines.visual_tokenizer import VisualTokenizerConfig

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Params:
    ray: RayConfig
    sources: tuple[SourceConfig, ...]
    demo_data: DemoDataConfig
    clean: CleanConfig
    text_tokenizer: TextTokenizerConfig
    visual_tokenizer: VisualTokenizerConfig
    tokenize: TokenizeConfig
    pack: PackConfig
    pretrain: PretrainConfig
    evaluate: EvaluateConfig
    report: ReportConfig

    def __post_init__(self):
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, f"sources: duplicate source name(s) {dup}")


def load_params(path: str = PARAMS_FILE, stage: str | None = None) -> Params:
    """Parse and validate params.yaml (raises :class:`ParamsError`). With ``stage`` set and
    the process run by `dvc repro` as that stage, also fail unless every path the stage is
    pointed at lies under one of its deps in dvc.yaml (see :func:`stage_inputs`)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    params = build(Params, data, where="params")
    if stage is not None and dvc_stage.running_stage() == stage:
        check_declared_inputs(params, stage)
    return params


def stage_inputs(params: Params, stage: str) -> dict[str, str]:
    """Local paths (params key -> path) that a user points ``stage`` at. dvc.yaml cannot
    list them by templating where they are optional (null) or many (sources), so the stage
    checks them against its deps instead; URIs are the object store's to version."""
    retrieval = params.evaluate.retrieval
    candidates = {
        "clean": {f"sources[{i}].path": s.path for i, s in enumerate(params.sources)},
        "text_tokenizer": {"text_tokenizer.pretrained": params.text_tokenizer.pretrained},
        "visual_tokenizer": {f"visual_tokenizer.{k}": getattr(params.visual_tokenizer, k)
                             for k in ("pretrained", "teacher_checkpoint", "probe_dir")},
        "pretrain": {"pretrain.init_from": params.pretrain.init_from},
        "evaluate": {"evaluate.retrieval.dataset": retrieval.dataset,
                     "evaluate.retrieval.image_root": retrieval.image_root or os.path.dirname(retrieval.dataset),
                     "evaluate.probe.root": params.evaluate.probe.root},
    }.get(stage, {})
    return {k: p for k, p in candidates.items() if p and not is_uri(p)}


def check_declared_inputs(params: Params, stage: str) -> None:
    """Fail naming the key and the dvc.yaml line when an input of ``stage`` is not a dep:
    DVC would not rerun the stage when that input changes."""
    missing = dvc_stage.undeclared(stage_inputs(params, stage), dvc_stage.declared_deps(stage))
    if missing:
        line = dvc_stage.deps_line(stage)
        where = f"{dvc_stage.DVC_FILE} line {line}" if line else dvc_stage.DVC_FILE
        listed = "; ".join(f"{key} = {path!r}" for key, path in missing.items())
        adds = " ".join(f"`- {path}`" for path in missing.values())
        raise ParamsError(f"{listed}: read by stage {stage} but not among its deps, so DVC would not "
                          f"rerun it when that changes; add {adds} under stages.{stage}.deps ({where})")


__all__ = ["Params", "ParamsError", "load_params", "stage_inputs", "check_declared_inputs"]
