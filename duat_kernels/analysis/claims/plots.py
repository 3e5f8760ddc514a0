"""The PNGs of `duat claims` (matplotlib, Agg): one figure per section."""

from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the plots need matplotlib: pip install 'duat-kernels[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, legend_ax=None) -> None:
    """Legend (on legend_ax), layout, PNG, and the figure closed."""
    if legend_ax is not None:
        legend_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def density(d: dict, path: Path, title: str) -> None:
    plt = _plt()
    t = str(d["thresholds"][1])
    layers = [r["layer"] for r in d["layers"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, [r["attention"]["blocks"][t] for r in d["layers"]], "o-", label="attention W' blocks")
    ax.plot(layers, [r["attention"]["entries"][t]["fraction"] for r in d["layers"]], "s-", label="attention W' entries")
    ax.axhline(d["conv1d"]["blocks"][t], color="C2", ls="--", label="Conv1d (k=3) blocks")
    ax.axhline(d["conv1d"]["entries"][t], color="C2", ls=":", label="Conv1d (k=3) entries")
    ax.plot(layers, [r["ffn_in"]["entries"][t] for r in d["layers"]], "^:", color="C3", label="FFN I⊗W1 entries")
    ax.axhline(1 / d["tokens"], color="C3", ls="--", label="FFN I⊗W1 blocks")
    ax.set(xlabel="layer", ylabel=f"fraction above {t}·max", yscale="log", title=title)
    _save(fig, path, ax)


def dynamic(d: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = [r["layer"] for r in d["layers"]]
    for p in d["prompts"]:
        ax.plot(layers, [r["attention"][p] for r in d["layers"]], "o-", label=f"W', \"{p.strip()}\"")
    ax.plot(layers, [sum(r["ffn_linearised"].values()) / len(r["ffn_linearised"]) for r in d["layers"]], "k:",
            label="FFN linearised (mean)")
    ax.plot(layers, [max(r["ffn_linear_maps"].values()) for r in d["layers"]], "k--", label="FFN linear maps (0)")
    ax.set(xlabel="layer", ylabel="relative Frobenius distance", title=title)
    _save(fig, path, ax)


def pruning(d: dict, path: Path, title: str) -> None:
    plt = _plt()
    picks = sorted({0, len(d["layers"]) // 2, len(d["layers"]) - 1})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for c, i in enumerate(picks):
        r = d["layers"][i]
        k = [b["pruned"] for b in r["heads"]["budgets"]]
        ax.plot(k, [b["actual"] for b in r["heads"]["budgets"]], "o-", color=f"C{c}", label=f"layer {r['layer']} actual")
        ax.plot(k, [b["bound"] for b in r["heads"]["budgets"]], "--", color=f"C{c}", label=f"layer {r['layer']} bound")
    ax.set(xlabel="heads pruned (greedy)", ylabel="relative output error", title=title)
    _save(fig, path, ax)


def multilayer(d: dict, path: Path, title: str) -> None:
    plt = _plt()
    layers = [r["layer"] for r in d["layers"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.semilogy(layers, [r["relative_error"] for r in d["layers"]], "o-", label="rebuilt from x_0")
    ax.semilogy(layers, [r["one_layer_error"] for r in d["layers"]], "s:", label="one layer from its own input")
    ax.axhline(d["tolerance"], color="r", ls="--", label="bound")
    ax.set(xlabel="layer L", ylabel="relative error of h_L", title=title)
    _save(fig, path, ax)


def contributions(d: dict, tokens: list[str], path: Path, title: str) -> None:
    plt = _plt()
    mats = [("last layer ||W'_nm x_m||", d["layers"][-1]["summed"])]
    if d["rollout"] is not None:
        mats.append(("ALTI rollout, all layers", d["rollout"]))
    fig, axes = plt.subplots(1, len(mats), figsize=(5.5 * len(mats), 5), squeeze=False)
    for ax, (name, mat) in zip(axes[0], mats):
        im = ax.imshow(mat, cmap="viridis")
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        ax.set(title=name, xlabel="input token m", ylabel="output token n")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    _save(fig, path)


PLOTTED_SECTIONS = ("density", "dynamic", "pruning", "multilayer", "contributions")  # each writes <section>.png


def write_all(out: Path, results: dict, tokens: list[str], model: str) -> list[Path]:
    """<section>.png for each section of PLOTTED_SECTIONS in results; returns the paths written."""
    paths = []
    for key, fn in (("density", density), ("dynamic", dynamic), ("pruning", pruning), ("multilayer", multilayer)):
        if key in results:
            fn(results[key], out / f"{key}.png", f"{model}: {key}")
            paths.append(out / f"{key}.png")
    if "contributions" in results:
        contributions(results["contributions"], tokens, out / "contributions.png", f"{model}: contributions")
        paths.append(out / "contributions.png")
    return paths
