"""core.model.device: CUDA when torch sees a GPU, else the CPU (never an error for a missing GPU);
VIGIL_DEVICE overrides; the train CLI's device, preset and mode flags."""
from __future__ import annotations

import pytest

from core.model import device, train


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.delenv("VIGIL_DEVICE", raising=False)
    monkeypatch.setattr(device, "cuda_available", lambda: False)


def test_cuda_asked_for_without_a_gpu_falls_back_to_the_cpu(no_gpu, caplog):
    with caplog.at_level("WARNING", logger="core.model.device"):
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
class Queued:
    """The train jobs really queued on an empty dataset (oldest first): (dataset, kind, args)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _all(self) -> list:
        from core.data import jobs

        return [(self.name, j["kind"], j["args"]) for j in reversed(jobs.list_jobs(self.name, kind="train"))]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self):
        return iter(self._all())

    def __getitem__(self, i):
        return self._all()[i]


@pytest.fixture
def queued(dsname):
    from core.data import jobs, store

    store.get_dataset(dsname, create=True)
    q = Queued(dsname)
    yield q
    for j in jobs.list_jobs(dsname, kind="train"):  # a worker of another test must not run them
        jobs.cancel(j["id"])


def test_cli_unsupervised_and_supervised_are_mutually_exclusive(capsys, queued):
    from core.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", queued.name, "--unsupervised", "--supervised"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not queued


def test_cli_mode_device_and_preset_go_into_the_job_config(no_gpu, capsys, queued):
    from core.cli.main import main

    assert main(["train", "--dataset", queued.name, "--background", "--unsupervised", "--steps", "60"]) == 0
    assert main(["train", "--dataset", queued.name, "--background", "--supervised", "--device", "cpu"]) == 0
    assert main(["train", "--dataset", queued.name, "--background", "--preset", "default"]) == 0
    cfgs = [args["config"] for _ds, kind, args in queued]
    assert cfgs == [{"unsupervised": True, "steps": 60}, {"unsupervised": False, "device": "cpu"}, {}]
    for cfg in cfgs:
        train.TrainConfig.from_dict(cfg)  # what the worker does with it


def test_cli_quality_preset_is_refused_without_a_gpu(no_gpu, capsys, queued):
    from core.cli.main import main

    assert main(["train", "--dataset", queued.name, "--background", "--preset", "quality"]) == 2
    err = capsys.readouterr().err
    assert "quality preset needs a GPU" in err and "run on cpu" in err
    assert not queued


def test_cli_quality_preset_queues_its_fields_on_a_gpu(monkeypatch, capsys, queued):
    from core.cli.main import main

    monkeypatch.delenv("VIGIL_DEVICE", raising=False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert main(["train", "--dataset", queued.name, "--background", "--preset", "quality", "--steps", "500"]) == 0
    (cfg,) = [args["config"] for _ds, _k, args in queued]
    assert train.TrainConfig.from_dict(cfg) == train.preset_config("quality", steps=500)
    # asking for the CPU on a GPU machine: the quality preset does not fit there
    assert main(["train", "--dataset", queued.name, "--preset", "quality", "--device", "cpu"]) == 2
    assert len(queued) == 1


@pytest.mark.parametrize("flag", [["--unsupervised"], ["--supervised"], ["--device", "cuda"], ["--preset", "default"]])
def test_cli_resumed_round_refuses_config_flags(flag, capsys, queued):
    from core.cli.main import main

    assert main(["train", "--dataset", queued.name, "--background", "--resume", "v1", *flag]) == 2
    assert "keeps the config it started with" in capsys.readouterr().err
    assert not queued
    # without them the resume goes on to its own checks (test_train covers a real resume)
    assert main(["train", "--dataset", queued.name, "--background", "--resume", "v1"]) == 2
    assert "v1" in capsys.readouterr().err
