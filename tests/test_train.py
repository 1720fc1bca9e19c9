"""Fine-tuning round: sampler and split, a short real round on campus62, cancellation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.model import train as T
from tests.conftest import ingest_campus62, need_shared, tamper_onnx


def test_sampler_is_identity_balanced_and_weighted():
    labels = np.repeat(np.arange(5), 6)  # 5 identities x 6 crops
    weights = np.ones(30)
    weights[3] = 20.0  # one flagged crop of identity 0
    s = T.WeightedIdentitySampler(labels, weights, p=3, k=4)
    rng = np.random.default_rng(0)
    seen = np.zeros(30)
    for _ in range(300):
        b = s.batch(rng)
        assert b.shape == (12,)
        groups = labels[b].reshape(3, 4)
        assert (groups == groups[:, :1]).all()  # K crops per identity, grouped
        assert len(set(groups[:, 0])) == 3  # P distinct identities
        seen += np.bincount(b, minlength=30)
    # the weighted-up crop: nearly always in when its identity is drawn, and that identity is
    # drawn more often than the others
    assert seen[3] > 1.5 * np.delete(seen[:6], 3).max()
    assert seen[:6].sum() > 1.3 * seen[6:].reshape(4, 6).sum(axis=1).max()
    assert (seen > 0).all()


def test_split_is_by_identity():
    ids = [f"p{i}" for i in range(10)]
    tr, va = T.split_identities(ids, 0.3, 2, np.random.default_rng(0))
    assert len(va) == 3 and len(tr) == 7 and not set(tr) & set(va) and set(tr) | set(va) == set(ids)
    assert T.split_identities(ids, 0.3, 2, np.random.default_rng(0)) == (tr, va)  # seeded
    with pytest.raises(T.TrainingError):
        T.split_identities(ids[:3], 0.3, 2, np.random.default_rng(0))


def _campus_samples(n_ids: int) -> list:
    root = need_shared("reid", "campus62", "train")
    out = []
    for d in sorted(root.iterdir())[:n_ids]:
        for p in sorted(d.glob("*.png")):
            out.append((str(p), d.name, p.stem[:2], 1.0))
    return out


SMALL = dict(crop_size=(64, 32), frozen_blocks=10, steps=30, ids_per_batch=6, samples_per_id=4,
             eval_every=10, patience=0, val_fraction=0.4, min_val_ids=4, lr=1e-3, seed=0)


def test_short_round_improves_validation_map_and_checkpoint_loads(data_root):
    import torch

    from core.model import embed
    from core.config import settings

    samples = _campus_samples(12)
    calls = []
    out = settings().models_dir / "t-round"
    r = T.train_round(samples, T.TrainConfig(**SMALL), init_version="base", out_dir=out,
                      progress=lambda s, n, loss, m: calls.append((s, n, loss, m)))
    # identities split by identity, never by crop
    assert not set(r["train_ids"]) & set(r["val_ids"]) and len(r["val_ids"]) == 5
    # validation mAP (cross-camera leave-one-out on held-out identities) beats the packaged weights
    assert r["init_metrics"]["cross_camera"] == 1.0
    assert r["best_metrics"]["mAP"] > r["init_metrics"]["mAP"] + 0.02, r["history"]
    assert r["best_step"] > 0
    assert [c[0] for c in calls] == list(range(1, 31)) and all(c[1] == 30 for c in calls)
    assert calls[-1][3] is not None and np.isfinite(calls[-1][2])
    # checkpoint: plain, loadable with weights_only=True, and by core.model.embed as a model version
    ck = torch.load(Path(r["checkpoint"]), map_location="cpu", weights_only=True)
    assert set(ck) >= {"model", "config", "optimizer", "step", "metrics"}
    assert ck["step"] == r["best_step"] and ck["metrics"]["val"]["mAP"] == r["best_metrics"]["mAP"]
    assert tuple(ck["config"]["crop_size"]) == (64, 32) and ck["config"]["frozen_blocks"] == 10
    assert T.TrainConfig.from_dict(ck["train_config"]) == T.TrainConfig(**SMALL)
    model, cfg = embed.load_model("t-round")
    assert cfg.crop_size == (64, 32)
    x = T.load_crops([s[0] for s in samples[:4]], cfg.crop_size)
    with torch.inference_mode():
        e = model(torch.from_numpy(x)).numpy()
    assert e.shape == (4, cfg.emb_dim) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)
    assert not list(out.glob("*.tmp"))


def test_cancelled_round_writes_nothing(data_root):
    samples = _campus_samples(8)
    out = data_root / "models" / "t-cancel"
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(T.TrainingCancelled, match="cancelled"):
        T.train_round(samples, T.TrainConfig(**{**SMALL, "steps": 200}), out_dir=out, should_stop=stop)
    assert len(polls) == 4  # stopped promptly
    assert not (out / T.CHECKPOINT).exists()
    assert not out.exists() or not any(out.iterdir())


def test_identity_loss_trains_with_the_round_and_leaves_the_model_plain(data_root):
    """The optional classification loss (pytorch-metric-learning) learns the training identities
    beside the triplet loss; its class centres are not part of the saved model."""
    import torch

    with pytest.raises(ValueError, match="id_loss"):
        T.train_round(_campus_samples(8), T.TrainConfig(**SMALL, id_loss="softmaxx"), out_dir=data_root / "x")
    r = T.train_round(_campus_samples(8), T.TrainConfig(**{**SMALL, "steps": 10}, id_loss="normalized_softmax"),
                      out_dir=data_root / "models" / "t-idloss")
    assert r["steps_run"] == 10 and all(np.isfinite(h["loss"]) for h in r["history"][1:])
    ck = torch.load(Path(r["checkpoint"]), map_location="cpu", weights_only=True)
    assert ck["train_config"]["id_loss"] == "normalized_softmax"
    assert not any("W" == k.split(".")[-1] for k in ck["model"])  # no class centres in the model


RESUMABLE = {**SMALL, "steps": 20, "eval_every": 5, "threads": 1}  # one thread: bit-for-bit repeatable


def test_killed_round_resumes_from_its_last_evaluation_to_the_same_result(data_root):
    """A round stopped after its first evaluation leaves resume.pt (and no checkpoint); resumed,
    it continues from the saved step and ends exactly where an uninterrupted round ends."""
    import torch

    samples = _campus_samples(8)
    cfg = T.TrainConfig(**RESUMABLE)
    whole = T.train_round(samples, cfg, out_dir=data_root / "models" / "t-whole")
    assert whole["resumed_from"] == 0 and not (data_root / "models" / "t-whole" / T.RESUME).exists()

    out = data_root / "models" / "t-resume"
    steps: list[int] = []
    with pytest.raises(T.TrainingCancelled, match="resumable from step 5"):
        T.train_round(samples, cfg, out_dir=out, progress=lambda s, n, loss, m: steps.append(s),
                      should_stop=lambda: len(steps) >= 7)
    assert steps == list(range(1, 8))
    assert (out / T.RESUME).exists() and not (out / T.CHECKPOINT).exists()
    saved = torch.load(out / T.RESUME, map_location="cpu", weights_only=True)
    assert saved["step"] == 5 and [h["step"] for h in saved["history"]] == [0, 5]
    assert set(saved) >= {"model", "optimizer", "rng_numpy", "rng_torch", "best_state", "best_metrics",
                          "history", "bad_evals", "fingerprint"}

    # another config: refused, the saved state kept
    with pytest.raises(T.ResumeError, match="config"):
        T.train_round(samples, T.TrainConfig(**{**RESUMABLE, "lr": 5e-4}), out_dir=out, resume=True)
    with pytest.raises(T.ResumeError, match="nothing to resume"):
        T.train_round(samples, cfg, out_dir=data_root / "models" / "t-never", resume=True)
    assert (out / T.RESUME).exists()

    # the dataset changed meanwhile (labels, scores, a crop gone): the round goes on with the crops
    # it started on and still ends exactly where the uninterrupted round ends
    changed = [(p, i, c, 2.0 * w) for p, i, c, w in samples[:-1]]
    resumed_steps: list[int] = []
    r = T.train_round(changed, cfg, out_dir=out, resume=True,
                      progress=lambda s, n, loss, m: resumed_steps.append(s))
    assert r["resumed_from"] == 5 and resumed_steps == list(range(6, 21))
    assert r["steps_run"] == whole["steps_run"] == 20
    assert (out / T.CHECKPOINT).exists() and not (out / T.RESUME).exists()
    assert r["history"] == whole["history"] and r["best_step"] == whole["best_step"]
    a = torch.load(out / T.CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    b = torch.load(data_root / "models" / "t-whole" / T.CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # resuming a round that finished training returns its result without training again
    again = T.train_round(samples, cfg, out_dir=out, resume=True,
                          progress=lambda s, n, loss, m: pytest.fail("trained again"))
    assert again["steps_run"] == 20 and again["history"] == r["history"]


_KILLED_CHILD = """
import json, sys, time
from core.model import train as T
job = json.loads(open(sys.argv[1]).read())
slow = lambda step, total, loss, metrics: time.sleep(0.5 if step > 5 else 0)  # room for the kill
T.train_round([tuple(s) for s in job["samples"]], T.TrainConfig.from_dict(job["config"]), out_dir=job["out"],
              progress=slow)
"""


def test_round_killed_outright_resumes_from_its_resume_file(data_root):
    """SIGKILL after the first evaluation: resume.pt is whole (written atomically), no temp file
    is left behind, and the round resumes from it to its last step."""
    import json
    import signal
    import subprocess
    import sys
    import time

    samples = _campus_samples(8)
    out = data_root / "models" / "t-killed"
    repo = Path(__file__).resolve().parent.parent
    job = data_root / "t-killed.json"
    job.write_text(json.dumps({"samples": samples, "config": T.TrainConfig(**RESUMABLE).to_dict(), "out": str(out)}))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(job)], cwd=repo,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / T.RESUME).exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no resume.pt within 300 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert not (out / T.CHECKPOINT).exists()
    r = T.train_round(samples, T.TrainConfig(**RESUMABLE), out_dir=out, resume=True)
    assert r["resumed_from"] == 5 and r["steps_run"] == 20 and [h["step"] for h in r["history"]] == [0, 5, 10, 15, 20]
    assert (out / T.CHECKPOINT).exists() and not (out / T.RESUME).exists()
    assert not list(out.glob("*.tmp"))


def test_failed_round_resumes_in_its_own_version_from_the_cli(data_root, dsname, tmp_path, capsys):
    """A round cancelled after its first evaluation leaves version V cancelled with resume.pt;
    resumed, it continues V (no new version) from that step. Cancelled again after training, a
    resume goes straight to export; its ONNX file, tampered meanwhile, fails the round; `python -m
    core train --resume V` then exports afresh and finishes V; a finished round is not resumed."""
    from core.model import embed
    from core.services import export, registry, rounds
    from core.data import jobs
    from core.cli.main import main

    ingest_campus62(dsname, tmp_path / "c", slice(8), val=True)

    class Operator(jobs.Reporter):
        """The job's view of a round, with an operator who cancels at a step or a phase."""

        def __init__(self, step: int | None = None, label: str | None = None):
            super().__init__(job_id="test-operator")
            self.at, self.at_label, self.step, self.stop = step, label, 0, False
            self.steps: list[int] = []

        def progress(self, fraction, label="", force=False, **details):
            if "step" in details:
                self.step = details["step"]
                self.steps.append(self.step)
            self.stop |= (self.at is not None and self.step >= self.at) or \
                (self.at_label is not None and label.startswith(self.at_label))

        def should_stop(self) -> bool:
            return self.stop

    def record() -> dict:
        (rec,) = [r for r in registry.list_versions(dsname) if r["version"] != registry.BASE]
        return rec

    config = {**RESUMABLE, "min_val_ids": 3, "ids_per_batch": 4}
    with pytest.raises(jobs.JobCancelled, match="resumable from step 5"):
        rounds.run_round(dsname, {"config": config}, Operator(step=7))
    version = record()["version"]
    folder = embed.version_dir(version)
    assert record()["status"] == "cancelled" and (folder / T.RESUME).exists()
    assert not embed.checkpoint_path(version).exists()

    # resumed from step 5, cancelled while re-embedding: training is done, its ONNX verified
    op = Operator(label="re-embedding")
    with pytest.raises(jobs.JobCancelled):
        rounds.run_round(dsname, {"resume_version": version}, op)
    assert op.steps == list(range(6, 21))
    assert embed.checkpoint_path(version).exists() and not (folder / T.RESUME).exists()
    assert record()["status"] == "cancelled" and record()["version"] == version

    # the model file changes under the round: the resumed round (no training) fails on it
    f = folder / "model.onnx"
    tamper_onnx(f)
    op = Operator()
    with pytest.raises(export.ExportError, match="disagrees with PyTorch"):
        rounds.run_round(dsname, {"resume_version": version}, op)
    assert op.steps == []  # nothing trained again
    assert record()["status"] == "failed" and "disagrees with PyTorch" in record()["error"]
    assert not f.exists()  # the next try exports it afresh

    assert main(["train", "--dataset", dsname, "--resume", version]) == 0
    assert f"{version}: resumed from step 20" in capsys.readouterr().out
    rec = record()  # the same record, no new version
    assert rec["version"] == version and rec["status"] == "ready" and rec["resumes"] == 3
    assert [x["status"] for x in rec["failures"]] == ["cancelled", "cancelled", "failed"]
    assert rec["train"]["steps_run"] == 20
    assert rec["onnx_check"]["max_abs_diff"] < 1e-4 and rec["onnx_check"]["verified_on"] > 0
    assert embed.checkpoint_path(version).exists() and not (folder / T.RESUME).exists()
    assert main(["train", "--dataset", dsname, "--resume", version]) == 2  # ready: nothing to resume
    assert "only a failed or cancelled round can be resumed" in capsys.readouterr().err


def test_job_config_takes_each_fields_type_and_refuses_unknown_fields():
    """A form hands numbers as floats: the job's config holds the field's own type (30 steps,
    not 30.0), keeps None where the field allows it, and a misspelt field fails at submit."""
    cfg = T.preset_job_config("default", steps=30.0, lr=1, id_loss=None, flip_average=True)
    assert cfg["steps"] == 30 and type(cfg["steps"]) is int
    assert cfg["lr"] == 1.0 and type(cfg["lr"]) is float
    assert cfg["id_loss"] is None and cfg["flip_average"] is True
    assert T.TrainConfig.from_dict(cfg).steps == 30
    with pytest.raises(TypeError, match="stepz"):
        T.preset_job_config("default", stepz=30)
