"""Known-answer tests of the generation metrics (varctl.metrics.generation): FID against closed forms, FID
and KID of a set against itself and under growing noise, precision / recall, the cached reference
statistics and the real loading path of the FID Inception (with test-built random weights: plumbing only)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from varctl.metrics.generation import (
    FeatureNet,
    GenerationMetrics,
    InceptionFeatures,
    JudgeFeatures,
    MissingWeights,
    ReferenceStats,
    StaleReference,
    build_networks,
    cached_reference,
    fingerprint_files,
    precision_recall,
    reference_meta,
)


class Identity(FeatureNet):
    """'Images' that are already features: (B, D) in, the same out (logits too)."""

    name, suffix, weights, weights_sha256 = "identity", "_id", "-", "-"

    def __init__(self, D: int):
        super().__init__()
        self.num_features = D
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to move inputs to

    def forward(self, x):
        return x.float(), x.float()


def whitened(N: int, D: int, seed: int) -> torch.Tensor:
    """N samples whose sample mean is exactly 0 and sample covariance exactly I (float64)."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / (N - 1)
    return x @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def fd(real: torch.Tensor, fake: torch.Tensor) -> float:
    m = GenerationMetrics(Identity(real.shape[1]), kid_subsets=5)
    m.update(real, real=True)
    m.update(fake, real=False)
    return m.compute()["fd_id"]


def test_fid_matches_the_closed_form_of_gaussians():
    D = 8
    real = whitened(400, D, 0)
    mu = torch.arange(D, dtype=torch.float64) / 4
    s = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    # N(0, I) against N(mu, diag(s^2)): |mu|^2 + sum (1 - s)^2
    expected = (mu.square().sum() + (1 - s).square().sum()).item()
    assert fd(real, whitened(400, D, 1) * s + mu) == pytest.approx(expected, rel=1e-5)
    # a full covariance A A^T: tr(I + S - 2 S^(1/2)) = sum over its eigenvalues l of (1 - sqrt(l))^2
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = torch.linalg.eigvalsh(A @ A.T)
    expected = (1 - lam.sqrt()).square().sum().item()
    assert fd(real, whitened(400, D, 3) @ A.T) == pytest.approx(expected, rel=1e-4)


def scenes(n: int = 48, size: int = 32) -> torch.Tensor:
    from datamodules.synthetic import SyntheticShapes

    data = SyntheticShapes(n, size, controls=())
    return torch.stack([data[i]["image"] for i in range(n)]).add(1).mul(0.5)


@pytest.fixture(scope="module")
def judge(judge_file) -> JudgeFeatures:
    return JudgeFeatures(judge_file)


def test_fid_and_kid_are_zero_against_the_same_set_and_grow_with_noise(judge):
    images = scenes()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    scores = []
    for sigma in (0.0, 0.05, 0.15, 0.4):
        m = GenerationMetrics(judge, kid_subsets=20)
        m.update(images, real=True)
        m.update((images + sigma * noise).clamp(0, 1), real=False)
        scores.append(m.compute())
    fds, kds = [s["fd_judge"] for s in scores], [s["kd_judge"] for s in scores]
    # KID is an unbiased estimate: against the same set it is 0 up to its sampling noise (slightly negative)
    assert abs(fds[0]) < 1e-6 * max(fds) and abs(kds[0]) < 1e-2 * max(kds)
    assert fds == sorted(fds) and fds[1] > 0 and kds == sorted(kds) and kds[2] > 0
    assert scores[0]["precision_judge"] == 1.0 and scores[0]["recall_judge"] == 1.0
    plain = judge(images)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16-mixed test step: features in float32
        assert torch.equal(judge(images)[0], plain)
    assert set(scores[0]) == {"fd_judge", "kd_judge", "kd_judge_std", "is_judge", "is_judge_std",
                              "num_real_judge", "num_generated_judge", "precision_judge",
                              "recall_judge", "kd_judge_subset_size"}  # fmt: skip
    assert scores[0]["kd_judge_subset_size"] == 24  # 48 images: half of them, so that subsets differ


def test_inception_score_of_hand_made_logits():
    # 2 classes, every sample certain of its class, balanced: IS = exp(KL(p(y|x) || p(y))) = exp(log 2) = 2
    logits = torch.tensor([[50.0, 0.0], [0.0, 50.0]]).repeat(8, 1)
    m = GenerationMetrics(Identity(2), kid_subsets=2, is_splits=1)
    m.update(torch.randn(16, 2), real=True)
    m.update(logits, real=False)
    assert m.compute()["is_id"] == pytest.approx(2.0, rel=1e-6)
    # all samples certain of the same class: IS = 1
    m = GenerationMetrics(Identity(2), kid_subsets=2, is_splits=1)
    m.update(torch.randn(16, 2), real=True)
    m.update(torch.tensor([[50.0, 0.0]]).repeat(16, 1), real=False)
    assert m.compute()["is_id"] == pytest.approx(1.0, rel=1e-6)


def test_precision_and_recall_of_known_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 4, generator=g)
    assert precision_recall(a, a.clone()) == (1.0, 1.0)
    assert precision_recall(a, a + 100) == (0.0, 0.0)
    # fakes that cover one of two real clusters: every fake is real-looking, half the reals are missed
    real = torch.cat([torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g) + 50])
    precision, recall = precision_recall(real, real[:50] + 0.01)
    assert precision == 1.0 and recall == 0.5


def test_metrics_are_deterministic_for_a_seed_and_need_two_images():
    real, fake = torch.randn(40, 3), torch.randn(40, 3) + 0.5
    outs = []
    for _ in range(2):
        m = GenerationMetrics(Identity(3), kid_subsets=10, kid_subset_size=20, seed=3)
        m.update(real, real=True)
        m.update(fake, real=False)
        outs.append(m.compute())
    assert outs[0] == outs[1]
    m = GenerationMetrics(Identity(3))
    m.update(real, real=True)
    m.update(fake[:1], real=False)
    with pytest.raises(ValueError, match="2 or more"):
        m.compute()


def test_reference_statistics_are_cached_and_refused_when_stale(tmp_path, judge):
    folder = tmp_path / "ref"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"x" * (i + 1))
    files = sorted(folder.iterdir())
    images = scenes(12)
    meta = reference_meta(judge, 32, str(folder), fingerprint_files(files, folder), 12)
    cache = tmp_path / "ref_stats.safetensors"
    stats, how = cached_reference(cache, judge, meta, [images[:6], images[6:]])
    assert how == "computed" and cache.exists() and stats.features.shape == (12, judge.num_features)
    again, how = cached_reference(cache, judge, meta, None)
    assert how == "cached" and torch.equal(again.features, stats.features)
    # the cached features give the same FD as the images themselves
    m1, m2 = GenerationMetrics(judge, kid_subsets=5), GenerationMetrics(judge, kid_subsets=5)
    m1.update(images, real=True)
    m2.set_reference(again.features)
    for m in (m1, m2):
        m.update(images.flip(-1), real=False)
    assert m1.compute()["fd_judge"] == pytest.approx(m2.compute()["fd_judge"], rel=1e-6)
    # an edited file, another resolution, other weights: refused, naming the field
    os.utime(files[0], ns=(1, 1))
    stale = {**meta, "source_fingerprint": fingerprint_files(files, folder)}
    with pytest.raises(StaleReference, match="source_fingerprint"):
        cached_reference(cache, judge, stale, None)
    with pytest.raises(StaleReference, match="resolution=32.*resolution=64"):
        ReferenceStats.load(cache, {**meta, "resolution": 64})
    with pytest.raises(StaleReference, match="weights_sha256"):
        ReferenceStats.load(cache, {**meta, "weights_sha256": "0" * 64})
    # refresh recomputes and rewrites
    _, how = cached_reference(cache, judge, stale, [images], refresh=True)
    assert (
        how == "computed"
        and ReferenceStats.load(cache, stale).meta["source_fingerprint"] == stale["source_fingerprint"]
    )
    cache.write_bytes(b"not safetensors")
    with pytest.raises(StaleReference, match="unreadable"):
        ReferenceStats.load(cache, meta)


def test_absent_weights_skip_with_the_setting_and_wrong_files_are_errors(tmp_path):
    nets, skipped = build_networks(
        ["inception", "judge"], {}, {"inception": "eval.inception", "judge": "eval.judge"}
    )
    assert nets == [] and len(skipped) == 2
    assert "eval.inception is not set" in skipped[0] and "pt_inception-2015-12-05" in skipped[0]
    with pytest.raises(MissingWeights):
        InceptionFeatures(None)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        InceptionFeatures(tmp_path / "nowhere.pth")
    (tmp_path / "code.pth").write_bytes(b"\x80\x04cos\nsystem\n(S'true'\ntR.")  # a pickle that runs code
    with pytest.raises(
        ValueError, match=r"code.pth is a pickle of .* refused unread \(loading it could run code\)"
    ):
        InceptionFeatures(tmp_path / "code.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception-v3 weights"):
        InceptionFeatures(tmp_path / "other.pth")


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> str:
    """A weights file in the FID Inception layout with random weights (the real file cannot be had here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    torch.save(net.state_dict(), path)
    return str(path)


def test_the_fid_inception_loads_from_a_local_file_and_scores(random_inception):
    net = InceptionFeatures(random_inception)
    assert net.weights_sha256 and len(net.weights_sha256) == 64 and net.num_features == 2048
    images = scenes(8)
    features, logits = net(images)
    assert features.shape == (8, 2048) and logits.shape == (8, 1008) and torch.isfinite(features).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16-mixed trainer's test step: scored in float32
        assert torch.equal(net(images)[0], features)
    m = GenerationMetrics(net, kid_subsets=4)
    m.update(images, real=True)
    m.update(images, real=False)
    out = m.compute()
    assert set(out) >= {"fid", "kid", "is", "precision", "recall"}
    assert abs(out["fid"]) < 1e-3 and math.isfinite(out["is"])


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip):
    import torch.nn.functional as F

    from varctl.metrics.generation import ClipScore

    name, weights = tiny_clip
    metric = ClipScore(name, weights)
    images = scenes(4)
    captions = ["a red circle", "a blue square", "a green triangle", "stripes"]
    metric.update(images, captions)
    clip = metric.clip
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():  # 32 px images, the model's size: no resize
        image = F.normalize(clip.encode_image((images - mean) / std), dim=-1)
        text = F.normalize(clip.encode_text(metric.tokenizer(captions)), dim=-1)
    expected = (100 * (image * text).sum(-1)).clamp_min(0).mean().item()
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-5)
    under_autocast = ClipScore(name, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast.update(images, captions)
    assert float(under_autocast.compute()) == float(metric.compute())
    assert metric.describe()["sha256"] and metric.describe()["network"] == "open_clip:varctl-tiny-clip"
    with pytest.raises(MissingWeights, match="clip_weights is not set"):
        ClipScore(name, None)
