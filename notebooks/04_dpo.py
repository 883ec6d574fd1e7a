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
# # 04 · DPO: preferences without a reward model or sampling
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lab-rl/lab/blob/main/notebooks/04_dpo.ipynb)
#
# Direct Preference Optimization skips both the reward model and the RL loop. The KL-regularized objective
# has a closed-form optimum, and solving it for the reward shows that the policy itself defines a reward,
# β·log π_θ/π_ref. Fit that implicit reward to the preference pairs with the Bradley–Terry loss and you are
# training the policy directly, with two forward passes per pair and ordinary backpropagation. This
# notebook derives the loss, checks it and three variants by hand (length-normalized DPO, SimPO, IPO),
# trains on the `reviews` pairs, and measures exactly, on an enumerable task, the probability DPO leaves on
# answers that no pair holds.

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
STEPS = 3 if LAB_FAST else 60  # optimizer steps
BATCH_SIZE = 8 if LAB_FAST else 32  # preference pairs per step
BETA = 0.1  # β of the sigmoid (DPO) loss
VARIANT_STEPS = 1 if LAB_FAST else 40  # steps for each variant in §6
LEAK_STEPS = 3 if LAB_FAST else 60  # steps of the run in §7 (what DPO never sees)

# %% [markdown]
# ### Switch: a real model from the hub (off by default)
#
# Everything below runs on the lab's built-in task and tiny model, on any CPU, offline. Set
# `USE_HUB = True` on a GPU runtime with network access (Colab: *Runtime → Change runtime type → GPU*)
# to run the same cells on a real model and dataset instead.
#
# With the switch on, the policy is Qwen2.5-0.5B-Instruct in 4-bit with LoRA adapters, and the pairs are
# UltraFeedback's (about 62k). Not run here (no network, no GPU on the machines this lab is tested on);
# estimates only: about 0.5 GB of 4-bit weights plus activations for 16 sequences of up to 1,024 tokens
# per step; plan for a 16 GB GPU. The reference policy costs no memory: it is the same weights with the
# adapters switched off. There is no gold reward for these pairs, so the gold columns are skipped and
# §6 (variants on `reviews`) still runs on the built-in task.

# %%
USE_HUB = False  # ← the switch
HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
HUB_SETTINGS = dict(  # a starting point, not a tuned recipe
    task="hf:trl-lib/ultrafeedback_binarized",  # {chosen, rejected} conversations, prompt inside
    model=HUB_MODEL,
    mode="qlora",
    lr=5e-5,
    max_length=1024,
    max_new_tokens=128,
    batch_size=8,
    steps=300,
    eval_size=32,
    kl_samples=4,
)
hub_switch(USE_HUB)

# %%
import pandas as pd
import plotly.express as px
import torch

from lab.data import load_preference_rows
from lab.dpo import (
    DPOConfig,
    dpo_loss,
    ipo_loss,
    length_normalized_dpo_loss,
    simpo_loss,
    train,
)
from lab.evaluate import before_after, evaluate, sample_heldout, sampled_kl
from lab.modeling import load_policy
from lab.runner import load_for
from lab.sampling import format_prompt, generate
from lab.tasks import TASKS

# %% [markdown]
# ## 1. From the RLHF objective to a classification loss
#
# The KL-regularized objective (see `01_tour`, §5) has the optimum
# $\pi^*(y\mid x) = \pi_\text{ref}(y\mid x)\, e^{r(x,y)/\beta} / Z(x)$. Take the log and solve for the reward:
#
# $$r(x, y) = \beta \log\frac{\pi^*(y\mid x)}{\pi_\text{ref}(y\mid x)} + \beta \log Z(x).$$
#
# $Z(x)$ is a sum over every possible text and can't be computed, but it depends on the prompt only, so it
# cancels in a comparison of two answers to the same prompt. Put this reward into the Bradley–Terry model
# of the preferences and replace π* by the policy being trained:
#
# $$L_\text{DPO}(\theta) = -\,\mathbb{E}_{(x, y_w, y_l)}\Big[\log\sigma\Big(
#     \underbrace{\beta\log\tfrac{\pi_\theta(y_w\mid x)}{\pi_\text{ref}(y_w\mid x)}}_{\hat r_w}
#   - \underbrace{\beta\log\tfrac{\pi_\theta(y_l\mid x)}{\pi_\text{ref}(y_l\mid x)}}_{\hat r_l}\Big)\Big].$$
#
# The RL problem has become maximum likelihood on a fixed dataset. The gradient shows what it does:
#
# $$\nabla_\theta L = -\beta\,\sigma(\hat r_l - \hat r_w)\,\big[\nabla\log\pi_\theta(y_w\mid x) - \nabla\log\pi_\theta(y_l\mid x)\big]:$$
#
# raise the winner, lower the loser, weighted by how wrong the implicit reward model still is
# (σ(r̂_l − r̂_w) is near 1 when it prefers the loser, near 0 once it is confidently right).
#
# ## 2. The loss on toy numbers
#
# One pair with log π_θ(y_w) = −1, log π_θ(y_l) = −3 and log π_ref = −2 for both, β = 0.1:
# r̂_w = 0.1 · (−1 + 2) = 0.1, r̂_l = 0.1 · (−3 + 2) = −0.1, so
# L = −log σ(0.2) = log(1 + e^{−0.2}) = log 1.8187 = 0.5981.
# The gradient with respect to log π_θ(y_w) is −β σ(−0.2) = −0.1 · 0.4502 = −0.0450, and +0.0450 for the loser.
# At the start of training π_θ = π_ref, every r̂ is 0 and the loss is log 2 = 0.6931.

# %%
logprobs_chosen = torch.tensor([-1.0], requires_grad=True)
logprobs_rejected = torch.tensor([-3.0], requires_grad=True)
ref_logprobs_chosen, ref_logprobs_rejected = torch.tensor([-2.0]), torch.tensor([-2.0])
loss, metrics = dpo_loss(logprobs_chosen, logprobs_rejected, ref_logprobs_chosen, ref_logprobs_rejected, beta=0.1)
loss.backward()
print(
    f"loss {loss.item():.4f} (by hand 0.5981)   r̂_w {metrics['rewards/chosen'].item():+.2f}   "
    f"r̂_l {metrics['rewards/rejected'].item():+.2f}"
)
print(
    f"dL/dlog π(y_w) {logprobs_chosen.grad.item():+.4f}   dL/dlog π(y_l) {logprobs_rejected.grad.item():+.4f}"
    "   (by hand ∓0.0450)"
)
same, _ = dpo_loss(ref_logprobs_chosen, ref_logprobs_rejected, ref_logprobs_chosen, ref_logprobs_rejected, beta=0.1)
print(f"π_θ = π_ref: {same.item():.4f} = log 2")

# %% [markdown]
# **Variants** (each is its own function in `lab.dpo`). Same pair, with |y_w| = 2 and |y_l| = 4 tokens:
#
# | variant | idea | by hand |
# |---|---|---|
# | length-normalized DPO (Tulu 3), β = 5 | divide each log-ratio by its length, so a long answer can't win on many small per-token gains | r̂_w = 5·1/2 = 2.5, r̂_l = 5·(−1)/4 = −1.25; −log σ(3.75) = log(1 + e^{−3.75}) = 0.0232 |
# | SimPO, β = 2, γ = 0.5 | no reference at all: the reward is the policy's own per-token log-likelihood, and the winner must clear a margin γ | r̂_w = 2·(−1/2) = −1, r̂_l = 2·(−3/4) = −1.5; −log σ(0.5 − 0.5) = log 2 = 0.6931 |
# | IPO, β = 0.1 | regress the (per-token) log-ratio margin onto 1/(2β) instead of pushing it to infinity | h = 1/2 − (−1)/4 = 0.75; (0.75 − 5)² = 18.0625 |

# %%
chosen_lengths, rejected_lengths = torch.tensor([2.0]), torch.tensor([4.0])
lp_w, lp_l = torch.tensor([-1.0]), torch.tensor([-3.0])
rows = [
    (
        "length-normalized DPO, β=5",
        length_normalized_dpo_loss(
            lp_w, lp_l, ref_logprobs_chosen, ref_logprobs_rejected, chosen_lengths, rejected_lengths, beta=5.0
        )[0],
        0.0232,
    ),
    ("SimPO, β=2, γ=0.5", simpo_loss(lp_w / chosen_lengths, lp_l / rejected_lengths, beta=2.0, gamma=0.5)[0], 0.6931),
    (
        "IPO, β=0.1",
        ipo_loss(lp_w, lp_l, ref_logprobs_chosen, ref_logprobs_rejected, chosen_lengths, rejected_lengths, beta=0.1)[0],
        18.0625,
    ),
]
pd.DataFrame([{"variant": name, "lab": round(value.item(), 4), "by hand": hand} for name, value, hand in rows])

# %% [markdown]
# ## 3. A short run on the `reviews` pairs
#
# The metrics are the implicit reward model's: `rewards/accuracy` is how often r̂_w > r̂_l on the batch,
# `rewards/margin` the mean r̂_w − r̂_l. `logprobs/chosen` and `logprobs/rejected` are the policy's
# log-likelihoods of the two answers; it is common for *both* to fall while the margin grows. `kl/ref` is
# estimated every step from a few fresh samples of π_θ (before that step's update), and on the held-out
# prompts at the end, together with `eval/gold_reward`.

# %%
settings = dict(task="reviews", steps=STEPS, batch_size=BATCH_SIZE, beta=BETA)
if USE_HUB:
    settings.update(HUB_SETTINGS)
cfg = DPOConfig(**settings)
task = TASKS.get(cfg.task)
policy = load_for(cfg, task)

chart = LiveChart(
    ["loss/dpo", "rewards/accuracy", "rewards/margin", "logprobs/chosen", "logprobs/rejected"], title="DPO"
)
history = []
for m in tqdm(train(cfg, policy=policy), total=cfg.steps):
    history.append(m)
    chart.update(m)
print({k: round(v, 3) for k, v in history[-1].items() if k.startswith(("eval/", "kl/"))})

# %% [markdown]
# ## 4. Plots

# %%
df = pd.DataFrame(history)
px.line(
    df,
    x="step",
    y=["rewards/chosen", "rewards/rejected"],
    markers=True,
    title="implicit rewards β·log π_θ/π_ref of the chosen and rejected answers",
).show()

# %% [markdown]
# ## 5. Before and after
#
# The same held-out prompts answered greedily by π_ref (adapters off) and the tuned policy, with the gold
# reward of each answer. Read the answers, not only the rewards: the gold reward scores words, not variety
# or grammar, and nothing in DPO's loss asks for either, so a longer run can converge on one template for
# every prompt. The line above the table counts the distinct answers once each prompt's item is written
# "…", next to the sampled KL to π_ref at the end of the run.

# %%
if task is not None:
    from lab.tasks.reviews import item_of

    table = pd.DataFrame(before_after(policy, task, n=8))
    print(f"mean gold reward: before {table.before_reward.mean():+.2f}, after {table.after_reward.mean():+.2f}")
    for side in ("before", "after"):
        templates = {answer.replace(item_of(p), "…") for p, answer in zip(table.prompt, table[side])}
        print(f"{side}: {len(templates)} distinct answers for {len(table)} prompts, e.g. {sorted(templates)[0]!r}")
    print(f"sampled KL(π_θ‖π_ref) after {cfg.steps} steps: {history[-1].get('kl/ref', float('nan')):.2f} nats")
else:  # no gold reward for your own data: show the completions
    prompts = [format_prompt(policy.tokenizer, r["prompt"]) for r in load_preference_rows(cfg)[:4]]
    with policy.reference() as ref:
        before = generate(ref, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
    after = generate(policy.model, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
    table = pd.DataFrame({"prompt": prompts, "before": before, "after": after})
table

# %% [markdown]
# ## 6. The variants side by side
#
# Each variant trains a fresh copy of the built-in `reviews` model for `VARIANT_STEPS` steps with its own
# default β, listed in the table's β column (the β's mean different things, so each loss has its own scale).
# Then: greedy held-out gold reward, answer length, and the sampled KL to π_ref (SimPO has no reference, so
# its KL is measured afterwards, against the adapters-off model).

# %%
reviews = TASKS["reviews"]
variants = []
for loss_type in ("sigmoid", "length_normalized", "simpo", "ipo"):
    vcfg = DPOConfig(task="reviews", loss_type=loss_type, steps=VARIANT_STEPS, batch_size=BATCH_SIZE, sample_every=0)
    vpolicy = load_policy(task="reviews", mode="lora")
    last = list(tqdm(train(vcfg, policy=vpolicy), total=vcfg.steps, desc=loss_type))[-1]
    result = evaluate(vpolicy, reviews)
    roll = sample_heldout(vpolicy, reviews.eval_prompts(), max_new_tokens=reviews.max_new_tokens)
    variants.append(
        {
            "loss_type": loss_type,
            "β": vcfg.beta,
            "gold reward (greedy)": result["gold_reward"],
            "words": result["length"],
            "kl/ref": sampled_kl(vpolicy, roll),
            "rewards/accuracy (last batch)": last["rewards/accuracy"],
        }
    )
pd.DataFrame(variants)

# %% [markdown]
# ## 7. What DPO never sees: the mass off the support
#
# The loss only compares log-ratios of answers that appear in some pair. Call those answers the support
# S(x). Nothing in the loss says how much probability the policy should keep on every other response, so
# that mass goes wherever the shared weights take it. On an enumerable task we can measure it exactly:
#
# * `eval/mass_off_support` = π_θ(y ∉ S(x)), the probability of a response that no training pair holds;
# * `eval/kl_to_optimum_support` = KL(π* ‖ π_θ) with both renormalized over S(x): does DPO match π* on
#   the answers it saw?
# * `eval/kl_to_optimum` = KL(π* ‖ π_θ) over the whole vocabulary: does it match π* everywhere?
#
# To make the support visibly smaller than the response space, we declare a task of our own
# (`lab.tasks.EnumerableTask`): the `bandit` rewards and model, but pairs drawn so that each prompt's best
# answer is never in one. π* = π_ref·e^{r/β}/Z still wants that answer; DPO never hears of it.

# %%
from lab.tasks import EnumerableTask, register
from lab.tasks.bandit import REF_PROBS, REWARDS
from lab.tasks.enumerable import mass_off_support, next_token_logprobs, pair_support, pi_star, support_mask

unseen = {p: max(table, key=table.get) for p, table in REWARDS.items()}  # each prompt's best answer
pair_probs = {p: {a: 0.0 if a == unseen[p] else q for a, q in probs.items()} for p, probs in REF_PROBS.items()}
leaky = register(
    EnumerableTask("bandit-unseen", REWARDS, ref_probs=pair_probs, model="bandit", pairs=2000), replace=True
)
lcfg = DPOConfig(
    task="bandit-unseen",
    mode="full",
    beta=0.5,
    steps=LEAK_STEPS,
    batch_size=64,
    eval_every=max(LEAK_STEPS // 6, 1),
    sample_every=0,
)
lpolicy = load_for(lcfg, leaky)
tok, prompts = lpolicy.tokenizer, leaky.eval_prompts()
with torch.no_grad(), lpolicy.reference() as ref:
    ref_logprobs = next_token_logprobs(ref, tok, prompts)  # (B, V)
star = pi_star(ref_logprobs, leaky.reward_tables(prompts, tok), lcfg.beta)  # (B, V)
support = support_mask(prompts, pair_support(leaky.preference_rows("train")), tok)  # (B, V) bool
print(
    f"mass off the support: π_ref {mass_off_support(ref_logprobs, support).mean():.3f}, "
    f"π* {mass_off_support(star, support).mean():.3f}"
)

leak = [m for m in tqdm(train(lcfg, policy=lpolicy), total=lcfg.steps) if "eval/kl_to_optimum" in m]
leak_df = pd.DataFrame(leak)
fig = px.line(
    leak_df,
    x="step",
    y=["eval/kl_to_optimum", "eval/kl_to_optimum_support", "eval/mass_off_support"],
    markers=True,
    title="DPO on pairs that never hold the best answer (β = 0.5)",
)
fig.add_hline(
    y=mass_off_support(star, support).mean().item(), line_dash="dot", annotation_text="π*'s mass off the support"
)
fig.show()
first, last = leak[0], leak[-1]
print(
    f"steps {first['step']} → {last['step']}: "
    + ", ".join(f"{k} {first[k]:.3f} → {last[k]:.3f}" for k in ("eval/kl_to_optimum_support", "eval/kl_to_optimum"))
    + f", eval/mass_off_support {first['eval/mass_off_support']:.3f} → {last['eval/mass_off_support']:.3f}"
    + f" (π* puts {mass_off_support(star, support).mean():.3f} there)"
)

# %% [markdown]
# Read the chart with the line under it. On the support, KL(π*‖π_θ) falls when DPO finds π* among the
# answers it saw. Over the whole vocabulary it can fall only as far as the mass off the support allows, and
# nothing in the loss moves that mass towards π*'s. How much the unseen mass moves, and in which direction,
# is not set by the loss: it is a side effect of the shared weights, which is why it is worth logging. The
# bars show one prompt answer by answer.

# %%
prompt = prompts[0]
with torch.no_grad():
    after = next_token_logprobs(lpolicy.model, tok, [prompt])[0]  # (V,)
answers = list(REWARDS[prompt])
ids = [tok.convert_tokens_to_ids(a) for a in answers]
bars = []
for label, logprobs in (("π_ref", ref_logprobs[0]), ("π*", star[0]), ("π_θ after DPO", after)):
    probs = logprobs.exp()
    bars += [
        {
            "policy": label,
            "response": a + (" (in no pair)" if a == unseen[prompt] else ""),
            "probability": probs[i].item(),
        }
        for a, i in zip(answers, ids)
    ]
    bars.append({"policy": label, "response": "every other token", "probability": 1 - probs[ids].sum().item()})
px.bar(
    pd.DataFrame(bars),
    x="response",
    y="probability",
    color="policy",
    barmode="group",
    title=f"{prompt!r}: rewards {REWARDS[prompt]}",
).show()

# %% [markdown]
# ## Try this
#
# * **β** (`BETA = 0.5` or `0.02`): a larger β makes each nat of log-ratio worth more implicit reward, so the
#   loss saturates after a smaller move away from π_ref; watch `kl/ref` and `rewards/margin`.
# * **`settings["label_smoothing"] = 0.2`** (conservative DPO): assumes a fifth of the labels are flipped;
#   the margin stops growing instead of being pushed to infinity on pairs the model already gets right.
# * **More `VARIANT_STEPS`**: the length columns show whether a variant drifts towards longer or shorter
#   answers; on `reviews` length beyond 12 words costs gold reward.
