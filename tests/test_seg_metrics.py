import numpy as np
import pytest
import torch

from lib.metrics.seg import confusion_matrix, seg_metrics


def test_miou_against_hand_computed_confusion_matrix():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(pred, label, 3)
    # rows truth, cols pred: class0: (0->0),(0->1); class1: (1->1),(1->1),(1->2); class2: (2->2),(2->0)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    m = seg_metrics(cm)
    iou = [1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)]
    acc = [1 / 2, 2 / 3, 1 / 2]
    assert m["mIoU"] == pytest.approx(np.mean(iou) * 100)
    assert m["mAcc"] == pytest.approx(np.mean(acc) * 100)
    assert m["aAcc"] == pytest.approx(4 / 7 * 100)


def test_absent_class_is_left_out_of_the_mean():
    cm = torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    m = seg_metrics(cm)
    assert m["mIoU"] == pytest.approx(100.0) and np.isnan(m["IoU"][2])
