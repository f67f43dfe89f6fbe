"""python -m keras_alexnet.prepare: section 2's preprocessing done once, into TFDS array_record files.

    python -m keras_alexnet.prepare --dataset=DATASET --output=DIR [--splits=train,validation] [--processes=N]

Each image of each split is decoded, its shorter side rescaled to 256 and its central 256x256 patch kept
(preprocess.resize_and_crop, as training does it on the fly), and stored as a JPEG of --quality (95,
without chroma subsampling) in shards of array_record files with TFDS's metadata
(tfds.folder_dataset.write_metadata): `--dataset=DIR` then trains, evaluates, ... from it with random
access (sources.load_source), and `tfds.builder_from_directory(DIR).as_data_source(split)` reads it
without keras_alexnet. Training decodes small JPEGs instead of the originals.

--processes workers (spawn) write whole shards, each under a temporary name renamed once complete
(files.atomic_write), then its part file in DIR/parts/ (records written, files skipped with the reason,
the statistics' sums). Run again after a kill, a prepare keeps the finished shards; settings other than
those DIR/prepare.json stores are refused. Once every shard is there: DIR/skipped.txt, DIR/stats.npz
(section 2's mean image and section 4.1's RGB eigen figures of the training split as stored, merged
from the shards' sums: stats.add_sums) and, last, TFDS's dataset_info.json and features.json.
"""
import functools
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import threading
import traceback

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from keras_alexnet import cli, preprocess, progress, sources, stats
from keras_alexnet.checkpoint import LOCK, RunLock
from keras_alexnet.errors import UserError
from keras_alexnet.files import atomic_write, write_file

NAME = "prepared"  # The TFDS dataset name in the shards' file names.
PARTS, SKIPPED, STATS = "parts", "skipped.txt", "stats.npz"
BATCH = 64  # Images a `stats.batch_sums` call adds.


def shard_name(split, index, count):
    """TFDS's default file name template, {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}."""
    return f"{NAME}-{split}.array_record-{index:05d}-of-{count:05d}"


def shard_bounds(examples, count, index):
    """Records [start, stop) of shard `index` of `count`: the split cut as tfds.even_splits cuts it."""
    size, extra = divmod(examples, count)
    start = size * index + min(index, extra)
    return start, start + size + (index < extra)


def features(class_names):
    """The TFDS features of a record: the 256x256 JPEG and its label."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=list(class_names))})


def _shards(facts, split):
    return max(1, math.ceil(facts["examples"][split] / facts["shard_size"]))


def _paths(output, split, index, count):
    """(shard, part file) of shard `index` of `count` of `split`."""
    return (os.path.join(output, shard_name(split, index, count)),
            os.path.join(output, PARTS, f"{split}-{index:05d}-of-{count:05d}.npz"))


def _read_part(output, split, index, count):
    """The part file of a finished shard (its records count matches the shard's), else None."""
    shard, part = _paths(output, split, index, count)
    if not (tf.io.gfile.exists(shard) and tf.io.gfile.exists(part)):
        return None
    try:
        with tf.io.gfile.GFile(part, "rb") as f:
            arrays = dict(np.load(io.BytesIO(f.read())))
        reader = ArrayRecordReader(shard)
        complete = reader.num_records() == int(arrays["records"])
        reader.close()
    except (OSError, ValueError, RuntimeError, KeyError):  # Damaged: written anew.
        return None
    return arrays if complete else None


# ----------------------------------------------------------------------------- in the workers

def _start_worker():
    """Pool initializer: the worker ends when the parent does (kill -9 too), so no orphan renames a
    shard while the prepare run again writes it."""
    parent = multiprocessing.parent_process()
    threading.Thread(target=lambda: (multiprocessing.connection.wait([parent.sentinel]), os._exit(1)),
                     daemon=True).start()


@functools.lru_cache(maxsize=None)
def _reader(dataset, data_dir, split, class_names, quality):
    """(the split's Source, payload -> (JPEG, the image it decodes to), the TFDS features), once a worker."""
    source = sources.load_source(dataset, split, data_dir, class_names=list(class_names))

    @tf.function
    def convert(payload):
        image = preprocess.resize_and_crop(source.load(payload))
        jpeg = tf.io.encode_jpeg(image, quality=quality, chroma_downsampling=False)
        return jpeg, preprocess.decode(jpeg)

    return source, convert, features(class_names)


def _write_shard(facts, task):
    """Pool worker: writes shard `index` of `split` and its part file; returns the input images it covered."""
    try:
        return _write(facts, *task)
    except tf.errors.OpError as error:  # Its class does not unpickle in the parent.
        raise (OSError(cli.one_line(error)) if cli.is_bad_input(error) else RuntimeError(traceback.format_exc()))


def _write(facts, split, index):
    """The shard's records: each image that loads, resized and cropped, as a JPEG; those that do not, listed."""
    source, convert, encoder = _reader(facts["dataset"], facts["data_dir"], split, tuple(facts["class_names"]),
                                       facts["quality"])
    count = _shards(facts, split)
    start, stop = shard_bounds(facts["examples"][split], count, index)
    if source.lookup is not None:
        part = sources.random_access(stop - start, lambda i: source.lookup(i + start), source.load,
                                     source.class_names)
    else:  # Read in order (TFDS tfrecord files): only the files of this part.
        part = sources.load_source(facts["dataset"], split, facts["data_dir"], class_names=facts["class_names"],
                                   part=(index, count))
    sums, skipped, images, records = {}, [], [], 0
    shard, part_file = _paths(facts["output"], split, index, count)
    with atomic_write(shard) as temporary:
        writer = ArrayRecordWriter(temporary, "group_size:1")  # As TFDS writes array_record: one record a chunk.
        for position, (payload, label) in enumerate(part.records, start):
            try:
                jpeg, image = convert(payload)
            except tf.errors.OpError as error:  # Unreadable, not an image, cut short, too small or too large.
                name = payload.numpy().decode() if facts["paths"] else f"{split} record {position}"
                skipped.append(f"{name}\t{cli.one_line(error)}")
                continue
            writer.write(encoder.serialize_example({"image": jpeg.numpy(), "label": int(label)}))
            records += 1
            if split == "train":  # The statistics are of the images as stored, which training decodes.
                images.append(image)
                if len(images) == BATCH:
                    sums, images = stats.add_sums(sums, stats.batch_sums(tf.stack(images))), []
        if images:
            sums = stats.add_sums(sums, stats.batch_sums(tf.stack(images)))
        writer.close()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, records=records, skipped=np.array(skipped, str),
                        **{key: np.asarray(value) for key, value in sums.items()})
    write_file(part_file, buffer.getvalue())
    return stop - start


# ----------------------------------------------------------------------------- in the parent

def _check_output(output, facts):
    """Refuses an --output of other files, or one a prepare of other facts began (one line naming the first
    difference)."""
    path = os.path.join(output, sources.PREPARE_FACTS)
    if not tf.io.gfile.exists(path):
        if tf.io.gfile.exists(output) and set(tf.io.gfile.listdir(output)) - {LOCK}:
            raise UserError(f"--output {output} holds files but no {sources.PREPARE_FACTS}: name a new or empty "
                            "folder")
        return
    try:
        with tf.io.gfile.GFile(path) as f:
            stored = json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is damaged: line {error.lineno}, column {error.colno}: {error.msg} (delete "
                        f"{output} to prepare it anew)") from None
    for key in facts:
        if stored.get(key) != facts[key]:
            raise UserError(f"{output} was prepared with {key} {_shown(stored.get(key))}, not {_shown(facts[key])}: "
                            "give the same settings to resume it, or another --output")


def _shown(value):
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finish(facts, output):
    """Once every shard is written: skipped.txt, stats.npz and TFDS's metadata (last). Returns (the
    records of each split, the skipped lines, the training split's Stats or None)."""
    records, skipped, split_infos, sums = {}, [], [], {}
    for split in facts["examples"]:
        count = _shards(facts, split)
        parts = [_read_part(output, split, index, count) for index in range(count)]
        records[split] = [int(part["records"]) for part in parts]
        skipped += [f"{split}\t{line}" for part in parts for line in part["skipped"]]
        if split == "train":
            for part in parts:
                sums = stats.add_sums(sums, {key: part[key] for key in ("image", "pixel", "outer", "count")
                                             if key in part})
        num_bytes = sum(tf.io.gfile.stat(_paths(output, split, index, count)[0]).length for index in range(count))
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=records[split], num_bytes=num_bytes))
    write_file(os.path.join(output, SKIPPED), "".join(line + "\n" for line in skipped))
    train_stats = stats.stats_from_sums(sums) if "train" in facts["examples"] else None
    if train_stats:
        train_stats.save(os.path.join(output, STATS))
    tfds.folder_dataset.write_metadata(
        data_dir=output, features=features(facts["class_names"]), split_infos=split_infos, check_data=False,
        supervised_keys=("image", "label"),
        description=f"{facts['dataset']} as section 2 of Krizhevsky et al. 2012 prepares it: the shorter side "
                    f"rescaled to 256, the central 256x256 patch, stored as JPEG of quality {facts['quality']} "
                    "(python -m keras_alexnet.prepare).")
    return records, skipped, train_stats


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("dataset", None, "A folder of class folders, a TFDS name, or 'synthetic'.", required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_string("output", None, "The folder to write (a TFDS dataset: --dataset=OUTPUT reads it).",
                        required=True)
    flags.DEFINE_list("splits", ["train", "validation"], "Splits to prepare.")
    flags.DEFINE_integer("shard_size", 1024, "Images a shard holds at most (about 30 KB each).")
    flags.DEFINE_integer("quality", 95, "JPEG quality of the stored 256x256 images (1-100).")
    flags.DEFINE_integer("processes", len(os.sched_getaffinity(0)), "Worker processes (default: the cores this "
                         "process may use), each writing whole shards.")


@cli.reports_errors
def main(argv):
    del argv
    if not 1 <= FLAGS.quality <= 100:
        raise UserError(f"--quality must be in 1-100, got {FLAGS.quality}")
    for name in ("shard_size", "processes"):
        if FLAGS[name].value < 1:
            raise UserError(f"--{name} must be positive, got {FLAGS[name].value}")
    dataset, output = FLAGS.dataset, FLAGS.output
    folder = tf.io.gfile.isdir(dataset)
    class_names = sources.load_source(dataset, "train", FLAGS.data_dir).class_names
    splits = list(dict.fromkeys({"val": "validation"}.get(split, split) for split in FLAGS.splits))
    facts = {"dataset": os.path.abspath(dataset) if folder and "://" not in dataset else dataset,
             "data_dir": FLAGS.data_dir, "splits": splits, "shard_size": FLAGS.shard_size, "quality": FLAGS.quality,
             "class_names": class_names,
             "examples": {split: sources.load_source(dataset, split, FLAGS.data_dir, class_names=class_names)
                          .num_examples for split in splits}}
    _check_output(output, facts)  # Before the lock file: a folder of other files is left untouched.
    lock = RunLock(output)
    try:
        if not tf.io.gfile.exists(os.path.join(output, sources.PREPARE_FACTS)):
            write_file(os.path.join(output, sources.PREPARE_FACTS), json.dumps(facts, indent=1))
        tf.io.gfile.makedirs(os.path.join(output, PARTS))
        shards = {split: _shards(facts, split) for split in splits}
        tasks = [(split, index) for split in splits for index in range(shards[split])
                 if _read_part(output, split, index, shards[split]) is None]
        total = sum(stop - start for start, stop in (shard_bounds(facts["examples"][split], shards[split], index)
                                                     for split, index in tasks))
        kept = sum(shards.values()) - len(tasks)
        print(f"{output}: {len(tasks)} shards of {total} images to write" + (f", {kept} kept" if kept else ""),
              flush=True)
        work = {**facts, "output": output, "paths": folder and not sources.is_prepared(dataset)}
        if tasks:
            bar = progress.progress_bar(total, "image")
            with multiprocessing.get_context("spawn").Pool(min(FLAGS.processes, len(tasks)), _start_worker) as pool:
                for done in pool.imap_unordered(functools.partial(_write_shard, work), tasks):
                    bar.add(done)
        records, skipped, train_stats = _finish(work, output)
    finally:
        lock.release()
    print(f"wrote {output}: " + ", ".join(f"{split} {sum(counts)} images in {len(counts)} shards"
                                          for split, counts in records.items())
          + f"; skipped {len(skipped)} that do not load ({os.path.join(output, SKIPPED)})")
    for line in skipped[:10]:
        print("  skipped " + line.replace("\t", ": ", 1).replace("\t", " (", 1) + ")")
    if train_stats:
        rounded = lambda values, digits: [round(float(value), digits) for value in values]
        print(f"{os.path.join(output, STATS)}: channel mean {rounded(train_stats.channel_mean, 2)}, "
              f"eigenvalues {rounded(train_stats.eigenvalues, 4)}")
        print(f"next: python -m keras_alexnet.train --dataset={output} --stats={os.path.join(output, STATS)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
