"""Stage 1 of a build: enumerate records with the parsers (annotations only),
apply ``--limit`` subsets and allocate global ids.  No image is read here."""
from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from ..formats import FORMATS, get_format
from ..identity import IdBlock, global_ids_for, labeled_ids, pseudo_count
from ..record import Fix, Record, Skip, check_record
from .options import BuildError, BuildOptions
from .spill import RecordSpill, load_record

SUBSET_FILE = "subset_keys.txt"


@dataclass
class SplitPlan:
    """One split's records (streamed from a :class:`RecordSpill`, never all in
    memory), what the parser skipped or fixed, and how ids are drawn for it."""

    dataset: str
    split: str
    spill: RecordSpill = field(default_factory=RecordSpill)
    skipped: Counter = field(default_factory=Counter)     # parser-stage skips by reason
    fixed: Counter = field(default_factory=Counter)
    subset: dict | None = None                            # {"n", "seed", "keys"} under --limit
    # filled by finalize() / plan_build():
    records_sha: str = ""
    pseudo: int = 0                                       # fresh pseudo ids the records draw
    labels: set = field(default_factory=set)              # (space, local id) pairs that get labeled ids
    labeled_flags: set = field(default_factory=set)
    block: IdBlock | None = None
    pseudo_start: int = 0                                 # block.num_pseudo before this split

    @property
    def n(self) -> int:
        return len(self.spill)

    def finalize(self, id_spaces: dict[str, str]) -> None:
        """One pass over the kept records: their digest, the ids they need."""
        h = hashlib.sha256()
        for line in self.spill.lines():
            h.update(line)
            rec = load_record(line)
            self.pseudo += pseudo_count(rec)
            self.labels.update(labeled_ids([rec], id_spaces))
            self.labeled_flags.add(rec.labeled)
        self.records_sha = h.hexdigest()

    def items(self, start: int = 0) -> Iterator[tuple[int, Record, list[int]]]:
        """``(index, record, global id per box)`` from ``start`` on, streamed."""
        b = self.block
        cursor = IdBlock(b.dataset, b.lo, b.num_labeled, self.pseudo_start, b.label_map, b.id_spaces)
        for i, rec in enumerate(self.spill.records()):
            pids = global_ids_for(rec, cursor)
            if i >= start:
                yield i, rec, pids

    def plan_sha(self) -> str:
        """Digest of everything the shards of this split are made from; a
        resume refuses to continue if the annotations changed meanwhile.  The
        records plus what fixes their global ids (block, label map, where this
        split's pseudo ids start)."""
        b = self.block
        ids = hashlib.sha256(json.dumps([b.lo, b.num_labeled, self.pseudo_start,
                                         sorted(b.label_map.items())]).encode()).hexdigest()
        return hashlib.sha256(f"{self.records_sha}/{ids}".encode()).hexdigest()


@dataclass
class DatasetPlan:
    name: str
    domain: int
    module: ModuleType
    root: Path
    splits: list[SplitPlan]
    block: IdBlock | None = None

    @property
    def task(self) -> str:
        return self.module.TASK

    @property
    def labeled(self) -> bool:
        """The format's LABELED, unless its records say otherwise (e.g.
        LUPerson-NL pids switched on with a format option)."""
        flags = {f for sp in self.splits for f in sp.labeled_flags}
        return flags.pop() if len(flags) == 1 else bool(self.module.LABELED or flags)

    def close(self) -> None:
        for sp in self.splits:
            sp.spill.close()


# --------------------------------------------------------------------------- checks
def load_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise BuildError(f"unknown dataset {name!r}; known: {', '.join(FORMATS)}")
    try:
        return get_format(name)
    except ModuleNotFoundError as e:
        raise BuildError(f"dataset {name!r}: its parser data_prep/formats/{name}.py is not available ({e})") from None


def resolve_splits(opts: BuildOptions) -> dict[str, tuple[str, ...]]:
    """Requested splits per source (default: the format's DEFAULT_SPLITS), checked."""
    names = [n for n, _ in opts.sources]
    for extra in set(opts.splits) - set(names):
        raise BuildError(f"--split {extra}=...: {extra!r} is not a --source")
    out = {}
    for name in names:
        mod = load_module(name)
        splits = tuple(opts.splits.get(name) or mod.DEFAULT_SPLITS)
        bad = [s for s in splits if s not in mod.SPLITS]
        if bad:
            raise BuildError(f"{name}: unknown split(s) {', '.join(bad)}; known: {', '.join(mod.SPLITS)}")
        if len(set(splits)) != len(splits):
            raise BuildError(f"{name}: split listed twice in {','.join(splits)}")
        out[name] = splits
    return out


def check_sources(opts: BuildOptions) -> None:
    seen = set()
    if not opts.sources:
        raise BuildError("nothing to build: give at least one --source NAME=ROOT")
    for name, root in opts.sources:
        if name in seen:
            raise BuildError(f"--source {name} given twice")
        seen.add(name)
        load_module(name)
        if not Path(root).is_dir():
            raise BuildError(f"--source {name}={root}: no such directory")
    for flag, table in (("--limit", opts.limits), ("--format-option", opts.format_options)):
        for extra in set(table) - seen:
            raise BuildError(f"{flag} {extra}...: {extra!r} is not a --source")
    for name, n in opts.limits.items():
        if n < 0:
            raise BuildError(f"--limit {name}={n}: must be >= 0")


def check_format_options(mod: ModuleType, name: str, root: Path, options: dict[str, Any]) -> None:
    try:
        inspect.signature(mod.parse).bind(root, "x", **options)
    except TypeError:
        params = [p for p in list(inspect.signature(mod.parse).parameters)[2:]]
        raise BuildError(
            f"--format-option {name}: unsupported option(s) {', '.join(sorted(options))}; "
            f"{name} accepts: {', '.join(params) or '(none)'}"
        ) from None


# --------------------------------------------------------------------------- enumerate
class StrictSkip(BuildError):
    """--strict was given and an input was skipped."""


def strict_message(dataset: str, split: str, reason: str, source: str, detail: str) -> str:
    where = f" in {source}" if source else ""
    return f"--strict: {dataset}/{split}: {reason}{where}" + (f" ({detail})" if detail else "")


def _parse_items(mod: ModuleType, name: str, root: Path, split: str, options: dict):
    try:
        yield from mod.parse(root, split, **options)
    except BuildError:
        raise
    except Exception as e:  # a parser giving up on the whole split: bad root, unreadable index
        raise BuildError(f"{name}/{split}: parser failed on {root}: {type(e).__name__}: {e}") from None


def enumerate_split(
    mod: ModuleType, name: str, root: Path, split: str, options: dict, strict: bool, spill_dir: Path | None = None
) -> SplitPlan:
    """Run one parser; records in parser order (spilled to disk), skips/fixes
    counted.  Duplicate keys (which would collide in the shards) are skipped as
    ``duplicate_key``."""
    plan = SplitPlan(name, split, RecordSpill(spill_dir))
    for item in _parse_items(mod, name, root, split, options):
        if isinstance(item, Fix):
            plan.fixed[item.reason] += 1
            continue
        if isinstance(item, Record):
            had_boxes = bool(item.boxes)
            for reason, detail in check_record(item):
                if strict:
                    raise StrictSkip(strict_message(name, split, reason, item.source, detail))
                plan.skipped[reason] += 1
            if had_boxes and not item.boxes:
                item = Skip(name, split, "no_person", item.source, "every box was dropped")
        if isinstance(item, Skip):
            if strict:
                raise StrictSkip(strict_message(name, split, item.reason, item.source, item.detail))
            plan.skipped[item.reason] += 1
            continue
        if not isinstance(item, Record):
            raise BuildError(f"{name}/{split}: parser yielded {type(item).__name__}, not Record/Skip/Fix")
        plan.spill.append(item)
    for dup in plan.spill.drop_duplicate_keys():
        if strict:
            raise StrictSkip(strict_message(name, split, "duplicate_key", dup.source, f"key {dup.key!r} seen before"))
        plan.skipped["duplicate_key"] += 1
    return plan


def sampler_for() -> Callable[[list[str], int, int], list[str]]:
    """The LUPerson subset recipe (its parser's ``sample_keys`` when there)."""
    try:
        from ..formats.luperson import sample_keys

        return sample_keys
    except ImportError:
        def sample_keys(keys, n, seed=0):
            ordered = sorted(keys)
            return ordered if n >= len(ordered) else random.Random(seed).sample(ordered, n)

        return sample_keys


def apply_limit(plan: SplitPlan, n: int, seed: int) -> None:
    keep = set(sampler_for()(list(plan.spill.keys()), n, seed))
    plan.spill.keep_only(keep)
    plan.subset = {"n": n, "seed": seed, "keys": sorted(keep)}


def _fast_limit_keys(mod: ModuleType, root: Path, split: str, options: dict, n: int, seed: int) -> list[str] | None:
    """Formats with ``list_keys`` and a ``keys=`` parse option (LUPerson) can be
    subset before parsing, so the unchosen millions are never opened."""
    list_keys = getattr(mod, "list_keys", None)
    if list_keys is None or "keys" not in inspect.signature(mod.parse).parameters or "keys" in options:
        return None
    accepted = inspect.signature(list_keys).parameters
    try:
        keys = list_keys(root, split, **{k: v for k, v in options.items() if k in accepted})
    except Exception as e:
        raise BuildError(f"{mod.NAME}/{split}: listing keys failed on {root}: {type(e).__name__}: {e}") from None
    return sampler_for()(keys, n, seed)


def plan_dataset(name: str, domain: int, root: Path, splits, opts: BuildOptions, log) -> DatasetPlan:
    mod = load_module(name)
    options = dict(opts.format_options.get(name, {}))
    check_format_options(mod, name, root, options)
    plans = []
    for split in splits:
        limit = opts.limits.get(name)
        chosen = None if limit is None else _fast_limit_keys(mod, root, split, options, limit, opts.seed)
        split_opts = options if chosen is None else {**options, "keys": chosen}
        plan = enumerate_split(mod, name, root, split, split_opts, opts.strict, Path(opts.out_dir))
        if limit is not None:
            apply_limit(plan, limit, opts.seed)
        plan.finalize(getattr(mod, "ID_SPACES", {}))
        log(f"  {name}/{split}: {plan.n} records"
            + (f", parser skipped {sum(plan.skipped.values())}" if plan.skipped else ""))
        plans.append(plan)
    return DatasetPlan(name, domain, mod, Path(root), plans)


def plan_build(opts: BuildOptions, splits: dict[str, tuple[str, ...]], log=print) -> tuple[list[DatasetPlan], int]:
    """Enumerate every source and allocate the global id space (the same
    blocks and ids as :func:`data_prep.identity.assign_build` on all records,
    without holding them: each split's ids are drawn when it is streamed)."""
    datasets: list[DatasetPlan] = []
    nxt = 0
    try:
        for d, (name, root) in enumerate(opts.sources):
            ds = plan_dataset(name, d, Path(root), splits[name], opts, log)
            datasets.append(ds)
            labels = sorted({l for sp in ds.splits for l in sp.labels})
            ds.block = IdBlock(name, nxt, num_labeled=len(labels), label_map={l: nxt + k for k, l in enumerate(labels)},
                               id_spaces=dict(getattr(ds.module, "ID_SPACES", {})))
            for sp in ds.splits:
                sp.block, sp.pseudo_start = ds.block, ds.block.num_pseudo
                ds.block.num_pseudo += sp.pseudo
            nxt = ds.block.hi
    except BaseException:
        for ds in datasets:
            ds.close()
        raise
    return datasets, nxt


def subset_file_name(dataset: DatasetPlan, split: str) -> str:
    """``subset_keys.txt`` for a one-split dataset, else one file per split."""
    return SUBSET_FILE if len(dataset.splits) == 1 else f"subset_keys_{split}.txt"
