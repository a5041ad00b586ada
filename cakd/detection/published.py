"""The paper's Table 4 detection rows (docs/paper.md): box AP of Faster R-CNN and mask AP of
Mask R-CNN on COCO, by backbone, in its four columns."""

COLUMNS = ("Baseline", "Logits (T = ResNet152x2)", "Logits (T = ViT-L/16)", "CAKD (T = ViT-L/16)")
# (detector, backbone) -> the four columns' AP; the metric Table 4 reports for that detector
TABLE4 = {
    ("fasterrcnn", "resnet50"): (34.5, 35.0, 34.9, 35.5),
    ("fasterrcnn", "resnet101"): (37.1, 37.7, 37.4, 38.1),
    ("fasterrcnn", "resnext101_32x8d"): (39.2, 39.8, 39.6, 40.3),
    ("maskrcnn", "resnet50"): (32.6, 33.3, 33.1, 33.6),
    ("maskrcnn", "resnet101"): (33.9, 34.5, 34.2, 34.8),
    ("maskrcnn", "resnext101_32x8d"): (35.1, 35.5, 35.3, 35.9),
}
METRIC = {"fasterrcnn": "bbox_AP", "maskrcnn": "segm_AP"}
