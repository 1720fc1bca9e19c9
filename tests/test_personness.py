"""Person-ness: the head on arrays, and a real round whose shadow labels teach the model to reject
shadows it never saw labelled."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.math import personness as P
from tests.conftest import need_shared


def test_labels_map_to_sides():
    assert P.is_person_label("person") is True
    assert P.is_person_label("shadow/noise") is False and P.is_person_label("vehicle") is False
    assert P.is_person_label(None) is None and P.is_person_label("") is None


def test_head_separates_and_folds_the_standardisation():
    rng = np.random.default_rng(0)
    # features with very different scales: the folded standardisation must make them comparable
    scale = np.array([1000.0, 0.001] + [1.0] * 6)
    pos = rng.normal(0, 1, (60, 8)) * scale
    neg = rng.normal(0, 1, (40, 8)) * scale
    neg[:, 1] += 0.004  # the signal sits in the tiny feature
    x, y = np.vstack([pos, neg]), np.r_[np.ones(60, bool), np.zeros(40, bool)]
    head = P.fit(x, y)
    s = head.score(x)
    assert P.rejection(s, y)["auc"] > 0.95
    assert head.cv_auc > 0.9 and head.alpha in P.ALPHA_GRID
    assert 0.0 < head.threshold < 1.0 and (s[y] >= head.threshold).mean() >= 0.9
    # the standardisation is folded into the first layer: raw features give scikit-learn's score
    # of the standardised ones (fitted in float32, as fit() does; scored here in float64)
    z = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
    np.testing.assert_allclose(s, P._mlp(head.alpha, 0).fit(z, y).predict_proba(z)[:, 1], rtol=1e-4)


def test_rejection_metrics_on_known_scores():
    y = np.r_[np.ones(100, bool), np.zeros(10, bool)]
    s = np.r_[np.linspace(0.5, 1.0, 100), np.linspace(0.0, 0.6, 10)]
    r = P.rejection(s, y)
    assert r["persons_kept"] >= 0.99
    assert r["threshold"] == pytest.approx(0.5 + 0.5 / 99, abs=1e-9)  # the second-lowest person
    assert r["fp_removed"] == pytest.approx(0.8)  # 0, 0.067 .. 0.467 of the ten are under it
    assert r["auc"] == pytest.approx(np.mean([(sp > sn) + 0.5 * (sp == sn) for sp in s[y] for sn in s[~y]]))


def test_too_few_labels_say_what_to_label():
    x = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(P.PersonnessError, match="at least 5 crops labelled person and 5"):
        P.fit(x, np.r_[np.ones(17, bool), np.zeros(3, bool)])


def _patches(paths, n_per: int, rng, size=(128, 64)) -> list[np.ndarray]:
    import cv2

    out = []
    for p in paths:
        img = cv2.imread(str(p))
        h, w = img.shape[:2]
        for _ in range(n_per):
            ph = int(rng.integers(h // 4, h // 2))
            pw = ph // 2
            y0, x0 = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
            out.append(cv2.resize(img[y0:y0 + ph, x0:x0 + pw], size[::-1]))
    return out


def _write(imgs, folder: Path) -> list[str]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, im in enumerate(imgs):
        p = folder / f"{i:04d}.png"
        cv2.imwrite(str(p), im)
        out.append(str(p))
    return out


def test_shadow_labels_lower_the_personness_of_unlabelled_shadows(data_root, tmp_path):
    """Two rounds on the same people and the same 'other' false positives (night scenes); the
    second also has crops of four shadow photographs labelled shadow. Crops of the three other
    shadow photographs, labelled in neither, score lower under the second round's model: it
    learnt shadows are not people. The exported ONNX graph carries the same score."""
    from core.model import embed
    from core.model import train as T
    from core.config import settings

    campus = need_shared("reid", "campus62", "train")
    shadows = sorted(p for p in need_shared("shadows").glob("*.jpg"))
    night = sorted(need_shared("lowlight").glob("*.png"))[:8]
    rng = np.random.default_rng(0)
    ids = sorted(campus.iterdir())[:12]
    samples = [(str(p), d.name, p.stem[:2], 1.0) for d in ids for p in sorted(d.glob("*.png"))[:8]]
    persons = [s[0] for s in samples]
    held_persons = [str(p) for d in sorted(campus.iterdir())[40:46] for p in sorted(d.glob("*.png"))[:4]]
    other = _write(_patches(night, 6, rng), tmp_path / "other")
    shadow_lab = _write(_patches(shadows[:4], 8, rng), tmp_path / "shadow")
    shadow_new = _write(_patches(shadows[4:], 8, rng), tmp_path / "shadow_new")
    cfg = T.TrainConfig(crop_size=(128, 64), frozen_blocks=10, steps=10, ids_per_batch=6, samples_per_id=4,
                        eval_every=10, patience=0, val_fraction=0.3, min_val_ids=3, lr=1e-3, seed=0)
    base = [(p, True) for p in persons] + [(p, False) for p in other]
    scores = {}
    for arm, classes in (("other only", base), ("with shadows", base + [(p, False) for p in shadow_lab])):
        out = settings().models_dir / f"personness-{arm.replace(' ', '-')}"
        res = T.train_round(samples, cfg, out_dir=out, classes=classes)
        assert res["person"]["n_other"] == len(classes) - len(persons)
        version = out.name
        v, _e, s_new = embed.embed_paths(shadow_new, version=version, backend="torch", person=True)
        _v, _e, s_person = embed.embed_paths(held_persons, version=version, backend="torch", person=True)
        scores[arm] = (s_new, s_person)
        # the exported graph outputs the same person-ness as the PyTorch model
        _v, _e, s_onnx = embed.embed_paths(shadow_new, version=version, backend="onnx", person=True)
        np.testing.assert_allclose(s_onnx, s_new, atol=1e-4)
    # the exported model for an edge device carries the output and the card says how to threshold it
    from core.services import export

    rep = export.export_model(version, verify_on=held_persons[:8])
    card = Path(rep["card"]).read_text()
    assert "output `person`" in card and "keeps 99 % of persons" in card
    assert export.read_metadata(rep["onnx"])["person_output"] == "person"
    new_a, pers_a = scores["other only"]
    new_b, pers_b = scores["with shadows"]
    # in log-odds (the head's own scale); seen here with the linear head: medians 0.0089 -> 0.0008
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    assert logit(np.median(new_b)) < logit(np.median(new_a)) - 1.5, (np.median(new_a), np.median(new_b))
    assert (new_b < 0.5).mean() > 0.8
    # and the unseen people stay people
    assert np.median(pers_b) > 0.8 and (pers_b > 0.5).mean() > 0.9


def test_round_class_labels_come_from_the_operators_classes(dsname, tmp_path):
    """What a round fits the head on: crops labelled person (a MOT ingest's ground truth) against
    crops given any other class; unlabelled and failed crops are left out."""
    from core.services import rounds
    from core.data import store
    from core.services.ingest import ingest

    seq = need_shared("mot", "TUD-Campus")
    ingest(seq, "mot", dsname, every_n=10)
    cols = store.view_columns(dsname, ["filepath", "label"])
    ids = cols["id"]
    store.set_values(dsname, "label", {ids[0]: "shadow/noise", ids[1]: "vehicle", ids[2]: None})
    store.set_values(dsname, "embed_error", {ids[3]: "cannot decode"})
    rows = rounds.class_samples(rounds.round_columns(dsname))
    got = {p: y for p, y, _g in rows}
    assert all(g.startswith("TUD-Campus/") for _p, _y, g in rows)  # grouped by tracklet
    path = dict(zip(ids, cols["filepath"]))
    assert got[path[ids[0]]] is False and got[path[ids[1]]] is False
    assert path[ids[2]] not in got and path[ids[3]] not in got
    assert sum(got.values()) == len(ids) - 4
