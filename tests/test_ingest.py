"""Importers on the real sequences of ../shared/data, and every kind of bad input."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.math import conditions
from core.data import store
from core.services.ingest import IngestError, ingest
from tests.conftest import need_shared


def _gt(seq: Path) -> dict[tuple[int, int], tuple[float, ...]]:
    rows = {}
    for line in (seq / "gt" / "gt.txt").read_text().splitlines():
        p = line.split(",")
        rows[(int(p[0]), int(p[1]))] = tuple(float(v) for v in p[2:6])
    return rows


@pytest.fixture(scope="module")
def mot():
    root = need_shared("mot")
    name = "mot_real"
    report = ingest(root, "mot", name, every_n=10)
    yield name, report
    store.delete_dataset(name)


def test_mot_identities_per_sequence(mot):
    name, report = mot
    assert report.videos == 3 and not report.problems
    ds = store.get_dataset(name)
    per_seq = {s: len(ds.match({"sequence": s}).distinct("identity"))
               for s in ("PETS09-S2L1", "TUD-Campus", "TUD-Stadtmitte")}
    assert per_seq == {"PETS09-S2L1": 19, "TUD-Campus": 8, "TUD-Stadtmitte": 10}
    videos = store.get_videos(name)
    assert len(videos) == 3
    pets = videos.match({"sequence": "PETS09-S2L1"}).first()
    assert pets.metadata.frame_width == 480
    tracks = {d.index for f in pets.frames.values() for d in (f.detections.detections if f.detections else [])}
    assert len(tracks) == 19


def test_mot_crop_geometry_matches_scaled_ground_truth(mot):
    name, _ = mot
    ds = store.get_dataset(name)
    gt = _gt(need_shared("mot", "PETS09-S2L1"))
    checked = 0
    for s in ds.match({"sequence": "PETS09-S2L1"}).take(40, seed=0):
        x, y, w, h = gt[(s.frame, s.track)]
        exp = np.array([x, y, x + w, y + h]) * 0.625  # 768x576 boxes on the 480x360 re-encode
        exp = np.clip(exp, 0, [480, 360, 480, 360])
        bx, by, bw, bh = s.bbox
        assert np.allclose([bx, by, bx + bw, by + bh], exp, atol=1.0), (s.frame, s.track)
        img = cv2.imread(s.filepath)
        assert abs(img.shape[1] - bw) <= 1 and abs(img.shape[0] - bh) <= 1
        assert s.frame_first <= s.frame <= s.frame_last
        assert s.tracklet == f"PETS09-S2L1/{s.track}" and s.camera == "PETS09-S2L1"
        checked += 1
    assert checked == 40
    # TUD boxes are in video coordinates already: no scaling
    gt = _gt(need_shared("mot", "TUD-Campus"))
    s = ds.match({"sequence": "TUD-Campus"}).first()
    x, y, w, h = gt[(s.frame, s.track)]
    assert abs(s.bbox[2] - min(w, 640 - max(x, 0))) <= 1.5


def test_every_nth_frame_per_track(mot):
    name, _ = mot
    ds = store.get_dataset(name)
    for s in ds.match({"sequence": "TUD-Stadtmitte"}).take(20, seed=1):
        assert (s.frame - s.frame_first) % 10 == 0


def test_ingesting_twice_adds_nothing(mot):
    name, _ = mot
    before = len(store.get_dataset(name))
    report = ingest(need_shared("mot", "TUD-Campus"), "mot", name, every_n=10)
    assert report.added == 0 and report.duplicates > 0 and report.videos == 0
    assert len(store.get_dataset(name)) == before


def test_reid_campus62_identities_and_splits(dsname):
    report = ingest(need_shared("reid", "campus62"), "reid", dsname)
    assert not report.problems
    ds = store.get_dataset(dsname)
    assert len(ds.match_tags("train").distinct("identity")) == 62
    q, g = ds.match_tags("query"), ds.match_tags("gallery")
    assert len(q) == 28 and len(g) == 181
    assert set(q.distinct("identity")) <= set(g.distinct("identity"))
    assert set(ds.distinct("camera")) == {"01", "02"}
    # the same picture in query/ and gallery/ is one sample carrying both tags
    assert len(ds.match_tags(["query", "gallery"], all=True)) == 17


def test_conditions_on_real_data():
    low = need_shared("lowlight")
    flags = [conditions.measure(cv2.imread(str(p))).low_light for p in sorted(low.iterdir())]
    assert np.mean(flags) > 0.8
    cap = cv2.VideoCapture(str(need_shared("mot", "PETS09-S2L1", "PETS09-S2L1.mp4")))
    day = []
    for i in range(0, 200):
        ok, frame = cap.read()
        if i % 20 == 0:
            day.append(conditions.measure(frame).low_light)
    assert not any(day)
    sharp = cv2.imread(str(low / sorted(os.listdir(low))[0]))
    assert conditions.blur(cv2.GaussianBlur(sharp, (15, 15), 5)) < conditions.blur(sharp)


def test_images_folder(dsname):
    report = ingest(need_shared("shadows"), "images", dsname)
    ds = store.get_dataset(dsname)
    assert report.added == len(ds) == 11
    assert ds.first().brightness is not None


# ---------------------------------------------------------------- bad input

def _seed_dataset(name: str) -> int:
    ingest(need_shared("reid", "campus62", "val", "query"), "reid", name)
    return len(store.get_dataset(name))


def _reasons(report) -> dict[str, str]:
    return {Path(w).name: r for w, r in report.problems}


def test_hostile_image_folder(dsname, tmp_path):
    before = _seed_dataset(dsname)
    src = next(need_shared("reid", "campus62", "train").glob("*/*.png"))
    ident = tmp_path / "007"
    ident.mkdir()
    good = ident / "01_1.png"
    shutil.copy(src, good)
    data = good.read_bytes()
    (ident / "01_2.png").write_bytes(data[: len(data) // 2])  # truncated
    (ident / "01_3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))  # corrupt
    (ident / "01_4.jpg").write_bytes(b"this is text, not a picture")  # renamed file
    (ident / "01_5.png").write_bytes(b"")  # empty
    (ident / "notes.txt").write_text("hello")
    (ident / "loop").symlink_to(ident)  # symlink loop: not followed
    big = np.zeros((1, 1), np.uint8)
    from PIL import Image

    Image.new("L", (20000, 20000)).save(ident / "01_6.png", optimize=False)
    report = ingest(tmp_path, "reid", dsname)
    reasons = _reasons(report)
    assert report.added == 1
    assert "truncated" in reasons["01_2.png"]
    assert "not an image" in reasons["01_3.png"] or "corrupt" in reasons["01_3.png"]
    assert "not an image" in reasons["01_4.jpg"]
    assert "empty" in reasons["01_5.png"]
    assert "unsupported file type .txt" in reasons["notes.txt"]
    assert "Mpx" in reasons["01_6.png"]
    assert len(store.get_dataset(dsname)) == before + 1
    del big


def test_non_utf8_file_name(dsname, tmp_path):
    before = _seed_dataset(dsname)
    d = tmp_path / "009"
    d.mkdir()
    src = next(need_shared("reid", "campus62", "train").glob("*/*.png"))
    bad = os.path.join(os.fsencode(d), b"caf\xe9_1.png")
    shutil.copy(src, bad)
    report = ingest(tmp_path, "reid", dsname)
    assert report.added == 0
    assert any("UTF-8" in r for _, r in report.problems)
    assert len(store.get_dataset(dsname)) == before


def test_wrong_reid_layout_is_refused(dsname, tmp_path):
    before = _seed_dataset(dsname)
    src = next(need_shared("reid", "campus62", "train").glob("*/*.png"))
    shutil.copy(src, tmp_path / "01_1.png")
    with pytest.raises(IngestError, match="one folder per identity"):
        ingest(tmp_path, "reid", dsname)
    assert len(store.get_dataset(dsname)) == before


def test_missing_path_and_bad_kind(dsname, tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope", "mot", dsname)
    with pytest.raises(IngestError, match="unknown kind"):
        ingest(tmp_path, "lidar", dsname)


def _copy_seq(tmp_path: Path, name: str = "TUD-Campus") -> Path:
    seq = tmp_path / name
    shutil.copytree(need_shared("mot", name), seq)
    return seq


def test_mot_bad_sequences(dsname, tmp_path):
    before = _seed_dataset(dsname)
    root = tmp_path / "site"
    root.mkdir()
    # missing seqinfo.ini
    s1 = _copy_seq(root, "TUD-Campus")
    (s1 / "seqinfo.ini").unlink()
    # a text file named .mp4
    s2 = root / "FAKE"
    (s2 / "gt").mkdir(parents=True)
    (s2 / "FAKE.mp4").write_text("not a video")
    (s2 / "gt" / "gt.txt").write_text("1,1,10,10,20,40,1,-1,-1,-1\n")
    (s2 / "seqinfo.ini").write_text("[Sequence]\nname=FAKE\nimWidth=640\nimHeight=480\n")
    # an empty video
    s3 = root / "EMPTY"
    (s3 / "gt").mkdir(parents=True)
    (s3 / "EMPTY.mp4").write_bytes(b"")
    (s3 / "gt" / "gt.txt").write_text("1,1,10,10,20,40,1,-1,-1,-1\n")
    (s3 / "seqinfo.ini").write_text("[Sequence]\nname=EMPTY\nimWidth=640\nimHeight=480\n")
    report = ingest(root, "mot", dsname, every_n=10)
    reasons = _reasons(report)
    assert "seqinfo.ini" in reasons["TUD-Campus"]
    assert "not a readable video" in reasons["FAKE"]
    assert "empty video" in reasons["EMPTY"]
    assert report.added == 0
    assert len(store.get_dataset(dsname)) == before


def test_mot_malformed_rows_and_boxes_outside(dsname, tmp_path):
    before = _seed_dataset(dsname)
    seq = _copy_seq(tmp_path, "TUD-Campus")
    gt = seq / "gt" / "gt.txt"
    lines = gt.read_text().splitlines()
    lines += ["garbage,row", "3,99,abc,1,2,3,1,-1,-1,-1", "5,98,5000,5000,40,80,1,-1,-1,-1", "2,97,10,10,-5,30,1"]
    gt.write_text("\n".join(lines) + "\n")
    report = ingest(seq, "mot", dsname, every_n=10)
    reasons = [r for _, r in report.problems]
    assert sum("malformed gt row" in r for r in reasons) == 2
    assert sum("invalid gt row" in r for r in reasons) == 1
    assert sum("outside the frame" in r for r in reasons) == 1
    ds = store.get_dataset(dsname)
    assert len(ds) > before and len(ds.match({"track": 98})) == 0
    assert len(ds.match({"sequence": "TUD-Campus"}).distinct("identity")) == 8


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder, so permissions cannot make one unreadable")
def test_unreadable_folder(dsname, tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0)
    try:
        with pytest.raises(IngestError, match="not readable"):
            ingest(d, "images", dsname)
    finally:
        d.chmod(0o755)


def test_unreadable_subfolder_is_reported(dsname, tmp_path, monkeypatch):
    """An os.walk error (a folder that cannot be listed) becomes a per-folder reason."""
    (tmp_path / "ok").mkdir()
    shutil.copy(next(need_shared("shadows").glob("*.jpg")), tmp_path / "ok" / "a.jpg")
    sub = tmp_path / "gone"
    sub.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == sub:
            raise PermissionError(13, "Permission denied", str(sub))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = ingest(tmp_path, "images", dsname)
    assert report.added == 1
    assert any("unreadable folder" in r for _, r in report.problems)


def test_synthetic_demo_imports_through_mot(tmp_path, dsname):
    from core.data.synthetic import generate

    out = generate(tmp_path / "synth")
    report = ingest(out, "mot", dsname, every_n=6)
    assert not report.problems and report.videos == 6
    ds = store.get_dataset(dsname)
    assert len(ds.distinct("identity")) == 16
    night = ds.match({"sequence": {"$regex": "night"}})
    assert np.mean(night.values("low_light")) > 0.8
    assert np.mean(ds.match({"sequence": {"$regex": "day"}}).values("low_light")) < 0.2


# --------------------------------------------------------------------------- names, sources, frames

def _frames_seq(tmp_path: Path, src: str, name: str, frames: int = 40) -> Path:
    """A MOT sequence with an ``img1/`` frame folder (the first ``frames`` frames of a real clip)
    and a ``seqinfo.ini`` naming it ``name`` (hostile names included)."""
    real = need_shared("mot", src)
    seq = tmp_path / src
    (seq / "img1").mkdir(parents=True)
    (seq / "gt").mkdir()
    cap = cv2.VideoCapture(str(real / f"{src}.mp4"))
    for fn in range(1, frames + 1):
        ok, img = cap.read()
        assert ok
        cv2.imwrite(str(seq / "img1" / f"{fn:06d}.jpg"), img)
    cap.release()
    rows = [ln for ln in (real / "gt" / "gt.txt").read_text().splitlines() if int(ln.split(",")[0]) <= frames]
    (seq / "gt" / "gt.txt").write_text("\n".join(rows) + "\n")
    (seq / "seqinfo.ini").write_text(f"[Sequence]\nname={name}\nimDir=img1\nframeRate=25\nseqLength={frames}\n"
                                     "imWidth=640\nimHeight=480\nimExt=.jpg\n")
    return seq


def test_seqinfo_name_is_never_a_path(dsname, tmp_path, data_root):
    outside = tmp_path / "outside"
    outside.mkdir()
    up = "../" * (len((data_root / "media" / dsname / "mot").parts) - 1)  # from the MOT media folder to /
    hostile = [("TUD-Campus", up + str((outside / "pwned").relative_to("/"))),
               ("TUD-Stadtmitte", str(outside / "abs"))]
    root = tmp_path / "site"
    for src, name in hostile:
        _frames_seq(root, src, name, frames=20)
    report = ingest(root, "mot", dsname, every_n=5)
    assert report.videos == 2 and report.added > 0, report.problems
    assert not any(outside.rglob("*")), list(outside.rglob("*"))  # the old importer wrote crops and clips here
    media = (data_root / "media" / dsname).resolve()
    ds = store.get_dataset(dsname)
    for fp in ds.values("filepath") + store.get_videos(dsname).values("filepath"):
        assert Path(fp).resolve().is_relative_to(media), fp
    assert set(ds.distinct("sequence_name")) == {name for _, name in hostile}
    for seq_id in ds.distinct("sequence"):
        assert "/" not in seq_id and not seq_id.startswith(".")


def test_two_sites_with_one_sequence_name_stay_apart(dsname, tmp_path):
    a = _frames_seq(tmp_path / "site-a", "TUD-Campus", "cam1", frames=20)
    b = _frames_seq(tmp_path / "site-b", "TUD-Stadtmitte", "cam1", frames=20)
    ra = ingest(a, "mot", dsname, every_n=5)
    rb = ingest(b, "mot", dsname, every_n=5)
    assert ra.added > 0 and rb.added > 0 and rb.duplicates == 0, (ra.summary(), rb.summary())
    assert ra.videos == rb.videos == 1
    ds = store.get_dataset(dsname)
    seqs = sorted(ds.distinct("sequence"))
    assert len(seqs) == 2 and seqs[0] == "cam1" and seqs[1].startswith("cam1~")
    per_seq = {s: set(ds.match({"sequence": s}).distinct("identity")) for s in seqs}
    assert not per_seq[seqs[0]] & per_seq[seqs[1]]  # two sites' track 1 are two people
    clips = store.get_videos(dsname).values("filepath")
    assert len(set(clips)) == 2 and all(os.path.getsize(c) > 0 for c in clips)
    again = ingest(a, "mot", dsname, every_n=5)  # the same source twice adds nothing
    assert again.added == 0 and again.videos == 0 and again.duplicates == ra.added


def test_corrupt_frame_mid_sequence_is_skipped_and_the_sequence_finishes(dsname, tmp_path, data_root):
    seq = _frames_seq(tmp_path, "TUD-Campus", "TUD-Campus", frames=30)
    bad = seq / "img1" / "000011.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-file
    cv2.imwrite(str(seq / "img1" / "000021.jpg"), np.zeros((100, 100, 3), np.uint8))  # wrong size
    report = ingest(seq, "mot", dsname, every_n=5)
    reasons = _reasons(report)
    assert "frame skipped" in reasons["000011.jpg"] and "frame skipped" in reasons["000021.jpg"]
    assert report.videos == 1 and report.added > 0
    ds = store.get_dataset(dsname)
    assert len(ds.match({"frame": {"$in": [11, 21]}})) == 0 and len(ds.match({"frame": 26})) > 0
    clip = store.get_videos(dsname).first()
    assert clip.metadata.total_frame_count == 30  # a skipped frame keeps its place in the clip
    assert not list((data_root / "media").rglob("*.tmp*"))


def test_empty_or_unnumbered_frame_folder_is_a_reason_not_a_crash(dsname, tmp_path):
    seq = _frames_seq(tmp_path, "TUD-Campus", "TUD-Campus", frames=5)
    for p in (seq / "img1").iterdir():
        p.rename(p.with_name("frame.jpg" if p.stem.endswith("1") else p.name + ".txt"))
    report = ingest(seq, "mot", dsname)
    assert "no numbered image files" in _reasons(report)["TUD-Campus"]
    assert report.added == 0 and report.videos == 0


def test_media_folder_linked_out_of_the_root_is_refused(dsname, tmp_path, data_root):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    store.get_dataset(dsname, create=True)
    (data_root / "media").mkdir(exist_ok=True)
    link = data_root / "media" / dsname
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(IngestError, match="outside"):
            ingest(_frames_seq(tmp_path, "TUD-Campus", "cam", frames=5), "mot", dsname)
        assert not any(outside.iterdir())
    finally:
        link.unlink()


@pytest.mark.parametrize("bad", [".", "..", "...", " x", "site__videos", "a/b"])
def test_dataset_names_that_escape_or_collide_are_refused(bad, tmp_path):
    with pytest.raises(store.StoreError, match="dataset name"):
        store.get_dataset(bad, create=True)
    with pytest.raises(store.StoreError):
        ingest(tmp_path, "images", bad)


def test_reingesting_a_dataset_from_before_source_keys_adds_nothing(dsname, tmp_path):
    """Keys used to be mot:<name>:<track>:<frame> (and mot-video:<name>); a dataset ingested then
    and ingested again now gets no duplicate crops or clips."""
    seq = _frames_seq(tmp_path, "TUD-Campus", "TUD-Campus", frames=20)
    first = ingest(seq, "mot", dsname, every_n=5)
    ds = store.get_dataset(dsname)
    ids, tracks, frames = ds.values(["id", "track", "frame"])
    store.set_values(dsname, "ingest_key", {i: f"mot:TUD-Campus:{t}:{f}" for i, t, f in zip(ids, tracks, frames)})
    vids = store.get_videos(dsname)
    vids.set_values("ingest_key", ["mot-video:TUD-Campus"])
    store.db()[store.SEQUENCES].delete_many({"dataset": dsname})  # no claims back then
    again = ingest(seq, "mot", dsname, every_n=5)
    assert again.added == 0 and again.videos == 0 and again.duplicates == first.added
    assert len(store.get_dataset(dsname)) == first.added and len(store.get_videos(dsname)) == 1
