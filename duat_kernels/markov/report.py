"""Per-temperature analysis of a LanguageModelChain and its report: markov.json, markov.md, PNG plots."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from duat_kernels import strict_json
from duat_kernels._files import remove_stale_outputs
from duat_kernels.markov import analysis
from duat_kernels.markov.chain import LanguageModelChain, temperature_label

TOP = 5  # how many token marginals and states the Markdown table lists
MIN_CURVE_STEPS = 16
MAX_CURVE_STEPS = 1000


def _curve_steps(t_mix: int | None) -> int:
    """Length of the TV curves: three mixing times, within [MIN_CURVE_STEPS, MAX_CURVE_STEPS]."""
    return MAX_CURVE_STEPS if t_mix is None else int(np.clip(3 * t_mix, MIN_CURVE_STEPS, MAX_CURVE_STEPS))


def analyse_temperature(chain: LanguageModelChain, tau: float) -> dict:
    """Everything markov.json holds for one temperature τ (plain Python types)."""
    start = time.perf_counter()
    op = chain.operator(tau)
    try:
        stationary = analysis.stationary_distribution(op)
    except ValueError as exc:
        raise ValueError(f"at temperature τ={temperature_label(tau)}: {exc}") from None
    pi = stationary.pi
    gap = analysis.spectral_gap(op)
    dense = op.num_states <= analysis.DENSE_MAX_STATES
    starts = analysis.constant_states(chain.num_symbols, chain.context)
    slowest = None
    if dense:
        t_mix = analysis.mixing_time(op, pi)
        steps = _curve_steps(t_mix)
        curves = analysis.tv_curves(op, pi, starts, steps)
        worst, argmax = analysis.worst_tv_curve(op, pi, steps)
        slowest = chain.state_label(int(argmax[-1]))
    else:  # without the dense powers, t_mix over the starting states only (a lower bound on t_mix)
        curves = analysis.tv_curves(op, pi, starts, MAX_CURVE_STEPS)
        below = np.flatnonzero(curves.max(axis=0) <= analysis.MIXING_EPSILON)
        t_mix = int(below[0]) if below.size else None
        curves = curves[:, :_curve_steps(t_mix) + 1]
    tv_curve = {chain.state_label(int(s)): c.tolist() for s, c in zip(starts, curves)}
    if dense:
        tv_curve["max over states"] = worst.tolist()
    marginal = analysis.token_marginal(pi, chain.num_symbols, chain.context)
    order = np.argsort(-pi)[:TOP]
    return {
        "temperature": tau,
        "pi": pi.tolist(),
        "residual": stationary.residual,
        "stationary_method": stationary.method,
        "token_marginal": dict(zip(chain.symbols, marginal.tolist())),
        "spectral_gap": gap.gap,
        "second_eigenvalue": [gap.second_eigenvalue.real, gap.second_eigenvalue.imag],
        "relaxation_time": 1.0 / gap.gap if gap.gap > 0 else None,
        "tv_curve": tv_curve,
        "mixing_time": t_mix,
        "mixing_time_over": "all states" if dense else "the constant starting states",
        "slowest_state": slowest,  # the start farthest from π at the last step of the curves
        "mixing_epsilon": analysis.MIXING_EPSILON,
        "row_sum_error": float(np.abs(op.probabilities.sum(axis=1) - 1.0).max()),
        "top_states": {chain.state_label(int(s)): float(pi[s]) for s in order},
        "analysis_seconds": time.perf_counter() - start,
    }


def analyse(chain: LanguageModelChain, progress: bool = True) -> list[dict]:
    """analyse_temperature for each of chain.temperatures."""
    from tqdm.auto import tqdm

    return [analyse_temperature(chain, tau) for tau in tqdm(chain.temperatures, desc="temperatures", unit="τ",
                                                            disable=not progress)]


def format_table(results: list[dict]) -> str:
    """The Markdown table: one row per temperature."""
    lines = ["| τ | spectral gap | abs(λ₂) | t_rel | t_mix(1/4) | slowest start | residual ‖πP−π‖₁ "
             "| top token marginals | top states (π) |", "|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for r in results:
        lam2 = abs(complex(*r["second_eigenvalue"]))
        t_rel = "∞" if r["relaxation_time"] is None else f"{r['relaxation_time']:.3g}"
        t_mix = "> max" if r["mixing_time"] is None else str(r["mixing_time"])
        top = sorted(r["token_marginal"].items(), key=lambda kv: -kv[1])[:TOP]
        tokens = ", ".join(f"`{k}` {v:.3f}" for k, v in top)
        states = ", ".join(f"`{k}` {v:.3f}" for k, v in r["top_states"].items())
        slowest = "" if r["slowest_state"] is None else f"`{r['slowest_state']}`"
        tau = temperature_label(r["temperature"])
        lines.append(f"| {tau} | {r['spectral_gap']:.4g} | {lam2:.4g} | {t_rel} | {t_mix} | {slowest} | "
                     f"{r['residual']:.1e} | {tokens} | {states} |")
    return "\n".join(lines)


def write_markdown(results: list[dict], meta: dict, path: Path) -> None:
    symbols = " ".join(f"`{s}`" for s in meta["symbols"])
    text = [f"# {meta['model']} as a Markov chain", "",
            f"Symbols V = {symbols} (T = {len(meta['symbols'])}, token ids {meta['token_ids']}), context K = "
            f"{meta['context']}: {meta['num_states']} states; the model reads "
            f"{'BOS (id ' + str(meta['bos_id']) + ') + ' if meta['bos_id'] is not None else ''}K tokens; "
            "P(y | s) = softmax over V of logits[V] / τ.", "",
            format_table(results), "",
            "spectral gap = 1 − |λ₂|, t_rel = 1 / gap; t_mix(1/4) = min{t : max_s ‖P^t(s, ·) − π‖_TV ≤ 1/4} "
            f"(over {results[0]['mixing_time_over'] if results else 'all states'}).", "",
            f"Logits of the {meta['num_states']} contexts (or reading them from the cache): "
            f"{meta['logits_seconds']:.1f} s; analysis: "
            + ", ".join(f"τ={temperature_label(r['temperature'])} {r['analysis_seconds']:.1f} s" for r in results)
            + ".", ""]
    path.write_text("\n".join(text))


def plot(results: list[dict], out_dir: Path, title: str) -> list[Path]:
    """tv_vs_t.png (one panel per τ, log scale) and mixing_time_vs_tau.png (t_mix and t_rel against τ)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the markov plots need matplotlib: pip install 'duat-kernels[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        for label, curve in r["tv_curve"].items():
            worst = label == "max over states"
            ax.semilogy(np.arange(len(curve)), np.maximum(curve, 1e-16), label=label,
                        color="black" if worst else None, lw=1.6 if worst else 0.9, ls="--" if worst else "-")
        ax.axhline(analysis.MIXING_EPSILON, color="gray", ls="--", lw=0.8)
        ax.set_title(f"τ = {temperature_label(r['temperature'])}, t_mix = {r['mixing_time']}")
        ax.set_xlabel("t (steps)")
    axes[0][0].set_ylabel("‖δ_s P^t − π‖_TV")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    tv_path = out_dir / "tv_vs_t.png"
    fig.savefig(tv_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    taus = [r["temperature"] for r in results]
    ax.plot(taus, [np.nan if r["mixing_time"] is None else r["mixing_time"] for r in results], "o-", label="t_mix(1/4)")
    ax.plot(taus, [np.nan if r["relaxation_time"] is None else r["relaxation_time"] for r in results], "s--",
            label="t_rel = 1 / spectral gap")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(taus, [temperature_label(t) for t in taus])
    ax.minorticks_off()
    ax.set_xlabel("temperature τ")
    ax.set_ylabel("steps")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    mix_path = out_dir / "mixing_time_vs_tau.png"
    fig.savefig(mix_path, dpi=110)
    plt.close(fig)
    return [tv_path, mix_path]


def write_report(chain: LanguageModelChain, results: list[dict], out_dir: str | os.PathLike, meta: dict,
                 plots: bool = True) -> list[Path]:
    """Write out_dir/markov.json ({"meta": ..., "temperatures": {"τ": analyse_temperature}}), markov.md, the npz
    files and (plots=True) the PNGs; return the paths written. The files an earlier report wrote in out_dir that this
    one does not write (npz of other temperatures, PNGs after plots=False) are deleted; the names of the files
    written are recorded in out_dir/.duat-outputs.json (_files.remove_stale_outputs), other files stay."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, symbols=list(chain.symbols), token_ids=list(chain.token_ids or ()), context=chain.context,
                bos_id=chain.bos_id, num_states=chain.num_states,
                state_order="base-T index, x_1 most significant, symbols in the order given")
    json_path, md_path = out / "markov.json", out / "markov.md"
    per_tau = {temperature_label(r["temperature"]): r for r in results}
    json_path.write_text(strict_json.dumps({"meta": meta, "temperatures": per_tau}, indent=1))
    write_markdown(results, meta, md_path)
    paths = [json_path, md_path, *chain.save(out)]
    if plots:
        paths += plot(results, out, f"{meta['model']}, K={chain.context}, T={chain.num_symbols}")
    # an earlier report's npz of other temperatures and PNGs (after --no-plot) sat next to a markov.json that no
    # longer described them; only files an earlier duat markov recorded are touched, the cache and other files stay
    remove_stale_outputs(out, "duat markov", paths)
    return paths
