import pytest
import torch

from superposition.data import importance_tensor, make_sampler, target_fn
from superposition.spec import parse_spec

N = 40_000  # samples: a Bernoulli rate then has std <= 0.0025, so 0.01 tolerances are 4 sigma


def _sample(raw, n=N, seed=0):
    spec = parse_spec(raw)
    g = torch.Generator().manual_seed(seed)
    return make_sampler(spec).sample(n, g)


def test_activation_rate_and_uniform_magnitude_per_instance():
    x = _sample({"model": {"n_features": 8}, "instances": {"data.feature_probability": [1.0, 0.3, 0.05]}})
    assert x.shape == (N, 3, 8)
    rate = (x != 0).float().mean(dim=(0, 2))
    torch.testing.assert_close(rate, torch.tensor([1.0, 0.3, 0.05]), atol=0.01, rtol=0)
    active = x[:, 0][x[:, 0] != 0]
    assert abs(active.mean().item() - 0.5) < 0.01  # U[0,1] mean
    assert abs(active.var().item() - 1 / 12) < 0.005


def test_signed_and_normal_magnitudes():
    x = _sample({"model": {"n_features": 4}, "data": {"magnitude": "signed", "feature_probability": 1.0}})
    assert x.min() >= -1 and x.max() <= 1 and abs(x.mean().item()) < 0.01
    assert abs(x.var().item() - 1 / 3) < 0.01  # U[-1,1] variance
    y = _sample({"model": {"n_features": 4}, "data": {"magnitude": "normal", "feature_probability": 1.0}})
    assert y.min() >= 0 and y.max() <= 1
    assert abs(y.mean().item() - 0.5) < 0.01 and abs(y.std().item() - 0.2) < 0.01


def test_correlated_pairs_share_activity():
    x = _sample({"model": {"n_features": 6}, "data": {"kind": "correlated", "feature_probability": 0.2}})
    on = x[:, 0] != 0
    assert torch.equal(on[:, 0::2], on[:, 1::2])
    assert abs(on.float().mean().item() - 0.2) < 0.01


def test_anticorrelated_pairs_exclusive_with_marginal_p():
    x = _sample({"model": {"n_features": 6}, "data": {"kind": "anticorrelated", "feature_probability": 0.3}})
    on = x[:, 0] != 0
    assert not (on[:, 0::2] & on[:, 1::2]).any()
    torch.testing.assert_close(on.float().mean(0), torch.full((6,), 0.3), atol=0.015, rtol=0)


def test_column_order_correlated_then_anticorrelated_then_independent():
    raw = {
        "model": {"n_features": 7},
        "data": {"n_correlated_pairs": 1, "n_anticorrelated_pairs": 1, "feature_probability": 0.4},
    }
    on = _sample(raw)[:, 0] != 0
    assert torch.equal(on[:, 0], on[:, 1])
    assert not (on[:, 2] & on[:, 3]).any()
    independent_both = (on[:, 4] & on[:, 5]).float().mean().item()
    assert abs(independent_both - 0.16) < 0.01


@pytest.mark.parametrize("early", [False, True])
def test_hierarchy_rules(early):
    x = _sample({"data": {"kind": "hierarchy", "tree_depth": 3, "early_stopping": early}}, n=20_000)
    on = x[:, 0] != 0
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    # Level 1 (features 0, 1) children of the always-on root; level 2 features 2..5; level 3 features 6..13.
    starts = [0, 2, 6, 14]
    for level in range(3):
        kids = on[:, starts[level] : starts[level + 1]]
        a, b = kids[:, 0::2], kids[:, 1::2]
        assert not (a & b).any()
        parent = torch.ones_like(a) if level == 0 else on[:, starts[level - 1] : starts[level]]
        assert not ((a | b) & ~parent).any()  # children of an off parent are off
        tol = 4 * (0.25 / parent.sum().item()) ** 0.5  # 4 sigma of a Bernoulli mean over the on parents
        either = (a | b)[parent].float().mean().item()
        assert abs(either - (0.5 if early else 1.0)) < tol
        assert abs(a[parent].float().mean().item() - (0.25 if early else 0.5)) < tol


def test_same_seed_same_data_bit_for_bit():
    raw = {"model": {"n_features": 5}, "instances": {"data.feature_probability": [0.5, 0.1]}}
    assert torch.equal(_sample(raw, 100, seed=3), _sample(raw, 100, seed=3))
    assert not torch.equal(_sample(raw, 100, seed=3), _sample(raw, 100, seed=4))


def test_normalize_gives_unit_norm_points():
    x = _sample({"model": {"n_features": 5}, "data": {"normalize": True, "feature_probability": 0.5}}, n=1000)
    norms = x.norm(dim=-1)
    nonzero = norms > 0
    torch.testing.assert_close(norms[nonzero], torch.ones_like(norms[nonzero]))


def test_importance_ratio_and_list_and_targets():
    spec = parse_spec({"model": {"n_features": 3}, "instances": {"task.importance": [0.5, [3.0, 2.0, 1.0]]}})
    torch.testing.assert_close(importance_tensor(spec), torch.tensor([[1.0, 0.5, 0.25], [3.0, 2.0, 1.0]]))
    x = torch.tensor([[[-1.0, 0.5]]])
    torch.testing.assert_close(target_fn("abs", x), torch.tensor([[[1.0, 0.5]]]))
    torch.testing.assert_close(target_fn("relu-plus-x", x, torch.tensor([2.0])), torch.tensor([[[-2.0, 1.5]]]))
