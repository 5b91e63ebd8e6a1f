"""Sinkhorn marginals, per-study grouping, the propagation loss and count likelihoods."""

import numpy as np
import pytest
import scipy.stats as st
import torch
import torch.nn.functional as F

from scproto_scale.model.likelihoods import nb_log_prob, zinb_log_prob
from scproto_scale.model.sinkhorn import hard_codes, sinkhorn
from scproto_scale.model.swav import (
    group_codes,
    per_study_swav_loss,
    propagation_dual_loss,
    propagation_loss,
    swapped_prediction_loss,
)


def _scores(b, K, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(K, d, generator=g), dim=1)
    return z @ c.T


@pytest.mark.parametrize(("b", "K"), [(128, 30), (64, 300), (500, 100)])
def test_sinkhorn_marginals(b, K):
    scores = _scores(b, K)
    codes = sinkhorn(scores, epsilon=0.05, n_iters=200)
    Q = codes / b  # the transport plan before the final ×B rescaling
    np.testing.assert_allclose(Q.sum(dim=1).numpy(), 1 / b, atol=1e-6)  # each cell: 1/B
    np.testing.assert_allclose(Q.sum(dim=0).numpy(), 1 / K, atol=1e-3)  # each prototype: 1/K
    assert torch.allclose(codes.sum(1), torch.ones(b), atol=1e-5)


def test_sinkhorn_default_iterations_spread_cells_over_prototypes():
    # With the defaults (ε=0.02, 3 iterations) on scores where every cell prefers the same
    # prototype, equipartition must still spread the hard codes over many prototypes.
    b, K = 256, 32
    scores = _scores(b, K) * 0.1
    scores[:, 0] += 0.5
    assert scores.argmax(1).unique().numel() == 1
    codes = hard_codes(sinkhorn(scores))
    used = codes.sum(0)
    assert (used > 0).sum() >= K * 0.9
    assert used.max() <= 3 * b / K


def test_sinkhorn_is_invariant_to_a_score_shift_and_handles_sharp_scores():
    s = _scores(64, 16)
    a = sinkhorn(s, 0.02, 3)
    b = sinkhorn(s + 0.7, 0.02, 3)
    assert torch.allclose(a, b, atol=1e-5)
    sharp = sinkhorn(s, 1e-3, 3)  # exp(1/1e-3) would overflow without the max shift
    assert torch.isfinite(sharp).all()


def _log_domain_reference(scores: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    logq = scores.double().t() / epsilon
    K, b = logq.shape
    for _ in range(n_iters):
        logq = logq - torch.logsumexp(logq, 1, keepdim=True) - np.log(K)
        logq = logq - torch.logsumexp(logq, 0, keepdim=True) - np.log(b)
    return torch.exp(logq + np.log(b)).t()


@pytest.mark.parametrize(("epsilon", "scale"), [(0.02, 1.0), (0.05, 1.0), (0.0015, 1.0),
                                                (1e-3, 0.3)])
def test_sinkhorn_scaled_and_log_domain_paths_equal_a_float64_reference(epsilon, scale):
    # ε = 0.02 / 0.05 take the float64 scaling path (score range / ε ≤ 700); ε = 0.0015 on
    # unit-range cosines exceeds it and takes the log domain; 1e-3 on a 0.3× range is scaled.
    scores = _scores(300, 500, seed=3) * scale
    expected = _log_domain_reference(scores, epsilon, 3)
    got = sinkhorn(scores, epsilon, 3)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), atol=2e-5)


def test_per_study_loss_equals_mean_of_separate_groups():
    V, B, K = 4, 60, 20
    scores = torch.stack([_scores(B, K, seed=v) for v in range(V)])
    groups = torch.tensor([0] * 20 + [1] * 25 + [2] * 15)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    scores, groups = scores[:, perm], groups[perm]
    kw = dict(temperature=0.1, epsilon=0.05, n_iters=3, hard=False)
    expected = torch.stack([swapped_prediction_loss(scores[:, groups == g], **kw)
                            for g in (0, 1, 2)]).mean()
    assert torch.allclose(per_study_swav_loss(scores, groups, **kw), expected)
    # Equal weight per group: not the same as one Sinkhorn over the pooled cells.
    pooled = swapped_prediction_loss(scores, **kw)
    assert not torch.allclose(pooled, expected)


def test_per_study_sinkhorn_equipartitions_within_each_study():
    # Two studies whose cells sit in different halves of the sphere: a pooled Sinkhorn gives
    # each study its own prototypes; per-study Sinkhorn spreads every study over all of them.
    K, b = 8, 400
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(K, 4, generator=g), dim=1)
    z = F.normalize(torch.randn(2 * b, 4, generator=g), dim=1)
    study = torch.arange(2 * b) >= b
    z[study] = F.normalize(z[study] + 3 * protos[:4].mean(0), dim=1)
    z[~study] = F.normalize(z[~study] + 3 * protos[4:].mean(0), dim=1)
    s = z @ protos.T
    for st_mask in (study, ~study):
        codes = hard_codes(sinkhorn(s[st_mask], 0.05, 50)).sum(0)
        assert (codes > 0).all(), codes  # every prototype used inside every study


def test_swapped_prediction_hand_computed():
    # V=2 views of 2 cells, K=2: cell A prefers prototype 0 and cell B prototype 1 in both views,
    # so the hard codes are A→0, B→1 and the loss is the cross-entropy of the other view.
    scores = torch.tensor([[[0.9, 0.1], [0.1, 0.9]], [[0.8, 0.2], [0.3, 0.7]]])
    tau = 0.5
    loss = swapped_prediction_loss(scores, temperature=tau, epsilon=0.05, n_iters=3, hard=True)
    lp = F.log_softmax(scores / tau, dim=-1)
    from_view0 = -(lp[1, 0, 0] + lp[1, 1, 1]) / 2  # codes of view 0 predicted by view 1
    from_view1 = -(lp[0, 0, 0] + lp[0, 1, 1]) / 2
    assert torch.allclose(loss, (from_view0 + from_view1) / 2)


@pytest.mark.parametrize("hard", [True, False])
def test_swapped_prediction_equals_its_definition_for_many_views(hard):
    """The summed-views form equals −Σ_k q_a^k log softmax(u_v/τ)^k averaged over a, v≠a."""
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(6, 40, 50, generator=g), dim=-1)
    loss = swapped_prediction_loss(scores, temperature=0.1, hard=hard)
    lp = F.log_softmax(scores / 0.1, dim=-1)
    terms = []
    for a in (0, 1):
        q = sinkhorn(scores[a], 0.02, 3)
        q = hard_codes(q) if hard else q
        terms += [-(q * lp[v]).sum(-1).mean() for v in range(6) if v != a]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_propagation_loss_hand_made():
    # cosines: cell 0 is close to prototype 1 (0.9), cell 1's best is 0.3, cell 2's best 0.6
    scores = torch.tensor([[0.1, 0.9], [0.3, -0.2], [0.6, 0.5]], requires_grad=True)
    loss = propagation_loss(scores)
    assert loss.item() == pytest.approx(0.7)  # worst-covered cell: 1 - 0.3
    loss.backward()
    grad = torch.zeros(3, 2)
    grad[1, 0] = -1.0  # only the worst cell's nearest prototype similarity is pulled up
    assert torch.equal(scores.grad, grad)
    # dual: prototype 0's nearest cell has cos 0.6, prototype 1's has 0.9 → max(0.4, 0.1)
    assert propagation_dual_loss(scores.detach()).item() == pytest.approx(0.4)


@pytest.mark.parametrize("pulls", ["both", "prototypes"])
def test_propagation_pulls_cells_or_only_prototypes(pulls):
    from scproto_scale.config import ModelConfig
    from scproto_scale.data.batch import ViewBatch
    from scproto_scale.model.scproto import ScProto

    torch.manual_seed(0)
    cfg = ModelConfig(latent_dim=4, n_prototypes=5, prop_pulls=pulls, dropout=0.0)
    model = ScProto(n_genes=6, n_conditions=2, config=cfg)
    counts = torch.poisson(torch.full((2, 8, 6), 3.0))
    batch = ViewBatch(counts, counts.sum(-1) + 1, torch.zeros(2, 8, dtype=torch.long),
                      torch.zeros(8, dtype=torch.long), [0])
    model(batch)["prop"].backward()
    encoder_grad = sum(float(p.grad.abs().sum()) for p in model.cvae.parameters()
                       if p.grad is not None)
    assert float(model.prototypes.weight.grad.abs().sum()) > 0
    assert (encoder_grad > 0) == (pulls == "both")


def test_nb_and_zinb_log_prob_match_scipy():
    rng = np.random.default_rng(0)
    mu = rng.gamma(2.0, 3.0, size=(50, 7)) + 1e-3
    theta = rng.gamma(2.0, 2.0, size=(50, 7)) + 1e-2
    x = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
    ref = st.nbinom.logpmf(x, theta, theta / (theta + mu))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = nb_log_prob(t(x), t(mu), t(theta)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)

    pi_logit = rng.normal(size=(50, 7))
    pi = 1 / (1 + np.exp(-pi_logit))
    zref = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(ref)), np.log(1 - pi) + ref)
    zgot = zinb_log_prob(t(x), t(mu), t(theta), t(pi_logit)).numpy()
    np.testing.assert_allclose(zgot, zref, rtol=1e-6, atol=1e-6)


def test_study_queue_is_a_per_study_fifo():
    from scproto_scale.model.swav import StudyQueue

    q = StudyQueue(n_groups=2, length=3, dim=2)
    z = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0], [2.0, 0]])
    q.push(z[:2], torch.tensor([0, 1]))
    assert q.filled.tolist() == [1, 1]
    q.push(z[2:], torch.tensor([0, 0]))
    assert q.filled.tolist() == [3, 1]
    assert torch.equal(q.z[0], torch.stack([z[2], z[3], z[0]]))  # newest first
    q.push(torch.ones(2, 2) * 5, torch.tensor([0, 0]))
    assert torch.equal(q.z[0, :2], torch.ones(2, 2) * 5) and torch.equal(q.z[0, 2], z[2])
    state = q.state_dict()
    r = StudyQueue(2, 3, 2)
    r.load_state_dict(state)
    assert torch.equal(r.z, q.z) and torch.equal(r.filled, q.filled)
    scores = q.scores(torch.eye(2), [0, 1])
    assert set(scores) == {0, 1} and scores[0].shape == (3, 2) and scores[1].shape == (1, 2)
    assert set(q.scores(torch.eye(2), [1])) == {1}  # only the step's groups are scored


def test_recentred_queue_removes_a_common_drift_of_the_embedding():
    """A queue that is the current cells moved by δ scores as the current cells themselves."""
    from scproto_scale.model.swav import StudyQueue

    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    protos = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    delta = torch.tensor([0.4, -0.2, 0.1, 0.3])
    q = StudyQueue(n_groups=3, length=6, dim=4)
    q.push(z, torch.zeros(6, dtype=torch.long))
    q.push(z[:2], torch.full((2,), 2, dtype=torch.long))
    current = torch.cat([(z + delta)[torch.randperm(6, generator=g)], z[:1]])
    groups = torch.tensor([0] * 6 + [1])
    plain = q.scores(protos, [0, 1, 2])
    moved = q.scores(protos, [0, 1, 2], current, groups)
    torch.testing.assert_close(moved[0], (z + delta) @ protos.t())
    torch.testing.assert_close(moved[2], plain[2])  # no current cells of group 2: unshifted
    assert set(moved) == {0, 2}  # group 1 has no queued rows
    # the stale queue biases the batch's codes; recentred, they are those of a fresh queue
    batch = current[:6] @ protos.t()
    fresh = group_codes(batch, (z + delta) @ protos.t(), epsilon=0.05)
    torch.testing.assert_close(group_codes(batch, moved[0], epsilon=0.05), fresh)
    assert (group_codes(batch, plain[0], epsilon=0.05) - fresh).abs().max() > 0.05


def test_queue_rows_change_the_codes_but_only_batch_rows_are_used():
    scores = _scores(16, 40)
    queue = _scores(200, 40, seed=5)
    kw = dict(temperature=0.1, epsilon=0.05, n_iters=3, hard=False)
    V = torch.stack([scores, scores.roll(1, 0)])
    plain = swapped_prediction_loss(V, **kw)
    queued = swapped_prediction_loss(V, queue_scores=queue, **kw)
    assert not torch.allclose(plain, queued)
    # codes of the batch rows = the last rows of Sinkhorn over the stack
    stacked = sinkhorn(torch.cat([queue, scores]), 0.05, 3)[-16:]
    assert torch.allclose(stacked.sum(1), torch.ones(16), atol=1e-5)


def test_usage_diagnostics_perplexity_and_mean_resultant():
    """Prototype perplexity counts effective prototypes; R̄ is 1 only for one shared direction."""
    from scproto_scale.train.loop import mean_resultant_length, prototype_perplexity

    assert prototype_perplexity(torch.tensor([5, 5, 5, 5, 0])) == pytest.approx(4.0)
    assert prototype_perplexity(torch.tensor([0, 9, 0])) == pytest.approx(1.0)
    same = F.normalize(torch.ones(50, 8), dim=1)
    assert mean_resultant_length(same) == pytest.approx(1.0)
    x = F.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert mean_resultant_length(torch.cat([x, -x])) == pytest.approx(0.0, abs=1e-12)
    assert mean_resultant_length(x) < 0.3  # 200 random directions in R^8: ≈ 1/sqrt(200)
    assert np.isnan(mean_resultant_length(torch.zeros(0, 8)))
    from scproto_scale.train.loop import cell_prototype_usage

    use = cell_prototype_usage(np.array([0, 0, 3, 3]), same[:4].numpy(), n_prototypes=5)
    assert use == {"perplexity": 2.0, "used": 2, "mean_resultant": 1.0}


def test_collapse_message_names_the_resultant_and_the_prototypes_used():
    """A collapsed embedding (one shared direction) is flagged with its numbers; a spread one
    is not."""
    from scproto_scale.train.loop import cell_prototype_usage, collapse_message

    gen = torch.Generator().manual_seed(0)
    shared = F.normalize(torch.ones(100, 8) + 0.01 * torch.randn(100, 8, generator=gen), dim=1)
    collapsed = cell_prototype_usage(np.zeros(100, dtype=np.int64), shared.numpy(), 300)
    msg = collapse_message(collapsed, 300)
    assert msg is not None and "1.000" in msg and "1 of 300 prototypes" in msg
    spread = F.normalize(torch.randn(100, 8, generator=gen), dim=1)
    ok = cell_prototype_usage(np.arange(100) % 7, spread.numpy(), 300)
    assert ok["mean_resultant"] < 0.5 and collapse_message(ok, 300) is None
