"""params.yaml -> one frozen, validated :class:`Params`; the only YAML parsing.

Validated as a whole before any stage does work: an unknown key, a missing
key, a wrong type or an out-of-range value fails naming the dotted key.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from pipelines.clean import CleanConfig
from pipelines.clean.sources import SourceConfig
from pipelines.common.configs import ParamsError, build, check
from pipelines.common.ray_session import RayConfig
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


def load_params(path: str = PARAMS_FILE) -> Params:
    """Parse and validate params.yaml (raises :class:`ParamsError`)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    return build(Params, data, where="params")


__all__ = ["Params", "ParamsError", "load_params"]
