"""A markdown table of run directories' top-1/top-5 next to the published numbers of the same
dataset, recipe, student and teacher (the released code's README, the paper's Tables 1-3 and
Figure 3(a)'s ablation columns), a table of CelebA-Spoof runs' EER beside Table 4's, and
optionally a PNG of top-1 per epoch. Detection runs (``python -m cakd.detection``) get a table of
their own: the last epoch's box AP and mask AP beside the paper's Table 4 row.

    python scripts/summarize.py runs/baseline runs/logits runs/cakd [--plot top1.png]

Each run is read from ``metrics.jsonl`` or, when that is missing, from its TensorBoard scalars
(``val/acc1``, ``val/acc5``, ``val/ema_acc1``, ``val/ema_acc5``); an epoch logged twice (a run
resumed from an earlier checkpoint) counts once, with its last value. The recipe and length
come from the run's ``config.yaml`` (student and teacher default to the recipes' ResNet-50 and
ViT-B/16, the dataset to ImageNet). "best" is the maximum over epochs of each column on its
own; "final" is the last evaluated epoch's.

Runs whose ``config.yaml`` agree on every flag but ``--seed`` (and the output folder), such as
``SEEDS="0 1 2 3 4" sh experiments/run_cakd_paper.sh``'s ``seed_N`` folders, make one row: the
mean ± sample standard deviation of each number over the runs, and their count n.
"""
import argparse
import glob
import os
import sys

import yaml

from cakd.detection.published import COLUMNS, METRIC, TABLE4
from cakd.train.config import HelpFormatter
from cakd.train.report import UserError, run_and_report
from cakd.train.figures import pyplot, save
from cakd.train.metrics_file import read_metrics
from cakd.train.published import PAPER, figure3, figure3_column, published, published_eer
from cakd.train.scriptkit import DEFAULTS

METRICS = ("acc1", "acc5", "ema_acc1", "ema_acc5")
SPOOF_METRICS = ("eer", "auc", "acer", "ema_eer")  # --dataset celeba_spoof runs (Table 4, anti-spoofing)
DETECTION_METRICS = ("bbox_AP", "segm_AP")  # the detection trainer's (cakd.detection)


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Markdown table of runs' top-1/top-5 (student and EMA) beside the published numbers",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl or tensorboard/, and config.yaml)")
    p.add_argument("--plot", default=None, help="also draw top-1 per epoch of every run into this PNG, with matplotlib (default: none)")
    p.add_argument("--plot-size", default="800x480", help="WIDTHxHEIGHT of the plot in pixels (default: 800x480)")
    return p


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
def read_metrics_file(path):
    """``{epoch: {metric: value}}`` from a run's ``metrics.jsonl`` (:func:`read_metrics`)."""
    by_epoch = {}
    for record in read_metrics(path):
        values = {k: record[k] for k in METRICS + SPOOF_METRICS + DETECTION_METRICS if record.get(k) is not None}
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserError(f"{path}: epoch {record['epoch']}'s {key} is {value!r}, not a number: fix or remove that line")
        by_epoch[record["epoch"]] = {k: float(v) for k, v in values.items()}
    return by_epoch


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_epoch = {}
    for events in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")), key=os.path.getmtime):
        accumulator = EventAccumulator(events, size_guidance={"scalars": 0})  # 0: keep every value
        accumulator.Reload()
        tags = set(accumulator.Tags()["scalars"])
        for name in METRICS + SPOOF_METRICS:
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
        if not isinstance(config, dict):
            raise UserError(f"{config_path} holds a YAML {type(config).__name__}, not the mapping of flags a run writes")
    return {
        "name": run_dir.rstrip("/"),
        "config": config,
        "source": source,
        "recipe": config.get("recipe"),
        "epochs": config.get("epochs"),
        "model": config.get("model", DEFAULTS["model"]),
        "teacher": config.get("teacher", DEFAULTS["teacher"]),
        "dataset": config.get("dataset"),
        "data_path": config.get("data_path"),
        "by_epoch": dict(sorted(by_epoch.items())),
    }


def other_data(run):
    """Why the published numbers do not apply to ``run`` (synthetic data, an image folder that is
    not ImageNet's 1000 classes), or None when they do or its folder is not there to count."""
    if run["dataset"] == "synthetic":
        return "synthetic data"
    train = os.path.join(run["data_path"] or "", "train")
    if run["dataset"] in (None, "imagefolder") and run["data_path"] and os.path.isdir(train):
        classes = sum(entry.is_dir() for entry in os.scandir(train))
        if classes != 1000:
            return f"a {classes}-class image folder, not ImageNet"
    return None


def published_for(run):
    """The published numbers of ``run``'s dataset, recipe and pair, none for other data. An
    ImageNet run of one of Figure 3's ablation columns gets the figure's number: C2 and C3 (with
    C4, C3 evaluated with noise) instead of Table 2's CAKD cell, C6 also C5 (evaluated with noise)."""
    if other_data(run):
        return []
    numbers = published(run["dataset"], run["recipe"], run["model"], run["teacher"])
    column = figure3_column(run["config"]) if run["dataset"] in (None, "imagefolder", "imagenet") else None
    if column in ("C2", "C3"):
        numbers = []
    if column in ("C2", "C3", "C6"):
        figure = figure3(run["model"], run["teacher"], column)
        numbers = numbers + [(f"{PAPER} Figure 3 {label}", top1, None) for label, top1 in figure if label != "C6"]
    return numbers


def best_and_final(run, metric):
    values = [(epoch, record[metric]) for epoch, record in run["by_epoch"].items() if metric in record]
    if not values:
        return None, None
    return max(value for _, value in values), values[-1][1]


NOT_COMPARED = ("seed", "output_dir", "resume")  # flags that may differ between the runs of one setting


def group_by_setting(runs):
    """Runs whose ``config.yaml`` agree on every flag but :data:`NOT_COMPARED` (the paper's 5
    seeds of one setting), in order of first appearance; a run without ``config.yaml`` stays alone."""
    groups = {}
    for run in runs:
        setting = {k: v for k, v in run["config"].items() if k not in NOT_COMPARED}
        key = yaml.safe_dump(setting, sort_keys=True) if run["config"] else run["name"]
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var**0.5


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
def number(value):
    return "–" if value is None else f"{value:.2f}"


def spread(values):
    """``mean ± std`` of a group's values (a lone value as it is)."""
    if len(values) == 1:
        return number(values[0])
    return "{} ± {}".format(*(number(v) for v in mean_std(values)))


def table(runs):
    """One row a setting: a lone run's numbers, or a group's mean ± std over its runs (n in the
    run column)."""
    header = ["run", "recipe", "student <- teacher", "epochs", "top-1 best / final", "top-5 best / final",
              "EMA top-1 best / final", "EMA top-5 best / final", "published top-1 / top-5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 5) + "|"]
    for group in group_by_setting(runs):
        run = group[0]
        done = sorted({len(r["by_epoch"]) for r in group})
        done = "/".join(map(str, done)) if len(done) > 1 else str(done[0])
        epochs = f"{done}/{run['epochs']}" if run["epochs"] else done
        pair = run["model"] if run["recipe"] == "baseline" else f"{run['model']} <- {run['teacher']}"
        name = run["name"] if len(group) == 1 else f"{', '.join(r['name'] for r in group)} (n={len(group)}, mean ± std)"
        cells = [name, run["recipe"] or "?", pair, epochs]
        for metric in METRICS:
            pairs = [best_and_final(r, metric) for r in group]
            pairs = [p for p in pairs if p[0] is not None]
            cells.append("–" if not pairs else f"{spread([b for b, _ in pairs])} / {spread([f for _, f in pairs])}")
        numbers = published_for(run)
        unlike = f"– ({other_data(run)}: no published number applies)" if other_data(run) else "–"
        cells.append("; ".join(f"{source} {number(top1)} / {number(top5)}" for source, top1, top5 in numbers) or unlike)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spoof_table(runs):
    """Table 4's anti-spoofing rows: each CelebA-Spoof run's EER (best: the lowest; and final),
    its final AUC and ACER, and the paper's EER of its cell beside them."""
    header = ["run", "recipe", "student <- teacher", "epochs", "EER % best / final", "AUC final", "ACER % final",
              "EMA EER % best / final", "paper EER % (Table 4)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 5) + "|"]
    for run in runs:
        pair = run["model"] if run["recipe"] == "baseline" else f"{run['model']} <- {run['teacher']}"
        epochs = f"{len(run['by_epoch'])}/{run['epochs']}" if run["epochs"] else str(len(run["by_epoch"]))
        cells = [run["name"], run["recipe"] or "?", pair, epochs]
        for metric in ("eer", "auc", "acer", "ema_eer"):
            values = [record[metric] for record in run["by_epoch"].values() if metric in record]
            if not values:
                cells.append("–")
            elif metric in ("eer", "ema_eer"):
                cells.append(f"{number(min(values))} / {number(values[-1])}")
            else:
                cells.append(f"{values[-1]:.4f}" if metric == "auc" else number(values[-1]))
        paper = published_eer(run["recipe"], run["model"], run["teacher"])
        cells.append(f"{paper[1]:.1f}, {paper[0]}" if paper else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------------------------
def labels(runs):
    """Each run's folder name (its whole path where two folders share a name)."""
    names = [os.path.basename(run["name"]) or run["name"] for run in runs]
    return [name if names.count(name) == 1 else run["name"] for name, run in zip(names, runs)]


def plot(runs, width, height):
    """Top-1 per epoch of each run (solid: student, dotted: EMA; a marker on every epoch, so a
    one-epoch run shows), each run's published top-1 (the paper's where there is one; none for
    other data) as a dashed line in its colour, the legend beside the axes, off the curves;
    returns the figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(width / 100, height / 100), layout="constrained")
    series = []  # (points, style, colour, label, metric) of each curve; a run's published line after its curves
    for run, name, colour in zip(runs, labels(runs), plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(runs)):
        for metric, style, label in (("acc1", "-o", name), ("ema_acc1", ":s", f"{name} (EMA)")):
            points = [(epoch, record[metric]) for epoch, record in run["by_epoch"].items() if metric in record]
            if points:
                series.append((points, style, colour, label, metric))
        numbers = published_for(run)
        if numbers:
            series.append((None, *next((n for n in numbers if n[0] == "paper"), numbers[0])[:2], colour, name))
    if not any(points for points, *_ in series):
        raise UserError("no top-1 values to plot")
    single = [i for i, (points, *_) in enumerate(series) if points and len(points) == 1]  # one-epoch curves: a marker
    step = min(0.6 / len(single), 0.15) if single else 0
    for i, entry in enumerate(series):
        if entry[0] is None:
            _, source, top1, colour, name = entry
            ax.axhline(top1, color=colour, linestyle="--", linewidth=1.2, label=f"{name}: {source} {top1:.2f}")
            continue
        points, style, colour, label, metric = entry
        if i in single:  # side by side around their epoch, not drawn over each other
            offset = (single.index(i) - (len(single) - 1) / 2) * step
            points = [(epoch + offset, value) for epoch, value in points]
        ax.plot(*zip(*points), style, color=colour, label=label, markersize=4, linewidth=1.5 if metric == "acc1" else 1,
                markerfacecolor=colour if metric == "acc1" else "none")
    epochs = [epoch for points, *_ in series if points for epoch, _ in points]
    ax.xaxis.get_major_locator().set_params(integer=True)
    if max(epochs) - min(epochs) < 2:  # a short run: its whole epochs on the axis, not ticks from -0.04 to 0.04
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_xticks(range(min(epochs), max(epochs) + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("top-1 per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the axes
    return fig


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--plot-size {text!r} is not WIDTHxHEIGHT, e.g. 800x480") from None
    if width < 200 or height < 150:
        raise UserError(f"--plot-size {text} is too small: at least 200x150")
    return width, height


def detection_table(runs):
    """Detection runs (``python -m cakd.detection``): the last epoch's box AP (and mask AP) beside
    the paper's Table 4 row of the same detector and backbone (its four columns)."""
    header = ["run", "detector", "backbone (weights)", "epochs", "box AP final", "mask AP final", "Table 4 metric",
              "paper: " + " / ".join(COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 2 + ["---"] * 2) + "|"]
    for run in runs:
        config, final = run["config"], list(run["by_epoch"].values())[-1] if run["by_epoch"] else {}
        detector, backbone = config.get("detector"), config.get("backbone")
        row = TABLE4.get((detector, backbone))
        cells = [run["name"], detector, f"{backbone} ({config.get('backbone_weights')})", f"{len(run['by_epoch'])}/{config.get('epochs')}",
                 number(final.get("bbox_AP")), number(final.get("segm_AP")), METRIC.get(detector, "–"),
                 " / ".join(f"{v:.1f}" for v in row) if row else "– (not a Table 4 backbone)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args):
    size = parse_size(args.plot_size) if args.plot else None
    runs = [read_run(run_dir) for run_dir in args.runs]
    detection = [r for r in runs if "detector" in r["config"]]
    runs = [r for r in runs if "detector" not in r["config"]]
    if detection:
        print(detection_table(detection))
        print("\npublished: the paper's Table 4 (COCO, AP in %), its four columns for the run's detector and backbone; "
              "box AP is Faster R-CNN's number, mask AP Mask R-CNN's" + ("\n" if runs else ""))
    if not runs:
        return
    spoof = [r for r in runs if r["dataset"] == "celeba_spoof"]
    if spoof:
        print("Table 4, face anti-spoofing on CelebA-Spoof (EER %, lower is better):\n" + spoof_table(spoof) + "\n")
    print(table(runs))
    print("\npublished: the released code's README (ImageNet val, the released recipes) and the paper's Tables 1-3, "
          "for the run's dataset, recipe, student and teacher (a run of another length is not comparable; "
          "a run on other data, e.g. a generated image folder, gets none)")
    if args.plot:
        save(plot(runs, *size), args.plot)
        print(f"\nwrote {args.plot} ({size[0]}x{size[1]} px): top-1 per epoch of each run, its EMA dotted, published top-1 dashed")


def main(argv=None):
    return run_and_report(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
