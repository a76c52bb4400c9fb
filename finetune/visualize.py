"""A PNG of top-ranked search results: one row per query, the query crop
first, then the top-k gallery images with the ranked box drawn in green
(correct) or red (wrong) and its similarity written above."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from hybridps.data_prep.imageio import ImageError, decode_rgb, load_encoded

GREEN, RED, BLUE = (40, 200, 60), (230, 40, 40), (40, 110, 240)
ORANGE = (240, 150, 20)      # a search hit whose correctness nobody knows
CAPTION = 14


def _load(ref) -> Image.Image:
    try:
        payload, fmt = load_encoded(ref)
        return Image.fromarray(decode_rgb(payload, fmt))
    except ImageError:
        # a missing picture should not cost the whole figure
        return Image.new("RGB", (64, 128), (90, 90, 90))


def _fit(img: Image.Image, height: int) -> Image.Image:
    w = max(1, round(img.width * height / max(1, img.height)))
    return img.resize((w, height))


def _tile(img: Image.Image, box, color, caption: str, height: int) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    width = max(2, img.height // 80)
    draw.rectangle([float(v) for v in box], outline=color, width=width)
    img = _fit(img, height)
    # narrow query crops still need room for their caption
    tile = Image.new("RGB", (max(img.width, 7 * len(caption)), height + CAPTION), (255, 255, 255))
    tile.paste(img, (0, CAPTION))
    ImageDraw.Draw(tile).text((2, 1), caption, fill=color)
    return tile


def draw_topk(protocol, metrics, out: str | Path, queries: list[int] | None = None, n_queries: int = 4,
              k: int = 5, height: int = 160) -> Path:
    """Write the figure for ``queries`` (default: the first ``n_queries``,
    mixing hits and misses when both exist) and return its path."""
    refs = {g.key: g.image for g in protocol.gallery}
    if queries is None:
        queries = _pick(metrics, n_queries)
    rows = []
    for qi in queries:
        q = protocol.queries[qi]
        res = metrics.per_query[qi]
        crop = _load(q.image).crop(tuple(int(round(v)) for v in q.box))
        tiles = [_tile(crop, (0, 0, crop.width - 1, crop.height - 1), BLUE, f"query {qi} AP {res.ap:.2f}", height)]
        for hit in res.top[:k]:
            color = GREEN if hit.correct else RED
            tiles.append(_tile(_load(refs[hit.image_key]), hit.box, color, f"{hit.score:.3f} {hit.image_key}", height))
        rows.append(tiles)
    if not rows:
        raise ValueError("no query to draw")
    pad = 4
    width = max(sum(t.width for t in r) + pad * (len(r) + 1) for r in rows)
    canvas = Image.new("RGB", (width, len(rows) * (height + CAPTION + pad) + pad), (235, 235, 235))
    y = pad
    for r in rows:
        x = pad
        for t in r:
            canvas.paste(t, (x, y))
            x += t.width + pad
        y += height + CAPTION + pad
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _pick(metrics, n: int) -> list[int]:
    hits = [q.index for q in metrics.per_query if q.hits.get(1)]
    misses = [q.index for q in metrics.per_query if not q.hits.get(1)]
    picked = hits[: (n + 1) // 2] + misses[: n // 2]
    rest = [q.index for q in metrics.per_query if q.index not in picked]
    return sorted((picked + rest)[:n])


def draw_search(query_image, query_box, gallery_images, hits, out: str | Path, tile: tuple[int, int] = (200, 240),
                names: list[str] | None = None) -> Path:
    """One row: the query crop (blue), then each hit's gallery image with its box
    (orange: no ground truth says whether it is right) and similarity.  Every tile
    is ``tile`` (width, height) plus a caption line, so the figure is ``(pad + (1 + len(hits)) * (width + pad)) x (height + CAPTION + 2 pad)``.

    Images are PIL images (see finetune.api.load_image for turning other inputs into tensors)."""
    pad, (tw, th) = 4, tile
    crop = query_image.crop(tuple(int(round(v)) for v in query_box))
    tiles = [(crop, None, BLUE, "query")]
    for rank, hit in enumerate(hits, 1):
        label = names[hit.gallery] if names else f"gallery {hit.gallery}"
        tiles.append((gallery_images[hit.gallery], hit.box, ORANGE,
                      f"#{rank} {hit.score:.3f} {label}"))
    canvas = Image.new("RGB", (pad + len(tiles) * (tw + pad), th + CAPTION + 2 * pad), (235, 235, 235))
    for i, (img, box, color, caption) in enumerate(tiles):
        img = img.copy()
        if box is not None:
            ImageDraw.Draw(img).rectangle([float(v) for v in box], outline=color, width=max(2, img.height // 80))
        scale = min(tw / max(1, img.width), th / max(1, img.height))
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        cell = Image.new("RGB", (tw, th + CAPTION), (255, 255, 255))
        cell.paste(img, ((tw - img.width) // 2, CAPTION + (th - img.height) // 2))
        ImageDraw.Draw(cell).text((2, 1), caption[: tw // 6], fill=color)
        canvas.paste(cell, (pad + i * (tw + pad), pad))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    canvas.save(tmp, format="PNG")
    tmp.replace(out)
    return out
