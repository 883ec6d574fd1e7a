"""The step inspector's numbers: one logged step's completions, token by token, with the method's objective term.

A policy method's samples.jsonl rows carry, per completion token (when the trainer logs them):

    tokens           the token strings
    logprobs         log π_old(y_t | x, y_<t), the policy that sampled them
    ref_logprobs     log π_ref(y_t | x, y_<t) (when the step computed them)
    logprobs_after   log π_θ(y_t | x, y_<t) after the step's update
    advantages       Â_t per token (or one ``advantage`` for the whole completion)

and the run's config.json gives ε (``epsilon_low``/``epsilon_high``, or PPO's ``cliprange``), β and ``kl_mode``.
From those, per token:

    ρ_t      = exp(log π_θ − log π_old)                         how far the update moved the token
    term_t   = min(ρ_t·Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high)·Â_t)  the clipped surrogate (REINFORCE: ρ_t·Â_t)
    clipped  = Â_t > 0 and ρ_t > 1 + ε_high, or Â_t < 0 and ρ_t < 1 − ε_low   (the clip binds: no gradient)
    kl_t     = k3: exp(log π_ref − log π_old) − (log π_ref − log π_old) − 1   (GRPO; k1 for PPO, REINFORCE and
               GRPO's k1_reward: log π_old − log π_ref), and the penalty β·kl_t
    pushed   = sign(log π_θ − log π_old): +1 up, −1 down, 0 unchanged

Older records lack some of the lists; every number that needs a missing one is None. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Any

POLICY_FIELDS = ("tokens", "logprobs", "ref_logprobs", "logprobs_after", "advantages")


def logged_steps(rows: list[dict]) -> list[int]:
    """The steps that logged samples, in order."""
    return sorted({int(r.get("step", 0)) for r in rows})


def step_rows(rows: list[dict], step: int) -> list[dict]:
    """The rows logged at ``step``."""
    return [r for r in rows if int(r.get("step", 0)) == int(step)]


def groups(rows: list[dict]) -> list[tuple[Any, list[int]]]:
    """Completions grouped by prompt, in first-seen order: [(prompt, [row indices])]. GRPO's groups are the G
    completions of one prompt; other methods have one completion per prompt."""
    out: dict[str, tuple[Any, list[int]]] = {}
    for i, row in enumerate(rows):
        out.setdefault(repr(row.get("prompt")), (row.get("prompt"), []))[1].append(i)
    return list(out.values())


def clip_range(config: dict) -> tuple[float | None, float | None]:
    """(ε_low, ε_high) of a run's config (GRPO's and PPO's ``epsilon_low``/``epsilon_high``; older records' symmetric
    ``cliprange``); (None, None) without a clip: ``clip`` off (ε = ∞, attempt 2 of the ladder) or REINFORCE."""
    if config.get("clip") is False:
        return None, None
    if config.get("epsilon_low") is not None:
        low = float(config["epsilon_low"])
        high = config.get("epsilon_high")
        return low, float(high) if high is not None else low
    if config.get("cliprange") is not None:
        return float(config["cliprange"]), float(config["cliprange"])
    return None, None


def kl_estimator(config: dict) -> str:
    """Which per-token KL the method penalizes: GRPO's k3 (unless ``kl_mode=k1_reward``), else k1 (in the reward)."""
    method = str(config.get("method", ""))
    if method == "grpo" and config.get("kl_mode", "k3") != "k1_reward":
        return "k3"
    return "k1"


def _at(values, t: int):
    if isinstance(values, list) and t < len(values) and values[t] is not None:
        return float(values[t])
    return None


def token_terms(row: dict, config: dict) -> list[dict]:
    """Per token of one completion: its text and every number of the module docstring (None where missing)."""
    tokens = row.get("tokens")
    if not isinstance(tokens, list):
        return []
    eps_low, eps_high = clip_range(config)
    beta = float(config.get("beta") or 0.0)
    estimator = kl_estimator(config)
    scalar = row.get("advantage")
    out = []
    for t, token in enumerate(tokens):
        old, after = _at(row.get("logprobs"), t), _at(row.get("logprobs_after"), t)
        ref = _at(row.get("ref_logprobs"), t)
        adv = _at(row.get("advantages"), t)
        if adv is None and isinstance(scalar, (int, float)):
            adv = float(scalar)
        ratio = math.exp(after - old) if old is not None and after is not None else None
        term, clipped = None, None
        if ratio is not None and adv is not None:
            if eps_low is None:
                term, clipped = ratio * adv, False
            else:
                bounded = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
                term = min(ratio * adv, bounded * adv)
                clipped = (adv > 0 and ratio > 1.0 + eps_high) or (adv < 0 and ratio < 1.0 - eps_low)
        kl = None
        if ref is not None and old is not None:
            kl = math.exp(ref - old) - (ref - old) - 1.0 if estimator == "k3" else old - ref
        pushed = None if ratio is None else (0 if after == old else (1 if after > old else -1))
        out.append(
            {
                "token": str(token),
                "logprob": old,
                "logprob_after": after,
                "ref_logprob": ref,
                "advantage": adv,
                "ratio": ratio,
                "term": term,
                "clipped": clipped,
                "kl": kl,
                "kl_term": None if kl is None else beta * kl,
                "pushed": pushed,
            }
        )
    return out


def _n(v, fmt: str = "+.4f") -> str:
    return "?" if v is None else format(v, fmt)


def equation(term: dict, config: dict) -> str:
    """The method's per-token objective with this token's numbers plugged in (markdown, one line each)."""
    eps_low, eps_high = clip_range(config)
    beta = float(config.get("beta") or 0.0)
    lines = [
        f"token `{term['token']}`",
        f"ρ = exp(log π_θ − log π_old) = exp({_n(term['logprob_after'])} − ({_n(term['logprob'])})) = "
        f"{_n(term['ratio'], '.4f')}",
    ]
    adv = _n(term["advantage"])
    if eps_low is None:
        lines.append(f"term = ρ·Â = {_n(term['ratio'], '.4f')} × {adv} = {_n(term['term'])}")
    else:
        lo, hi = 1 - eps_low, 1 + eps_high
        bounded = None if term["ratio"] is None else min(max(term["ratio"], lo), hi)
        lines.append(
            f"term = min(ρ·Â, clip(ρ, {lo:g}, {hi:g})·Â) = min({_n(term['ratio'], '.4f')} × {adv}, "
            f"{_n(bounded, '.4f')} × {adv}) = {_n(term['term'])}"
            + (" · **the clip binds: this token gets no gradient**" if term["clipped"] else "")
        )
    if term["kl"] is not None:
        if kl_estimator(config) == "k3":
            lines.append(
                f"KL term = β·k3 = β·(exp(log π_ref − log π_old) − (log π_ref − log π_old) − 1) = {beta:g} × "
                f"{_n(term['kl'], '.4f')} = {_n(term['kl_term'], '.4f')} (subtracted from the objective)"
            )
        else:
            lines.append(
                f"KL term = β·(log π_old − log π_ref) = {beta:g} × {_n(term['kl'], '.4f')} = "
                f"{_n(term['kl_term'], '.4f')} (taken off the reward)"
            )
    if term["pushed"] is not None:
        lines.append("the update pushed this token " + {1: "up", -1: "down", 0: "nowhere"}[term["pushed"]])
    return "  \n".join(lines)
