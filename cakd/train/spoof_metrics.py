"""Face anti-spoofing metrics of a two-class (0 live, 1 spoof) evaluation: the equal error rate
(EER, the paper's Table 4), the ROC AUC, and APCER / BPCER / ACER at the EER threshold
(ISO/IEC 30107-3's names).

An image's spoof score is its log-odds of spoof, ``z_spoof - z_live`` (the softmax probability of
class 1 in logit units: the same order, without the ties that float rounding makes at 0 and 1);
an image is called a spoof when its score is at least the threshold t. APCER(t), attacks taken
for live faces (false acceptance), is the share of spoofs scoring below t; BPCER(t), live faces
rejected (false rejection), the share of live faces scoring t or more; ACER is their mean. The
thresholds tried are the scores seen (+inf, everything live, ties with the lowest score,
everything spoof, so is never picked); the EER threshold is the one where APCER and BPCER are
closest (a tie: the one with the smaller sum, then the lowest threshold), and the EER is their
mean there, so it equals the ACER at that threshold. AUC: the chance that a spoof scores above a
live face, a tie counting one half. Every test image's score is gathered from every rank first,
so the numbers are those of the whole test set, whatever the number of processes.
"""
import torch

from .distributed import all_gather_object
from .logging import print_main


def spoof_scores(logits):
    """The spoof score of each row of two-class ``logits``: ``z_1 - z_0``, the log-odds of class 1."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]


def antispoof_metrics(scores, labels):
    """``{"eer", "apcer", "bpcer", "acer"}`` in %, ``"auc"`` in [0, 1] and ``"eer_threshold"`` from
    1-d ``scores`` and ``labels`` (0 live, 1 spoof); {} when either class is absent."""
    scores, labels = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    spoofs, lives = int((labels == 1).sum()), int((labels == 0).sum())
    if spoofs == 0 or lives == 0:
        return {}
    values, index = torch.unique(scores, sorted=True, return_inverse=True)  # ascending
    spoof_at = torch.zeros(len(values), dtype=torch.long).index_add_(0, index, (labels == 1).long())
    live_at = torch.zeros(len(values), dtype=torch.long).index_add_(0, index, (labels == 0).long())
    spoof_below = spoof_at.cumsum(0) - spoof_at  # spoofs under threshold values[j]
    live_below = live_at.cumsum(0) - live_at
    # APCER = spoof_below / spoofs and BPCER = live_at_or_above / lives, compared exactly in integers
    # over the common denominator spoofs * lives
    apcer, bpcer = spoof_below * lives, (lives - live_below) * spoofs
    gap, total = (apcer - bpcer).abs(), apcer + bpcer
    # the closest APCER and BPCER; ties: the smaller sum, then the lowest threshold (argmin's first)
    j = int(torch.argmin(torch.where(gap == gap.min(), total, total.max() + 1)))
    pairs = (spoof_at * (2 * live_below + live_at)).sum().item()  # spoof-live pairs won, doubled (a tie: 1)
    a, b = spoof_below[j].item() / spoofs, (lives - live_below[j].item()) / lives
    return {"eer": 100.0 * (a + b) / 2, "auc": pairs / (2 * spoofs * lives), "apcer": 100.0 * a, "bpcer": 100.0 * b,
            "acer": 100.0 * (a + b) / 2, "eer_threshold": values[j].item()}


class SpoofScores:
    """Each evaluated image's spoof score and label (``update`` per batch), then the metrics of
    all of them, gathered from every rank (``compute``)."""

    def __init__(self):
        self.scores, self.labels = [], []

    def update(self, logits, targets):
        self.scores.append(spoof_scores(logits))  # kept on the device: read back once, in compute
        self.labels.append(targets)

    def compute(self, header="Test:"):
        """:func:`antispoof_metrics` of every rank's images (a collective: every rank calls it)."""
        mine = [torch.cat(self.scores).tolist(), torch.cat(self.labels).tolist()] if self.scores else [[], []]
        scores, labels = [], []
        for rank_scores, rank_labels in all_gather_object(mine):
            scores += rank_scores
            labels += rank_labels
        metrics = antispoof_metrics(scores, labels)
        if metrics:
            print_main(f"{header} EER {metrics['eer']:.3f}% AUC {metrics['auc']:.4f} APCER {metrics['apcer']:.3f}% "
                       f"BPCER {metrics['bpcer']:.3f}% ACER {metrics['acer']:.3f}% (log-odds threshold {metrics['eer_threshold']:.4g}, "
                       f"{len(scores)} images)")
        else:
            print_main(f"{header} no EER: the {len(scores)} test images are not both live and spoof")
        return metrics
