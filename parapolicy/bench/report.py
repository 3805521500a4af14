"""Text tables of a bench result (what the CLI prints)."""

from __future__ import annotations


def format_table(rows: list[dict]) -> str:
    header = (f"{'sampler':<24} {'steps':>5} {'batch':>5} {'rounds':>7} {'evals':>7} {'p50 ms':>9} "
              f"{'p95 ms':>9} {'model ms':>9} {'twin':<16} {'speedup':>8} {'vs best':>8} {'max dev':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lat = row["latency_ms"]
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
        honest = f"{row['speedup_vs_fastest_twin']:.2f}x" if row.get("speedup_vs_fastest_twin") else "-"
        dev = f"{row['deviation_vs_twin']['max']:.1e}" if row["deviation_vs_twin"] else "-"
        model = f"{row['predicted_ms']:.1f}" if row.get("predicted_ms") is not None else "-"
        lines.append(f"{row['label']:<24} {row['steps']:>5} {row['batch']:>5} "
                     f"{row['rounds_mean']:>7.1f} {row['model_evals_mean']:>7.1f} {lat['p50']:>9.2f} "
                     f"{lat['p95']:>9.2f} {model:>9} {row['twin'] or '-':<16} {speedup:>8} {honest:>8} {dev:>8}")
    return "\n".join(lines)


def format_headline(items: list[dict]) -> str:
    lines = []
    for h in items:
        where = f"window {h['window']}, " if h["window"] is not None else ""
        eager = f"{h['eager_speedup']:.2f}x" if h["eager_speedup"] is not None else "-"
        model = f"{h['predicted_speedup']:.2f}x" if h.get("predicted_speedup") else "-"
        lines.append(f"{h['sampler']} ({where}batch {h['batch']}): {h['best']} {h['best_p50_ms']:.1f} ms vs fastest "
                     f"twin {h['fastest_twin']} {h['fastest_twin_p50_ms']:.1f} ms: {h['speedup']:.2f}x "
                     f"(eager vs eager {eager}; model {model})")
    return "\n".join(lines)


def format_denoiser_table(rows: list[dict]) -> str:
    header = (f"{'network':<11} {'params':>9} {'fast':>4} {'backend':>8} {'batch':>5} {'K':>4} {'rows':>5} "
              f"{'p50 ms':>9} {'ms/eval':>9} {'gain':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['network']:<11} {row['num_parameters'] / 1e6:>8.1f}M {row['fast_path']:>4} "
                     f"{row['backend'] or '-':>8} {row['batch']:>5} {row['k']:>4} "
                     f"{row['rows']:>5} {row['latency_ms']['p50']:>9.3f} {row['per_eval_ms']:>9.3f} "
                     f"{row['throughput_gain']:>6.2f}x")
    return "\n".join(lines)

