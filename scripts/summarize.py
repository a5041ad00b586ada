"""A markdown table of run directories' top-1/top-5 next to the published numbers of the same
dataset, recipe, student and teacher (the released code's README, the paper's Tables 1-3), and
optionally a PNG of top-1 per epoch.

    python scripts/summarize.py runs/baseline runs/logits runs/cakd [--plot top1.png]

Each run is read from ``metrics.jsonl`` or, when that is missing, from its TensorBoard scalars
(``val/acc1``, ``val/acc5``, ``val/ema_acc1``, ``val/ema_acc5``); an epoch logged twice (a run
resumed from an earlier checkpoint) counts once, with its last value. The recipe and length
come from the run's ``config.yaml`` (student and teacher default to the recipes' ResNet-50 and
ViT-B/16, the dataset to ImageNet). "best" is the maximum over epochs of each column on its
own; "final" is the last evaluated epoch's.
"""
import argparse
import glob
import json
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a clone without pip install

import torch  # noqa: E402
import torchvision  # noqa: E402
import yaml  # noqa: E402

from cakd.train.published import published  # noqa: E402
from cakd.train.tools import DEFAULTS, UserError, run_and_report  # noqa: E402

METRICS = ("acc1", "acc5", "ema_acc1", "ema_acc5")
# line colours of the plot, with the names printed beside the run directories
PALETTE = [
    ("blue", (31, 100, 200)),
    ("orange", (245, 130, 20)),
    ("green", (30, 160, 60)),
    ("red", (215, 40, 40)),
    ("purple", (140, 80, 190)),
    ("brown", (140, 85, 60)),
    ("pink", (225, 110, 190)),
    ("olive", (150, 160, 30)),
    ("cyan", (20, 180, 200)),
    ("gray", (110, 110, 110)),
]


def get_args_parser():
    p = argparse.ArgumentParser(description="Markdown table of runs' top-1/top-5 (student and EMA) beside the published numbers")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl or tensorboard/, and config.yaml)")
    p.add_argument("--plot", default=None, help="also draw top-1 per epoch of every run into this PNG")
    p.add_argument("--plot-size", default="800x480", help="WIDTHxHEIGHT of the plot in pixels (default: 800x480)")
    return p


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
def read_metrics_file(path):
    by_epoch = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not JSON: a cut-off write? remove that line") from None
            if "epoch" in record:
                by_epoch[int(record["epoch"])] = {k: float(record[k]) for k in METRICS if record.get(k) is not None}
    return by_epoch


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_epoch = {}
    for events in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")), key=os.path.getmtime):
        accumulator = EventAccumulator(events, size_guidance={"scalars": 0})  # 0: keep every value
        accumulator.Reload()
        tags = set(accumulator.Tags()["scalars"])
        for name in METRICS:
            if "val/" + name in tags:
                for event in accumulator.Scalars("val/" + name):
                    by_epoch.setdefault(event.step, {})[name] = float(event.value)
    return by_epoch


def read_run(run_dir):
    """``{"name", "recipe", "epochs", "model", "teacher", "by_epoch": {epoch: {metric: value}}}``."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory {run_dir} does not exist")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        by_epoch, source = read_metrics_file(metrics), "metrics.jsonl"
    else:
        folder = os.path.join(run_dir, "tensorboard")
        folder = folder if os.path.isdir(folder) else run_dir
        by_epoch, source = read_tensorboard(folder), "tensorboard"
        if not by_epoch:
            raise UserError(f"{run_dir} has neither metrics.jsonl nor TensorBoard val/ scalars: is it a cakd run directory?")
    config = {}
    config_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            try:
                config = yaml.safe_load(f) or {}
            except yaml.YAMLError as error:
                raise UserError(f"{config_path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return {
        "name": run_dir.rstrip("/"),
        "source": source,
        "recipe": config.get("recipe"),
        "epochs": config.get("epochs"),
        "model": config.get("model", DEFAULTS["model"]),
        "teacher": config.get("teacher", DEFAULTS["teacher"]),
        "dataset": config.get("dataset"),
        "by_epoch": dict(sorted(by_epoch.items())),
    }


def best_and_final(run, metric):
    values = [(epoch, record[metric]) for epoch, record in run["by_epoch"].items() if metric in record]
    if not values:
        return None, None
    return max(value for _, value in values), values[-1][1]


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def number(value):
    return "–" if value is None else f"{value:.2f}"


def table(runs):
    header = ["run", "recipe", "student <- teacher", "epochs", "top-1 best / final", "top-5 best / final",
              "EMA top-1 best / final", "EMA top-5 best / final", "published top-1 / top-5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 5) + "|"]
    for run in runs:
        done = len(run["by_epoch"])
        epochs = f"{done}/{run['epochs']}" if run["epochs"] else str(done)
        pair = run["model"] if run["recipe"] == "baseline" else f"{run['model']} <- {run['teacher']}"
        cells = [run["name"], run["recipe"] or "?", pair, epochs]
        for metric in METRICS:
            best, final = best_and_final(run, metric)
            cells.append("–" if best is None else f"{number(best)} / {number(final)}")
        numbers = published(run["dataset"], run["recipe"], run["model"], run["teacher"])
        cells.append("; ".join(f"{source} {number(top1)} / {number(top5)}" for source, top1, top5 in numbers) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The plot: axes, grid lines and polylines set pixel by pixel in a uint8 tensor
# ----------------------------------------------------------------------------------------------
def draw_line(canvas, start, end, colour, thickness=2, dash=0):
    """A straight segment from ``start`` to ``end`` ((x, y) pixels); ``dash`` > 0 draws every other
    ``dash`` pixels."""
    (x0, y0), (x1, y1) = start, end
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    t = torch.linspace(0, 1, steps)
    xs, ys = (x0 + t * (x1 - x0)).round().long(), (y0 + t * (y1 - y0)).round().long()
    if dash:
        keep = (torch.arange(steps) // dash) % 2 == 0
        xs, ys = xs[keep], ys[keep]
    _, height, width = canvas.shape
    for dx in range(thickness):
        for dy in range(thickness):
            canvas[:, (ys + dy).clamp(0, height - 1), (xs + dx).clamp(0, width - 1)] = torch.tensor(colour, dtype=torch.uint8)[:, None]


def fill_square(canvas, x, y, size, colour):
    _, height, width = canvas.shape
    x0, y0 = max(int(x) - size // 2, 0), max(int(y) - size // 2, 0)
    canvas[:, y0 : min(y0 + size, height), x0 : min(x0 + size, width)] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]


def y_range(values):
    """Rounded top-1 range and grid step: 10 points, or 5 or 1 for close curves."""
    lo, hi = min(values), max(values)
    step = 10 if hi - lo > 20 else 5 if hi - lo > 5 else 1
    bottom, top = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if top == bottom:
        top = bottom + step if bottom < 100 else top
        bottom = bottom if top > bottom else bottom - step
    return max(bottom, 0), top, step


def plot(runs, width, height):
    """Top-1 per epoch (solid: student, dashed: EMA) of each run; returns (image, description)."""
    canvas = torch.full((3, height, width), 255, dtype=torch.uint8)
    left, right, top, bottom = 40, width - 44, 20, height - 30  # the legend goes right of the axes
    series = []
    for run in runs:
        for metric in ("acc1", "ema_acc1"):
            points = [(epoch, record[metric]) for epoch, record in run["by_epoch"].items() if metric in record]
            series.append(points)
    values = [value for points in series for _, value in points]
    epochs = [epoch for points in series for epoch, _ in points]
    if not values:
        raise UserError("no top-1 values to plot")
    y0, y1, y_step = y_range(values)
    e0, e1 = min(epochs), max(epochs)

    def to_pixel(epoch, value):
        x = left + (right - left) * ((epoch - e0) / (e1 - e0) if e1 > e0 else 0.5)
        y = bottom - (bottom - top) * (value - y0) / (y1 - y0)
        return x, y

    grey = (225, 225, 225)
    for level in range(int(y0), int(y1) + 1, y_step):
        draw_line(canvas, (left, to_pixel(e0, level)[1]), (right, to_pixel(e0, level)[1]), grey, thickness=1)
    epoch_step = max(1, math.ceil((e1 - e0 + 1) / 20))
    for epoch in range(e0, e1 + 1, epoch_step):
        x = to_pixel(epoch, y0)[0]
        draw_line(canvas, (x, bottom), (x, bottom + 5), (0, 0, 0), thickness=1)  # a tick per epoch (or per few)
    draw_line(canvas, (left, top), (left, bottom), (0, 0, 0))
    draw_line(canvas, (left, bottom), (right, bottom), (0, 0, 0))

    legend = []
    for index, run in enumerate(runs):
        name, colour = PALETTE[index % len(PALETTE)]
        for points, dash in ((series[2 * index], 0), (series[2 * index + 1], 6)):
            pixels = [to_pixel(epoch, value) for epoch, value in points]
            for a, b in zip(pixels, pixels[1:]):
                draw_line(canvas, a, b, colour, dash=dash)
            if not dash:
                for x, y in pixels:
                    fill_square(canvas, x, y, 5, colour)
        fill_square(canvas, width - 22, top + 5 + 16 * index, 10, colour)  # legend: one square per run, in order
        legend.append(f"  {index + 1}. {run['name']}: {name} (rgb{colour})")
    description = [
        f"x: epoch {e0}..{e1} (a tick every {epoch_step}), y: top-1 {y0}..{y1} % (grid line every {y_step}); "
        "solid with dots: student, dashed: EMA; legend squares right of the plot, top down:",
        *legend,
    ]
    return canvas, "\n".join(description)


def write_png(image, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():  # torchvision 0.29 marks its PNG encoder deprecated in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        torchvision.io.write_png(image, path)


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--plot-size {text!r} is not WIDTHxHEIGHT, e.g. 800x480") from None
    if width < 120 or height < 80:
        raise UserError(f"--plot-size {text} is too small: at least 120x80")
    return width, height


def run(args):
    size = parse_size(args.plot_size) if args.plot else None
    runs = [read_run(run_dir) for run_dir in args.runs]
    print(table(runs))
    print("\npublished: the released code's README (ImageNet val, the released recipes) and the paper's Tables 1-3, "
          "for the run's dataset, recipe, student and teacher (a run of another length is not comparable)")
    if args.plot:
        image, description = plot(runs, *size)
        write_png(image, args.plot)
        print(f"\nwrote {args.plot} ({size[0]}x{size[1]} px); {description}")


def main(argv=None):
    return run_and_report(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
