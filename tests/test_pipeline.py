"""The device-side data pipeline (imagedata.DeviceImages) against torchvision's transforms, its augmentation,
the DataLoader path of the folder dataset, and mixed-precision training, on small datasets written in
MNIST's and CIFAR-10's real on-disk formats and as image files."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

import devices
import imagedata
from conftest import REAL_DATA, make_cifar, make_folder, make_mnist
from net import vgg

CPU = torch.device("cpu")
N = 16  # samples compared per case


def config(dataset: str, root, image_size: int) -> dict:
    return {"dataset": dataset, "data_dir": str(root), "image_size": image_size, "workers": 0}


def reference(dataset: str, root, image_size: int) -> torch.Tensor:
    """The first N training images through torchvision's own dataset class and PIL transforms."""
    mean, std = imagedata.DATASETS[dataset].stats
    steps = [transforms.Resize((image_size, image_size))]
    if dataset == "mnist":
        steps.append(transforms.Grayscale(num_output_channels=3))
        mean, std = mean * 3, std * 3
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[dataset]
    ds = cls(str(root), train=True, transform=transforms.Compose(steps), download=False)
    return torch.stack([ds[i][0] for i in range(N)])


def tolerance(dataset: str, image_size: int, stored: int) -> float:
    """Largest allowed |ours - torchvision| after Normalize.

    No resize: both paths compute (x / 255 - mean) / std in float32, so only float rounding differs.
    With a resize, PIL resamples an 8-bit image in two 1-D passes and rounds to uint8 after each, while
    DeviceImages interpolates in float32. The first rounding (<= 0.5 grey level) goes through the second
    pass, whose bilinear weights are >= 0 and sum to 1, so it stays <= 0.5; the final rounding adds
    <= 0.5: at most 1 grey level (1/255 in [0, 1]), which Normalize divides by std. The bound is reached
    (measured: max 1.0 level, mean 0.3), so 1% is added for PIL's fixed-point weights."""
    if image_size == stored:
        return 1e-5
    return 1.01 / 255 / min(imagedata.DATASETS[dataset].stats[1])


@pytest.mark.parametrize("image_size", [32, 64, 224])
def test_mnist_matches_torchvision_transforms(tmp_path, image_size):
    root = make_mnist(tmp_path / "data", n_train=N, n_test=8)
    data = imagedata.load_split(config("mnist", root, image_size), True, CPU)
    ours = data.preprocess(data.images[:N])
    theirs = reference("mnist", root, image_size)
    assert ours.shape == theirs.shape == (N, 3, image_size, image_size)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    diff = (ours - theirs).abs()
    assert diff.max() <= tolerance("mnist", image_size, 28), diff.max()
    assert diff.mean() < 0.5 / 255 / imagedata.DATASETS["mnist"].stats[1][0]  # most pixels agree to within rounding


@pytest.mark.parametrize("image_size", [32, 64, 224])
def test_cifar_matches_torchvision_transforms(tmp_path, cifar_ok, image_size):
    root = make_cifar(tmp_path / "data", n_per_batch=N, n_test=8)
    data = imagedata.load_split(config("cifar10", root, image_size), True, CPU)
    ours = data.preprocess(data.images[:N])
    theirs = reference("cifar10", root, image_size)
    assert ours.shape == theirs.shape == (N, 3, image_size, image_size)
    diff = (ours - theirs).abs()
    assert diff.max() <= tolerance("cifar10", image_size, 32), diff.max()
    assert diff.mean() < 0.5 / 255 / min(imagedata.DATASETS["cifar10"].stats[1])


# ------------------------------------------------------------------------------------------ augmentation

def crops(x: torch.Tensor, pad: int) -> dict:
    """Every (dy, dx, flip) view of one normalized image (C, h, w): a crop of the zero-padded image
    (zero before normalization, as torchvision's RandomCrop(padding=pad) pads the PIL image), then an
    optional horizontal flip, as RandomCrop + RandomHorizontalFlip produce."""
    _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    return {(dy, dx, flip): TF.hflip(view) if flip else view
            for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for flip in (False, True)
            for view in [TF.crop(padded, dy, dx, h, w)]}


def known_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n copies of one random 3x32x32 image (no two of its crops alike), as uint8 and in [0, 1]."""
    image = torch.randint(1, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = image.expand(n, -1, -1, -1).contiguous()
    return image, image.float() / 255


def device_images(images: torch.Tensor, image_size: int = 32) -> imagedata.DeviceImages:
    mean, std = imagedata.DATASETS["cifar10"].stats
    return imagedata.DeviceImages(images, torch.zeros(len(images), dtype=torch.long), ["x"], mean, std,
                               image_size, CPU)


@pytest.mark.quick
def test_augmentation_is_a_flipped_shifted_crop_of_the_padded_image():
    images, unit = known_images(64)
    data = device_images(images)
    out = data.preprocess(images, augment=True, generator=torch.Generator().manual_seed(0))
    plain = data.preprocess(images)
    assert out.shape == plain.shape == (64, 3, 32, 32)
    # Expected views, built from the unnormalized image and normalized the way torchvision's Normalize does.
    views = {k: (v - data.mean[0]) / data.std[0] for k, v in crops(unit[0], data.pad).items()}
    found = []
    for i in range(len(out)):
        match = [k for k, v in views.items() if torch.allclose(out[i], v, atol=1e-5)]
        assert len(match) == 1, f"image {i} is not exactly one crop/flip of the padded original"
        found.append(match[0])
    # With 64 draws, both flips and several offsets occur, and at least one image is changed.
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in found}) > 10
    assert any(k != (data.pad, data.pad, False) for k in found)
    assert not torch.equal(out, plain)


@pytest.mark.quick
def test_flip_and_shift_move_a_known_pixel():
    """One bright pixel at (row 10, col 5) of a dark 32x32 image: after a crop at offset (dy, dx) of the
    4-pixel padded image it is at (10 + 4 - dy, 5 + 4 - dx), and a flip mirrors the column."""
    images = torch.zeros(256, 1, 32, 32, dtype=torch.uint8)
    images[:, 0, 10, 5] = 255
    data = imagedata.DeviceImages(images, torch.zeros(256, dtype=torch.long), ["x"], (0.0,), (1.0,), 32, CPU)
    out = data.preprocess(images, augment=True, generator=torch.Generator().manual_seed(1))
    assert out.shape == (256, 3, 32, 32)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    rows, cols = [], []
    for img in out[:, 0]:
        ys, xs = torch.nonzero(img == 1.0, as_tuple=True)
        assert len(ys) == 1 and img.sum() == 1.0  # the pixel moved, nothing else appeared
        rows.append(int(ys))
        cols.append(int(xs))
    assert set(rows) == set(range(10 - 4, 10 + 5))                # every vertical shift in [-4, 4]
    unflipped = set(range(5 - 4, 5 + 5))                          # columns 1..9
    flipped = {31 - c for c in unflipped}                         # columns 22..30
    assert set(cols) <= unflipped | flipped
    assert set(cols) & unflipped and set(cols) & flipped


def test_digits_are_shifted_but_never_mirrored(tmp_path):
    """--augment on for MNIST: random shifts only (a mirrored 2 or 7 is no digit); Fashion-MNIST
    (a mirrored shirt is a shirt) and CIFAR-10 are also flipped."""
    root = make_mnist(tmp_path / "data", n_train=64, n_test=8)
    c = {"dataset": "mnist", "data_dir": str(root), "image_size": 32}
    data = imagedata.load_split(c, True, CPU)
    assert not data.flip
    images = torch.zeros(256, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 10, 5] = 255
    data.images = images
    out = data.preprocess(images, augment=True, generator=torch.Generator().manual_seed(1))
    cols = {int(torch.nonzero(img[0] == img[0].max(), as_tuple=True)[1][0]) for img in out}
    assert max(cols) < 16 and len(cols) > 4  # shifted around its column, never mirrored to the right half
    assert device_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).flip
    assert imagedata.DATASETS["fashion-mnist"].flips and not imagedata.DATASETS["mnist"].flips


def itself_or_mirror(out: torch.Tensor, plain: torch.Tensor) -> list[str]:
    """Per image: "itself", "mirror" (its left-right mirror image) or "other"."""
    return ["itself" if torch.allclose(o, p, atol=1e-5) else
            "mirror" if torch.allclose(o, p.flip(-1), atol=1e-5) else "other" for o, p in zip(out, plain)]


def test_shift_0_mirrors_the_training_images_and_never_shifts_them(tmp_path, monkeypatch):
    """--shift 0 (the Fashion-MNIST recipe: docs/recipes.md, f14): each training image is itself or its
    mirror image, never shifted, on both paths of the pipeline; the default shift moves them."""
    root = make_mnist(tmp_path / "data", n_train=64, n_test=8, folder="FashionMNIST")
    c = {"dataset": "fashion-mnist", "data_dir": str(root), "image_size": 32, "augment": "on"}
    for more, flips_only in (({"shift": 0}, True), ({}, False)):
        data = imagedata.load_split(c | more, True, CPU)
        x = data.images[:64]
        out = data.preprocess(x, augment=True, generator=torch.Generator().manual_seed(0))
        kinds = itself_or_mirror(out, data.preprocess(x))
        assert (set(kinds) == {"itself", "mirror"}) if flips_only else ("other" in kinds), (more, kinds)
    # a folder through DataLoader workers (too large for memory: here, a share of 0)
    folder = make_folder(tmp_path / "folder", n_train=24, n_test=3)
    monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", 0.0)
    data = imagedata.load_split(folder_config(folder, shift=0), True, CPU)
    assert type(data) is imagedata.StreamedImages
    idx = torch.arange(len(data))
    out = torch.cat([x for x, _ in data.batches(idx, 8, augment=True, generator=torch.Generator().manual_seed(2))])
    plain = torch.cat([x for x, _ in data.batches(idx, 8)])
    assert set(itself_or_mirror(out, plain)) == {"itself", "mirror"}


@pytest.mark.parametrize("shift", [2, 4])
def test_shift_bounds_how_far_a_known_pixel_moves(tmp_path, shift):
    """A bright pixel of each 28 px training image moves by at most --shift pixels each way (every
    offset from -shift to shift occurs); digits are never mirrored."""
    root = make_mnist(tmp_path / "data", n_train=64, n_test=8)
    data = imagedata.load_split({"dataset": "mnist", "data_dir": str(root), "image_size": 32,
                                 "shift": shift}, True, CPU)
    assert data.pad == shift
    images = torch.zeros(256, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 10, 5] = 255
    data.image_size = 28  # no resize, so the pixel stays one pixel
    out = data.preprocess(images, augment=True, generator=torch.Generator().manual_seed(1))
    where = [torch.nonzero(img[0] == img[0].max(), as_tuple=True) for img in out]
    assert {int(y[0]) - 10 for y, _ in where} == set(range(-shift, shift + 1))
    assert {int(x[0]) - 5 for _, x in where} == set(range(-shift, shift + 1))


def test_augmentation_repeats_with_the_same_seed(tmp_path):
    root = make_mnist(tmp_path / "data", n_train=64, n_test=8)
    data = imagedata.load_split(config("mnist", root, 32), True, CPU)
    x = data.images[:32]

    def batch(seed):
        return data.preprocess(x, augment=True, generator=torch.Generator().manual_seed(seed))

    a, b, c = batch(0), batch(0), batch(1)
    plain = data.preprocess(x)
    assert a.shape == plain.shape == (32, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, plain)
    # Through .batches too: same seed, same batches (the shuffle comes from shard_indices).
    idx = imagedata.shard_indices(len(data), seed=0, epoch=0)
    first = [xb for xb, _ in data.batches(idx, 16, augment=True, generator=torch.Generator().manual_seed(3))]
    again = [xb for xb, _ in data.batches(idx, 16, augment=True, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(p, q) for p, q in zip(first, again))


# ------------------------------------------------------------------------------------------ mixed precision

def test_bf16_autocast_training_lowers_the_loss(tmp_path):
    """A 1/16-width VGG16 trained for a few dozen steps under CPU bf16 autocast, as train.py does."""
    root = make_mnist(tmp_path / "data", n_train=256, n_test=8)
    data = imagedata.load_split(config("mnist", root, 32), True, CPU)
    torch.manual_seed(0)
    model = vgg(16, 10, batch_norm=True, width_div=16).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    amp = torch.bfloat16
    fixed_x, fixed_y = data.preprocess(data.images[:128]), data.labels[:128]

    def fixed_loss():
        model.eval()
        with torch.inference_mode(), devices.autocast(CPU, amp):
            loss = F.cross_entropy(model(fixed_x).float(), fixed_y)
        model.train()
        return loss.item()

    before = fixed_loss()
    losses, eval_losses = [], []
    for epoch in range(6):  # 6 epochs of 8 steps
        for x, y in data.batches(imagedata.shard_indices(len(data), 0, epoch), 32):
            with devices.autocast(CPU, amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            assert logits.dtype == torch.bfloat16  # autocast really ran the network in bf16
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        eval_losses.append(fixed_loss())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    # Eval mode (BatchNorm running statistics, no dropout) at the epoch ends: at lr 0.02 a single epoch's
    # value swings by 1 with the last few batches, so the best of them is what is compared.
    assert min(eval_losses) < before - 0.5, eval_losses


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_batches_follow_the_indices_and_equal_those_in_memory(tmp_path, workers,
                                                                            monkeypatch):
    """A folder too large for memory is decoded by DataLoader workers every epoch: its batches must
    hold exactly the images asked for, in order, cut as split_batches cuts them (what train.py relies
    on for shards and resume), and equal the batches of the same folder in memory, augmented ones
    too: one preprocessing code, the random draws from one stream in this process."""
    root = make_folder(tmp_path, n_train=13, n_test=3)
    c = folder_config(root, workers=workers)
    memory = imagedata.load_split(c, True, CPU)
    monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", 0.0)
    data = imagedata.load_split(c, True, CPU)
    assert type(data) is imagedata.StreamedImages
    assert data.classes == ["cat", "dog", "ship"] and len(data) == 13
    indices = imagedata.shard_indices(len(data), seed=0, epoch=1)
    for augment in (False, True):
        got, kept = (list(d.batches(indices, 4, augment, torch.Generator().manual_seed(1), steps=3))
                     for d in (data, memory))
        assert [len(y) for _, y in got] == [4, 4, 5]  # the 13th image joins the last batch
        assert torch.equal(torch.cat([y for _, y in got]), memory.labels[indices])
        assert torch.equal(torch.cat([x for x, _ in got]), torch.cat([x for x, _ in kept]))
    # a resumed epoch: the rest of it, from the random stream as it stood after the first batch
    gen = torch.Generator().manual_seed(1)
    first = next(memory.batches(indices[:4], 4, True, gen))
    tail = list(data.batches(indices[4:], 4, True, gen, steps=2))
    whole = list(memory.batches(indices, 4, True, torch.Generator().manual_seed(1), steps=3))
    assert torch.equal(first[0], whole[0][0])
    assert torch.equal(torch.cat([x for x, _ in tail]), torch.cat([x for x, _ in whole[1:]]))
    data.close()


# ------------------------------------------------------------------------------ folders kept on the device

def folder_config(root, image_size: int = 32, **kw) -> dict:
    return {"dataset": "folder", "data_dir": str(root), "image_size": image_size, "workers": 0, **kw}


def both_paths(root, monkeypatch, capsys, image_size: int = 32):
    """A folder's test split in memory (DeviceImages) and through the DataLoader (StreamedImages,
    forced by a memory share of 0), with what each printed about the path it took."""
    c = folder_config(root, image_size)
    memory = imagedata.load_split(c, False, CPU)
    said_memory = capsys.readouterr().out
    monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", 0.0)
    loader = imagedata.load_split(c, False, CPU)
    said_loader = capsys.readouterr().out
    assert isinstance(memory, imagedata.DeviceImages) and "decoded into cpu memory" in said_memory
    assert type(loader) is imagedata.StreamedImages and "DataLoader workers every epoch" in said_loader
    return memory, loader


def eval_batches(data):
    x, y = zip(*data.batches(torch.arange(len(data)), 7))
    return torch.cat(x), torch.cat(y)


def write_images(folder, images: dict) -> None:
    from PIL import Image
    for name, (mode, pixels) in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert(mode).save(folder / name)


def test_in_memory_folder_equals_the_dataloader_path_for_mixed_sizes_and_modes(tmp_path, monkeypatch, capsys):
    """Mixed sizes are resized on decoding, the same way on both paths: the same tensors. Grey, RGBA,
    palette and 16-bit grey files go through the same RGB conversion; 16-bit grey is scaled, not clipped."""
    from PIL import Image
    root = make_folder(tmp_path, n_train=3, n_test=12)  # RGB, L and RGBA of sizes 24..63
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).convert("P").save(root / "test/cat/p.png")
    wide = np.full((36, 36), 40_000, dtype=np.uint16)
    wide[:18] = 10_000
    Image.fromarray(wide).save(root / "test/dog/wide.png")  # mode I;16
    assert Image.open(root / "test/dog/wide.png").mode.startswith("I")
    memory, loader = both_paths(root, monkeypatch, capsys)
    xm, ym = eval_batches(memory)
    xl, yl = eval_batches(loader)
    assert xm.shape == xl.shape == (14, 3, 32, 32) and torch.equal(ym, yl)
    assert torch.equal(xm, xl)
    i = loader.paths.index(str(root / "test/dog/wide.png"))
    grey = memory.images[i].float()
    assert grey[:, 0].mean().round() == round(10_000 / 257) and grey[:, -1].mean().round() == round(40_000 / 257)


def test_one_shared_size_is_kept_and_resized_on_the_device(tmp_path, monkeypatch, capsys):
    """Images that all share a size below the input are stored at it (here 24 px, input 32 px) and
    upsampled on the device, on both paths alike; the crop padding is 1/8 of the stored side. A shared
    size above the input (48 px) is resized on decoding: the device never shrinks (it has no
    antialias)."""
    rng = np.random.default_rng(2)
    share = imagedata.FOLDER_MEMORY_SHARE
    for side, stored in ((24, 24), (48, 32)):
        monkeypatch.setattr(imagedata, "FOLDER_MEMORY_SHARE", share)  # both_paths sets it to 0
        folder = tmp_path / str(side)
        write_images(folder / "test", {f"{k}/{i}.png": ("RGB", rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
                                       for k in ("a", "b") for i in range(4)})
        memory, loader = both_paths(folder, monkeypatch, capsys)
        assert memory.images.shape == (8, 3, stored, stored) and memory.pad == stored // 8
        assert loader.size == (stored, stored) and loader.pad == memory.pad
        xm, _ = eval_batches(memory)
        xl, _ = eval_batches(loader)
        assert xm.shape == xl.shape == (8, 3, 32, 32) and torch.equal(xm, xl)


@pytest.mark.skipif(not (REAL_DATA / "cifar10-jpeg" / "train").is_dir(),
                    reason=f"cifar10-jpeg not found under {REAL_DATA}")
def test_real_cifar10_jpegs_in_memory_equal_the_dataloader_path(tmp_path, monkeypatch, capsys):
    """20 real JPEGs of each class (linked, not copied), through both paths: bit-for-bit equal at 32 px."""
    for cls in sorted((REAL_DATA / "cifar10-jpeg" / "train").iterdir()):
        (tmp_path / "test" / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:20]:
            (tmp_path / "test" / cls.name / f.name).symlink_to(f.resolve())  # DATA_DIR may be relative
    memory, loader = both_paths(tmp_path, monkeypatch, capsys)
    assert memory.images.shape == (200, 3, 32, 32) and memory.pad == 4
    xm, ym = eval_batches(memory)
    xl, yl = eval_batches(loader)
    assert torch.equal(ym, yl) and torch.equal(xm, xl)
    # Augmented batches: the same crops and flips on both paths, padded by 4 px of 32.
    xa, _ = next(memory.batches(torch.arange(64), 64, True, torch.Generator().manual_seed(0)))
    xb, _ = next(loader.batches(torch.arange(64), 64, True, torch.Generator().manual_seed(0)))
    assert not torch.equal(xa, xm[:64]) and torch.equal(xa, xb)


def test_decoding_in_worker_processes_gives_the_same_split(tmp_path, capsys):
    """More than one chunk of files (256) is decoded by a process pool: same images, same order."""
    rng = np.random.default_rng(3)
    write_images(tmp_path / "test", {f"{'ab'[i % 2]}/{i:03d}.png": ("RGB", rng.integers(0, 256, (8, 8, 3),
                                                                                      dtype=np.uint8))
                                     for i in range(600)})
    serial = imagedata.load_split(folder_config(tmp_path), False, CPU)
    pooled = imagedata.load_split(folder_config(tmp_path, workers=2), False, CPU)
    assert serial.images.shape == (600, 3, 8, 8) and serial.pad == 1
    assert torch.equal(serial.images, pooled.images) and torch.equal(serial.labels, pooled.labels)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "cifar10"])
def test_the_normalization_constants_are_those_of_the_training_images(dataset):
    """Each dataset's mean and standard deviation per channel, measured on its real training split
    (MNIST and Fashion-MNIST whole, to 1e-4; CIFAR-10 on 10,000 images of the JPEG copy, whose
    compression smooths the pixels a little: to 3e-3)."""
    from PIL import Image
    if dataset == "cifar10":
        folder = REAL_DATA / "cifar10-jpeg" / "train"
        if not folder.is_dir():
            pytest.skip(f"cifar10-jpeg not found under {REAL_DATA}")
        files = sorted(folder.glob("*/*"))
        chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:10_000]
        pixels = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in chosen])
        pixels, tolerance = pixels.reshape(-1, 3) / 255.0, 3e-3
    else:
        from torchvision import datasets
        cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
        try:
            pixels = cls(str(REAL_DATA), train=True, download=False).data.numpy().reshape(-1, 1)
        except RuntimeError:
            pytest.skip(f"{dataset} not found under {REAL_DATA}")
        pixels, tolerance = pixels / 255.0, 1e-4
    mean, std = imagedata.DATASETS[dataset].stats
    assert pixels.mean(0) == pytest.approx(mean, abs=tolerance)
    assert pixels.std(0) == pytest.approx(std, abs=tolerance)
