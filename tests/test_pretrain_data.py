"""The pre-training loader, one stage at a time, on real webdataset shards.

The shards here are written with webdataset's stock ShardWriter in the exact
CONTRACTS section 3 schema, with sizes the tests control (9 + 6 + 3 samples
over 4 shards), so quotas and splits can be checked exactly.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from hybridps.pretrain import data as D
from hybridps.pretrain.augment import ViewParams, augment_view, make_two_views

# name -> (task, labeled, samples, samples per shard, image size (W, H))
LAYOUT = {
    "detA": ("det", False, 9, 5, (96, 72)),
    "reidB": ("reid", True, 6, 6, (24, 48)),
    "reidC": ("reid", False, 3, 3, (20, 40)),
}


def _jpeg(w: int, h: int, rng) -> bytes:
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _record(name, task, labeled, domain, i, w, h, rng, next_id, lo):
    if task == "det":
        boxes = []
        for _ in range(1 + i % 3):
            x1, y1 = float(rng.uniform(0, w - 30)), float(rng.uniform(0, h - 40))
            boxes.append([x1, y1, x1 + float(rng.uniform(12, 28)), y1 + float(rng.uniform(20, 38))])
        pids = list(range(next_id, next_id + len(boxes)))
        ignore = [[0.0, 0.0, 8.0, 8.0]] if i == 0 else []
    else:
        boxes, ignore = [[0.0, 0.0, float(w), float(h)]], []
        pids = [lo + i % 3] if labeled else [next_id]
    return {"dataset": name, "split": "train", "domain": domain, "task": task, "labeled": labeled,
            "width": w, "height": h, "boxes": boxes, "pids": pids, "local_ids": [-1] * len(boxes),
            "ignore": ignore, "camera": None, "source": f"{name}/{i}.jpg", "canvas": None}


def write_test_build(root: Path, layout: dict = LAYOUT, seed: int = 0) -> dict:
    """``root/manifest.json`` + ``root/<dataset>/train-%06d.tar`` via wds.ShardWriter."""
    rng = np.random.default_rng(seed)
    manifest = {"version": 1, "num_ids": 0, "domains": list(layout), "datasets": {}, "options": {}}
    next_id = 0
    for domain, (name, (task, labeled, total, per_shard, (w, h))) in enumerate(layout.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        lo, n_boxes = next_id, 0
        with wds.ShardWriter(str(root / name / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in range(total):
                meta = _record(name, task, labeled, domain, i, w, h, rng, next_id, lo)
                next_id = max(next_id, max(meta["pids"]) + 1)
                n_boxes += len(meta["boxes"])
                sink.write({"__key__": f"{name}-train-{i:04d}", "jpg": _jpeg(w, h, rng),
                            "json": json.dumps(meta).encode()})
        shards = []
        for path in sorted((root / name).glob("train-*.tar")):
            with wds.WebDataset(str(path), shardshuffle=False) as ds:
                n = sum(1 for _ in ds)
            shards.append({"path": f"{name}/{path.name}", "samples": n,
                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        manifest["datasets"][name] = {
            "domain": domain, "task": task, "labeled": labeled, "id_range": [lo, next_id],
            "splits": {"train": {"samples": total, "boxes": n_boxes, "ignore_regions": 0,
                                 "skipped": {}, "fixed": {}, "shards": shards}}}
    manifest["num_ids"] = next_id
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    write_test_build(root)
    return root


def Cfg(**kw) -> D.DataConfig:
    return D.DataConfig(**{"batch_size": 2, "canvas_size": [40, 80], "crop_prob": 0.5, **kw})


PARAMS = ViewParams(min_size=(64,), max_size=96)


# --------------------------------------------------------------------------- source and reading
def test_open_source_and_read_every_sample(build):
    src = D.open_source(shards=str(build))
    assert [s.samples for s in src.shards] == [5, 4, 6, 3]
    assert src.num_ids == json.loads((build / "manifest.json").read_text())["num_ids"]
    reader = D.ShardReader(src.shards)
    keys = [reader.key(s, i) for s, info in enumerate(src.shards) for i in range(info.samples)]
    assert len(keys) == len(set(keys)) == 18
    raw = reader.read(2, 1)
    assert raw["__key__"] == "reidB-train-0001" and raw["jpg"][:2] == b"\xff\xd8"
    assert json.loads(raw["json"])["task"] == "reid"


def test_missing_manifest_and_bad_weights_are_clear(tmp_path, build):
    with pytest.raises(D.DataError, match="manifest not found"):
        D.open_source(shards=str(tmp_path))
    src = D.open_source(shards=str(build))
    with pytest.raises(D.DataError, match="no weight for"):
        D.dataset_weights(src, {"detA": 1.0})
    with pytest.raises(D.DataError, match="not in the manifest"):
        D.dataset_weights(src, {"detA": 1, "reidB": 1, "reidC": 1, "nope": 1})


def test_sample_count_mismatch_is_reported(tmp_path, build):
    import shutil

    root = tmp_path / "b"
    shutil.copytree(build, root)
    man = json.loads((root / "manifest.json").read_text())
    man["datasets"]["reidC"]["splits"]["train"]["shards"][0]["samples"] = 7
    (root / "manifest.json").write_text(json.dumps(man))
    src = D.open_source(shards=str(root))
    with pytest.raises(D.DataError, match="3 samples but the manifest says 7"):
        D.ShardReader(src.shards).key(3, 0)


def test_pipe_urls_are_fetched_to_cache_and_verified(tmp_path, build):
    urls = [f"pipe:cat {build}/{{detA/train-00000{{0,1}},reidB/train-000000,reidC/train-000000}}.tar"]
    src = D.open_source(urls=urls, manifest=str(build / "manifest.json"))
    assert src.shards[1].url == f"pipe:cat {build}/detA/train-000001.tar"
    reader = D.ShardReader(src.shards, cache_dir=str(tmp_path / "cache"))
    assert reader.key(1, 3) == "detA-train-0008"
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 1
    bad = [s.__class__(s.dataset, s.split, s.url, s.samples, "0" * 64) for s in src.shards]
    with pytest.raises(D.DataError, match="sha256"):
        D.ShardReader(bad, cache_dir=str(tmp_path / "cache2")).key(0, 0)


# --------------------------------------------------------------------------- decode and canvas
def test_decode_stage(build):
    src = D.open_source(shards=str(build))
    reader = D.ShardReader(src.shards)
    items = [(0, (0, 0, 0), 1), (1, (2, 0, 1), 2)]
    out = list(D.decode_samples(D.read_samples(items, reader)))
    det, reid = out
    assert det["image"].dtype == torch.uint8 and det["image"].shape == (3, 72, 96)
    assert det["boxes"].shape == (1, 4) and det["ignore"].shape == (1, 4)
    assert det["task"] == "det" and det["labeled"] is False and det["domain"] == 0
    assert reid["__key__"] == "reidB-train-0000@1" and reid["labeled"] is True
    assert reid["boxes"].tolist() == [[0.0, 0.0, 24.0, 48.0]]


def test_decode_rejects_size_mismatch(build):
    src = D.open_source(shards=str(build))
    raw = D.ShardReader(src.shards).read(0, 0)
    meta = json.loads(raw["json"])
    meta["width"] = 10
    raw["json"] = json.dumps(meta).encode()
    with pytest.raises(D.DataError, match="json says 10x72"):
        list(D.decode_samples([raw]))


@pytest.mark.parametrize("mode", ["expand_resize", "random_paste"])
def test_reid_crops_go_on_a_canvas(build, mode):
    src = D.open_source(shards=str(build))
    reader = D.ShardReader(src.shards)
    items = [(0, (2, 0, 0), 11), (1, (0, 0, 0), 12)]
    reid, det = list(D.unify_reid(D.decode_samples(D.read_samples(items, reader)), mode, (40, 80), (1.5, 2.5),
                                  (0.5, 1.0)))
    assert reid["image"].shape == (3, 80, 40)
    x1, y1, x2, y2 = reid["boxes"][0].tolist()
    assert 0 <= x1 < x2 <= 40 and 0 <= y1 < y2 <= 80
    if mode == "expand_resize":   # ratio in [1.5, 2.5] per axis
        assert 40 / 2.5 - 1 <= x2 - x1 <= 40 / 1.5 + 1 and 80 / 2.5 - 1 <= y2 - y1 <= 80 / 1.5 + 1
    # the crop's pixels are inside the box: its mean matches the source crop's mean
    crop = reid["image"][:, int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1].float().mean()
    src_img = next(D.decode_samples(D.read_samples([(0, (2, 0, 0), 11)], reader)))["image"].float().mean()
    assert abs(crop - src_img) < 12
    assert det["image"].shape == (3, 72, 96) and det["canvas"] is None   # scenes untouched


# --------------------------------------------------------------------------- two views
def _scene(n=4):
    img = torch.zeros(3, 120, 160, dtype=torch.uint8)
    boxes = torch.tensor([[10, 10, 40, 90], [60, 20, 90, 110], [100, 5, 150, 60], [0, 100, 20, 120]][:n],
                         dtype=torch.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        img[:, y1:y2, x1:x2] = torch.tensor([40 + 50 * k, 200 - 40 * k, 30 * k]).view(3, 1, 1)
    return img, boxes, torch.arange(100, 100 + n), torch.tensor([[130.0, 90.0, 160.0, 120.0]])


def test_views_track_boxes_through_flip_crop_resize():
    img, boxes, pids, ignore = _scene()
    p = ViewParams(min_size=(96, 128), max_size=200, crop_prob=1.0, crop_scale=(0.5, 0.8),
                   color_jitter=(0, 0, 0, 0))
    rng = np.random.default_rng(3)
    seen_drop = False
    for _ in range(30):
        v = augment_view(img, boxes, pids, ignore, rng, p)
        assert v["image"].dtype == torch.float32 and 0 <= v["image"].min() and v["image"].max() <= 1
        assert min(v["image"].shape[-2:]) in (96, 128) or max(v["image"].shape[-2:]) == 200
        assert len(v["boxes"]) >= 1                               # the crop keeps a person whole
        assert torch.equal(v["pids"], pids[v["track"]])
        seen_drop |= len(v["boxes"]) < 4
        h, w = v["image"].shape[-2:]
        for (x1, y1, x2, y2), t in zip(v["boxes"].tolist(), v["track"].tolist()):
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            # the box still frames the person's colour (flip/crop/resize kept it aligned)
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            want = torch.tensor([40 + 50 * t, 200 - 40 * t, 30 * t]) / 255
            assert torch.allclose(v["image"][:, cy, cx], want.float(), atol=0.03)
    assert seen_drop


def test_two_views_differ_but_share_tracks():
    img, boxes, pids, ignore = _scene()
    p = ViewParams(min_size=(96,), max_size=200, crop_prob=0.0)
    v1, v2 = make_two_views(img, boxes, pids, ignore, np.random.default_rng(0), p)
    assert v1["track"].tolist() == v2["track"].tolist() == [0, 1, 2, 3]
    assert not torch.equal(v1["image"], v2["image"])
    a1, a2 = make_two_views(img, boxes, pids, ignore, np.random.default_rng(0), p)
    assert torch.equal(a1["image"], v1["image"]) and torch.equal(a2["boxes"], v2["boxes"])


def test_degenerate_box_dropped_from_one_view_only():
    img, boxes, pids, ignore = _scene()
    boxes = torch.cat([boxes, torch.tensor([[70.0, 0.0, 71.5, 3.0]])])    # ~1 px wide after resize
    pids = torch.arange(5)
    p = ViewParams(min_size=(240,), max_size=400, crop_prob=0.0, min_box_size=3.0, flip_prob=0.0,
                   color_jitter=(0, 0, 0, 0))
    v_big = augment_view(img, boxes, pids, ignore, np.random.default_rng(0), p)
    p_small = ViewParams(min_size=(60,), max_size=400, crop_prob=0.0, min_box_size=3.0, color_jitter=(0, 0, 0, 0))
    v_small = augment_view(img, boxes, pids, ignore, np.random.default_rng(0), p_small)
    assert 4 in v_big["track"].tolist() and 4 not in v_small["track"].tolist()


# --------------------------------------------------------------------------- the plan
def test_quotas_follow_weights_and_are_deterministic(build):
    src = D.open_source(shards=str(build))
    w = {"detA": 1.0, "reidB": 2.0, "reidC": 0.34}
    plan = D.epoch_plan(src, w, seed=5, epoch=0)
    per = Counter(src.shards[s].dataset for s, _, _ in plan)
    assert per == {"detA": 9, "reidB": 12, "reidC": 1}
    assert plan == D.epoch_plan(src, w, seed=5, epoch=0)
    assert plan != D.epoch_plan(src, w, seed=5, epoch=1)
    assert len(set(plan)) == len(plan)                              # repeats are distinct entries
    reader = D.ShardReader(src.shards)
    keys = D.plan_keys(reader, plan)
    assert sum(k.endswith("@1") for k in keys) == 6 and len(set(keys)) == len(keys)
    only_b = D.epoch_plan(src, {"detA": 0, "reidB": 1, "reidC": 0}, 0, 0)
    assert len(only_b) == 6 and all(src.shards[s].dataset == "reidB" for s, _, _ in only_b)


def test_fractional_quota_subset_changes_per_epoch(build):
    src = D.open_source(shards=str(build))
    w = {"detA": 0.5, "reidB": 0.0, "reidC": 0.0}
    subsets = {frozenset(D.epoch_plan(src, w, 0, e)) for e in range(6)}
    assert all(len(s) == 4 for s in subsets) and len(subsets) > 1   # round(0.5 * 9) = 4 (banker's)


@pytest.mark.parametrize("world,workers,remainder", [(2, 1, "drop"), (2, 2, "drop"), (3, 1, "drop"),
                                                      (3, 2, "pad"), (2, 2, "pad")])
def test_rank_and_worker_split_cover_the_epoch(build, world, workers, remainder):
    src = D.open_source(shards=str(build))
    weights = {"detA": 1.0, "reidB": 1.0, "reidC": 1.0}
    B = 2
    plan = D.equalize(D.epoch_plan(src, weights, 1, 0), world, B, remainder)
    step = world * B
    assert len(plan) == (18 + -18 % step if remainder == "pad" else 18 - 18 % step)
    seen, counts = [], []
    for rank in range(world):
        batches = D.rank_batches(len(plan), rank, world, B)
        per_worker = [D.worker_batches(len(batches), 0, w, workers) for w in range(workers)]
        # workers partition the rank's batches, and round-robin restores the order
        merged = [b for rnd in range(max(map(len, per_worker))) for pw in per_worker if rnd < len(pw)
                  for b in [pw[rnd]]]
        assert merged == list(range(len(batches)))
        counts.append(len(batches))
        seen += [pos for b in batches for pos in b]
    assert len(set(counts)) == 1                                      # equal batch counts
    assert sorted(seen) == list(range(len(plan)))                     # union == epoch, no duplicate position
    if remainder == "drop":
        assert len(set(plan)) == len(plan)                            # no sample twice
    else:
        assert len(set(plan)) == 18                                   # padding only repeats


def test_loader_batches_and_worker_invariance(build):
    src = D.open_source(shards=str(build))
    cfg = Cfg(num_workers=0)

    def run(workers, rank, world):
        cfg.num_workers = workers
        loader = D.PretrainLoader(src, cfg, PARAMS, seed=3, rank=rank, world=world)
        n = loader.batches_per_epoch()
        it = iter(loader)
        return [next(it) for _ in range(n)], loader

    single, _ = run(0, 0, 1)
    two, _ = run(2, 0, 1)
    assert [b["keys"] for b in single] == [b["keys"] for b in two]
    assert all(torch.equal(a["view1"]["images"][0], b["view1"]["images"][0]) for a, b in zip(single, two))
    b = single[0]
    assert list(b) == ["view1", "view2", "domain", "labeled", "keys"]
    assert b["domain"].dtype == torch.int64 and b["labeled"].dtype == torch.bool and len(b["keys"]) == 2
    t = b["view1"]["targets"][0]
    assert set(t) == {"boxes", "pids", "track", "ignore"} and t["pids"].dtype == torch.int64
    r0, _ = run(1, 0, 2)
    r1, _ = run(0, 1, 2)
    k0 = [k for x in r0 for k in x["keys"]]
    k1 = [k for x in r1 for k in x["keys"]]
    assert len(r0) == len(r1) and not set(k0) & set(k1)
    # same plan, truncated to a multiple of world*B = 4 (18 -> 16), interleaved over the ranks
    assert sorted(k0 + k1) == sorted([k for x in single for k in x["keys"]][:16])


def test_loader_resume_continues_the_same_order(build):
    src = D.open_source(shards=str(build))
    cfg = Cfg()
    full = D.PretrainLoader(src, cfg, PARAMS, seed=0)
    it = iter(full)
    ref = [next(it)["keys"] for _ in range(13)]                      # crosses an epoch boundary (9/epoch)
    part = D.PretrainLoader(src, cfg, PARAMS, seed=0)
    it = iter(part)
    [next(it) for _ in range(4)]
    state = part.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 4
    resumed = D.PretrainLoader(src, cfg, PARAMS, seed=0)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it)["keys"] for _ in range(9)] == ref[4:]
    assert resumed.epoch == 1
    with pytest.raises(D.DataError, match="world=2"):
        D.PretrainLoader(src, cfg, PARAMS, seed=0, world=2).load_state_dict(state)


def test_group_by_aspect_is_a_permutation_with_single_orientation_batches():
    from hybridps.pretrain.data import group_by_aspect

    rng = np.random.default_rng(0)
    shard_group = [0, 1, 0, 1]
    plan = [(int(s), i, 0) for i, s in enumerate(rng.integers(0, 4, 40))]
    grouped = group_by_aspect(plan, shard_group, step=4)
    assert sorted(grouped) == sorted(plan)
    batches = [grouped[k:k + 4] for k in range(0, 40, 4)]
    mixed = [b for b in batches if len({shard_group[s] for s, _, _ in b}) > 1]
    # at most the left-over tail (< one batch per group) mixes orientations
    assert len(mixed) <= 1
    assert group_by_aspect(plan, shard_group, 4) == grouped           # pure
    with pytest.raises(Exception, match="multiple"):
        group_by_aspect(plan[:-1], shard_group, 4)
