import math

import pytest
import torch

from ecoflap.pruners.masks import nm_mask, parse_nm, row_mask
from ecoflap.pruners.sparsegpt import prune_sparsegpt
from ecoflap.pruners.wanda import prune_wanda


def test_row_mask_takes_the_lowest_of_each_row():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9]])
    assert row_mask(scores, 0.5).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_row_mask_with_exact_count_gives_the_extra_to_the_cheapest_rows():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9], [9.0, 8.0, 7.0, 6.0]])
    mask = row_mask(scores, 0.0, count=5)
    assert mask.sum().item() == 5
    # every row loses 1; the two rows whose second-lowest score is smallest lose one more
    assert mask.sum(dim=1).tolist() == [2, 2, 1]


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("1:8", (1, 8)), (None, None)])
def test_parse_nm(text, expected):
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text", ["4:2", "0:4", "2-4", "a:b", "4:4"])
def test_parse_nm_rejects_bad_patterns(text):
    with pytest.raises(ValueError, match="N:M"):
        parse_nm(text)


def test_nm_mask_groups():
    scores = torch.rand(8, 16)
    mask = nm_mask(scores, 2, 4)
    assert (mask.reshape(8, 4, 4).sum(-1) == 2).all()


def _layer_problem(seed=0, rows=48, columns=96, tokens=768):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / math.sqrt(columns)
    scales = torch.rand(columns, generator=g) * 3
    X = (torch.randn(tokens, columns, generator=g) @ mixing) * scales
    W = torch.randn(rows, columns, generator=g)
    return W, X


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_reconstructs_better_than_wanda(sparsity):
    W, X = _layer_problem()
    wanda, sgpt = W.clone(), W.clone()
    prune_wanda(wanda, (X * X).sum(0), sparsity)
    prune_sparsegpt(sgpt, X.t() @ X, X.shape[0], sparsity, blocksize=32)
    err_wanda = torch.linalg.norm(X @ W.t() - X @ wanda.t())
    err_sgpt = torch.linalg.norm(X @ W.t() - X @ sgpt.t())
    assert (sgpt == 0).sum().item() == math.floor(W.numel() * sparsity)
    assert err_sgpt < err_wanda


def test_sparsegpt_nm():
    W, X = _layer_problem(1)
    prune_sparsegpt(W, X.t() @ X, X.shape[0], 0.5, nm=(2, 4), blocksize=32)
    assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all()


def test_wanda_on_a_hand_worked_case():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    sq = torch.tensor([16.0, 1.0, 0.25, 1.0])  # norms 4, 1, 0.5, 1 -> scores 4, 2, 1.5, 4
    prune_wanda(W, sq, 0.5)
    assert W.tolist() == [[1.0, 0.0, 0.0, -4.0]]


def _with_dead_inputs(seed=2, rows=48, columns=96, dead=24):
    """A layer problem whose first `dead` inputs are zero on every token (all in the first
    column block at blocksize 32, so a share in proportion to block width cannot hold them)."""
    W, X = _layer_problem(seed, rows, columns)
    X[:, :dead] = 0
    return W, X, torch.arange(columns) < dead


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_dead_inputs_count_toward_the_layers_zeros(sparsity):
    W, X, dead = _with_dead_inputs()
    mask = prune_sparsegpt(W, X.t() @ X, X.shape[0], sparsity, blocksize=32)
    expected = math.floor(W.numel() * sparsity)
    assert (W == 0).sum().item() == mask.sum().item() == expected
    assert (W[:, dead] == 0).all()  # free to prune, so pruned first
    assert torch.equal(mask, W == 0)


def test_sparsegpt_exact_count_with_dead_inputs_spread_over_blocks():
    W, X = _layer_problem(3, rows=40, columns=128)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[[0, 1, 2, 40, 41, 77, 100, 127]] = True
    X[:, dead] = 0
    prune_sparsegpt(W, X.t() @ X, X.shape[0], 0.0, blocksize=32, count=1001)
    assert (W == 0).sum().item() == 1001
    assert (W[:, dead] == 0).all()


def test_sparsegpt_more_dead_weights_than_zeros_keeps_the_largest_and_no_live_weight_moves():
    W, X, dead = _with_dead_inputs(dead=40)
    original = W.clone()
    count = 30 * W.shape[0] + 7  # fewer than the 40 * rows dead weights
    prune_sparsegpt(W, X.t() @ X, X.shape[0], 0.0, blocksize=32, count=count)
    assert (W == 0).sum().item() == count
    assert torch.equal(W[:, ~dead], original[:, ~dead])  # a dead column's error reaches no live one
    zeroed = original[:, dead][W[:, dead] == 0].abs()
    kept = original[:, dead][W[:, dead] != 0].abs()
    assert zeroed.max() <= kept.min()  # smallest dead weights first
    assert torch.allclose(X @ W.t(), X @ original.t())  # no calibration output changes


def test_sparsegpt_nm_with_dead_inputs_is_exact():
    W, X, dead = _with_dead_inputs(columns=128, dead=48)
    X[:, 60:64] = 0  # a whole group of four dead
    prune_sparsegpt(W, X.t() @ X, X.shape[0], 0.5, nm=(2, 4), blocksize=32)
    assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2).all()


def test_sparsegpt_dead_free_problem_unchanged_by_the_dead_input_rule():
    """Without dead inputs the mask is the published algorithm's: checked against a plain
    restatement of it (identity dampening, an explicit inverse)."""
    W, X = _layer_problem(4, rows=16, columns=64)
    ours = W.clone()
    mask = prune_sparsegpt(ours, X.t() @ X, X.shape[0], 0.5, blocksize=64)
    H = 2 * X.t().double() @ X.double() / X.shape[0]
    H += 0.01 * torch.diag(H).mean() * torch.eye(64, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    saliency = W.double() ** 2 / torch.diag(Hinv).reshape(1, -1) ** 2
    reference = torch.zeros_like(mask)
    reference.view(-1)[torch.topk(saliency.flatten(), W.numel() // 2, largest=False).indices] = True
    assert torch.equal(mask, reference)
