"""``hapo-verl compare`` on synthetic logs (verl's file-logger JSONL and TensorBoard event files written here)
and on the metrics.jsonl of a real CPU run (``hapo-verl tiny --steps 2``, one run for the module)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hapo_verl.tools.compare import compare, load_run, markdown_table, temperature_keys, validation_metrics

pytest.importorskip("matplotlib")

BENCHMARKS = ("aime24", "math500")


def synthetic_metrics(step: int, offset: float) -> dict:
    metrics = {
        "critic/score/mean": -0.5 + 0.1 * step + offset,
        "actor/entropy": 0.4 + 0.01 * step + offset,
        "response_length/mean": 1000.0 + 10 * step,
        "actor/pg_clipfrac": 0.01,
        "actor/pg_clipfrac_lower": 0.001,
        "hapo/rollout/temperature_mean": 1.0 + offset,
        "training/global_step": step,
    }
    return metrics


def validation(step: int, offset: float) -> dict:
    out = {}
    for index, source in enumerate(BENCHMARKS):
        out[f"val-core/{source}/acc/mean@8"] = 0.2 + 0.05 * step + index * 0.3 + offset
        out[f"val-aux/{source}/reward/mean@8"] = 0.0
        out[f"val-aux/{source}/acc/std@8"] = 0.1
    return out


def write_jsonl(path: Path, offset: float, steps=range(1, 6)) -> Path:
    """verl's FileLogger format; validation logged on its own line for the same step, as verl does."""
    with open(path, "w") as handle:
        for step in steps:
            handle.write(json.dumps({"step": step, "data": synthetic_metrics(step, offset)}) + "\n")
            if step % 2 == 0:
                handle.write(json.dumps({"step": step, "data": validation(step, offset)}) + "\n")
    return path


def write_tensorboard(directory: Path, offset: float, steps=range(1, 6)) -> Path:
    """What verl's tensorboard logger writes (torch.utils.tensorboard.SummaryWriter.add_scalar per metric)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    for step in steps:
        data = synthetic_metrics(step, offset)
        if step % 2 == 0:
            data.update(validation(step, offset))
        for key, value in data.items():
            writer.add_scalar(key, value, step)
    writer.close()
    return directory


def test_jsonl_and_tensorboard_give_the_same_run(tmp_path):
    jsonl = load_run(str(write_jsonl(tmp_path / "a.jsonl", 0.0)))
    tb = load_run(str(write_tensorboard(tmp_path / "tb", 0.0)))
    assert jsonl.label == "a" and tb.label == "tb"
    assert set(jsonl.metrics) == set(tb.metrics)
    for key, series in jsonl.metrics.items():
        assert tb.metrics[key] == pytest.approx(series, rel=1e-6), key
    assert validation_metrics(jsonl) == {s: f"val-core/{s}/acc/mean@8" for s in BENCHMARKS}


def test_compare_writes_plots_and_table_with_differences(tmp_path):
    base = write_jsonl(tmp_path / "dapo.jsonl", 0.0)
    other = write_tensorboard(tmp_path / "hapo_tb", 0.1)
    result = compare([f"DAPO={base}", f"HAPO={other}"], tmp_path / "out")
    names = {p.name for p in result["plots"]}
    assert names == {"training_reward.png", "validation_accuracy.png", "entropy.png", "response_length.png",
                     "clip_fraction.png", "temperature.png"}
    for path in result["plots"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result["summary"].read_text()
    assert "| `critic/score/mean` | HAPO | 5 | 0.1 | 0.1 | +0.1 | +0.1 |" in table
    assert "| `critic/score/mean` | DAPO | 5 | 0 | 0 | — | — |" in table
    # per benchmark (final = best = step 4) and their mean; entropy is descriptive (no "best")
    assert "| `val-core/math500/acc/mean@8` | HAPO | 4 | 0.8 | 0.8 | +0.1 | +0.1 |" in table
    assert "| `val/mean_over_benchmarks` | DAPO | 4 | 0.55 | 0.55 | — | — |" in table
    assert "| `actor/entropy` | HAPO | 5 | 0.55 | — | +0.1 | — |" in table
    assert "| `hapo/rollout/temperature_mean` | HAPO | 5 | 1.1 | — | +0.1 | — |" in table


def test_cli_directory_input_and_missing_metrics(tmp_path):
    run_dir = tmp_path / "runA"
    run_dir.mkdir()
    write_jsonl(run_dir / "metrics.jsonl", 0.0, steps=range(1, 3))
    write_tensorboard(run_dir / "tb", 0.0, steps=range(3, 5))  # a resumed run logging elsewhere: merged
    # a run without HAPO metrics (a DAPO run has no temperature series): plotted for the runs that have them
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"step": 1, "data": {"critic/score/mean": 0.3}}) + "\n" + '{"step": 2, "da')
    proc = subprocess.run([sys.executable, "-m", "hapo_verl.cli", "compare", str(run_dir), str(plain),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = load_run(str(run_dir))
    assert sorted(run.series("critic/score/mean")) == [1, 2, 3, 4]
    assert "| `critic/score/mean` | plain | 1 | 0.3 |" in proc.stdout
    assert (tmp_path / "out" / "temperature.png").exists()


def test_temperature_of_a_vllm_run_is_the_estimate(tmp_path):
    """vLLM reports no per-token temperature: the trainer's temperature_est_* series are plotted and tabled; a run
    with reported temperatures keeps them (the CPU rollout logs both)."""
    vllm_log = tmp_path / "vllm.jsonl"
    with open(vllm_log, "w") as handle:
        for step in range(1, 4):
            data = {"critic/score/mean": 0.1 * step}
            if step > 1:  # step 1's requests carry no statistics: no estimate
                data.update({"hapo/rollout/temperature_est_min": 0.95, "hapo/rollout/temperature_est_mean": 1.01,
                             "hapo/rollout/temperature_est_max": 1.05})
            handle.write(json.dumps({"step": step, "data": data}) + "\n")
    cpu_log = write_jsonl(tmp_path / "cpu.jsonl", 0.0)
    vllm, cpu = load_run(str(vllm_log)), load_run(str(cpu_log))
    assert temperature_keys(vllm) == tuple(f"hapo/rollout/temperature_est_{s}" for s in ("mean", "min", "max"))
    assert temperature_keys(cpu)[0] == "hapo/rollout/temperature_mean"
    result = compare([f"vllm={vllm_log}"], tmp_path / "out_vllm")
    assert "temperature.png" in {p.name for p in result["plots"]}
    assert "| `hapo/rollout/temperature_est_mean` | vllm | 3 | 1.01 | — | — | — |" in result["table"]
    both = compare([f"cpu={cpu_log}", f"vllm={vllm_log}"], tmp_path / "out_both")
    assert "temperature.png" in {p.name for p in both["plots"]}
    assert "| `hapo/rollout/temperature_mean` | cpu | 5 | 1 |" in both["table"]
    # a run without any temperature (DAPO) gets no temperature plot
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"step": 1, "data": {"critic/score/mean": 0.3}}) + "\n")
    assert temperature_keys(load_run(str(plain))) == ()
    assert "temperature.png" not in {p.name for p in compare([str(plain)], tmp_path / "out_plain")["plots"]}


def test_bad_input_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"metric": 1}) + "\n")
    with pytest.raises(ValueError, match="not a verl file-logger record"):
        load_run(str(bad))
    with pytest.raises(FileNotFoundError):
        load_run(str(tmp_path / "missing.jsonl"))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One real run: ``hapo-verl tiny --steps 2`` with validation at step 2 (verl's file logger -> metrics.jsonl)."""
    from cpu_run_utils import run_verl

    out = tmp_path_factory.mktemp("tiny_run")
    result = run_verl(["tiny", "--steps", "2", "--out", str(out), "trainer.test_freq=2"], module="hapo_verl.cli",
                      timeout=900)
    assert result.rc == 0, result.tail()
    metrics = out / "hapo" / "metrics.jsonl"
    assert metrics.is_file(), result.tail()
    return metrics


def test_compare_on_a_cpu_run(cpu_run, tmp_path):
    run = load_run(str(cpu_run))
    assert {1, 2} <= set(run.series("critic/score/mean"))
    assert run.series("hapo/rollout/temperature_mean")
    # the CPU rollout reports per-token temperatures and the trainer estimates them too (step 2: statistics sent)
    assert run.series("hapo/rollout/temperature_est_mean")
    assert temperature_keys(run)[0] == "hapo/rollout/temperature_mean"
    # the same log twice: every difference is zero
    result = compare([f"first={cpu_run}", f"second={cpu_run}"], tmp_path / "out")
    names = {p.name for p in result["plots"]}
    assert {"training_reward.png", "entropy.png", "response_length.png", "clip_fraction.png",
            "temperature.png"} <= names
    if validation_metrics(run):  # verl logs val-core/<data_source>/... at test_freq
        assert "validation_accuracy.png" in names
    rows = [line for line in result["table"].splitlines() if "| second |" in line]
    assert rows and all("| +0 |" in line for line in rows)
    assert markdown_table([run]).count("\n") >= 6


def test_every_registered_algorithms_own_metrics_get_a_figure(tmp_path):
    """A registered algorithm's loss metrics (actor/<name>/*) and estimator metrics (<name>/*) are plotted without
    edits to compare; other prefixes (verl's actor/perf/*) are not."""
    from hapo_verl.tools.compare import algorithm_metric_keys

    log = tmp_path / "algo.jsonl"
    with open(log, "w") as handle:
        for step in range(1, 4):
            handle.write(json.dumps({"step": step, "data": {
                "critic/score/mean": 0.1 * step, "actor/archer/high_entropy_frac": 0.2,
                "edge_grpo/some_metric": 0.5 * step, "actor/perf/max_memory_allocated_gb": 1.0,
                "hapo/rollout/temperature_mean": 1.0, "hapo/stats/pivot": 0.3}}) + "\n")
    run = load_run(str(log))
    assert algorithm_metric_keys([run]) == {"archer": ["actor/archer/high_entropy_frac"],
                                            "edge_grpo": ["edge_grpo/some_metric"],
                                            "hapo": ["hapo/stats/pivot"]}
    plots = {p.name for p in compare([f"a={log}"], tmp_path / "out")["plots"]}
    assert {"algorithm_archer.png", "algorithm_edge_grpo.png", "algorithm_hapo.png"} <= plots
    assert not any("perf" in name for name in plots)
