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
