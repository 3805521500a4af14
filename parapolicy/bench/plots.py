"""The bench's figures: latency vs batch, latency vs Picard window, denoiser cost vs K."""

from __future__ import annotations

from pathlib import Path


def _log2_ticks(ax, values) -> None:
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(list(values), [str(v) for v in values])


def make_plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sampler_rows = result["samplers"]
    if sampler_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(r["label"] for r in sampler_rows):
            mine = sorted((r for r in sampler_rows if r["label"] == label), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in mine], [r["latency_ms"]["p50"] for r in mine], marker="o", label=label)
        ax.set(xlabel="batch (observation histories per call)", ylabel="p50 latency per call [ms]",
               title="latency vs batch", yscale="log")
        _log2_ticks(ax, sorted({r["batch"] for r in sampler_rows}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "latency_vs_batch.png", dpi=110)
        plt.close(fig)
        written.append("latency_vs_batch.png")

    window_rows = [r for r in result["windows"] if r["window"] is not None]
    if window_rows:
        window_rows.sort(key=lambda r: r["window"])
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in dict.fromkeys((r["fast_path"], (r["options"] or {}).get("tolerance")) for r in window_rows):
            mine = [r for r in window_rows if (r["fast_path"], (r["options"] or {}).get("tolerance")) == key]
            ax.plot([r["window"] for r in mine], [r["latency_ms"]["p50"] for r in mine], marker="o",
                    label=f"{mine[0]['sampler']}{' fast' if key[0] == 'on' else ''} tol {key[1]} p50")
        twins = {r["label"]: r for r in result["windows"]}
        for label in dict.fromkeys(r["twin"] for r in window_rows if r["twin"]):
            ax.axhline(twins[label]["latency_ms"]["p50"], color="gray",
                       linestyle="--" if twins[label]["fast_path"] == "off" else ":", label=f"{label} p50")
        first = (window_rows[0]["fast_path"], (window_rows[0]["options"] or {}).get("tolerance"))
        window_rows = [r for r in window_rows if (r["fast_path"], (r["options"] or {}).get("tolerance")) == first]
        ax2 = ax.twinx()
        ax2.plot([r["window"] for r in window_rows], [r["rounds_mean"] for r in window_rows], color="tab:green",
                 marker="x", linestyle=":", label="rounds")
        ax2.set_ylabel("rounds (sequential model calls)")
        ax.set(xlabel="window p", ylabel="p50 latency per call [ms]", title="latency vs Picard window (batch 1)")
        _log2_ticks(ax, [r["window"] for r in window_rows])
        ax.grid(alpha=0.3)
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = ax2.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "latency_vs_window.png", dpi=110)
        plt.close(fig)
        written.append("latency_vs_window.png")

    den = result["denoiser"]
    if den:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in dict.fromkeys((r["network"], r["batch"], r["fast_path"]) for r in den):
            mine = sorted((r for r in den if (r["network"], r["batch"], r["fast_path"]) == key), key=lambda r: r["k"])
            ax.plot([r["k"] for r in mine], [r["latency_ms"]["p50"] for r in mine], marker="o",
                    linestyle="-" if key[2] == "off" else "--",
                    label=f"{key[0]} ({mine[0]['num_parameters'] / 1e6:.1f}M), batch {key[1]}"
                          f"{', fast path' if key[2] == 'on' else ''}")
        ax.set(xlabel="K (stacked timesteps per call)", ylabel="p50 latency per denoise call [ms]",
               title="denoiser cost vs K", yscale="log")
        _log2_ticks(ax, sorted({r["k"] for r in den}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "denoiser_vs_k.png", dpi=110)
        plt.close(fig)
        written.append("denoiser_vs_k.png")
    return written

