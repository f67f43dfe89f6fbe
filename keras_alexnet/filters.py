"""python -m keras_alexnet.filters: the 96 conv1 kernels as one image (Figure 3 of the paper).

Section 6.1: "the kernels on GPU 1 are largely color-agnostic, while the kernels on GPU 2 are largely
color-specific." The grid shows tower A's 48 kernels in the top rows and tower B's 48 below, each
min-max scaled on its own and upsampled (nearest neighbour), one white pixel apart. For each tower
it prints the mean colour saturation of its kernels, measured as HSV chroma: for each pixel of the
min-max scaled kernel, max(R, G, B) - min(R, G, B), averaged over the 11 x 11 pixels and the 48
kernels. 0 is grey, 1 a pure primary. (Chroma rather than HSV's S = chroma / value, which blows up
on the many dark pixels of a scaled kernel.)

    python -m keras_alexnet.filters --model_dir runs/alexnet --output filters.png
    python -m keras_alexnet.filters --saved_model export/alexnet/1 --output filters.png
"""
import re

import tensorflow as tf
from absl import app, flags
from PIL import Image

from keras_alexnet import cli, figures, weights
from keras_alexnet.errors import UserError
from keras_alexnet.model import TOWERS, conv1_kernels


def kernels_from_saved_model(saved_model):
    """The conv1 kernels of an export, as model.conv1_kernels: its variables named conv1_a/.../kernel
    and conv1_b/.../kernel (two towers) or conv1/.../kernel (one tower)."""
    loaded = tf.saved_model.load(saved_model)
    kernels = {v.name.split("/")[0]: v for v in tf.train.TrackableView(loaded).descendants()
               if isinstance(v, tf.Variable) and re.fullmatch(r"conv1(_a|_b)?/.*kernel:0", v.name)}
    names = [f"conv1{s}" for s in TOWERS] if "conv1_a" in kernels else ["conv1"]
    if not all(name in kernels for name in names):
        raise UserError(f"{saved_model} has no conv1 kernel variables (conv1_a and conv1_b, or conv1): "
                         "is it an export of keras_alexnet?")
    return tuple(kernels[name].numpy() for name in names)


def saturation(kernels):
    """Mean HSV chroma of the min-max scaled kernels (module docstring)."""
    k = figures.scaled_kernels(kernels)
    return float((k.max(-1) - k.min(-1)).mean())


def run(output="filters.png", model_dir=None, saved_model=None, columns=16, scale=4, step=None):
    """Writes the grid to `output`; returns {"A": saturation, "B": saturation} (just "A" for one tower)."""
    if bool(model_dir) == bool(saved_model):
        raise UserError("give exactly one of --model_dir and --saved_model")
    if columns < 1 or scale < 1:
        raise UserError("--columns and --scale must be positive")
    if not output.lower().endswith(".png"):
        raise UserError(f"--output {output} must be a .png file")
    towers = kernels_from_saved_model(saved_model) if saved_model else conv1_kernels(
        weights.restore_model(model_dir, step)[0])
    Image.fromarray(figures.kernel_grid(towers, columns, scale)).save(output)
    return {"AB"[i]: saturation(kernels) for i, kernels in enumerate(towers)}


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model_dir", None, "Training run whose newest intact checkpoint (or --checkpoint) to read.")
    flags.DEFINE_integer("checkpoint", None, "The step of the checkpoint to read; default: the newest intact one.")
    flags.DEFINE_string("saved_model", None, "Instead of --model_dir: a SavedModel from keras_alexnet.export.")
    flags.DEFINE_string("output", "filters.png", "PNG to write.")
    flags.DEFINE_integer("columns", 16, "Kernels per row (16: three rows a tower, as in Figure 3).")
    flags.DEFINE_integer("scale", 4, "Nearest-neighbour upsampling of each 11 x 11 kernel.")


@cli.reports_errors
def main(argv):
    del argv
    saturations = run(FLAGS.output, FLAGS.model_dir, FLAGS.saved_model, FLAGS.columns, FLAGS.scale, FLAGS.checkpoint)
    print(f"wrote {FLAGS.output}")
    for tower, value in saturations.items():
        print(f"tower {tower}: mean colour saturation (HSV chroma) of its kernels {value:.3f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
