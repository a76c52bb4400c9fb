"""The build, top to bottom: check arguments, prepare the output directory,
plan (parsers + ids), verify what a previous run finished, encode images in a
process pool and write shards in order, then write the manifest last."""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .. import manifest as mf
from hybridps.runlog import LOG_NAME, Progress, log_to_folder
from ..imageio import ImageError
from .encode import Dropped, EncodeSettings, Job, Sample, init_worker, reload_passthrough, run_job
from .files import TMP_SUFFIX, atomic_write_bytes, atomic_write_json
from .options import MAX_CANVAS_SIDE, MAX_SIDE_LIMIT, BuildError, BuildOptions, fingerprint
from .plan import (DatasetPlan, SplitPlan, StrictSkip, check_sources, load_module, plan_build, resolve_splits,
                   strict_message, subset_file_name)
from .shards import (JOURNAL_NAME, LEGACY_JOURNAL_NAME, Counts, Journal, ShardEntry, ShardSink, SplitProgress,
                     journal_shard_paths, shard_name)

_logger = logging.getLogger(__name__)
STATE_NAME = "build.json"
# Test hook: stall (sleep) right after the Nth sample is written, with the
# shard's .tmp flushed, so a test can SIGKILL a build at a known point.
STALL_ENV = "HYBRIDPS_BUILD_STALL_AFTER"
# Jobs in flight per worker, in chunks, with a process pool (bounds the builder's memory).
WINDOW_CHUNKS = 16


# --------------------------------------------------------------------------- output dir
LOCK_NAME = ".build.lock"
# Names a build gives its own files; anything else in OUT (a user's .tar,
# .tmp or notes) is never removed, --overwrite or not.
_SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
_SHARD_TMP_RE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar" + re.escape(TMP_SUFFIX) + "$")
_SUBSET_RE = re.compile(r"^subset_keys(_[A-Za-z0-9_]+)?\.txt$")


def _recorded_shards(out: Path, ds_dir: Path) -> set[str]:
    """Names of the shards in ``ds_dir`` that a previous build recorded in its
    journal or manifest (whatever its fingerprint)."""
    import json

    paths = journal_shard_paths(ds_dir / JOURNAL_NAME) + journal_shard_paths(ds_dir / LEGACY_JOURNAL_NAME)
    try:
        m = json.loads((out / mf.MANIFEST_NAME).read_text())
        for entry in m.get("datasets", {}).get(ds_dir.name, {}).get("splits", {}).values():
            paths += [s.get("path", "") for s in entry.get("shards", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return {Path(p).name for p in paths if isinstance(p, str) and Path(p).parent.name == ds_dir.name}


def _our_tmp_files(ds_dir: Path) -> list[Path]:
    """Temporary files under names only a build uses (a killed run's leftovers)."""
    return [p for p in ds_dir.glob("*" + TMP_SUFFIX)
            if _SHARD_TMP_RE.match(p.name) or p.name in (JOURNAL_NAME + TMP_SUFFIX, LEGACY_JOURNAL_NAME + TMP_SUFFIX)
            or _SUBSET_RE.match(p.name[:-len(TMP_SUFFIX)])]


def _our_files(out: Path, ds_dir: Path) -> list[Path]:
    recorded = _recorded_shards(out, ds_dir)
    files = [p for p in ds_dir.glob("*.tar") if p.name in recorded and _SHARD_RE.match(p.name)]
    ours = (JOURNAL_NAME, LEGACY_JOURNAL_NAME)
    files += [p for p in ds_dir.iterdir() if p.is_file() and (p.name in ours or _SUBSET_RE.match(p.name))] \
        if ds_dir.is_dir() else []
    return files + _our_tmp_files(ds_dir)


def _clear_previous(out: Path, names: set[str]) -> None:
    """Remove what a build wrote (and nothing else) for ``names``: the shards its
    journal or manifest records, its journal and subset lists, its own .tmp names."""
    from ..formats import FORMATS

    for name in names & set(FORMATS):  # names read back from build.json: never trust them as paths
        if (out / name).is_dir():
            for p in _our_files(out, out / name):
                p.unlink(missing_ok=True)
    for p in (out / mf.MANIFEST_NAME, out / STATE_NAME):
        p.unlink(missing_ok=True)


@contextmanager
def out_dir_lock(out: Path) -> Iterator[None]:
    """One build per OUT at a time: two would write the same ``.tar.tmp`` files.

    A POSIX record lock (``lockf``), not ``flock``: forked encoder workers
    inherit open files, and an orphaned worker of a SIGKILLed build would keep
    an flock held and block the resume; record locks belong to the process."""
    import errno
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_NAME, "a+")
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise BuildError(f"{out} is being written by another build (lock {out / LOCK_NAME} is held); "
                                 f"wait for it to finish or pick another OUT_DIR") from None
            raise
        yield
    finally:
        handle.close()


def _spec_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) or "(unknown)"


def prepare_out_dir(out: Path, spec: dict, fp: str, overwrite: bool) -> None:
    """Refuse to mix builds; sweep leftovers of a killed run; record the spec."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    names = {n for n, _ in spec["sources"]}
    if state_path.exists():
        try:
            old = json.loads(state_path.read_text())
        except ValueError:
            old = {"fingerprint": None, "spec": {}}
        if old.get("fingerprint") != fp or overwrite:
            if not overwrite:
                raise BuildError(
                    f"{out} holds a build made with different arguments (differs in: "
                    f"{_spec_diff(old.get('spec', {}), spec)}). Re-run with the same arguments to "
                    f"resume, add --overwrite to rebuild, or pick another OUT_DIR."
                )
            _clear_previous(out, names | {n for n, _ in old.get("spec", {}).get("sources", [])})
    elif any(p.name not in (LOCK_NAME, LOG_NAME) for p in out.iterdir()):
        if not overwrite:
            raise BuildError(f"{out} is not empty and holds no data_prep build; pick an empty OUT_DIR "
                             f"or add --overwrite (only files a build writes are removed)")
        _clear_previous(out, names)
    for name in names:
        (out / name).mkdir(exist_ok=True)
        (out / name / LEGACY_JOURNAL_NAME).unlink(missing_ok=True)   # superseded by progress.jsonl
        for p in _our_tmp_files(out / name):
            p.unlink(missing_ok=True)
    atomic_write_json(state_path, {"fingerprint": fp, "spec": spec})


# --------------------------------------------------------------------------- resume
def resume_split(out: Path, journal: Journal, sp: SplitPlan, log) -> SplitProgress:
    """Keep the journal's shards up to the first one that fails verification."""
    plan_sha = sp.plan_sha()
    prog = journal.splits.get(sp.split)
    if prog is None or not prog.shards and not prog.done:
        return journal.start_split(sp.split, plan_sha)
    if prog.plan != plan_sha:
        raise BuildError(
            f"{sp.dataset}/{sp.split}: the source annotations changed since the interrupted build "
            f"(same arguments, different records); add --overwrite to rebuild"
        )
    good = []
    for entry in prog.shards:
        why = entry.verify(out)
        if why is not None:
            log(f"  {sp.dataset}/{sp.split}: {entry.path} {why}; rewriting from there")
            break
        good.append(entry)
    if len(good) < len(prog.shards):
        return journal.start_split(sp.split, plan_sha, keep=len(good))
    if good:
        log(f"  {sp.dataset}/{sp.split}: {len(good)} finished shard(s) verified"
            + ("" if prog.done else f", resuming at record {good[-1].end}"))
    return prog


def start_index(prog: SplitProgress) -> int:
    return prog.shards[-1].end if prog.shards else 0


# --------------------------------------------------------------------------- workers
@contextmanager
def job_runner(workers: int, settings: EncodeSettings) -> Iterator[Callable]:
    """``run(jobs, n) -> results`` in job order, in-process or over a pool."""
    if workers <= 1:
        init_worker(settings)
        yield lambda jobs, n: map(run_job, jobs)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=init_worker, initargs=(settings,)) as pool:
        def run(jobs, n):
            # Big chunks amortise the per-task IPC; small splits still use every worker.
            chunk = max(1, min(32, n // (4 * workers)))
            # imap alone reads every job up front and queues results the writer has not taken
            # yet: memory would grow with the split.  A window bounds both.
            window = chunk * workers * WINDOW_CHUNKS
            it = iter(jobs)
            while batch := list(itertools.islice(it, window)):
                yield from pool.imap(run_job, batch, chunksize=chunk)

        yield run


# --------------------------------------------------------------------------- writing
class SplitWriter:
    """Consumes encode results for one split, cuts shards, keeps the journal."""

    def __init__(self, out: Path, ds: DatasetPlan, sp: SplitPlan, journal: Journal, opts: BuildOptions):
        self.out, self.ds, self.sp, self.journal, self.opts = out, ds, sp, journal, opts
        self.prog = journal.splits[sp.split]
        self.sink: ShardSink | None = None
        self.counts = Counts()
        self.range_start = start_index(self.prog)

    def _strict(self, reason: str, source: str, detail: str) -> None:
        if self.opts.strict:
            raise StrictSkip(strict_message(self.sp.dataset, self.sp.split, reason, source, detail))

    def _commit(self, end: int) -> None:
        sha, size = self.sink.commit()
        rel = self.sink.final.relative_to(self.out).as_posix()
        self.journal.add_shard(self.sp.split, ShardEntry(rel, self.sink.samples, sha, size, self.range_start, end,
                                                         self.counts))
        self.sink, self.counts, self.range_start = None, Counts(), end

    def add(self, res: Sample | Dropped) -> None:
        if isinstance(res, Dropped):
            self._strict(res.reason, res.source, res.detail)
            self.counts.skipped[res.reason] += 1
            self.counts.fixed.update(res.fixes)
            self.counts.dropped_records.append(res.index)
            return
        if res.jpg is None:
            image, source = res.reload
            try:
                res.jpg = reload_passthrough(image, res.jpg_len)
            except ImageError as e:
                return self.add(Dropped(res.index, e.reason, source, e.detail, res.fixes))
        for reason, source, detail in res.box_skips:
            self._strict(reason, source, detail)
        if self.sink is not None and self.sink.samples >= self.opts.shard_size:
            self._commit(res.index)
        if self.sink is None:
            index = len(self.prog.shards)
            self.sink = ShardSink(self.out / self.ds.name / shard_name(self.sp.split, index))
        self.sink.write(res.key, res.jpg, res.meta)
        self.counts.samples += 1
        self.counts.boxes += res.n_boxes
        self.counts.ignore_regions += res.n_ignore
        self.counts.fixed.update(res.fixes)
        self.counts.skipped.update(r for r, _, _ in res.box_skips)
        self.counts.dropped_boxes += [[res.index, b] for b in res.dropped_boxes]

    def finish(self) -> None:
        if self.sink is not None:
            self._commit(self.sp.n)
        tail = self.counts if self.counts.skipped or self.counts.fixed or self.counts.dropped_records else None
        self.journal.split_done(self.sp.split, tail)
        keep = {Path(s.path).name for s in self.prog.shards}
        for stale in (self.out / self.ds.name).glob(f"{self.sp.split}-*.tar"):
            # left by an older, longer run of the same build; only shard names, never a user's tar
            if stale.name not in keep and _SHARD_RE.match(stale.name):
                stale.unlink()

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None


class _Stall:
    def __init__(self):
        v = os.environ.get(STALL_ENV)
        self.after = int(v) if v else None
        self.written = 0

    def tick(self, writer: SplitWriter) -> None:
        if self.after is None:
            return
        self.written += 1
        if self.written >= self.after:
            if writer.sink is not None:
                writer.sink.flush()
            print(f"[{STALL_ENV}] stalled after {self.written} samples", file=sys.stderr, flush=True)
            time.sleep(3600)


def write_split(out, ds, sp, journal, run, bar, opts, stall: _Stall) -> None:
    prog = journal.splits[sp.split]
    if prog.done:
        return
    first = start_index(prog)
    writer = SplitWriter(out, ds, sp, journal, opts)
    jobs = (Job(i, ds.domain, rec, pids) for i, rec, pids in sp.items(first))
    try:
        for res in run(jobs, sp.n - first):
            bar.update(1)
            writer.add(res)
            if isinstance(res, Sample):
                stall.tick(writer)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------- manifest
def unused_ids(ds: DatasetPlan, journal: Journal) -> int:
    """Ids of the block no written sample carries (records dropped at the image stage)."""
    labeled, pseudo = set(), 0        # pseudo ids are drawn once each: counted, not collected
    first_pseudo = ds.block.lo + ds.block.num_labeled
    for sp in ds.splits:
        totals = journal.splits[sp.split].totals()
        dropped = set(totals.dropped_records)
        dropped_boxes = {(r, b) for r, b in totals.dropped_boxes}
        for i, _, pids in sp.items():
            if i in dropped:
                continue
            for b, p in enumerate(pids):
                if p >= 0 and (i, b) not in dropped_boxes:
                    if p >= first_pseudo:
                        pseudo += 1
                    else:
                        labeled.add(p)
    return ds.block.hi - ds.block.lo - len(labeled) - pseudo


def split_manifest(ds: DatasetPlan, sp: SplitPlan, prog: SplitProgress) -> dict:
    totals = prog.totals()
    skipped = sp.skipped + totals.skipped
    entry = {
        "records": sp.n, "samples": totals.samples, "boxes": totals.boxes,
        "ignore_regions": totals.ignore_regions,
        "skipped": dict(sorted(skipped.items())), "fixed": dict(sorted((sp.fixed + totals.fixed).items())),
        "shards": [{"path": s.path, "samples": s.samples, "sha256": s.sha256} for s in prog.shards],
    }
    if sp.subset is not None:
        entry["subset"] = {"n": sp.subset["n"], "seed": sp.subset["seed"], "count": len(sp.subset["keys"]),
                           "keys_file": f"{ds.name}/{subset_file_name(ds, sp.split)}"}
    return entry


def build_manifest(datasets: list[DatasetPlan], journals: dict[str, Journal], num_ids: int, spec: dict, fp: str) -> dict:
    out = {"version": mf.MANIFEST_VERSION, "num_ids": num_ids, "domains": [d.name for d in datasets],
           "datasets": {}, "options": {**spec, "fingerprint": fp}}
    for ds in datasets:
        out["datasets"][ds.name] = {
            "domain": ds.domain, "task": ds.task, "labeled": ds.labeled,
            "id_range": [ds.block.lo, ds.block.hi], "num_labeled_ids": ds.block.num_labeled,
            "num_pseudo_ids": ds.block.num_pseudo, "unused_ids": unused_ids(ds, journals[ds.name]),
            "license": getattr(ds.module, "LICENSE_NOTICE", ""),
            "splits": {sp.split: split_manifest(ds, sp, journals[ds.name].splits[sp.split]) for sp in ds.splits},
        }
    return out


# --------------------------------------------------------------------------- entry
def write_subset_files(out: Path, datasets: list[DatasetPlan]) -> None:
    for ds in datasets:
        for sp in ds.splits:
            if sp.subset is not None:
                text = "".join(k + "\n" for k in sp.subset["keys"])
                atomic_write_bytes(out / ds.name / subset_file_name(ds, sp.split), text.encode())


def run_build(opts: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Build (or resume) the shards described by ``opts``; returns the manifest."""
    if opts.shard_size < 1:
        raise BuildError(f"--shard-size must be >= 1, got {opts.shard_size}")
    if not 1 <= opts.jpeg_quality <= 100:
        raise BuildError(f"--jpeg-quality must be in 1..100, got {opts.jpeg_quality}")
    if not 1 <= opts.max_pixels <= 1 << 40:
        raise BuildError(f"--max-pixels must be in 1..2**40, got {opts.max_pixels}")
    w, h = opts.canvas.size
    if not (1 <= w <= MAX_CANVAS_SIDE and 1 <= h <= MAX_CANVAS_SIDE):
        raise BuildError(f"--canvas-size {w}x{h}: each side must be in 1..{MAX_CANVAS_SIDE}")
    if opts.max_side is not None:
        if not 16 <= opts.max_side <= MAX_SIDE_LIMIT:
            raise BuildError(f"--max-side must be in 16..{MAX_SIDE_LIMIT}, got {opts.max_side}")
        if opts.canvas.mode != "none" and max(w, h) > opts.max_side:
            raise BuildError(f"--canvas-size {w}x{h} is larger than --max-side {opts.max_side}; "
                             f"baked canvases keep their size: pick a smaller canvas or a larger --max-side")
    check_sources(opts)
    splits = resolve_splits(opts)
    spec = opts.output_spec(splits)
    fp = fingerprint(spec)
    out = Path(opts.out_dir)
    with out_dir_lock(out):
        return _run_locked(opts, out, splits, spec, fp, log)


def _run_locked(opts: BuildOptions, out: Path, splits, spec: dict, fp: str, log) -> dict:
    prepare_out_dir(out, spec, fp, opts.overwrite)
    log_to_folder(out)

    log("planning (annotations only):")
    for name, _ in opts.sources:
        notice = getattr(load_module(name), "LICENSE_NOTICE", "")
        if notice:
            log(f"  licence {name}: {notice}")
    datasets, num_ids = plan_build(opts, splits, log)
    journals = {ds.name: Journal.load(out / ds.name / JOURNAL_NAME, fp) for ds in datasets}
    try:
        return _write_all(opts, out, datasets, journals, num_ids, spec, fp, log)
    finally:
        for ds in datasets:
            journals[ds.name].close()
            ds.close()


def _write_all(opts: BuildOptions, out: Path, datasets: list[DatasetPlan], journals: dict[str, Journal],
               num_ids: int, spec: dict, fp: str, log) -> dict:
    write_subset_files(out, datasets)
    progress = {(ds.name, sp.split): resume_split(out, journals[ds.name], sp, log) for ds in datasets for sp in ds.splits}
    todo = sum(0 if progress[(ds.name, sp.split)].done else sp.n - start_index(progress[(ds.name, sp.split)])
               for ds in datasets for sp in ds.splits)
    settings = EncodeSettings(opts.jpeg_quality, opts.canvas, opts.seed, ship_passthrough=opts.workers <= 1,
                              max_pixels=opts.max_pixels, verify_decode=opts.verify_decode, max_side=opts.max_side)
    stall = _Stall()
    # a bar on a terminal, else a plain line (count, rate, ETA) every HYBRIDPS_LOG_INTERVAL seconds
    with job_runner(opts.workers, settings) as run, Progress(todo, "images", unit="img", logger=_logger,
                                                           show=opts.progress) as bar:
        for ds in datasets:
            for sp in ds.splits:
                write_split(out, ds, sp, journals[ds.name], run, bar, opts, stall)
    manifest = build_manifest(datasets, journals, num_ids, spec, fp)
    mf.write_manifest(out, manifest)
    return manifest
