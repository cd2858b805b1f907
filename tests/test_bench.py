"""The benchmark harness's pure parts (stats, ratios, targets, markdown, docs update, plot) and a
tiny real L0/L1 run. No timing assertions: CI machines are too noisy for them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench import report
from bench.served import ServerConfig, _with_workers
from bench.stats import percentile, ratio, summarize


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(seed, n):
    values = [random.Random(seed).uniform(0, 100) for _ in range(n)]
    random.Random(seed + 10).shuffle(values)
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_throughput_from_wall_time_or_mean():
    concurrent = summarize([10.0, 20.0, 30.0, 40.0], wall_s=2.0)
    assert concurrent.throughput == pytest.approx(2.0)  # 4 images in 2 s
    assert concurrent.p50 == pytest.approx(25.0)
    sequential = summarize([10.0, 30.0])
    assert sequential.throughput == pytest.approx(50.0)  # 1000 ms / 20 ms mean
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0], wall_s=0)


def test_ratio_handles_missing_values():
    assert ratio(3.0, 2.0) == pytest.approx(1.5)
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_with_workers_sets_torchserve_keys():
    text = "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 20  # ms\nhandler:\n  conf: 0.25\n"
    out = _with_workers(text, ServerConfig(workers=2, batch_size=1, max_batch_delay_ms=5))
    assert "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 1\nmaxBatchDelay: 5\n" in out
    assert "handler:\n  conf: 0.25" in out
    assert "batchSize: 3" in _with_workers("responseTimeout: 120\n", ServerConfig(1, 3))


def _summary(p50: float, throughput: float | None = None) -> dict:
    return {"n": 3, "p50": p50, "p95": p50 * 1.2, "p99": p50 * 1.3, "mean": p50, "throughput": throughput}


def _served_row(system: str, workers: int, batch: int, conc: int, p50: float, rate: float) -> dict:
    return {"system": system, "workers": workers, "batch_size": batch, "concurrency": conc, **_summary(p50, rate),
            "cpu_percent": 150.0, "worker_rss_mb": 600.0}


@pytest.fixture
def fake_results() -> dict:
    """Two cores; config w1_b1 (L1 on 2 threads) and w2_b1 (1 thread); S/L1 = 1.2 on bus.jpg in w1_b1."""
    samples = {}
    for img, scale in (("bus.jpg", 1.0), ("zidane.jpg", 0.9)):
        samples |= {
            f"L0|2|{img}": _summary(80 * scale), f"L1|2|{img}": _summary(100 * scale),
            f"L0|1|{img}": _summary(120 * scale), f"L1|1|{img}": _summary(130 * scale),
            f"U|{img}": _summary(200 * scale),
            f"S|w1_b1|{img}": _summary(120 * scale), f"T|w1_b1|{img}": _summary(300 * scale),
            f"S|w2_b1|{img}": _summary(140 * scale), f"T|w2_b1|{img}": _summary(310 * scale),
        }
    served = [
        _served_row("S", 1, 1, 1, 120, 8.0), _served_row("T", 1, 1, 1, 300, 3.0),
        _served_row("S", 1, 1, 4, 300, 12.0), _served_row("T", 1, 1, 4, 900, 4.0),
        _served_row("S", 2, 1, 1, 140, 7.0), _served_row("T", 2, 1, 1, 310, 3.2),
    ]
    results = {
        "meta": {"command": "python -m bench --quick", "date": "2026-11-27 05:00 UTC", "quick": True,
                 "threads": {"U": 1}, "duration_s": 1.0,
                 "machine": {"cpu": "test cpu", "cores": 2, "memory_gb": 8.0, "cuda": None, "python": "3.11",
                             "torch": "2", "ultralytics": "8", "load_average_at_start": [0.1, 0.1, 0.1]}},
        "samples": samples,
        "stages_p50_ms": {"2|bus.jpg|decode": 5.0, "2|bus.jpg|json": 1.0, "2|bus.jpg|backbone": 70.0},
        "postprocess": [{"anchors": 8400, "image": "bus.jpg", "threads": 2, **_summary(2.5)},
                        {"anchors": 8400, "image": "bus.jpg", "threads": 1, **_summary(1.5)}],
        "served": served,
        "levers": {"JSON encoding": {"indent=2": {"1": 12.0, "2": 13.0}, "compact": {"1": 0.5, "2": 0.25}}},
        "gpu": {"skipped": "CUDA is not available"},
    }
    results["ratios"], results["targets"] = report.ratios_and_targets(results, cores=2)
    return results


def test_ratios_and_targets(fake_results):
    r = fake_results["ratios"]
    assert list(r) == ["w1_b1", "w2_b1"]
    assert r["w1_b1"]["threads"] == 2 and r["w2_b1"]["threads"] == 1
    assert r["w1_b1"]["S/L1"] == pytest.approx(1.2)
    assert r["w2_b1"]["S/L1"] == pytest.approx(140 / 130)  # against L1 on the worker's own thread count
    assert r["w1_b1"]["L1/L0"] == pytest.approx(1.25)
    assert r["w1_b1"]["S/U"] == pytest.approx(0.6)
    assert r["w1_b1"]["S-throughput/T-throughput"] == pytest.approx(3.0)  # best 12 over best 4
    t = {(x["target"], x["where"]): x for x in fake_results["targets"]}
    assert t[("S p50 / L1 p50 at concurrency 1", "bus.jpg, w1_b1")]["met"] is False
    # S/L1 and S/U on each benchmark image, not only bus.jpg
    assert t[("S p50 / L1 p50 at concurrency 1", "zidane.jpg, w1_b1")]["value"] == pytest.approx(108 / 90, abs=1e-3)
    assert t[("S p50 / U p50 at concurrency 1", "zidane.jpg, w1_b1")]["value"] == pytest.approx(108 / 180, abs=1e-3)
    best = t[("S p50 / L1 p50 at concurrency 1", "bus.jpg, w2_b1 (best configuration)")]
    assert best["value"] == pytest.approx(140 / 130, abs=1e-3) and best["met"] is True
    assert t[("L1 p50 - L0 p50", "bus.jpg, 2 thread(s)")]["value"] == pytest.approx(20.0)
    assert t[("L1 p50 - L0 p50", "bus.jpg, 1 thread(s)")]["value"] == pytest.approx(10.0)
    assert t[("L1 p50 - L0 p50", "bus.jpg, 2 thread(s)")]["met"] is False
    assert t[("L1 stages except the backbone (sum of p50s)", "bus.jpg, 2 thread(s)")]["value"] == pytest.approx(6.0)
    assert t[("L1 stages except the backbone (sum of p50s)", "bus.jpg, 1 thread(s)")]["value"] is None
    rate = t[("best T throughput / best S throughput", "S >= 1.5 x T means this <= 0.667")]
    assert rate["value"] == pytest.approx(4.0 / 12.0, abs=1e-3) and rate["met"] is True
    assert t[("S p50 / U p50 at concurrency 1", "bus.jpg, w1_b1")]["met"] is True
    assert ("S p50 / U p50 at concurrency 1", "bus.jpg, w2_b1 (best configuration)") not in t  # w1_b1 is already best
    assert t[("postprocessor p50", "8400 anchors, 2 thread(s)")]["met"] is False
    assert t[("postprocessor p50", "8400 anchors, 1 thread(s)")]["met"] is True


def test_render_markdown_has_every_section(fake_results):
    md = report.render_markdown(fake_results, plot_name="bench.png")
    assert "Command: `python -m bench --quick`" in md
    for heading in ("#### Targets", "#### In process", "#### L1 stages", "#### Served", "#### Concurrency 1, per image",
                    "#### Ratios per configuration", "#### Levers", "#### GPU"):
        assert heading in md, heading
    assert "| S p50 / L1 p50 at concurrency 1 | 1.200 x | 1.1 x | bus.jpg, w1_b1 | **no** |" in md
    assert "| S | 1 | 1 | 4 | 300.0 | 360.0 | 390.0 | 12.00 | 150 | 600 |" in md
    assert "Skipped: CUDA is not available." in md
    assert "| lever | alternative | 1 thread(s) | 2 thread(s) |" in md and "| JSON encoding | compact | 0.50 | 0.25 |" in md
    assert "![latency against concurrency](bench.png)" in md
    width = None  # every row of a table has as many cells as its header
    for line in md.splitlines():
        if not line.startswith("|"):
            width = None
        elif width is None:
            width = line.count("|")
        else:
            assert line.count("|") == width, line


def test_render_markdown_reads_the_older_single_thread_format(fake_results):
    """Results written before levers and the postprocessor were measured per thread count still render."""
    fake_results["postprocess"] = fake_results["postprocess"][0]
    fake_results["levers"] = {"JSON encoding": {"indent=2": 12.0}}
    fake_results["ratios"], fake_results["targets"] = report.ratios_and_targets(fake_results, cores=2)
    md = report.render_markdown(fake_results)
    assert "| lever | alternative | ms |" in md and "| JSON encoding | indent=2 | 12.00 |" in md
    assert [t["where"] for t in fake_results["targets"] if t["target"] == "postprocessor p50"] == ["8400 anchors, 2 thread(s)"]


def test_update_docs_replaces_only_the_generated_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## TorchScript vs AOTInductor\n\nother section\n")
    report.update_docs(doc, "first table")
    report.update_docs(doc, "second table")
    text = doc.read_text()
    assert text.count(report.DOCS_BEGIN) == 1 and text.count(report.DOCS_END) == 1
    assert "second table" in text and "first table" not in text
    assert "## TorchScript vs AOTInductor\n\nother section" in text and text.startswith("# Benchmarks\n\nintro")


def test_write_plot_writes_a_png(fake_results, tmp_path):
    path = tmp_path / "docs" / "bench.png"
    report.write_plot(fake_results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_real_l0_l1(pose_export, sample_images):
    """One real L0 and L1 call each: the harness's in-process paths run and the stages add up."""
    from bench.inprocess import BenchImage, InProcess, levers
    from handler.pipeline import YoloPipeline

    pipeline = YoloPipeline.from_dir(pose_export.out_dir)
    images = [BenchImage(p.name, p, p.read_bytes()) for p in sample_images[:1]]
    proc = InProcess(pipeline, None, images)
    assert proc.l0(images[0].name) > 0
    total, stages = proc.l1(images[0].name)
    assert set(stages) == {"preprocess", "backbone", "postprocess", "json"}
    assert all(v > 0 for v in stages.values()), stages  # each stage really measured (none is a remainder)
    # Timed independently of the total: together at most the total (0.01 ms rounding per stage), and they
    # account for most of it (the rest is the service's own bookkeeping), so a stage measured twice or
    # not at all fails here.
    assert sum(stages.values()) <= total + 0.03
    assert sum(stages.values()) >= 0.5 * total, (stages, total)
    feats, geometry, thresholds, anchors = proc.postprocess_inputs(images[0].name)
    assert anchors == 8400  # 640x640: 80*80 + 40*40 + 20*20
    assert proc.postprocess_once(feats, geometry, thresholds) > 0
    with pytest.raises(RuntimeError, match="weights"):
        proc.u(images[0].name)
    lev = levers(proc, images[0].name, rounds=1, thread_counts=[1])
    assert {"decode (JPEG)", "JSON encoding", "input conversion", "memory format (backbone)", "letterbox (backbone)"} <= set(lev)
    assert all(set(v) == {"1"} and v["1"] > 0 for alts in lev.values() for v in alts.values())


def test_in_process_only_results_render(fake_results, tmp_path):
    """``--no-served``: no served rows, so no ratios per configuration; targets 1, 3 and 4 have no value."""
    fake_results["served"] = []
    fake_results["samples"] = {k: v for k, v in fake_results["samples"].items() if not k.startswith(("S|", "T|"))}
    fake_results["ratios"], fake_results["targets"] = report.ratios_and_targets(fake_results, cores=2)
    assert fake_results["ratios"] == {}
    missing = {t["target"] for t in fake_results["targets"] if t["value"] is None}
    assert {"S p50 / L1 p50 at concurrency 1", "best T throughput / best S throughput", "S p50 / U p50 at concurrency 1"} <= missing
    md = report.render_markdown(fake_results)
    assert "#### Served" not in md and "#### In process" in md
    report.write_plot(fake_results, tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file()


def test_each_markdown_file_links_the_plot_from_where_it_is(fake_results, tmp_path):
    """The run outputs go to docs/measurements/, the page that shows them is docs/benchmarks.md: each file's
    image link must resolve from that file."""
    from argparse import Namespace

    from bench.__main__ import write_outputs

    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "benchmarks.md"
    page.write_text("# Benchmarks\n")
    args = Namespace(json=docs / "measurements" / "b.json", markdown=docs / "measurements" / "table.md",
                     plot=docs / "measurements" / "b.png", update_docs=page)
    write_outputs(args, fake_results)
    assert "![latency against concurrency](measurements/b.png)" in page.read_text()
    assert "![latency against concurrency](b.png)" in args.markdown.read_text()
