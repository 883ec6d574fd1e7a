"""Write the notebooks in this folder from the Python source below.

    python notebooks/make_notebooks.py            # rewrite every notebook
    python notebooks/make_notebooks.py 05_grpo    # rewrite the ones whose name contains "05_grpo"

A notebook here is a list of cells built with ``md(...)`` and ``code(...)``; the ``.ipynb`` files are written
with nbformat, without outputs and with stable cell ids, so a change to this file shows up as a small diff in
the notebook and ``tests/test_notebooks.py`` can check that the two never drift apart.

Every notebook follows the same order (the tour excepted, which trains nothing):

    0. title, Colab badge, one install cell (Colab only), parameters (LAB_FAST), the hub switch (default off)
    1. the equation and the idea
    2. the loss on toy tensors, next to the arithmetic done by hand
    3. a short run on the built-in default, with live charts and a progress bar
    4. plots of the run
    5. before and after: the same prompts answered by the base and the tuned policy
    6. try this: a knob or two and what to expect

The notebooks import everything they compute from ``lab``; none of them defines a loss of its own.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO = "lab-rl/lab"  # owner/name of the repository on GitHub, used by the Colab badge and the install cell

NOTEBOOKS: dict[str, Callable] = {}  # file stem -> function returning (title, cells)


def notebook(stem: str):
    def register(fn):
        NOTEBOOKS[stem] = fn
        return fn

    return register


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip("\n"))


# ----------------------------------------------------------------------------------------------------------------------
# Cells every notebook shares


def title_cell(stem: str, title: str, intro: str) -> tuple[str, str]:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{stem}.ipynb"
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
    return md(f"# {title}\n\n{badge}\n\n" + textwrap.dedent(intro).strip("\n"))


INSTALL = code(f"""
    # On Colab: install the lab and its requirements from GitHub. Anywhere else this cell changes nothing,
    # except that a notebook opened inside a clone of the repository imports the package next to it.
    import os
    import sys

    if "google.colab" in sys.modules:
        %pip install -q "git+https://github.com/{REPO}" -r https://raw.githubusercontent.com/{REPO}/main/requirements.txt
    elif os.path.isdir(os.path.join("..", "lab")):
        sys.path.insert(0, os.path.abspath(".."))
""")


def _join(*parts: str) -> str:
    """Dedent each piece of a cell on its own, then stack them (pieces come from differently indented strings)."""
    return "\n".join(textwrap.dedent(part).strip("\n") for part in parts)


def params_cell(body: str) -> tuple[str, str]:
    """The one parameter cell: LAB_FAST (set by CI) shrinks the run, the code path stays the same."""
    return (
        "code",
        _join(
            """
        # Parameters. LAB_FAST=1 (what CI sets) shrinks steps and batches so the notebook runs in seconds;
        # the code path is the same.
        import logging
        import os
        import warnings

        from transformers.utils import logging as transformers_logging

        LAB_FAST = os.environ.get("LAB_FAST", "0") == "1"
        # Quieter output: no weight-loading bars, no text-bar warning from tqdm (ipywidgets missing), no note
        # from bitsandbytes about an optional CPU kernel, no deprecation notices from the libraries.
        transformers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*IProgress.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    """,
            "",
            body,
        ),
    )


def hub_switch(body: str, note: str) -> list[tuple[str, str]]:
    """The clearly marked switch to a real hub model (off by default: the built-in path runs everywhere)."""
    return [
        (
            "markdown",
            _join(
                """
        ### Switch: a real model from the hub (off by default)

        Everything below runs on the lab's built-in task and tiny model, on any CPU, offline. Set
        `USE_HUB = True` on a GPU runtime with network access (Colab: *Runtime → Change runtime type → GPU*)
        to run the same cells on a real model and dataset instead.
        """,
                "",
                note,
            ),
        ),
        (
            "code",
            _join(
                """
        USE_HUB = False  # ← the switch
        """,
                body,
            ),
        ),
    ]


LIVE = code("""
    # Live charts: plain plotly figures redrawn in place through a display handle (no widgets needed).
    from IPython.display import display
    from plotly.subplots import make_subplots
    from tqdm.auto import tqdm


    class LiveChart:
        \"\"\"One line chart per metric name; `update(metrics)` appends a step and redraws.\"\"\"

        def __init__(self, keys, title="", per_row=3):
            self.keys = list(keys)
            rows = -(-len(self.keys) // per_row)
            self.fig = make_subplots(rows=rows, cols=min(per_row, len(self.keys)), subplot_titles=self.keys)
            for i, key in enumerate(self.keys):
                self.fig.add_scatter(x=[], y=[], mode="lines+markers", name=key,
                                     row=i // per_row + 1, col=i % per_row + 1)
            self.fig.update_layout(height=260 * rows + 60, showlegend=False, title=title, margin=dict(t=80, b=40))
            # A Figure's own display hook ignores display_id, so the figure goes out as a mime bundle.
            self.handle = display(self.fig._repr_mimebundle_(), raw=True, display_id=True)

        def update(self, metrics):
            for trace, key in zip(self.fig.data, self.keys):
                if metrics.get(key) is not None:
                    trace.x = (*trace.x, metrics["step"])
                    trace.y = (*trace.y, metrics[key])
            self.handle.update(self.fig._repr_mimebundle_(), raw=True)
""")


# ----------------------------------------------------------------------------------------------------------------------
# 01 — the tour


@notebook("01_tour")
def tour():
    title = "01 · A tour of the lab"
    cells = [
        title_cell(
            "01_tour",
            title,
            """
        The lab comes with its own small world, so every idea in the later notebooks can be run on a laptop CPU in
        seconds and checked exactly. This notebook walks through it:

        1. the three built-in **tasks** (`arith`, `reviews`, `bandit`) and their tiny **base models**;
        2. **sampling** completions and the tensors a rollout is made of;
        3. **log-probabilities** of completions, the quantity every method pushes around;
        4. three ways to **estimate the KL divergence** from samples (k1, k2, k3);
        5. the **KL-regularized objective** and its closed-form optimum π*, which the `bandit` task lets us
           compute exactly.
        """,
        ),
        INSTALL,
        params_cell("""
            N_EVAL = 32 if LAB_FAST else 200        # held-out arith prompts to score
            KL_SAMPLES = 1_000 if LAB_FAST else 20_000  # samples per KL estimate
        """),
        code("""
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

            torch.manual_seed(0)
            pd.set_option("display.max_colwidth", 80)
        """),
        *hub_switch(
            """
            HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
            HUB_MODE = "qlora"  # 4-bit base weights (bitsandbytes needs a CUDA GPU); use "lora" on a CPU
        """,
            """
        In this notebook the switch adds one cell at the end of §2 that samples from the hub model through its
        chat template. Estimate, not measured here: the 0.5B model in 4-bit takes well under 2 GB of GPU memory;
        the download is about 1 GB.
        """,
        ),
        md("""
        ## 1. Three tasks, three tiny models

        | task | kind | prompt → completion | reward |
        |---|---|---|---|
        | `arith` | verifiable | `47+38=` → `85` | 1 for the exact sum, else 0 |
        | `reviews` | graded | `review of the pasta :` → `the pasta was great .` | sentiment minus penalties for repeats, length and a missing end |
        | `bandit` | bandit | `pick a colour :` → `red` | a fixed table; one token, so everything is exact |

        A task knows its prompts (fixed train and held-out splits), its true ("gold") reward, and data for SFT and
        for preference learning. Its base model is a small Llama pretrained with `python -m lab pretrain TASK`
        and shipped in Hugging Face format, so it loads exactly like a hub model.
        """),
        code("""
            pd.DataFrame([{
                "task": t.name, "kind": t.kind, "model": t.model, "max_new_tokens": t.max_new_tokens,
                "train prompts": len(t.train_prompts()), "held-out prompts": len(t.eval_prompts()),
                "example prompt": t.eval_prompts()[0], "description": t.description,
            } for t in TASKS.values()])
        """),
        md("""
        The gold reward scores decoded text. On `arith` it is exact match; on `reviews` it has failure modes on
        purpose (repeating a word, rambling past 12 words and not ending with "." all cost more than any word
        earns), which is what a learned reward model can miss and a policy can then exploit.
        """),
        code("""
            arith, reviews = get_task("arith"), get_task("reviews")
            checks = [
                ("arith", "47+38=", "85", False), ("arith", "47+38=", "75", False),
                ("reviews", "review of the pasta :", "the pasta was great .", False),
                ("reviews", "review of the pasta :", "the pasta was great great great .", False),
                ("reviews", "review of the pasta :", "the pasta was great", False),
                ("reviews", "review of the pasta :", "the pasta was great and", True),
            ]
            pd.DataFrame([{"task": name, "prompt": p, "completion": c, "truncated": t,
                           "gold reward": get_task(name).gold_reward(p, c, t)} for name, p, c, t in checks])
        """),
        md("""
        `arith`'s base model learned addition from data that drops the carry 60% of the time (`47+38=` → `75`).
        Greedy decoding therefore gets carry problems wrong, while sampling still finds the right answer some of
        the time (§2 measures how often): a reward that checks the answer has something to reinforce.

        ## 2. Sampling

        `lab.sampling.generate` is the sampler every online method uses. It left-pads the prompts (so every row's
        next token is read from the last column), runs one prefill pass and then decodes token by token with a KV
        cache. It returns a `Rollout`:

            [pad pad 4 7 + 3 8 = | 8 5 <eos> <pad>]
             prompt_ids (B, P)     completion_ids (B, T)

        and `completion_mask` is 1 up to **and including** the first end-of-sequence token, because ending is an
        action the policy takes too.
        """),
        code("""
            policy = load_policy(task="arith", mode="lora")  # the built-in model, with LoRA adapters (still zero)
            model, tok = policy.model, policy.tokenizer
            print(policy.num_parameters())

            prompts = ["47+38=", "12+34=", "99+99=", "58+27="]
            g = torch.Generator().manual_seed(0)
            roll = generate(model, tok, prompts, max_new_tokens=arith.max_new_tokens, temperature=1.0, generator=g)
            pd.DataFrame({
                "prompt": roll.prompts, "completion": roll.completions, "truncated": roll.truncated.tolist(),
                "prompt tokens": [tok.convert_ids_to_tokens(r) for r in roll.prompt_ids.tolist()],
                "completion tokens": [tok.convert_ids_to_tokens(r) for r in roll.completion_ids.tolist()],
                "completion_mask": roll.completion_mask.tolist(),
                "gold reward": arith.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist()),
            })
        """),
        md("""
        Greedy decoding and sampling see the same model but answer differently. On the held-out problems, split
        by whether the ones digits carry (`lab.evaluate.answer` generates and scores with the gold reward):
        """),
        code("""
            heldout = arith.eval_prompts()[:N_EVAL]
            rows = []
            for kind in ("carry", "no carry"):
                subset = [p for p in heldout if has_carry(*parse_prompt(p)) == (kind == "carry")]
                for decoding, greedy in (("greedy", True), ("sample, T=1", False)):
                    scored = answer(model, tok, arith, subset * (1 if greedy else 4), greedy=greedy)
                    rows.append({"problems": kind, "decoding": decoding, "n": len(scored.rewards),
                                 "accuracy": sum(scored.rewards) / len(scored.rewards)})
            pd.DataFrame(rows)
        """),
        code("""
            if USE_HUB:  # the same sampler on a real chat model: the prompt goes through its chat template
                hub = load_policy(HUB_MODEL, mode=HUB_MODE)
                chat = [[{"role": "user", "content": "What is 47+38? Reply with the number only."}]]
                hub_roll = generate(hub.model, hub.tokenizer, [format_prompt(hub.tokenizer, m) for m in chat],
                                    max_new_tokens=16, greedy=True)
                print(hub_roll.completions)
        """),
        md(r"""
        ## 3. Log-probabilities

        A language model gives logits $z_t \in \mathbb{R}^V$ at every position. The log-probability of the token
        $y_t$ that was actually written is

        $$\log \pi(y_t \mid x, y_{<t}) = z_t[y_t] - \log \sum_v e^{z_t[v]},$$

        and a completion's log-probability is the sum over its tokens,
        $\log \pi(y\mid x) = \sum_t \log \pi(y_t \mid x, y_{<t})$.
        `lab.ops.selective_logprobs` computes the first line without ever building the full (B, T, V) table of
        log-softmax values. A toy row, by hand: logits (2, 1, 0), token 0.
        """),
        code("""
            logits = torch.tensor([[[2.0, 1.0, 0.0]]])  # (B=1, T=1, V=3)
            ids = torch.tensor([[0]])                     # (B, T)
            by_hand = 2.0 - math.log(math.exp(2) + math.exp(1) + math.exp(0))  # 2 − log(7.389 + 2.718 + 1) = 2 − 2.4076
            print(f"lab: {ops.selective_logprobs(logits, ids).item():.4f}   by hand: {by_hand:.4f}")
        """),
        md("""
        On the real model: the per-token log-probs of the rollout above (`lab.ops.sequence_logprobs` runs one
        forward pass over prompt + completion and keeps the T positions that predict the completion). Masked
        positions (after the end token) are not part of the completion.
        """),
        code("""
            T = roll.completion_ids.shape[1]
            with torch.no_grad():
                logprobs = ops.sequence_logprobs(model, roll.input_ids, roll.attention_mask, T)  # (B, T)
            mask = roll.completion_mask  # (B, T)
            pd.DataFrame({
                "prompt": roll.prompts, "completion": roll.completions,
                "token log-probs": [[round(v, 3) for v in row] for row in (logprobs * mask).tolist()],
                "log π(y|x)": ops.masked_sum(logprobs, mask, dim=-1).tolist(),
                "π(y|x)": ops.masked_sum(logprobs, mask, dim=-1).exp().tolist(),
            })
        """),
        md("""
        Any completion can be scored, not only sampled ones. `lab.batching` does this for offline data (SFT, DPO,
        reward models). The base model's carry habit shows up directly: for `47+38=` it puts more probability on
        the dropped-carry answer `75` than on the right one.
        """),
        code("""
            answers = ["85", "75", "84", "815"]
            batch = encode_pairs(tok, ["47+38="] * len(answers), answers)  # completion + eos
            with torch.no_grad():
                seq_logprob, n_tokens = sequence_logprob(model, batch)
            pd.DataFrame({"completion": answers, "tokens (with eos)": n_tokens.tolist(),
                          "log π(y|x)": seq_logprob.tolist(), "π(y|x)": seq_logprob.exp().tolist()})
        """),
        md(r"""
        ## 4. Estimating KL from samples: k1, k2, k3

        Every RL method here keeps the policy close to a reference policy by the KL divergence
        $\mathrm{KL}(\pi\,\|\,\pi_\text{ref}) = \mathbb{E}_{y\sim\pi}[\log \pi(y) - \log \pi_\text{ref}(y)]$.
        With sequences we can't sum over all y, so it is estimated from the sampled tokens. With
        $\log r = \log \pi_\text{ref}(y) - \log \pi(y)$ (Schulman, *Approximating KL divergence*, 2020):

        | estimator | formula | unbiased? | sign |
        |---|---|---|---|
        | k1 | $-\log r$ | yes | can be negative |
        | k2 | $\tfrac12 (\log r)^2$ | no | ≥ 0 |
        | k3 | $(r - 1) - \log r$ | yes | ≥ 0 |

        By hand, for a token with π = 0.5 and π_ref = 0.25 (log r = log ½ = −0.6931):
        k1 = 0.6931, k2 = ½ · 0.6931² = 0.2402, k3 = (0.5 − 1) + 0.6931 = 0.1931.
        And for a token with π = 0.25, π_ref = 0.5 (log r = +0.6931): k1 = −0.6931, k2 = 0.2402,
        k3 = (2 − 1) − 0.6931 = 0.3069.
        """),
        code("""
            logprobs_toy = torch.log(torch.tensor([0.5, 0.25]))
            ref_logprobs_toy = torch.log(torch.tensor([0.25, 0.5]))
            pd.DataFrame({name: ops.kl_estimate(name, logprobs_toy, ref_logprobs_toy).tolist()
                          for name in ("k1", "k2", "k3")}, index=["π=0.5, π_ref=0.25", "π=0.25, π_ref=0.5"])
        """),
        md(r"""
        The `bandit` task has one-token answers, so the exact KL is a sum over the vocabulary and we can see how
        good each estimator is. Take π_ref = the built-in bandit model and, as the policy π, the optimum π* of the
        next section at two strengths (β = 1: close to π_ref; β = 0.2: far from it). Draw `KL_SAMPLES` tokens
        from π and average each estimator, many times over:
        """),
        code("""
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
                    rows.append({"β": beta, "estimator": name, "exact KL": exact, "mean estimate": means.mean().item(),
                                 "std of one estimate": means.std().item(), "std per token": values.std().item(),
                                 "min per token": values.min().item()})
                    per_sample += [{"β": beta, "estimator": name, "value": v} for v in values[0, :500].tolist()]
            pd.DataFrame(rows)
        """),
        code("""
            px.box(pd.DataFrame(per_sample), x="estimator", y="value", color="estimator", facet_col="β",
                   title="per-token values of the three KL estimators (500 tokens from π)").show()
        """),
        md("""
        Read the table: k1 and k3 average to the exact KL, k2 does not (it is biased, most visibly when π is far
        from π_ref). k1 has tokens with negative values, so a few samples can show a negative "KL"; k3 never does
        and, when π is close to π_ref (β = 1), its per-token spread is far smaller than k1's; far from π_ref
        (β = 0.2) that advantage can reverse. Close to π_ref is where a KL-regularized run spends its time, which is
        why GRPO puts k3 in its loss; PPO-RLHF puts k1 into the per-token reward, where its sum over a completion
        is exactly the log-ratio of the whole sequence.

        ## 5. The KL-regularized objective and its optimum

        All the methods in the later notebooks aim at the same target:

        $$\\max_\\pi\\; \\mathbb{E}_{y\\sim\\pi(\\cdot\\mid x)}\\big[r(x,y)\\big] \\;-\\; \\beta\\,\\mathrm{KL}\\big(\\pi(\\cdot\\mid x)\\,\\|\\,\\pi_\\text{ref}(\\cdot\\mid x)\\big).$$

        Writing the expectation as a sum over y, adding a Lagrange multiplier for $\\sum_y \\pi(y\\mid x) = 1$ and
        setting the derivative to zero gives a closed form:

        $$\\pi^*(y\\mid x) = \\frac{1}{Z(x)}\\,\\pi_\\text{ref}(y\\mid x)\\,e^{r(x,y)/\\beta},\\qquad
          Z(x) = \\sum_y \\pi_\\text{ref}(y\\mid x)\\,e^{r(x,y)/\\beta}.$$

        The reference is re-weighted by the exponentiated reward: β large keeps π_ref, β small moves all mass to
        the best answer. For most tasks Z(x) is a sum over every possible text and can't be computed; for
        `bandit` it is a sum over one token, so `lab.tasks.bandit.pi_star` computes π* exactly.

        By hand for `pick a colour :` with the pretraining probabilities (red .10, green .25, yellow .20,
        blue .45) and rewards (1, .5, .25, 0) at β = 1: the weights π_ref·e^r are .10·2.718 = .2718,
        .25·1.649 = .4122, .20·1.284 = .2568, .45·1 = .45; Z = 1.3908, so π* = (.195, .296, .185, .324).
        """),
        code("""
            prompt = "pick a colour :"
            answers = list(bandit.REWARDS[prompt])
            ref_probs = torch.tensor([bandit.REF_PROBS[prompt][a] for a in answers])
            r = torch.tensor([bandit.REWARDS[prompt][a] for a in answers])
            star = bandit.pi_star(ref_probs.log(), r, beta=1.0).exp()
            print("lab:    ", [round(p, 3) for p in star.tolist()])
            print("by hand:", [0.195, 0.296, 0.185, 0.324])
        """),
        md("""
        The same on the built-in model's own π_ref (which puts a little mass outside the four answers too), for a
        few β:
        """),
        code("""
            ids = btok.convert_tokens_to_ids(answers)
            bars = [go.Bar(name="π_ref", x=answers, y=ref_logprobs[0, ids].exp().tolist())]
            for beta in (3.0, 1.0, 0.3, 0.1):
                star = bandit.pi_star(ref_logprobs[0], rewards[0], beta).exp()
                bars.append(go.Bar(name=f"π*, β={beta}", x=answers, y=star[ids].tolist()))
            fig = go.Figure(bars)
            fig.update_layout(barmode="group", title=f"{prompt!r}: rewards {bandit.REWARDS[prompt]}",
                              yaxis_title="probability", height=380)
            fig.show()
        """),
        md("""
        π* really is the best trade-off: its objective beats both π_ref (no reward gained) and the greedy policy
        that always picks the best answer (reward gained, but at a large KL cost), at every β.
        """),
        code("""
            best = torch.full_like(ref_logprobs, -math.inf).scatter(-1, rewards.argmax(-1, keepdim=True), 0.0)
            rows = []
            for beta in (3.0, 1.0, 0.3, 0.1):
                candidates = {"π_ref": ref_logprobs, "greedy on r": best,
                              "π*": bandit.pi_star(ref_logprobs, rewards, beta)}
                # J(π) = E_π[r] − β·KL(π‖π_ref), averaged over the 6 prompts
                rows.append({"β": beta, **{f"J({name})": (bandit.expected_reward(lp, rewards)
                                                          - beta * bandit.kl(lp, ref_logprobs)).mean().item()
                                           for name, lp in candidates.items()}})
            pd.DataFrame(rows)
        """),
        md("""
        Sweeping β traces the **reward–KL frontier**: the highest expected reward any policy can reach at a given
        KL from π_ref. `06_compare` puts every method's trained policy on this chart.
        """),
        code("""
            frontier = []
            for beta in torch.logspace(-2, 1, 25).tolist():
                star = bandit.pi_star(ref_logprobs, rewards, beta)  # (B, V)
                frontier.append({"β": beta, "KL(π*‖π_ref)": bandit.kl(star, ref_logprobs).mean().item(),
                                 "E[r] under π*": bandit.expected_reward(star, rewards).mean().item()})
            frontier = pd.DataFrame(frontier)
            fig = px.line(frontier, x="KL(π*‖π_ref)", y="E[r] under π*", hover_data=["β"], markers=True,
                          title="bandit: the reward–KL frontier traced by π* as β goes from 10 to 0.01")
            fig.add_scatter(x=[0.0], y=[bandit.expected_reward(ref_logprobs, rewards).mean().item()],
                            mode="markers", marker=dict(size=12), name="π_ref")
            fig.show()
        """),
        md("""
        ## Try this

        * **Temperature.** Score samples at a lower temperature with `lab.evaluate.answer`:
          `answer(model, tok, arith, arith.eval_prompts(), greedy=False, temperature=0.5)`. On carry problems the
          right answer is the minority, so a colder sampler picks it less often and accuracy moves towards the
          greedy number.
        * **β.** In the bar chart, try β = 0.03: π* is almost one-hot on the best answer. In the KL table, try
          β = 0.05: k1's negative values and k2's bias both grow as π moves away from π_ref.
        """),
    ]
    return title, cells


# ----------------------------------------------------------------------------------------------------------------------
# 02 — the reward model


@notebook("02_reward_model")
def reward_model():
    title = "02 · A reward model from pairwise preferences"
    cells = [
        title_cell(
            "02_reward_model",
            title,
            """
        Nobody can say how good a review is on an absolute scale, but anyone can say which of two reviews they
        prefer. A reward model turns such comparisons into a score r_φ(x, y) that an RL method can then
        maximize. This notebook fits one to the `reviews` task's preference pairs, checks it against the task's
        true (gold) reward, looks for where it is wrong, and uses it without any RL at all: best-of-N sampling.
        """,
        ),
        INSTALL,
        params_cell("""
            STEPS = 5 if LAB_FAST else 150         # optimizer steps
            BATCH_SIZE = 16 if LAB_FAST else 64    # preference pairs per step
            EVAL_PAIRS = 64 if LAB_FAST else 500   # held-out pairs for eval/accuracy and eval/spearman
            N = 4 if LAB_FAST else 8               # best-of-N: samples per prompt
        """),
        *hub_switch(
            """
            HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
            HUB_POLICY_MODE = "qlora"  # the policy that samples for best-of-N (§6), in 4-bit
            HUB_SETTINGS = dict(  # a starting point, not a tuned recipe
                task="hf:trl-lib/ultrafeedback_binarized",  # {chosen, rejected} conversations, prompt inside
                reward_model=HUB_MODEL, mode="lora", lr=5e-5, max_length=1024,
                batch_size=8, steps=500, eval_every=100, eval_pairs=500,
            )
        """,
            """
        With the switch on, the reward model is Qwen2.5-0.5B-Instruct with a LoRA adapter and a scalar head,
        trained on UltraFeedback pairs (about 62k; a seeded 10% is held out). Not run here (the machines this lab
        is tested on have no network and no GPU), so only estimates: the 0.5B model in bf16 is about 1 GB of
        weights; with 8 pairs of up to 1,024 tokens per step, plan for a GPU with 16 GB (e.g. a Colab T4).
        The UltraFeedback rows carry no gold reward, so the cells that compare with it are skipped.
        """,
        ),
        code("""
            import pandas as pd
            import plotly.express as px
            import torch

            from lab.baselines import best_of_n, kl_bound
            from lab.dpo import load_preference_rows
            from lab.modeling import load_policy
            from lab.rm import (RewardConfig, RewardScorer, bayes_accuracy, evaluate_reward_model,
                                load_reward_backbone, reward_loss, train)
            from lab.sampling import format_prompt
            from lab.tasks import TASKS

            pd.set_option("display.max_colwidth", 70)
        """),
        LIVE,
        md(r"""
        ## 1. The idea: Bradley–Terry

        Assume every completion y of a prompt x has a hidden scalar quality r(x, y), and that a person comparing
        two completions prefers the better one only *probably*, with a logistic coin:

        $$P(y_w \succ y_l \mid x) = \sigma\big(r(x, y_w) - r(x, y_l)\big), \qquad \sigma(z) = \frac{1}{1 + e^{-z}}.$$

        The reward model r_φ is the maximum-likelihood fit of this model to pairs (x, y_w, y_l) of a winner and a
        loser: logistic regression on the difference of two scores,

        $$L_\text{RM}(\phi) = -\,\mathbb{E}_{(x, y_w, y_l)}\Big[\log \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big)\Big].$$

        Only differences enter, so adding a constant to every score of a prompt changes nothing: r_φ is defined
        up to a per-prompt shift. An optional centering term η·(r_w + r_l)² pins the scores near 0.

        In the lab, r_φ is the base language model's trunk with its own LoRA adapter and a linear head read at
        the last token (`lab.modeling.ScalarModel`); the loss is `lab.rm.reward_loss`.

        ## 2. The loss on toy numbers

        Two pairs with scores (r_w, r_l) = (1, 0) and (0, 2): the first is ranked right by a margin of 1, the
        second wrong by 2.

        * pair 1: −log σ(1) = log(1 + e^{−1}) = log 1.3679 = 0.3133
        * pair 2: −log σ(−2) = log(1 + e^{2}) = log 8.3891 = 2.1269
        * mean: (0.3133 + 2.1269) / 2 = 1.2201; accuracy ½; mean margin (1 − 2)/2 = −0.5
        * with η = 0.01: + 0.01 · ((1 + 0)² + (0 + 2)²)/2 = 0.025 → 1.2451
        """),
        code("""
            chosen_rewards, rejected_rewards = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
            loss, metrics = reward_loss(chosen_rewards, rejected_rewards)
            print(f"loss {loss.item():.4f} (by hand 1.2201)   accuracy {metrics['rm/accuracy'].item():.2f}   "
                  f"margin {metrics['rm/margin'].item():+.2f}")
            loss, _ = reward_loss(chosen_rewards, rejected_rewards, center_weight=0.01)
            print(f"with centering η=0.01: {loss.item():.4f} (by hand 1.2451)")
            loss, _ = reward_loss(chosen_rewards + 5, rejected_rewards + 5)
            print(f"every score shifted by +5: {loss.item():.4f} (unchanged: only differences count)")
        """),
        md("""
        ## 3. The data

        The `reviews` pairs are two samples of the base model for the same prompt, labelled by the Bradley–Terry
        coin with the gold reward. Because the labels are noisy, even the gold reward disagrees with some of
        them: its agreement on the held-out pairs (`bayes_accuracy`) is the ceiling for any reward model.
        """),
        code("""
            settings = dict(task="reviews", steps=STEPS, batch_size=BATCH_SIZE, eval_every=max(STEPS // 5, 1),
                            eval_pairs=EVAL_PAIRS)
            if USE_HUB:
                settings.update(HUB_SETTINGS)
            cfg = RewardConfig(**settings)
            task = TASKS.get(cfg.task)  # None for a hub dataset
            if task is not None:
                eval_rows = load_preference_rows(cfg, "eval")[:EVAL_PAIRS]
                print(f"held-out pairs: {len(eval_rows)}; the gold reward agrees with {bayes_accuracy(eval_rows):.1%} "
                      "of their labels")
                display(pd.DataFrame(eval_rows[:6]))
        """),
        md("""
        ## 4. Train it

        `lab.rm.train` is a generator: each `next()` takes one optimizer step and yields its metrics, so the
        charts below are redrawn after every step. `eval/*` appear every `eval_every` steps, on held-out pairs.
        """),
        code("""
            model = load_reward_backbone(cfg, task)
            if task is not None:
                print("before training:", evaluate_reward_model(model, model.tokenizer, eval_rows))

            chart = LiveChart(["loss/rm", "rm/accuracy", "eval/accuracy", "eval/spearman"], title="reward model")
            history = []
            for m in tqdm(train(cfg, policy=model), total=cfg.steps):
                history.append(m)
                chart.update(m)
            print({k: round(v, 3) for k, v in history[-1].items() if k.startswith("eval/")})
        """),
        md("""
        ## 5. Plots: does r_φ agree with the gold reward?

        Each point is one held-out completion: its gold reward against the reward model's score. A good reward
        model ranks them the same way (Spearman near 1); the scale and offset don't matter.
        """),
        code("""
            scorer = RewardScorer(model, model.tokenizer)
            if task is not None:
                seen, points = set(), []
                for row in eval_rows:
                    for side in ("chosen", "rejected"):
                        key = (row["prompt"], row[side], bool(row.get(f"{side}_truncated", False)))
                        if key not in seen:
                            seen.add(key)
                            points.append({"prompt": key[0], "completion": key[1], "truncated": key[2],
                                           "gold": row[f"{side}_gold"]})
                points = pd.DataFrame(points)
                points["r_φ"] = scorer(list(points.prompt), list(points.completion), list(points.truncated)).tolist()
                px.scatter(points, x="gold", y="r_φ", hover_data=["completion"], opacity=0.6,
                           title=f"held-out completions: Spearman {points[['gold', 'r_φ']].corr('spearman').iloc[0, 1]:.2f}"
                           ).show()
        """),
        md("""
        Where is it wrong? Besides sentiment, the gold reward punishes repeating a word, rambling past 12 words
        and a missing final ".": the part that is hardest to learn from pairs. Compare the two columns' orderings
        on a few hand-written reviews: a completion the reward model rates above its gold rank is exactly what a
        policy optimizing r_φ will learn to write (`03_ppo_rlhf`).
        """),
        code("""
            if task is not None:
                probe_prompt = "review of the pasta :"
                probes = [("the pasta was great .", False),
                          ("the pasta was great great great .", False),
                          ("the pasta was great and the pasta was great and fresh and tasty and good .", False),
                          ("the pasta was great", False),
                          ("the pasta was awful .", False)]
                texts, cut = [p for p, _ in probes], [t for _, t in probes]
                display(pd.DataFrame({"completion": texts,
                                      "gold": task.gold_rewards([probe_prompt] * len(texts), texts, cut),
                                      "r_φ": scorer([probe_prompt] * len(texts), texts, cut).tolist()}))
        """),
        md("""
        ## 6. Before and after: best-of-N

        A reward model is useful before any RL: sample N completions from the base policy and keep the one r_φ
        likes best (`lab.baselines.best_of_n`). "Before" is what one sample gets on average; "after" is the pick.
        Its KL from the base policy is at most log N − (N − 1)/N, whatever the task.
        """),
        code("""
            policy = load_policy(HUB_MODEL if USE_HUB else None, task=cfg.task if task is not None else None,
                                 mode=HUB_POLICY_MODE if USE_HUB else "lora")
            if task is not None:
                prompts, max_new_tokens = task.eval_prompts()[:8], task.max_new_tokens
            else:  # the first distinct prompts of the pairs, rendered with the chat template
                prompts = [format_prompt(policy.tokenizer, r["prompt"]) for r in load_preference_rows(cfg)]
                prompts, max_new_tokens = list(dict.fromkeys(prompts))[:4], 128
            rows = best_of_n(policy, scorer, prompts, N, max_new_tokens=max_new_tokens, task=task)
            table = pd.DataFrame(rows)
            print(f"KL(best-of-{N} ‖ π_ref) ≤ {kl_bound(N):.3f} nats")
            if task is not None:
                print(f"gold reward: one sample {table.mean_gold_reward.mean():+.2f}, best of {N} by r_φ "
                      f"{table.gold_reward.mean():+.2f}")
            table
        """),
        md("""
        ## Try this

        * **Fewer steps** (`STEPS = 20`): held-out accuracy stays near ½ at first; watch how far below
          `bayes_accuracy` it ends and how the Spearman correlation follows.
        * **Centering** (`settings["center_weight"] = 0.01`): the scores gather around 0 and nothing else
          changes, because the loss only sees differences.
        * **Bigger N** in best-of-N (`N = 32`): the pick's r_φ score keeps rising with N. Does its gold reward
          keep up? Where it doesn't, the extra samples are buying r_φ's blind spots: over-optimization without
          any RL.
        """),
    ]
    return title, cells


# ----------------------------------------------------------------------------------------------------------------------
# 03 — PPO-RLHF


@notebook("03_ppo_rlhf")
def ppo_rlhf():
    title = "03 · RLHF with PPO: reward − β·KL + λ·LM loss"
    cells = [
        title_cell(
            "03_ppo_rlhf",
            title,
            """
        The InstructGPT recipe: train a reward model on preferences, then make the policy maximize it with PPO
        while a KL penalty keeps it near the reference policy and a language-modelling term ("ptx") keeps it
        from forgetting how to write. On the `reviews` task we can also watch what the reward model cannot see:
        the task's gold reward, logged next to the learned one.
        """,
        ),
        INSTALL,
        params_cell("""
            RM_STEPS = 4 if LAB_FAST else 150      # reward-model steps (see 02_reward_model)
            STEPS = 2 if LAB_FAST else 40          # PPO iterations: one rollout batch + its PPO epochs each
            BATCH_SIZE = 8 if LAB_FAST else 32     # prompts per rollout batch
            PPO_EPOCHS = 1 if LAB_FAST else 4      # passes over each rollout batch
            BETA = 0.05                            # β: weight of the per-token KL penalty
            PTX_COEF = 0.5                         # λ: weight of the LM loss on the task's SFT rows
        """),
        *hub_switch(
            """
            HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
            HUB_REWARD_MODEL = "runs/rm-..."  # ← the run folder of 02_reward_model trained with its switch on
            HUB_SETTINGS = dict(  # a starting point, not a tuned recipe
                task="hf:trl-lib/ultrafeedback-prompt",  # prompts only, as chat messages
                model=HUB_MODEL, mode="qlora", reward=HUB_REWARD_MODEL,
                ptx_data="hf:trl-lib/Capybara",  # conversations; the last assistant turn is the target
                max_new_tokens=128, batch_size=8, num_minibatches=2, lr=1e-5, steps=100,
            )
        """,
            """
        With the switch on, the policy is Qwen2.5-0.5B-Instruct in 4-bit with LoRA adapters (a second adapter
        is the value function), the prompts are UltraFeedback's, the reward is the reward model you trained in
        `02_reward_model` with its switch on, and the ptx rows are Capybara conversations. Not run here (no
        network, no GPU on the machines this lab is tested on); estimates only: the policy, its value adapter
        and the reward model together hold about 1.5 GB of weights; plan for a 16 GB GPU. There is no gold
        reward for these prompts, so only r_φ is plotted.
        """,
        ),
        code("""
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

            pd.set_option("display.max_colwidth", 70)
        """),
        LIVE,
        md(r"""
        ## 1. The objective

        InstructGPT's objective has three terms:

        $$\max_\theta\;
          \mathbb{E}_{x\sim D,\; y\sim\pi_\theta(\cdot\mid x)}\Big[\, r_\phi(x, y) - \beta \log\frac{\pi_\theta(y\mid x)}{\pi_\text{ref}(y\mid x)} \Big]
          \;+\; \lambda\, \mathbb{E}_{(x, y)\sim D_\text{ptx}}\big[\log \pi_\theta(y\mid x)\big]$$

        * **r_φ**: the reward model's score. It is only an estimate of what people want, and a policy pushed hard
          enough finds its blind spots ("reward hacking").
        * **β · log π_θ/π_ref**: the KL penalty keeps the policy in the neighbourhood where r_φ was trained and is
          still trustworthy.
        * **λ · log-likelihood on pretraining or SFT text** (the *ptx* term): keeps the policy predicting ordinary
          text so it does not forget how to write while chasing the reward.

        **How PPO optimizes it.** Treat each generated token as an action. The reward is spread over the tokens:
        every token pays its own KL, and the last one also receives the score,

        $$r_t = -\beta\,\big(\log\pi_\text{old}(y_t\mid s_t) - \log\pi_\text{ref}(y_t\mid s_t)\big) + [t = T]\; r_\phi(x, y).$$

        A value function V(s_t) (a second LoRA adapter with a scalar head) predicts the reward still to come;
        generalized advantage estimation (GAE) turns rewards and values into advantages
        $A_t = \sum_l (\gamma\lambda_\text{GAE})^l\, \delta_{t+l}$ with $\delta_t = r_t + \gamma V_{t+1} - V_t$.
        Then PPO reuses each rollout for several gradient steps, and clips the probability ratio
        $\rho_t = \pi_\theta/\pi_\text{old}$ so that no step moves the policy far from the one that sampled:

        $$L_\text{policy} = -\,\mathbb{E}_t\big[\min(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\, A_t)\big],\qquad
          L = L_\text{policy} + c_v\, L_\text{value} + \lambda\, L_\text{ptx}.$$

        ## 2. Each piece on toy numbers

        **Shaped rewards.** One completion of 3 tokens, r_φ = 1, β = 0.1, log π_old = (−1, −2, −0.5) and
        log π_ref = (−1.5, −2, −1): the per-token KL (k1) is (0.5, 0, 0.5), so
        r = (−0.05, 0, −0.05 + 1) = (−0.05, 0, 0.95). Their sum, 0.9 = 1 − 0.1 · 1.0, is the score minus β times
        the completion's KL.
        """),
        code("""
            logprobs = torch.tensor([[-1.0, -2.0, -0.5]])     # (B=1, T=3)
            ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0]])  # (B, T)
            mask = torch.ones(1, 3)                            # (B, T)
            rewards = shaped_rewards(torch.tensor([1.0]), logprobs, ref_logprobs, mask, beta=0.1)
            print("per-token KL:", kl_k1(logprobs, ref_logprobs).tolist(), "  shaped rewards:", rewards.tolist())
        """),
        md("""
        **GAE** with values V = (0.5, 0.4, 0.9), γ = 1, λ_GAE = 0.95, going backwards:

        * t=2: δ = 0.95 + 0 − 0.9 = 0.05, A = 0.05
        * t=1: δ = 0 + 0.9 − 0.4 = 0.5, A = 0.5 + 0.95 · 0.05 = 0.5475
        * t=0: δ = −0.05 + 0.4 − 0.5 = −0.15, A = −0.15 + 0.95 · 0.5475 = 0.3701
        * returns (the value targets) R = A + V = (0.8701, 0.9475, 0.95)
        """),
        code("""
            values = torch.tensor([[0.5, 0.4, 0.9]])
            advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
            print("advantages:", [round(a, 4) for a in advantages[0].tolist()], "  returns:",
                  [round(r, 4) for r in returns[0].tolist()])
        """),
        md("""
        **The clipped policy loss.** Two tokens, both with advantage +1, sampled with probability 0.5 each; the
        policy now gives them 0.75 and 0.25 (ratios 1.5 and 0.5), ε = 0.2:

        * token 1: min(1.5 · 1, clip(1.5) · 1) = min(1.5, 1.2) = 1.2: clipped, so no gradient pushes it further
        * token 2: min(0.5 · 1, clip(0.5) · 1) = min(0.5, 0.8) = 0.5: not clipped (the policy moved the wrong
          way, so it gets the full gradient back)
        * loss = −(1.2 + 0.5)/2 = −0.85, and half the tokens are clipped.

        **The ptx term** is the SFT loss (`lab.sft.sft_loss`): for two target tokens of probability 0.5 and 0.25,
        −(log 0.5 + log 0.25)/2 = (0.6931 + 1.3863)/2 = 1.0397.
        """),
        code("""
            loss, metrics = ppo_policy_loss(torch.log(torch.tensor([[0.75, 0.25]])), torch.log(torch.tensor([[0.5, 0.5]])),
                                            torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), cliprange=0.2)
            print(f"policy loss {loss.item():+.4f} (by hand −0.85), clip/frac {metrics['clip/frac'].item():.2f}")
            value_loss, _ = ppo_value_loss(values, values, returns, mask, cliprange_value=0.2)
            print(f"value loss at V_old: {value_loss.item():.4f} = ½·mean((V − R)²) = "
                  f"{0.5 * ((values - returns) ** 2).mean().item():.4f}")
            ptx, _ = sft_loss(torch.log(torch.tensor([[0.5, 0.25]])), torch.ones(1, 2))
            print(f"ptx loss {ptx.item():.4f} (by hand 1.0397)")
        """),
        md("""
        ## 3. A short run

        First a reward model on the `reviews` pairs (as in `02_reward_model`, without the charts), saved as a run
        record; then PPO against it. The charts show `reward/mean` (r_φ, what PPO maximizes) next to
        `reward/gold` (the truth, which PPO never sees), the KL to π_ref and the ptx loss.
        """),
        code("""
            settings = dict(task="reviews", steps=STEPS, batch_size=BATCH_SIZE, ppo_epochs=PPO_EPOCHS, beta=BETA,
                            ptx_coef=PTX_COEF)
            if USE_HUB:
                settings.update(HUB_SETTINGS)
            else:
                rm_cfg = rm.RewardConfig(task="reviews", steps=RM_STEPS, eval_every=0, eval_pairs=64 if LAB_FAST else 500)
                rm_record = RunRecord.create(out=rm_cfg.out, config={"method": "rm", **rm_cfg.to_dict()}, prefix="rm")
                for m in tqdm(rm.train(rm_cfg, record=rm_record), total=rm_cfg.steps, desc="reward model"):
                    pass
                print(f"reward model {rm_record.path}: held-out accuracy {m['eval/accuracy']:.2f}")
                settings["reward"] = str(rm_record.path)
            cfg = PPOConfig(**settings)
            task = TASKS.get(cfg.task)
            policy = load_for(cfg, task)

            chart = LiveChart(["reward/mean", "reward/gold", "kl/ref", "loss/ptx", "value/explained_var"],
                              title="PPO-RLHF")
            history = []
            for m in tqdm(train(cfg, policy=policy), total=cfg.steps):
                history.append(m)
                chart.update(m)
        """),
        md("""
        ## 4. Plots

        Learned reward against gold reward over the run, and the reward each step bought per nat of KL.
        """),
        code("""
            df = pd.DataFrame(history)
            columns = [c for c in ("reward/mean", "reward/gold", "reward/shaped") if c in df]
            px.line(df, x="step", y=columns, markers=True, title="what PPO optimizes (reward/mean) and the truth").show()
            px.scatter(df, x="kl/ref", y=columns, title="reward against KL(π_θ‖π_ref) per completion").show()
        """),
        md("""
        ## 5. Before and after

        The same held-out prompts answered greedily by π_ref (adapters off) and by the tuned policy, with the
        gold reward and the reward model's score of each answer. Look for answers that r_φ scores above what
        their gold reward deserves: repeated words are this reward model's blind spot (`02_reward_model`, §5),
        so a policy that learns to repeat a word the reward model likes is optimizing r_φ, not the task.
        """),
        code("""
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
            table
        """),
        md("""
        ## Try this

        * **`BETA = 0.0`**: nothing holds the policy near π_ref. `reward/mean` (r_φ) climbs faster; watch whether
          `reward/gold` follows or falls behind as the policy finds what the reward model over-rates, and how
          far `kl/ref` runs.
        * **`PTX_COEF = 0.0`** against `PTX_COEF = 2.0`: the LM loss on the SFT rows (`loss/ptx`) rises without
          it; with a large λ the policy barely moves from its SFT behaviour.
        * **`settings["cliprange"] = 0.05`** with `PPO_EPOCHS = 8`: more reuse of each rollout, smaller steps;
          `clip/frac` tells how often the clip binds.
        """),
    ]
    return title, cells


# ----------------------------------------------------------------------------------------------------------------------
# 04 — DPO and its variants


@notebook("04_dpo")
def dpo():
    title = "04 · DPO: preferences without a reward model or sampling"
    cells = [
        title_cell(
            "04_dpo",
            title,
            """
        Direct Preference Optimization skips both the reward model and the RL loop. The KL-regularized objective
        has a closed-form optimum, and solving it for the reward shows that the policy itself defines a reward,
        β·log π_θ/π_ref. Fit that implicit reward to the preference pairs with the Bradley–Terry loss and you are
        training the policy directly, with two forward passes per pair and ordinary backpropagation. This
        notebook derives the loss, checks it and three variants by hand (length-normalized DPO, SimPO, IPO),
        trains on the `reviews` pairs, and measures exactly, on an enumerable task, the probability DPO leaves on
        answers that no pair holds.
        """,
        ),
        INSTALL,
        params_cell("""
            STEPS = 3 if LAB_FAST else 60          # optimizer steps
            BATCH_SIZE = 8 if LAB_FAST else 32     # preference pairs per step
            BETA = 0.1                             # β of the sigmoid (DPO) loss
            VARIANT_STEPS = 1 if LAB_FAST else 40  # steps for each variant in §6
            LEAK_STEPS = 3 if LAB_FAST else 60     # steps of the run in §7 (what DPO never sees)
        """),
        *hub_switch(
            """
            HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
            HUB_SETTINGS = dict(  # a starting point, not a tuned recipe
                task="hf:trl-lib/ultrafeedback_binarized",  # {chosen, rejected} conversations, prompt inside
                model=HUB_MODEL, mode="qlora", lr=5e-5, max_length=1024, max_new_tokens=128,
                batch_size=8, steps=300, eval_size=32, kl_samples=4,
            )
        """,
            """
        With the switch on, the policy is Qwen2.5-0.5B-Instruct in 4-bit with LoRA adapters, and the pairs are
        UltraFeedback's (about 62k). Not run here (no network, no GPU on the machines this lab is tested on);
        estimates only: about 0.5 GB of 4-bit weights plus activations for 16 sequences of up to 1,024 tokens
        per step; plan for a 16 GB GPU. The reference policy costs no memory: it is the same weights with the
        adapters switched off. There is no gold reward for these pairs, so the gold columns are skipped and
        §6 (variants on `reviews`) still runs on the built-in task.
        """,
        ),
        code("""
            import pandas as pd
            import plotly.express as px
            import torch

            from lab.dpo import (DPOConfig, dpo_loss, ipo_loss, length_normalized_dpo_loss, load_preference_rows,
                                 sample_heldout, sampled_kl, simpo_loss, train)
            from lab.evaluate import before_after, evaluate
            from lab.modeling import load_policy
            from lab.runner import load_for
            from lab.sampling import format_prompt, generate
            from lab.tasks import TASKS

            pd.set_option("display.max_colwidth", 70)
        """),
        LIVE,
        md(r"""
        ## 1. From the RLHF objective to a classification loss

        The KL-regularized objective (see `01_tour`, §5) has the optimum
        $\pi^*(y\mid x) = \pi_\text{ref}(y\mid x)\, e^{r(x,y)/\beta} / Z(x)$. Take the log and solve for the reward:

        $$r(x, y) = \beta \log\frac{\pi^*(y\mid x)}{\pi_\text{ref}(y\mid x)} + \beta \log Z(x).$$

        $Z(x)$ is a sum over every possible text and can't be computed, but it depends on the prompt only, so it
        cancels in a comparison of two answers to the same prompt. Put this reward into the Bradley–Terry model
        of the preferences and replace π* by the policy being trained:

        $$L_\text{DPO}(\theta) = -\,\mathbb{E}_{(x, y_w, y_l)}\Big[\log\sigma\Big(
            \underbrace{\beta\log\tfrac{\pi_\theta(y_w\mid x)}{\pi_\text{ref}(y_w\mid x)}}_{\hat r_w}
          - \underbrace{\beta\log\tfrac{\pi_\theta(y_l\mid x)}{\pi_\text{ref}(y_l\mid x)}}_{\hat r_l}\Big)\Big].$$

        The RL problem has become maximum likelihood on a fixed dataset. The gradient shows what it does:

        $$\nabla_\theta L = -\beta\,\sigma(\hat r_l - \hat r_w)\,\big[\nabla\log\pi_\theta(y_w\mid x) - \nabla\log\pi_\theta(y_l\mid x)\big]:$$

        raise the winner, lower the loser, weighted by how wrong the implicit reward model still is
        (σ(r̂_l − r̂_w) is near 1 when it prefers the loser, near 0 once it is confidently right).

        ## 2. The loss on toy numbers

        One pair with log π_θ(y_w) = −1, log π_θ(y_l) = −3 and log π_ref = −2 for both, β = 0.1:
        r̂_w = 0.1 · (−1 + 2) = 0.1, r̂_l = 0.1 · (−3 + 2) = −0.1, so
        L = −log σ(0.2) = log(1 + e^{−0.2}) = log 1.8187 = 0.5981.
        The gradient with respect to log π_θ(y_w) is −β σ(−0.2) = −0.1 · 0.4502 = −0.0450, and +0.0450 for the loser.
        At the start of training π_θ = π_ref, every r̂ is 0 and the loss is log 2 = 0.6931.
        """),
        code("""
            logprobs_chosen = torch.tensor([-1.0], requires_grad=True)
            logprobs_rejected = torch.tensor([-3.0], requires_grad=True)
            ref_logprobs_chosen, ref_logprobs_rejected = torch.tensor([-2.0]), torch.tensor([-2.0])
            loss, metrics = dpo_loss(logprobs_chosen, logprobs_rejected, ref_logprobs_chosen, ref_logprobs_rejected, beta=0.1)
            loss.backward()
            print(f"loss {loss.item():.4f} (by hand 0.5981)   r̂_w {metrics['rewards/chosen'].item():+.2f}   "
                  f"r̂_l {metrics['rewards/rejected'].item():+.2f}")
            print(f"dL/dlog π(y_w) {logprobs_chosen.grad.item():+.4f}   dL/dlog π(y_l) {logprobs_rejected.grad.item():+.4f}"
                  "   (by hand ∓0.0450)")
            same, _ = dpo_loss(ref_logprobs_chosen, ref_logprobs_rejected, ref_logprobs_chosen, ref_logprobs_rejected, beta=0.1)
            print(f"π_θ = π_ref: {same.item():.4f} = log 2")
        """),
        md(r"""
        **Variants** (each is its own function in `lab.dpo`). Same pair, with |y_w| = 2 and |y_l| = 4 tokens:

        | variant | idea | by hand |
        |---|---|---|
        | length-normalized DPO (Tulu 3), β = 5 | divide each log-ratio by its length, so a long answer can't win on many small per-token gains | r̂_w = 5·1/2 = 2.5, r̂_l = 5·(−1)/4 = −1.25; −log σ(3.75) = log(1 + e^{−3.75}) = 0.0232 |
        | SimPO, β = 2, γ = 0.5 | no reference at all: the reward is the policy's own per-token log-likelihood, and the winner must clear a margin γ | r̂_w = 2·(−1/2) = −1, r̂_l = 2·(−3/4) = −1.5; −log σ(0.5 − 0.5) = log 2 = 0.6931 |
        | IPO, β = 0.1 | regress the (per-token) log-ratio margin onto 1/(2β) instead of pushing it to infinity | h = 1/2 − (−1)/4 = 0.75; (0.75 − 5)² = 18.0625 |
        """),
        code("""
            chosen_lengths, rejected_lengths = torch.tensor([2.0]), torch.tensor([4.0])
            lp_w, lp_l = torch.tensor([-1.0]), torch.tensor([-3.0])
            rows = [
                ("length-normalized DPO, β=5", length_normalized_dpo_loss(
                    lp_w, lp_l, ref_logprobs_chosen, ref_logprobs_rejected, chosen_lengths, rejected_lengths, beta=5.0)[0], 0.0232),
                ("SimPO, β=2, γ=0.5", simpo_loss(lp_w / chosen_lengths, lp_l / rejected_lengths, beta=2.0, gamma=0.5)[0], 0.6931),
                ("IPO, β=0.1", ipo_loss(lp_w, lp_l, ref_logprobs_chosen, ref_logprobs_rejected, chosen_lengths,
                                        rejected_lengths, beta=0.1)[0], 18.0625),
            ]
            pd.DataFrame([{"variant": name, "lab": round(value.item(), 4), "by hand": hand} for name, value, hand in rows])
        """),
        md("""
        ## 3. A short run on the `reviews` pairs

        The metrics are the implicit reward model's: `rewards/accuracy` is how often r̂_w > r̂_l on the batch,
        `rewards/margin` the mean r̂_w − r̂_l. `logprobs/chosen` and `logprobs/rejected` are the policy's
        log-likelihoods of the two answers; it is common for *both* to fall while the margin grows. `kl/ref` is
        estimated every step from a few fresh samples of π_θ (before that step's update), and on the held-out
        prompts at the end, together with `eval/gold_reward`.
        """),
        code("""
            settings = dict(task="reviews", steps=STEPS, batch_size=BATCH_SIZE, beta=BETA)
            if USE_HUB:
                settings.update(HUB_SETTINGS)
            cfg = DPOConfig(**settings)
            task = TASKS.get(cfg.task)
            policy = load_for(cfg, task)

            chart = LiveChart(["loss/dpo", "rewards/accuracy", "rewards/margin", "logprobs/chosen", "logprobs/rejected"],
                              title="DPO")
            history = []
            for m in tqdm(train(cfg, policy=policy), total=cfg.steps):
                history.append(m)
                chart.update(m)
            print({k: round(v, 3) for k, v in history[-1].items() if k.startswith(("eval/", "kl/"))})
        """),
        md("""
        ## 4. Plots
        """),
        code("""
            df = pd.DataFrame(history)
            px.line(df, x="step", y=["rewards/chosen", "rewards/rejected"], markers=True,
                    title="implicit rewards β·log π_θ/π_ref of the chosen and rejected answers").show()
        """),
        md("""
        ## 5. Before and after

        The same held-out prompts answered greedily by π_ref (adapters off) and the tuned policy, with the gold
        reward of each answer. Read the answers, not only the rewards: in our full runs (60 steps) the answers
        converged on one template for every prompt (e.g. "honestly the … was so wonderful ."), far from π_ref
        (a sampled `kl/ref` of 7 to 10 nats). The gold reward scores words, not variety or grammar, and nothing
        in DPO's loss asks for either.
        """),
        code("""
            if task is not None:
                table = pd.DataFrame(before_after(policy, task, n=8))
                print(f"mean gold reward: before {table.before_reward.mean():+.2f}, after {table.after_reward.mean():+.2f}")
            else:  # no gold reward for your own data: show the completions
                prompts = [format_prompt(policy.tokenizer, r["prompt"]) for r in load_preference_rows(cfg)[:4]]
                with policy.reference() as ref:
                    before = generate(ref, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
                after = generate(policy.model, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
                table = pd.DataFrame({"prompt": prompts, "before": before, "after": after})
            table
        """),
        md("""
        ## 6. The variants side by side

        Each variant trains a fresh copy of the built-in `reviews` model for `VARIANT_STEPS` steps with its own
        default β (0.1 for DPO and IPO, 5 for length-normalized DPO, 2 for SimPO: the β's mean different things).
        Then: greedy held-out gold reward, answer length, and the sampled KL to π_ref (SimPO has no reference, so
        its KL is measured afterwards, against the adapters-off model).
        """),
        code("""
            reviews = TASKS["reviews"]
            variants = []
            for loss_type in ("sigmoid", "length_normalized", "simpo", "ipo"):
                vcfg = DPOConfig(task="reviews", loss_type=loss_type, steps=VARIANT_STEPS, batch_size=BATCH_SIZE,
                                 sample_every=0)
                vpolicy = load_policy(task="reviews", mode="lora")
                for m in tqdm(train(vcfg, policy=vpolicy), total=vcfg.steps, desc=loss_type):
                    pass
                result = evaluate(vpolicy, reviews)
                roll = sample_heldout(vpolicy, reviews.eval_prompts(), max_new_tokens=reviews.max_new_tokens)
                variants.append({"loss_type": loss_type, "β": vcfg.beta, "gold reward (greedy)": result["gold_reward"],
                                 "words": result["length"], "kl/ref": sampled_kl(vpolicy, roll),
                                 "rewards/accuracy (last batch)": m["rewards/accuracy"]})
            pd.DataFrame(variants)
        """),
        md(r"""
        ## 7. What DPO never sees: the mass off the support

        The loss only compares log-ratios of answers that appear in some pair. Call those answers the support
        S(x). Nothing in the loss says how much probability the policy should keep on every other response, so
        that mass goes wherever the shared weights take it. On an enumerable task we can measure it exactly:

        * `eval/mass_off_support` = π_θ(y ∉ S(x)), the probability of a response that no training pair holds;
        * `eval/kl_to_optimum_support` = KL(π* ‖ π_θ) with both renormalized over S(x): does DPO match π* on
          the answers it saw?
        * `eval/kl_to_optimum` = KL(π* ‖ π_θ) over the whole vocabulary: does it match π* everywhere?

        To make the support visibly smaller than the response space, we declare a task of our own
        (`lab.tasks.EnumerableTask`): the `bandit` rewards and model, but pairs drawn so that each prompt's best
        answer is never in one. π* = π_ref·e^{r/β}/Z still wants that answer; DPO never hears of it.
        """),
        code("""
            from lab.tasks import EnumerableTask, register
            from lab.tasks.bandit import REF_PROBS, REWARDS
            from lab.tasks.enumerable import mass_off_support, next_token_logprobs, pair_support, pi_star, support_mask

            unseen = {p: max(table, key=table.get) for p, table in REWARDS.items()}  # each prompt's best answer
            pair_probs = {p: {a: 0.0 if a == unseen[p] else q for a, q in probs.items()} for p, probs in REF_PROBS.items()}
            leaky = register(EnumerableTask("bandit-unseen", REWARDS, ref_probs=pair_probs, model="bandit", pairs=2000),
                             replace=True)
            lcfg = DPOConfig(task="bandit-unseen", mode="full", beta=0.5, steps=LEAK_STEPS, batch_size=64,
                             eval_every=max(LEAK_STEPS // 6, 1), sample_every=0)
            lpolicy = load_for(lcfg, leaky)
            tok, prompts = lpolicy.tokenizer, leaky.eval_prompts()
            with torch.no_grad(), lpolicy.reference() as ref:
                ref_logprobs = next_token_logprobs(ref, tok, prompts)  # (B, V)
            star = pi_star(ref_logprobs, leaky.reward_tables(prompts, tok), lcfg.beta)  # (B, V)
            support = support_mask(prompts, pair_support(leaky.preference_rows("train")), tok)  # (B, V) bool
            print(f"mass off the support: π_ref {mass_off_support(ref_logprobs, support).mean():.3f}, "
                  f"π* {mass_off_support(star, support).mean():.3f}")

            leak = [m for m in tqdm(train(lcfg, policy=lpolicy), total=lcfg.steps) if "eval/kl_to_optimum" in m]
            leak_df = pd.DataFrame(leak)
            fig = px.line(leak_df, x="step", y=["eval/kl_to_optimum", "eval/kl_to_optimum_support", "eval/mass_off_support"],
                          markers=True, title="DPO on pairs that never hold the best answer (β = 0.5)")
            fig.add_hline(y=mass_off_support(star, support).mean().item(), line_dash="dot",
                          annotation_text="π*'s mass off the support")
            fig.show()
        """),
        md("""
        What our run printed (seed 0, 60 steps, full fine-tuning): on the support, KL(π*‖π_θ) fell from 0.136 to
        0.019, so DPO found π* among the answers it saw. Over the whole vocabulary it fell only from 0.278 to
        0.208: the mass off the support stayed where π_ref had it (0.120 → 0.118), while π* puts 0.355 there.
        A second seed gave the same picture (0.016 on the support, 0.201 overall). How much the unseen mass moves,
        and in which direction, is not set by the loss; it is a side effect of the shared weights, which is why
        it is worth logging. The bars show one prompt answer by answer.
        """),
        code("""
            prompt = prompts[0]
            with torch.no_grad():
                after = next_token_logprobs(lpolicy.model, tok, [prompt])[0]  # (V,)
            answers = list(REWARDS[prompt])
            ids = [tok.convert_tokens_to_ids(a) for a in answers]
            bars = []
            for label, logprobs in (("π_ref", ref_logprobs[0]), ("π*", star[0]), ("π_θ after DPO", after)):
                probs = logprobs.exp()
                bars += [{"policy": label, "response": a + (" (in no pair)" if a == unseen[prompt] else ""),
                          "probability": probs[i].item()} for a, i in zip(answers, ids)]
                bars.append({"policy": label, "response": "every other token", "probability": 1 - probs[ids].sum().item()})
            px.bar(pd.DataFrame(bars), x="response", y="probability", color="policy", barmode="group",
                   title=f"{prompt!r}: rewards {REWARDS[prompt]}").show()
        """),
        md("""
        ## Try this

        * **β** (`BETA = 0.5` or `0.02`): a larger β makes each nat of log-ratio worth more implicit reward, so the
          loss saturates after a smaller move away from π_ref; watch `kl/ref` and `rewards/margin`.
        * **`settings["label_smoothing"] = 0.2`** (conservative DPO): assumes a fifth of the labels are flipped;
          the margin stops growing instead of being pushed to infinity on pairs the model already gets right.
        * **More `VARIANT_STEPS`**: the length columns show whether a variant drifts towards longer or shorter
          answers; on `reviews` length beyond 12 words costs gold reward.
        """),
    ]
    return title, cells


# ----------------------------------------------------------------------------------------------------------------------
# 05 — GRPO


@notebook("05_grpo")
def grpo():
    title = "05 · GRPO: a group of samples is its own baseline"
    cells = [
        title_cell(
            "05_grpo",
            title,
            """
        GRPO keeps PPO's clipped update and drops its value network. For each prompt it samples a group of G
        answers, scores them, and uses each answer's z-score within its group as the advantage: better than its
        siblings → pushed up, worse → pushed down, all equal → nothing to learn. With a reward that can be
        checked (a verifier) it needs no reward model either. On `arith`, whose base model drops the carry when
        it answers greedily but sometimes samples the right sum, that is exactly enough.
        """,
        ),
        INSTALL,
        params_cell("""
            STEPS = 4 if LAB_FAST else 40          # rollouts (one optimizer step each by default)
            BATCH_SIZE = 4 if LAB_FAST else 8      # prompts per rollout
            GROUP_SIZE = 4 if LAB_FAST else 8      # G: completions per prompt
            EVAL_EVERY = 2 if LAB_FAST else 10     # greedy held-out accuracy every N steps
            EVAL_SIZE = 32 if LAB_FAST else 200    # held-out problems per evaluation
            LR = 1e-3                              # steadier on this task than the method's default 3e-3
            BANDIT_STEPS = 6 if LAB_FAST else 60   # §6: steps of each bandit run (the method's bandit default: 60)
        """),
        *hub_switch(
            """
            HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
            HUB_SETTINGS = dict(  # a starting point, not a tuned recipe
                task="jsonl:gsm8k_train.jsonl", reward="python:gsm8k_reward:correct",
                model=HUB_MODEL, mode="qlora", max_new_tokens=256, batch_size=4, group_size=8,
                microbatch_size=8, lr=1e-5, beta=0.04, steps=200, eval_every=0,
            )
            if USE_HUB:  # GSM8K as {prompt, answer} rows; the reward module below reads the answers back
                from datasets import load_dataset

                from lab.data import write_jsonl

                write_jsonl("gsm8k_train.jsonl", (
                    {"prompt": [{"role": "user", "content": row["question"] + "\\nReason step by step, then give the "
                                 "final answer as a number after '####'."}],
                     "answer": row["answer"].split("####")[-1].strip().replace(",", "")}
                    for row in load_dataset("openai/gsm8k", "main", split="train")))
        """,
            """
        With the switch on, GRPO trains Qwen2.5-0.5B-Instruct (4-bit, LoRA) on the GSM8K training questions with
        a Python reward function: 1 if the last number of the answer equals the reference, else 0
        (`gsm8k_reward.py`, written by the next cell and named in `reward="python:gsm8k_reward:correct"`). Not
        run here (no network, no GPU on the machines this lab is tested on); estimates only: 32 completions of
        up to 256 tokens per step, scored in microbatches of 8, fit a 16 GB GPU; generation dominates the time.
        """,
        ),
        code('''
            %%writefile gsm8k_reward.py
            """r(x, y) for GSM8K: 1.0 if the last number in the completion equals the reference answer, else 0.0."""
            import json
            import re

            ANSWERS = {}  # question (the user message) -> reference answer
            with open("gsm8k_train.jsonl") as f:
                for line in f:
                    row = json.loads(line)
                    ANSWERS[row["prompt"][0]["content"]] = row["answer"]
            _question_of = {}  # formatted prompt -> its question, found once


            def correct(prompts, completions):
                rewards = []
                for prompt, completion in zip(prompts, completions):
                    if prompt not in _question_of:
                        _question_of[prompt] = next((q for q in ANSWERS if q in prompt), None)
                    numbers = re.findall(r"-?\\d+(?:\\.\\d+)?", completion.replace(",", ""))
                    answer = ANSWERS.get(_question_of[prompt])
                    rewards.append(1.0 if numbers and answer is not None and float(numbers[-1]) == float(answer) else 0.0)
                return rewards
        '''),
        code("""
            import pandas as pd
            import plotly.express as px
            import torch

            from lab.evaluate import answer, before_after
            from lab.grpo import GRPOConfig, clipped_surrogate, group_advantages, grpo_loss, train
            from lab.ops import kl_k3
            from lab.rewards import make_reward
            from lab.rollout import load_prompt_rows
            from lab.runner import load_for
            from lab.sampling import format_prompt, generate
            from lab.tasks import TASKS
            from lab.tasks.arith import has_carry, parse_prompt

            pd.set_option("display.max_colwidth", 70)
        """),
        LIVE,
        md(r"""
        ## 1. The idea

        Sample G completions $y_1..y_G$ for a prompt from the current policy and score them. The advantage of
        each is its reward standardized *within its group*:

        $$\hat A_i = \frac{r_i - \mathrm{mean}(r_1..r_G)}{\mathrm{std}(r_1..r_G) + \epsilon}.$$

        No value network has to learn what a prompt is worth: the group's mean is the baseline, measured instead of
        predicted. Every token of $y_i$ gets the same $\hat A_i$. The update is PPO's clipped surrogate; DeepSeekMath
        adds a KL penalty to π_ref, estimated per token with k3 (unbiased and never negative, see `01_tour` §4):

        $$\ell_{it} = -\min\big(\rho_{it}\hat A_i,\ \mathrm{clip}(\rho_{it}, 1-\epsilon_\text{low}, 1+\epsilon_\text{high})\,\hat A_i\big) + \beta\, k_3\big(\pi_\theta, \pi_\text{ref}\big)_{it},
          \qquad \rho_{it} = \frac{\pi_\theta(y_{it}\mid\cdot)}{\pi_\text{old}(y_{it}\mid\cdot)}.$$

        That k3 term has the right value and the wrong gradient: §6 shows where it leads. The lab's default
        (`kl_mode="k1_reward"`) puts the KL in the reward instead, $r_i - \beta \log \pi_\text{old}(y_i)/\pi_\text{ref}(y_i)$,
        before the group advantage, as PPO does.

        How the per-token losses $\ell_{it}$ are averaged into one number is where GRPO's descendants differ:
        per sequence then over the group (DeepSeekMath), over all tokens (DAPO), or by a constant (Dr. GRPO).

        A group whose answers all got the same reward (all right or all wrong) has $\hat A = 0$ and teaches
        nothing. So GRPO learns most from prompts the model solves *sometimes*: a built-in curriculum,
        measured by `groups/zero_std_frac` below.

        ## 2. The pieces on toy numbers

        **Group advantages.** Two prompts, G = 4, rewards (1, 0, 0, 1) and (1, 1, 1, 1). First group: mean 0.5,
        std √((4 · 0.25)/3) = 0.5774, so Â = ±0.5/0.5774 = ±0.8660. Second group: all equal, Â = 0.
        """),
        code("""
            rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # (B·G,) groups side by side
            advantages = group_advantages(rewards, group_size=4)
            print([round(a, 4) for a in advantages.tolist()], "   mean per group:", advantages.view(2, 4).mean(-1).tolist())
        """),
        md("""
        **Clipping.** A token sampled with probability 0.5 that the policy now gives 0.75 (ratio 1.5), with
        Â = +1 and ε = 0.2: −min(1.5, 1.2) = −1.2, clipped high. A token whose ratio fell to 0.5 with Â = −1:
        −min(−0.5, −0.8) = 0.8, clipped low. **k3**: log π_θ = −1, log π_ref = −1.5, so log(π_ref/π_θ) = −0.5 and
        k3 = e^{−0.5} − 1 + 0.5 = 0.1065.
        """),
        code("""
            per_token, low, high = clipped_surrogate(torch.log(torch.tensor([[0.75], [0.25]])),
                                                     torch.log(torch.tensor([[0.5], [0.5]])),
                                                     torch.tensor([1.0, -1.0]), epsilon_low=0.2, epsilon_high=0.2)
            print("per-token loss", per_token.flatten().tolist(), " clipped low", low.flatten().tolist(),
                  " clipped high", high.flatten().tolist())
            print("k3:", round(kl_k3(torch.tensor(-1.0), torch.tensor(-1.5)).item(), 4))
        """),
        md(r"""
        **Averaging.** Two completions, one right answer of 1 token (Â = +1) and one wrong answer of 3 tokens
        (Â = −1), ratio 1, so ℓ = −Â on each token:

        * `sequence`: ½ · (−1/1 + 3/3) = 0; each wrong token weighs 1/6, the right one 1/2
        * `token`: (−1 + 3)/4 = 0.5; every token weighs 1/4
        * `constant` (T_max = 3): (−1 + 3)/(2 · 3) = 0.3333; every token weighs 1/6

        The weights are the gradients with respect to each token's log-prob, times −Â:
        """),
        code("""
            mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # (B, T): lengths 1 and 3
            rows = []
            for norm in ("sequence", "token", "constant"):
                logprobs = torch.full((2, 3), -0.7, requires_grad=True)
                loss, _ = grpo_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), mask, loss_norm=norm,
                                    max_new_tokens=3)
                loss.backward()
                rows.append({"loss_norm": norm, "loss": round(loss.item(), 4),
                             "weight of the right token": round(-logprobs.grad[0, 0].item(), 4),
                             "weight of each wrong token": round(logprobs.grad[1, 0].item(), 4)})
            pd.DataFrame(rows)
        """),
        md("""
        ## 3. A short run on `arith`

        The reward is the gold one: 1 for the exact sum. `reward/mean` is the sampled accuracy of each rollout,
        `eval/accuracy` the greedy accuracy on held-out problems.
        """),
        code("""
            settings = dict(task="arith", steps=STEPS, batch_size=BATCH_SIZE, group_size=GROUP_SIZE, lr=LR,
                            eval_every=EVAL_EVERY, eval_size=EVAL_SIZE)
            if USE_HUB:
                settings.update(HUB_SETTINGS)
            cfg = GRPOConfig(**settings)
            task = TASKS.get(cfg.task)
            policy = load_for(cfg, task)

            chart = LiveChart(["reward/mean", "eval/accuracy", "groups/zero_std_frac", "completion/length", "entropy"],
                              title="GRPO")
            history = []
            for m in tqdm(train(cfg, policy=policy), total=cfg.steps):
                history.append(m)
                chart.update(m)
        """),
        md("""
        ## 4. Plots
        """),
        code("""
            df = pd.DataFrame(history)
            px.line(df, x="step", y=[c for c in ("reward/mean", "eval/accuracy") if c in df], markers=True,
                    title="sampled (reward/mean) and greedy held-out (eval/accuracy) accuracy").show()
        """),
        md("""
        ## 5. Before and after

        The held-out problems split by whether the ones digits carry, answered greedily by π_ref (adapters off)
        and by the tuned policy; then a few carry problems side by side.
        """),
        code("""
            if task is not None:
                heldout = task.eval_prompts()[:EVAL_SIZE]
                rows = []
                for kind in ("carry", "no carry"):
                    prompts = [p for p in heldout if has_carry(*parse_prompt(p)) == (kind == "carry")]
                    with policy.reference() as ref:
                        before = answer(ref, policy.tokenizer, task, prompts)
                    after = answer(policy.model, policy.tokenizer, task, prompts)
                    rows.append({"problems": kind, "n": len(prompts), "accuracy before": sum(before.rewards) / len(prompts),
                                 "accuracy after": sum(after.rewards) / len(prompts)})
                display(pd.DataFrame(rows))
                carry = [p for p in heldout if has_carry(*parse_prompt(p))][:8]
                table = pd.DataFrame(before_after(policy, task, prompts=carry))
            else:  # your own data: score with the run's reward function
                reward_fn = make_reward(cfg.reward)
                prompts = [format_prompt(policy.tokenizer, r["prompt"]) for r in load_prompt_rows(cfg)[:4]]
                with policy.reference() as ref:
                    before = generate(ref, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
                after = generate(policy.model, policy.tokenizer, prompts, cfg.max_new_tokens, greedy=True).completions
                table = pd.DataFrame({"prompt": prompts, "before": before, "after": after,
                                      "before_reward": reward_fn(prompts, before).tolist(),
                                      "after_reward": reward_fn(prompts, after).tolist()})
            table
        """),
        md(r"""
        ## 6. Where the KL term leads: two fixed points on `bandit`

        On `bandit` every answer is one token, so the optimum of $E[r] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{ref})$ is
        known exactly, $\pi^* = \pi_\text{ref}\, e^{r/\beta}/Z$, and so is the point where each way of adding the KL
        stops moving: `lab.fixed_points` computes the expected GRPO update exactly (every group of G answers
        enumerated) and follows it until it vanishes.

        * `k1_reward` (the default): at π* the shaped reward $r - \beta\log\pi/\pi_\text{ref} = \beta\log Z$ is the same
          for every answer, so every Â is 0: its fixed point *is* π*.
        * `k3` (DeepSeekMath): its expected gradient is that of KL(π_ref ‖ π), the reverse KL, and the std
          division rescales the reward but not the KL term. At β = 0.5 its fixed point is farther from π* than
          π_ref is (KL(π* ‖ fixed) = 152% of KL(π* ‖ π_ref)).

        Two runs at β = 0.5 with the bandit defaults (full fine-tuning, 12 prompts × G = 8 a step). Each logs
        `eval/kl_to_optimum` = KL(π* ‖ π_θ) and `eval/kl_to_fixed_point` = KL(its own fixed point ‖ π_θ). In the full
        60-step run the default ends at 0.6% of the starting KL to π*, and k3 ends 0.006 nats from its own fixed
        point and at 1.6 times the starting KL to π*.
        """),
        code("""
            from lab.grpo import bandit_fixed_point
            from lab.tasks.bandit import REWARDS, next_token_logprobs, pi_star, reward_tables

            BETA = 0.5
            bandit_task = TASKS.get("bandit")
            runs, fixed_points = {}, {}
            for kl_mode in ("k1_reward", "k3"):
                bandit_cfg = GRPOConfig(task="bandit", beta=BETA, kl_mode=kl_mode, steps=BANDIT_STEPS,
                                        eval_every=max(1, BANDIT_STEPS // 12), sample_every=0)
                bandit_policy = load_for(bandit_cfg, bandit_task)
                with torch.no_grad(), bandit_policy.reference() as ref:
                    bandit_ref = next_token_logprobs(ref, bandit_policy.tokenizer, bandit_task.eval_prompts())  # (6, V)
                fixed_points[kl_mode] = bandit_fixed_point(bandit_cfg, bandit_policy, bandit_task, bandit_ref)  # (6, V)
                runs[kl_mode] = (pd.DataFrame([m for m in train(bandit_cfg, policy=bandit_policy)
                                               if "eval/kl_to_optimum" in m]), bandit_policy)
            curves = pd.concat([df.assign(kl_mode=mode) for mode, (df, _) in runs.items()])
            curves = curves.melt(id_vars=["step", "kl_mode"], value_vars=["eval/kl_to_optimum", "eval/kl_to_fixed_point"])
            px.line(curves, x="step", y="value", color="variable", facet_col="kl_mode", markers=True,
                    title=f"β = {BETA}: distance to π* and to each mode's own fixed point (nats)").show()
        """),
        md("""
        The first prompt's answers: π_ref, π*, each mode's fixed point, and where each run ended.
        """),
        code("""
            prompt = bandit_task.eval_prompts()[0]
            tokenizer = runs["k3"][1].tokenizer
            rewards = reward_tables([prompt], tokenizer)[0]  # (V,)
            ids = [tokenizer.convert_tokens_to_ids(a) for a in REWARDS[prompt]]  # this prompt's answers
            star = pi_star(bandit_ref[0], rewards, BETA)  # (V,)
            with torch.no_grad():
                ended = {mode: next_token_logprobs(p.model, tokenizer, [prompt])[0] for mode, (_, p) in runs.items()}
            pd.DataFrame({"answer": tokenizer.convert_ids_to_tokens(ids), "reward": rewards[ids].tolist(),
                          "π_ref": bandit_ref[0, ids].exp().tolist(), "π*": star[ids].exp().tolist(),
                          "k3 fixed point": fixed_points["k3"][0, ids].exp().tolist(),
                          "k1_reward run": ended["k1_reward"][ids].exp().tolist(),
                          "k3 run": ended["k3"][ids].exp().tolist()}).round(3)
        """),
        md("""
        ## Try this

        * **`GROUP_SIZE = 2`** against **16**: a problem the model solves with probability p gives an all-equal
          group (`groups/zero_std_frac`), which teaches nothing, with probability pᴳ + (1 − p)ᴳ. For p = 0.4 that
          is 0.4² + 0.6² = 0.52 when G = 2 and 0.0003 when G = 16, at 8 times the sampling cost.
        * **`settings["num_iterations"] = 4`**: each rollout is reused for 4 updates, the ratio moves away from 1
          and `clip/frac` becomes non-zero; try `epsilon_high=0.28` (DAPO's asymmetric clip) to let good answers
          rise faster.
        * **`settings["beta"] = 0.04`** (DeepSeekMath's value): `kl/ref` appears in the metrics and the policy
          stays closer to π_ref; with β = 0 (the lab's default, as in DAPO and Dr. GRPO) nothing holds it back but
          the clip.
        * **§6 with `kl_mode="k3_ratio"`** (TRL's bias-corrected KL, the gradient of KL(π ‖ π_ref)) or with
          `scale_rewards=False`: the fixed points move (`lab.grpo`'s docstring tabulates them; without the std
          division k3_ratio lands on π* at β·G/(G − 1)), and `BETA = 0.1` puts all of them closer to π*.
        """),
    ]
    return title, cells


# ----------------------------------------------------------------------------------------------------------------------
# 06 — every method on the same task


@notebook("06_compare")
def compare():
    title = "06 · Every method on one task: reward against KL"
    cells = [
        title_cell(
            "06_compare",
            title,
            """
        PPO, GRPO, REINFORCE and DPO all aim at the same KL-regularized objective, by very different routes:
        sampling and a value function, sampling and a group baseline, plain sampling, or no sampling at all.
        On the `bandit` task the objective's optimum π* is known in closed form (see `01_tour`), and both the
        expected reward and the KL to the reference are sums over the vocabulary, so every trained policy is an
        exact point in the reward–KL plane. This notebook trains each method briefly from the same base model
        with the same β and watches the points move towards the frontier.
        """,
        ),
        INSTALL,
        params_cell("""
            BETA = 0.1                          # the same KL weight for every method
            STEPS = 2 if LAB_FAST else 100      # optimizer steps (rollouts for the online methods) per method
        """),
        md("""
        There is no hub switch here on purpose: the comparison is exact only where π* and the KL can be computed,
        which needs a response space small enough to enumerate. To compare methods on a real model, run
        `03_ppo_rlhf`, `04_dpo` and `05_grpo` with their switches on and compare the `kl/ref` and reward metrics
        that each run records.
        """),
        code("""
            import time

            import pandas as pd
            import plotly.express as px
            import plotly.graph_objects as go
            import torch
            from IPython.display import display
            from tqdm.auto import tqdm

            from lab.evaluate import before_after
            from lab.methods import get_method
            from lab.modeling import load_policy
            from lab.ops import masked_mean
            from lab.ppo import ppo_policy_loss
            from lab.reinforce import reinforce_loss
            from lab.tasks import bandit, get_task

            task = get_task("bandit")
            prompts = task.eval_prompts()
        """),
        md(r"""
        ## 1. One objective, four routes

        $$\max_\pi\; \mathbb{E}_{y\sim\pi}[r(x,y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{ref})
          \quad\Longrightarrow\quad \pi^*(y\mid x) \propto \pi_\text{ref}(y\mid x)\,e^{r(x,y)/\beta}$$

        | method | data it learns from | how the KL enters | what replaces the unknown "how good was this?" |
        |---|---|---|---|
        | REINFORCE | its own samples, scored by r | −β·log(π/π_ref) added to the reward | the batch-mean reward as a baseline |
        | PPO | its own samples, scored by r | per-token −β·KL in the reward | a learned value function V(s), GAE |
        | GRPO | G samples per prompt, scored by r | β·k3 added to the loss | the group's mean and std |
        | DPO | fixed preference pairs, no sampling | built into the loss through π_ref | the policy's own log-ratio, β·log π/π_ref |
        | SFT on chosen (a baseline) | the chosen halves of the same pairs | not at all | nothing: imitate the winners |

        On `bandit` the pairs come from π_ref and are labelled by the Bradley–Terry model with the true reward,
        so, among the answers that appear in pairs, DPO's target is the same π* as the others'.

        ## 2. The losses on toy tensors: where the online methods agree

        At the start of an update the policy is the one that sampled (ratio π_θ/π_old = 1). There, PPO's clipped
        loss has exactly the gradient of REINFORCE's: the clipping only acts once the policy has moved. Three
        one-token samples with log-probs log(0.2, 0.5, 0.3) and advantages (+1, −0.5, +0.2):

        REINFORCE's loss is −mean(A · log π) = −(1·log 0.2 − 0.5·log 0.5 + 0.2·log 0.3)/3
        = −(−1.6094 + 0.3466 − 0.2408)/3 = 0.5012; PPO's at ratio 1 is −mean(A · 1) = −(1 − 0.5 + 0.2)/3 = −0.2333.
        The values differ, the gradients do not: both are −mean(A · ∇log π).
        """),
        code("""
            advantages = torch.tensor([1.0, -0.5, 0.2])
            mask = torch.ones(3, 1)  # (B, T): one token each
            grads = {}
            for name in ("REINFORCE", "PPO at ratio 1"):
                logprobs = torch.log(torch.tensor([[0.2], [0.5], [0.3]])).requires_grad_()  # (B, T)
                if name == "REINFORCE":
                    loss, _ = reinforce_loss(logprobs, advantages, mask)
                else:
                    loss, _ = ppo_policy_loss(logprobs, logprobs.detach(), advantages[:, None], mask, cliprange=0.2)
                loss.backward()
                grads[name] = logprobs.grad.flatten().tolist()
                print(f"{name:15s} loss {loss.item():+.4f}   d loss / d log π = {[round(g, 4) for g in grads[name]]}")
            print("by hand:        REINFORCE +0.5012, PPO −0.2333, gradient −A/3 =", [round(-a / 3, 4) for a in advantages.tolist()])
        """),
        md("""
        ## 3. Train every method from the same start

        Each run loads a fresh copy of the built-in bandit model with LoRA adapters, so adapters off = π_ref for
        all of them. After every step we read the policy's exact distribution over the vocabulary and place it in
        the reward–KL plane. The black line is the frontier traced by π* as β varies; the star is π*
        for this notebook's β.
        """),
        code("""
            base = load_policy(task="bandit", mode="lora")
            tok = base.tokenizer
            with torch.no_grad():
                ref_logprobs = bandit.next_token_logprobs(base.model, tok, prompts)  # (B, V) adapters are still zero
            rewards = bandit.reward_tables(prompts, tok)  # (B, V)
            is_answer = rewards > bandit.NON_ANSWER_REWARD  # (B, V) the prompt's answer words
            star = bandit.pi_star(ref_logprobs, rewards, BETA)  # (B, V) this notebook's target π*


            def exact_numbers(logprobs):
                \"\"\"Exact numbers for a policy's next-token log-probs (B, V), averaged over the prompts: E_π[r],
                KL(π‖π_ref), KL(π*‖π), the probability of answering with one of the prompt's answer words, and E[r]
                among those answers only.\"\"\"
                on_answers = logprobs.masked_fill(~is_answer, float("-inf"))  # (B, V)
                on_answers = on_answers - on_answers.logsumexp(-1, keepdim=True)  # π renormalized over the answers
                return {"E[r]": bandit.expected_reward(logprobs, rewards).mean().item(),
                        "KL(π‖π_ref)": bandit.kl(logprobs, ref_logprobs).mean().item(),
                        "KL(π*‖π)": bandit.kl(star, logprobs).mean().item(),
                        "mass on answers": (logprobs.exp() * is_answer).sum(-1).mean().item(),
                        "E[r | answer]": bandit.expected_reward(on_answers, rewards).mean().item()}


            def exact_point(policy):
                with torch.no_grad():
                    return exact_numbers(bandit.next_token_logprobs(policy.model, tok, prompts))


            frontier = []
            for beta in torch.logspace(-2, 1, 30).tolist():
                pi = bandit.pi_star(ref_logprobs, rewards, beta)  # (B, V)
                frontier.append((bandit.kl(pi, ref_logprobs).mean().item(),
                                 bandit.expected_reward(pi, rewards).mean().item()))
            optimum = exact_numbers(star)
            start = exact_point(base)
        """),
        md("""
        One configuration per method, from the lab's registry (`lab.methods`). Everything not set here is the
        method's default; `eval_every=0` skips the periodic held-out evaluation, which we replace with the exact
        point after every step.
        """),
        code("""
            COMMON = dict(task="bandit", beta=BETA, steps=STEPS, seed=0, eval_every=0, sample_every=0)
            RUNS = {  # label: (method, its own settings)
                "REINFORCE": ("reinforce", dict(batch_size=48)),
                "PPO": ("ppo", dict(batch_size=48)),
                "GRPO": ("grpo", dict(batch_size=6, group_size=8)),
                "DPO": ("dpo", dict(batch_size=64)),
                "SFT on chosen": ("sft-preferred", dict(batch_size=64)),
            }

            fig = go.Figure()
            fig.add_scatter(x=[k for k, _ in frontier], y=[r for _, r in frontier], mode="lines",
                            line=dict(color="black"), name="π* for β from 10 to 0.01")
            fig.add_scatter(x=[optimum["KL(π‖π_ref)"]], y=[optimum["E[r]"]], mode="markers",
                            marker=dict(symbol="star", size=16, color="gold"), name=f"π* for β={BETA}")
            for label in RUNS:
                fig.add_scatter(x=[start["KL(π‖π_ref)"]], y=[start["E[r]"]], mode="lines+markers", name=label)
            fig.update_layout(xaxis_title="KL(π‖π_ref)", yaxis_title="E[r]", height=480,
                              title="bandit: each method's policy after every step (exact values)")
            handle = display(fig._repr_mimebundle_(), raw=True, display_id=True)

            results, policies = {}, {}
            for trace, (label, (method, settings)) in zip(fig.data[2:], RUNS.items()):
                Config, train = get_method(method)
                cfg = Config(**COMMON, **settings)
                policy = load_policy(task="bandit", mode="lora")
                started = time.time()
                for m in tqdm(train(cfg, policy=policy), total=cfg.steps, desc=label):
                    point = exact_point(policy)
                    trace.x = (*trace.x, point["KL(π‖π_ref)"])
                    trace.y = (*trace.y, point["E[r]"])
                    handle.update(fig._repr_mimebundle_(), raw=True)
                results[label] = {**point, "seconds": round(time.time() - started, 1)}
                policies[label] = policy
        """),
        md("""
        ## 4. Where each method ended

        `KL(π*‖π)` is the distance to this β's optimum (0 = reached it); `mass on answers` is the probability
        of answering with one of the prompt's answer words at all, and `E[r | answer]` the expected reward among
        those answers only.
        """),
        code("""
            pd.DataFrame({"π_ref": start, **results, f"π* (β={BETA})": optimum}).T
        """),
        md("""
        What we saw in one full run (`STEPS = 100`, seed 0; other settings and seeds move the numbers):

        * **REINFORCE, PPO and GRPO** all climb from π_ref towards the frontier, buying reward with KL. None
          reaches the star in 100 steps at the methods' default learning rates, and they end below the frontier:
          for the KL they have spent, π* of some larger β would earn more.
        * **SFT on chosen** moves least. The winners of pairs drawn from π_ref look a lot like π_ref, tilted a
          little towards better answers.
        * **DPO** is the odd one. Among the answer words it does prefer the better ones more than π_ref does
          (`E[r | answer]`), yet its expected reward fell far below π_ref's: between steps 60 and 90 its mass on
          the answers collapsed (to under 0.1), and its greedy answers became special tokens. DPO's loss compares
          the two answers of a pair, so it does not change when every answer's log-ratio drops by the same amount;
          nothing in it holds the probability on the answers, and it flows to tokens that no pair contains. The
          online methods sample such tokens, score them −1 and push them back down. This *likelihood
          displacement* is a known weakness of DPO, worst when the pairs cover only part of what the policy can
          say.
        """),
        code("""
            prompt = prompts[0]
            answers = list(bandit.REWARDS[prompt])
            ids = tok.convert_tokens_to_ids(answers)
            with torch.no_grad():
                dists = {"π_ref": ref_logprobs[0], f"π* (β={BETA})": star[0],
                         **{label: bandit.next_token_logprobs(p.model, tok, [prompt])[0] for label, p in policies.items()}}
            fig = go.Figure([go.Bar(name=name, x=answers, y=lp[ids].exp().tolist()) for name, lp in dists.items()])
            fig.update_layout(barmode="group", height=380, yaxis_title="probability",
                              title=f"{prompt!r}, rewards {bandit.REWARDS[prompt]}")
            fig.show()
        """),
        md("""
        ## 5. Before and after

        The greedy answer of each policy on every bandit prompt, with its reward. Before = π_ref (adapters off),
        the same for all methods.
        """),
        code("""
            table = None
            for label, policy in policies.items():
                rows = pd.DataFrame(before_after(policy, task))
                if table is None:
                    table = rows[["prompt", "before", "before_reward"]].rename(
                        columns={"before": "π_ref", "before_reward": "r(π_ref)"})
                table[label] = rows["after"]
                table[f"r({label})"] = rows["after_reward"]
            table
        """),
        md("""
        ## Try this

        * **`BETA = 1.0`**: π* stays close to π_ref and every method should stop near the star, low on both axes.
          **`BETA = 0.01`**: π* is nearly greedy; watch which methods get there in 60 steps and how far along the
          KL axis they travel to do it.
        * **Another preference loss**: `RUNS["IPO"] = ("dpo", dict(batch_size=64, loss_type="ipo"))` adds IPO,
          which regresses each pair's log-ratio margin onto 1/(2β) instead of pushing it apart without end;
          compare its "mass on answers" with DPO's.
        """),
    ]
    return title, cells


# ----------------------------------------------------------------------------------------------------------------------


def build(stem: str) -> nbformat.NotebookNode:
    title, cells = NOTEBOOKS[stem]()
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"name": f"{stem}.ipynb", "provenance": []},
    }
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "markdown" else new_code_cell(source)
        cell.id = f"{stem.split('_')[0]}-{i:02d}"  # stable ids keep diffs small
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def write(stem: str, folder: Path = HERE) -> Path:
    path = folder / f"{stem}.ipynb"
    nbformat.write(build(stem), path)
    return path


def main(argv: list[str]) -> None:
    stems = [s for s in NOTEBOOKS if not argv or any(a in s for a in argv)]
    for stem in stems:
        print(write(stem).relative_to(HERE.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
