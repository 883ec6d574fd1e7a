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
# # 02 · A reward model from pairwise preferences
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lab-rl/lab/blob/main/notebooks/02_reward_model.ipynb)
#
# Nobody can say how good a review is on an absolute scale, but anyone can say which of two reviews they
# prefer. A reward model turns such comparisons into a score r_φ(x, y) that an RL method can then
# maximize. This notebook fits one to the `reviews` task's preference pairs, checks it against the task's
# true (gold) reward, looks for where it is wrong, and uses it without any RL at all: best-of-N sampling.

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
STEPS = 5 if LAB_FAST else 150  # optimizer steps
BATCH_SIZE = 16 if LAB_FAST else 64  # preference pairs per step
EVAL_PAIRS = 64 if LAB_FAST else 500  # held-out pairs for eval/accuracy and eval/spearman
N = 4 if LAB_FAST else 8  # best-of-N: samples per prompt

# %% [markdown]
# ### Switch: a real model from the hub (off by default)
#
# Everything below runs on the lab's built-in task and tiny model, on any CPU, offline. Set
# `USE_HUB = True` on a GPU runtime with network access (Colab: *Runtime → Change runtime type → GPU*)
# to run the same cells on a real model and dataset instead.
#
# With the switch on, the reward model is Qwen2.5-0.5B-Instruct with a LoRA adapter and a scalar head,
# trained on UltraFeedback pairs (about 62k; a seeded 10% is held out). Not run here (the machines this lab
# is tested on have no network and no GPU), so only estimates: the 0.5B model in bf16 is about 1 GB of
# weights; with 8 pairs of up to 1,024 tokens per step, plan for a GPU with 16 GB (e.g. a Colab T4).
# The UltraFeedback rows carry no gold reward, so the cells that compare with it are skipped.

# %%
USE_HUB = False  # ← the switch
HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_POLICY_MODE = "qlora"  # the policy that samples for best-of-N (§6), in 4-bit
HUB_SETTINGS = dict(  # a starting point, not a tuned recipe
    task="hf:trl-lib/ultrafeedback_binarized",  # {chosen, rejected} conversations, prompt inside
    reward_model=HUB_MODEL,
    mode="lora",
    lr=5e-5,
    max_length=1024,
    batch_size=8,
    steps=500,
    eval_every=100,
    eval_pairs=500,
)
hub_switch(USE_HUB)

# %%
import pandas as pd
import plotly.express as px
import torch
from IPython.display import display

from lab.baselines import best_of_n, kl_bound
from lab.data import load_preference_rows
from lab.modeling import load_policy
from lab.rm import (
    RewardConfig,
    RewardScorer,
    bayes_accuracy,
    evaluate_reward_model,
    load_reward_backbone,
    reward_loss,
    train,
)
from lab.sampling import format_prompt
from lab.tasks import TASKS

# %% [markdown]
# ## 1. The idea: Bradley–Terry
#
# Assume every completion y of a prompt x has a hidden scalar quality r(x, y), and that a person comparing
# two completions prefers the better one only *probably*, with a logistic coin:
#
# $$P(y_w \succ y_l \mid x) = \sigma\big(r(x, y_w) - r(x, y_l)\big), \qquad \sigma(z) = \frac{1}{1 + e^{-z}}.$$
#
# The reward model r_φ is the maximum-likelihood fit of this model to pairs (x, y_w, y_l) of a winner and a
# loser: logistic regression on the difference of two scores,
#
# $$L_\text{RM}(\phi) = -\,\mathbb{E}_{(x, y_w, y_l)}\Big[\log \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big)\Big].$$
#
# Only differences enter, so adding a constant to every score of a prompt changes nothing: r_φ is defined
# up to a per-prompt shift. An optional centering term η·(r_w + r_l)² pins the scores near 0.
#
# In the lab, r_φ is the base language model's trunk with its own LoRA adapter and a linear head read at
# the last token (`lab.modeling.ScalarModel`); the loss is `lab.rm.reward_loss`.
#
# ## 2. The loss on toy numbers
#
# Two pairs with scores (r_w, r_l) = (1, 0) and (0, 2): the first is ranked right by a margin of 1, the
# second wrong by 2.
#
# * pair 1: −log σ(1) = log(1 + e^{−1}) = log 1.3679 = 0.3133
# * pair 2: −log σ(−2) = log(1 + e^{2}) = log 8.3891 = 2.1269
# * mean: (0.3133 + 2.1269) / 2 = 1.2201; accuracy ½; mean margin (1 − 2)/2 = −0.5
# * with η = 0.01: + 0.01 · ((1 + 0)² + (0 + 2)²)/2 = 0.025 → 1.2451

# %%
chosen_rewards, rejected_rewards = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
loss, metrics = reward_loss(chosen_rewards, rejected_rewards)
print(
    f"loss {loss.item():.4f} (by hand 1.2201)   accuracy {metrics['rm/accuracy'].item():.2f}   "
    f"margin {metrics['rm/margin'].item():+.2f}"
)
loss, _ = reward_loss(chosen_rewards, rejected_rewards, center_weight=0.01)
print(f"with centering η=0.01: {loss.item():.4f} (by hand 1.2451)")
loss, _ = reward_loss(chosen_rewards + 5, rejected_rewards + 5)
print(f"every score shifted by +5: {loss.item():.4f} (unchanged: only differences count)")

# %% [markdown]
# ## 3. The data
#
# The `reviews` pairs are two samples of the base model for the same prompt, labelled by the Bradley–Terry
# coin with the gold reward. Because the labels are noisy, even the gold reward disagrees with some of
# them: its agreement on the held-out pairs (`bayes_accuracy`) is the ceiling for any reward model.

# %%
settings = dict(
    task="reviews", steps=STEPS, batch_size=BATCH_SIZE, eval_every=max(STEPS // 5, 1), eval_pairs=EVAL_PAIRS
)
if USE_HUB:
    settings.update(HUB_SETTINGS)
cfg = RewardConfig(**settings)
task = TASKS.get(cfg.task)  # None for a hub dataset
if task is not None:
    eval_rows = load_preference_rows(cfg, "eval")[:EVAL_PAIRS]
    print(
        f"held-out pairs: {len(eval_rows)}; the gold reward agrees with {bayes_accuracy(eval_rows):.1%} of their labels"
    )
    display(pd.DataFrame(eval_rows[:6]))

# %% [markdown]
# ## 4. Train it
#
# `lab.rm.train` is a generator: each `next()` takes one optimizer step and yields its metrics, so the
# charts below are redrawn after every step. `eval/*` appear every `eval_every` steps, on held-out pairs.

# %%
model = load_reward_backbone(cfg, task)
if task is not None:
    print(
        "before training:",
        {k: round(v, 3) for k, v in evaluate_reward_model(model, model.tokenizer, eval_rows).items()},
    )

chart = LiveChart(["loss/rm", "rm/accuracy", "eval/accuracy", "eval/spearman"], title="reward model")
history = []
for m in tqdm(train(cfg, policy=model), total=cfg.steps):
    history.append(m)
    chart.update(m)
print({k: round(v, 3) for k, v in history[-1].items() if k.startswith("eval/")})

# %% [markdown]
# ## 5. Plots: does r_φ agree with the gold reward?
#
# Each point is one held-out completion: its gold reward against the reward model's score. A good reward
# model ranks them the same way (Spearman near 1); the scale and offset don't matter.

# %%
scorer = RewardScorer(model, model.tokenizer)
if task is not None:
    seen, points = set(), []
    for row in eval_rows:
        for side in ("chosen", "rejected"):
            key = (row["prompt"], row[side], bool(row.get(f"{side}_truncated", False)))
            if key not in seen:
                seen.add(key)
                points.append(
                    {"prompt": key[0], "completion": key[1], "truncated": key[2], "gold": row[f"{side}_gold"]}
                )
    points = pd.DataFrame(points)
    points["r_φ"] = scorer(list(points.prompt), list(points.completion), list(points.truncated)).tolist()
    px.scatter(
        points,
        x="gold",
        y="r_φ",
        hover_data=["completion"],
        opacity=0.6,
        title=f"held-out completions: Spearman {points[['gold', 'r_φ']].corr('spearman').iloc[0, 1]:.2f}",
    ).show()

# %% [markdown]
# Where is it wrong? Besides sentiment, the gold reward punishes repeating a word, rambling past 12 words
# and a missing final ".": the part that is hardest to learn from pairs. Compare the two columns' orderings
# on a few hand-written reviews: a completion the reward model rates above its gold rank is exactly what a
# policy optimizing r_φ will learn to write (`03_ppo_rlhf`).

# %%
if task is not None:
    probe_prompt = "review of the pasta :"
    probes = [
        ("the pasta was great .", False),
        ("the pasta was great great great .", False),
        ("the pasta was great and the pasta was great and fresh and tasty and good .", False),
        ("the pasta was great", False),
        ("the pasta was awful .", False),
    ]
    texts, cut = [p for p, _ in probes], [t for _, t in probes]
    display(
        pd.DataFrame(
            {
                "completion": texts,
                "gold": task.gold_rewards([probe_prompt] * len(texts), texts, cut),
                "r_φ": scorer([probe_prompt] * len(texts), texts, cut).tolist(),
            }
        )
    )

# %% [markdown]
# ## 6. Before and after: best-of-N
#
# A reward model is useful before any RL: sample N completions from the base policy and keep the one r_φ
# likes best (`lab.baselines.best_of_n`). "Before" is what one sample gets on average; "after" is the pick.
# Its KL from the base policy is at most log N − (N − 1)/N, whatever the task.

# %%
policy = load_policy(
    HUB_MODEL if USE_HUB else None,
    task=cfg.task if task is not None else None,
    mode=HUB_POLICY_MODE if USE_HUB else "lora",
)
if task is not None:
    prompts, max_new_tokens = task.eval_prompts()[:8], task.max_new_tokens
else:  # the first distinct prompts of the pairs, rendered with the chat template
    prompts = [format_prompt(policy.tokenizer, r["prompt"]) for r in load_preference_rows(cfg)]
    prompts, max_new_tokens = list(dict.fromkeys(prompts))[:4], 128
rows = best_of_n(policy, scorer, prompts, N, max_new_tokens=max_new_tokens, task=task)
table = pd.DataFrame(rows)
print(f"KL(best-of-{N} ‖ π_ref) ≤ {kl_bound(N):.3f} nats")
if task is not None:
    print(
        f"gold reward: one sample {table.mean_gold_reward.mean():+.2f}, best of {N} by r_φ "
        f"{table.gold_reward.mean():+.2f}"
    )
table

# %% [markdown]
# ## Try this
#
# * **Fewer steps** (`STEPS = 20`): held-out accuracy stays near ½ at first; watch how far below
#   `bayes_accuracy` it ends and how the Spearman correlation follows.
# * **Centering** (`settings["center_weight"] = 0.01`): the scores gather around 0 and nothing else
#   changes, because the loss only sees differences.
# * **Bigger N** in best-of-N (`N = 32`): the pick's r_φ score keeps rising with N. Does its gold reward
#   keep up? Where it doesn't, the extra samples are buying r_φ's blind spots: over-optimization without
#   any RL.
