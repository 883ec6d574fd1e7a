"""Process reward: a reward at the end of every reasoning step, instead of one for the whole answer.

Paper card
----------
DeepSeekMath (Shao et al. 2024, §4.1.3, "process supervision"). Completion y_i of a group of G has steps
j = 1..K_i, the step j ending at token index(j) with reward r_i^j. All the group's step rewards are normalized
together, and a token's advantage is the sum of the normalized rewards of the steps that end at or after it::

    R = { r_i^j : i = 1..G, j = 1..K_i }                        every step reward of the group
    r̃_i^j = (r_i^j − mean(R)) / (std(R) + ε_std)
    Â_it = Σ_{j : index(j) ≥ t} r̃_i^j

Outcome supervision is the special case of one step, at the last token: Â_it = r̃_i for every t (GRPO's
``group_advantages``).

On ``arith`` every answer token is a step. Its reward says whether the answer is still right so far::

    r^k = 1 if y_1 … y_k is a prefix of the sum's digits else 0      (an answer token)
    r^k = 1 if y_1 … y_{k−1} is the whole sum else 0                  (the end token: the outcome)

so "75" for 47+38 (the dropped carry) earns 0 from its first digit on, and "85" earns 1 at every step; a wrong
ones digit after a right tens digit ("84") keeps the credit of the tens digit.

=======================  ===================================
symbol                   code
=======================  ===================================
r_i^j                    ``step_rewards`` (B·G, T)
index(j)                 ``step_mask`` (B·G, T): 1 where a step ends
ε_std                    ``eps`` (``cfg.epsilon_std``)
Â_it                     ``process_advantages`` (B·G, T)
=======================  ===================================
"""

from __future__ import annotations

import torch


def process_advantages(
    step_rewards: torch.Tensor, step_mask: torch.Tensor, group_size: int, eps: float = 1e-4
) -> torch.Tensor:
    """Â_it = Σ_{j: index(j) ≥ t} (r_i^j − mean(R)) / (std(R) + ε), R = every step reward of the group (see above).

    step_rewards, step_mask: (B·G, T), the G completions of a prompt in adjacent rows; a step's reward sits at the
    token that ends it, and step_mask is 1 there. std is the unbiased (n − 1) one, as ``group_advantages``. A group
    whose step rewards are all equal gets Â = 0. Tokens after a completion's last step get 0. Returns (B·G, T).
    """
    if step_rewards.shape[0] % group_size:
        raise ValueError(f"{step_rewards.shape[0]} completions do not split into groups of {group_size}")
    keep = step_mask.bool()  # (B·G, T)
    grouped = step_rewards.float().reshape(-1, group_size * step_rewards.shape[1])  # (B, G·T)
    grouped_keep = keep.reshape(grouped.shape)  # (B, G·T)
    count = grouped_keep.sum(-1, keepdim=True).float()  # (B, 1) steps in the group
    mean = (grouped * grouped_keep).sum(-1, keepdim=True) / count.clamp(min=1)  # (B, 1)
    square = ((grouped - mean) ** 2 * grouped_keep).sum(-1, keepdim=True)  # (B, 1)
    std = (square / (count - 1).clamp(min=1)).sqrt()  # (B, 1)
    normalized = ((grouped - mean) / (std + eps) * grouped_keep).reshape(step_rewards.shape)  # (B·G, T)
    # Σ over the steps at or after t: a cumulative sum from the right
    return normalized.flip(-1).cumsum(-1).flip(-1)  # (B·G, T)


def prefix_rewards(pieces: list[str], target: str, ended: bool) -> list[float]:
    """The arith step rewards of one completion: ``pieces`` are its answer tokens as text (the end token left out),
    ``ended`` whether the end token follows them. r^k = 1 while the text so far (leading spaces dropped) is a prefix
    of ``target``; the end token's reward is 1 when the text is exactly ``target``. One reward per piece, plus one
    for the end token when ``ended``."""
    rewards, text = [], ""
    for piece in pieces:
        text += piece
        rewards.append(1.0 if target.startswith(text.lstrip()) else 0.0)
    if ended:
        rewards.append(1.0 if text.strip() == target else 0.0)
    return rewards


def arith_step_rewards(roll, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(step_rewards, step_mask), both (B, T) on the rollout's device: every real completion token of an ``arith``
    rollout is a step, rewarded by ``prefix_rewards`` against the prompt's sum."""
    from lab.rollout import decode_tokens
    from lab.tasks.arith import parse_prompt

    mask = roll.completion_mask  # (B, T)
    rewards = torch.zeros(mask.shape, dtype=torch.float32)  # (B, T)
    for i, pieces in enumerate(decode_tokens(tokenizer, roll)):
        a, b = parse_prompt(roll.prompts[i])
        ended = not bool(roll.truncated[i])
        answer = pieces[:-1] if ended else pieces  # the end token is the last real token when there is one
        row = prefix_rewards(answer, str(a + b), ended)
        rewards[i, : len(row)] = torch.tensor(row)
    return rewards.to(mask.device), mask.float()
