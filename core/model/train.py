"""One fine-tuning round of the embedding model: a plain training loop (nanoGPT style).

Size: one plain loop, nanoGPT style, with its config, resume file and per-evaluation checkpoint:
reading a round top to bottom in one file is the point.

    samples (path, identity, camera, weight)
      -> identities split into train / validation (by identity, never by crop)
      -> crops decoded once into memory at the round's input size
      -> loop: identity-balanced weighted batch (P identities x K crops), augmented on ``threads``
               threads (core.math.augment.augment_batch),
               triplet loss on hard triplets (pytorch-metric-learning), AdamW, warmup + cosine lr
      -> every ``eval_every`` steps: validation mAP (leave-one-out over the validation identities,
         cross-camera when cameras are known, core.math.evaluate); keep the best weights; stop early
         after ``patience`` evaluations without improvement
      -> ``out_dir/checkpoint.pt`` (atomic): model, config (core.model.network.ModelConfig as a dict),
         optimizer, step, metrics, train_config; readable by :func:`core.model.embed.load_model`.

Resuming: at every evaluation the whole loop state goes to ``out_dir/resume.pt`` (atomic: model,
optimizer, step, numpy and torch random states, best weights and metrics so far, history,
evaluations without improvement, and a hash of the config and of the samples). A round that was
killed or cancelled continues from there with ``train_round(..., resume=True)``: on the samples it
started with (kept in ``resume.pt``: labels written meanwhile are for the next round) and the same
config (another config is refused with :class:`ResumeError`); at the same seed it ends where the
uninterrupted round would have. ``resume.pt`` is removed when the round finishes;
``checkpoint.pt`` keeps the hashes and the round's result, so resuming a round whose training had
already finished returns that result without training again.

The model is core.model.embed's :class:`EmbeddingModel` (BGR uint8 in, unit vectors out), started from
``init_version``; its first ``frozen_blocks`` backbone blocks are frozen (parameters fixed, batch
norm in eval mode), the later blocks and the projection head train.

Pseudo-identities (``unsupervised``; on by default when some training identities are open, i.e.
lone tracklets nobody has named or joined: they are what the clustering may join, to each other
or to a verified identity; a round on verified identities alone is unchanged): at step 0 and every ``recluster_every`` steps the
current model embeds the training crops and :func:`core.math.pseudo.pseudo_identities` joins
tracklets across cameras (never two the identity graph keeps apart); the batches and the
triplet loss (with ``memory_weight`` > 0 also a Cluster Contrast memory,
:class:`core.model.batches.ClusterMemory`) then work on those labels. Held-out tracklets only find their own crops, which says nothing about matching across
cameras, so such a round keeps its last weights (its validation only shows progress) and holds
out just ``min_val_ids`` tracklets. The result's ``pseudo`` holds each re-clustering and the
last one's proposed merges for the pair queue.

Devices: the round trains on CUDA where torch sees a GPU (``device``, core.model.device), else on the
CPU, unchanged; the checkpoint is always saved with CPU tensors.

Per-sample weights act in the sampler: an identity is drawn with probability proportional to the
sum of its crops' weights, and a crop within its identity proportionally to its weight, so
flagged or uncertain samples (weight > 1) are seen more often.

Cancellation: ``should_stop()`` is polled every step; when it returns True the round raises
:class:`TrainingCancelled`; ``checkpoint.pt`` is not written (only ``resume.pt`` from the last
evaluation, if there was one).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.math import augment as aug
from core.model import device as devices
from core.math import evaluate as ev
from core.math import personness
from core.model.batches import KnownNegativesMiner, PseudoLabels, WeightedIdentitySampler, known_negatives

log = logging.getLogger(__name__)

Sample = tuple[str, Any, Any, float]  # (path, identity, camera or None, weight)
ProgressFn = Callable[[int, int, float, dict | None], None]
CHECKPOINT = "checkpoint.pt"
RESUME = "resume.pt"  # the loop's state at its last evaluation, while the round is unfinished
RESUME_FORMAT = 1
MINERS = ("batch_hard", "semihard", "hard", "all")
# identity losses offered: name -> pytorch-metric-learning class
ID_LOSSES = {"cosface": "CosFaceLoss", "arcface": "ArcFaceLoss", "normalized_softmax": "NormalizedSoftmaxLoss"}


class TrainingCancelled(RuntimeError):
    """The round was stopped by ``should_stop()``; no checkpoint was written (``resume.pt`` of
    the last evaluation stays, to resume from)."""


class TrainingError(ValueError):
    """The samples cannot make a round (too few identities or crops), with what to add."""


class ResumeError(TrainingError):
    """A round cannot be resumed: nothing saved, or other samples or another config."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one round. Defaults come from probes on campus62's train split, judged only by
    the round's own held-out identities (cross-camera val mAP, seed 0 / seed 1), never by the val
    split: P=8 x K=8 beat P=16 x K=4 (69.4 vs 64.6 / 68.5 vs 66.5; more positives per identity,
    so both cameras are in every batch; P=4xK=16 and 6x10 gave 64.7 / 64.8); 10 frozen blocks
    allow 1000 steps in about 4 min on 2 cores (7 frozen, 700 steps: 62.3; 13 frozen: 58.0);
    lr 3e-4 (5e-4: 60.0, 1e-3 collapsed); the full augmentation set beat a lighter one (61.2); an
    identity loss learns twice as fast early but plateaued lower (57.8-58.3).
    Flip averaging (the model embeds each crop and its mirror) added 0.2 to 3.8 points of val mAP
    on the same checkpoint in every probe (about 2 on average), so it is on. No gain within the
    1000-step budget, so off: soft-margin triplet (70.6 / 68.2 against 69.4 / 68.5), a batch-norm
    neck (69.0: faster early, same end), last stride 1 (600 steps to fit the time: 56.2; with the
    neck and lr 6e-4: 67.1), margin 0.3 (69.8), brightness-invariant input (63.2), weight decay
    0.05 (69.2), 512-D (67.5), 1200 steps (67.3). GeM pooling (63.6), two part stripes (66.7),
    weight EMA (69.8), box jitter or more occlusion (56), white balance / grey (46) and fixed
    batch-norm statistics (13.9) were no better or worse and are not offered.

    Issue-15 probes (benchmarks/probe_campus62.py: campus62 train only, 50 identities to train,
    12 held out and scored cross-camera, mAP at split seeds 0 / 1; base 6.1 / 7.5): the default
    supervised round 63.9 / 66.4. Not kept: validation on 10 % of the identities instead of 20 %
    (more to train on: 65.3 / 66.9, a gain inside the seeds' spread, and it selects on half as
    many identities), a Cluster Contrast memory beside the triplet loss (one centroid per
    identity, 60.3), identity batches shared out evenly over cameras (59.9).
    Unsupervised (identities hidden, 100 per-camera tracklets): 70.8 without the memory, 65.5
    with it at weight 0.1 and 52.6 at 1.0, so ``memory_weight`` 0; camera-balanced batches 69.3.
    Random erasing is the occlusion augmentation (Zhong et al., p 0.3; the strong baseline's
    stronger setting was probed before: 56). Instance-batch normalisation and a label-smoothed
    identity loss on a BN neck were not probed here (the neck and the identity losses above lost
    before; IBN needs ImageNet-trained IBN weights, which are not on this machine).
    See benchmarks/retrain_quality.py for what the defaults reach."""

    crop_size: tuple[int, int] = (128, 64)  # (H, W) input during training and after
    frozen_blocks: int = 10  # MobileNetV2 feature blocks (of 19) that stay fixed
    emb_dim: int | None = None  # None: keep the init model's (a different value re-inits the head)
    brightness_invariant: bool | None = None  # None: keep the init model's setting
    last_stride: int = 2  # 1: finer final feature map (about 1.8x the compute per step)
    flip_average: bool = True  # the model averages each crop with its mirror at inference
    neck: bool = False  # batch norm between pooling and the head (core.model.network.ModelConfig.neck)
    steps: int = 1000
    ids_per_batch: int = 8  # P
    samples_per_id: int = 8  # K
    lr: float = 3e-4  # head; backbone blocks get lr * backbone_lr_mult
    backbone_lr_mult: float = 1.0
    weight_decay: float = 5e-4
    warmup_steps: int = 20
    margin: float = 0.2
    soft_margin: bool = False  # triplet loss log(1 + exp(d_ap - d_an)) instead of a hinge at margin
    miner: str = "batch_hard"  # one of MINERS
    id_loss: str | None = None  # plus an identity-classification loss: one of ID_LOSSES, or None
    id_loss_weight: float = 1.0
    id_loss_lr_mult: float = 10.0  # its class centres start random: they learn faster than the net
    val_fraction: float = 0.2  # share of identities held out for validation
    min_val_ids: int = 3
    eval_every: int = 100
    patience: int = 4  # evaluations without improvement before stopping (0: never stop early)
    min_delta: float = 0.002  # validation mAP gain that counts as an improvement
    seed: int = 0
    threads: int = 2  # torch intra-op threads (and decode workers)
    device: str = "auto"  # core.model.device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda"
    # -- pseudo-identities (a round that needs no labels; see core.math.pseudo)
    # None: on when some training identity is open (a lone tracklet nobody named or joined)
    unsupervised: bool | None = None  # cluster open identities into cross-camera pseudo-identities
    recluster_every: int = 200  # steps between re-clusterings on the current embeddings
    cluster_method: str = "mutual"  # core.math.pseudo.METHODS: cross-camera mutual neighbours, or SpCL's DBSCAN
    cluster_eps: float = 0.6  # largest distance a link may join (cosine for mutual, Jaccard for dbscan)
    memory_weight: float = 0.0  # cluster-memory contrastive loss beside the triplet loss (0: off; see above)
    memory_momentum: float = 0.2  # how far a batch moves its clusters' centroids
    memory_temperature: float = 0.05
    augment: aug.AugmentConfig = field(default_factory=aug.AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples) for checkpoints and JSON."""
        def plain(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        a = d.pop("augment", None)
        if a is not None:
            a = aug.AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})
            d["augment"] = a
        if "crop_size" in d:
            d["crop_size"] = tuple(d["crop_size"])
        return cls(**d)


# Named starting points for a round's config (the Train page's preset box, ``--preset``). The
# quality preset (the re-ID strong baseline's 256x128 input, fewer frozen blocks, more steps) is
# offered only where a GPU makes it fit the time: on 2 CPU cores one of its steps costs about 8x a
# default step. Its settings are the strong baseline's scale. Probed on an H200 (benchmarks/gpu_round.py,
# campus62 train with 12 identities held out, split seed 0): held-out mAP 63.0 / rank-1 73.4 (best
# step 1250, early stop at 2250, 340 s) against the default preset's 63.6 / 74.5 on the same GPU
# (1000 steps, 79 s). campus62's crops are 48x128, so a 256x128 input only upsamples them: the
# preset is for sites whose person crops are larger, and on such crops it is still unprobed.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quality": {"crop_size": (256, 128), "frozen_blocks": 7, "steps": 3000, "eval_every": 250},
}


def presets_for(device: str) -> list[str]:
    """The presets that fit the time on ``device`` ("cpu" or "cuda", see core.model.device.select)."""
    return list(PRESETS) if device == "cuda" else ["default"]


def preset_config(preset: str, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` of ``preset`` with ``overrides`` (TrainConfig fields) on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {tuple(PRESETS)}")
    return replace(TrainConfig(), **{**PRESETS[preset], **overrides})


def preset_job_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """A round job's config (plain values, as ``TrainConfig.to_dict``): only the fields
    ``preset`` sets and ``overrides``, checked by :func:`preset_config`; the rest stays default.
    An override takes the type of its field's default (a form's 30.0 steps is 30; None stays
    None), so callers need not know the fields' types; an unknown field raises TypeError."""
    defaults = TrainConfig()
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"not TrainConfig fields: {sorted(unknown)}")
    overrides = {k: v if v is None or getattr(defaults, k) is None else type(getattr(defaults, k))(v)
                 for k, v in overrides.items()}
    cfg = preset_config(preset, **overrides).to_dict()
    return {k: cfg[k] for k in {**PRESETS[preset], **overrides}}


# --- data ---------------------------------------------------------------------------------------

def split_identities(
    identities: Sequence[Any], val_fraction: float, min_val_ids: int, rng: np.random.Generator
) -> tuple[list[Any], list[Any]]:
    """Shuffle the distinct identities and hold out ``max(min_val_ids, round(val_fraction * n))``
    of them for validation (``val_fraction`` 0: none). Returns (train identities, validation
    identities), disjoint."""
    ids = sorted(set(identities), key=str)
    n_val = max(min_val_ids, int(round(val_fraction * len(ids)))) if val_fraction > 0 else 0
    if len(ids) - n_val < 2:
        raise TrainingError(f"{len(ids)} identities with 2+ crops: need at least {n_val + 2} "
                            f"(2 to train, {n_val} to validate); label more identities")
    perm = [ids[i] for i in rng.permutation(len(ids))]
    return sorted(perm[n_val:], key=str), sorted(perm[:n_val], key=str)


def load_crops(paths: Sequence[str], size: tuple[int, int], threads: int = 2) -> np.ndarray:
    """Decode and resize every crop once: ``[N, H, W, 3]`` BGR uint8 (1000 crops of 128x64 take
    25 MB). Raises ValueError naming the first unreadable file."""
    from core.model.embed import load_image

    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        imgs = list(ex.map(lambda p: load_image(p, size), paths))
    if not imgs:
        return np.zeros((0, size[0], size[1], 3), np.uint8)
    return np.stack(imgs)


# --- model helpers -------------------------------------------------------------------------------

def _embed_array(model, x: np.ndarray, batch: int = 128, features: bool = False) -> np.ndarray:
    """Eval-mode embeddings of ``x`` [N, H, W, 3] uint8 -> [N, D] float32 (on the model's device);
    ``features``: the pooled backbone features instead (what the embedding and person-ness heads
    read)."""
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            e, f, _p = model.outputs(model.prepare(torch.from_numpy(x[i: i + batch]).to(device)))
            out.append((f if features else e).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.emb_dim), np.float32)


def validation_metrics(emb: np.ndarray, ids: np.ndarray, cams: np.ndarray | None) -> dict[str, float]:
    """Leave-one-out retrieval over the validation crops: cross-camera when cameras are known and
    leave queries to score, else any other crop of the same identity counts."""
    m = None
    if cams is not None and len(set(cams.tolist())) > 1:
        m = ev.leave_one_out_metrics(emb, ids, cams)
        m["cross_camera"] = 1.0
    if m is None or m["n_queries"] == 0:
        m = ev.leave_one_out_metrics(emb, ids)
        m["cross_camera"] = 0.0
    return m


def _set_train_mode(model, frozen: list) -> None:
    """Train mode for the trainable parts, eval mode (fixed batch-norm statistics) for frozen blocks."""
    model.train()
    for b in frozen:
        b.eval()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _loss_and_miner(config: TrainConfig):
    from pytorch_metric_learning import losses, miners

    if config.miner not in MINERS:
        raise ValueError(f"unknown miner {config.miner!r}; use one of {MINERS}")
    loss = losses.TripletMarginLoss(margin=config.margin, smooth_loss=config.soft_margin)
    if config.miner == "batch_hard":
        miner = miners.BatchHardMiner()
    else:
        miner = miners.TripletMarginMiner(margin=config.margin, type_of_triplets=config.miner)
    return loss, miner


def _id_loss(config: TrainConfig, n_classes: int, emb_dim: int):
    """pytorch-metric-learning's classification loss over the training identities (its class
    centres are trained with the round and dropped after: the model itself is unchanged)."""
    from pytorch_metric_learning import losses

    if config.id_loss is None:
        return None
    if config.id_loss not in ID_LOSSES:
        raise ValueError(f"unknown id_loss {config.id_loss!r}; use one of {tuple(ID_LOSSES)} or None")
    return getattr(losses, ID_LOSSES[config.id_loss])(num_classes=n_classes, embedding_size=emb_dim)


# --- resuming -------------------------------------------------------------------------------------

def round_fingerprint(samples: Sequence[Sample], config: TrainConfig, init_version: str) -> dict[str, str]:
    """sha1 of the config with the init version (``threads`` and ``device`` left out: they change
    the speed, not what is learned) and of the samples in order: what a resumed round must share with the
    round it continues."""
    cfg = config.to_dict()
    cfg.pop("threads", None)
    cfg.pop("device", None)
    c = json.dumps({"config": cfg, "init_version": init_version}, sort_keys=True, default=str)
    return {"config": hashlib.sha1(c.encode()).hexdigest(),
            "samples": hashlib.sha1(json.dumps(_sample_rows(samples)).encode()).hexdigest()}


def _sample_rows(samples: Sequence[Sample]) -> list[list]:
    """Samples as plain rows [path, identity, camera or None, weight] (hashable, storable)."""
    return [[str(s[0]), str(s[1]), None if s[2] is None else str(s[2]), 1.0 if s[3] is None else float(s[3])]
            for s in samples]


def _check_fingerprint(saved: dict | None, fp: dict[str, str], what: Path, samples: bool = True) -> None:
    saved = saved or {}
    if saved.get("config") != fp["config"]:
        raise ResumeError(f"{what} was saved with another training config or init version: a round "
                          "resumes only with the config it started with; start a new round instead")
    if samples and saved.get("samples") != fp["samples"]:
        raise ResumeError(f"{what} was saved with other training samples (labels, weights or crops "
                          "changed since): start a new round to train on the current labels")


def resume_state(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved loop state of an unfinished round in ``out_dir`` (``resume.pt``), or None."""
    import torch

    p = Path(out_dir) / RESUME
    if not p.exists():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file is reported as such
        raise ResumeError(f"{p} cannot be read ({type(exc).__name__}: {exc}); start a new round") from exc


def _finished_result(out_dir: Path, fp: dict[str, str]) -> dict[str, Any] | None:
    """The stored result of a round that already finished training in ``out_dir``, or None."""
    import torch

    p = out_dir / CHECKPOINT
    if not p.exists():
        return None
    ck = torch.load(p, map_location="cpu", weights_only=True)
    if not ck.get("result"):
        return None
    # training is over: what the samples have become since (new scores, labels) no longer matters
    _check_fingerprint(ck.get("fingerprint"), fp, p, samples=False)
    if (ck.get("fingerprint") or {}).get("samples") != fp["samples"]:
        log.info("%s: the samples changed since this round trained; its checkpoint stands", p)
    return {**ck["result"], "checkpoint": str(p), "resumed_from": int(ck.get("result", {}).get("steps_run", 0))}


# --- the round ----------------------------------------------------------------------------------

def train_round(
    samples: Sequence[Sample],
    config: TrainConfig = TrainConfig(),
    init_version: str = "base",
    out_dir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    cannot: Sequence[tuple[str, str]] = (),
    open_identities: Sequence[str] = (),
    classes: Sequence[tuple[str, bool] | tuple[str, bool, str]] = (),
) -> dict[str, Any]:
    """Fine-tune ``init_version`` on ``samples`` and write ``out_dir/checkpoint.pt``.

    ``classes``: (path, is person[, group]) of crops an operator classed (person, or a false
    positive: shadow, vehicle, ...); ``group`` (the crop's tracklet; default the crop itself) is
    kept whole by the head's cross-validation. With :data:`core.math.personness.MIN_PER_CLASS` of each, the finished model
    gets a person-ness head fitted on them (:func:`core.math.personness.fit`; ``result["person"]``).

    ``cannot``: pairs of identities known to be two people (the identity graph's cannot-links),
    put in the same batches as guaranteed negatives (:class:`WeightedIdentitySampler`).
    ``open_identities``: identities that may be another one seen by another camera (lone
    tracklets): with the batch-hard miner, they are negatives only within their cameras and
    across cannot-links (:class:`KnownNegativesMiner`).

    ``samples``: (path, identity, camera or None, weight) per crop; identities with a single crop
    are dropped. ``progress(step, total_steps, loss, metrics)`` after every step (``metrics`` the
    latest validation metrics, or None before the first evaluation). ``should_stop()`` polled
    every step: True raises :class:`TrainingCancelled` (no checkpoint; ``resume.pt`` of the last
    evaluation stays). ``resume``: continue from ``out_dir/resume.pt`` on the samples saved there
    (``samples`` are then only a fallback for files from before they were kept) with the same
    config (else :class:`ResumeError`); when the round had already finished, its stored result.

    Returns ``{"checkpoint", "best_step", "steps_run", "stopped_early", "init_metrics",
    "best_metrics", "history", "train_ids", "val_ids", "n_train", "n_val", "seconds",
    "model_config", "train_config", "resumed_from"}`` (``resumed_from``: the step it continued
    from, 0 for a fresh round); metrics as in :func:`validation_metrics`.
    """
    import torch

    from core.model import backbones, embed, network

    t0 = time.perf_counter()
    if out_dir is None:
        raise ValueError("out_dir is required (the version folder the checkpoint goes to)")
    out_dir = Path(out_dir)
    fp = round_fingerprint(samples, config, init_version)
    saved = None
    if resume:
        saved = resume_state(out_dir)
        if saved is None:
            done = _finished_result(out_dir, fp)
            if done is not None:
                log.info("round in %s had finished training: nothing to resume", out_dir)
                return done
            raise ResumeError(f"nothing to resume in {out_dir}: no {RESUME} (the round stopped before its "
                              "first evaluation); start a new round")
        if saved.get("format") != RESUME_FORMAT:
            raise ResumeError(f"{out_dir / RESUME} has format {saved.get('format')}, this version reads "
                              f"{RESUME_FORMAT}; start a new round")
        if saved.get("classes") is not None:
            classes = [tuple(c) for c in saved["classes"]]
        if saved.get("samples") is not None:
            # the round goes on with the crops it started on: labels and scores written since
            # (the operator keeps labelling while it runs) belong to the next round
            current = fp["samples"]
            samples = [tuple(s) for s in saved["samples"]]
            fp = round_fingerprint(samples, config, init_version)
            if fp["samples"] != current:
                log.info("resuming on the round's own %d samples (the dataset's changed since)", len(samples))
        _check_fingerprint(saved.get("fingerprint"), fp, out_dir / RESUME)
    else:
        (out_dir / RESUME).unlink(missing_ok=True)  # a fresh round supersedes any earlier state
    rng = np.random.default_rng(config.seed)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, config.threads))
    torch.manual_seed(config.seed)
    pool = ThreadPoolExecutor(max_workers=max(1, config.threads))  # batch augmentation
    try:
        # -- samples and split
        sample_rows = _sample_rows(samples)  # resume.pt keeps them: a resumed round trains on the same crops
        paths = [str(s[0]) for s in samples]
        idents = np.array([str(s[1]) for s in samples], dtype=object)
        cams_raw = [s[2] for s in samples]
        cams = None if any(c is None for c in cams_raw) else np.array([str(c) for c in cams_raw], dtype=object)
        weights = np.array([1.0 if s[3] is None else float(s[3]) for s in samples])
        uniq, counts = np.unique(idents, return_counts=True)
        usable = set(uniq[counts >= 2].tolist())
        if len(usable) < len(uniq):
            log.info("dropping %d identities with a single crop", len(uniq) - len(usable))
        open_set = set(open_identities)
        unsup = config.unsupervised if config.unsupervised is not None else bool(open_set & usable)
        val_fraction = config.val_fraction
        if unsup and val_fraction > 0:  # validation then only shows progress (it selects nothing): few tracklets
            val_fraction = min(val_fraction, config.min_val_ids / max(1, len(usable)))
        train_ids, val_ids = split_identities(sorted(usable), val_fraction, config.min_val_ids, rng)
        if saved is not None and (saved["train_ids"], saved["val_ids"]) != (train_ids, val_ids):
            raise ResumeError("the identity split differs from the saved round's: start a new round")
        tr_set, va_set = set(train_ids), set(val_ids)
        tr_idx = np.array([i for i, x in enumerate(idents) if x in tr_set], dtype=int)
        va_idx = np.array([i for i, x in enumerate(idents) if x in va_set], dtype=int)
        dev = devices.select(config.device)
        classes = [(str(c[0]), bool(c[1]), str(c[2] if len(c) > 2 and c[2] is not None else c[0])) for c in classes]
        n_pos = sum(y for _, y, _g in classes)
        fit_person = min(n_pos, len(classes) - n_pos) >= personness.MIN_PER_CLASS

        # -- model
        init_model, init_cfg = embed.load_model(init_version)
        mcfg = replace(
            init_cfg, crop_size=tuple(config.crop_size), frozen_blocks=config.frozen_blocks,
            emb_dim=config.emb_dim or init_cfg.emb_dim,
            brightness_invariant=init_cfg.brightness_invariant if config.brightness_invariant is None
            else config.brightness_invariant,
            last_stride=config.last_stride, flip_average=config.flip_average, neck=config.neck,
            person_head=fit_person)
        model = network.build_model(mcfg, pretrained=False)
        # every tensor whose shape still fits (a new emb_dim re-initialises the head)
        own = model.state_dict()
        state = {k: v for k, v in init_model.state_dict().items() if k in own and own[k].shape == v.shape}
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            log.info("fresh parameters (not in %s): %s", init_version, missing)
        del init_model
        model.to(dev)
        blocks = backbones.get_backbone(mcfg.backbone).blocks(model.backbone)
        frozen = blocks[: mcfg.frozen_blocks]
        head_params = [p for m in (model.head, model.neck) if m is not None for p in m.parameters()]
        bb_params = [p for p in model.backbone.parameters() if p.requires_grad]
        loss_fn, miner = _loss_and_miner(config)
        id_loss = _id_loss(config, len(train_ids), mcfg.emb_dim)
        if id_loss is not None:
            id_loss.to(dev)
        groups = [{"params": head_params, "lr_mult": 1.0},
                  {"params": bb_params, "lr_mult": config.backbone_lr_mult}]
        if id_loss is not None:
            groups.append({"params": list(id_loss.parameters()), "lr_mult": config.id_loss_lr_mult})
        opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

        # -- data into memory
        x_all = load_crops(paths, mcfg.crop_size, config.threads)
        x_tr, x_va = x_all[tr_idx], x_all[va_idx]
        del x_all
        lab_map = {x: i for i, x in enumerate(train_ids)}
        y_tr = np.array([lab_map[x] for x in idents[tr_idx]])
        y_va = idents[va_idx].astype(str)
        c_va = None if cams is None else cams[va_idx].astype(str)
        partners: dict[int, list[int]] = {}
        for a, b in cannot:
            if a in lab_map and b in lab_map:
                partners.setdefault(lab_map[a], []).append(lab_map[b])
                partners.setdefault(lab_map[b], []).append(lab_map[a])
        c_tr = None if cams is None else cams[tr_idx]
        sampler = WeightedIdentitySampler(y_tr, weights[tr_idx], config.ids_per_batch, config.samples_per_id,
                                          partners)
        # pseudo-identities: each training identity (node) gets a label; nodes the clustering
        # joins share one. Re-clustered every ``recluster_every`` steps on the current model.
        pl = PseudoLabels(y_tr, weights[tr_idx], config.ids_per_batch, config.samples_per_id,
                          [(lab_map[a], lab_map[b]) for a, b in cannot if a in lab_map and b in lab_map],
                          [x not in open_set for x in train_ids], c_tr,
                          (config.memory_weight, config.memory_momentum, config.memory_temperature), dev)

        def recluster(step: int) -> None:
            cl = pl.recluster(_embed_array(model, x_tr), step, config.cluster_method, config.cluster_eps)
            _set_train_mode(model, frozen)
            log.info("step %d: %d tracklets -> %d pseudo-identities (%d joined in %d clusters, %d links vetoed)",
                     step, len(train_ids), cl.n_labels, cl.merged_nodes, cl.clusters, cl.vetoed)

        if config.miner == "batch_hard" and open_identities and not unsup:
            cams_of: dict[str, set] = {}
            for x, c in zip(idents, cams_raw):
                cams_of.setdefault(str(x), set()).add(None if c is None else str(c))
            allowed = known_negatives(train_ids, cams_of, set(open_identities), cannot)
            if allowed is not None:
                miner = KnownNegativesMiner(allowed)

        def validate() -> dict[str, float] | None:
            if len(va_idx) == 0:
                return None
            return validation_metrics(_embed_array(model, x_va), y_va, c_va)

        def save_resume(step: int, metrics: dict | None) -> None:
            """The loop's whole state after ``step`` (the sampler has no state of its own: it
            draws from ``rng``)."""
            embed.atomic_torch_save({
                "format": RESUME_FORMAT, "fingerprint": fp, "step": int(step),
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "id_loss": None if id_loss is None else id_loss.state_dict(),
                "rng_numpy": rng.bit_generator.state, "rng_torch": torch.get_rng_state(),
                "best_state": best_state, "best_metrics": best_metrics, "best_step": int(best_step),
                "best_map": float(best_map), "init_metrics": init_metrics, "metrics": metrics,
                "history": history, "bad_evals": int(bad_evals), "train_ids": train_ids, "val_ids": val_ids,
                "seconds": time.perf_counter() - t0, "init_version": init_version,
                "train_config": config.to_dict(), "samples": sample_rows, "pseudo": pl.state(),
                "classes": classes}, out_dir / RESUME)

        stopped_early = False
        if saved is None:
            start = 0
            init_metrics = validate()
            best_metrics, best_step = init_metrics, 0
            best_map = init_metrics["mAP"] if init_metrics else -1.0
            best_state = copy.deepcopy(model.state_dict())
            history: list[dict[str, Any]] = [{"step": 0, "loss": None, **(init_metrics or {})}]
            bad_evals, metrics = 0, init_metrics
        else:
            start = int(saved["step"])
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if id_loss is not None:
                id_loss.load_state_dict(saved["id_loss"])
            rng.bit_generator.state = saved["rng_numpy"]
            torch.set_rng_state(saved["rng_torch"])
            init_metrics, metrics, history = saved["init_metrics"], saved["metrics"], list(saved["history"])
            best_metrics, best_step, best_map = saved["best_metrics"], int(saved["best_step"]), float(saved["best_map"])
            best_state, bad_evals = saved["best_state"], int(saved["bad_evals"])
            t0 -= float(saved.get("seconds") or 0.0)
            if saved.get("pseudo"):
                pl.restore(saved["pseudo"], mcfg.emb_dim)
            stopped_early = bool(config.patience and bad_evals >= config.patience)
            log.info("resuming round in %s at step %d of %d", out_dir, start, config.steps)
        log.info("round from %s: %d train ids (%d crops), %d val ids (%d crops), init val mAP %.3f",
                 init_version, len(train_ids), len(tr_idx), len(val_ids), len(va_idx),
                 init_metrics["mAP"] if init_metrics else -1.0)
        step, saved_step = start, (start or None)
        _set_train_mode(model, frozen)
        for step in range(start + 1, (start if stopped_early else config.steps) + 1):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(
                    f"round cancelled at step {step - 1} of {config.steps}; no checkpoint written"
                    + (f" (resumable from step {saved_step}: {RESUME})" if saved_step else ""))
            f = _lr_factor(step - 1, config.steps, config.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = config.lr * g["lr_mult"] * f
            if unsup and (step - 1) % config.recluster_every == 0:
                recluster(step - 1)
            idx = (sampler if pl.labels is None else pl.sampler).batch(rng)
            imgs = aug.augment_batch(x_tr[idx], rng, config.augment, pool.map)
            labels = torch.from_numpy(y_tr[idx] if pl.labels is None else pl.crop_labels(idx)).to(dev)
            emb = model(torch.from_numpy(imgs).to(dev))
            loss = loss_fn(emb, labels, miner(emb, labels))
            if id_loss is not None:
                loss = loss + config.id_loss_weight * id_loss(emb, labels)
            loss = loss + pl.loss(emb, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pl.update(emb, labels)
            loss_v = float(loss.item())
            if step % config.eval_every == 0 or step == config.steps:
                metrics = validate()
                _set_train_mode(model, frozen)
                history.append({"step": step, "loss": loss_v, **(metrics or {})})
                if metrics is not None:
                    log.info("step %d loss %.4f val mAP %.3f rank1 %.3f", step, loss_v,
                             metrics["mAP"], metrics["rank1"])
                if unsup:  # held-out tracklets only find themselves: no judge of cross-camera matching
                    best_step, best_state, best_metrics = step, copy.deepcopy(model.state_dict()), metrics
                elif metrics is not None:
                    if metrics["mAP"] > best_map + config.min_delta:
                        best_map, best_metrics, best_step = metrics["mAP"], metrics, step
                        best_state = copy.deepcopy(model.state_dict())
                        bad_evals = 0
                    else:
                        bad_evals += 1
                else:  # no validation identities: the last weights are the result
                    best_step, best_state = step, copy.deepcopy(model.state_dict())
                if step < config.steps and not (config.patience and bad_evals >= config.patience):
                    save_resume(step, metrics)  # (the checkpoint follows at once otherwise)
                    saved_step = step
            if progress is not None:
                progress(step, config.steps, loss_v, metrics)
            if config.patience and bad_evals >= config.patience:
                stopped_early = True
                log.info("early stop at step %d (best %d, val mAP %.3f)", step, best_step, best_map)
                break
        if should_stop is not None and should_stop():
            raise TrainingCancelled("round cancelled before saving; no checkpoint written")

        # -- the best weights, atomically
        best_state = {k: v.detach().cpu() for k, v in best_state.items()}  # a checkpoint loads anywhere
        model.load_state_dict(best_state)
        person = None
        if fit_person:  # on the finished model's features: the head the checkpoint carries
            # each crop and its mirror image (one group: they never vouch for each other); evidence
            # in core.math.personness
            xc = load_crops([c[0] for c in classes], mcfg.crop_size, config.threads)
            feats = np.concatenate([_embed_array(model, xc, features=True),
                                    _embed_array(model, np.ascontiguousarray(xc[:, :, ::-1]), features=True)])
            head = personness.fit(feats, np.array([c[1] for c in classes] * 2), config.seed,
                                  groups=[c[2] for c in classes] * 2)
            head.n_person, head.n_other = n_pos, len(classes) - n_pos  # crops, not crops and mirrors
            for k, v in {"0.weight": head.w1.T, "0.bias": head.b1, "2.weight": head.w2[None, :],
                         "2.bias": [head.b2]}.items():
                best_state[f"person.{k}"] = torch.tensor(np.asarray(v), dtype=torch.float32)
            model.load_state_dict(best_state)
            person = head.summary()
            log.info("person-ness head on %d person / %d other crops: CV AUC %.3f, threshold %.3f",
                     head.n_person, head.n_other, head.cv_auc, head.threshold)
        ck_metrics = {"val": best_metrics or {}, "init_val": init_metrics or {}, "best_step": best_step,
                      "train_ids": len(train_ids), "val_ids": len(val_ids)}
        ck_path = out_dir / CHECKPOINT
        seconds = time.perf_counter() - t0
        result = {
            "best_step": best_step, "steps_run": step,
            "stopped_early": stopped_early, "init_metrics": init_metrics, "best_metrics": best_metrics,
            "history": history, "train_ids": train_ids, "val_ids": val_ids,
            "n_train": int(len(tr_idx)), "n_val": int(len(va_idx)), "seconds": seconds,
            "model_config": mcfg.to_dict(), "train_config": config.to_dict(),
            "device": dev, "unsupervised": bool(unsup), "pseudo": None, "person": person,
        }
        if unsup and pl.reclusters:
            props = [[train_ids[a], train_ids[b], round(d, 4)] for a, b, d in pl.proposals[:200]]
            result["pseudo"] = {"reclusters": pl.reclusters, "proposals": props}
        ck = {"model": best_state, "config": mcfg.to_dict(), "optimizer": opt.state_dict(),
              "step": int(best_step), "metrics": ck_metrics, "train_config": config.to_dict(),
              "init_version": init_version, "fingerprint": fp, "result": result}
        embed.atomic_torch_save(ck, ck_path)
        (out_dir / RESUME).unlink(missing_ok=True)  # the round is complete
        (out_dir / "model.onnx").unlink(missing_ok=True)  # stale export of an older checkpoint
        log.info("round done in %.0fs: best step %d, val mAP %.3f (init %.3f) -> %s", seconds,
                 best_step, best_map, (init_metrics or {}).get("mAP", float("nan")), ck_path)
        return {**result, "checkpoint": str(ck_path), "resumed_from": start}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(prev_threads)
