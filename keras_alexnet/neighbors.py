"""python -m keras_alexnet.neighbors: the images nearest each query in fc7 space (Figure 4 of the paper).

Section 6.1: "If two images produce feature activation vectors with a small Euclidean separation, we
can say that the higher levels of the neural network consider them to be similar." Each query image
is ranked against an index by the Euclidean distance of fc7 vectors.

    python -m keras_alexnet.neighbors --saved_model export/alexnet/1 --index runs/embeddings \\
        --queries queries/ -k 6 --output_dir runs/neighbors

--index is either a log dir written by keras_alexnet.embed (its checkpointed fc7 variable,
metadata.tsv and sprite.png are read back, nothing is recomputed; the grid shows the sprite's
thumbnails) or a folder of images, embedded here through the same `features` signature as the
queries. An embed log dir must come from the same --saved_model, or the distances mean nothing: its
export.json names the export's fingerprint, and another one is refused.
Writes OUTPUT_DIR/neighbors.png (one row a query, as Figure 4: the query set apart by a wider gap, then
its k nearest, closest first, each captioned with its label and distance) and
OUTPUT_DIR/neighbors.tsv (query, rank, file, label, distance).
"""
import collections
import os
import re

import numpy as np
import tensorflow as tf
from absl import app, flags
from google.protobuf import text_format
from PIL import Image, ImageDraw, ImageFont
from tensorboard.plugins import projector
from tensorboard.plugins.projector import metadata as projector_metadata

from keras_alexnet import cli, embed, figures
from keras_alexnet.errors import UserError

Embedded = collections.namedtuple("Embedded", ["fc7", "files", "labels", "thumbs"])
GAP, CHUNK = 2, 8192  # White pixels between tiles; index rows per distance block.
QUERY_GAP = 12  # White pixels between the query column and its neighbours.


def embed_folder(features, folder, batch_size):
    """Embedded images of a folder, in memory (the index or the queries of a query run)."""
    batches = list(embed.embedded_batches(features, embed.Examples(images=folder), batch_size))
    if not batches:
        raise UserError(f"no image in {folder} could be decoded")
    names, labels, fc7, thumbs = zip(*batches)
    return Embedded(np.concatenate(fc7), sum(names, []), sum(labels, []), np.concatenate(thumbs))


def read_logdir(logdir):
    """The Embedded rows of an embed log dir, thumbnails cut from its sprite."""
    config = projector.ProjectorConfig()
    with open(os.path.join(logdir, projector_metadata.PROJECTOR_FILENAME), encoding="utf-8") as f:
        text_format.Parse(f.read(), config)
    info = next((e for e in config.embeddings if e.tensor_name == embed.TENSOR_NAME), None)
    checkpoint = tf.train.latest_checkpoint(logdir)
    if info is None or checkpoint is None:
        raise UserError(f"{logdir} is not a log dir of keras_alexnet.embed")
    fc7 = tf.train.load_checkpoint(checkpoint).get_tensor(embed.TENSOR_NAME)
    with open(os.path.join(logdir, info.metadata_path), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    sprite = np.asarray(Image.open(os.path.join(logdir, info.sprite.image_path)).convert("RGB"))
    side = info.sprite.single_image_dim[0]
    grid = sprite.shape[1] // side
    tiles = sprite.reshape(grid, side, grid, side, 3).swapaxes(1, 2).reshape(-1, side, side, 3)
    if len(rows) != len(fc7):
        raise UserError(f"{logdir}: {len(rows)} metadata rows for {len(fc7)} embeddings")
    return Embedded(fc7, [r[0] for r in rows], [r[-1] for r in rows], tiles[:len(fc7)])


def nearest(queries, index, k):
    """(rows [Q, k], distances [Q, k]): the k index rows nearest each query, nearest first."""
    q = np.asarray(queries, np.float64)
    squared = np.empty((len(q), len(index)))
    for start in range(0, len(index), CHUNK):  # |q - x|^2 = |q|^2 - 2 q.x + |x|^2, a block at a time.
        x = np.asarray(index[start:start + CHUNK], np.float64)
        squared[:, start:start + len(x)] = ((q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1))
    rows = np.argsort(squared, 1, kind="stable")[:, :k]
    return rows, np.sqrt(np.maximum(np.take_along_axis(squared, rows, 1), 0))


def neighbour_caption(label, distance):
    """The lines under a neighbour: its label (without a leading WordNet id) and its distance."""
    return [re.sub(r"^n\d{8} ", "", label), f"d = {distance:.4g}"]


def query_caption(file):
    return ["query", os.path.basename(file)]


def grid_image(query_thumbs, index_thumbs, rows, captions):
    """Figure 4's layout: one row per query, its thumbnail, QUERY_GAP white pixels, then its neighbours'
    thumbnails GAP apart, closest first; `captions[r][c]` are the lines of text under tile c of row r."""
    side, font = index_thumbs.shape[1], ImageFont.load_default()
    queries = [captioned(Image.fromarray(q).resize((side, side), Image.Resampling.LANCZOS), lines[0], font)
               for q, lines in zip(query_thumbs, captions)]
    neighbours = [captioned(Image.fromarray(index_thumbs[i]), lines, font)
                  for row, row_captions in zip(rows, captions) for i, lines in zip(row, row_captions[1:])]
    left = figures.grid(queries, 1, gap=GAP)
    right = figures.grid(neighbours, rows.shape[1], gap=GAP)
    return np.concatenate([left, np.full((len(left), QUERY_GAP, 3), 255, np.uint8), right], 1)


def captioned(tile, lines, font):
    """uint8 [side + 2 lines, side, 3]: the tile with its lines of text below it, cut to its width."""
    line = font.getbbox("Ag")[3] + 2
    image = Image.new("RGB", (tile.width, tile.height + 2 * line), "white")
    image.paste(tile, (0, 0))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(lines):
        while text and draw.textlength(text, font=font) > tile.width:
            text = text[:-1]
        draw.text((0, tile.height + i * line), text, fill="black", font=font)
    return np.asarray(image)


def run(saved_model, index, queries, k=6, output_dir="neighbors", batch_size=64):
    """Writes neighbors.png and neighbors.tsv under output_dir; returns their paths."""
    if not saved_model or not index or not queries:
        raise UserError("--saved_model, --index and --queries are all required")
    if k < 1:
        raise UserError(f"-k must be positive, got {k}")
    features = embed.load_features(saved_model)
    if os.path.isfile(os.path.join(index, projector_metadata.PROJECTOR_FILENAME)):
        made_by, ours = embed.embedded_with(index), embed.fingerprint(saved_model)
        if made_by["fingerprint"] != ours:
            raise UserError(f"--index {index} was embedded by {made_by['saved_model']} (fingerprint "
                             f"{made_by['fingerprint'][:12]}), not by --saved_model {saved_model} ({ours[:12]}): "
                             "its distances would mean nothing; run embed with this export")
        found = read_logdir(index)
    else:
        found = embed_folder(features, index, batch_size)
    asked = embed_folder(features, queries, batch_size)
    if asked.fc7.shape[1] != found.fc7.shape[1]:
        raise UserError(f"queries have {asked.fc7.shape[1]} features but the index {found.fc7.shape[1]}")
    rows, distances = nearest(asked.fc7, found.fc7, min(k, len(found.fc7)))
    os.makedirs(output_dir, exist_ok=True)
    png, tsv = os.path.join(output_dir, "neighbors.png"), os.path.join(output_dir, "neighbors.tsv")
    captions = [[query_caption(query)] + [neighbour_caption(found.labels[i], d) for i, d in zip(row, distance)]
                for query, row, distance in zip(asked.files, rows, distances)]
    Image.fromarray(grid_image(asked.thumbs, found.thumbs, rows, captions)).save(png)
    with open(tsv, "w", encoding="utf-8") as f:
        f.write("query\trank\tfile\tlabel\tdistance\n")
        for query, row, distance in zip(asked.files, rows, distances):
            for rank, (i, d) in enumerate(zip(row, distance), 1):
                f.write(f"{embed.tsv_field(query)}\t{rank}\t{embed.tsv_field(found.files[i])}\t"
                        f"{embed.tsv_field(found.labels[i])}\t{d:.6g}\n")
    return png, tsv


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("saved_model", None, "SavedModel from keras_alexnet.export (its features signature).")
    flags.DEFINE_string("index", None, "A keras_alexnet.embed log dir, or a folder of images to search.")
    flags.DEFINE_string("queries", None, "A folder of query images (class folders or flat).")
    flags.DEFINE_integer("k", 6, "Neighbours per query (Figure 4 shows 6).")
    flags.DEFINE_string("output_dir", "runs/neighbors", "Where neighbors.png and neighbors.tsv go.")
    flags.DEFINE_integer("batch_size", 64, "Images per call of the signature.")


@cli.reports_errors
def main(argv):
    del argv
    png, tsv = run(FLAGS.saved_model, FLAGS.index, FLAGS.queries, FLAGS.k, FLAGS.output_dir, FLAGS.batch_size)
    print(f"wrote {png} and {tsv}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
