"""checkpoints.py: atomic writes, models and resumable points that round-trip, LoRA adapter files, and every file
that cannot be read named in its error."""
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import video_model as vm
from video_model import VideoDiT


@pytest.fixture
def tiny():
    cfg = replace(vm.PRESETS["tiny"], num_layers=2, text_dim=8, in_channels=4)
    torch.manual_seed(0)
    return VideoDiT(cfg)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    checkpoints.save(path, {"w": torch.ones(3)}, {"step": 1})

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk unplugged")

    monkeypatch.setattr(checkpoints, "save_file", crash)
    with pytest.raises(OSError):
        checkpoints.save(path, {"w": torch.zeros(3)}, {"step": 2})
    tensors, meta = checkpoints.read(path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))


def test_files_get_the_permissions_of_any_new_file(tmp_path):
    umask = os.umask(0o022)
    try:
        checkpoints.save(tmp_path / "x.safetensors", {"w": torch.ones(3)}, {})
    finally:
        os.umask(umask)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644


def test_unreadable_files_are_named(tmp_path):
    checkpoints.save(tmp_path / "ok.safetensors", {"w": torch.ones(3)}, {"step": 1})
    blob = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    save_file({"w": torch.ones(3)}, tmp_path / "foreign.safetensors")
    save_file({"w": torch.ones(3)}, tmp_path / "badjson.safetensors", metadata={checkpoints.META_KEY: "{"})
    with pytest.raises(ValueError, match="cut.safetensors: not a valid safetensors file"):
        checkpoints.read(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="foreign.safetensors: not a train.py checkpoint"):
        checkpoints.read(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="badjson.safetensors: its 'mimic_video' metadata is not valid JSON"):
        checkpoints.read(tmp_path / "badjson.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors: no such checkpoint"):
        checkpoints.read(tmp_path / "nothing.safetensors")


def test_model_round_trip_and_a_config_that_does_not_fit(tiny, tmp_path):
    checkpoints.save_model(tmp_path / "v.safetensors", tiny, {"run": {"k": 1}})
    model, meta = checkpoints.load_model(tmp_path / "v.safetensors", VideoDiT, vm.VideoDiTConfig)
    assert model.cfg == tiny.cfg and meta["run"] == {"k": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values()))
    state = {k: v for k, v in tiny.state_dict().items() if "blocks.1." not in k}
    checkpoints.save(tmp_path / "w.safetensors", state, {"model_config": meta["model_config"]})
    with pytest.raises(ValueError, match="w.safetensors: weights do not fit the config stored with them"):
        checkpoints.load_model(tmp_path / "w.safetensors", VideoDiT, vm.VideoDiTConfig)


def test_state_round_trip_and_another_configuration_is_refused(tiny, tmp_path):
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    tiny(torch.randn(1, 4, 2, 4, 4), torch.rand(1, 2), torch.randn(1, 3, 8)).square().mean().backward()
    opt.step()
    config = {"seed": 0, "video": {"lr": 1e-3, "steps": 10}}
    checkpoints.save_state(tmp_path / "s.safetensors", checkpoints.state_tensors(tiny, opt), 7, config)
    fresh = VideoDiT(tiny.cfg)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert checkpoints.load_state(tmp_path / "s.safetensors", fresh, fresh_opt, config) == 7
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), tiny.parameters()))
    state = fresh_opt.state[next(fresh.parameters())]
    assert torch.equal(state["exp_avg"], opt.state[next(tiny.parameters())]["exp_avg"])
    with pytest.raises(ValueError, match=r"another configuration \(differs in: video\.lr\)"):
        checkpoints.load_state(tmp_path / "s.safetensors", fresh, fresh_opt, {"seed": 0, "video": {"lr": 2e-3,
                                                                                                 "steps": 10}})


def test_lora_file_errors(tiny, tmp_path):
    model = tiny
    model.add_lora(rank=4, alpha=8)
    checkpoints.save_lora(model, tmp_path / "a.safetensors")
    other = VideoDiT(model.cfg)
    other.add_lora(rank=2, alpha=8)
    with pytest.raises(ValueError, match="rank 4"):
        checkpoints.load_lora(other, tmp_path / "a.safetensors")
    adapters = load_file(tmp_path / "a.safetensors")
    adapters.pop("blocks.1.mlp.layer2.lora_B")
    save_file(adapters, tmp_path / "b.safetensors", metadata={"lora_rank": "4", "lora_alpha": "8"})
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.1\.mlp\.layer2\.lora_B"):
        checkpoints.load_lora(VideoDiT(model.cfg), tmp_path / "b.safetensors")
    save_file(adapters, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="not a LoRA adapter file"):
        checkpoints.load_lora(VideoDiT(model.cfg), tmp_path / "c.safetensors")
