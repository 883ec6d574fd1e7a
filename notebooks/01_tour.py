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
# # 01 · A tour of the lab
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lab-rl/lab/blob/main/notebooks/01_tour.ipynb)
#
# The lab comes with its own small world, so every idea in the later notebooks can be run on a laptop CPU in
# seconds and checked exactly. This notebook walks through it:
#
# 1. the three built-in **tasks** (`arith`, `reviews`, `bandit`) and their tiny **base models**;
# 2. **sampling** completions and the tensors a rollout is made of;
# 3. **log-probabilities** of completions, the quantity every method pushes around;
# 4. three ways to **estimate the KL divergence** from samples (k1, k2, k3);
# 5. the **KL-regularized objective** and its closed-form optimum π*, which the `bandit` task lets us
#    compute exactly.

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

from lab.notebook import hub_switch, setup

setup()  # quiet library logs, floats to 4 significant digits, figures that also render in exported HTML
LAB_FAST = os.environ.get("LAB_FAST", "0") == "1"
N_EVAL = 32 if LAB_FAST else 200  # held-out arith prompts to score
KL_SAMPLES = 1_000 if LAB_FAST else 20_000  # samples per KL estimate

# %%
import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from lab import ops
from lab.batching import encode_pairs, sequence_logprob
from lab.evaluate import answer
from lab.modeling import load_policy
from lab.sampling import format_prompt, generate
from lab.tasks import TASKS, bandit, get_task
from lab.tasks.arith import has_carry, parse_prompt

_ = torch.manual_seed(0)  # the same samples on every run

# %% [markdown]
# ### Switch: a real model from the hub (off by default)
#
# Everything below runs on the lab's built-in task and tiny model, on any CPU, offline. Set
# `USE_HUB = True` on a GPU runtime with network access (Colab: *Runtime → Change runtime type → GPU*)
# to run the same cells on a real model and dataset instead.
#
# In this notebook the switch adds one cell at the end of §2 that samples from the hub model through its
# chat template. Estimate, not measured here: the 0.5B model in 4-bit takes well under 2 GB of GPU memory;
# the download is about 1 GB.

# %%
USE_HUB = False  # ← the switch
HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_MODE = "qlora"  # 4-bit base weights (bitsandbytes needs a CUDA GPU); use "lora" on a CPU
hub_switch(USE_HUB)

# %% [markdown]
# ## 1. Three tasks, three tiny models
#
# | task | kind | prompt → completion | reward |
# |---|---|---|---|
# | `arith` | verifiable | `47+38=` → `85` | 1 for the exact sum, else 0 |
# | `reviews` | graded | `review of the pasta :` → `the pasta was great .` | sentiment minus penalties for repeats, length and a missing end |
# | `bandit` | bandit | `pick a colour :` → `red` | a fixed table; one token, so everything is exact |
#
# A task knows its prompts (fixed train and held-out splits), its true ("gold") reward, and data for SFT and
# for preference learning. Its base model is a small Llama pretrained with `python -m lab pretrain TASK`
# and shipped in Hugging Face format, so it loads exactly like a hub model.

# %%
pd.DataFrame(
    [
        {
            "task": t.name,
            "kind": t.kind,
            "model": t.model,
            "max_new_tokens": t.max_new_tokens,
            "train prompts": len(t.train_prompts()),
            "held-out prompts": len(t.eval_prompts()),
            "example prompt": t.eval_prompts()[0],
            "description": t.description,
        }
        for t in TASKS.values()
    ]
)

# %% [markdown]
# The gold reward scores decoded text. On `arith` it is exact match; on `reviews` it has failure modes on
# purpose (repeating a word, rambling past 12 words and not ending with "." all cost more than any word
# earns), which is what a learned reward model can miss and a policy can then exploit.

# %%
arith, reviews = get_task("arith"), get_task("reviews")
checks = [
    ("arith", "47+38=", "85", False),
    ("arith", "47+38=", "75", False),
    ("reviews", "review of the pasta :", "the pasta was great .", False),
    ("reviews", "review of the pasta :", "the pasta was great great great .", False),
    ("reviews", "review of the pasta :", "the pasta was great", False),
    ("reviews", "review of the pasta :", "the pasta was great and", True),
]
pd.DataFrame(
    [
        {"task": name, "prompt": p, "completion": c, "truncated": t, "gold reward": get_task(name).gold_reward(p, c, t)}
        for name, p, c, t in checks
    ]
)

# %% [markdown]
# `arith`'s base model learned addition from data that drops the carry 60% of the time (`47+38=` → `75`).
# Greedy decoding therefore gets carry problems wrong, while sampling still finds the right answer some of
# the time (§2 measures how often): a reward that checks the answer has something to reinforce.
#
# ## 2. Sampling
#
# `lab.sampling.generate` is the sampler every online method uses. It left-pads the prompts (so every row's
# next token is read from the last column), runs one prefill pass and then decodes token by token with a KV
# cache. It returns a `Rollout`:
#
#     [pad pad 4 7 + 3 8 = | 8 5 <eos> <pad>]
#      prompt_ids (B, P)     completion_ids (B, T)
#
# and `completion_mask` is 1 up to **and including** the first end-of-sequence token, because ending is an
# action the policy takes too.

# %%
policy = load_policy(task="arith", mode="lora")  # the built-in model, with LoRA adapters (still zero)
model, tok = policy.model, policy.tokenizer
print(policy.num_parameters())

prompts = ["47+38=", "12+34=", "99+99=", "58+27="]
g = torch.Generator().manual_seed(0)
roll = generate(model, tok, prompts, max_new_tokens=arith.max_new_tokens, temperature=1.0, generator=g)
pd.DataFrame(
    {
        "prompt": roll.prompts,
        "completion": roll.completions,
        "truncated": roll.truncated.tolist(),
        "prompt tokens": [tok.convert_ids_to_tokens(r) for r in roll.prompt_ids.tolist()],
        "completion tokens": [tok.convert_ids_to_tokens(r) for r in roll.completion_ids.tolist()],
        "completion_mask": roll.completion_mask.tolist(),
        "gold reward": arith.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist()),
    }
)

# %% [markdown]
# Greedy decoding and sampling see the same model but answer differently. On the held-out problems, split
# by whether the ones digits carry (`lab.evaluate.answer` generates and scores with the gold reward):

# %%
heldout = arith.eval_prompts()[:N_EVAL]
rows = []
for kind in ("carry", "no carry"):
    subset = [p for p in heldout if has_carry(*parse_prompt(p)) == (kind == "carry")]
    for decoding, greedy in (("greedy", True), ("sample, T=1", False)):
        scored = answer(model, tok, arith, subset * (1 if greedy else 4), greedy=greedy)
        rows.append(
            {
                "problems": kind,
                "decoding": decoding,
                "n": len(scored.rewards),
                "accuracy": sum(scored.rewards) / len(scored.rewards),
            }
        )
pd.DataFrame(rows)

# %%
if USE_HUB:  # the same sampler on a real chat model: the prompt goes through its chat template
    hub = load_policy(HUB_MODEL, mode=HUB_MODE)
    chat = [[{"role": "user", "content": "What is 47+38? Reply with the number only."}]]
    hub_roll = generate(
        hub.model, hub.tokenizer, [format_prompt(hub.tokenizer, m) for m in chat], max_new_tokens=16, greedy=True
    )
    print(hub_roll.completions)

# %% [markdown]
# ## 3. Log-probabilities
#
# A language model gives logits $z_t \in \mathbb{R}^V$ at every position. The log-probability of the token
# $y_t$ that was actually written is
#
# $$\log \pi(y_t \mid x, y_{<t}) = z_t[y_t] - \log \sum_v e^{z_t[v]},$$
#
# and a completion's log-probability is the sum over its tokens,
# $\log \pi(y\mid x) = \sum_t \log \pi(y_t \mid x, y_{<t})$.
# `lab.ops.selective_logprobs` computes the first line without ever building the full (B, T, V) table of
# log-softmax values. A toy row, by hand: logits (2, 1, 0), token 0.

# %%
logits = torch.tensor([[[2.0, 1.0, 0.0]]])  # (B=1, T=1, V=3)
ids = torch.tensor([[0]])  # (B, T)
by_hand = 2.0 - math.log(math.exp(2) + math.exp(1) + math.exp(0))  # 2 − log(7.389 + 2.718 + 1) = 2 − 2.4076
print(f"lab: {ops.selective_logprobs(logits, ids).item():.4f}   by hand: {by_hand:.4f}")

# %% [markdown]
# On the real model: the per-token log-probs of the rollout above (`lab.ops.completion_token_logprobs` runs one
# forward pass over prompt + completion and keeps the T positions that predict the completion). Masked
# positions (after the end token) are not part of the completion.

# %%
T = roll.completion_ids.shape[1]
with torch.no_grad():
    logprobs = ops.completion_token_logprobs(model, roll.input_ids, roll.attention_mask, T)  # (B, T)
mask = roll.completion_mask  # (B, T)
pd.DataFrame(
    {
        "prompt": roll.prompts,
        "completion": roll.completions,
        "token log-probs": [[round(v, 3) for v in row] for row in (logprobs * mask).tolist()],
        "log π(y|x)": ops.masked_sum(logprobs, mask, dim=-1).tolist(),
        "π(y|x)": ops.masked_sum(logprobs, mask, dim=-1).exp().tolist(),
    }
)

# %% [markdown]
# Any completion can be scored, not only sampled ones. `lab.batching` does this for offline data (SFT, DPO,
# reward models). The base model's carry habit shows up directly: for `47+38=` it puts more probability on
# the dropped-carry answer `75` than on the right one.

# %%
answers = ["85", "75", "84", "815"]
batch = encode_pairs(tok, ["47+38="] * len(answers), answers)  # completion + eos
with torch.no_grad():
    seq_logprob, n_tokens = sequence_logprob(model, batch)
pd.DataFrame(
    {
        "completion": answers,
        "tokens (with eos)": n_tokens.tolist(),
        "log π(y|x)": seq_logprob.tolist(),
        "π(y|x)": seq_logprob.exp().tolist(),
    }
)

# %% [markdown]
# ## 4. Estimating KL from samples: k1, k2, k3
#
# Every RL method here keeps the policy close to a reference policy by the KL divergence
# $\mathrm{KL}(\pi\,\|\,\pi_\text{ref}) = \mathbb{E}_{y\sim\pi}[\log \pi(y) - \log \pi_\text{ref}(y)]$.
# With sequences we can't sum over all y, so it is estimated from the sampled tokens. With
# $\log r = \log \pi_\text{ref}(y) - \log \pi(y)$ (Schulman, *Approximating KL divergence*, 2020):
#
# | estimator | formula | unbiased? | sign |
# |---|---|---|---|
# | k1 | $-\log r$ | yes | can be negative |
# | k2 | $\tfrac12 (\log r)^2$ | no | ≥ 0 |
# | k3 | $(r - 1) - \log r$ | yes | ≥ 0 |
#
# By hand, for a token with π = 0.5 and π_ref = 0.25 (log r = log ½ = −0.6931):
# k1 = 0.6931, k2 = ½ · 0.6931² = 0.2402, k3 = (0.5 − 1) + 0.6931 = 0.1931.
# And for a token with π = 0.25, π_ref = 0.5 (log r = +0.6931): k1 = −0.6931, k2 = 0.2402,
# k3 = (2 − 1) − 0.6931 = 0.3069.

# %%
logprobs_toy = torch.log(torch.tensor([0.5, 0.25]))
ref_logprobs_toy = torch.log(torch.tensor([0.25, 0.5]))
pd.DataFrame(
    {name: ops.kl_estimate(name, logprobs_toy, ref_logprobs_toy).tolist() for name in ("k1", "k2", "k3")},
    index=["π=0.5, π_ref=0.25", "π=0.25, π_ref=0.5"],
)

# %% [markdown]
# The `bandit` task has one-token answers, so the exact KL is a sum over the vocabulary and we can see how
# good each estimator is. Take π_ref = the built-in bandit model and, as the policy π, the optimum π* of the
# next section at two strengths (β = 1: close to π_ref; β = 0.2: far from it). Draw `KL_SAMPLES` tokens
# from π and average each estimator, many times over:

# %%
bandit_task = get_task("bandit")
ref_policy = load_policy(task="bandit", mode="lora")
btok = ref_policy.tokenizer
with torch.no_grad():
    ref_logprobs = bandit.next_token_logprobs(ref_policy.model, btok, bandit.PROMPTS)  # (B, V)
rewards = bandit.reward_tables(bandit.PROMPTS, btok)  # (B, V)

rows, per_sample = [], []
g = torch.Generator().manual_seed(0)
for beta in (1.0, 0.2):
    pi = bandit.pi_star(ref_logprobs[0], rewards[0], beta)  # (V,) first prompt: "pick a colour :"
    exact = bandit.kl(pi, ref_logprobs[0]).item()
    y = torch.multinomial(pi.exp(), 20 * KL_SAMPLES, replacement=True, generator=g).view(20, KL_SAMPLES)
    for name in ("k1", "k2", "k3"):
        values = ops.kl_estimate(name, pi[y], ref_logprobs[0][y])  # (20, KL_SAMPLES) one value per token
        means = values.mean(-1)  # (20,) one estimate per repeat
        rows.append(
            {
                "β": beta,
                "estimator": name,
                "exact KL": exact,
                "mean estimate": means.mean().item(),
                "std of one estimate": means.std().item(),
                "std per token": values.std().item(),
                "min per token": values.min().item(),
            }
        )
        per_sample += [{"β": beta, "estimator": name, "value": v} for v in values[0, :500].tolist()]
pd.DataFrame(rows)

# %%
px.box(
    pd.DataFrame(per_sample),
    x="estimator",
    y="value",
    color="estimator",
    facet_col="β",
    title="per-token values of the three KL estimators (500 tokens from π)",
).show()

# %% [markdown]
# Read the table: k1 and k3 average to the exact KL, k2 does not (it is biased, most visibly when π is far
# from π_ref). k1 has tokens with negative values, so a few samples can show a negative "KL"; k3 never does
# and, when π is close to π_ref (β = 1), its per-token spread is far smaller than k1's; far from π_ref
# (β = 0.2) that advantage can reverse. Close to π_ref is where a KL-regularized run spends its time, which is
# why GRPO puts k3 in its loss; PPO-RLHF puts k1 into the per-token reward, where its sum over a completion
# is exactly the log-ratio of the whole sequence.
#
# ## 5. The KL-regularized objective and its optimum
#
# All the methods in the later notebooks aim at the same target:
#
# $$\max_\pi\; \mathbb{E}_{y\sim\pi(\cdot\mid x)}\big[r(x,y)\big] \;-\; \beta\,\mathrm{KL}\big(\pi(\cdot\mid x)\,\|\,\pi_\text{ref}(\cdot\mid x)\big).$$
#
# Writing the expectation as a sum over y, adding a Lagrange multiplier for $\sum_y \pi(y\mid x) = 1$ and
# setting the derivative to zero gives a closed form:
#
# $$\pi^*(y\mid x) = \frac{1}{Z(x)}\,\pi_\text{ref}(y\mid x)\,e^{r(x,y)/\beta},\qquad
#   Z(x) = \sum_y \pi_\text{ref}(y\mid x)\,e^{r(x,y)/\beta}.$$
#
# The reference is re-weighted by the exponentiated reward: β large keeps π_ref, β small moves all mass to
# the best answer. For most tasks Z(x) is a sum over every possible text and can't be computed; for
# `bandit` it is a sum over one token, so `lab.tasks.bandit.pi_star` computes π* exactly.
#
# By hand for `pick a colour :` with the pretraining probabilities (red .10, green .25, yellow .20,
# blue .45) and rewards (1, .5, .25, 0) at β = 1: the weights π_ref·e^r are .10·2.718 = .2718,
# .25·1.649 = .4122, .20·1.284 = .2568, .45·1 = .45; Z = 1.3908, so π* = (.195, .296, .185, .324).

# %%
prompt = "pick a colour :"
answers = list(bandit.REWARDS[prompt])
ref_probs = torch.tensor([bandit.REF_PROBS[prompt][a] for a in answers])
r = torch.tensor([bandit.REWARDS[prompt][a] for a in answers])
star = bandit.pi_star(ref_probs.log(), r, beta=1.0).exp()
print("lab:    ", [round(p, 3) for p in star.tolist()])
print("by hand:", [0.195, 0.296, 0.185, 0.324])

# %% [markdown]
# The same on the built-in model's own π_ref (which puts a little mass outside the four answers too), for a
# few β:

# %%
ids = btok.convert_tokens_to_ids(answers)
bars = [go.Bar(name="π_ref", x=answers, y=ref_logprobs[0, ids].exp().tolist())]
for beta in (3.0, 1.0, 0.3, 0.1):
    star = bandit.pi_star(ref_logprobs[0], rewards[0], beta).exp()
    bars.append(go.Bar(name=f"π*, β={beta}", x=answers, y=star[ids].tolist()))
fig = go.Figure(bars)
fig.update_layout(
    barmode="group", title=f"{prompt!r}: rewards {bandit.REWARDS[prompt]}", yaxis_title="probability", height=380
)
fig.show()

# %% [markdown]
# π* really is the best trade-off: its objective beats both π_ref (no reward gained) and the greedy policy
# that always picks the best answer (reward gained, but at a large KL cost), at every β.

# %%
best = torch.full_like(ref_logprobs, -math.inf).scatter(-1, rewards.argmax(-1, keepdim=True), 0.0)
rows = []
for beta in (3.0, 1.0, 0.3, 0.1):
    candidates = {"π_ref": ref_logprobs, "greedy on r": best, "π*": bandit.pi_star(ref_logprobs, rewards, beta)}
    # J(π) = E_π[r] − β·KL(π‖π_ref), averaged over the 6 prompts
    rows.append(
        {
            "β": beta,
            **{
                f"J({name})": (bandit.expected_reward(lp, rewards) - beta * bandit.kl(lp, ref_logprobs)).mean().item()
                for name, lp in candidates.items()
            },
        }
    )
pd.DataFrame(rows)

# %% [markdown]
# Sweeping β traces the **reward–KL frontier**: the highest expected reward any policy can reach at a given
# KL from π_ref. `06_compare` puts every method's trained policy on this chart.

# %%
frontier = []
for beta in torch.logspace(-2, 1, 25).tolist():
    star = bandit.pi_star(ref_logprobs, rewards, beta)  # (B, V)
    frontier.append(
        {
            "β": beta,
            "KL(π*‖π_ref)": bandit.kl(star, ref_logprobs).mean().item(),
            "E[r] under π*": bandit.expected_reward(star, rewards).mean().item(),
        }
    )
frontier = pd.DataFrame(frontier)
fig = px.line(
    frontier,
    x="KL(π*‖π_ref)",
    y="E[r] under π*",
    hover_data=["β"],
    markers=True,
    title="bandit: the reward–KL frontier traced by π* as β goes from 10 to 0.01",
)
fig.add_scatter(
    x=[0.0],
    y=[bandit.expected_reward(ref_logprobs, rewards).mean().item()],
    mode="markers",
    marker=dict(size=12),
    name="π_ref",
)
fig.show()

# %% [markdown]
# ## Try this
#
# * **Temperature.** Score samples at a lower temperature with `lab.evaluate.answer`:
#   `answer(model, tok, arith, arith.eval_prompts(), greedy=False, temperature=0.5)`. On carry problems the
#   right answer is the minority, so a colder sampler picks it less often and accuracy moves towards the
#   greedy number.
# * **β.** In the bar chart, try β = 0.03: π* is almost one-hot on the best answer. In the KL table, try
#   β = 0.05: k1's negative values and k2's bias both grow as π moves away from π_ref.
