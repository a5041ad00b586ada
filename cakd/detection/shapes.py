"""A small COCO-format set made on the spot: coloured shapes on noise, in COCO 2017's layout.

``python -m cakd.detection.shapes DIR`` writes ``DIR/train2017/``, ``DIR/val2017/`` and
``DIR/annotations/instances_{train,val}2017.json`` (boxes and polygon masks; categories
rectangle, ellipse, triangle), so the detection trainer and pycocotools run end to end without COCO.
Each shape is drawn from the very polygon its annotation holds: the mask is exact.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]


def polygon(kind, cx, cy, w, h, rng):
    """The shape's outline as [(x, y), ...] in pixels."""
    if kind == 1:
        return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    if kind == 2:
        return [(cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    top = cx + rng.uniform(-w / 2, w / 2)
    return [(top, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]


def area(points):
    """Shoelace area of a polygon."""
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def make_split(root, split, count, size, rng, first_id=1):
    """``count`` images of ``size`` px a side with 1-3 shapes each; returns the COCO dict."""
    folder = os.path.join(root, f"{split}2017")
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for n in range(count):
        image_id = first_id + n
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 2 + 32
        picture = Image.fromarray(noise)
        draw = ImageDraw.Draw(picture)
        for _ in range(rng.integers(1, 4)):
            kind = int(rng.integers(1, 4))
            w, h = rng.uniform(0.2, 0.45, 2) * size
            cx, cy = rng.uniform(w / 2 + 1, size - w / 2 - 1), rng.uniform(h / 2 + 1, size - h / 2 - 1)
            points = [(round(x, 1), round(y, 1)) for x, y in polygon(kind, cx, cy, w, h, rng)]
            draw.polygon(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": kind, "iscrowd": 0,
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], "area": area(points),
                "segmentation": [[c for p in points for c in p]],
            })
        name = f"{image_id:012d}.jpg"
        picture.save(os.path.join(folder, name), quality=95)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump(coco, f)
    return coco


def make_shapes(root, train=48, val=16, size=96, seed=0):
    """Write the whole set into ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    make_split(root, "train", train, size, rng)
    make_split(root, "val", val, size, rng, first_id=10000)
    return root


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cakd.detection.shapes", description=__doc__.splitlines()[0])
    p.add_argument("root", help="folder to write (COCO 2017 layout)")
    p.add_argument("--train", default=48, type=int, help="training images (default: 48)")
    p.add_argument("--val", default=16, type=int, help="validation images (default: 16)")
    p.add_argument("--size", default=96, type=int, help="image side in pixels (default: 96)")
    p.add_argument("--seed", default=0, type=int, help="seed (default: 0)")
    args = p.parse_args(argv)
    make_shapes(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} + {args.val} images of shapes to {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
