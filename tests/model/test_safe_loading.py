"""Checkpoints never execute code: a malicious pickle is refused with a clear error."""
import os
import pickle

import pytest
import torch

from model.checkpoint import load_official_beit3
from model.safe_load import UnsafeCheckpointError, load_torch_checkpoint


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a booby-trapped .pth would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_malicious(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model": {"beit3.text_embed.weight": _Payload(marker)}}, f)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.pth"
    _write_malicious(ckpt, marker)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_torch_checkpoint(ckpt)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        load_official_beit3(str(ckpt), "tiny")
    assert not marker.exists()


def test_plain_state_dict_loads(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_torch_checkpoint(path)["model"]["w"], torch.ones(2))


def test_malicious_tokenizer_checkpoint_is_refused(tmp_path):
    from model.vqkd import VQKD

    marker, ckpt = tmp_path / "pwned", tmp_path / "vqkd.pth"
    _write_malicious(ckpt, marker)
    with pytest.raises(UnsafeCheckpointError, match="vqkd.pth"):
        VQKD.from_official(str(ckpt))
    with open(ckpt, "rb") as f, pytest.raises(UnsafeCheckpointError, match="refused"):
        VQKD.from_official(f)
    assert not marker.exists()
