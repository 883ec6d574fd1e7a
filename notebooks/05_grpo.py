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
# # 05 · GRPO: a group of samples is its own baseline
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lab-rl/lab/blob/main/notebooks/05_grpo.ipynb)
#
# GRPO keeps PPO's clipped update and drops its value network. For each prompt it samples a group of G
# answers, scores them, and uses each answer's z-score within its group as the advantage: better than its
# siblings → pushed up, worse → pushed down, all equal → nothing to learn. With a reward that can be
# checked (a verifier) it needs no reward model either. On `arith`, whose base model drops the carry when
# it answers greedily but sometimes samples the right sum, that is exactly enough.

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
STEPS = 4 if LAB_FAST else 40  # rollouts (one optimizer step each by default)
BATCH_SIZE = 4 if LAB_FAST else 8  # prompts per rollout
GROUP_SIZE = 4 if LAB_FAST else 8  # G: completions per prompt
EVAL_EVERY = 2 if LAB_FAST else 10  # greedy held-out accuracy every N steps
EVAL_SIZE = 32 if LAB_FAST else 200  # held-out problems per evaluation
LR = 1e-3  # AdamW learning rate: the method's default on the built-in models (GRPOConfig.lr)
BANDIT_STEPS = 6 if LAB_FAST else 60  # §6: steps of each bandit run (the method's bandit default: 60)

# %% [markdown]
# ### Switch: a real model from the hub (off by default)
#
# Everything below runs on the lab's built-in task and tiny model, on any CPU, offline. Set
# `USE_HUB = True` on a GPU runtime with network access (Colab: *Runtime → Change runtime type → GPU*)
# to run the same cells on a real model and dataset instead.
#
# With the switch on, GRPO trains Qwen2.5-0.5B-Instruct (4-bit, LoRA) on the GSM8K training questions with
# the lab's `math` reward: 1 when the completion's final answer (after `####`, in `\boxed{}`, or its last
# number) equals the row's `answer` column, else 0. Any Python function can take its place
# (`reward="python:module:function"`, called the way TRL calls a reward function). Not run here (no network, no GPU on the machines this lab is tested on); estimates only: 32 completions of
# up to 256 tokens per step, scored in microbatches of 8, fit a 16 GB GPU; generation dominates the time.

# %%
USE_HUB = False  # ← the switch
HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_SETTINGS = dict(  # a starting point, not a tuned recipe
    task="jsonl:gsm8k_train.jsonl",
    reward="math",
    model=HUB_MODEL,
    mode="qlora",
    max_new_tokens=256,
    batch_size=4,
    group_size=8,
    microbatch_size=8,
    lr=1e-5,
    beta=0.04,
    steps=200,
    eval_every=0,
)
if USE_HUB:  # GSM8K as {prompt, answer} rows; the math reward reads each row's answer column
    from datasets import load_dataset

    from lab.data import write_jsonl

    write_jsonl(
        "gsm8k_train.jsonl",
        (
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": row["question"] + "\nReason step by step, then give the "
                        "final answer as a number after '####'.",
                    }
                ],
                "answer": row["answer"].split("####")[-1].strip().replace(",", ""),
            }
            for row in load_dataset("openai/gsm8k", "main", split="train")
        ),
    )
hub_switch(USE_HUB)

# %%
import pandas as pd
import plotly.express as px
import torch
from IPython.display import display

from lab.evaluate import answer, before_after
from lab.grpo import GRPOConfig, clipped_surrogate, group_advantages, grpo_loss, train
from lab.ops import kl_k3
from lab.rewards import make_reward
from lab.rollout import load_prompt_rows
from lab.runner import load_for
from lab.sampling import format_prompt, generate
from lab.tasks import TASKS
from lab.tasks.arith import has_carry, parse_prompt

# %% [markdown]
# ## 1. The idea
#
# Sample G completions $y_1..y_G$ for a prompt from the current policy and score them. The advantage of
# each is its reward standardized *within its group*:
#
# $$\hat A_i = \frac{r_i - \mathrm{mean}(r_1..r_G)}{\mathrm{std}(r_1..r_G) + \epsilon}.$$
#
# No value network has to learn what a prompt is worth: the group's mean is the baseline, measured instead of
# predicted. Every token of $y_i$ gets the same $\hat A_i$. The update is PPO's clipped surrogate; DeepSeekMath
# adds a KL penalty to π_ref, estimated per token with k3 (unbiased and never negative, see `01_tour` §4):
#
# $$\ell_{it} = -\min\big(\rho_{it}\hat A_i,\ \mathrm{clip}(\rho_{it}, 1-\epsilon_\text{low}, 1+\epsilon_\text{high})\,\hat A_i\big) + \beta\, k_3\big(\pi_\theta, \pi_\text{ref}\big)_{it},
#   \qquad \rho_{it} = \frac{\pi_\theta(y_{it}\mid\cdot)}{\pi_\text{old}(y_{it}\mid\cdot)}.$$
#
# That k3 term has the right value and the wrong gradient: §6 shows where it leads. The lab's default
# (`kl_mode="k1_reward"`) puts the KL in the reward instead, $r_i - \beta \log \pi_\text{old}(y_i)/\pi_\text{ref}(y_i)$,
# before the group advantage, as PPO does.
#
# How the per-token losses $\ell_{it}$ are averaged into one number is where GRPO's descendants differ:
# per sequence then over the group (DeepSeekMath), over all tokens (DAPO), or by a constant (Dr. GRPO).
#
# A group whose answers all got the same reward (all right or all wrong) has $\hat A = 0$ and teaches
# nothing. So GRPO learns most from prompts the model solves *sometimes*: a built-in curriculum,
# measured by `groups/zero_std_frac` below.
#
# ## 2. The pieces on toy numbers
#
# **Group advantages.** Two prompts, G = 4, rewards (1, 0, 0, 1) and (1, 1, 1, 1). First group: mean 0.5,
# std √((4 · 0.25)/3) = 0.5774, so Â = ±0.5/0.5774 = ±0.8660. Second group: all equal, Â = 0.

# %%
rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # (B·G,) groups side by side
advantages = group_advantages(rewards, group_size=4)
print(
    [round(a, 4) for a in advantages.tolist()],
    "   mean per group:",
    [round(m, 4) for m in advantages.view(2, 4).mean(-1).tolist()],
)

# %% [markdown]
# **Clipping.** A token sampled with probability 0.5 that the policy now gives 0.75 (ratio 1.5), with
# Â = +1 and ε = 0.2: −min(1.5, 1.2) = −1.2, clipped high. A token whose ratio fell to 0.5 with Â = −1:
# −min(−0.5, −0.8) = 0.8, clipped low. **k3**: log π_θ = −1, log π_ref = −1.5, so log(π_ref/π_θ) = −0.5 and
# k3 = e^{−0.5} − 1 + 0.5 = 0.1065.

# %%
per_token, low, high = clipped_surrogate(
    torch.log(torch.tensor([[0.75], [0.25]])),
    torch.log(torch.tensor([[0.5], [0.5]])),
    torch.tensor([1.0, -1.0]),
    epsilon_low=0.2,
    epsilon_high=0.2,
)
print(
    "per-token loss",
    [round(v, 4) for v in per_token.flatten().tolist()],
    " clipped low",
    low.flatten().tolist(),
    " clipped high",
    high.flatten().tolist(),
)
print("k3:", round(kl_k3(torch.tensor(-1.0), torch.tensor(-1.5)).item(), 4))

# %% [markdown]
# **Averaging.** Two completions, one right answer of 1 token (Â = +1) and one wrong answer of 3 tokens
# (Â = −1), ratio 1, so ℓ = −Â on each token:
#
# * `sequence`: ½ · (−1/1 + 3/3) = 0; each wrong token weighs 1/6, the right one 1/2
# * `token`: (−1 + 3)/4 = 0.5; every token weighs 1/4
# * `constant` (T_max = 3): (−1 + 3)/(2 · 3) = 0.3333; every token weighs 1/6
#
# The weights are the gradients with respect to each token's log-prob, times −Â:

# %%
mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # (B, T): lengths 1 and 3
rows = []
for norm in ("sequence", "token", "constant"):
    logprobs = torch.full((2, 3), -0.7, requires_grad=True)
    loss, _ = grpo_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), mask, loss_norm=norm, max_new_tokens=3)
    loss.backward()
    rows.append(
        {
            "loss_norm": norm,
            "loss": round(loss.item(), 4),
            "weight of the right token": round(-logprobs.grad[0, 0].item(), 4),
            "weight of each wrong token": round(logprobs.grad[1, 0].item(), 4),
        }
    )
pd.DataFrame(rows)

# %% [markdown]
# ## 3. A short run on `arith`
#
# The reward is the gold one: 1 for the exact sum. `reward/mean` is the sampled accuracy of each rollout,
# `eval/accuracy` the greedy accuracy on held-out problems.

# %%
settings = dict(
    task="arith",
    steps=STEPS,
    batch_size=BATCH_SIZE,
    group_size=GROUP_SIZE,
    lr=LR,
    eval_every=EVAL_EVERY,
    eval_size=EVAL_SIZE,
)
if USE_HUB:
    settings.update(HUB_SETTINGS)
cfg = GRPOConfig(**settings)
task = TASKS.get(cfg.task)
policy = load_for(cfg, task)

chart = LiveChart(
    ["reward/mean", "eval/accuracy", "groups/zero_std_frac", "completion/length", "entropy"], title="GRPO"
)
history = []
for m in tqdm(train(cfg, policy=policy), total=cfg.steps):
    history.append(m)
    chart.update(m)

# %% [markdown]
# ## 4. Plots

# %%
df = pd.DataFrame(history)
px.line(
    df,
    x="step",
    y=[c for c in ("reward/mean", "eval/accuracy") if c in df],
    markers=True,
    title="sampled (reward/mean) and greedy held-out (eval/accuracy) accuracy",
).show()

# %% [markdown]
# ## 5. Before and after
#
# The held-out problems split by whether the ones digits carry, answered greedily by π_ref (adapters off)
# and by the tuned policy; then a few carry problems side by side.

# %%
if task is not None:
    heldout = task.eval_prompts()[:EVAL_SIZE]
    rows = []
    for kind in ("carry", "no carry"):
        prompts = [p for p in heldout if has_carry(*parse_prompt(p)) == (kind == "carry")]
        with policy.reference() as ref:
            before = answer(ref, policy.tokenizer, task, prompts)
        after = answer(policy.model, policy.tokenizer, task, prompts)
        rows.append(
            {
                "problems": kind,
                "n": len(prompts),
                "accuracy before": sum(before.rewards) / len(prompts),
                "accuracy after": sum(after.rewards) / len(prompts),
            }
        )
    display(pd.DataFrame(rows))
    carry = [p for p in heldout if has_carry(*parse_prompt(p))][:8]
    table = pd.DataFrame(before_after(policy, task, prompts=carry))
else:  # your own data: score with the run's reward function
    reward_fn = make_reward(cfg.reward)
    prompts = [format_prompt(policy.tokenizer, r["prompt"]) for r in load_prompt_rows(cfg)[:4]]
    with policy.reference() as ref:
        before = generate(ref, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
    after = generate(policy.model, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
    table = pd.DataFrame(
        {
            "prompt": prompts,
            "before": before,
            "after": after,
            "before_reward": reward_fn(prompts, before).tolist(),
            "after_reward": reward_fn(prompts, after).tolist(),
        }
    )
table

# %% [markdown]
# ## 6. Where the KL term leads: two fixed points on `bandit`
#
# On `bandit` every answer is one token, so the optimum of $E[r] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{ref})$ is
# known exactly, $\pi^* = \pi_\text{ref}\, e^{r/\beta}/Z$, and so is the point where each way of adding the KL
# stops moving: `lab.fixed_points` computes the expected GRPO update exactly (every group of G answers
# enumerated) and follows it until it vanishes.
#
# * `k1_reward` (the default): at π* the shaped reward $r - \beta\log\pi/\pi_\text{ref} = \beta\log Z$ is the same
#   for every answer, so every Â is 0: its fixed point *is* π*.
# * `k3` (DeepSeekMath): its expected gradient is that of KL(π_ref ‖ π), the reverse KL, and the std
#   division rescales the reward but not the KL term. At β = 0.5 its fixed point is farther from π* than
#   π_ref is (the lines under the chart give KL(π* ‖ fixed point) as a share of KL(π* ‖ π_ref)).
#
# Two runs at β = 0.5 with the bandit defaults (full fine-tuning, 12 prompts × G = 8 a step). Each logs
# `eval/kl_to_optimum` = KL(π* ‖ π_θ) and `eval/kl_to_fixed_point` = KL(its own fixed point ‖ π_θ); the lines
# under the chart say where each run ended, against where it started.

# %%
from lab.grpo import bandit_fixed_point
from lab.tasks.bandit import REWARDS, kl, next_token_logprobs, pi_star, reward_tables

BETA = 0.5
bandit_task = TASKS.get("bandit")
runs, fixed_points = {}, {}
for kl_mode in ("k1_reward", "k3"):
    bandit_cfg = GRPOConfig(
        task="bandit",
        beta=BETA,
        kl_mode=kl_mode,
        steps=BANDIT_STEPS,
        eval_every=max(1, BANDIT_STEPS // 12),
        sample_every=0,
    )
    bandit_policy = load_for(bandit_cfg, bandit_task)
    with torch.no_grad(), bandit_policy.reference() as ref:
        bandit_ref = next_token_logprobs(ref, bandit_policy.tokenizer, bandit_task.eval_prompts())  # (6, V)
    fixed_points[kl_mode] = bandit_fixed_point(bandit_cfg, bandit_policy, bandit_task, bandit_ref)  # (6, V)
    runs[kl_mode] = (
        pd.DataFrame([m for m in train(bandit_cfg, policy=bandit_policy) if "eval/kl_to_optimum" in m]),
        bandit_policy,
    )
curves = pd.concat([df.assign(kl_mode=mode) for mode, (df, _) in runs.items()])
curves = curves.melt(id_vars=["step", "kl_mode"], value_vars=["eval/kl_to_optimum", "eval/kl_to_fixed_point"])
px.line(
    curves,
    x="step",
    y="value",
    color="variable",
    facet_col="kl_mode",
    markers=True,
    title=f"β = {BETA}: distance to π* and to each mode's own fixed point (nats)",
).show()
bandit_prompts = bandit_task.eval_prompts()
star_all = pi_star(bandit_ref, reward_tables(bandit_prompts, bandit_policy.tokenizer), BETA)  # (6, V)
start = kl(star_all, bandit_ref).mean().item()  # KL(π* ‖ π_ref): where both runs begin
for mode, (df, _) in runs.items():
    end = df.iloc[-1]
    print(
        f"{mode}: fixed point at {kl(star_all, fixed_points[mode]).mean().item() / start:.0%} of KL(π*‖π_ref); "
        f"after {int(end['step'])} steps KL(π*‖π_θ) {start:.3f} → {end['eval/kl_to_optimum']:.3f} "
        f"({end['eval/kl_to_optimum'] / start:.1%} of the start), {end['eval/kl_to_fixed_point']:.3f} nats from "
        "its own fixed point"
    )

# %% [markdown]
# The first prompt's answers: π_ref, π*, each mode's fixed point, and where each run ended.

# %%
prompt = bandit_task.eval_prompts()[0]
tokenizer = runs["k3"][1].tokenizer
rewards = reward_tables([prompt], tokenizer)[0]  # (V,)
ids = [tokenizer.convert_tokens_to_ids(a) for a in REWARDS[prompt]]  # this prompt's answers
star = pi_star(bandit_ref[0], rewards, BETA)  # (V,)
with torch.no_grad():
    ended = {mode: next_token_logprobs(p.model, tokenizer, [prompt])[0] for mode, (_, p) in runs.items()}
pd.DataFrame(
    {
        "answer": tokenizer.convert_ids_to_tokens(ids),
        "reward": rewards[ids].tolist(),
        "π_ref": bandit_ref[0, ids].exp().tolist(),
        "π*": star[ids].exp().tolist(),
        "k3 fixed point": fixed_points["k3"][0, ids].exp().tolist(),
        "k1_reward run": ended["k1_reward"][ids].exp().tolist(),
        "k3 run": ended["k3"][ids].exp().tolist(),
    }
).round(3)

# %% [markdown]
# ## 7. Process vs outcome reward
#
# GRPO's outcome reward scores the whole answer once: every token of "75" (for 47+38) gets the same blame, the
# ones digit that was right as much as the tens digit that dropped the carry. DeepSeekMath (§4.1.3) also tries
# **process supervision**: a reward at the end of every step. Completion $i$ of the group has steps
# $j = 1..K_i$ ending at token index(j) with reward $r_i^j$; all the group's step rewards are normalized together,
# and a token's advantage sums the normalized rewards of the steps at or after it:
#
# $$\tilde r_i^j = \frac{r_i^j - \mathrm{mean}(R)}{\mathrm{std}(R)}, \quad R = \{r_i^j\}_{i, j}, \qquad
#   \hat A_{it} = \sum_{j:\ \mathrm{index}(j) \ge t} \tilde r_i^j .$$
#
# On `arith` every answer token is a step, rewarded 1 while the answer is still right so far; the end token is
# rewarded 1 when the answer is complete and right (`lab.process_reward.prefix_rewards`).

# %%
# Hand arithmetic: G = 2, step rewards [1, 1, 1] and [1, 0] (a two-step answer).
# R = {1, 1, 1, 1, 0}: mean 0.8, std √0.2 = 0.4472, so r̃ = +0.4472 for a 1 and −1.7889 for the 0.
# Â = suffix sums: [1.3416, 0.8944, 0.4472] and [0.4472 − 1.7889, −1.7889] = [−1.3416, −1.7889].
import os

import torch

from lab.process_reward import prefix_rewards, process_advantages

print(
    "85<eos>:",
    prefix_rewards(["8", "5"], "85", ended=True),
    "  75<eos>:",
    prefix_rewards(["7", "5"], "85", ended=True),
    "  84<eos>:",
    prefix_rewards(["8", "4"], "85", ended=True),
)
step_rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
step_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
print(process_advantages(step_rewards, step_mask, group_size=2, eps=0.0))

# %% [markdown]
# ### Outcome against process, same samples
#
# Two GRPO runs on `arith` with the same seed, rollouts and budget; only `reward_mode` differs. We chart the
# outcome reward of the rollouts (the exact-answer rate, which both runs log as `reward/mean`) and compare the greedy
# held-out accuracy before and after.

# %%
import plotly.graph_objects as go

from lab.grpo import GRPOConfig, train

PROCESS_FULL = os.environ.get("LAB_PROCESS_FULL", "0") == "1"  # the README's budget: 20 rollouts of 4 × 8
BUDGET = dict(steps=20, batch_size=4) if PROCESS_FULL else dict(steps=10, batch_size=4)
runs = {}
for mode in ("outcome", "process"):
    cfg = GRPOConfig(
        task="arith", reward_mode=mode, eval_every=BUDGET["steps"], out="runs/notebook", sample_every=0, **BUDGET
    )
    runs[mode] = list(train(cfg))
    print(f"{mode:8s} held-out accuracy after {cfg.steps} rollouts: {runs[mode][-1]['eval/accuracy']:.3f}")

fig = go.Figure()
for mode, history in runs.items():
    fig.add_trace(go.Scatter(x=[m["step"] for m in history], y=[m["reward/mean"] for m in history], name=mode))
fig.update_layout(title="GRPO on arith: outcome vs process reward", xaxis_title="rollout", yaxis_title="reward/mean")
fig

# %% [markdown]
# The process run's advantages differ inside one answer: the right tens digit of "84" keeps positive credit while
# the wrong ones digit is pushed down. On `arith` the carry error sits in the first digit, so both rewards blame
# the same token there; the process reward adds credit for the digits that were right, which is rare. One seed
# says little: `python scripts/process_vs_outcome.py` (in the README) runs both on three seeds, and there the two
# stay within a seed's spread of each other.

# %% [markdown]
# ## 8. Calibration: does the policy know when it is right?
#
# The seed remarks that RLHF'd models "at temperature 1 show much more overconfident behavior". To measure
# it, take the probability the policy gives its own whole answer, p = π_θ(y|x) = exp Σ_t log π_θ(y_t|x, y_<t),
# as its confidence, and compare it with how often such answers are right. Split the N answers into M
# equal-width bins of confidence, B_1 = [0, 1/M], B_m = ((m−1)/M, m/M]:
#
# $$\mathrm{ECE} = \sum_{m=1}^{M} \frac{|B_m|}{N}\,\bigl|\,\mathrm{acc}(B_m) - \mathrm{conf}(B_m)\,\bigr|$$
#
# 0 is perfect calibration; an overconfident policy has conf > acc in its top bins. The reliability diagram
# plots acc against conf per bin; a calibrated policy sits on the diagonal.

# %%
# The ECE on toy numbers, next to the hand arithmetic (M = 10):
#   0.9, 0.9 (one right) → bin (0.8, 0.9]: |0.5 − 0.9| · 2/4 = 0.20
#   0.6 (right)          → bin (0.5, 0.6]: |1.0 − 0.6| · 1/4 = 0.10
#   0.2 (wrong)          → bin (0.1, 0.2]: |0.0 − 0.2| · 1/4 = 0.05      ECE = 0.35
import os

import torch

from lab.diagnostics import expected_calibration_error, reliability_bins

confidences = torch.tensor([0.9, 0.9, 0.6, 0.2], dtype=torch.float64)
correct = torch.tensor([True, False, True, False])
print(f"ECE = {expected_calibration_error(confidences, correct):.4f}")
print(f"perfectly calibrated: {expected_calibration_error(torch.tensor([0.25] * 4), torch.tensor([1, 0, 0, 0])):.4f}")
print(f"all confident, all wrong: {expected_calibration_error(torch.ones(3), torch.zeros(3, dtype=torch.bool)):.4f}")
[b for b in reliability_bins(confidences, correct) if b["count"]]

# %% [markdown]
# ### Before and after GRPO on `arith`
#
# The base model drops the carry and is sure of it: its wrong answers get high probability. GRPO logs
# `eval/ece` at every evaluation (the run's `before` and `after` summaries hold it too). Here we draw the two
# reliability diagrams from the same held-out problems, with the adapters off (π_ref) and on (π_θ).

# %%
from lab.diagnostics import answer_confidences, ece_from_bins, reliability_figure
from lab.grpo import GRPOConfig, train
from lab.runner import load_for
from lab.tasks import get_task

CAL_STEPS = 4 if LAB_FAST else 30
CAL_EVAL = 32 if LAB_FAST else 200

task = get_task("arith")
cfg = GRPOConfig(task="arith", steps=CAL_STEPS, eval_every=0, eval_size=CAL_EVAL, out="runs/notebook", sample_every=0)
policy = load_for(cfg, task)
for _ in train(cfg, policy=policy):
    pass

prompts = task.eval_prompts()[:CAL_EVAL]
with policy.reference() as ref:
    before = reliability_bins(*answer_confidences(ref, policy.tokenizer, task, prompts))
after = reliability_bins(*answer_confidences(policy.model, policy.tokenizer, task, prompts))
print(f"eval/ece: π_ref {ece_from_bins(before):.3f} → π_θ {ece_from_bins(after):.3f}")
reliability_figure([("π_ref", before), ("π_θ after GRPO", after)], title="arith, greedy answers")

# %% [markdown]
# ### On `bandit`, exactly against π*
#
# On an enumerable task we need neither sampling nor a notion of "correct": compare π_θ with the optimum
# π* = π_ref·exp(r/β)/Z directly. Every (x, y) counts with weight π_θ(y|x); its confidence is π_θ(y|x), its
# "accuracy" π*(y|x). That diagram is exactly the limit of sampling y ~ π_θ and asking π* whether it agrees;
# `eval/ece_to_optimum` is its ECE, 0 at π_θ = π*.

# %%
from lab.diagnostics import exact_calibration_bins
from lab.rollout import bandit_reference
from lab.tasks.enumerable import next_token_logprobs, pi_star

BANDIT_BETA = 0.1
bandit = get_task("bandit")
bcfg = GRPOConfig(task="bandit", beta=BANDIT_BETA, steps=6 if LAB_FAST else 60, out="runs/notebook", sample_every=0)
bpolicy = load_for(bcfg, bandit)
ref_logprobs = bandit_reference(bpolicy, bandit)  # (B, V) π_ref over the vocabulary
rewards = bandit.reward_tables(bandit.eval_prompts(), bpolicy.tokenizer)  # (B, V)
target = pi_star(ref_logprobs, rewards.to(ref_logprobs), BANDIT_BETA)  # (B, V) log π*
bins_before = exact_calibration_bins(ref_logprobs, target)
for _ in train(bcfg, policy=bpolicy):
    pass
with torch.no_grad():
    logprobs = next_token_logprobs(bpolicy.model, bpolicy.tokenizer, bandit.eval_prompts())  # (B, V)
bins_after = exact_calibration_bins(logprobs, target)
print(f"ECE against π*: π_ref {ece_from_bins(bins_before):.3f} → π_θ {ece_from_bins(bins_after):.3f}")
reliability_figure([("π_ref", bins_before), ("π_θ after GRPO", bins_after)], title="bandit, exact against π*")

# %% [markdown]
# ## Try this
#
# * **`GROUP_SIZE = 2`** against **16**: a problem the model solves with probability p gives an all-equal
#   group (`groups/zero_std_frac`), which teaches nothing, with probability pᴳ + (1 − p)ᴳ. For p = 0.4 that
#   is 0.4² + 0.6² = 0.52 when G = 2 and 0.0003 when G = 16, at 8 times the sampling cost.
# * **`settings["num_iterations"] = 4`**: each rollout is reused for 4 updates, the ratio moves away from 1
#   and `clip/frac` becomes non-zero; try `epsilon_high=0.28` (DAPO's asymmetric clip) to let good answers
#   rise faster.
# * **`settings["beta"] = 0.04`** (DeepSeekMath's value): `kl/ref` appears in the metrics and the policy
#   stays closer to π_ref; with β = 0 (the lab's default, as in DAPO and Dr. GRPO) nothing holds it back but
#   the clip.
# * **§6 with `kl_mode="k3_ratio"`** (TRL's bias-corrected KL, the gradient of KL(π ‖ π_ref)) or with
#   `scale_rewards=False`: the fixed points move (`lab.grpo`'s docstring tabulates them; without the std
#   division k3_ratio lands on π* at β·G/(G − 1)), and `BETA = 0.1` puts all of them closer to π*.
