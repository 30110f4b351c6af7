"""Export a trained checkpoint to ONNX or TorchScript, then check the file against PyTorch.

``tl-export ckpt_path=CKPT [format=onnx|torchscript] [output=PATH] [images=PATH|[PATH,...]]
[max_images=N] [atol=X]`` (or ``python scripts/export.py key=value ...``; ``--help`` lists them;
the command line is read in :mod:`transfer_learning.cli.export`)

What is exported is the network alone (``module.net`` in eval mode): a float32 batch of
preprocessed images ``[batch, 3, H, W]`` in, class **logits** ``[batch, classes]`` out, with a
dynamic batch dimension. Divide them by the calibration ``temperature`` and apply a softmax for
the calibrated probabilities predict gives (a multi-label model: a sigmoid per class, each class
called when its probability reaches its threshold; the metadata says which: ``temperature``,
``activation``, ``task`` and ``thresholds``). The class names and the
preprocessing (input size, resize size, mean, std, interpolation) travel with the file, in
its metadata (ONNX ``metadata_props``; TorchScript ``_extra_files["metadata.json"]``) and in a
sidecar ``<output>.json``.

After every export the file is run on real image files, preprocessed exactly as
``transfer_learning.results.predict`` does, at batch size 1 and N, next to the PyTorch module; the
export fails (exit code 1) when the logits differ by more than ``atol`` or any decision differs
(the top-1 class; multi-label: the label set at the checkpoint's thresholds).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transfer_learning.data.images import is_image, list_images, load_rgb
from transfer_learning.errors import ConfigError, DataError, TransferLearningError, user_message
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.readers import read_export_metadata
from transfer_learning.results.export_args import DEMO_IMAGES, ExportArgs
from transfer_learning.results.predict import Classifier

INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ParityError(Exception):
    """The exported model does not compute what the checkpoint computes."""


@dataclass(frozen=True)
class ParityRow:
    batch_size: int
    max_abs_logits: float
    max_abs_probs: float
    top1_agree: int  # images with the same decision (top-1 class; multi-label: label set)

    @property
    def ok(self) -> bool:
        return self.top1_agree == self.batch_size


# -- what travels with the file ------------------------------------------------------------


def model_metadata(module: TransferLearningModule, checkpoint: Path) -> dict[str, Any]:
    preprocessing = module.preprocessing.to_dict()
    size = preprocessing["crop_size"]
    multilabel = module.task == "multilabel"
    activation = "sigmoid" if multilabel else "softmax"
    thresholds = [float(t) for t in module.thresholds] if module.thresholds is not None else None
    decision = (
        "a class is called when its sigmoid probability >= its entry of thresholds"
        if multilabel
        else "the class of the highest probability"
    )
    return {
        "class_names": list(module.class_names),
        "preprocessing": preprocessing,
        "input": f"{INPUT_NAME}: float32 [batch, 3, {size}, {size}], RGB; resize the shorter side to "
        "resize_size (interpolation, antialias), center crop crop_size, scale to 0..1, normalize (mean, std)",
        "output": f"{OUTPUT_NAME}: float32 [batch, {len(module.class_names)}], class logits in class_names "
        f"order (divide by temperature, then {activation}, for calibrated probabilities; {decision})",
        "activation": activation,
        "temperature": module.temperature,
        "task": module.task,
        **({"thresholds": thresholds} if multilabel else {}),
        "model": dict(module.hparams["model"]).get("_target_", ""),
        "checkpoint": checkpoint.name,
    }


def _flat(metadata: dict[str, Any]) -> dict[str, str]:
    """String values (ONNX metadata_props): nested values as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored inside an exported file (ONNX or TorchScript)."""
    return read_export_metadata(path)


# -- export --------------------------------------------------------------------------------


def export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    """torch.export-based exporter (``dynamo=True``; the TorchScript-based one is deprecated),
    weights inside the one file, the batch dimension dynamic."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    model = program.model_proto
    model.doc_string = "Class logits of preprocessed images; see the metadata (class_names, preprocessing)."
    for key, value in _flat(metadata).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_torchscript(
    net: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]
) -> None:
    """A trace (the networks have no data-dependent control flow in eval mode), checked at two
    batch sizes by the parity check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(metadata, indent=2)})


def load_runner(path: Path, fmt: str) -> Callable[[torch.Tensor], np.ndarray]:
    """The exported file as a function of a batch, run by its own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        scripted = torch.jit.load(str(path), map_location="cpu")

    def run(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return scripted(batch).numpy()

    return run


# -- the parity check ----------------------------------------------------------------------


def find_images(sources: Sequence[str], limit: int) -> tuple[list[Path], str]:
    """Up to ``limit`` image files, spread evenly over the sorted files of ``sources`` (folders
    are searched recursively), and where they came from."""
    if sources:
        where = ", ".join(sources)
    else:
        demo = Path(os.environ.get("PROJECT_ROOT", ".")) / DEMO_IMAGES
        if not demo.is_dir():
            raise ConfigError(
                f"no images for the parity check: pass images=<folder or image file> or a list images=[a,b]; "
                f"the default, the demo data set {demo}, does not exist here."
            )
        sources, where = [str(demo)], f"{demo} (the demo data set; pass images=... for your own)"
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files += list_images(path).files
        elif path.is_file() and is_image(path):
            files.append(path)
        else:
            raise ConfigError(f"images={source}: not an image file or a folder.")
    if len(files) < 2:
        raise ConfigError(f"images={where}: the check needs at least 2 image files, found {len(files)}.")
    step = max(1, len(files) // limit)
    return files[::step][:limit], where


def readable_images(files: Sequence[Path], where: str) -> list[Image.Image]:
    """The images of ``files`` that decode; each one that does not is named on stderr and left
    out, as ``predict`` leaves it out (the check needs 2 or more)."""
    images = []
    for path in files:
        try:
            images.append(load_rgb(path))
        except DataError as exc:
            print(f"note: {user_message(exc)} (left out of the parity check)", file=sys.stderr)
    if len(images) < 2:
        raise ConfigError(f"images={where}: the check needs at least 2 readable images, found {len(images)}.")
    return images


def parity(
    module: TransferLearningModule,
    runner: Callable[[torch.Tensor], np.ndarray],
    files: Sequence[Path | Image.Image],
) -> list[ParityRow]:
    """The exported model next to PyTorch's float32 network on the same batches, preprocessed as
    ``predict`` does: the first image alone, then all of them. The reference is ``module.net``
    (in the module's memory format), not ``module(...)``: for a frozen backbone the module runs
    it under bf16 autocast where the hardware supports it, and the export is float32."""
    transform = Classifier(module).transform
    images = torch.stack([transform(f if isinstance(f, Image.Image) else load_rgb(f)) for f in files])
    rows = []
    for batch in (images[:1], images):
        with torch.inference_mode():
            expected = module.net(module._memory_format(batch)).float()
        got = torch.from_numpy(np.asarray(runner(batch.contiguous()))).float()
        if got.shape != expected.shape:
            raise ParityError(f"batch of {len(batch)}: exported output {tuple(got.shape)}, "
                              f"PyTorch {tuple(expected.shape)}")  # fmt: skip
        got_probs, expected_probs = module.probabilities(got), module.probabilities(expected)
        decided = zip(module.decide(got_probs), module.decide(expected_probs), strict=True)
        rows.append(
            ParityRow(
                batch_size=len(batch),
                max_abs_logits=float((got - expected).abs().max()),
                max_abs_probs=float((got_probs - expected_probs).abs().max()),
                top1_agree=sum(a == b for a, b in decided),
            )
        )
    return rows


def decision(module: TransferLearningModule) -> str:
    """What the parity check compares beside the numbers: ``top-1 class`` or ``label set``."""
    return "label set" if module.task == "multilabel" else "top-1 class"


def table(rows: Sequence[ParityRow], atol: float, what: str = "top-1 class") -> str:
    lines = [f"{'batch':>5}  {'max |dlogits|':>13}  {'max |dprobs|':>12}  {what + ' agree':>17}  result"]
    for r in rows:
        ok = r.ok and r.max_abs_logits <= atol
        lines.append(
            f"{r.batch_size:>5}  {r.max_abs_logits:>13.2e}  {r.max_abs_probs:>12.2e}  "
            f"{f'{r.top1_agree}/{r.batch_size}':>17}  {'ok' if ok else 'FAIL'}"
        )
    return "\n".join(lines)


def check(rows: Sequence[ParityRow], atol: float, fmt: str, what: str = "top-1 class") -> None:
    problems = [
        f"batch of {r.batch_size}: max |logit difference| {r.max_abs_logits:.2e} > atol={atol:g}"
        for r in rows
        if not r.max_abs_logits <= atol
    ]
    problems += [f"batch of {r.batch_size}: {what} differs for {r.batch_size - r.top1_agree} image(s)"
                 for r in rows if not r.ok]  # fmt: skip
    if problems:
        raise ParityError(f"the {fmt} model does not match the checkpoint: " + "; ".join(problems))


# -- the command ---------------------------------------------------------------------------


def export(args: ExportArgs) -> tuple[Path, list[ParityRow]]:
    """Export, write the sidecar, run the parity check; returns the file and the check's rows
    (raises :class:`ParityError` when the check fails: the files stay, for inspection)."""
    module = TransferLearningModule.load_for_inference(args.ckpt_path)
    files, where = find_images(args.images, args.max_images)  # before the slow part
    images = readable_images(files, where)
    net = module.net.eval()
    metadata = model_metadata(module, args.ckpt_path)
    output = args.output_path
    output.parent.mkdir(parents=True, exist_ok=True)
    size = module.preprocessing.crop_size
    example = torch.zeros(2, 3, size, size)
    if args.format == "onnx":
        export_onnx(net, example, output, metadata)
    else:
        export_torchscript(net, example, output, metadata)
    sidecar = Path(f"{output}.json")
    sidecar.write_text(json.dumps({**metadata, "format": args.format, "file": output.name}, indent=2) + "\n")
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) and {sidecar}")
    print(f"parity check on {len(images)} image(s) from {where}:")
    rows = parity(module, load_runner(output, args.format), images)
    what = decision(module)
    print(table(rows, args.atol, what))
    check(rows, args.atol, args.format, what)
    print(f"ok: the {args.format} model matches the checkpoint (atol={args.atol:g}, {what} identical)")
    return output, rows


def run(args: ExportArgs) -> None:
    """The command, its arguments read (:mod:`transfer_learning.cli.export`): exit status 0
    exported and checked, 1 the parity check failed, 2 a usage error (one line on stderr)."""
    try:
        export(args)
    except TransferLearningError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
