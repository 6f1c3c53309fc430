"""Data-parallel training: train.py launched by torchrun with 2 CPU processes (gloo) on a small on-disk MNIST.

The training set has 257 images, an odd number, so one process's shard is one image longer than the
other's: both must still take the same number of steps. A small launcher runs train.py in each process
and records, from the outside, the shards each process trained on and the weights it ended with.
"""

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import devices
import imagedata
import net
import train
from conftest import ROOT, TINY, csv_rows, load, make_folder, make_mnist, run_script, weight_differences

N_TRAIN, N_TEST = 257, 101
# A constant schedule does not depend on the number of epochs, so 1 epoch + --resume --epochs 2 can be
# compared with 2 straight epochs.
# No validation split: the shards must cover all N_TRAIN images (the split itself is seeded, not ranked:
# tests/test_validation.py).
RUN = [*TINY, "--epochs", "2", "--schedule", "constant", "--val-fraction", "0"]
# The repo's own source files: a traceback through any of them means a user saw more than one line.
OURS = sorted(p.name for p in ROOT.glob("*.py"))

LAUNCHER = """
import json, os, sys
import torch
sys.path.insert(0, {root!r})
import imagedata, train

rank, out = os.environ["RANK"], {out!r}
shards, batches = [], []
collectives = set()  # "name:dtype" of every tensor train.py hands to torch.distributed

def recorded(name):
    real = getattr(torch.distributed, name)
    def collective(*args, **kwargs):
        for a in args:
            for t in (a if isinstance(a, list) else [a]):
                if isinstance(t, torch.Tensor):
                    collectives.add(f"{{name}}:{{t.dtype}}")
        return real(*args, **kwargs)
    setattr(torch.distributed, name, collective)

for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter"):
    recorded(name)

nan_at = int(os.environ.get("NAN_ON_RANK_1_AT_STEP", 0))
real_cross_entropy, training_calls = torch.nn.functional.cross_entropy, [0]

def cross_entropy(logits, *args, **kwargs):
    loss = real_cross_entropy(logits, *args, **kwargs)
    if logits.requires_grad and rank == "1":
        training_calls[0] += 1
        if training_calls[0] == nan_at:
            loss = loss * float("nan")
    return loss

torch.nn.functional.cross_entropy = cross_entropy

def shard_indices(n, seed, epoch, rank=0, world=1, labels=None):
    idx = real_shard(n, seed, epoch, rank, world, labels)
    shards.append({{"epoch": epoch, "world": world, "indices": idx.tolist()}})
    return idx

def split_batches(indices, batch_size, steps=None):
    parts = real_split(indices, batch_size, steps)
    if steps is not None:  # training batches (evaluation passes no steps)
        batches.append([len(p) for p in parts])
    return parts

real_shard, real_split = imagedata.shard_indices, imagedata.split_batches
imagedata.shard_indices, imagedata.split_batches = shard_indices, split_batches
sys.argv = ["train.py", *sys.argv[1:]]
state, results = train.run()
torch.save({{k: v.clone() for k, v in state.model.state_dict().items()}}, f"{{out}}/weights{{rank}}.pt")
if state.average is not None:
    torch.save(state.average.module.state_dict(), f"{{out}}/average{{rank}}.pt")
with open(f"{{out}}/record{{rank}}.json", "w") as f:
    json.dump({{"shards": shards, "batches": batches, "result": results["test"],
               "collectives": sorted(collectives)}}, f)
"""


def torchrun(tmp: Path, *args, nproc: int = 2, record: bool = True, env=None, script: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Launch train.py (through the recording launcher when `record`, or `script`) on `nproc` CPU processes."""
    if script is None and record:
        script = tmp / "launcher.py"
        script.write_text(LAUNCHER.format(root=str(ROOT), out=str(tmp)))
    script = script or ROOT / "train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two epochs on 2 processes, recorded."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_mnist(tmp / "data", n_train=N_TRAIN, n_test=N_TEST)
    proc = ok(torchrun(tmp, *RUN, "--data-dir", data, "--save-dir", tmp / "save"))
    records = [json.loads((tmp / f"record{r}.json").read_text()) for r in range(2)]
    return tmp, data, proc, records


def test_both_processes_end_with_identical_weights(ddp_run):
    tmp, _, _, _ = ddp_run
    w0, w1 = load(tmp / "weights0.pt"), load(tmp / "weights1.pt")
    assert not weight_differences(w0, w1)  # parameters and BatchNorm statistics
    initial = net.build_model(load(tmp / "save" / "last.pth")["config"], 10).state_dict()
    assert weight_differences(w0, initial)  # they trained


def test_shards_are_disjoint_cover_the_split_and_change_every_epoch(ddp_run):
    _, _, _, records = ddp_run
    per_epoch = []
    for epoch in range(2):
        s0, s1 = ([s["indices"] for s in rec["shards"] if s["epoch"] == epoch] for rec in records)
        assert len(s0) == len(s1) == 1 and records[0]["shards"][0]["world"] == 2
        s0, s1 = s0[0], s1[0]
        assert not set(s0) & set(s1)
        assert sorted(s0 + s1) == list(range(N_TRAIN))
        per_epoch.append((s0, s1))
    assert per_epoch[0][0] != per_epoch[1][0] and set(per_epoch[0][0]) != set(per_epoch[1][0])
    # 257 images = 129 + 128: the same 4 steps on both processes, the odd image in rank 0's last batch.
    assert records[0]["batches"] == [[32, 32, 32, 33]] * 2
    assert records[1]["batches"] == [[32, 32, 32, 32]] * 2


@pytest.mark.parametrize("n, world", [(257, 2), (100, 3), (7, 3), (64, 2)])
@pytest.mark.quick
def test_shards_and_steps_for_several_sizes(n, world):
    steps = imagedata.steps_per_epoch(n, 32, world)
    shards = [imagedata.shard_indices(n, 0, 5, r, world) for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    for shard in shards:
        parts = imagedata.split_batches(shard, 32, steps)
        assert len(parts) == steps and all(len(p) > 0 for p in parts)
        assert torch.equal(torch.cat(parts), shard)
    assert not torch.equal(shards[0], imagedata.shard_indices(n, 0, 6, 0, world))


def test_only_rank_0_reports_and_the_reduced_test_accuracy_covers_the_split_once(ddp_run):
    tmp, data, proc, records = ddp_run
    assert len(re.findall(r"^epoch 2/2: train loss", proc.stdout, re.M)) == 1
    assert "x 2 processes" in proc.stdout
    r0, r1 = records[0]["result"], records[1]["result"]
    assert r0 == r1  # after the all-reduce every process has the totals
    printed = float(re.search(r"^epoch 2/2: .*test loss [\d.]+ acc ([\d.]+)%", proc.stdout, re.M).group(1))
    assert printed == pytest.approx(100 * r0[1], abs=0.005)

    # One process, the saved checkpoint, the whole test split.
    ckpt = load(tmp / "save" / "last.pth")
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["world"] == 2 and ckpt["epoch"] == 2
    assert not weight_differences(ckpt["model"], load(tmp / "weights0.pt"))
    c = dict(ckpt["config"], data_dir=str(data))
    model = net.build_model(c, 10)
    model.load_state_dict(ckpt["model"])
    test_data = imagedata.load_split(c, False, torch.device("cpu"))
    # in the precision the run evaluated in (bf16 on a CPU with AMX or a Zen 4, else fp32)
    amp = devices.amp_dtype(torch.device("cpu"), c["amp"])
    loss, acc, _ = train.evaluate(model, test_data, 64, torch.device("cpu"), amp)
    assert acc == r0[1]  # correct / N_TEST: the same count of correct images
    assert loss == pytest.approx(r0[0], rel=1e-5 if amp is None else 1e-3)

    rows = csv_rows(tmp / "save" / "metrics.csv")
    assert len(rows) == 3 and float(rows[2][4]) == pytest.approx(r0[1], abs=1e-6)


def test_test_script_loads_the_checkpoint(ddp_run):
    tmp, data, _, _ = ddp_run
    proc = run_script("test.py", "--checkpoint", tmp / "save" / "last.pth", "--data-dir", data, "--device", "cpu",
                      "--grid", "0", check=True)
    assert re.search(r'^Predicted: "\d", Actual: "\d"$', proc.stdout, re.M)
    assert re.search(rf"test accuracy: \d+/{N_TEST} = [\d.]+%", proc.stdout)


def test_resume_under_torchrun_is_exact_and_a_single_process_can_continue(ddp_run, tmp_path):
    straight, data, _, _ = ddp_run
    save, single = tmp_path / "save", tmp_path / "single"
    # without the per-epoch test: rank 0 alone tests best.pth at the end, while the others finish
    first = ok(torchrun(tmp_path, *RUN, "--epochs", "1", "--no-test-every-epoch", "--data-dir", data,
                        "--save-dir", save, record=False))
    best = load(save / "best.pth")
    model = net.build_model(best["config"], 10)
    model.load_state_dict(best["model"])
    loss, acc, _ = train.evaluate(model, imagedata.load_split(best["config"], False, torch.device("cpu")), 64,
                               torch.device("cpu"), None)
    assert best["test_acc"] == pytest.approx(acc)
    assert re.findall(r"^best\.pth \(epoch 1\): test loss ([\d.]+) acc ([\d.]+)%$", first.stdout, re.M) == [
        (f"{loss:.4f}", f"{100 * acc:.2f}")]
    single.mkdir()
    for name in ("last.pth", "metrics.csv"):
        (single / name).write_bytes((save / name).read_bytes())

    ok(torchrun(tmp_path, *RUN, "--resume", "--data-dir", data, "--save-dir", save, record=False))
    resumed = load(save / "last.pth")
    assert resumed["epoch"] == 2
    assert not weight_differences(resumed["model"], load(straight / "save" / "last.pth")["model"])

    # The same 1-epoch checkpoint continued by one process: the schedule follows its step count
    # (8 steps an epoch instead of 4), and the rate is that of one process's batch again.
    proc = run_script("train.py", *RUN, "--resume", "--data-dir", data, "--save-dir", single, check=True)
    assert "had 2 process(es) and now has 1: the schedule is rescaled" in proc.stdout
    ckpt = load(single / "last.pth")
    assert ckpt["epoch"] == 2 and ckpt["world"] == 1
    assert ckpt["scheduler"]["last_epoch"] == 2 * imagedata.steps_per_epoch(N_TRAIN, 32)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05)  # LR x 1 process
    assert len(csv_rows(single / "metrics.csv")) == 3


def test_inconsistent_launches_are_one_line_errors(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=1, n_test=8)
    proc = torchrun(tmp_path, *TINY, "--val-fraction", "0", "--data-dir", data, "--save-dir", tmp_path / "save",
                    record=False)
    assert proc.returncode != 0
    assert "train.py: error: the training set has 1 images, fewer than the 2 processes" in proc.stderr
    proc = torchrun(tmp_path, *TINY, "--device", "cpu:0", "--data-dir", data, "--save-dir", tmp_path / "save",
                    record=False)
    assert proc.returncode != 0
    assert "train.py: error: --device cpu:0: under torchrun each process takes the device of its LOCAL_RANK" in proc.stderr
    for ours in OURS:  # torchrun reports the failure its way; ours is the one line
        assert f'File "{ROOT / ours}"' not in proc.stderr


def test_more_processes_than_gpus_on_a_node_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """What rank 1 of `torchrun --nproc_per_node=2` sees on a machine with one GPU (CUDA faked here,
    the check comes before any CUDA call)."""
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "--device", "cuda", "--save-dir", str(tmp_path / "save"),
                                      "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        train.run()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("train.py: error: torchrun started 2 processes on this node but it has 1 "
                                       "CUDA device(s): use --nproc_per_node=1\n")


# ------------------------------------------------------------------------ what an Ascend NPU run needs

def test_collectives_carry_no_float64(ddp_run):
    """HCCL (Ascend) all-reduces int8/16/32/64, fp16, fp32 and bf16 only: a float64 tensor handed to
    torch.distributed ends a run on NPUs after a whole epoch's work."""
    _, _, _, records = ddp_run
    for record in records:
        assert "all_reduce:torch.float32" in record["collectives"] and "broadcast:torch.float32" in record["collectives"]
        assert [c for c in record["collectives"] if "float64" in c] == []


def test_the_learning_rate_follows_the_global_batch(ddp_run):
    """LR is the rate for one process's batch: 2 processes step on twice as many images at twice the rate."""
    tmp, _, proc, _ = ddp_run
    assert "lr 0.1 (LR 0.05 x 2 processes), global batch 64" in proc.stdout
    ckpt = load(tmp / "save" / "last.pth")
    assert ckpt["config"]["lr"] == 0.05
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1)  # LR x 2, constant


def test_a_non_finite_loss_on_one_process_stops_all_of_them(tmp_path):
    """Rank 1's loss becomes NaN at step 4, a log step: rank 0's loss there is still finite (the NaN reaches
    its weights only through that step's gradient all-reduce). Both processes must report it in one line and
    end, instead of rank 0 going on alone into the next collective."""
    data = make_mnist(tmp_path / "data", n_train=N_TRAIN, n_test=8)
    proc = torchrun(tmp_path, *TINY, "--data-dir", data, "--save-dir", tmp_path / "save",
                    env={"NAN_ON_RANK_1_AT_STEP": "4"})
    assert proc.returncode != 0
    line = ("train.py: error: the loss became NaN or infinite at epoch 1, step 4; no checkpoint of this run "
            "was written")
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    for ours in OURS:
        assert f'File "{ROOT / ours}"' not in proc.stderr


# ------------------------------------------------------------------- SIGTERM to a whole torchrun job

def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the processes through Linux /proc")
def test_double_sigterm_with_dataloader_workers_saves_the_step_and_resume_is_exact(tmp_path):
    """As SLURM ends a job: SIGTERM to every process of the job, then torchrun forwards its own SIGTERM to
    each process group (train.py and its DataLoader workers). last.pth must hold the step reached in
    epoch 2, and --resume must continue exactly."""
    data = make_folder(tmp_path / "data", n_train=96, n_test=16)
    run = [*RUN, "--dataset", "folder", "--batch-size", "8", "--workers", "1", "--data-dir", data]
    # This small folder would be kept in memory: a memory share of 0 sends it through DataLoader workers.
    script = tmp_path / "dataloader_path.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv[0] = 'train.py'\n"
                      "import imagedata, train; imagedata.FOLDER_MEMORY_SHARE = 0.0; train.run()\n")
    ok(torchrun(tmp_path, *run, "--save-dir", tmp_path / "straight", script=script))

    save = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *map(str, run), "--save-dir", str(save)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (save / "epoch_001.pth").exists():  # epoch 2 is about to begin
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    ranks = children(proc.pid)
    assert len(ranks) == 2 and all(children(r) for r in ranks)  # each process has its DataLoader worker
    for r in ranks:
        os.kill(r, signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "stopped by SIGTERM at epoch 2, step" in err, err[-3000:]
    for ours in OURS:
        assert f'File "{ROOT / ours}"' not in err
    stopped = load(save / "last.pth")
    assert stopped["epoch"] == 1 and 0 < stopped["step"] < 6, (stopped["epoch"], stopped["step"])

    ok(torchrun(tmp_path, *run, "--resume", "--save-dir", save, script=script))
    assert not weight_differences(load(save / "last.pth")["model"], load(tmp_path / "straight" / "last.pth")["model"])


PER_RANK = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch, train
extra = {extra!r}.get(os.environ["RANK"], [])
kill_at = int(os.environ.get("KILL_RANK_1_AT_STEP", 0))
if kill_at and os.environ["RANK"] == "1":
    real, calls = torch.nn.functional.cross_entropy, [0]
    def cross_entropy(logits, *args, **kwargs):
        if logits.requires_grad:
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(logits, *args, **kwargs)
    torch.nn.functional.cross_entropy = cross_entropy
sys.argv = ["train.py", *sys.argv[1:], *extra]
train.run()
"""


def per_rank(tmp: Path, extra: dict) -> Path:
    script = tmp / "per_rank.py"
    script.write_text(PER_RANK.format(root=str(ROOT), extra=extra))
    return script


@pytest.mark.parametrize("extra,flag", [({"1": ["--lr", "0.1"]}, "--lr"),
                                        ({"1": ["--width-div", "8"]}, "--width-div")],
                         ids=["lr", "width-div"])
def test_processes_started_with_different_settings_are_one_line(extra, flag, tmp_path):
    data = make_mnist(tmp_path / "data", n_train=64, n_test=8)
    proc = torchrun(tmp_path, *TINY, "--data-dir", data, "--save-dir", tmp_path / "save",
                    script=per_rank(tmp_path, extra))
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if "train.py: error:" in l]
    assert len(lines) == 1 and flag in lines[0] and "process 1" in lines[0], proc.stderr[-3000:]
    for ours in OURS:
        assert f'File "{ROOT / ours}"' not in proc.stderr
    assert not (tmp_path / "save" / "last.pth").exists()


def test_a_process_killed_with_sigkill_leaves_the_others_one_line(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=N_TRAIN, n_test=8)
    proc = torchrun(tmp_path, *TINY, "--data-dir", data, "--save-dir", tmp_path / "save",
                    script=per_rank(tmp_path, {}), env={"KILL_RANK_1_AT_STEP": "3"})
    assert proc.returncode != 0
    for ours in OURS:  # torchrun reports the killed process its way; the survivor says one line
        assert f'File "{ROOT / ours}"' not in proc.stderr, proc.stderr[-4000:]


def test_a_fine_tune_under_torchrun_unfreezes_on_every_process(tmp_path):
    """--pretrained under torchrun: one process per machine reads the source first; DDP is rebuilt
    when the body unfreezes, so both processes train it alike and end with identical weights."""
    mnist = make_mnist(tmp_path / "mnist", n_train=64, n_test=8)
    run_script("train.py", *TINY, "--data-dir", mnist, "--save-dir", tmp_path / "source", check=True)
    photos = make_folder(tmp_path / "photos", n_train=32, n_test=6, classes=("cat", "dog"))
    ok(torchrun(tmp_path, *TINY, "--dataset", "folder", "--data-dir", photos, "--workers", "0",
                "--batch-size", "8", "--epochs", "2", "--val-fraction", "0",
                "--pretrained", tmp_path / "source" / "best.pth", "--save-dir", tmp_path / "save"))
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in range(2))
    assert not weight_differences(w0, w1)
    source = load(tmp_path / "source" / "best.pth")["model"]
    assert not torch.equal(w0["features.0.weight"], source["features.0.weight"])  # unfrozen, trained


def test_a_weight_average_under_torchrun_is_one_network_on_every_process(tmp_path):
    """EMA_DECAY under torchrun: each process averages its own weights and BatchNorm statistics; at the
    epoch's end rank 0's averaged statistics are broadcast with the model's, so every process
    evaluates, and rank 0 saves, the same averaged network."""
    data = make_mnist(tmp_path / "data", n_train=N_TRAIN, n_test=N_TEST)
    ok(torchrun(tmp_path, *TINY, "--ema-decay", "0.9", "--data-dir", data, "--save-dir", tmp_path / "save"))
    a0, a1 = (torch.load(tmp_path / f"average{r}.pt", weights_only=True) for r in range(2))
    assert not weight_differences(a0, a1)  # parameters and BatchNorm statistics
    assert not weight_differences(a0, load(tmp_path / "save" / "epoch_001.pth")["model"])
    assert weight_differences(a0, load(tmp_path / "weights0.pt"))  # the average, not the weights


def test_an_unreadable_pretrained_file_under_torchrun_is_one_line_and_no_abort(tmp_path):
    """Rank 0 says the one line, the other process exits quietly, and neither aborts in the process
    group's destructor ("terminate called without an active exception", SIGABRT): before the group
    was left on the way out, 9 launches of 20 aborted, so four launches here catch that about 10
    times in 11."""
    photos = make_folder(tmp_path / "d", n_train=8, n_test=4, classes=("a", "b"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    for _ in range(4):
        proc = torchrun(tmp_path, *TINY, "--dataset", "folder", "--workers", "0", "--data-dir", photos,
                        "--pretrained", bad, "--save-dir", tmp_path / "save", record=False)
        assert proc.returncode != 0
        assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.count("train.py: error:") == 1 and str(bad) in proc.stderr
        assert "exitcode: 2" in proc.stderr or "exitcode  : 2" in proc.stderr
        assert not (tmp_path / "save").exists()


@pytest.mark.quick
def test_leaving_the_group_frees_the_ddp_wrappers_before_destroying_it(tmp_path, monkeypatch):
    """A DDP wrapper sits in a reference cycle, so only a garbage collection frees it: left to
    the interpreter's teardown, it and gloo's work objects outlive the process group, and one run
    under torchrun -n 2 aborted there ("terminate called without an active exception") after it
    had saved. devices.leave_process_group frees them while the group is still up."""
    dist.init_process_group("gloo", init_method=(tmp_path / "group").as_uri(), rank=0, world_size=1)
    try:
        def one_step():  # as train.py's epochs(): the wrapper's last name goes with the function
            wrapped = DDP(torch.nn.Linear(4, 2))
            wrapped(torch.randn(3, 4)).sum().backward()
            return weakref.ref(wrapped)

        freed_when_destroyed = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: (
            freed_when_destroyed.append(wrapper() is None), destroy(*a, **k)))
        gc.disable()  # no collection by chance between the step and the leave
        try:
            wrapper = one_step()
            devices.leave_process_group()
        finally:
            gc.enable()
        assert freed_when_destroyed == [True]
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
