"""Table 4: torchvision's Faster / Mask R-CNN on a distilled ResNet backbone, COCO data and
pycocotools evaluation, trained on cakd.train's run machinery (``python -m cakd.detection``)."""
