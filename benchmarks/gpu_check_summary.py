"""gpu_check.sh's summary: the parts' records merged into ``gpu_check.json`` (the format of issue
18) and ``gpu_check.md`` (tables and the target ratios) under the output folder. Standard library
only, so that it runs in a moment after every part.

    python -m benchmarks.gpu_check_summary --work DIR --out DIR
"""

import argparse
import datetime
import json
import re
import statistics
from pathlib import Path
from typing import Any

from util.atomic import atomic_write

PARTS = ("env", "tests", "cifar", "step", "loader", "e2e")
TABLES = {
    "step": (
        *("model", "impl", "variant", "input_size", "batch"),
        *("img_s", "img_s_min", "img_s_max", "mfu", "peak_mem_gib"),
    ),
    "loader": ("loader", "workers", "input_size", "batch", "img_s", "cpu_fallbacks"),
    "e2e": ("model", "pipeline", "workers", "img_s", "data_wait", "cpu_fallbacks"),
}


def read_part(work: Path, part: str) -> dict[str, Any] | None:
    path = work / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def part_errors(work: Path, part: str, record: dict | None) -> list[str]:
    """The part's own errors, and how it ended where it ended badly (the driver writes ``<part>.rc``)."""
    errors = list(record["errors"]) if record else []
    rc_file = work / f"{part}.rc"
    rc = rc_file.read_text().strip() if rc_file.is_file() else None
    if rc in ("124", "137"):
        errors.append(f"{part}: timed out (status {rc}); the rows it had measured are kept")
    elif rc == "skipped":
        errors.append(f"{part}: not run, no time left in the check's budget")
    elif rc not in (None, "0") and not errors:
        errors.append(f"{part}: exited with status {rc} (see gpu_check.log)")
    return errors


def summarize(work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary (exactly the issue's keys) and the extra readings the Markdown shows (``study``: the
    CIFAR-10 study's lines)."""
    records = {part: read_part(work, part) for part in PARTS}
    values = {k: v for r in records.values() if r for k, v in r["values"].items()}
    versions = dict(values.get("versions", {}))
    for key in ("gpu", "gpu_memory_gib"):  # every part records the GPU: a rerun of one part without env too
        if key in values:
            versions.setdefault(key, values[key])
    for key in ("clocks_idle", "clocks_after_matmul", "copy_gb_s", "decode_jpeg_list_on_device"):
        if key in values:
            versions[key] = values[key]
    summary = {
        "versions": versions,
        "matmul_tflops": values.get("matmul_tflops"),
        "cuda_tests": values.get("cuda_tests", {"passed": 0, "failed": 0}),
        "step": [],
        "loader": [],
        "e2e": [],
        "errors": [e for part in PARTS for e in part_errors(work, part, records[part])],
    }
    for record in records.values():
        for table, rows in (record or {}).get("rows", {}).items():
            summary[table] += rows
    return summary, {**values, "study": study_lines(records["cifar"])}


def result_stem(versions: dict[str, Any]) -> str:
    """The stem to commit this run's gpu_check.json and .md under, in benchmarks/results/: the GPU's model as the
    device named it (``NVIDIA H100 80GB HBM3``: h100, ``NVIDIA H200``: h200; cpu at toy sizes) and the run's date
    (today's where env did not run), so that an H100's figures are never filed as an H200's."""
    name = versions.get("gpu")
    if not name:
        kind = "cpu"
    else:  # the model number (H100, A100-SXM4: a100), else the whole name as a slug
        found = re.search(r"\b[A-Z]{1,3}\d{2,4}\b", name)
        kind = found.group().lower() if found else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    date = versions.get("date") or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return f"{kind}-{date}"


def _median_rate(rows: list[dict], **match: Any) -> float | None:
    rates = [r["img_s"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return statistics.median(rates) if rates else None


def targets(summary: dict[str, Any]) -> list[str]:
    """The issue's targets for ViT-B/16, as far as the rows allow."""
    step, lines = summary["step"], []
    e2e = [r for r in summary["e2e"] if r["model"] == "mae_vit_base_patch16"]
    base = [r for r in step if r["model"] == "mae_vit_base_patch16" and not r.get("variant")]
    compiled = next((r for r in base if r["impl"] == "ours_compiled"), None)
    if compiled and compiled["mfu"] is not None:
        lines.append(f"ours compiled: {compiled['mfu']:.1%} MFU (target >= 40%)")
    eager, shipped = _median_rate(base, impl="ours_eager"), _median_rate(base, impl="official_as_shipped")
    if eager and shipped:
        lines.append(f"ours eager / official as shipped: {eager / shipped:.2f}x (target >= 1.3x)")
    best = max((r["img_s"] for r in e2e if r["pipeline"].startswith("ours")), default=None)
    official = _median_rate(e2e, pipeline="official")
    if best and official:
        lines.append(f"end to end, best of ours / official pipeline: {best / official:.2f}x (target >= 2x)")
    if best and compiled:
        lines.append(f"end to end, best of ours / our compiled step: {best / compiled['img_s']:.0%} (target >= 90%)")
    return lines


def study_lines(cifar: dict[str, Any] | None) -> list[str]:
    """What recipes/cifar10_gpu (issue 19) plans with, from the cifar part's rows: its pre-training step's
    MFU against the matmul rate measured in the same run (plan.py assumed 15%), the memory loader and the
    step it feeds against the step alone, the fine-tuning step."""
    rows = (cifar or {}).get("rows", {})
    step, lines = rows.get("step", []), []
    pretrain = {r["impl"]: r for r in step if r.get("variant") != "fine-tuning"}
    for impl, r in sorted(pretrain.items()):
        # The bf16 matmul rate measured in this run, on this GPU: plan.py's default 790 is what both kinds the
        # device tool lends measured once, this run's own is the one its MFU divides by.
        peak = r["tflops"] / r["mfu"]
        lines.append(
            f"{r['model']} {impl}: {r['img_s']:,.0f} img/s, {r['tflops']:.1f} TFLOP/s, {r['mfu']:.1%} MFU of the "
            f"{peak:.4g} measured here (plan.py assumes 15%): python recipes/cifar10_gpu/plan.py --model {r['model']} "
            f"--mfu {r['mfu']:.3f} --peak_tflops {peak:.4g}"
        )
    memory = _median_rate(rows.get("loader", []), loader="memory")
    compiled = pretrain.get("ours_compiled")
    if memory and compiled:
        lines.append(f"memory loader alone: {memory:,.0f} img/s, {memory / compiled['img_s']:.1f}x the compiled step")
    for pipeline, impl in (("ours_memory", "ours_compiled"), ("ours_memory_eager", "ours_eager")):
        fed, alone = _median_rate(rows.get("e2e", []), pipeline=pipeline), pretrain.get(impl)
        if fed and alone:
            share = fed / alone["img_s"]
            lines.append(f"{impl} step fed by the memory loader: {fed:,.0f} img/s, {share:.0%} of the step alone")
    for r in step:
        if r.get("variant") == "fine-tuning":
            lines.append(f"{r['model']} fine-tuning {r['impl']}: {r['img_s']:,.0f} img/s, {r['mfu']:.1%} MFU")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return "" if value is None else str(value)


def markdown(summary: dict[str, Any], values: dict[str, Any]) -> str:
    stem = result_stem(summary["versions"])
    lines = [
        "# gpu_check",
        "",
        f"Commit as benchmarks/results/{stem}.json and .md (timings compare within one GPU).",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in summary["versions"].items()]
    lines += [f"- matmul_tflops: {_cell(summary['matmul_tflops'])}", f"- cuda_tests: {summary['cuda_tests']}"]
    if "cuda_tests_skipped" in values:
        lines.append(f"- cuda tests skipped: {values['cuda_tests_skipped']}")
    lines += [f"- {k}: {v}" for k, v in values.items() if k.startswith("loss_check")]
    for table, columns in TABLES.items():
        lines += ["", f"## {table}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in summary[table]]
    lines += ["", "## targets (ViT-B/16)", ""] + [f"- {t}" for t in targets(summary)]
    lines += ["", "## the CIFAR-10 study (recipes/cifar10_gpu)", ""] + [f"- {t}" for t in values["study"]]
    lines += ["", "## errors", ""] + [f"- {e}" for e in summary["errors"] or ["none"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("gpu_check summary")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--print", action="store_true", help="print the Markdown too")
    args = p.parse_args(argv)
    summary, values = summarize(args.work)
    text = markdown(summary, values)
    atomic_write(str(args.out / "gpu_check.json"), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    atomic_write(str(args.out / "gpu_check.md"), lambda f: f.write(text.encode()))
    if args.print:
        print(text)
        print(f"commit them as benchmarks/results/{result_stem(summary['versions'])}.json and .md")


if __name__ == "__main__":
    main()
