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
# # 03 · RLHF with PPO: reward − β·KL + λ·LM loss
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lab-rl/lab/blob/main/notebooks/03_ppo_rlhf.ipynb)
#
# The InstructGPT recipe: train a reward model on preferences, then make the policy maximize it with PPO
# while a KL penalty keeps it near the reference policy and a language-modelling term ("ptx") keeps it
# from forgetting how to write. On the `reviews` task we can also watch what the reward model cannot see:
# the task's gold reward, logged next to the learned one.

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

from lab.notebook import LiveChart, hub_switch, setup, tqdm

setup()  # quiet library logs, floats to 4 significant digits, figures that also render in exported HTML
LAB_FAST = os.environ.get("LAB_FAST", "0") == "1"
RM_STEPS = 4 if LAB_FAST else 150  # reward-model steps (see 02_reward_model)
STEPS = 2 if LAB_FAST else 40  # PPO iterations: one rollout batch + its PPO epochs each
BATCH_SIZE = 8 if LAB_FAST else 32  # prompts per rollout batch
PPO_EPOCHS = 1 if LAB_FAST else 4  # passes over each rollout batch
BETA = 0.05  # β: weight of the per-token KL penalty
PTX_COEF = 0.5  # λ: weight of the LM loss on the task's SFT rows

# %% [markdown]
# ### Switch: a real model from the hub (off by default)
#
# Everything below runs on the lab's built-in task and tiny model, on any CPU, offline. Set
# `USE_HUB = True` on a GPU runtime with network access (Colab: *Runtime → Change runtime type → GPU*)
# to run the same cells on a real model and dataset instead.
#
# With the switch on, the policy is Qwen2.5-0.5B-Instruct in 4-bit with LoRA adapters (a second adapter
# is the value function), the prompts are UltraFeedback's and the ptx rows are Capybara conversations. The
# reward model is trained here first, as on the built-in path: the same 0.5B model with its own LoRA adapter
# and a scalar head, for a few hundred steps on UltraFeedback's preference pairs (`02_reward_model` trains it
# longer and looks at it closely). Not run here (no network, no GPU on the machines this lab is tested on);
# estimates only: the policy, its value adapter and the reward model together hold about 1.5 GB of weights;
# plan for a 16 GB GPU. There is no gold reward for these prompts, so only r_φ is plotted.

# %%
USE_HUB = False  # ← the switch
HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_RM_SETTINGS = dict(  # the reward model, trained in §3 before PPO: a starting point, not a tuned recipe
    task="hf:trl-lib/ultrafeedback_binarized",  # {chosen, rejected} conversations, prompt inside
    reward_model=HUB_MODEL,
    mode="lora",
    lr=5e-5,
    max_length=1024,
    batch_size=8,
    steps=300,
)
HUB_SETTINGS = dict(  # PPO: a starting point, not a tuned recipe
    task="hf:trl-lib/ultrafeedback-prompt",  # prompts only, as chat messages
    model=HUB_MODEL,
    mode="qlora",
    ptx_data="hf:trl-lib/Capybara",  # conversations; the last assistant turn is the target
    max_new_tokens=128,
    batch_size=8,
    num_minibatches=2,
    lr=1e-5,
    steps=100,
)
hub_switch(USE_HUB)

# %%
import pandas as pd
import plotly.express as px
import torch

from lab import rm
from lab.evaluate import before_after
from lab.ops import kl_k1
from lab.ppo import PPOConfig, gae, ppo_policy_loss, ppo_value_loss, shaped_rewards, train
from lab.records import RunRecord
from lab.rewards import make_reward
from lab.rollout import load_prompt_rows
from lab.runner import load_for
from lab.sampling import format_prompt, generate
from lab.sft import sft_loss
from lab.tasks import TASKS

# %% [markdown]
# ## 1. The objective
#
# InstructGPT's objective has three terms:
#
# $$\max_\theta\;
#   \mathbb{E}_{x\sim D,\; y\sim\pi_\theta(\cdot\mid x)}\Big[\, r_\phi(x, y) - \beta \log\frac{\pi_\theta(y\mid x)}{\pi_\text{ref}(y\mid x)} \Big]
#   \;+\; \lambda\, \mathbb{E}_{(x, y)\sim D_\text{ptx}}\big[\log \pi_\theta(y\mid x)\big]$$
#
# * **r_φ**: the reward model's score. It is only an estimate of what people want, and a policy pushed hard
#   enough finds its blind spots ("reward hacking").
# * **β · log π_θ/π_ref**: the KL penalty keeps the policy in the neighbourhood where r_φ was trained and is
#   still trustworthy.
# * **λ · log-likelihood on pretraining or SFT text** (the *ptx* term): keeps the policy predicting ordinary
#   text so it does not forget how to write while chasing the reward.
#
# **How PPO optimizes it.** Treat each generated token as an action. The reward is spread over the tokens:
# every token pays its own KL, and the last one also receives the score,
#
# $$r_t = -\beta\,\big(\log\pi_\text{old}(y_t\mid s_t) - \log\pi_\text{ref}(y_t\mid s_t)\big) + [t = T]\; r_\phi(x, y).$$
#
# A value function V(s_t) (a second LoRA adapter with a scalar head) predicts the reward still to come;
# generalized advantage estimation (GAE) turns rewards and values into advantages
# $A_t = \sum_l (\gamma\lambda_\text{GAE})^l\, \delta_{t+l}$ with $\delta_t = r_t + \gamma V_{t+1} - V_t$.
# Then PPO reuses each rollout for several gradient steps, and clips the probability ratio
# $\rho_t = \pi_\theta/\pi_\text{old}$ so that no step moves the policy far from the one that sampled:
#
# $$L_\text{policy} = -\,\mathbb{E}_t\big[\min(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\, A_t)\big],\qquad
#   L = L_\text{policy} + c_v\, L_\text{value} + \lambda\, L_\text{ptx}.$$
#
# ## 2. Each piece on toy numbers
#
# **Shaped rewards.** One completion of 3 tokens, r_φ = 1, β = 0.1, log π_old = (−1, −2, −0.5) and
# log π_ref = (−1.5, −2, −1): the per-token KL (k1) is (0.5, 0, 0.5), so
# r = (−0.05, 0, −0.05 + 1) = (−0.05, 0, 0.95). Their sum, 0.9 = 1 − 0.1 · 1.0, is the score minus β times
# the completion's KL.

# %%
logprobs = torch.tensor([[-1.0, -2.0, -0.5]])  # (B=1, T=3)
ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0]])  # (B, T)
mask = torch.ones(1, 3)  # (B, T)
rewards = shaped_rewards(torch.tensor([1.0]), logprobs, ref_logprobs, mask, beta=0.1)
print(
    f"per-token KL: {kl_k1(logprobs, ref_logprobs)[0].tolist()}   shaped rewards: {[round(r, 4) for r in rewards[0].tolist()]}"
)

# %% [markdown]
# **GAE** with values V = (0.5, 0.4, 0.9), γ = 1, λ_GAE = 0.95, going backwards:
#
# * t=2: δ = 0.95 + 0 − 0.9 = 0.05, A = 0.05
# * t=1: δ = 0 + 0.9 − 0.4 = 0.5, A = 0.5 + 0.95 · 0.05 = 0.5475
# * t=0: δ = −0.05 + 0.4 − 0.5 = −0.15, A = −0.15 + 0.95 · 0.5475 = 0.3701
# * returns (the value targets) R = A + V = (0.8701, 0.9475, 0.95)

# %%
values = torch.tensor([[0.5, 0.4, 0.9]])
advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
print(
    "advantages:",
    [round(a, 4) for a in advantages[0].tolist()],
    "  returns:",
    [round(r, 4) for r in returns[0].tolist()],
)

# %% [markdown]
# **The clipped policy loss.** Two tokens, both with advantage +1, sampled with probability 0.5 each; the
# policy now gives them 0.75 and 0.25 (ratios 1.5 and 0.5), ε = 0.2:
#
# * token 1: min(1.5 · 1, clip(1.5) · 1) = min(1.5, 1.2) = 1.2: clipped, so no gradient pushes it further
# * token 2: min(0.5 · 1, clip(0.5) · 1) = min(0.5, 0.8) = 0.5: not clipped (the policy moved the wrong
#   way, so it gets the full gradient back)
# * loss = −(1.2 + 0.5)/2 = −0.85, and half the tokens are clipped.
#
# **The ptx term** is the SFT loss (`lab.sft.sft_loss`): for two target tokens of probability 0.5 and 0.25,
# −(log 0.5 + log 0.25)/2 = (0.6931 + 1.3863)/2 = 1.0397.

# %%
loss, metrics = ppo_policy_loss(
    torch.log(torch.tensor([[0.75, 0.25]])),
    torch.log(torch.tensor([[0.5, 0.5]])),
    torch.tensor([[1.0, 1.0]]),
    torch.ones(1, 2),
    epsilon_low=0.2,
    epsilon_high=0.2,
)
print(f"policy loss {loss.item():+.4f} (by hand −0.85), clip/frac {metrics['clip/frac'].item():.2f}")
value_loss, _ = ppo_value_loss(values, values, returns, mask, epsilon_value=0.2)
print(
    f"value loss at V_old: {value_loss.item():.4f} = ½·mean((V − R)²) = "
    f"{0.5 * ((values - returns) ** 2).mean().item():.4f}"
)
ptx, _ = sft_loss(torch.log(torch.tensor([[0.5, 0.25]])), torch.ones(1, 2))
print(f"ptx loss {ptx.item():.4f} (by hand 1.0397)")

# %% [markdown]
# ## 3. A short run
#
# First a reward model on the `reviews` pairs (as in `02_reward_model`, without the charts), saved as a run
# record, so this notebook needs nothing from another one; then PPO against it. The charts show `reward/mean` (r_φ, what PPO maximizes) next to
# `reward/gold` (the truth, which PPO never sees), the KL to π_ref and the ptx loss.

# %%
rm_settings = dict(task="reviews", steps=RM_STEPS, eval_pairs=64 if LAB_FAST else 500)
settings = dict(task="reviews", steps=STEPS, batch_size=BATCH_SIZE, ppo_epochs=PPO_EPOCHS, beta=BETA, ptx_coef=PTX_COEF)
if USE_HUB:
    rm_settings.update(HUB_RM_SETTINGS)
    settings.update(HUB_SETTINGS)
rm_cfg = rm.RewardConfig(**rm_settings, eval_every=0)
rm_record = RunRecord.create(out=rm_cfg.out, config={"method": "rm", **rm_cfg.to_dict()}, prefix="rm")
rm_history = list(tqdm(rm.train(rm_cfg, record=rm_record), total=rm_cfg.steps, desc="reward model"))
print(f"reward model {rm_record.path}: held-out accuracy {rm_history[-1]['eval/accuracy']:.2f}")
settings["reward"] = str(rm_record.path)
cfg = PPOConfig(**settings)
task = TASKS.get(cfg.task)
policy = load_for(cfg, task)

chart = LiveChart(["reward/mean", "reward/gold", "kl/ref", "loss/ptx", "value/explained_var"], title="PPO-RLHF")
history = []
for m in tqdm(train(cfg, policy=policy), total=cfg.steps):
    history.append(m)
    chart.update(m)

# %% [markdown]
# ## 4. Plots
#
# Learned reward against gold reward over the run, and the reward each step bought per nat of KL.

# %%
df = pd.DataFrame(history)
columns = [c for c in ("reward/mean", "reward/gold", "reward/shaped") if c in df]
px.line(df, x="step", y=columns, markers=True, title="what PPO optimizes (reward/mean) and the truth").show()
px.scatter(df, x="kl/ref", y=columns, title="reward against KL(π_θ‖π_ref) per completion").show()

# %% [markdown]
# ## 5. Before and after
#
# The same held-out prompts answered greedily by π_ref (adapters off) and by the tuned policy, with the
# gold reward and the reward model's score of each answer. The gold reward punishes repeated words, rambling
# past 12 words and a missing final ".", which r_φ learned only from pairs (`02_reward_model`, §5); a policy
# that found one of r_φ's blind spots would gain r_φ while losing on one of those terms. The line under the
# table counts each failure before and after, from the gold reward's own terms, so what this run did is read
# off the run rather than assumed.

# %%
scorer = make_reward(cfg.reward, task)
if task is not None:
    table = pd.DataFrame(before_after(policy, task, n=8))
else:  # no gold reward for your own prompts: show the completions
    prompts = [format_prompt(policy.tokenizer, r["prompt"]) for r in load_prompt_rows(cfg)[:4]]
    with policy.reference() as ref:
        before = generate(ref, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
    after = generate(policy.model, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
    table = pd.DataFrame({"prompt": prompts, "before": before, "after": after})
table["before r_φ"] = scorer(list(table.prompt), list(table.before)).tolist()
table["after r_φ"] = scorer(list(table.prompt), list(table.after)).tolist()
if task is not None:
    from lab.tasks.reviews import reward_terms

    for side in ("before", "after"):
        terms = pd.DataFrame([reward_terms(c) for c in table[side]])  # signed parts of the gold reward
        faults = {name: int((terms[name] < 0).sum()) for name in ("repetition", "length", "end")}
        print(
            f"{side}: {faults['repetition']} of {len(table)} answers repeat a word, {faults['length']} run past "
            f"12 words, {faults['end']} lack the final '.'; mean gold {table[f'{side}_reward'].mean():+.2f}, "
            f"mean r_φ {table[f'{side} r_φ'].mean():+.2f}"
        )
table

# %% [markdown]
# ## 6. Diversity: what optimization takes away
#
# The seed warns that pushing PPO too far "degrades text quality (mode collapse, loss of diversity)". Two
# numbers watch for it, on the policy's own samples:
#
# - **distinct-n** (Li et al. 2016): the distinct token n-grams over all n-grams of the completions together
#   (n-grams stay inside one completion; eos is not counted). `diversity/distinct_1`, `diversity/distinct_2`.
# - **per-prompt entropy**: for each prompt with k ≥ 2 samples, the plug-in entropy of its completion strings,
#   $-\sum_s \frac{c_s}{k}\log\frac{c_s}{k}$ ($c_s$: how many samples are the string s), averaged over prompts:
#   0 when every sample is the same, at most log k. `diversity/entropy`.
#
# Every on-policy trainer logs them from each rollout; the preference methods log them from their held-out
# samples at evaluation.

# %%
# The metrics on toy data, next to the hand arithmetic:
#   [1 2 3], [1 2 4]: unigrams 1 2 3 1 2 4 → 4 distinct of 6; bigrams (1 2) (2 3) (1 2) (2 4) → 3 of 4
#   samples a a b c of one prompt: −(½ ln ½ + 2 · ¼ ln ¼) = 1.5 ln 2 ≈ 1.040 nats
import math
import os

from lab.diagnostics import distinct_n, string_entropy

print(
    f"distinct-1: {distinct_n([[1, 2, 3], [1, 2, 4]], 1):.4f}  distinct-2: {distinct_n([[1, 2, 3], [1, 2, 4]], 2):.4f}"
)
print(f"entropy: {string_entropy(['a', 'a', 'b', 'c']):.4f}  1.5 ln 2 = {1.5 * math.log(2):.4f}")

# %% [markdown]
# ### A run: GRPO on `reviews`, before and after
#
# GRPO samples G completions of every prompt, so the per-prompt entropy is logged at every step. With the
# gold reward and no KL term (β = 0) nothing holds the policy near π_ref. We chart reward and diversity per
# step, then sample both policies on the held-out prompts and compare.

# %%
import plotly.graph_objects as go

from lab.diagnostics import diversity_metrics
from lab.evaluate import sample_heldout
from lab.grpo import GRPOConfig, train
from lab.runner import load_for
from lab.tasks import get_task

DIV_STEPS = 4 if LAB_FAST else 40

task = get_task("reviews")
cfg = GRPOConfig(
    task="reviews", steps=DIV_STEPS, beta=0.0, eval_every=0, eval_size=10, out="runs/notebook", sample_every=0
)
policy = load_for(cfg, task)
history = list(train(cfg, policy=policy))

fig = go.Figure()
for name in ("reward/mean", "diversity/entropy", "diversity/distinct_2"):
    fig.add_trace(go.Scatter(x=[m["step"] for m in history], y=[m.get(name) for m in history], name=name))
fig.update_layout(title="GRPO on reviews, β = 0", xaxis_title="step")
fig

# %%
prompts = task.eval_prompts()
after = diversity_metrics(sample_heldout(policy, prompts, max_new_tokens=task.max_new_tokens, samples=8))
with policy.reference() as ref:
    from types import SimpleNamespace

    frozen = SimpleNamespace(model=ref, tokenizer=policy.tokenizer)
    before = diversity_metrics(sample_heldout(frozen, prompts, max_new_tokens=task.max_new_tokens, samples=8))
for name in before:
    print(f"{name:24s} π_ref {before[name]:.3f}   π_θ {after[name]:.3f}")

# %% [markdown]
# In the over-optimization experiment (`python scripts/overoptimization.py`, PPO against a learned reward model)
# `python -m lab.diagnostics runs/overoptimization/*` prints each run's early and final diversity next to its gold
# reward: at β = 0 distinct-2 falls as the gold reward does; the KL term holds both.

# %% [markdown]
# ## 7. The attempt ladder: why PPO clips
#
# A rollout is expensive: sampling dominates a step. The policy gradient (attempt 1) uses each rollout for one
# update and throws it away. Attempt 2 reuses it for μ > 1 updates, correcting for the samples now being
# off-policy with the importance ratio $\rho_t = \pi_\theta(y_t\mid s_t)/\pi_\text{old}(y_t\mid s_t)$:
#
# $$L_2 = -\mathbb{E}_{y\sim\pi_\text{old}}\big[\rho_t \hat A\big],$$
#
# unbiased, but nothing holds ρ near 1: a token with a positive advantage keeps being pushed up, and the few samples
# whose ratio has grown dominate the gradient. Attempt 3 is PPO's clip,
# $-\min\big(\rho_t\hat A,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\hat A\big)$: once ρ has left
# $[1-\epsilon, 1+\epsilon]$ in the direction $\hat A$ favours, the token's gradient is zero.
#
# `lab.ladder.run_ladder` trains the three on `arith` with GRPO's advantages, changing only μ (`num_iterations`) and
# the clip (`clip=False` is ε = ∞), so all three sample the same number of completions. Per rollout, each logs the
# ratio's spread over its updates (`ratio/max`, `ratio/min`, `ratio/std`) and `kl/old`, the KL(π_θ‖π_old) its
# updates reached.

# %%
import os

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.ladder import format_table, ladder_table, run_ladder

LADDER_FULL = os.environ.get("LAB_LADDER_FULL", "0") == "1"  # the README's setting: 20 rollouts of 8 × 8, μ = 8
LADDER = dict(steps=20, num_iterations=8) if LADDER_FULL else dict(steps=8, batch_size=4, num_iterations=8)
curves = run_ladder(task="arith", lr=1e-3, out="runs/notebook", sample_every=0, **LADDER)
print(format_table(ladder_table(curves)))

# %%
fig = make_subplots(rows=1, cols=3, subplot_titles=("reward/mean", "kl/old (nats per token)", "ratio/max (log scale)"))
for i, (name, history) in enumerate(curves.items()):
    steps = [m["step"] for m in history]
    for col, key in enumerate(("reward/mean", "kl/old", "ratio/max"), start=1):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[m[key] for m in history],
                name=name,
                legendgroup=name,
                showlegend=col == 1,
                line=dict(color=("#2563eb", "#dc2626", "#16a34a")[i]),
            ),
            row=1,
            col=col,
        )
fig.update_yaxes(type="log", row=1, col=3)
fig.update_xaxes(title_text="rollout")
fig.update_layout(height=360, title="The attempt ladder on arith: same samples, μ and the clip changed")
fig

# %% [markdown]
# What to look for:
#
# - **Attempt 1** has ρ = 1 and `kl/old` = 0 exactly: every update is on-policy.
# - **Attempt 2** lets ρ run: its largest ratio reaches ten or more here, 259 in the README's run (20 rollouts of
#   8 × 8, `LAB_LADDER_FULL=1`), and its `kl/old` grows until a few stale samples steer the update. In that run its
#   held-out accuracy fell below the base model's 0.58 while the other two rose.
# - **Attempt 3** reuses the same rollouts as often, yet its ratios spread several times less (`std ρ`) and its
#   `kl/old` is several times smaller: the clip turns reuse into a trust region. `clip/frac` says how often it acted.
#
# The largest ratio is a noisy statistic (one token out of thousands, and the clip does not bound tokens it has
# no gradient for); `ratio/std` and `kl/old` per rollout tell the same story more steadily. On this easy task one
# on-policy update per rollout is hard to beat at equal samples: reuse pays where sampling is the cost, and the clip
# is what makes it safe. Try `num_iterations=4`: with less reuse the gap between attempts 2 and 3 narrows.

# %% [markdown]
# ## Try this
#
# * **`BETA = 0.0`**: nothing holds the policy near π_ref. `reward/mean` (r_φ) climbs faster; watch whether
#   `reward/gold` follows or falls behind as the policy finds what the reward model over-rates, and how
#   far `kl/ref` runs.
# * **`PTX_COEF = 0.0`** against `PTX_COEF = 2.0`: the LM loss on the SFT rows (`loss/ptx`) rises without
#   it; with a large λ the policy barely moves from its SFT behaviour.
# * **`settings["epsilon_low"] = settings["epsilon_high"] = 0.05`** with `PPO_EPOCHS = 8`: more reuse of each
#   rollout, smaller steps; `clip/frac` tells how often the clip binds.
