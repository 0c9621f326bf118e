"""Output head + cross-entropy in one pass, chunk by chunk.

The plain way builds the [tokens x vocabulary] logits, keeps an fp32 log-softmax of them for the
backward pass (for a 49k vocabulary that is ~200 KB per token) and runs a separate log-softmax
backward. Here each chunk's logits are made, reduced to a log-sum-exp and the target logit,
and dropped; the backward pass makes them again and turns them straight into the gradient
(softmax - one-hot). Only the frozen head's weight is involved, so no weight gradient is needed.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows with a target of -log softmax(hidden @ weight.T)[target]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024):
        weight = weight.to(hidden.dtype)
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows] @ weight.T).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            t = targets[rows]
            valid = t != IGNORE_INDEX
            target_logit = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
            total += ((lse[rows] - target_logit) * valid).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = torch.exp((hidden[rows] @ weight.T).float() - lse[rows].unsqueeze(1))
            t = targets[rows]
            valid = t != IGNORE_INDEX
            probs[torch.arange(probs.shape[0], device=probs.device), t.clamp_min(0)] -= 1.0
            probs *= (valid.to(probs.dtype) * grad_total).unsqueeze(1)
            grad_hidden[rows] = probs.to(hidden.dtype) @ weight
        return grad_hidden, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int = 1024) -> torch.Tensor:
    """hidden [N, H], weight [V, H] (frozen), targets [N] (-100 = ignored) -> summed loss."""
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk)
