"""COCO evaluation with pycocotools, exact across ranks: every rank's detections are gathered,
each image is counted once, and one ``COCOeval`` per kind (``bbox``, ``segm``) runs on the whole set.

Detections are given per image as the detector returns them (``boxes`` xyxy in the image's own
pixels, ``scores``, ``labels`` = category ids, ``masks`` (N, 1, H, W) probabilities for Mask R-CNN).
"""
import contextlib
import copy
import io

import numpy as np
import torch

from ..train.distributed import all_gather_object, is_main_process

# COCOeval.stats' first six entries, in order
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco(image_id, output, with_masks):
    """One image's detections as COCO result dicts (boxes xywh; masks thresholded at 0.5, as RLE)."""
    boxes = output["boxes"].detach().float().cpu()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores, labels = output["scores"].tolist(), output["labels"].tolist()
    results = [{"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
               for box, score, label in zip(xywh, scores, labels)]
    if with_masks:
        from pycocotools import mask as mask_util

        masks = (output["masks"].detach().cpu() > 0.5)[:, 0].numpy()
        for result, mask in zip(results, masks):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            result["segmentation"] = rle
    return results


def gather(detections):
    """Every rank's ``{image_id: [coco results]}`` merged, on every rank (an image seen twice, as a
    padded sampler would, counts once)."""
    merged = {}
    for part in all_gather_object(detections):
        for image_id, results in part.items():
            merged.setdefault(image_id, results)
    return merged


def coco_ap(coco_gt, results, iou_type, image_ids):
    """``{AP, AP50, AP75, APs, APm, APl}`` in percent of ``results`` against ``coco_gt`` over
    ``image_ids``; pycocotools' printout is returned as text too. No detections at all: AP 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(STATS, 0.0), f"{iou_type}: no detections\n"
    drop = "segmentation" if iou_type == "bbox" else "bbox"  # as the reference: segm areas and boxes come from the masks
    results = [{key: value for key, value in r.items() if key != drop} for r in results]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: 100.0 * float(value) for name, value in zip(STATS, evaluator.stats)}, text.getvalue()


def evaluate_detections(coco_gt, detections, iou_types, image_ids=None):
    """Metrics of ``detections`` (``{image_id: [coco results]}`` of this rank) over every rank:
    ``{"bbox_AP": ..., "segm_AP50": ...}``. Computed on rank 0 and shared, so every rank returns
    the same numbers. ``image_ids``: the images evaluated (default: every image gathered)."""
    merged = gather(detections)
    ids = sorted(merged) if image_ids is None else sorted(image_ids)
    metrics, text = {}, ""
    if is_main_process():
        coco_gt = copy.deepcopy(coco_gt)  # COCOeval turns the ground truth's polygons into RLE in place
        results = [r for image_id in sorted(merged) for r in merged[image_id]]
        for iou_type in iou_types:
            stats, printed = coco_ap(coco_gt, results, iou_type, ids)
            metrics.update({f"{iou_type}_{name}": value for name, value in stats.items()})
            text += f"IoU metric: {iou_type}\n{printed}"
    metrics, text = all_gather_object((metrics, text))[0]
    return metrics, text
