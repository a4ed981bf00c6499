import math

import pytest
import torch

from superposition.models import build_model
from superposition.spec import parse_spec


def _model(**model):
    return build_model(parse_spec({"model": model, "instances": {"seed": [0, 1, 2]}}))


def _randomize_(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


X = torch.randn(7, 3, 6, generator=torch.Generator().manual_seed(1))


def test_linear_and_relu_output_formulas():
    for kind, act in (("linear", lambda t: t), ("relu-output", torch.relu)):
        m = _randomize_(_model(kind=kind, n_features=6, d_hidden=2))
        W, b = m.W.detach(), m.b_final.detach()
        for i in range(3):
            expected = act(X[:, i] @ W[i].T @ W[i] + b[i])  # x' = W^T W x + b, row vectors
            torch.testing.assert_close(m(X)[:, i], expected)


def test_untied_and_neuron_and_mlp_formulas():
    m = _randomize_(_model(kind="relu-output", n_features=6, d_hidden=2, tied=False))
    W1, W2, b = m.W1.detach(), m.W2.detach(), m.b_final.detach()
    torch.testing.assert_close(m(X)[:, 1], torch.relu(X[:, 1] @ W1[1].T @ W2[1].T + b[1]))

    n = _randomize_(_model(kind="neuron", n_features=6, d_hidden=4, bias_hidden=True))
    W, bh, b = n.W.detach(), n.b_hidden.detach(), n.b_final.detach()
    torch.testing.assert_close(n(X)[:, 2], torch.relu(torch.relu(X[:, 2] @ W[2].T + bh[2]) @ W[2] + b[2]))

    mlp = _randomize_(_model(kind="mlp", n_features=6, d_hidden=4))
    assert not mlp.tied
    W1, W2, b = mlp.W1.detach(), mlp.W2.detach(), mlp.b_final.detach()
    torch.testing.assert_close(mlp(X)[:, 0], torch.relu(torch.relu(X[:, 0] @ W1[0].T) @ W2[0].T + b[0]))


@pytest.mark.parametrize("skip", [True, False])
def test_residual_mlp_formula(skip):
    spec = parse_spec(
        {"model": {"kind": "residual-mlp", "n_features": 6, "d_hidden": 3, "d_embed": 10, "n_layers": 2, "skip": skip}}
    )
    m = _randomize_(build_model(spec))
    W_E = m.W_E[0]
    assert torch.allclose(W_E.norm(dim=-1), torch.ones(6))  # unit-norm rows, kept as a frozen buffer
    assert "W_E" not in dict(m.named_parameters())
    x = X[:, :1]
    r = x[:, 0] @ W_E
    for layer in range(2):
        mlp = torch.relu(r @ m.W_in[0, layer].detach().T) @ m.W_out[0, layer].detach().T
        r = r + mlp if skip else mlp
    torch.testing.assert_close(m(x)[:, 0], r @ W_E.T)


def test_identity_embedding_is_plain_mlp():
    spec = parse_spec({"model": {"kind": "residual-mlp", "n_features": 5, "d_hidden": 3, "embedding": "identity"}})
    m = build_model(spec)
    torch.testing.assert_close(m.W_E[0], torch.eye(5))


def test_init_is_per_instance_xavier_and_independent_of_instance_count():
    big = build_model(parse_spec({"model": {"n_features": 30, "d_hidden": 20}, "instances": {"seed": list(range(40))}}))
    std = big.W.detach().std().item()
    assert abs(std - math.sqrt(2 / 50)) < 0.01
    one = build_model(parse_spec({"model": {"n_features": 30, "d_hidden": 20}, "instances": {"seed": [7]}}))
    torch.testing.assert_close(one.W[0], big.W[7])
    assert torch.count_nonzero(big.b_final) == 0


def test_notebook_init_uses_whole_tensor_fans():
    spec = parse_spec(
        {"model": {"n_features": 3, "d_hidden": 2, "init": "notebook"}, "instances": {"seed": list(range(405))}}
    )
    std = build_model(spec).W.detach().std().item()
    assert abs(std - math.sqrt(2 / (2 * 3 + 405 * 3))) < 0.005  # ~0.04, as REFERENCE.md notes


def test_kaiming_uniform_matches_torch_per_instance():
    """W1, W2 follow nn.init.kaiming_uniform_ (a = 0) per instance: U(±sqrt(6 / fan_in)), variance 2 / fan_in."""
    m = build_model(parse_spec({"model": {"kind": "mlp", "n_features": 100, "d_hidden": 40}}))
    for w, fan_in in ((m.W1, 100), (m.W2, 40)):
        bound = math.sqrt(6 / fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.97 * bound
        # 4000 draws: the sample std of U(-b, b) is within 3% of b / sqrt(3) (its relative s.e. is ~0.7%)
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.03
    ref = torch.nn.init.kaiming_uniform_(torch.empty(40, 100))
    assert abs(ref.abs().max().item() - m.W1.abs().max().item()) < 0.01


def test_notebook_kaiming_uses_whole_tensor_fans_and_residual_keeps_linear_default():
    nb = build_model(parse_spec({"model": {"kind": "mlp", "n_features": 10, "d_hidden": 10, "init": "notebook"}}))
    bound = math.sqrt(6 / (10 * 10))  # torch on a (inst, 10, 10) tensor: fan_in = 10 * 10
    assert bound * 0.9 < nb.W1.abs().max() <= bound
    res = build_model(parse_spec({"model": {"kind": "residual-mlp", "n_features": 20, "d_embed": 64, "d_hidden": 8}}))
    assert 0.95 / math.sqrt(64) < res.W_in.abs().max() <= 1 / math.sqrt(64)  # nn.Linear's a = sqrt(5)
    assert 0.9 / math.sqrt(8) < res.W_out.abs().max() <= 1 / math.sqrt(8)


def test_mixed_linear_and_relu_instances_share_one_model():
    spec = parse_spec(
        {"model": {"n_features": 6, "d_hidden": 2}, "instances": {"model.kind": ["linear", "relu-output"]}}
    )
    m = _randomize_(build_model(spec))
    out = m(X[:, :2])
    W, b = m.W.detach(), m.b_final.detach()
    torch.testing.assert_close(out[:, 0], X[:, 0] @ W[0].T @ W[0] + b[0])
    torch.testing.assert_close(out[:, 1], torch.relu(X[:, 1] @ W[1].T @ W[1] + b[1]))
