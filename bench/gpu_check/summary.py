"""The markdown summary of a (possibly partial) run's results: a header line, then one part per section."""

from __future__ import annotations

import json
from typing import Any, Callable

from bench.gpu_check import FP16_MAX_DSCORE, FP16_MIN_IOU, JSON_FILE


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _md_artifacts(a: dict) -> list[str]:
    lines = ["## Files exported with torch " + str((a["manifest"].get("versions") or {}).get("torch")), ""]
    for name, status in a["models"].items():
        lines.append(f"- {name}: " + "; ".join(f"`{f}` {s}" for f, s in status.items()))
    if a.get("hash_mismatch"):
        lines.append(f"- hash mismatch: {a['hash_mismatch']}")
    return lines


def _md_tests(t: dict) -> list[str]:
    c = t.get("counts", {})
    lines = ["## CUDA suite", "", f"`{t['command']}`: exit {t['exit']}, {c.get('tests', '?')} tests, {c.get('failures', '?')} failures, "
             f"{c.get('errors', '?')} errors, {c.get('skipped', '?')} skipped, {t['seconds']} s", ""]
    lines += [f"- FAILED {f['name']}: {f['message'][:200]}" for f in t.get("failed", [])]
    if t.get("passed_cuda"):
        lines.append(f"- CUDA cases passed: {len(t['passed_cuda'])}")
    if t.get("skip_reasons"):
        lines.append(f"- skip reasons: {'; '.join(t['skip_reasons'])}")
    return lines


def _md_letterbox(lb: dict) -> list[str]:
    lines = ["## Letterbox pixels against the reference machine's OpenCV", "",
             "| image | OpenCV here | torch on device | torch == OpenCV here |", "|---|---|---|---|"]
    for name, v in lb.items():
        lines.append(f"| {name} | {_fmt(v['opencv_here_equals_reference'])} | {_fmt(v['torch_on_device_equals_reference'])} | "
                     f"{_fmt(v['torch_on_device_equals_opencv_here'])} |")
    return lines


def _md_fp32(f32: dict) -> list[str]:
    crit = f32.get("criteria") or {"tolerance": f32.get("tolerance")}
    lines = [f"## FP32 on the device against the CPU reference ({', '.join(f'{k} {v}' for k, v in crit.items())}): "
             f"{'PASS' if f32['pass'] else 'FAIL'}", "",
             "| model | variant | image | ref | other | matched | max abs diff (dp) | pass |", "|---|---|---|---|---|---|---|---|"]
    for name, m in f32["models"].items():
        for variant, per in m["vs_cpu_reference"].items():
            for image, c in per.items():
                if image == "pass":
                    continue
                if m["kind"] == "rows":
                    lines.append(f"| {name} | {variant} | {image} | {c['ref']} | {c['other']} | {c['matched']} | {_fmt(c['max_abs_diff'])} | {_fmt(per['pass'])} |")
                else:
                    lines.append(f"| {name} | {variant} | {image} | top-{c['k']} | same ids {_fmt(c['same_ids'])} | {c['common']} | {_fmt(c['max_dp'])} | {_fmt(per['pass'])} |")
        if m.get("device_preprocess_bit_exact") is not None:
            lines.append(f"| {name} | preprocess device == cpu, bit for bit | all | | | | | {_fmt(m['device_preprocess_bit_exact'])} |")
    return lines


def _md_fp16(f16: dict) -> list[str]:
    lines = [f"## FP16 against FP32 (matched IoU >= {FP16_MIN_IOU}, |dscore| <= {FP16_MAX_DSCORE}): {'PASS' if f16['pass'] else 'FAIL'}", "",
             "| model | image | fp32 | fp16 | matched | min IoU | max abs dscore (dp) | max abs d keypoint | pass |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in f16["models"].items():
        for image, c in m["vs_fp32"].items():
            if m["kind"] == "rows":
                lines.append(f"| {name} | {image} | {c['ref']} | {c['other']} | {c['matched']} | {_fmt(c['min_iou'], 4)} | {_fmt(c['max_dscore'])} | "
                             f"{_fmt(c['max_abs_diff_extra'])} | {_fmt(m['pass'])} |")
            else:
                lines.append(f"| {name} | {image} | top-{c['k']} | same ids {_fmt(c['same_ids'])} | {c['common']} | | {_fmt(c['max_dp'])} | | {_fmt(m['pass'])} |")
        for image, c in m.get("vs_cpu_reference", {}).items():
            if m["kind"] == "rows":
                lines.append(f"| {name} vs CPU reference | {image} | {c['ref']} | {c['other']} | {c['matched']} | {_fmt(c['min_iou'], 4)} | "
                             f"{_fmt(c['max_dscore'])} | {_fmt(c['max_abs_diff_extra'])} | {_fmt(m['pass_vs_cpu_reference'])} |")
            else:
                lines.append(f"| {name} vs CPU reference | {image} | top-{c['k']} | same ids {_fmt(c['same_ids'])} | {c['common']} | | "
                             f"{_fmt(c['max_dp'])} | | {_fmt(m['pass_vs_cpu_reference'])} |")
    return lines


def _md_gpu_decode(gd: dict) -> list[str]:
    lines = ["## Decode on the device (nvJPEG) against OpenCV", "", f"decoder: `{gd['decoder']}`", "",
             "| image | max abs px | mean abs px | pixels differing | detections (cv / gpu / matched) | min IoU | max abs dscore |", "|---|---|---|---|---|---|---|"]
    for name, p in gd["pixels"].items():
        d = gd["detections_vs_opencv_decode"][name]
        lines.append(f"| {name} | {_fmt(p.get('max_abs'))} | {_fmt(p.get('mean_abs'))} | {_fmt(p.get('fraction_differing'))} | "
                     f"{d['ref']} / {d['other']} / {d['matched']} | {_fmt(d['min_iou'], 4)} | {_fmt(d['max_dscore'])} |")
    return lines


def _md_throughput(tp: dict) -> list[str]:
    if not tp.get("rows"):
        return ["## Throughput", "", "no rows measured"]
    modes = [m for m in ("cpu", "device", "gpu_decode") if f"L1_{m}_images_per_s" in tp["rows"][0]]
    lines = [f"## Throughput ({tp['image']}, images/s; peak MiB)", "",
             "| precision | batch | L0 | L0 peak | " + " | ".join(f"L1 {m}" for m in modes) + " | " + " | ".join(f"L1 {m} peak" for m in modes) + " |",
             "|---|---|---|---|" + "---|" * (2 * len(modes))]
    for row in tp["rows"]:
        lines.append(f"| {row['precision']} | {row['batch']} | {_fmt(row['L0_images_per_s'])} | {_fmt(row['L0_peak_mib'])} | "
                     + " | ".join(_fmt(row[f"L1_{m}_images_per_s"]) for m in modes) + " | "
                     + " | ".join(_fmt(row[f"L1_{m}_peak_mib"]) for m in modes) + " |")
    lines.append("")
    if tp.get("L1_over_L0_batch32"):
        q = tp["L1_over_L0_batch32"]
        lines += [f"L1/L0 at batch 32 {q['precision']} (target >= {q['target']}): " + ", ".join(f"{m} {q[m]}" for m in modes), ""]
    for row in tp.get("large", []):
        lines.append(f"- {row['image']} batch {row['batch']} {row['precision']}: " + ", ".join(
            f"L1 {m} {_fmt(row[f'L1_{m}_images_per_s'])} img/s (peak {_fmt(row[f'L1_{m}_peak_mib'])} MiB)" for m in modes))
    if tp.get("cut_short"):
        lines.append(f"- not measured (time budget): {', '.join(tp['cut_short'])}")
    return lines


def _md_gpu_id(g: dict) -> list[str]:
    lines = ["## gpu_id", ""]
    for key, v in g.items():
        if isinstance(v, dict):
            brief = {k: v[k] for k in ("device", "param_devices", "allocated_mib_by_device", "nvidia_smi_this_process", "error", "ts_stubbed") if k in v}
            lines.append(f"- {key}: `{json.dumps(brief)}`")
        else:
            lines.append(f"- {key}: {_fmt(v)}")
    return lines


def _md_batch_delay(bd: dict) -> list[str]:
    lines = ["## maxBatchDelay, from the in-process L1 times", "", bd["rule"], ""]
    for key, v in bd.items():
        if isinstance(v, dict):
            per = ", ".join(f"B{p['batch']} {p['ms']} ms ({p['ms_per_image']}/img)" for p in v["per_batch"])
            lines.append(f"- {key}: batch-1 L1 {v['batch1_ms']} ms -> maxBatchDelay <= {v['suggested_max_batch_delay_ms']} ms; {per}")
    return lines


def _md_overlap(ov: dict) -> list[str]:
    lines = [f"## Overlap on and off ({ov['groups']} input shapes per batch, {ov['precision']})", "",
             "| preprocess | batch | on ms | off ms | off / on |", "|---|---|---|---|---|"]
    lines += [f"| {r['preprocess']} | {r['batch']} | {r['on_ms']} | {r['off_ms']} | {r['off_over_on']} |" for r in ov["rows"]]
    return lines


def _md_executor(ex: dict) -> list[str]:
    lines = ["## TorchScript's graph executor on CUDA: optimising (torch's default) against not", ""]
    for mode, v in ex.items():
        if "error" in v:
            lines.append(f"- {mode}: ERROR `{v['error'][:300]}`")
            continue
        worst = max((c["max_abs_diff"] or 0.0) for c in v["fp32_vs_cpu_reference"].values())
        lines.append(f"- {mode}: first backbone calls (4 shapes) {v['first_calls_ms']} ms; steady {v['steady_ms']} ms; "
                     f"L1 first calls {v['l1_first_calls_ms']} ms; L1 steady {v['l1_steady_ms']} ms; FP32 vs CPU max abs {_fmt(worst)}")
    return lines


def _md_compiled(c: dict) -> list[str]:
    lines = [f"## Compiled backbones ({c['image']}, {c['precision']}, backbone only)", "",
             "| batch | TorchScript ms | CUDA graph ms | speedup | replay vs eager max abs |", "|---|---|---|---|---|"]
    graphs = c.get("cuda_graphs", [])
    if isinstance(graphs, dict):
        lines.append(f"| CUDA graphs: ERROR `{graphs['error'][:300]}` | | | | |")
    else:
        lines += [f"| {r['batch']} | {r['torchscript_ms']} | {r['graph_ms']} | {r['speedup']} | {_fmt(r['replay_equals_eager_max_abs'])} |"
                  for r in graphs]
    if isinstance(c.get("aoti"), dict):
        return lines + ["", f"AOTInductor: {c['aoti'].get('skipped') or 'ERROR ' + c['aoti'].get('error', '')[:500]}"]
    lines += ["", f"AOTInductor compile: {c.get('aoti_compile_s')} s", "",
              "| batch | TorchScript ms | AOTInductor ms | speedup | raw max abs diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['torchscript_ms']} | {r['aoti_ms']} | {r['speedup']} | {_fmt(r['raw_max_abs_diff'])} |" for r in c.get("rows", [])]
    for image, d in c.get("detections_vs_torchscript_fp16", {}).items():
        lines.append(f"- {image}: {d['ref']} / {d['other']} / {d['matched']} matched, min IoU {_fmt(d['min_iou'], 4)}, "
                     f"max abs dscore {_fmt(d['max_dscore'])}")
    return lines


_MD: dict[str, Callable[[dict], list[str]]] = {
    "artifacts": _md_artifacts, "tests": _md_tests, "letterbox": _md_letterbox, "fp32": _md_fp32, "fp16": _md_fp16,
    "gpu_decode": _md_gpu_decode, "throughput": _md_throughput, "gpu_id": _md_gpu_id, "batch_delay": _md_batch_delay,
    "overlap": _md_overlap, "compiled": _md_compiled, "executor": _md_executor,
}


def summary(r: dict) -> str:
    """The markdown of a (possibly partial) result: a header line, then one part per section."""
    env = r.get("environment", {})
    lines = ["# GPU check", "",
             f"{env.get('date', '?')} · {env.get('gpu', env.get('device', '?'))} · driver {env.get('driver', '–')} · "
             f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '–')}, cuDNN {env.get('cudnn', '–')}) · "
             f"torchvision {env.get('torchvision', '–')} · OpenCV {env.get('opencv', '?')} · {env.get('cpus', '?')} CPUs", ""]
    for name, render in _MD.items():
        section = r.get(name)
        if section is None:
            continue
        if "error" in section:
            lines += [f"## {name}: ERROR", "", f"`{section['error'][:500]}`", ""]
        elif isinstance(section.get("skipped"), str):
            lines += [f"## {name}: skipped", "", section["skipped"], ""]
        else:
            try:
                lines += render(section) + [""]
            except Exception as e:  # noqa: BLE001 - the JSON has it all; the summary must still be written
                lines += [f"## {name}", "", f"(could not render: {type(e).__name__}: {e}; see {JSON_FILE})", ""]
    seconds = r.get("seconds")
    if seconds:
        lines += ["Section times (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()), ""]
    return "\n".join(lines)
