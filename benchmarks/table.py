"""The benchmark tables of docs/benchmarks.md, from a bench.json written by `python -m benchmarks`.

    python -m benchmarks.table bench.json
"""

import json
import sys

from transformers import HfArgumentParser

from evaluation.report import markdown_table


def _f(value, digits=2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def targets_table(report: dict) -> list[str]:
    rows = []
    for key, target in report["targets"].items():
        met = {True: "yes", False: "no", None: "n/a"}[target["met"]]
        note = f" ({target['note']})" if target.get("note") else ""
        rows.append((f"`{key}`", _f(target["value"]), f">= {target['goal']}", met + note))
    return [markdown_table(("goal", "value", "target", "met"), rows)]


def train_table(report: dict) -> list[str]:
    header = ("preset", "parameters NanoVLM / peer", "NanoVLM samples/s", "peer samples/s", "speedup", "GFLOP a step NanoVLM / peer",
              "GFLOP/s NanoVLM / peer", "peak RSS NanoVLM / peer (MB)")
    rows = []
    for name, runs in report["train"].items():
        nano, peer = runs["as_user_runs_it"]["nanovlm"], runs["as_user_runs_it"]["peer"]
        counts = report["parameters"][name]
        rows.append((name, f"{counts['nanovlm'] / 1e6:.2f}M / {counts['peer'] / 1e6:.2f}M", _f(nano["samples_per_s"], 1),
                     _f(peer["samples_per_s"], 1), f"{_f(nano['samples_per_s'] / peer['samples_per_s'])}x",
                     f"{nano['flops_per_step'] / 1e9:,.1f} / {peer['flops_per_step'] / 1e9:,.1f}",
                     f"{nano['achieved_gflops']:,.0f} / {peer['achieved_gflops']:,.0f}",
                     f"{nano['peak_rss_mb']:,.0f} / {peer['peak_rss_mb']:,.0f}"))
    return [markdown_table(header, rows)]


def generate_table(report: dict) -> list[str]:
    nano, peer = report["generate"]["nanovlm"], report["generate"]["peer"]
    keys = [k for k in nano if k.startswith("batch_")]
    rows = []
    for key in keys:
        _, batch, _, tokens = key.split("_")
        a, b = nano[key]["captions_per_s"], peer[key]["captions_per_s"]
        rows.append((f"{batch}, {tokens}", _f(a, 1), _f(b, 1), f"{_f(a / b)}x"))
    return [markdown_table(("batch, new tokens", "NanoVLM captions/s", "peer captions/s", "speedup"), rows)]


def other_lines(report: dict) -> list[str]:
    cache, mfu, peak = report["cache"], report["mfu"], report["matmul_peak"]
    fp32 = mfu["fp32_train"]
    if report["mfu_bf16"] is not None:
        bf16 = f"{mfu['bf16_achieved_gflops']:.1f} GFLOP/s, MFU {report['mfu_bf16']:.2f} (bf16 matmul peak {peak['bf16_gflops']:.1f} GFLOP/s)"
    else:
        bf16 = f"{mfu['bf16_train']} (bf16 matmul peak {peak['bf16_gflops']:.1f} GFLOP/s)"
    lines = [
        (f"- Cache: {cache['new_tokens']} new tokens at batch {cache['batch_size']}: {cache['cached_seconds']:.3f} s with the"
         f" KV cache, {cache['uncached_seconds']:.3f} s without ({report['cache_speedup']:.1f}x, identical tokens)."),
        (f"- MFU ({mfu['preset']}, batch {mfu['batch_size']}, {mfu['flops_per_step'] / 1e9:.1f} GFLOP a step): fp32"
         f" {report['mfu_fp32']:.2f}, the median over the runs of FLOP/s over the matmul peak measured right after the run"
         f" ({', '.join(f'{m:.2f}' for m in fp32['mfu_repeats'])}); the fastest run, {mfu['fp32_achieved_gflops']:.0f}"
         f" GFLOP/s, is {mfu['fp32_vs_run_start_peak']:.2f} of the {peak['fp32_gflops']:.0f} GFLOP/s measured at the start;"
         f" bf16 autocast {bf16}."),
    ]
    if checkpointing := report.get("gradient_checkpointing"):  # (reports before it was measured have none)
        off, on, memory = checkpointing["off"], checkpointing["on"], checkpointing["memory"]
        lines.append(f"- Gradient checkpointing ({checkpointing['preset']}, batch {checkpointing['batch_size']}): {memory} "
                     f"{off[memory]:,.0f} MB without, {on[memory]:,.0f} MB with ({checkpointing['peak_saving_mb']:,.0f} MB saved), "
                     f"{checkpointing['slowdown']:.2f}x the step time.")
    processor = report.get("processor", {})
    if "images_per_s" in processor:
        lines.append(f"- Processor: {processor['images_per_s']:.0f} Flickr8k JPEGs/s (decode, resize, normalize), "
                     f"{report['data_to_train_ratio']:.1f}x NanoVLM's training samples/s.")
    summary = report["time_to_quality"]["summary"]
    for key, name in (("object_recall", "object recall"), ("eval_loss", "validation loss")):
        s = summary[key]
        lines.append(
            f"- Time to quality ({name}): the peer ends at {_f(s['peer_final'], 3)} after {_f(s['peer_total_seconds'], 0)} s of"
            f" training (first reached at {_f(s['peer_seconds'], 0)} s); NanoVLM reaches it after {_f(s['nanovlm_seconds'], 0)} s"
            f" ({_f(s['speedup'])}x; {_f(s['speedup_vs_peer_first_reach'])}x against the peer's first reach) and ends at"
            f" {_f(s['nanovlm_final'], 3)}."
        )
    return lines


def markdown(report: dict) -> str:
    machine, git = report["machine"], report["git"]
    head = (f"{report['date']}, {machine['cpu']} ({machine['threads']} threads, {machine['device']}), commit "
            f"{(git['commit'] or '?')[:7]}{' (dirty)' if git['dirty'] else ''}, torch {report['versions']['torch']}, "
            f"transformers {report['versions']['transformers']}")
    parts = [head, "", *targets_table(report), "", *train_table(report), "", *generate_table(report), "", *other_lines(report)]
    return "\n".join(parts)


def read_report(path: str) -> dict:
    """The bench.json at `path`; `ValueError` naming it when it is missing, not JSON or not a benchmark report."""
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass the bench.json that python -m benchmarks wrote") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not a JSON file ({err}); pass the bench.json that python -m benchmarks wrote") from None
    if not isinstance(report, dict) or "targets" not in report:
        raise ValueError(f"{path} is not a benchmark report (no 'targets'); pass the bench.json that python -m benchmarks wrote")
    return report


def main(argv=None):
    parser = HfArgumentParser((), description=__doc__.splitlines()[0])
    parser.add_argument("report", help="bench.json, written by python -m benchmarks")
    path = parser.parse_args(argv).report
    report = read_report(path)
    try:
        print(markdown(report))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} lacks {err} or holds it in another form: a report of another "
                         "version of python -m benchmarks? Rerun it") from None


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"python -m benchmarks.table: error: {err}")
