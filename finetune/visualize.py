"""A PNG of top-ranked search results: one row per query, the query crop
first, then the top-k gallery images with the ranked box drawn in green
(correct) or red (wrong) and its similarity written above."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from data_prep.imageio import ImageError, decode_rgb, load_encoded

GREEN, RED, BLUE = (40, 200, 60), (230, 40, 40), (40, 110, 240)
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
