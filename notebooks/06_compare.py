# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Every method on one task: reward against KL
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lab-rl/lab/blob/main/notebooks/06_compare.ipynb)
#
# PPO, GRPO, REINFORCE and DPO all aim at the same KL-regularized objective, by very different routes:
# sampling and a value function, sampling and a group baseline, plain sampling, or no sampling at all.
# On the `bandit` task the objective's optimum π* is known in closed form (see `01_tour`), and both the
# expected reward and the KL to the reference are sums over the vocabulary, so every trained policy is an
# exact point in the reward–KL plane. This notebook trains each method briefly from the same base model
# with the same β and watches the points move towards the frontier.

# %%
# Install. On Colab: the lab from a wheel uploaded to this session's files (lab-*.whl, built by `python -m build`),
# or else from its repository. Anywhere else nothing is installed: in a clone, the package next to this folder.
import glob
import os
import subprocess
import sys

LAB_REPOSITORY = "https://github.com/lab-rl/lab"  # pyproject.toml's [project.urls]
if "google.colab" in sys.modules:
    wheels = sorted(glob.glob("lab-*.whl"), key=os.path.getmtime)  # the newest upload wins
    source = wheels[-1] if wheels else f"git+{LAB_REPOSITORY}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
elif os.path.isdir(os.path.join("..", "lab")):
    sys.path.insert(0, os.path.abspath(".."))

# %%
# Parameters. LAB_FAST=1 (what CI sets) shrinks steps and batches so the notebook runs in seconds;
# the code path is the same.
import os

from lab.notebook import LiveFigure, setup, tqdm

setup()  # quiet library logs, floats to 4 significant digits, figures that also render in exported HTML
LAB_FAST = os.environ.get("LAB_FAST", "0") == "1"
BETA = 0.1  # the same KL weight for every method
STEPS = 2 if LAB_FAST else 100  # optimizer steps (rollouts for the online methods) per method

# %% [markdown]
# There is no hub switch here on purpose: the comparison is exact only where π* and the KL can be computed,
# which needs a response space small enough to enumerate. To compare methods on a real model, run
# `03_ppo_rlhf`, `04_dpo` and `05_grpo` with their switches on and compare the `kl/ref` and reward metrics
# that each run records.

# %%
import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from lab.evaluate import before_after
from lab.methods import get_method
from lab.modeling import load_policy
from lab.ppo import ppo_policy_loss
from lab.reinforce import reinforce_loss
from lab.tasks import bandit, get_task

task = get_task("bandit")
prompts = task.eval_prompts()

# %% [markdown]
# ## 1. One objective, four routes
#
# $$\max_\pi\; \mathbb{E}_{y\sim\pi}[r(x,y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{ref})
#   \quad\Longrightarrow\quad \pi^*(y\mid x) \propto \pi_\text{ref}(y\mid x)\,e^{r(x,y)/\beta}$$
#
# | method | data it learns from | how the KL enters | what replaces the unknown "how good was this?" |
# |---|---|---|---|
# | REINFORCE | its own samples, scored by r | −β·log(π/π_ref) added to the reward | the batch-mean reward as a baseline |
# | PPO | its own samples, scored by r | per-token −β·KL in the reward | a learned value function V(s), GAE |
# | GRPO | G samples per prompt, scored by r | β·k3 added to the loss | the group's mean and std |
# | DPO | fixed preference pairs, no sampling | built into the loss through π_ref | the policy's own log-ratio, β·log π/π_ref |
# | SFT on chosen (a baseline) | the chosen halves of the same pairs | not at all | nothing: imitate the winners |
#
# On `bandit` the pairs come from π_ref and are labelled by the Bradley–Terry model with the true reward,
# so, among the answers that appear in pairs, DPO's target is the same π* as the others'.
#
# ## 2. The losses on toy tensors: where the online methods agree
#
# At the start of an update the policy is the one that sampled (ratio π_θ/π_old = 1). There, PPO's clipped
# loss has exactly the gradient of REINFORCE's: the clipping only acts once the policy has moved. Three
# one-token samples with log-probs log(0.2, 0.5, 0.3) and advantages (+1, −0.5, +0.2):
#
# REINFORCE's loss is −mean(A · log π) = −(1·log 0.2 − 0.5·log 0.5 + 0.2·log 0.3)/3
# = −(−1.6094 + 0.3466 − 0.2408)/3 = 0.5012; PPO's at ratio 1 is −mean(A · 1) = −(1 − 0.5 + 0.2)/3 = −0.2333.
# The values differ, the gradients do not: both are −mean(A · ∇log π).

# %%
advantages = torch.tensor([1.0, -0.5, 0.2])
mask = torch.ones(3, 1)  # (B, T): one token each
grads = {}
for name in ("REINFORCE", "PPO at ratio 1"):
    logprobs = torch.log(torch.tensor([[0.2], [0.5], [0.3]])).requires_grad_()  # (B, T)
    if name == "REINFORCE":
        loss, _ = reinforce_loss(logprobs, advantages, mask)
    else:
        loss, _ = ppo_policy_loss(
            logprobs, logprobs.detach(), advantages[:, None], mask, epsilon_low=0.2, epsilon_high=0.2
        )
    loss.backward()
    grads[name] = logprobs.grad.flatten().tolist()
    print(f"{name:15s} loss {loss.item():+.4f}   d loss / d log π = {[round(g, 4) for g in grads[name]]}")
print(
    "by hand:        REINFORCE +0.5012, PPO −0.2333, gradient −A/3 =", [round(-a / 3, 4) for a in advantages.tolist()]
)

# %% [markdown]
# ## 3. Train every method from the same start
#
# Each run loads a fresh copy of the built-in bandit model with LoRA adapters, so adapters off = π_ref for
# all of them. After every step we read the policy's exact distribution over the vocabulary and place it in
# the reward–KL plane. The black line is the frontier traced by π* as β varies; the star is π*
# for this notebook's β.

# %%
base = load_policy(task="bandit", mode="lora")
tok = base.tokenizer
with torch.no_grad():
    ref_logprobs = bandit.next_token_logprobs(base.model, tok, prompts)  # (B, V) adapters are still zero
rewards = bandit.reward_tables(prompts, tok)  # (B, V)
is_answer = rewards > bandit.NON_ANSWER_REWARD  # (B, V) the prompt's answer words
star = bandit.pi_star(ref_logprobs, rewards, BETA)  # (B, V) this notebook's target π*


def exact_numbers(logprobs):
    """Exact numbers for a policy's next-token log-probs (B, V), averaged over the prompts: E_π[r],
    KL(π‖π_ref), KL(π*‖π), the probability of answering with one of the prompt's answer words, and E[r]
    among those answers only."""
    on_answers = logprobs.masked_fill(~is_answer, float("-inf"))  # (B, V)
    on_answers = on_answers - on_answers.logsumexp(-1, keepdim=True)  # π renormalized over the answers
    return {
        "E[r]": bandit.expected_reward(logprobs, rewards).mean().item(),
        "KL(π‖π_ref)": bandit.kl(logprobs, ref_logprobs).mean().item(),
        "KL(π*‖π)": bandit.kl(star, logprobs).mean().item(),
        "mass on answers": (logprobs.exp() * is_answer).sum(-1).mean().item(),
        "E[r | answer]": bandit.expected_reward(on_answers, rewards).mean().item(),
    }


def exact_point(policy):
    with torch.no_grad():
        return exact_numbers(bandit.next_token_logprobs(policy.model, tok, prompts))


frontier = []
for beta in torch.logspace(-2, 1, 30).tolist():
    pi = bandit.pi_star(ref_logprobs, rewards, beta)  # (B, V)
    frontier.append((bandit.kl(pi, ref_logprobs).mean().item(), bandit.expected_reward(pi, rewards).mean().item()))
optimum = exact_numbers(star)
start = exact_point(base)

# %% [markdown]
# One configuration per method, from the lab's registry (`lab.methods`). Everything not set here is the
# method's default; `eval_every=0` skips the periodic held-out evaluation, which we replace with the exact
# point after every step.

# %%
COMMON = dict(task="bandit", beta=BETA, steps=STEPS, seed=0, eval_every=0, sample_every=0)
RUNS = {  # label: (method, its own settings)
    "REINFORCE": ("reinforce", dict(batch_size=48)),
    "PPO": ("ppo", dict(batch_size=48)),
    "GRPO": ("grpo", dict(batch_size=6, group_size=8)),
    "DPO": ("dpo", dict(batch_size=64)),
    "SFT on chosen": ("sft-preferred", dict(batch_size=64)),
}

fig = go.Figure()
fig.add_scatter(
    x=[k for k, _ in frontier],
    y=[r for _, r in frontier],
    mode="lines",
    line=dict(color="black"),
    name="π* for β from 10 to 0.01",
)
fig.add_scatter(
    x=[optimum["KL(π‖π_ref)"]],
    y=[optimum["E[r]"]],
    mode="markers",
    marker=dict(symbol="star", size=16, color="gold"),
    name=f"π* for β={BETA}",
)
for label in RUNS:
    fig.add_scatter(x=[start["KL(π‖π_ref)"]], y=[start["E[r]"]], mode="lines+markers", name=label)
fig.update_layout(
    xaxis_title="KL(π‖π_ref)",
    yaxis_title="E[r]",
    height=480,
    title="bandit: each method's policy after every step (exact values)",
)
live = LiveFigure(fig)  # drawn now, redrawn after every step

results, policies = {}, {}
for trace, (label, (method, settings)) in zip(fig.data[2:], RUNS.items()):
    Config, train = get_method(method)
    cfg = Config(**COMMON, **settings)
    policy = load_policy(task="bandit", mode="lora")
    started = time.time()
    for _ in tqdm(train(cfg, policy=policy), total=cfg.steps, desc=label):
        point = exact_point(policy)
        trace.x = (*trace.x, point["KL(π‖π_ref)"])
        trace.y = (*trace.y, point["E[r]"])
        live.refresh()
    results[label] = {**point, "seconds": round(time.time() - started, 1)}
    policies[label] = policy

# %% [markdown]
# ## 4. Where each method ended
#
# `KL(π*‖π)` is the distance to this β's optimum (0 = reached it); `mass on answers` is the probability
# of answering with one of the prompt's answer words at all, and `E[r | answer]` the expected reward among
# those answers only.

# %%
pd.DataFrame({"π_ref": start, **results, f"π* (β={BETA})": optimum}).T

# %% [markdown]
# Each method's end point against the frontier: `frontier there` is the most reward any policy can have at
# the same KL from π_ref (π* of some β), so the gap is KL spent and not yet turned into reward.

# %%
kl_axis, reward_axis = zip(*sorted([(0.0, start["E[r]"]), *frontier]))  # π_ref is the frontier's KL = 0 end
for label, point in {"π_ref": start, **results}.items():
    best = np.interp(point["KL(π‖π_ref)"], kl_axis, reward_axis)
    print(
        f"{label:14s} E[r] {point['E[r]']:+.3f} at KL {point['KL(π‖π_ref)']:.3f} (frontier there {best:+.3f}); "
        f"mass on answers {point['mass on answers']:.3f}, E[r | answer] {point['E[r | answer]']:+.3f}"
    )

# %% [markdown]
# What to read in these lines (the numbers are this run's; other settings and seeds move them):
#
# * **REINFORCE, PPO and GRPO** climb from π_ref towards the frontier, buying reward with KL, at the methods'
#   default learning rates. An end point below the frontier has spent KL that π* of some larger β would have
#   turned into more reward.
# * **SFT on chosen** imitates the winners of pairs drawn from π_ref. Those look a lot like π_ref, tilted a
#   little towards better answers, so it can only move as far as the data does.
# * **DPO** compares the two answers of a pair, so its loss does not change when every answer's log-ratio
#   drops by the same amount. Nothing in it holds the probability on the answers: it can prefer the better
#   answer words more than π_ref does (`E[r | answer]`) while its `mass on answers` falls, the probability
#   flowing to tokens that no pair contains. The online methods sample such tokens, score them −1 and push
#   them back down. This *likelihood displacement* is a known weakness of DPO, worst when the pairs cover
#   only part of what the policy can say; run longer (`STEPS = 200`) to see how far it goes here.

# %%
prompt = prompts[0]
answers = list(bandit.REWARDS[prompt])
ids = tok.convert_tokens_to_ids(answers)
with torch.no_grad():
    dists = {
        "π_ref": ref_logprobs[0],
        f"π* (β={BETA})": star[0],
        **{label: bandit.next_token_logprobs(p.model, tok, [prompt])[0] for label, p in policies.items()},
    }
fig = go.Figure([go.Bar(name=name, x=answers, y=lp[ids].exp().tolist()) for name, lp in dists.items()])
fig.update_layout(
    barmode="group", height=380, yaxis_title="probability", title=f"{prompt!r}, rewards {bandit.REWARDS[prompt]}"
)
fig.show()

# %% [markdown]
# ## 5. Before and after
#
# The greedy answer of each policy on every bandit prompt, with its reward. Before = π_ref (adapters off),
# the same for all methods.

# %%
table = None
for label, policy in policies.items():
    rows = pd.DataFrame(before_after(policy, task))
    if table is None:
        table = rows[["prompt", "before", "before_reward"]].rename(
            columns={"before": "π_ref", "before_reward": "r(π_ref)"}
        )
    table[label] = rows["after"]
    table[f"r({label})"] = rows["after_reward"]
table

# %% [markdown]
# ## 6. Conditional SFT on the pairs: "good" before the chosen, "bad" before the rejected
#
# The seed's first alternative to RL: "SFT on pairwise preferences: prepend good on preferred, bad on
# rejected. Then train conditioning on good." Both answers of a pair become demonstrations, each behind a
# control string c that ends the context, and the loss is SFT on the answer tokens:
#
# $$L(\theta) = -\,\mathbb{E}\Bigl[\tfrac{1}{|y_w|}\sum_t \log \pi_\theta(y_{w,t}\mid x, c_{good}, y_{w,<t})
#   + \tfrac{1}{|y_l|}\sum_t \log \pi_\theta(y_{l,t}\mid x, c_{bad}, y_{l,<t})\Bigr]/2$$
#
# and the deployed policy answers after the good control: y ~ π_θ(·|x, c_good). The control is context, never a
# target. Nothing pushes π_θ(y_l|x, c_good) down (DPO would); the model must learn from the two contexts alone
# what separates them.

# %%
# The batch: where the control goes, token by token (mask 1 = a target of the loss).
import os

from lab.csft import encode_controlled_pairs
from lab.modeling import load_tokenizer

tok = load_tokenizer("reviews")
row = {"prompt": "review of the pasta :", "chosen": "the pasta was great .", "rejected": "the pasta was bland ."}
batch = encode_controlled_pairs(tok, [row], "good", "bad", max_length=64)
for i, side in enumerate(("chosen", "rejected")):
    n = int(batch.attention_mask[i].sum())
    tokens = tok.convert_ids_to_tokens(batch.input_ids[i, :n].tolist())
    print(side, " ".join(f"{t}[{m}]" for t, m in zip(tokens, batch.completion_mask[i, :n].tolist())))

# %% [markdown]
# ### A short run on `reviews`, and what the control does
#
# On the built-in model "good" and "bad" are ordinary words that it has read in reviews, so even before
# training they steer it: the untrained π_ref(·|x, good) writes "pasta , so great ." — text π_ref(·|x) would
# rarely write, far in KL. Training turns them into what the pairs say they mean. We compare the held-out
# numbers behind each control (`lab.csft.heldout`: greedy and sampled gold reward, kl/ref = KL(π_θ(·|x, c) ‖
# π_ref(·|x)), diversity).

# %%
import dataclasses

from lab.csft import ControlledTask, CSFTConfig, heldout, train
from lab.evaluate import answer
from lab.runner import load_for
from lab.tasks import get_task

CSFT_STEPS = 6 if LAB_FAST else 60
CSFT_SAMPLES = 2 if LAB_FAST else 8
CSFT_EVAL = 4 if LAB_FAST else 10  # held-out prompts (reviews has 10)

task = get_task("reviews")
cfg = CSFTConfig(
    task="reviews", steps=CSFT_STEPS, kl_samples=CSFT_SAMPLES, eval_size=CSFT_EVAL, out="runs/notebook", sample_every=0
)
policy = load_for(cfg, task)
before = heldout(policy, task, cfg)
for _ in train(cfg, policy=policy):
    pass
as_good = heldout(policy, task, cfg)
as_bad = heldout(policy, task, dataclasses.replace(cfg, good="bad", bad="good"))  # the same policy, behind "bad"
for name in ("eval/gold_reward", "eval/sample_reward", "kl/ref", "diversity/distinct_2"):
    print(f"{name:22s} untrained+good {before[name]:7.3f}   good {as_good[name]:7.3f}   bad {as_bad[name]:7.3f}")

# %%
prompts = task.eval_prompts()[:4]
for control in ("good", "bad"):
    controlled = ControlledTask(task, policy.tokenizer, control)
    ans = answer(policy.model, policy.tokenizer, controlled, controlled.eval_prompts()[:4])
    for p, c, r in zip(ans.prompts, ans.completions, ans.rewards):
        print(f"{p!r:34} → {c!r:45} gold {r:+.1f}")

# %% [markdown]
# ## Try this
#
# * **`BETA = 1.0`**: π* stays close to π_ref and every method should stop near the star, low on both axes.
#   **`BETA = 0.01`**: π* is nearly greedy; watch which methods get there in `STEPS` steps and how far along the
#   KL axis they travel to do it.
# * **Another preference loss**: `RUNS["IPO"] = ("dpo", dict(batch_size=64, loss_type="ipo"))` adds IPO,
#   which regresses each pair's log-ratio margin onto 1/(2β) instead of pushing it apart without end;
#   compare its "mass on answers" with DPO's.
