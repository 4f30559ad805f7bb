"""Tensor helpers shared by the rollout engine and the RL trainers: padding token lists into batches, the
inputs of a prompt + response forward pass, and the log-probs of chosen tokens."""

from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, longest]`` ids with each sequence at the right end (prompts), and the mask of its tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = True
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list], pad, device=None, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, longest]`` values with each sequence at the left end (responses, their log-probs), and its mask."""
    width = max(len(s) for s in seqs)
    values = torch.full((len(seqs), width), pad, dtype=dtype)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        values[i, :len(s)] = torch.tensor(s, dtype=dtype)
        mask[i, :len(s)] = True
    return values.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 on the left padding), as ``generate`` does."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def model_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """Concatenated ids, attention mask and position ids of left-padded prompts + right-padded responses."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return ids, mask.long(), position_ids(mask)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of ``tokens`` (shape ``logits.shape[:-1]``) under ``softmax(logits / temperature)``, in fp32.

    RL scores at the sampling temperature, as the paper's OpenRLHF does, so ratios and KL compare the
    distribution that was sampled; the rollout engine reports them at temperature 1."""
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    return logits.gather(-1, tokens[..., None])[..., 0] - logits.logsumexp(-1)
