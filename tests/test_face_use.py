"""Using a trained face model without its training data: eval on labelled test pairs with the validation
threshold, predict (embeddings + pair scores, 1 and 2 processes), export (ONNX = PyTorch), random baseline."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_face
from lib.data.face import read_pairs
from lib.metrics.face import accuracy_at, cosine_scores, random_embeddings, verification_metrics
from tests.conftest import ROOT

FACE = ROOT / "tests" / "data" / "face"
TINY = ["--config", "configs/face/sample.yaml", "tracker=none", "data.image_size=64", "model.width=0.25",
        "model.embed_dim=64", "train.num_workers=0", "train.log_interval=1", "eval.batch_size=64"]
NO_TRAIN = "data.root=/nonexistent/train_identities"  # eval / predict / export must not read it


def run(out, *extra):
    return train_face.main(TINY + [f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def best(tmp_path_factory):
    out = tmp_path_factory.mktemp("face_trained")
    run(out, "train.total_steps=4", "train.eval_interval=4", "train.ckpt_interval=4", "optim.lr=3e-3")
    return out / "checkpoints" / "best"


def labelled_test_csv(path, keep):
    """A labelled test list (label,path_a,path_b) of some validation pairs, paths absolute."""
    pairs = read_pairs(FACE / "val_pairs.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "path_a", "path_b"])
        for i in keep:
            w.writerow([pairs[i][0], pairs[i][1], pairs[i][2]])
    return [pairs[i] for i in keep]


def read_scores(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_eval_on_labelled_test_pairs_uses_the_validation_threshold(best, tmp_path):
    # the test list = all validation pairs: threshold-free metrics equal validation's, and the accuracy at
    # validation's threshold equals validation's best accuracy
    labelled_test_csv(tmp_path / "same.csv", range(24))
    r = run(tmp_path / "a", "eval_only=true", f"load_from={best}", NO_TRAIN, f"data.test_pairs={tmp_path / 'same.csv'}")
    assert r["test_EER"] == pytest.approx(r["EER"], abs=1e-9) and r["test_acc"] == pytest.approx(r["acc"], abs=1e-9)
    assert r["test_threshold"] == r["threshold"] and r["test_pairs"] == 24
    log = (tmp_path / "a" / "log.txt").read_text()
    state = json.loads((best / "trainer_state.json").read_text())
    assert f"{best} (step {state['step']})" in log and f"eval @ step {state['step']}:" in log
    assert "24 validation pairs (24 labelled) from" in log and "val_pairs.csv" in log
    assert "24 test pairs (24 labelled) from" in log and "nonexistent" not in log
    assert "test_acc uses the validation threshold" in log

    # a subset of 10 pairs: EER from its own scores (threshold-free), accuracy at the validation threshold
    sub = labelled_test_csv(tmp_path / "sub.csv", [0, 2, 3, 5, 8, 11, 13, 17, 20, 23])
    r2 = run(tmp_path / "b", "eval_only=true", f"load_from={best}", NO_TRAIN, f"data.test_pairs={tmp_path / 'sub.csv'}")
    rows = read_scores(tmp_path / "b" / "predictions.csv")
    scores = np.array([float(x["score"]) for x in rows])
    labels = np.array([lab for lab, _, _ in sub])
    assert r2["test_EER"] == pytest.approx(verification_metrics(scores, labels)["EER"], abs=1e-3)
    same = np.array([int(x["same"]) for x in rows])  # score >= the validation threshold
    assert r2["test_acc"] == pytest.approx(100 * (same == labels).mean(), abs=1e-9)
    far = np.abs(scores - r["threshold"]) > 1e-6  # the CSV rounds scores to 6 decimals
    assert far.sum() >= 8 and (same[far] == (scores[far] >= r["threshold"])).all()
    assert r2["test_acc"] == pytest.approx(100 * accuracy_at(scores, labels, r["threshold"] - 1e-6), abs=1e-9)

    # no validation pairs: said so, and the accuracy at the test pairs' own EER threshold, labelled as such
    r3 = run(tmp_path / "c", "eval_only=true", f"load_from={best}", NO_TRAIN, "data.val_pairs=",
             f"data.test_pairs={tmp_path / 'sub.csv'}")
    assert "test_acc" not in r3 and "EER" not in r3
    assert r3["test_EER"] == pytest.approx(r2["test_EER"], abs=1e-9)
    assert r3["test_acc_at_test_eer_threshold"] == pytest.approx(
        100 * accuracy_at(scores, labels, r3["test_eer_threshold"]), abs=1e-9)
    assert "no validation pairs" in (tmp_path / "c" / "log.txt").read_text()


def test_random_embedding_baseline_equals_metrics_on_those_arrays(tmp_path):
    r = run(tmp_path, "eval_only=true", "baseline=random", NO_TRAIN, "seed=3", "data.test_pairs=")
    pairs = read_pairs(FACE / "val_pairs.csv")
    paths = sorted({p for _, a, b in pairs for p in (a, b)})  # the eval path's image order
    pos = {p: i for i, p in enumerate(paths)}
    emb = random_embeddings(len(paths), 64, seed=3)  # (N, 64): model.embed_dim=64 in TINY
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(paths)))
    a = torch.stack([emb[pos[p]] for _, p, _ in pairs])
    b = torch.stack([emb[pos[p]] for _, _, p in pairs])
    want = verification_metrics(cosine_scores(a, b), torch.tensor([lab for lab, _, _ in pairs]))
    assert r["EER"] == pytest.approx(want["EER"], abs=1e-9) and r["acc"] == pytest.approx(want["acc"], abs=1e-9)
    assert 20 < r["EER"] < 80  # chance level on 24 pairs
    other = run(tmp_path / "s4", "eval_only=true", "baseline=random", NO_TRAIN, "seed=4", "data.test_pairs=")
    assert other["EER"] != r["EER"] or other["threshold"] != r["threshold"]  # the seed picks the embeddings


def test_predict_writes_embeddings_names_and_pair_scores(best, tmp_path):
    glob = str(FACE / "val" / "*" / "*.jpg")
    r = run(tmp_path, f"predict={glob}", f"load_from={best}", NO_TRAIN)
    out = tmp_path / "predict"
    emb = np.load(out / "embeddings.npy")
    names = (out / "names.txt").read_text().splitlines()
    n = len(list(FACE.glob("val/*/*.jpg")))
    assert r["predicted"] == n and emb.shape == (n, 64) and emb.dtype == np.float32 and len(names) == n
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    key = lambda p: str((ROOT / p).resolve())  # noqa: E731  (config paths may be relative to the project root)
    row = {key(name): i for i, name in enumerate(names)}
    scores = read_scores(out / "scores.csv")
    assert len(scores) == 8  # tests/data/face/test_pairs.csv
    for s in scores:  # each pair score = cosine of the two predicted embeddings
        ea, eb = emb[row[key(s["path_a"])]], emb[row[key(s["path_b"])]]
        assert float(s["score"]) == pytest.approx(float(ea @ eb), abs=1e-5)
    assert "nonexistent" not in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "checkpoints").exists()  # predict writes no checkpoints


@pytest.mark.slow
def test_predict_on_two_processes_equals_one(best, tmp_path):
    glob = str(FACE / "val" / "*" / "*.jpg")
    args = TINY + [f"predict={glob}", f"load_from={best}", NO_TRAIN, "data.test_pairs="]
    run(tmp_path / "one", *args[len(TINY):])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "train_face.py", *args, f"output_dir={tmp_path / 'two'}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "predict" / "embeddings.npy"), np.load(tmp_path / "two" / "predict" / "embeddings.npy")
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5  # every image once, in input order
    assert (tmp_path / "one" / "predict" / "names.txt").read_text() == (tmp_path / "two" / "predict" / "names.txt").read_text()


def test_export_onnx_equals_pytorch_and_safetensors(best, tmp_path):
    pytest.importorskip("onnxruntime")
    from safetensors.torch import load_file

    from lib.export import onnx_max_abs_diff

    r = run(tmp_path / "onnx", "export=onnx", f"load_from={best}", NO_TRAIN)
    assert r["onnx_max_abs_diff"] < 1e-4
    model = train_face.build_model(train_face.parse_config(train_face.FaceConfig, TINY).model)
    train_face.load_model(model, str(best), print)
    model.eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # another batch size: dynamic axis
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (3, 64)
    assert onnx_max_abs_diff(tmp_path / "onnx" / "export" / "model.onnx", (x,), ref) < 1e-4
    meta = json.loads((tmp_path / "onnx" / "export" / "export.json").read_text())
    assert meta["outputs"] == ["embedding"] and meta["metadata"]["image_size"] == "64"

    run(tmp_path / "st", "export=safetensors", f"load_from={best}", NO_TRAIN)
    sd = load_file(str(tmp_path / "st" / "export" / "model.safetensors"))
    own = model.state_dict()
    assert set(sd) == set(own) and not any(k.startswith("heads.") for k in sd)
    assert all(torch.equal(sd[k], own[k]) for k in own)
    assert not (tmp_path / "onnx" / "checkpoints").exists() and not (tmp_path / "st" / "checkpoints").exists()
    assert torch.allclose(F.normalize(ref, dim=1).norm(dim=1), torch.ones(3))
