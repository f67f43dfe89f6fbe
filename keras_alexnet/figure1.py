"""python -m keras_alexnet.figure1: Figure 1 (ReLU against tanh) and section 3.3's CIFAR-scale LRN result.

The net is Figure 1's "four-layer convolutional neural network" as cuda-convnet's CIFAR-10 example
(layers-80sec.cfg) has it: three 5x5 convolutions of 32, 32 and 64 maps (stride 1, padded), each followed
by 3x3/2 pooling (max, average, average), and a fully-connected softmax layer. Input: 32 x 32 pixels in
0-255 minus the mean training image (section 2); weights N(0, 0.01), biases 0 (section 5); section 5's SGD
(momentum 0.9, batches of 128) without weight decay; no dropout, no augmentation (Figure 1: no regularisation).

figure1: per activation, a learning-rate sweep on seed 0 keeps the rate that reaches 25% training error in
the fewest epochs ("chosen independently to make training as fast as possible"), or, where none does, the
lowest error; then --seeds seeds at it. The training error is a pass over the training set after each epoch
(epoch 0: the untrained net). lrn: the ReLU net at its kept rate without and with LRN after the ReLUs of the
first two layers (where the paper puts it, section 3.5), the paper's k = 2, n = 5, alpha = 1e-4 (per term,
as the paper's formula), beta = 0.75; test error after the last epoch; the same seeds give both nets the same
initial weights and batch order, so the difference is taken seed by seed.

Writes OUTPUT_DIR/figure1.png, figure1.md, lrn.md and histories.json (every run's history).
"""
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_alexnet import cli, sources
from keras_alexnet.errors import UserError
from keras_alexnet.files import write_file, write_png
from keras_alexnet.lrn import LocalResponseNormalization
from keras_alexnet.optimizer import PaperSGD
from keras_alexnet.preprocess import resize_and_crop

SIZE = 32
TARGET = 0.25  # Figure 1's training error.
EXPERIMENTS = ("figure1", "lrn")
ACTIVATIONS = {"relu": "ReLU", "tanh": "tanh"}

FLAGS = flags.FLAGS


def load_split(dataset, split, max_images=None):
    """(uint8 [N, 32, 32, 3], int labels, class names) of a split: each image's shorter side to 32 and its
    centre crop (section 2's rule at 32 pixels; CIFAR-10's images are unchanged). Unreadable files are skipped."""
    source = sources.load_source(dataset, split)
    records = source.records.take(max_images) if max_images else source.records
    images = records.interleave(  # Each image's decode errors ignored alone: a record that cannot be read is an error.
        lambda payload, label: tf.data.Dataset.from_tensors((payload, label)).map(
            lambda payload, label: (resize_and_crop(source.load(payload), SIZE), label)).ignore_errors(),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = list(images.batch(1024).as_numpy_iterator())
    if not batches:
        raise UserError(f"{dataset} ({split}) has no readable images")
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]), source.class_names


def four_layer_net(activation, classes, lrn=False):
    """The module docstring's net, with LRN after the first two layers' activations if `lrn`."""
    layers, init = keras.layers, keras.initializers.RandomNormal(0.0, 0.01)
    x = inputs = keras.Input((SIZE, SIZE, 3))
    for i, (maps, pool) in enumerate([(32, layers.MaxPooling2D), (32, layers.AveragePooling2D),
                                      (64, layers.AveragePooling2D)]):
        x = layers.Conv2D(maps, 5, padding="same", activation=activation, kernel_initializer=init)(x)
        if lrn and i < 2:
            x = LocalResponseNormalization(depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)(x)
        x = pool(3, 2, padding="same")(x)
    outputs = layers.Dense(classes, activation="softmax", kernel_initializer=init)(layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def train(data, classes, activation, learning_rate, seed, epochs, batch_size, lrn=False):
    """History [{epoch, train_error, test_error}] for epochs 0 (untrained) .. `epochs`, or to a diverged one."""
    (x, y), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)  # The initial weights and each epoch's batch order.
    model = four_layer_net(activation, classes, lrn)
    model.compile(PaperSGD(learning_rate, momentum=0.9, weight_decay=0), "sparse_categorical_crossentropy",
                  jit_compile=False)
    history, loss = [], 0.0
    for epoch in range(epochs + 1):
        if epoch:
            loss = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0).history["loss"][-1]
        history.append({"epoch": epoch, "train_error": error_rate(model, x, y),
                        "test_error": error_rate(model, x_test, y_test)})
        if not math.isfinite(loss):  # Diverged: its weights are NaN from here on.
            break
    return history


def error_rate(model, images, labels, batch_size=500):
    """Top-1 error of `model` on the images, called eagerly a batch at a time (predict traces per model)."""
    predicted = np.concatenate([np.argmax(model(images[i:i + batch_size], training=False), -1)
                                for i in range(0, len(images), batch_size)])
    return float(np.mean(predicted != labels))


def epochs_to_target(history, target):
    """Epochs until the training error first reaches `target`, linear between epochs; None if it never does."""
    previous = None
    for h in history:
        if h["train_error"] <= target:
            if previous is None:
                return float(h["epoch"])
            fraction = (previous["train_error"] - target) / (previous["train_error"] - h["train_error"])
            return previous["epoch"] + fraction * (h["epoch"] - previous["epoch"])
        previous = h
    return None


def fastest(sweep):
    """The kept rate of {rate: history}: fewest epochs to TARGET, else the lowest training error."""
    def speed(rate):
        epochs = epochs_to_target(sweep[rate], TARGET)
        return (math.inf if epochs is None else epochs, min(h["train_error"] for h in sweep[rate]))
    return min(sweep, key=speed)


def common_target(histories):
    """TARGET, or the lowest training error all `histories` reach if one of them does not reach TARGET."""
    return max(TARGET, *(min(h["train_error"] for h in history) for history in histories))


def mean_sd(values):
    """Mean and sample standard deviation (nan for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def figure1_table(sweep_rows, seed_epochs, kept, target, epochs, dataset):
    """figure1.md: the sweep, the epochs each seed needs to reach `target`, and tanh / ReLU beside the paper's 6."""
    goal = f"{target:.0%} training error" if target == TARGET else (
        f"{target:.1%} training error, the lowest every run reaches (25% is not reached in {epochs} epochs)")
    lines = [f"Figure 1 on {dataset} at 32 x 32, {epochs} epochs; training error after each epoch "
             "(a pass over the training set).", "", "Sweep (seed 0):", "",
             "| activation | learning rate | epochs to 25% | lowest training error | kept |", "|---|---|---|---|---|"]
    lines += [f"| {ACTIVATIONS[a]} | {rate:g} | {'-' if e is None else f'{e:.1f}'} | {low:.1%} | "
              f"{'yes' if kept[a] == rate else ''} |" for a, rate, e, low in sweep_rows]
    lines += ["", f"Epochs to reach {goal}:", "",
              "| activation | kept rate | per seed | mean | spread (sd) | paper |", "|---|---|---|---|---|---|"]
    for activation, values in seed_epochs.items():
        mean, sd = mean_sd(values)
        lines.append(f"| {ACTIVATIONS[activation]} | {kept[activation]:g} | {', '.join(f'{v:.1f}' for v in values)} "
                     f"| {mean:.1f} | {sd:.1f} | |")
    if len(seed_epochs) == 2:
        ratios = [t / r if r else math.inf for r, t in zip(seed_epochs["relu"], seed_epochs["tanh"])]
        mean, sd = mean_sd(ratios)
        lines.append(f"| tanh / ReLU (seed by seed) | | {', '.join(f'{v:.2f}' for v in ratios)} | {mean:.2f} | "
                     f"{sd:.2f} | six times (at 25%) |")
    return "\n".join(lines) + "\n"


def lrn_table(without, with_lrn, rate, epochs, dataset):
    """lrn.md: test error without and with LRN beside the paper's 13% / 11%, and whether the gap is resolved."""
    final = lambda histories: [h[-1]["test_error"] for h in histories]
    lowest = lambda histories: np.mean([min(e["test_error"] for e in h) for h in histories])
    rows = [("without LRN", final(without), "13%"), ("with LRN", final(with_lrn), "11%")]
    differences = [w - o for o, w in zip(rows[0][1], rows[1][1])]
    difference, sd = mean_sd(differences)
    se = sd / math.sqrt(len(differences))
    verdict = "not resolved: one seed gives no spread" if math.isnan(se) else (
        f"resolved: LRN {'lowers' if difference < 0 else 'raises'} the test error" if abs(difference) >= 2 * se
        else "not resolved at this size: |difference| < 2 standard errors")
    lines = [f"Section 3.3 on {dataset} at 32 x 32: the four-layer ReLU net, learning rate {rate:g}, test error "
             f"after {epochs} epochs, {len(differences)} seeds.", "",
             "| net | test error per seed | mean | spread (sd) | paper (CIFAR-10) |", "|---|---|---|---|---|"]
    for name, values, paper in rows:
        mean, spread = mean_sd(values)
        lines.append(f"| {name} | {', '.join(f'{v:.1%}' for v in values)} | {mean:.1%} | {spread:.1%} | {paper} |")
    lines += [f"| with - without (seed by seed) | {', '.join(f'{v:+.1%}' for v in differences)} | {difference:+.1%} "
              f"| standard error {se:.1%} | -2% |", "", f"The difference is {verdict}. The lowest test error over the "
              f"epochs (picked on the test set, so optimistic), mean over seeds: without LRN {lowest(without):.1%}, "
              f"with LRN {lowest(with_lrn):.1%}."]
    return "\n".join(lines) + "\n"


def plot(seed_runs, target, path):
    """figure1.png: training error against epochs, as Figure 1 (solid ReLU, dashed tanh), one line a seed."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for (activation, histories), style, colour in zip(seed_runs.items(), ["-", "--"], ["C0", "C3"]):
        for i, history in enumerate(histories):
            axes.plot([h["epoch"] for h in history], [h["train_error"] for h in history], style, color=colour,
                      label=ACTIVATIONS[activation] if i == 0 else None)
    axes.axhline(target, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("Epochs")
    axes.set_ylabel("Training error rate")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_png(figure, path)
    pyplot.close(figure)


def define_flags():
    flags.DEFINE_list("experiment", list(EXPERIMENTS), f"Experiments to run, of: {', '.join(EXPERIMENTS)}.")
    flags.DEFINE_string("dataset", "cifar10", "TFDS name (its train and test splits; prepared) or a folder of "
                        "class folders (its train and val folders, else a held-out 10%).")
    flags.DEFINE_string("output_dir", "runs/figure1", "Where the figure, the tables and histories.json go.")
    flags.DEFINE_integer("seeds", 3, "Seeds at the kept learning rates (seed 0 is the sweep's).")
    flags.DEFINE_integer("epochs", 20, "Epochs of every run (the budget).")
    flags.DEFINE_list("learning_rates", ["0.003", "0.01", "0.03", "0.1"],
                      "The sweep, the same rates for each activation.")
    flags.DEFINE_integer("batch_size", 128, "Images per step (section 5: 128).")
    flags.DEFINE_integer("max_images", None, "Use only the first N images of each split.")


@cli.reports_errors
def main(argv):
    del argv
    unknown = set(FLAGS.experiment) - set(EXPERIMENTS)
    try:
        rates = [float(rate) for rate in FLAGS.learning_rates]
    except ValueError:
        raise UserError(f"--learning_rates must be numbers, not {','.join(FLAGS.learning_rates)}") from None
    if unknown or not FLAGS.experiment:
        raise UserError(f"--experiment: choose from {', '.join(EXPERIMENTS)}, not {sorted(unknown)}")
    if FLAGS.seeds < 1 or FLAGS.epochs < 1 or FLAGS.batch_size < 1 or not rates or min(rates) <= 0:
        raise UserError("--seeds, --epochs, --batch_size and each of --learning_rates must be positive")

    is_tfds = not (tf.io.gfile.isdir(FLAGS.dataset) or FLAGS.dataset == "synthetic")
    # TFDS: all of train ("train" would hold out 10% of it) and the test split.
    train_x, train_y, classes = load_split(FLAGS.dataset, "train[:100%]" if is_tfds else "train", FLAGS.max_images)
    test_x, test_y, _ = load_split(FLAGS.dataset, "test" if is_tfds else "validation", FLAGS.max_images)
    mean = train_x.astype(np.float32).mean(0)
    data = ((train_x - mean, train_y), (test_x - mean, test_y))
    print(f"{FLAGS.dataset}: {len(train_y)} training and {len(test_y)} test images of {len(classes)} classes "
          f"at {SIZE} x {SIZE}", flush=True)

    activations = ["relu", "tanh"] if "figure1" in FLAGS.experiment else ["relu"]
    seeds = range(FLAGS.seeds)
    total = (len(activations) * (len(rates) + FLAGS.seeds - 1) + ("lrn" in FLAGS.experiment) * FLAGS.seeds)
    runs, started = {}, time.perf_counter()

    def run(activation, rate, seed, lrn=False):
        key = (activation, rate, seed, lrn)
        if key not in runs:
            runs[key] = train(data, len(classes), activation, rate, seed, FLAGS.epochs, FLAGS.batch_size, lrn)
            last, elapsed = runs[key][-1], time.perf_counter() - started
            print(f"run {len(runs)}/{total}: {ACTIVATIONS[activation]}{' + LRN' if lrn else ''}, learning rate "
                  f"{rate:g}, seed {seed}: training error {last['train_error']:.1%}, test error "
                  f"{last['test_error']:.1%}; {elapsed / 60:.1f} min, about "
                  f"{elapsed / len(runs) * (total - len(runs)) / 60:.1f} min left", flush=True)
        return runs[key]

    kept = {a: fastest({rate: run(a, rate, 0) for rate in rates}) for a in activations}
    seed_runs = {a: [run(a, kept[a], seed) for seed in seeds] for a in activations}
    tf.io.gfile.makedirs(FLAGS.output_dir)
    reports = []
    if "figure1" in FLAGS.experiment:
        target = common_target([h for histories in seed_runs.values() for h in histories])
        sweep_rows = [(a, rate, epochs_to_target(runs[a, rate, 0, False], TARGET),
                       min(h["train_error"] for h in runs[a, rate, 0, False])) for a in activations for rate in rates]
        seed_epochs = {a: [epochs_to_target(h, target) for h in seed_runs[a]] for a in activations}
        reports.append(figure1_table(sweep_rows, seed_epochs, kept, target, FLAGS.epochs, FLAGS.dataset))
        write_file(os.path.join(FLAGS.output_dir, "figure1.md"), reports[-1])
        plot(seed_runs, target, os.path.join(FLAGS.output_dir, "figure1.png"))
    if "lrn" in FLAGS.experiment:
        with_lrn = [run("relu", kept["relu"], seed, lrn=True) for seed in seeds]
        reports.append(lrn_table(seed_runs["relu"], with_lrn, kept["relu"], FLAGS.epochs, FLAGS.dataset))
        write_file(os.path.join(FLAGS.output_dir, "lrn.md"), reports[-1])
    write_file(os.path.join(FLAGS.output_dir, "histories.json"), json.dumps({
        "dataset": FLAGS.dataset, "epochs": FLAGS.epochs, "target": TARGET,
        "kept_learning_rates": kept, "runs": [
            {"activation": a, "learning_rate": rate, "seed": seed, "lrn": lrn, "history": history}
            for (a, rate, seed, lrn), history in runs.items()]}, indent=1))
    print("\n" + "\n".join(reports) + f"\nwrote {FLAGS.output_dir}: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    define_flags()
    app.run(main)
