"""head_attribution: d loss / d head scale at 1 equals central finite differences; integrated
gradients over the gates are exact where the loss is linear in them and add up to ablating every head."""

import pytest
import torch

from helpers import tiny_models as tm
from diffcirc.processor import Scale, Session, Zero, head_attribution, integrated_head_attribution, mean_head_outputs

EPS = 5e-2  # float32 losses: larger steps keep rounding noise (~1e-7 / EPS) below the tolerance


@pytest.fixture(scope="module")
def setup():
    model = tm.unet2d()
    session = Session(model)
    x, t = tm.unet2d_inputs(2)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))

    def loss():
        return ((model(x, t).sample - target) ** 2).mean()

    return model, session, loss


def test_scores_match_central_differences_for_every_head(setup):
    model, session, loss = setup
    scores = head_attribution(session, loss)
    assert list(scores.columns) == ["layer", "head", "score"] and len(scores) == 24
    fd = []
    with torch.no_grad():
        for layer, head in session.heads():
            with session.intervene([Scale(layer, head, alpha=1 + EPS)]):
                up = loss().item()
            with session.intervene([Scale(layer, head, alpha=1 - EPS)]):
                down = loss().item()
            fd.append((up - down) / (2 * EPS))
    fd = torch.tensor(fd, dtype=torch.float64)
    got = torch.tensor(scores["score"].to_numpy())
    assert fd.abs().max() > 1e-3  # heads matter, so the comparison is not vacuous
    torch.testing.assert_close(got, fd, atol=1e-2 * fd.abs().max().item(), rtol=2e-2)


def test_mean_baseline_matches_finite_differences_of_the_gate(setup):
    model, session, loss = setup
    x_other = [tm.unet2d_inputs(2, seed=s)[0] for s in (40, 41)]
    t = torch.tensor([10, 500])
    means = mean_head_outputs(session, lambda xb: model(xb, t), x_other)
    layer = "mid_block.attentions.0"
    scores = head_attribution(session, loss, baseline=means, layers=[layer])
    assert set(scores["layer"]) == {layer}
    for head in (0, 5):
        values = []
        for g in (1 + EPS, 1 - EPS):
            gates = {layer: torch.ones(8)}
            gates[layer][head] = g
            with session.gate(gates, means), torch.no_grad():
                values.append(loss().item())
        fd = (values[0] - values[1]) / (2 * EPS)
        assert scores["score"].iloc[head] == pytest.approx(fd, rel=2e-2, abs=1e-5)


def test_gates_compose_with_zero_interventions_and_need_a_graph(setup):
    model, session, loss = setup
    with session.intervene([Zero("mid_block.attentions.0", 2)]):
        scores = head_attribution(session, loss, layers=["mid_block.attentions.0"])
    assert scores["score"].iloc[2] == 0.0 and scores["score"].abs().max() > 0  # an ablated head has no effect
    with pytest.raises(ValueError, match="autograd"):
        with torch.no_grad():
            head_attribution(session, loss)


class _OneAttention(torch.nn.Module):
    """One diffusers attention layer and nothing after it: its output, hence a linear read-out of
    it, is linear in the head gates."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        torch.manual_seed(3)
        self.attn = Attention(query_dim=16, heads=4, dim_head=4)

    def forward(self, x):
        return self.attn(x)


def test_integrated_gradients_equal_the_exact_effects_where_the_loss_is_linear_in_the_gates():
    model = _OneAttention()
    session = Session(model)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2))

    def loss():
        return (model(x) * w).sum()

    with torch.no_grad():
        clean = loss().item()
        exact = []
        for layer, head in session.heads():
            with session.intervene([Zero(layer, head)]):
                exact.append(loss().item() - clean)
    exact = torch.tensor(exact, dtype=torch.float64)
    assert exact.abs().min() > 1e-3
    for steps in (1, 3):
        ig = torch.tensor(integrated_head_attribution(session, loss, steps)["score"].to_numpy())
        torch.testing.assert_close(-ig, exact, rtol=1e-4, atol=1e-5)


def test_integrated_gradients_add_up_to_ablating_every_head(setup):
    """Completeness: the heads' shares sum to L(every head ablated) - L(model), which the
    first-order scores, slopes at g = 1 alone, do not."""
    model, session, loss = setup
    with torch.no_grad():
        clean = loss().item()
        with session.intervene([Zero(layer, head) for layer, head in session.heads()]):
            all_ablated = loss().item()
    change = all_ablated - clean
    ig = integrated_head_attribution(session, loss, 16)
    assert ig[["layer", "head"]].equals(head_attribution(session, loss)[["layer", "head"]])
    assert -ig["score"].sum() == pytest.approx(change, rel=1e-2)
    first_order = -head_attribution(session, loss)["score"].sum()
    assert abs(first_order - change) > 10 * abs(-ig["score"].sum() - change)
    with pytest.raises(ValueError, match="steps"):
        integrated_head_attribution(session, loss, 0)
