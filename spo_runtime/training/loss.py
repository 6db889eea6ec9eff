"""The formulas of SPO's round (Liang et al., arXiv 2406.04314), as pure functions that tests hold to hand
computations: which two candidates of a branch point make a pair (`select_pair`), and the DPO-style loss
on the DDIM transition log-probabilities of a pair under the policy and the reference (`spo_loss`).
The log-probabilities themselves are `policy.DdimPolicy.logprob`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["select_pair", "spo_loss"]


def select_pair(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (P, k) -> (winner index, loser index, keep mask), each (P,).

    Winner/loser: highest/lowest score; keep when softmax([s_w, s_l]) gives p_w - p_l > threshold
    (p_w - p_l = tanh((s_w - s_l) / 2)).
    """
    w = scores.argmax(dim=1)
    l = scores.argmin(dim=1)
    pair = torch.stack([scores.gather(1, w[:, None])[:, 0], scores.gather(1, l[:, None])[:, 0]], dim=1)
    p = pair.float().softmax(dim=1)
    keep = (p[:, 0] - p[:, 1]) > threshold
    return w, l, keep


def spo_loss(logp_w: torch.Tensor, ref_w: torch.Tensor, logp_l: torch.Tensor, ref_l: torch.Tensor, beta: float, clip: float):
    """-log sigmoid(beta * (log r_w - log r_l)) with r = clamp(exp(logp - logp_ref), 1 - clip, 1 + clip).

    Returns (loss per pair, share of the 2n ratios at the clamp).
    """
    r_w = torch.exp(logp_w - ref_w)
    r_l = torch.exp(logp_l - ref_l)
    clamped = ((r_w <= 1 - clip) | (r_w >= 1 + clip)).float().sum() + ((r_l <= 1 - clip) | (r_l >= 1 + clip)).float().sum()
    r_w, r_l = r_w.clamp(1 - clip, 1 + clip), r_l.clamp(1 - clip, 1 + clip)
    loss = -F.logsigmoid(beta * (torch.log(r_w) - torch.log(r_l)))
    return loss, float(clamped) / (2 * len(loss))
