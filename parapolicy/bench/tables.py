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



def backend_comparison(fast_paths: dict) -> list[dict]:
    """Per fast mode and shape (``K<bucket>xB<batch>``, ``encoder B<batch>``): the backend picked, every
    candidate's p50 ms at warm-up (None: dropped, failed or not installed), and the winner's margin over
    eager and over the runner-up. ``fast_paths``: ``{mode: FastPath}``."""
    rows = []
    for mode, fast in fast_paths.items():
        for shape, picked in fast.stats.backends.items():
            times = dict(fast.stats.candidates_ms.get(shape, {}))
            timed = {n: v for n, v in times.items() if v is not None}
            others = sorted(v for n, v in timed.items() if n != picked)
            mine = timed.get(picked)
            rows.append({"mode": mode, "shape": shape, "backend": picked, "candidates_ms": times,
                         "vs_eager": timed["eager"] / mine if mine and "eager" in timed else None,
                         "vs_runner_up": others[0] / mine if mine and others else None,
                         "warmup_s": fast.stats.warmup_s.get(shape)})
    return rows


def format_backends(rows: list[dict]) -> str:
    names = list(dict.fromkeys(n for row in rows for n in row["candidates_ms"]))
    width = max([12] + [len(row["mode"]) for row in rows])
    header = f"{'mode':<{width}} {'shape':<11} {'picked':<12} " + " ".join(f"{n:>11}" for n in names) + \
        f" {'vs eager':>9} {'vs next':>8} {'warm-up s':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for n in names:
            value = row["candidates_ms"].get(n, "absent")
            cells.append(f"{'':>11}" if value == "absent" else f"{'-' if value is None else f'{value:.2f}':>11}")
        ratio = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        lines.append(f"{row['mode']:<{width}} {row['shape']:<11} {row['backend']:<12} " + " ".join(cells) +
                     f" {ratio(row['vs_eager']):>9} {ratio(row['vs_runner_up']):>8} {row['warmup_s'] or 0:>9.1f}")
    return "\n".join(lines)


def format_vs_eager(rows: list[dict]) -> str:
    """One line per fast-mode row: its p50 and the plain path's for the same sampler and batch."""
    lines = []
    for row in rows:
        if row.get("speedup_vs_eager") is None:
            continue
        lines.append(f"{row['label']:<28} batch {row['batch']}: {row['latency_ms']['p50']:9.1f} ms vs "
                     f"{row['latency_ms']['p50'] * row['speedup_vs_eager']:9.1f} ms eager: "
                     f"{row['speedup_vs_eager']:.2f}x")
    return "\n".join(lines)
