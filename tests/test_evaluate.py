import contextlib
import json
import re

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluate as ev
from common import ImageData
from conftest import assert_clean_error, run_script

CPU = torch.device("cpu")


def blocks(n, seed=0):
    """n 28x28 uint8 images of 10 classes: a bright 4x4 block in one of 10 cells (2 rows of 5, 5 pixels apart),
    plus noise. Far enough apart that the classifier's 2-pixel shifts never move one class onto another."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = (g.random((n, 28, 28)) * 40).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = 6 + 12 * (y // 5), 2 + 5 * (y % 5)
        images[i, r:r + 4, c:c + 4] = 255
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels).long()


@pytest.fixture(scope="module")
def trained():
    images, labels = blocks(1000)
    net = ev.train_classifier(ImageData(images, labels, []), (8, 16, 32), 8, CPU, contextlib.nullcontext())
    probs, features = ev.classify(net, images, CPU)
    saved = {"test_mean": features.mean(0), "test_cov": torch.cov(features.T), "train_features": features.float()}
    return net, images, labels, probs, features, saved


def test_frechet_distance_matches_the_textbook_formula_and_is_zero_for_one_gaussian():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1
    (ma, ca), (mb, cb) = (a.mean(0), torch.cov(a.T)), (b.mean(0), torch.cov(b.T))
    textbook = ((ma - mb).square().sum() + ca.trace() + cb.trace()
                - 2 * np.trace(scipy.linalg.sqrtm(ca.numpy() @ cb.numpy())).real).item()
    assert ev.frechet_distance(ma, ca, mb, cb) == pytest.approx(textbook, rel=1e-8)
    assert ev.frechet_distance(ma, ca, ma, ca) == pytest.approx(0, abs=1e-8)


def test_matching_labels_score_1_and_shuffled_ones_chance(trained):
    _, _, labels, probs, features, saved = trained
    right = ev.scores(probs, features, labels, saved)
    assert right["accuracy"] > 0.97 and right["n_labelled"] == 1000
    shuffled = ev.scores(probs, features, labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))],
                         saved)
    assert 0.05 < shuffled["accuracy"] < 0.2
    # labels -1 (a prompt that named no class) are left out of the accuracy, and counted everywhere else
    partly = labels.clone()
    partly[::2] = -1
    result = ev.scores(probs, features, partly, saved)
    assert result["n_labelled"] == 500 and result["n"] == 1000 and result["accuracy"] > 0.97
    assert "accuracy" not in ev.scores(probs, features, None, saved)


def test_coverage_is_1_for_all_classes_equally_and_0_for_one(trained):
    net, images, labels, probs, features, saved = trained
    assert ev.scores(probs, features, None, saved)["coverage"] > 0.97
    one = ev.classify(net, images[labels == 3], CPU)
    assert ev.scores(*one, None, saved)["coverage"] < 0.1


def test_fid_is_zero_for_the_real_set_and_grows_with_noise(trained):
    net, images, _, probs, features, saved = trained
    assert ev.scores(probs, features, None, saved)["fid"] == pytest.approx(0, abs=1e-6)
    assert ev.scores(probs, features, None, saved)["fid_floor"] == pytest.approx(0, abs=1e-6)
    g, fids = torch.Generator().manual_seed(0), []
    for std in (10, 40, 100):
        noisy = (images.float() + std * torch.randn(images.shape, generator=g)).clamp(0, 255).round().byte()
        fids.append(ev.scores(*ev.classify(net, noisy, CPU), None, saved)["fid"])
    assert 0 < fids[0] < fids[1] < fids[2]


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"pictures": np.zeros((4, 28, 28), np.uint8)}, "no 'images'"),
    ({"images": np.zeros((4, 30, 30), np.uint8)}, "shape (4, 30, 30)"),
    ({"images": np.zeros((4, 28, 28), np.float32)}, "uint8"),
    ({"images": np.zeros((1, 28, 28), np.uint8)}, "at least 2"),
    ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.arange(3)}, "'labels'"),
    ({"images": np.zeros((4, 28, 28), np.uint8), "labels": np.full(4, 10)}, "'labels'"),
])
def test_bad_npz_files_are_one_clear_error(tmp_path, arrays, message):
    with pytest.raises(SystemExit, match=re.escape(message)):  # in-process (fast): the one-line error of fail()
        ev.main([str(save_npz(tmp_path / "s.npz", **arrays))])


def test_a_missing_file_and_the_wrong_dataset_are_clear_errors(tmp_path):
    assert_clean_error(run_script("evaluate.py", tmp_path / "nothing.npz"), "cannot read")   # as a user sees it
    digits = save_npz(tmp_path / "s.npz", images=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(SystemExit, match="--dataset cifar10"):
        ev.main([str(digits), "--dataset", "cifar10"])


def test_cli_trains_the_classifier_once_then_reuses_it(tmp_path, mnist_root):
    from conftest import synthetic_digits
    images, labels = synthetic_digits(20, seed=7)
    npz = save_npz(tmp_path / "s.npz", images=images, labels=labels.astype(np.int64))
    env = {"FLOWMATCH_CACHE": str(tmp_path / "cache")}
    r = run_script("evaluate.py", npz, "--data-root", mnist_root, "--json", tmp_path / "scores.json", env=env)
    assert r.returncode == 0, r.stderr
    assert "training a mnist classifier" in r.stdout and "FID" in r.stdout and "floor" in r.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["dataset"] == "mnist" and scores["n"] == 20 and scores["n_labelled"] == 20
    assert {"accuracy", "confidence", "coverage", "fid", "fid_floor", "classifier_test_accuracy"} <= set(scores)
    assert scores["fid_floor_n"] == 20                     # the floor is at the samples' N
    assert (tmp_path / "cache").is_dir() and any(p.name.startswith("classifier-mnist") for p in
                                                 (tmp_path / "cache").iterdir())
    r = run_script("evaluate.py", npz, "--data-root", tmp_path / "no data", env=env)  # cached: no data needed
    assert r.returncode == 0, r.stderr
    assert "training a" not in r.stdout and f"{scores['fid']:.2f}" in r.stdout
    blocker = tmp_path / "file"                            # a --json path that cannot be written: one line
    blocker.write_text("")
    assert_clean_error(run_script("evaluate.py", npz, "--json", blocker / "s.json", env=env), "--json")


def test_damaged_and_foreign_files_are_one_clear_error(tmp_path):
    good = save_npz(tmp_path / "good.npz", images=np.zeros((4, 28, 28), np.uint8))
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])               # a truncated download
    np.save(tmp_path / "one.npy", np.zeros((4, 28, 28), np.uint8))         # a lone .npy, not an .npz
    import zipfile
    with zipfile.ZipFile(tmp_path / "notes.npz", "w") as z:                # a zip whose "array" is text
        z.writestr("images.npy", "hello")
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as z:                # a zip of other files
        z.writestr("readme.txt", "hello")
    for name in ("cut.npz", "one.npy", "notes.npz", "other.npz"):
        with pytest.raises(SystemExit, match="cannot read"):
            ev.main([str(tmp_path / name)])


@pytest.mark.parametrize("labels", [np.array(["3"] * 4), np.full(4, 2.7), np.array([1, 2, np.nan, 3])])
def test_labels_that_are_not_integers_are_refused_not_truncated(tmp_path, labels):
    with pytest.raises(SystemExit, match="integer class"):
        ev.main([str(save_npz(tmp_path / "s.npz", images=np.zeros((4, 28, 28), np.uint8), labels=labels))])


def test_coverage_of_one_class_is_zero_not_minus_zero(trained):
    net, images, labels, *_, saved = trained
    coverage = ev.scores(*ev.classify(net, images[labels == 3][:1].expand(4, -1, -1, -1), CPU), None, saved)["coverage"]
    assert coverage == 0 and str(round(coverage, 3)) == "0.0"


def test_precision_recall_and_spread_like_the_reference_scorer():
    g = torch.Generator().manual_seed(0)
    real, labels = torch.randn(400, 8, generator=g), torch.arange(400) % 10
    saved = {"test_features": real, "test_labels": labels}
    same = ev.variety(real.double(), labels, saved)         # the real images themselves: all inside, as varied
    assert same["precision"] == same["recall"] == 1.0 and same["spread"] == pytest.approx(1.0)
    one = real[:1].repeat(400, 1).double()                  # one picture 400 times: real-looking, no variety
    alike = ev.variety(one + 1e-3 * torch.randn(400, 8, generator=g, dtype=torch.float64), labels, saved)
    assert alike["precision"] == 1.0 and alike["recall"] < 0.05 and alike["spread"] < 0.01
    far = ev.variety(real.double() + 100, labels, saved)   # nowhere near the real images
    assert far["precision"] == far["recall"] == 0.0
    assert "spread" not in ev.variety(real.double(), None, saved)    # without labels: no classes to compare


def test_scores_report_variety_when_the_cache_has_the_test_features(trained):
    _, _, labels, probs, features, saved = trained
    result = ev.scores(probs, features, labels, {**saved, "test_features": features.float(), "test_labels": labels})
    assert result["recall"] == 1.0 and result["spread"] == pytest.approx(1.0)
    assert "recall" not in ev.scores(probs, features, labels, saved)    # an older cache: the other scores only


def test_flowers_get_a_classifier_of_102_classes_judged_on_photos_it_never_learned_from(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    pooled = ImageData(torch.randint(0, 256, (60, 3, 64, 64), dtype=torch.uint8, generator=g),
                       torch.arange(60) % 3 * 50, [f"flower {i}" for i in range(102)])   # classes 0, 50 and 100
    monkeypatch.setattr(ev, "load_dataset", lambda name, root, image_size: pooled)    # 64 px, all splits pooled
    monkeypatch.setitem(ev.DATASETS, "flowers102", ((64, 64, 3), (4, 8), 1, 102))      # a tiny classifier
    monkeypatch.setattr(ev, "FLOWERS_HELD_OUT", 21)
    net, saved = ev.get_classifier("flowers102", "data", CPU)
    assert net.head.out_features == 102
    assert len(saved["test_features"]) == 21 and torch.equal(saved["test_labels"], pooled.labels[:21])
    images = np.ascontiguousarray(pooled.images[:6].permute(0, 2, 3, 1).numpy())
    npz = save_npz(tmp_path / "s.npz", images=images, labels=np.array([0, 0, 50, 50, 101, -1]))
    ev.main([str(npz), "--json", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["dataset"] == "flowers102" and scores["n_labelled"] == 5 and "spread" in scores
    with pytest.raises(SystemExit, match="one integer class 0-101"):
        ev.main([str(save_npz(tmp_path / "t.npz", images=images, labels=np.array([0, 0, 0, 0, 0, 102])))])


def test_samples_of_some_classes_are_compared_with_real_images_of_those_classes():
    """Phase 5 draws 8 of 102 flowers: against every real flower its FID and recall would count the 94 missing ones."""
    g = torch.Generator().manual_seed(0)
    real, labels = torch.randn(400, 8, generator=g) + 3 * (torch.arange(400) % 4)[:, None], torch.arange(400) % 4
    saved = {"test_features": real, "test_labels": labels, "test_mean": real.double().mean(0),
             "test_cov": torch.cov(real.double().T), "train_features": real, "train_labels": labels}
    two = labels < 2                                                 # samples that are real images of classes 0, 1
    probs = torch.nn.functional.one_hot(labels[two], 4).double()
    some = ev.scores(probs, real[two].double(), labels[two], saved)
    assert some["fid"] == pytest.approx(0, abs=1e-6) and some["recall"] == 1.0 and some["fid_floor_n"] == 200
    everything = ev.scores(probs, real[two].double(), None, saved)   # no labels: against all four classes
    assert everything["fid"] > 10 and everything["recall"] < 0.6
