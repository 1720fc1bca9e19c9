"""core.device: CUDA when torch sees a GPU, else the CPU (never an error for a missing GPU);
VIGIL_DEVICE overrides; the train CLI's device, preset and mode flags."""
from __future__ import annotations

import pytest

from core import device, train


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.delenv("VIGIL_DEVICE", raising=False)
    monkeypatch.setattr(device, "cuda_available", lambda: False)


def test_cuda_asked_for_without_a_gpu_falls_back_to_the_cpu(no_gpu, caplog):
    with caplog.at_level("WARNING", logger="core.device"):
        assert device.select("cuda") == "cpu"
    assert "no GPU" in caplog.text
    assert device.select() == device.select("auto") == "cpu"
    assert device.describe("cuda").startswith("cpu (")  # where it would really run
    assert train.presets_for(device.select()) == ["default"]


def test_cuda_is_chosen_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.delenv("VIGIL_DEVICE", raising=False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert device.select() == device.select("cuda") == "cuda"
    assert device.select("cpu") == "cpu"
    assert train.presets_for(device.select()) == ["default", "quality"]


def test_vigil_device_is_honoured_and_a_bad_value_refused(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setenv("VIGIL_DEVICE", "cpu")
    assert device.select() == "cpu"
    monkeypatch.setenv("VIGIL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        device.select()
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        device.select("gpu")


# ---------------------------------------------------------------- python -m core train
@pytest.fixture
def queued(monkeypatch):
    """``jobs.submit`` and ``registry.resumable`` recorded instead of touching the database."""
    from core import jobs, registry

    calls = []
    monkeypatch.setattr(jobs, "submit", lambda ds, kind, args: calls.append((ds, kind, args)) or "job1")
    monkeypatch.setattr(registry, "resumable", lambda ds, v: {"version": v})
    return calls


def test_cli_unsupervised_and_supervised_are_mutually_exclusive(capsys, queued):
    from core.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "d", "--unsupervised", "--supervised"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not queued


def test_cli_mode_device_and_preset_go_into_the_job_config(no_gpu, capsys, queued):
    from core.__main__ import main

    assert main(["train", "--dataset", "d", "--background", "--unsupervised", "--steps", "60"]) == 0
    assert main(["train", "--dataset", "d", "--background", "--supervised", "--device", "cpu"]) == 0
    assert main(["train", "--dataset", "d", "--background", "--preset", "default"]) == 0
    cfgs = [args["config"] for _ds, kind, args in queued]
    assert cfgs == [{"unsupervised": True, "steps": 60}, {"unsupervised": False, "device": "cpu"}, {}]
    for cfg in cfgs:
        train.TrainConfig.from_dict(cfg)  # what the worker does with it


def test_cli_quality_preset_is_refused_without_a_gpu(no_gpu, capsys, queued):
    from core.__main__ import main

    assert main(["train", "--dataset", "d", "--background", "--preset", "quality"]) == 2
    err = capsys.readouterr().err
    assert "quality preset needs a GPU" in err and "run on cpu" in err
    assert not queued


def test_cli_quality_preset_queues_its_fields_on_a_gpu(monkeypatch, capsys, queued):
    from core.__main__ import main

    monkeypatch.delenv("VIGIL_DEVICE", raising=False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert main(["train", "--dataset", "d", "--background", "--preset", "quality", "--steps", "500"]) == 0
    (cfg,) = [args["config"] for _ds, _k, args in queued]
    assert train.TrainConfig.from_dict(cfg) == train.preset_config("quality", steps=500)
    # asking for the CPU on a GPU machine: the quality preset does not fit there
    assert main(["train", "--dataset", "d", "--preset", "quality", "--device", "cpu"]) == 2
    assert len(queued) == 1


@pytest.mark.parametrize("flag", [["--unsupervised"], ["--supervised"], ["--device", "cuda"], ["--preset", "default"]])
def test_cli_resumed_round_refuses_config_flags(flag, capsys, queued):
    from core.__main__ import main

    assert main(["train", "--dataset", "d", "--background", "--resume", "v1", *flag]) == 2
    assert "keeps the config it started with" in capsys.readouterr().err
    assert not queued
    assert main(["train", "--dataset", "d", "--background", "--resume", "v1"]) == 0
    assert queued[0][2] == {"resume_version": "v1"}
