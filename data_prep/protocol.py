"""Person-search test protocol, as plain data (what an evaluator needs).

Produced by ``load_protocol`` of the person-search formats (cuhk_sysu, prw,
posetrack21); consumed by ``finetune``'s evaluator.  Boxes are xyxy floats in
original-image pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .record import ImageRef


@dataclass
class Query:
    index: int                   # position in the protocol's query order
    image_key: str               # Record.key of the image the query box is in
    image: ImageRef
    box: list[float]             # the query person's GT box (xyxy)
    pid: int                     # identity in the test label space
    camera: int | None = None


@dataclass
class GalleryImage:
    key: str                     # Record.key (same key as the test-split Record)
    image: ImageRef
    boxes: list[list[float]]     # all GT person boxes (xyxy)
    pids: list[int]              # per box: test identity, or -1 unlabeled
    camera: int | None = None


@dataclass
class Protocol:
    dataset: str
    queries: list[Query]
    gallery: list[GalleryImage]  # the full test gallery, canonical order
    # CUHK-SYSU: per query, the protocol gallery as (image key, gt box or None)
    # in file order (positives first).  None => every gallery image except the
    # query's own image is searched (PRW, PoseTrack21), GT from pids.
    per_query_gallery: list[list[tuple[str, list[float] | None]]] | None = None
    gallery_size: int | None = None
    notes: dict = field(default_factory=dict)
    # Named query subsets (CUHK-SYSU's occlusion and low-resolution queries):
    # name -> positions in ``queries``.  Empty when the dataset defines none or
    # its subset files are absent (``notes["query_subsets"]`` then says which).
    query_subsets: dict[str, list[int]] = field(default_factory=dict)
