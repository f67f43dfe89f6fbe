"""python -m keras_alexnet.predict: the top-k classes of image files, through an export's predict_images.

    python -m keras_alexnet.predict --saved_model export/alexnet/1 photos/ cat.jpg [--top_k 5]
        [--ten_crop] [--output predictions.csv | predictions.jsonl] [--batch_size 32]
    python -m keras_alexnet.predict --model export/alexnet/1/model.tflite photos/   # or model.onnx

This project's Caffe classify.py. Files named on the command line are read whatever their extension;
folders are searched recursively for .jpg/.jpeg/.png/.gif/.bmp files, in sorted order. Images go to
the SavedModel's predict_images signature in batches of encoded bytes: it decodes, resizes and crops
them the way training does, so this needs no keras_alexnet model code. A LiteRT or ONNX file of
`export --formats` (--model) takes the centre crop's pixels: they are decoded and cropped here, with the
code evaluation uses (portable.pixels), and the file's runtime runs it. One line per image:

    photos/coffee.png: 41.20% n07920052 espresso | 12.07% n03063599 coffee mug | ...

--output also writes them as CSV (file, then label_i, class_i, probability_i for i = 1..k) or JSON lines
({"file": ..., "top_k": [{"label", "class", "probability"}, ...]}), chosen by the extension (.csv,
.jsonl or .json). A file that cannot be read or decoded is skipped; the last line counts and names them.
With more than one batch a progress bar is drawn on a terminal; when stdout is not a terminal, plain
"batch i/n" lines go to stderr instead, so stdout keeps only the results.

--ten_crop: an export fixes how predict_images crops (`export --ten_crop`: the mean over section 4.1's
ten views, each minus its own patch of the mean image; otherwise the centre crop). predict --ten_crop
checks that the export averages ten views and refuses one that does not, rather than averaging views
itself through `serving_default`, which would subtract the mean image's centre patch from every view.
"""
import csv
import json
import math
import os

import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_alexnet import checkpoint, cli, export, portable, sources
from keras_alexnet.errors import UserError
from keras_alexnet.progress import ClearableBar

SIGNATURE = "predict_images"
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def list_files(paths):
    """The files named, and the images below the folders named (recursively, sorted)."""
    if not paths:
        raise UserError("name image files or folders to classify")
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += [os.path.join(path, name) for name, _ in sources.list_images(path)]
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def load(saved_model, ten_crop=False):
    """(encoded images -> probabilities [N, C], class names, whether it averages 10 crops) of an export."""
    loaded, signature = export.load_signature(saved_model, SIGNATURE, "probabilities")
    exported_ten_crop = bool(getattr(loaded, "ten_crop", tf.constant(False)).numpy())
    if ten_crop and not exported_ten_crop:
        raise UserError(f"{saved_model} was not exported with --ten_crop: its {SIGNATURE} takes the centre "
                         "crop. Export again with `python -m keras_alexnet.export ... --ten_crop`, or drop --ten_crop")
    labels = checkpoint.read_labels(os.path.join(saved_model, "assets", checkpoint.LABELS))
    return lambda data: signature(image_bytes=tf.constant(data))["probabilities"].numpy(), labels, exported_ten_crop


def load_file(path, ten_crop=False):
    """As `load`, of a .tflite or .onnx file of export --formats (labels.txt beside it): the centre crop."""
    if ten_crop:
        raise UserError("--ten_crop needs a SavedModel exported with --ten_crop: LiteRT and ONNX files take the "
                         "centre crop")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {path} does not exist")
    run_on = portable.runtime(path)
    labels = checkpoint.read_labels(os.path.join(os.path.dirname(path), checkpoint.LABELS))
    return (lambda data: run_on(np.stack([portable.pixels(tf.constant(one)).numpy() for one in data]))["probabilities"],
            labels, False)


def classify(predict, batch, skipped):
    """[(file, probabilities [C])] of a batch of (file, bytes); undecodable files go to `skipped`."""
    if not batch:
        return []
    try:
        return list(zip([path for path, _ in batch], predict([data for _, data in batch])))
    except tf.errors.InvalidArgumentError:  # One bad file fails its whole batch: find it alone.
        if len(batch) == 1:
            skipped.append(batch[0][0])
            return []
        return [result for item in batch for result in classify(predict, [item], skipped)]


def read_batch(files, skipped):
    batch = []
    for path in files:
        try:
            with open(path, "rb") as f:
                batch.append((path, f.read()))
        except OSError:
            skipped.append(path)
    return batch


class Output:
    """The --output file: CSV or JSON lines, by extension."""

    def __init__(self, path, top_k):
        self.format = FORMATS.get(os.path.splitext(path)[1].lower())
        if self.format is None:
            raise UserError(f"--output must end in {', '.join(FORMATS)}, got {path}")
        self.file = open(path, "w", encoding="utf-8", newline="")
        if self.format == "csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(["file"] + [f"{key}_{i}" for i in range(1, top_k + 1)
                                          for key in ("label", "class", "probability")])

    def write(self, path, top):
        if self.format == "csv":
            self.csv.writerow([path] + [value for row in top for value in row])
        else:
            self.file.write(json.dumps({"file": path, "top_k": [
                {"label": label, "class": index, "probability": p} for label, index, p in top]}) + "\n")

    def close(self):
        self.file.close()


def run(saved_model, paths, top_k=5, ten_crop=False, output=None, batch_size=32, model=None):
    """Prints one line per image; returns (images classified, skipped files)."""
    if bool(saved_model) == bool(model):
        raise UserError("give --saved_model (an export's version directory) or --model (a .tflite or .onnx file)")
    if top_k < 1 or batch_size < 1:
        raise UserError("--top_k and --batch_size must be positive")
    files = list_files(paths)
    predict, labels, averaged = load_file(model, ten_crop) if model else load(saved_model, ten_crop)
    k = min(top_k, len(labels))
    writer = Output(output, k) if output else None
    batches = math.ceil(len(files) / batch_size)
    progress, skipped, done = ClearableBar(batches), [], 0
    try:
        for b in range(batches):
            batch = read_batch(files[b * batch_size:(b + 1) * batch_size], skipped)
            for path, probabilities in classify(predict, batch, skipped):
                ranked = np.argsort(-probabilities, kind="stable")[:k]
                top = [(labels[i], int(i), float(probabilities[i])) for i in ranked]
                progress.clear()
                print(f"{path}: " + " | ".join(f"{p:.2%} {label}" for label, _, p in top))
                if writer:
                    writer.write(path, top)
                done += 1
            progress.update(b + 1)
    finally:
        if writer:
            writer.close()
    progress.clear()
    print(f"{done} images classified ({'mean of 10 crops' if averaged else 'centre crop'}); skipped {len(skipped)} "
          f"unreadable files{': ' + ', '.join(skipped) if skipped else ''}")
    if not done:
        raise UserError(f"none of the {len(files)} files could be read as an image")
    return done, skipped


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("saved_model", None, "SavedModel from keras_alexnet.export, e.g. export/alexnet/1.")
    flags.DEFINE_string("model", None, "Or a LiteRT or ONNX file of export --formats, e.g. "
                        "export/alexnet/1/model.tflite (labels.txt beside it).")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image, most probable first.")
    flags.DEFINE_bool("ten_crop", False, "Require an export that averages section 4.1's ten views "
                      "(made with export --ten_crop); refuse one that takes the centre crop.")
    flags.DEFINE_string("output", None, "Also write the predictions to this .csv or .jsonl file.")
    flags.DEFINE_integer("batch_size", 32, "Images per call of the signature.")


@cli.reports_errors
def main(argv):
    run(FLAGS.saved_model, argv[1:], FLAGS.top_k, FLAGS.ten_crop, FLAGS.output, FLAGS.batch_size, FLAGS.model)


if __name__ == "__main__":
    define_flags()
    app.run(main)
