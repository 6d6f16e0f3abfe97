"""One training step of the authors' own `train.py` (from your clone of their repository) against vip2clip's
training loss on the same batch: the loss and every trainable parameter's gradient (run by hand).

The inputs are check_release_test.py's: synthetic images (one batch of all of them), random ViT-L/14@336 CLIP
weights. The release's train.py runs unchanged with check_release_test.py's shims plus, in its process only:
- `Tensor.cuda` returns the tensor itself: train.py calls `label.long().cuda()` unconditionally (no GPU here);
- its ICA / FGP classes are subclassed only to keep a reference to the instances train.py builds, its Dataset only
  to record which images the shuffled batch holds, `Tensor.backward` only to record the loss value;
- `torch.optim.Adam` is replaced by one whose `step` saves the loss, the gradients and the (still initial,
  seed-111 random) weights of the prompt learner and FGP, then ends the run: one step, nothing trained.
vip2clip then loads those weights (`release_to_state`), computes `training_loss` on the same images and masks,
and its gradients are mapped to the release's names (`state_to_release`) and compared.

    python benchmarks/check_release_train.py --release-dir ~/ViP2-CLIP [--image-size 224] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from check_release_test import N_CTX, N_DYN, install_release_shims, make_inputs
from vip2clip.paper.release_clone import rewinding_jit_load


def run_release_train(release_dir: Path, clip_weights: Path, record: Path, argv: list[str]) -> None:
    """In a child process: train.py with `argv` until its first optimizer step (see the module docstring)."""
    install_release_shims(release_dir, clip_weights)
    import dataset as release_dataset
    import prompt_learner

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    modules: dict[str, torch.nn.Module] = {}
    images: list[str] = []
    losses: list[float] = []

    class KeptICA(prompt_learner.ICA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            modules["prompt_learner"] = self

    class KeptFGP(prompt_learner.FGP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            modules["Zero_try"] = self

    prompt_learner.ICA, prompt_learner.FGP = KeptICA, KeptFGP
    getitem, backward = release_dataset.Dataset.__getitem__, torch.Tensor.backward

    def recording_getitem(self, index):
        images.append(self.data_all[index]["img_path"])
        return getitem(self, index)

    def recording_backward(self, *args, **kwargs):
        losses.append(float(self.detach()))
        return backward(self, *args, **kwargs)

    release_dataset.Dataset.__getitem__, torch.Tensor.backward = recording_getitem, recording_backward

    class FirstStepOnly(torch.optim.Adam):
        def step(self, closure=None):
            weights = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}
            grads = {name: {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
                     for name, m in modules.items()}  # fmt: skip
            torch.save({"loss": losses[-1], "images": images, "weights": weights, "grads": grads}, record)
            raise SystemExit(0)

    torch.optim.Adam = FirstStepOnly
    sys.argv = ["train.py", *argv]
    with rewinding_jit_load():
        runpy.run_path(str(release_dir / "train.py"), run_name="__main__")


def release_step(release_dir: Path, workdir: Path, data: Path, clip: Path, size: int, n_images: int) -> dict:
    """What the release's first step recorded: loss, images of the batch, initial weights and gradients."""
    record = workdir / f"release_train_step_{size}px_{n_images}.pt"
    if not record.exists():
        argv = ["--train_data_path", str(data), "--save_path", str(workdir / "release_train"), "--dataset", "btad",
                "--n_ctx", str(N_CTX), "--n_cls", str(N_DYN), "--epoch", "1", "--batch_size", str(n_images),
                "--image_size", str(size), "--seed", "111"]  # fmt: skip
        command = [sys.executable, __file__, "--run-release", str(release_dir), str(clip), str(record), "--", *argv]
        subprocess.run(command, check=True)
    return torch.load(record, weights_only=True)


def our_step(workdir: Path, data: Path, clip: Path, size: int, release: dict) -> tuple[float, dict]:
    """(loss, gradients in the release's layout) of vip2clip on the release's batch and initial weights."""
    import vip2clip
    from vip2clip.data.dataset import AnomalyDataset
    from vip2clip.data.index import read_index
    from vip2clip.model.checkpoint import state_to_release
    from vip2clip.training.losses import training_loss

    weights = workdir / "release_initial_weights.pth"
    torch.save(release["weights"], weights)
    model = vip2clip.create_model("ViT-L-14-336", clip_weights=clip, checkpoint=weights, image_size=size)
    index = read_index(data / "meta.json")
    dataset = AnomalyDataset(index, "test", classes=None, image_size=size)
    position = {sample.img_path: i for i, sample in enumerate(dataset.samples)}
    items = [dataset[position[path]] for path in release["images"]]
    images = torch.stack([item["image"] for item in items])
    masks = torch.stack([item["mask"] for item in items])  # 0/1, thresholded at 0.5 like the release's gt
    labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
    with torch.no_grad():
        features = model.encode_image(images)
    output = model.forward_features(features)
    parts = training_loss(output.probability_maps((size, size)), masks, image_logits=output.image_logits, labels=labels)
    parts.total.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    state = {key: grads.get(key, torch.zeros_like(value)) for key, value in model.trainable_state_dict().items()}
    return float(parts.total), state_to_release(model.config, state)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-release":
        split = sys.argv.index("--")
        release_dir, clip, record = sys.argv[2:split]
        run_release_train(Path(release_dir).resolve(), Path(clip), Path(record), sys.argv[split + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release-dir", type=Path, required=True, help="your clone of kim0806/ViP2-CLIP")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workdir", type=Path, default=None, help="check_release_test.py's, or a new folder")
    parser.add_argument("--batch", type=int, default=4, help="images in the batch (the release draws them shuffled)")
    args = parser.parse_args()
    if not (args.release_dir / "train.py").is_file():
        parser.error(f"{args.release_dir}: not a clone of the release (no train.py)")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="vip2clip_release_train_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data, clip, _ = make_inputs(workdir)
    release = release_step(args.release_dir.resolve(), workdir, data, clip, args.image_size, args.batch)
    loss, grads = our_step(workdir, data, clip, args.image_size, release)
    print(f"batch of {len(release['images'])} images at {args.image_size} px")
    print(f"loss: release {release['loss']:.6f}, vip2clip {loss:.6f}, difference {abs(loss - release['loss']):.2e}")
    worst = 0.0
    for section, theirs in release["grads"].items():
        for key, grad in sorted(theirs.items()):
            ours = grads[section][key]
            relative = float((ours - grad).abs().max() / grad.abs().max().clamp_min(1e-30))
            worst = max(worst, relative)
            print(f"  {section}.{key}: max |grad| {float(grad.abs().max()):.3e}, max |difference| / max |grad| "
                  f"{relative:.2e}")  # fmt: skip
    print(f"largest relative gradient difference: {worst:.2e}")


if __name__ == "__main__":
    main()
