"""Draw one decode step's draft tree (scripts/show_tree.py): what was drafted, what the target
verified, what it accepted, and the token it added.

    rec, drafted, stats, steps = capture_step(decoder, "Why is the sky blue?", step=3)
    view = step_view(rec, drafted, decoder.tokenizer, step=3, steps=steps, stats=stats, prompt=...)
    draw_tree(view).savefig("tree.png")

Steps are 1-based: step 1 is the first draft tree, drafted right after the prefill (which gives the
first root); step N is the N-th verification (``GenerationStats.steps`` counts them).

The nodes are laid out left to right by depth, root (the last committed token) on the left. Each
drafted node shows its text, the draft's probability q(token | parent) and, when an acceptance
predictor scored the tree, its predicted P(accepted | parent accepted). Verified nodes are solid;
pruned ones (drafted, then cut before verification) are grey and dashed; the accepted path is green;
the target's own next token (the bonus token, emitted after the accepted path every step) is orange.

The tree as drafted before pruning is ``StepRecord.drafted``; verified nodes are matched to drafted
ones through ``DraftTree.origin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

COLORS = dict(root="#9ecae1", accepted="#a1d99b", verified="#ffffff", pruned="#f0f0f0", bonus="#fdae6b")
EDGE = dict(root="#3182bd", accepted="#31a354", verified="#525252", pruned="#a0a0a0", bonus="#e6550d")


@dataclass
class StepView:
    """One step's tree, plain data (drafted nodes in the draft's order; node 0 is the root)."""

    step: int
    labels: list[str]  # escaped token text per node
    parents: list[int]  # -1 for the root
    draft_prob: list[float]  # q(token | parent); 1 for the root
    accept_prob: list[float] | None  # predicted P(accepted | parent accepted), when a predictor scored the tree
    verified: list[bool]  # sent to the target (the root always)
    accepted: list[int]  # the accepted path: node indices, root first
    bonus: str  # escaped text of the target's own next token
    steps: int | None = None  # decode steps of the whole generation
    tau: float | None = None  # the run's tokens per verify step
    prompt: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_drafted(self) -> int:
        return len(self.labels) - 1

    @property
    def num_verified(self) -> int:
        return sum(self.verified) - 1


# ---------------------------------------------------------------------- capture
class StepNotReached(ValueError):
    pass


def capture_step(decoder, prompt: str, step: int, max_new_tokens: int | None = None, **overrides):
    """Generate on ``prompt`` and keep decode step ``step`` (1-based).

    Returns ``(record, drafted, stats, steps)``: the step's ``StepRecord``, the tree as drafted
    before pruning (``record.drafted``: ``record.tree`` itself when nothing was pruned), the run's
    ``GenerationStats`` and its number of decode steps.
    """

    if step < 1:
        raise ValueError(f"step is 1-based (1 = the first draft tree after the prefill), got {step}")
    captured: dict = {}
    count = 0

    def on_step(record):
        nonlocal count
        count += 1
        if count == step:
            captured["record"], captured["drafted"] = record, record.drafted

    ids = decoder.encode_prompt(prompt)
    _, stats = decoder.generate(ids, max_new_tokens=max_new_tokens, on_step=on_step, **overrides)
    if "record" not in captured:
        raise StepNotReached(f"the generation took {count} decode step(s) ({stats.new_tokens} new tokens, "
                             f"stopped by {stats.stop_reason}); choose step <= {count} or raise decoding.max_new_tokens")
    return captured["record"], captured["drafted"], stats, count


def step_view(record, drafted=None, tokenizer=None, step: int = 1, steps: int | None = None, stats=None,
              prompt: str = "") -> StepView:
    """The plain-data view of one ``StepRecord`` (see ``capture_step``)."""
    verified_tree = record.tree
    notes = []
    mapping = _match(verified_tree, drafted) if drafted is not None and drafted is not verified_tree else None
    if drafted is not None and drafted is not verified_tree and mapping is None:
        notes.append("the drafted tree did not match the verified one: showing the verified tree only")
    tree = drafted if mapping is not None else verified_tree
    if mapping is None:
        mapping = list(range(len(verified_tree)))
    verified = [False] * len(tree)
    for i in mapping:
        verified[i] = True
    tokens = tree.tokens.tolist()
    draft_prob = [1.0] + [math.exp(float(x)) for x in tree.logprobs[1:].tolist()]
    accept = tree.accept_prob
    if accept is None and verified_tree.accept_prob is not None:  # predictor values of the verified nodes only
        accept = [float("nan")] * len(tree)
        for v, d in enumerate(mapping):
            accept[d] = float(verified_tree.accept_prob[v])
    elif accept is not None:
        accept = [float(x) for x in accept.tolist()]
    tau = stats.mean_accepted_length if stats is not None else None
    return StepView(step=step, labels=[token_text(tokenizer, t) for t in tokens], parents=tree.parents.tolist(),
                    draft_prob=draft_prob, accept_prob=accept, verified=verified,
                    accepted=[mapping[i] for i in record.path], bonus=token_text(tokenizer, int(record.next_token)),
                    steps=steps, tau=tau, prompt=prompt, notes=notes)


def _match(verified, drafted) -> list[int] | None:
    """verified node -> drafted node, through the index each node had when the draft grew it."""
    def grown_ids(t):
        return t.origin.tolist() if t.origin is not None else list(range(len(t)))

    where = {g: i for i, g in enumerate(grown_ids(drafted))}
    mapping = [where.get(g) for g in grown_ids(verified)]
    if any(m is None for m in mapping):
        return None
    vt, dt = verified.tokens.tolist(), drafted.tokens.tolist()
    vp, dp = verified.parents.tolist(), drafted.parents.tolist()
    for v, d in enumerate(mapping):
        if vt[v] != dt[d] or (vp[v] >= 0 and mapping[vp[v]] != dp[d]):
            return None
    return mapping


def token_text(tokenizer, token: int, limit: int = 16) -> str:
    """A token as readable, escaped text: quotes show its spaces, \\n etc. are escaped, $ cannot start
    matplotlib math, long ones are cut."""
    if tokenizer is None:
        text = f"<{token}>"
    else:
        try:
            text = tokenizer.decode([int(token)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except Exception:  # noqa: BLE001 - any tokenizer quirk: show the id
            text = f"<{token}>"
    return '"' + escape(text, limit) + '"'


def escape(text: str, limit: int = 16) -> str:
    s = repr(text)[1:-1]  # control characters and backslashes escaped, no quotes added
    if len(s) > limit:
        s = s[: limit - 1] + "\u2026"
    return s.replace("$", r"\$")


# ---------------------------------------------------------------------- layout and drawing
def layout(parents: list[int], extra_child_of: int | None = None) -> tuple[list[float], list[float]]:
    """(x, y) per node: x = depth, leaves one unit apart top to bottom in draft (DFS) order, a parent
    centred on its children. ``extra_child_of``: one more leaf (the bonus token, index len(parents))
    as the last child of that node."""
    n = len(parents) + (extra_child_of is not None)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        if p >= 0:
            children.setdefault(p, []).append(i)
    if extra_child_of is not None:
        children.setdefault(extra_child_of, []).append(len(parents))
    x, y = [0.0] * n, [0.0] * n
    next_leaf = 0.0
    stack = [(0, 0, False)]
    while stack:  # iterative post-order DFS
        node, depth, done = stack.pop()
        x[node] = float(depth)
        kids = children.get(node, [])
        if done or not kids:
            if kids:
                y[node] = (y[kids[0]] + y[kids[-1]]) / 2
            else:
                y[node], next_leaf = -next_leaf, next_leaf + 1
            continue
        stack.append((node, depth, True))
        stack += [(k, depth + 1, False) for k in reversed(kids)]
    return x, y


def _fmt(p: float) -> str:
    return "-" if p is None or math.isnan(p) else (f"{p:.2f}" if p >= 0.005 else f"{p:.0e}")


def draw_tree(view: StepView, title: str | None = None):
    """A ``matplotlib.figure.Figure`` of the step's tree (save it with ``fig.savefig(path)``)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(view.labels)
    last = view.accepted[-1]
    x, y = layout(view.parents, extra_child_of=last)
    on_path = set(view.accepted)
    depth = int(max(x)) + 1
    leaves = int(-min(y)) + 1
    fig = Figure(figsize=(max(6.0, 2.3 * depth + 1.5), max(3.5, 0.72 * leaves + 2.0)), layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_xlim(-0.6, depth - 0.4)
    ax.set_ylim(min(y) - 0.7, 0.7)

    def kind(i):
        if i == 0:
            return "root"
        if i in on_path:
            return "accepted"
        return "verified" if view.verified[i] else "pruned"

    for i in range(1, n):  # edges under the boxes
        p, k = view.parents[i], kind(i)
        ax.plot([x[p], x[i]], [y[p], y[i]], color=EDGE[k], lw=2.2 if k == "accepted" else 1.0,
                ls="--" if k == "pruned" else "-", zorder=1)
    ax.plot([x[last], x[n]], [y[last], y[n]], color=EDGE["bonus"], lw=2.2, zorder=1)
    for i in range(n):
        k = kind(i)
        if i == 0:
            text = f"{view.labels[0]}\nroot"
        else:
            text = f"{view.labels[i]}\nq={_fmt(view.draft_prob[i])}"
            if view.accept_prob is not None:
                text += f"  a={_fmt(view.accept_prob[i])}"
        ax.text(x[i], y[i], text, ha="center", va="center", fontsize=8, zorder=3,
                color="#707070" if k == "pruned" else "black", fontweight="bold" if k == "accepted" else "normal",
                bbox=dict(boxstyle="round,pad=0.35", fc=COLORS[k], ec=EDGE[k], lw=1.6 if k != "pruned" else 1.0,
                          ls="--" if k == "pruned" else "-"))
    ax.text(x[n], y[n], f"{view.bonus}\ntarget", ha="center", va="center", fontsize=8, fontweight="bold", zorder=3,
            bbox=dict(boxstyle="round,pad=0.35", fc=COLORS["bonus"], ec=EDGE["bonus"], lw=1.6))
    handles = [Patch(fc=COLORS["root"], ec=EDGE["root"], label="root (last committed token)"),
               Patch(fc=COLORS["accepted"], ec=EDGE["accepted"], label="accepted path"),
               Patch(fc=COLORS["verified"], ec=EDGE["verified"], label="verified, rejected"),
               Patch(fc=COLORS["pruned"], ec=EDGE["pruned"], ls="--", label="pruned (drafted, not verified)"),
               Patch(fc=COLORS["bonus"], ec=EDGE["bonus"], label="bonus: the target's own next token"),
               Line2D([], [], ls="none", label="q = draft probability given the parent")]
    if view.accept_prob is not None:
        handles.append(Line2D([], [], ls="none", label="a = predicted P(accepted | parent accepted)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title is None:
        accepted = len(view.accepted) - 1
        of = f" of {view.steps}" if view.steps else ""
        tau = f", run tau {view.tau:.2f}" if view.tau is not None else ""
        prompt = escape(view.prompt, 90)
        title = (f"step {view.step}{of}: {view.num_drafted} drafted, {view.num_verified} verified, "
                 f"{accepted} accepted + 1 bonus token{tau}\nprompt: \"{prompt}\"")
        if view.notes:
            title += "\n" + "; ".join(view.notes)
    ax.set_title(title, fontsize=9, loc="left")
    return fig
