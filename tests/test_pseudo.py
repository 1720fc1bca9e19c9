"""Pseudo-identities (core.math.pseudo): the clustering never joins what the graph keeps apart, and a
round with zero labels learns from real footage."""
from __future__ import annotations

import numpy as np
import pytest

from core.math import pseudo


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_links_join_across_cameras_never_inside_one():
    # a0/a1 one person in cameras 1 and 2; b0 in camera 1 looks like a0 but is never linked to it
    v = _unit([[1, 0, 0], [0.98, 0.2, 0], [0.99, 0, 0.1], [0, 1, 0]])
    cams = ["c1", "c2", "c1", "c2"]
    links = pseudo.mutual_links(pseudo.cosine_distances(v), cams, eps=0.6)
    assert links and all(cams[i] != cams[j] for i, j, _ in links)
    cl = pseudo.cluster(4, links)
    assert cl.labels[0] == cl.labels[1] and cl.labels[2] != cl.labels[0] and cl.labels[3] != cl.labels[1]
    assert cl.proposals == [(0, 1, pytest.approx(links[0][2]))]
    # one camera (or none known): mutual nearest neighbours over all nodes
    assert [lk[:2] for lk in pseudo.mutual_links(pseudo.cosine_distances(v), ["c"] * 4, eps=0.6)] == [(0, 2)]
    # a link longer than eps is no link: everyone keeps a pseudo-identity of their own
    assert pseudo.cluster(4, pseudo.mutual_links(pseudo.cosine_distances(v), cams, eps=0.001)).n_labels == 4


def test_cannot_links_and_verified_identities_veto_a_chain():
    # three cameras, one look: the links would chain a-b-c into one pseudo-identity
    links = [(0, 1, 0.1), (1, 2, 0.2), (0, 2, 0.3)]
    free = pseudo.cluster(3, links)
    assert free.n_labels == 1 and free.merged_nodes == 3
    # a and c were seen in one frame: b joins the nearer (a), c stays apart
    cl = pseudo.cluster(3, links, cannot=[(0, 2)])
    assert cl.labels[0] == cl.labels[1] != cl.labels[2] and cl.vetoed == 2
    assert [p[:2] for p in cl.proposals] == [(0, 1)]
    # two identities an operator verified are two people, however alike
    cl = pseudo.cluster(3, links, fixed=[True, False, True])
    assert cl.labels[0] == cl.labels[1] != cl.labels[2]
    # an unverified node may join a verified one
    assert pseudo.cluster(2, [(0, 1, 0.1)], fixed=[True, False]).n_labels == 1


def test_spcl_dbscan_reference_respects_cannot_links_too():
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(3, 16)))
    x = _unit(np.repeat(centres, 4, axis=0) + 0.05 * rng.normal(size=(12, 16)))  # 3 people x 4 nodes
    links = pseudo.dbscan_links(pseudo.jaccard_distances(x, 3, 2), eps=0.6)
    truth = np.repeat(np.arange(3), 4)
    cl = pseudo.cluster(12, links)
    assert cl.n_labels == 3 and (cl.labels[:, None] == cl.labels[None, :]).tolist() == \
        (truth[:, None] == truth[None, :]).tolist()
    cannot = [(0, 1), (4, 7)]
    cl = pseudo.cluster(12, links, cannot=cannot)
    assert all(cl.labels[a] != cl.labels[b] for a, b in cannot)


def test_pseudo_identities_on_crops_with_a_camera_look():
    """Per-camera colour casts dominate raw vectors; removing each camera's mean lets a tracklet
    find its own person in the other camera. Two co-occurring tracklets never merge."""
    rng = np.random.default_rng(1)
    people = _unit(rng.normal(size=(6, 32)))
    cam_look = 3 * _unit(rng.normal(size=(2, 32)))
    x, node, cams = [], [], []
    for p in range(6):
        for c in range(2):
            for _ in range(5):
                x.append(people[p] + cam_look[c] + 0.1 * rng.normal(size=32))
                node.append(2 * p + c)
                cams.append(f"cam{c}")
    x = _unit(x)
    cl = pseudo.pseudo_identities(x, np.array(node), 12, cams, eps=0.6)
    person = np.arange(12) // 2
    assert cl.clusters == 6 and all(cl.labels[2 * p] == cl.labels[2 * p + 1] for p in range(6))
    assert len(set(cl.labels.tolist())) == 6
    assert len(cl.proposals) == 6 and all(person[a] == person[b] for a, b, _ in cl.proposals)
    vetoed = pseudo.pseudo_identities(x, np.array(node), 12, cams, cannot=[(0, 1)], eps=0.6)
    assert vetoed.labels[0] != vetoed.labels[1]
    with pytest.raises(ValueError, match="mutual"):
        pseudo.pseudo_identities(x, np.array(node), 12, cams, method="kmeans")


# --- rounds on real crops -----------------------------------------------------------------------

def _mot_crops(tmp_path, seqs=(("TUD-Stadtmitte", 3), ("TUD-Campus", 2)), min_h: int = 48):
    """Person crops cut from the clips at their ground-truth boxes: (path, track, sequence, frame)."""
    import cv2

    from core.services.ingest import IngestReport, parse_gt
    from tests.conftest import need_shared

    out = []
    for name, every in seqs:
        seq = need_shared("mot", name)
        boxes = [b for b in parse_gt(seq / "gt" / "gt.txt", IngestReport(str(seq), "mot", "t")) if b.frame % every == 0]
        by_frame: dict[int, list] = {}
        for b in boxes:
            by_frame.setdefault(b.frame, []).append(b)
        cap = cv2.VideoCapture(str(next(seq.glob("*.mp4"))))
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            n += 1
            for b in by_frame.get(n, []):
                x, y, w, h = (int(round(v)) for v in b.box)
                x0, y0, x1, y1 = max(0, x), max(0, y), min(frame.shape[1], x + w), min(frame.shape[0], y + h)
                if y1 - y0 >= min_h and x1 - x0 >= min_h // 4:
                    p = tmp_path / f"{name}-{b.track}-{n}.png"
                    cv2.imwrite(str(p), frame[y0:y1, x0:x1])
                    out.append((str(p), f"{name}:{b.track}", name, n))
        cap.release()
    return out


UNSUP = dict(crop_size=(128, 64), steps=150, eval_every=50, recluster_every=50, ids_per_batch=6,
             samples_per_id=4, patience=0, min_val_ids=2, seed=0)


def test_a_round_with_zero_labels_improves_on_base_for_people_it_never_saw(data_root, tmp_path):
    """Tracks of TUD-Stadtmitte and TUD-Campus, identities hidden: every track a lone tracklet,
    tracks seen in one frame cannot-linked. Scored on held-out people: the first half of each of
    their tracks finds the second half."""
    from core.math import evaluate as ev
    from core.model.embed import load_model

    crops = _mot_crops(tmp_path)
    tracks = sorted({c[1] for c in crops})
    rng = np.random.default_rng(0)
    held = {tracks[i] for i in rng.permutation(len(tracks))[: len(tracks) // 3]}
    train = [c for c in crops if c[1] not in held]
    samples = [(p, f"~{t}", seq, 1.0) for p, t, seq, _ in train]
    frames: dict[tuple, set] = {}
    for p, t, seq, fr in train:
        frames.setdefault((seq, fr), set()).add(f"~{t}")
    cannot = sorted({(a, b) for ts in frames.values() for a in ts for b in ts if a < b})
    r = _unsup_round(samples, cannot, data_root / "models" / "t-unsup")
    assert r["unsupervised"] is True and r["device"] == "cpu"  # all lone: auto-on; CI has no GPU
    assert r["pseudo"]["reclusters"] and r["pseudo"]["reclusters"][0]["step"] == 0
    assert [c["step"] for c in r["pseudo"]["reclusters"]] == [0, 50, 100]
    joined = {frozenset(p[:2]) for p in r["pseudo"]["proposals"]}
    assert not joined & {frozenset(c) for c in cannot}  # never two people seen in one frame

    test = sorted((c for c in crops if c[1] in held), key=lambda c: (c[1], c[3]))
    q, g = [], []
    for t in sorted(held):
        ks = [k for k, c in enumerate(test) if c[1] == t]
        q += ks[: len(ks) // 2]
        g += ks[len(ks) // 2:]
    ids = np.array([c[1] for c in test])

    def score(version: str) -> float:
        from core.model.train import _embed_array, load_crops

        model, cfg = load_model(version)
        e = _embed_array(model, load_crops([c[0] for c in test], cfg.crop_size))
        return ev.retrieval_metrics(e[q], ids[q], e[g], ids[g])["mAP"]

    base, after = score("base"), score("t-unsup")  # base at its own 256x128 input, the round at 128x64
    # seen: +0.03 and more on the machine this test was written on, +0.019 (0.695 -> 0.714) on
    # another with the same packages and seed (CPU kernels differ); a worse model fails either way
    assert after > base + 0.01, (base, after)


def _unsup_round(samples, cannot, out):
    from core.model import train as T

    return T.train_round(samples, T.TrainConfig(**UNSUP), out_dir=out, cannot=cannot,
                         open_identities=sorted({s[1] for s in samples}))


def test_an_unsupervised_round_resumes_to_the_same_result(data_root):
    """The pseudo-labels and the cluster memory are part of the saved loop state: a round
    stopped after an evaluation between two re-clusterings ends where the whole round ends."""
    import torch

    from core.model import train as T
    from tests.test_train import RESUMABLE, _campus_samples

    samples = [(p, f"~{i}-{c}", c, w) for p, i, c, w in _campus_samples(8)]
    cfg = T.TrainConfig(**{**RESUMABLE, "unsupervised": True, "recluster_every": 8})
    opened = sorted({s[1] for s in samples})
    whole = T.train_round(samples, cfg, out_dir=data_root / "models" / "t-uwhole", open_identities=opened)
    assert [c["step"] for c in whole["pseudo"]["reclusters"]] == [0, 8, 16]
    out = data_root / "models" / "t-uresume"
    steps: list[int] = []
    with pytest.raises(T.TrainingCancelled, match="resumable from step 10"):
        T.train_round(samples, cfg, out_dir=out, open_identities=opened,
                      progress=lambda s, n, loss, m: steps.append(s), should_stop=lambda: len(steps) >= 12)
    r = T.train_round(samples, cfg, out_dir=out, resume=True, open_identities=opened)
    assert r["resumed_from"] == 10 and r["history"] == whole["history"]
    assert r["pseudo"] == whole["pseudo"]
    a = torch.load(out / T.CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    b = torch.load(data_root / "models" / "t-uwhole" / T.CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cluster_memory_scores_crops_against_momentum_centroids():
    import torch

    from core.model.batches import ClusterMemory

    centroids = np.eye(3, 4, dtype=np.float32)  # three unit centroids
    mem = ClusterMemory(centroids, momentum=0.5, temperature=0.05)
    emb = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    right, wrong = mem(emb, torch.tensor([0, 1])), mem(emb, torch.tensor([1, 0]))
    assert float(right) < 0.01 < 10 < float(wrong)  # a softmax over the centroids at temperature 0.05
    mem.update(torch.tensor([[0, 0, 0, 1.0], [0, 0, 0, 1.0]]), torch.tensor([2, 2]))
    w = mem.state().numpy()  # [D, C]
    assert np.allclose(w[:, 2], np.array([0, 0, 1, 1]) / np.sqrt(2), atol=1e-6)  # halfway, renormalised
    assert np.allclose(w[:, :2], centroids[:2].T)  # identities not in the batch stay
    assert not mem.loss.W.requires_grad  # moved by momentum, never by the optimiser


def test_pseudo_identities_are_on_where_any_tracklet_is_unlabelled(data_root):
    """Auto mode: a round with some lone tracklets clusters them (they may join each other or a
    named identity); a round on named identities alone trains on them as before."""
    from core.model import train as T
    from tests.test_train import RESUMABLE, _campus_samples

    samples = _campus_samples(8)
    named = {s[1] for s in samples[:64]}  # the first 4 people named, the others per-camera tracklets
    mixed = [(p, i if i in named else f"~{i}-{c}", c, w) for p, i, c, w in samples]
    cfg = T.TrainConfig(**{**RESUMABLE, "steps": 2, "eval_every": 2})
    r = T.train_round(mixed, cfg, out_dir=data_root / "models" / "t-mixed",
                      open_identities=sorted({s[1] for s in mixed if s[1].startswith("~")}))
    assert r["unsupervised"] is True and r["pseudo"]["reclusters"][0]["nodes"] > len(named)
    r = T.train_round(samples, cfg, out_dir=data_root / "models" / "t-named")
    assert r["unsupervised"] is False and r["pseudo"] is None
