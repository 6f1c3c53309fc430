"""Shared fixtures: small datasets written in torchvision's real on-disk formats, and a way to run the scripts."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist (README's `-n 2`) the workers share the cores: each worker, and every script it
# starts, gets its share of OpenMP threads, since more threads than cores slow a CPU step several times.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

import numpy as np  # noqa: E402  (after OMP_NUM_THREADS: OpenMP and OpenBLAS read it once)
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("DATA_DIR", ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: runs in seconds, no training run (python -m pytest -m quick tests)")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as in the MNIST distribution: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def digit_images(labels: np.ndarray, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Learnable 28x28 'digits': class k is a bright bar at a class-specific position, plus noise."""
    images = rng.integers(0, 40, (len(labels), size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        row = 2 + int(k) * 2
        images[i, row:row + 3, 4:24] = 200 + rng.integers(0, 55)
        if k % 2:
            images[i, 4:24, row:row + 2] = 255
    return images


def make_mnist(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0, folder: str = "MNIST") -> Path:
    """Write MNIST-format IDX files under root/folder/raw, as torchvision.datasets.MNIST reads them."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", digit_images(labels, rng))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def make_cifar(root: Path, n_per_batch: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """Write CIFAR-10 python-format batches (pickled dicts of 3072-byte rows) under root/cifar-10-batches-py.

    torchvision checks each file's MD5 against the official one; tests that load these must patch
    that check (see cifar_ok below)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n):
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        for i, k in enumerate(labels):  # a class-dependent colour patch, so it is learnable
            data[i, k % 3, 4 + k:12 + k, 4:28] = 255
        return {"data": data.reshape(n, 3072), "labels": labels.tolist()}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return root


def make_folder(root: Path, n_train: int = 60, n_test: int = 30, classes=("cat", "dog", "ship"), seed: int = 0) -> Path:
    """Your own images as the `folder` dataset expects them: root/{train,test}/CLASS/*.png, in mixed
    sizes and modes (RGB, grey, RGBA), each class a learnable colour patch on noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % len(classes)
            h, w = rng.integers(24, 64, 2)
            img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            img[h // 4:h // 2, :, k % 3] = 255
            folder = root / split / classes[k]
            folder.mkdir(parents=True, exist_ok=True)
            mode = ("RGB", "L", "RGBA")[i % 3]
            Image.fromarray(img).convert(mode).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def cifar_ok(monkeypatch):
    """Let torchvision's CIFAR10 accept the hand-made batches (their MD5s cannot match the official ones)."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    return make_mnist(tmp_path / "data")


# Small, fast settings for the scripts: a VGG16 at 1/16 width on 32 px images.
TINY = ["--image-size", "32", "--width-div", "16", "--batch-size", "32", "--epochs", "1", "--device", "cpu",
        "--log-every", "2", "--lr", "0.05"]


def load_script(script: str, name: str):
    """A script of the repo imported as a fresh module under `name`, by path (`import test` could
    find the standard library's package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def csv_rows(path) -> list[list[str]]:
    """A CSV file the repo wrote (metrics.csv, mistakes.csv, predictions.csv), header first, read
    as a spreadsheet or pandas would: every cell is quoted."""
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def load(path) -> dict:
    """A checkpoint, loaded as test.py and train.py load it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def weight_differences(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ between two state dicts, or are in only one of them."""
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]


def run_script(script: str, *args, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run train.py / test.py / bench.py as a user would, from the repo root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_train_in_process(monkeypatch, *args):
    """train.run() as `python train.py ARGS` runs it, in this process; returns what it returns (the final
    training state and the last epoch's results)."""
    import train
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])
    return train.run()


# ---------------------------------------------------- fixtures of the test files about training runs

@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"), n_train=1024, n_test=128)


@pytest.fixture(scope="session")
def run_dir(data, tmp_path_factory):
    """A finished 1-epoch run, copied for each test that needs one."""
    save = tmp_path_factory.mktemp("run")
    run_script("train.py", *TINY, "--data-dir", data, "--save-dir", save, check=True)
    return save


@pytest.fixture
def saved(run_dir, tmp_path):
    copy = tmp_path / "save"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture(scope="session")
def test_script():
    """test.py's main() as `python test.py` runs it (a UserError becomes exit code 2)."""
    import cli
    module = load_script("test.py", "test_script")
    return lambda: cli.run_main(module.main)


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """64 training images: 2 steps an epoch at TINY's batch size, for tests that only need a run to happen."""
    return make_mnist(tmp_path_factory.mktemp("small"), n_train=64, n_test=32)
