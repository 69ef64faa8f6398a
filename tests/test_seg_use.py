"""Using a trained SegFormer: eval on a labelled folder without the training data, multi-scale + flip test,
predict (masks + overlays), export (ONNX vs onnxruntime, safetensors), and the majority-class baseline."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_seg
from lib.config import build_config
from lib.data.common import read_image, to_tensor_normalized
from lib.data.seg import SegFolderDataset, rescale_size
from lib.errors import UserError
from lib.metrics.seg import confusion_matrix, seg_metrics
from lib.models.segformer import SegFormer
from tests.conftest import ROOT

TINY = ["--config", "configs/seg/sample.yaml", "tracker=none", "data.scale=[120,90]", "data.crop_size=[64,64]",
        "train.num_workers=0", "train.log_interval=1"]
SEG = ROOT / "tests" / "data" / "seg"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step B0 run on the bundled sample: its run folder."""
    run = tmp_path_factory.mktemp("seg_trained")
    train_seg.main(TINY + [f"output_dir={run}", "train.total_steps=2", "train.batch_size=2", "train.eval_interval=2",
                           "train.ckpt_interval=2"])
    return run


def last_metrics(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_eval_only_reads_a_labelled_folder_and_no_training_folder(trained, tmp_path):
    elsewhere = tmp_path / "elsewhere"  # the sample's val images under other names, and no train folder
    shutil.copytree(SEG / "val", elsewhere / "imgs")
    shutil.copytree(SEG / "valannot", elsewhere / "anns")
    out = tmp_path / "eval"
    res = train_seg.main(TINY + [f"output_dir={out}", "eval_only=true", f"load_from={trained}/checkpoints/best",
                                 "data.root=/nonexistent", f"data.test_img_dir={elsewhere / 'imgs'}",
                                 f"data.test_ann_dir={elsewhere / 'anns'}"])
    assert res["mIoU"] == pytest.approx(last_metrics(trained)["mIoU"], abs=1e-6)
    log = (out / "log.txt").read_text()
    assert f"eval: 2 images from {elsewhere / 'imgs'}" in log and "weights of step 2" in log
    assert last_metrics(out)["step"] == 2
    assert not (out / "checkpoints").exists()  # eval_only writes no step checkpoints


def test_aug_test_at_scale_one_without_flip_is_whole_image_eval():
    torch.manual_seed(0)
    model = SegFormer("b0", 11).eval()
    img = torch.randn(2, 3, 64, 96)
    cfg = build_config(train_seg.SegConfig, {}, ["eval.scales=[1.0]", "eval.flip=false"])
    with torch.no_grad():
        ref = F.interpolate(model(img), size=(90, 120), mode="bilinear", align_corners=False).softmax(1)
        assert torch.equal(train_seg.seg_probs([model], img, (90, 120), cfg), ref)
        # mmseg aug_test: softmax averaged over scales x flips, each resized to the label size and flipped back
        cfg = build_config(train_seg.SegConfig, {}, ["eval.scales=[0.5,1.0,1.5]", "eval.flip=true"])
        parts = []
        for s in (0.5, 1.0, 1.5):
            x = F.interpolate(img, size=(int(64 * s + 0.5), int(96 * s + 0.5)), mode="bilinear", align_corners=False)
            for flip in (False, True):
                out = model(x.flip(-1) if flip else x)
                p = F.interpolate(out, size=(90, 120), mode="bilinear", align_corners=False).softmax(1)
                parts.append(p.flip(-1) if flip else p)
        got = train_seg.seg_probs([model], img, (90, 120), cfg)
    assert (got - torch.stack(parts).mean(0)).abs().max().item() < 1e-6
    assert (got - ref).abs().max().item() > 1e-3


def test_multi_scale_flip_eval_runs_end_to_end(trained, tmp_path):
    common = TINY + ["eval_only=true", f"load_from={trained}/checkpoints/best"]
    one = train_seg.main(common + [f"output_dir={tmp_path / 'one'}", "eval.scales=[1.0]", "eval.flip=false"])
    assert one["mIoU"] == pytest.approx(last_metrics(trained)["mIoU"], abs=1e-6)
    ms = train_seg.main(common + [f"output_dir={tmp_path / 'ms'}", "eval.scales=[0.5,0.75,1.0,1.25,1.5,1.75]",
                                  "eval.flip=true"])
    assert 0 <= ms["mIoU"] <= 100 and "scales [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] + flip" in (
        tmp_path / "ms" / "log.txt").read_text()


def _predict_masks(folder):
    return {p.stem: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_predict_writes_palette_masks_that_score_like_eval(trained, tmp_path):
    out = tmp_path / "pred"
    train_seg.main(TINY + [f"output_dir={out}", f"load_from={trained}/checkpoints/best", f"predict={SEG / 'val'}"])
    masks = _predict_masks(out / "predict")
    assert sorted(masks) == ["0016E5_07959", "0016E5_08039"]
    assert len(list((out / "predict").glob("*_overlay.jpg"))) == 2
    assert not (out / "checkpoints").exists()  # predict writes no step checkpoints
    png = Image.open(out / "predict" / "0016E5_07959.png")
    assert png.mode == "P" and png.getpalette()[:6] == [128, 128, 128, 128, 0, 0]  # CamVid Sky, Building
    cfg = build_config(train_seg.SegConfig, {"data": {"scale": [120, 90]}})
    ds = SegFolderDataset(cfg.data, "val", train=False)
    cm = 0
    for i in range(len(ds)):
        img, label = ds.load(i)
        mask = masks[ds.pairs[i][0].stem]
        assert mask.shape == label.shape == img.shape[:2]
        cm = cm + confusion_matrix(torch.from_numpy(mask), torch.from_numpy(label), 11)
    assert seg_metrics(cm)["mIoU"] == pytest.approx(last_metrics(trained)["mIoU"], abs=1e-6)


@pytest.mark.slow
def test_predict_on_two_processes_equals_one(trained, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["train_seg.py", *TINY, f"load_from={trained}/checkpoints/best", f"predict={SEG / 'train'}/*.jpg"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *cmd,
                          f"output_dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    train_seg.main(cmd[1:] + [f"output_dir={tmp_path / 'one'}"])
    a, b = _predict_masks(tmp_path / "one" / "predict"), _predict_masks(tmp_path / "two" / "predict")
    assert len(a) == 6 and a.keys() == b.keys()
    # the same masks, up to argmax ties that another float summation order (threads) may flip
    assert all((a[k] == b[k]).mean() >= 0.999 for k in a), {k: float((a[k] == b[k]).mean()) for k in a}


def test_export_onnx_matches_pytorch_and_safetensors_round_trips(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    best = trained / "checkpoints" / "best"
    train_seg.main(TINY + [f"output_dir={tmp_path / 'onnx'}", f"load_from={best}", "export=onnx"])
    path = tmp_path / "onnx" / "export" / "model.onnx"
    meta = json.loads((tmp_path / "onnx" / "export" / "export.json").read_text())
    assert meta["opset"] >= 17 and meta["metadata"]["step"] == "2"
    model = SegFormer("b0", 11).eval()
    model.load_state_dict(train_seg.convert_state_dict(
        __import__("safetensors.torch").torch.load_file(str(best / "model.safetensors"))))
    imgs = []
    for name in ("0016E5_07959", "0016E5_08039"):  # sample images through the val resize, as a batch of 2
        img = read_image(SEG / "val" / f"{name}.jpg")
        h, w = img.shape[:2]
        imgs.append(to_tensor_normalized(np.array(Image.fromarray(img).resize(rescale_size(w, h, (120, 90), 1.0),
                                                                                 Image.BILINEAR))))
    x = torch.stack(imgs)  # (2, 3, 90, 120): the export used batch 1, the batch axis is dynamic
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == ref.shape == (2, 11, 23, 30)
    assert np.abs(got - ref).max() < 1e-4
    assert "onnxruntime vs PyTorch max |diff|" in (tmp_path / "onnx" / "log.txt").read_text()
    assert not (tmp_path / "onnx" / "checkpoints").exists()  # export writes no step checkpoints
    train_seg.main(TINY + [f"output_dir={tmp_path / 'st'}", f"load_from={best}", "export=safetensors"])
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "st" / "export" / "model.safetensors")), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _label(path):
    raw = np.array(Image.open(path)).astype(np.int64)
    raw[raw == 11] = 255  # CamVid void
    return raw


def test_majority_baseline_equals_hand_computed_miou(tmp_path):
    counts = np.zeros(11, np.int64)
    for p in sorted((SEG / "trainannot").glob("*.png")):
        lab = _label(p)
        counts += np.bincount(lab[lab != 255], minlength=11)
    k = int(counts.argmax())
    n = np.zeros(11, np.int64)
    for p in sorted((SEG / "valannot").glob("*.png")):
        lab = _label(p)
        n += np.bincount(lab[lab != 255], minlength=11)
    # every valid val pixel predicted as k: IoU_k = n_k / N, other present classes 0, absent ones left out
    present = [c for c in range(11) if n[c] > 0 or c == k]
    iou = [n[k] / n.sum() if c == k else 0.0 for c in present]
    res = train_seg.main(TINY + [f"output_dir={tmp_path}", "eval_only=true", "baseline=majority"])
    assert res["mIoU"] == pytest.approx(100 * np.mean(iou), abs=1e-6)
    assert res["aAcc"] == pytest.approx(100 * n[k] / n.sum(), abs=1e-6)
    assert f"baseline: majority class {k}" in (tmp_path / "log.txt").read_text()


def test_eval_only_rule_resumed_model_and_errors(trained, tmp_path):
    run = tmp_path / "run"  # a copy: eval_only appends to the run's metrics.jsonl
    shutil.copytree(trained, run)
    res = train_seg.main(TINY + [f"output_dir={run}", "eval_only=true", "resume=auto"])  # neither load_from nor ensemble
    assert res["mIoU"] == pytest.approx(last_metrics(trained)["mIoU"], abs=1e-6)
    assert f"{run}/checkpoints/step_2" in (run / "log.txt").read_text() and last_metrics(run)["step"] == 2
    with pytest.raises(UserError, match="eval_only=true needs load_from"):
        train_seg.main(TINY + [f"output_dir={tmp_path / 'none'}", "eval_only=true"])
    with pytest.raises(UserError, match="baseline='mean_pose'"):
        train_seg.main(TINY + [f"output_dir={tmp_path / 'b'}", "eval_only=true", "baseline=mean_pose"])
    with pytest.raises(UserError, match="predict= and export= need load_from"):
        train_seg.main(TINY + [f"output_dir={tmp_path / 'p'}", f"predict={SEG / 'val'}"])
