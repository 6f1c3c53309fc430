"""bench.py as CI runs it (--quick on the CPU): it finishes and prints a row for each pipeline.
The numbers depend on the machine and are printed, not asserted."""

import json
import platform
import re
import sys

from conftest import make_mnist, run_script

NUMBER = r"\d+(\.\d+)?"


def test_quick_bench_prints_every_pipeline(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=512, n_test=8)  # MNIST's own IDX format
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--quick", "--device", "cpu", "--data-dir", data, "--json", out, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("(a) this repo", "(b) original tutorial", "(c) torchvision vgg16"):
        assert re.search(rf"^{re.escape(row)}.* {NUMBER} +{NUMBER}x +{NUMBER} [MG]iB +{NUMBER} +{NUMBER}$",
                         proc.stdout, re.M), row
    assert re.search(rf"^fp32 matmul 2048x2048: {NUMBER} ", proc.stdout, re.M)
    assert "width/4" in proc.stdout and "mnist under" in proc.stdout  # says what was measured
    results = json.loads(out.read_text())
    assert [r["pipeline"] for r in results["pipelines"]] == ["a", "b", "c"]
    assert all(r["images_per_s"] > 0 and r["flops_per_image"] > 0 for r in results["pipelines"])
    # The ratio column against images/s recomputed from the step times (batch 64 / median step):
    # a ratio printed upside down would make a speed-up look like a slow-down.
    import statistics
    speed = {r["pipeline"]: 64 / statistics.median(r["step_seconds"]) for r in results["pipelines"]}
    for r in results["pipelines"]:
        ratio = speed[r["pipeline"]] / speed["b"]
        assert abs(r["ratio_to_original"] - ratio) < 1e-9 * ratio
        row = re.search(rf"^\({r['pipeline']}\) .* ({NUMBER})x ", proc.stdout, re.M)
        assert abs(float(row.group(1)) - ratio) < 0.006, (row.group(0), ratio)
    # Each pipeline in a process of its own, with the allocator settings its own script would have:
    # train.py's (keep the memory a step frees, Linux with glibc) for (a) only.
    pipelines = results["pipelines"]
    assert len({r["process_id"] for r in pipelines}) == 3
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert [r["freed_memory_kept"] for r in pipelines] == [glibc, False, False]
    # The same architecture in all three, so the same FLOPs per image.
    assert len({r["flops_per_image"] for r in pipelines}) == 1


def test_missing_dataset_falls_back_to_synthetic_with_quick(tmp_path):
    proc = run_script("bench.py", "--quick", "--device", "cpu", "--data-dir", tmp_path / "nothing",
                      "--width-div", "16", "--warmup", "0", "--steps", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^data: synthetic uint8 images of MNIST shape, because mnist not found", proc.stdout, re.M)
    assert proc.stdout.count("img/s") == 1 and "(c) torchvision vgg16" in proc.stdout


def test_user_errors_are_one_line(tmp_path):
    for args, message in [
        (["--data-dir", tmp_path / "nothing"], "mnist not found under"),  # no synthetic fallback without --quick
        (["--image-size", "16"], "--image-size must be from 32"),
        (["--width-div", "3"], "--width-div must be one of 1, 2, 4"),
        (["--dataset", "imagenet"], "invalid choice"),
        (["--device", "tpu"], "unknown device"),
    ]:
        proc = run_script("bench.py", "--device", "cpu", *args, timeout=120)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_a_mistake_found_in_a_pipelines_process_is_one_line(tmp_path):
    """Each pipeline runs in a process of its own; a UserError raised there reaches the user as one line too."""
    data = make_mnist(tmp_path / "data", n_train=256, n_test=8)  # 4 batches of 64
    proc = run_script("bench.py", "--quick", "--device", "cpu", "--data-dir", data, "--steps", "5", timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr == ("bench.py: error: the training split holds only 4 full batches of 64; "
                           "lower --steps, --warmup or --batch-size\n"), proc.stderr
