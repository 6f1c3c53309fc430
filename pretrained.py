"""Start from pretrained weights: torchvision's ImageNet VGGs, or a model trained before.

    python train.py --pretrained imagenet --dataset folder --data-dir photos   # needs full width
    python train.py --pretrained save_model/best.pth --dataset folder --data-dir photos

Every tensor is loaded except the last Linear (the head) when the classes differ: that one is new,
sized for this dataset. Fine-tuning then goes as fastai's fine_tune and Keras' guide do it: for
FREEZE_EPOCHS epochs only the head trains (the pretrained layers get no gradients and their
BatchNorm layers stay in eval mode, so their running statistics do not move); after them everything
trains, the pretrained layers at LR x BACKBONE_LR_MULT and the head at LR.
"""

import contextlib
import http.client
import sys
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoints
import net
from errors import UserError
from imagedata import normalization

# torchvision's ImageNet weights expect RGB in [0, 1] normalized with these.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The head: the last Linear, the only tensors a fine-tune may replace.
HEAD = ("classifier.6.weight", "classifier.6.bias")


def model_name(c: dict) -> str:
    """torchvision's name of this architecture: vgg11 ... vgg19, with _bn for BatchNorm."""
    return f"vgg{c['depth']}{'_bn' if c['batch_norm'] else ''}"


def imagenet_weights(name: str) -> tuple[str, list[str]]:
    """(URL, ImageNet class names) of torchvision's IMAGENET1K_V1 weights for `name`, read from
    torchvision's own weights enum."""
    from torchvision.models import get_model_weights
    weights = get_model_weights(name).IMAGENET1K_V1
    return weights.url, list(weights.meta["categories"])


def hub_folder() -> Path:
    """Where torch.hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints (~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass
class Source:
    """Pretrained weights as read from their file, before they go into a network."""
    state: dict                 # the state dict, with torchvision's names
    classes: list[str] | None   # the names of the head's classes, where the file says them
    what: str                   # for the run's header: "vgg16_bn IMAGENET1K_V1", "best.pth (...)"
    normalize: list             # [mean, std] the weights were trained with
    file: Path                  # where they were read from
    fix: str                    # what to do when they do not fit this run's network


def fetch_imagenet(c: dict, progress: bool = True) -> Source:
    """The ImageNet weights for c's depth and BatchNorm, downloaded into the torch hub cache once
    (hash-checked) and read from there afterwards."""
    if c["width_div"] != 1:
        raise UserError(f"--pretrained imagenet needs the full-width network (--width-div 1), not "
                        f"--width-div {c['width_div']}: the ImageNet weights have VGG's full "
                        "channel counts")
    name = model_name(c)
    url, categories = imagenet_weights(name)
    file = hub_folder() / Path(url).name
    try:
        # writes a temporary file and renames it only after the hash check: a download that is
        # cut off or corrupt leaves nothing in the cache
        # torch's "Downloading: ..." line is progress (stdout, as newer torch prints it), and its
        # notes on the file's pickle protocol are no news: a failure is this function's one line
        with warnings.catch_warnings(), contextlib.redirect_stderr(sys.stdout):
            warnings.simplefilter("ignore")
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                       progress=progress, weights_only=True)
    except http.client.HTTPException as e:  # the connection ended before the whole file came
        raise UserError(f"the download of {url} was cut off ({type(e).__name__}); nothing was "
                        "kept, run again") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(f"cannot download the ImageNet weights of {name} ({reason}): fetch {url} "
                        f"and put it in {file.parent}/ as {file.name}") from None
    except RuntimeError as e:
        if "hash" in str(e).lower():
            raise UserError(f"the download of {url} is damaged (its SHA-256 does not match the "
                            f"name {file.name}); nothing was kept, try again") from None
        raise UserError(f"{file} cannot be read ({str(e).splitlines()[0][:120]}): delete it "
                        "and run again to download it afresh") from None
    except Exception as e:  # a truncated or foreign file in the cache
        raise UserError(f"{file} cannot be read ({type(e).__name__}): delete it and run again to "
                        "download it afresh") from None
    if not (isinstance(state, dict) and state):
        raise UserError(f"{file} in the torch hub cache is no state dict: delete it and run again "
                        "to download it afresh")
    return Source(checkpoints.plain_names(state), categories, f"{name} IMAGENET1K_V1",
                  [list(IMAGENET_MEAN), list(IMAGENET_STD)], file,
                  f"the file in the torch hub cache is not torchvision's {name}: delete {file} "
                  "and run again to download it afresh")


def read_file(path: str, c: dict) -> Source:
    """The weights of a file given to --pretrained: a checkpoint of this repo, or a state dict in
    torchvision's format (also one saved from a model wrapped by DDP or torch.compile)."""
    try:
        ok = Path(path).is_file()
    except OSError:
        ok = False
    if not ok:
        raise UserError(f"--pretrained {path}: no such file (give imagenet, a checkpoint of this "
                        "repo, or a torchvision state dict)")
    try:
        obj = checkpoints.safe_load(path)
    except Exception:
        raise UserError(f"--pretrained {path} is not a PyTorch state dict or checkpoint that can "
                        "be loaded safely (weights_only=True)") from None
    fix = "set --depth, --batch-norm/--no-batch-norm and --width-div to match"
    if isinstance(obj, dict) and {"model", "config", "classes"} <= obj.keys():
        src = obj["config"]
        held = (f"VGG{src.get('depth')}{'_bn' if src.get('batch_norm') else ''} "
                f"width/{src.get('width_div')}")
        wanted = f"VGG{c['depth']}{'_bn' if c['batch_norm'] else ''} width/{c['width_div']}"
        if held != wanted:
            raise UserError(f"--pretrained {path} holds a {held}, but this run builds a {wanted}: "
                            f"{fix}")
        return Source(checkpoints.evaluated_weights(obj), list(obj["classes"]),
                      f"{Path(path).name} ({src.get('dataset')}, epoch {obj.get('epoch')})",
                      [list(s) for s in normalization(src)], Path(path), fix)
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor)
                                                  for v in obj.values())):
        raise UserError(f"--pretrained {path} is neither a checkpoint of this repo nor a state "
                        "dict of tensors")
    # a torchvision-format file: torchvision trains on ImageNet's statistics
    return Source(checkpoints.plain_names(obj), None, Path(path).name,
                  [list(IMAGENET_MEAN), list(IMAGENET_STD)], Path(path), fix)


def load_into(model: torch.nn.Module, source: Source, classes: list[str]) -> str:
    """Copy every tensor of the source into `model` except the head when its classes differ (the
    model's own freshly initialized head stays). Returns how the head was taken: "new", "own",
    or "reordered" (the same class names in another order: its rows follow the names). Another
    architecture, or values that are not finite, is one line that names the file."""
    state = source.state
    own = model.state_dict()
    n_source = state[HEAD[0]].shape[0] if HEAD[0] in state else None
    names = list(source.classes) if source.classes is not None else None
    if names is not None and names != list(classes) and sorted(names) == sorted(classes) \
            and len(set(names)) == len(names):
        order = torch.tensor([names.index(name) for name in classes])
        state = {**state, **{k: state[k][order] for k in HEAD if k in state}}
        head = "reordered"
    elif n_source != len(classes) or (names is not None and names != list(classes)):
        head = "new"
    else:
        head = "own"
    body = {k: v for k, v in state.items() if not (head == "new" and k in HEAD)}
    check_fits(source, own, skip=HEAD if head == "new" else ())
    model.load_state_dict(body, strict=False)
    return head


def check_fits(source: Source, own: dict, skip=HEAD) -> None:
    """A source that cannot go into a network whose state dict is `own` (the tensors in `skip`
    aside) is one line that names the file: values that are not finite, another architecture."""
    state, what = source.state, f"--pretrained {source.file}"
    bad = [k for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{what} holds values that are not finite (NaN or infinity) in {len(bad)} "
                        f"tensor(s), e.g. {bad[0]}: a model cannot be trained from it")
    missing = sorted(set(own) - set(state) - set(skip))
    extra = sorted(set(state) - set(own) - set(skip))
    if missing or extra:
        raise UserError(f"{what} holds another architecture ({len(state)} tensors; e.g. "
                        f"{(missing or extra)[0]} {'is missing' if missing else 'is not in'} "
                        f"this {len(own)}-tensor network): {source.fix}")
    for k, v in state.items():
        if k not in skip and v.shape != own[k].shape:
            raise UserError(f"{what} holds another architecture: {k} has shape "
                            f"{tuple(v.shape)}, this network {tuple(own[k].shape)}: {source.fix}")


def describe(what: str, head: str, n_classes: int) -> str:
    taken = {"new": "new head for", "own": "its own head for",
             "reordered": "its own head, reordered for"}[head]
    return f"{what}, {taken} {n_classes} classes"


def load_pretrained(model: torch.nn.Module, c: dict, classes: list[str],
                    source: Source | None = None) -> str:
    """Load c["pretrained"] into a freshly built model; returns the header's description.
    source: what fetch() returned already (the download happens before anything is written)."""
    source = source or fetch(c)
    return describe(source.what, load_into(model, source, classes), len(classes))


def fetch(c: dict, progress: bool = True) -> Source:
    """The weights c["pretrained"] names: torchvision's ImageNet weights, or a file; checked
    against the run's network (all but the head, which depends on the data) before anything is
    written."""
    source = fetch_imagenet(c, progress) if c["pretrained"] == "imagenet" else \
        read_file(c["pretrained"], c)
    with torch.device("meta"):  # shapes only
        check_fits(source, net.build_model(c, 1).state_dict())
    return source


def fetch_once_per_machine(c: dict, local_rank: int | None, distributed: bool,
                           device: torch.device | None = None) -> Source:
    """fetch(), with one process per machine downloading under torchrun while the others wait for
    it; a failure is one line from rank 0, and the other processes exit quietly. `device`: where
    the process group's tensors live (NCCL and HCCL reduce only tensors on their device)."""
    import torch.distributed as dist
    if not distributed:
        return fetch(c)
    error = None
    if local_rank == 0:
        try:
            fetch(c, progress=dist.get_rank() == 0)
        except UserError as e:
            error = e
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # also the barrier the others wait at
    if failed.item():
        if error is not None and dist.get_rank() == 0:
            raise error
        raise SystemExit(2)
    return fetch(c, progress=False)  # from the cache now


# ----------------------------------------------------------------------------------- fine-tuning

def is_head(name: str) -> bool:
    return name in HEAD


def frozen_at(c: dict, epoch: int) -> bool:
    """Whether epoch `epoch` (from 0) trains only the head: the first FREEZE_EPOCHS of a run that
    starts from pretrained weights."""
    return c.get("pretrained") is not None and epoch < c.get("freeze_epochs", 0)


def set_frozen(model: torch.nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze every parameter but the head (no gradients: the frozen epoch computes
    none for them)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_head(name) or not frozen)


def train_mode(model: torch.nn.Module, frozen: bool) -> None:
    """model.train(), with the BatchNorm layers of a frozen body in eval mode: their running
    statistics stay those of the pretrained weights (Keras' fine-tuning guide)."""
    model.train()
    if frozen:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def parameter_groups(model: torch.nn.Module, c: dict, lr: float) -> list[dict]:
    """The optimizer's groups: weights decayed, biases and BatchNorm parameters not (as in the
    official recipes' --norm-weight-decay 0); with PRETRAINED, the pretrained body at lr x
    BACKBONE_LR_MULT and the head at lr. The head's groups come last (the epoch line's rate)."""
    pretrained = c.get("pretrained") is not None
    groups = {}
    for name, p in model.named_parameters():
        part = "head" if is_head(name) or not pretrained else "body"
        groups.setdefault((part, p.ndim > 1), []).append(p)
    mult = {"head": 1.0, "body": c.get("backbone_lr_mult", 1.0)}
    return [{"params": params, "weight_decay": c["weight_decay"] if decay else 0.0,
             "lr": lr * mult[part], "lr_mult": mult[part]}
            for (part, decay), params in sorted(groups.items(), key=lambda kv: kv[0][0] == "head")]
