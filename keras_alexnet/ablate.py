"""python -m keras_alexnet.ablate: the paper's design choices re-run in small, each against one baseline.

Every variant trains from the same seed with the same data and flags as the baseline, changing one thing:
LRN (section 3.3), overlapping pooling (3.4), dropout (4.2), PCA lighting (4.1), two towers (3.2); the
baseline's final model is also tested with the 10-crop test (4.1). Writes OUTPUT_DIR/ablation.md (one
table) and OUTPUT_DIR/curves.png (validation top-1 error per epoch).
"""
import dataclasses
import datetime
import json
import math
import multiprocessing
import os

import tensorflow as tf
from absl import app, flags

from keras_alexnet import checkpoint, cli, config, data, distribute, metrics, preprocess, sources, weights
from keras_alexnet.epoch_rules import TrainingStuck
from keras_alexnet.errors import UserError
from keras_alexnet.files import atomic_write
from keras_alexnet.trainer import Trainer, set_up_process

VARIANTS = {  # name: (what it tests, Config changes, build_alexnet changes)
    "baseline": ("the paper's network", {}, {}),
    "no_lrn": ("without LRN (3.3)", {}, {"lrn": False}),
    "pool_2x2": ("non-overlapping 2x2/2 pooling (3.4)", {}, {"pool_size": 2, "pool_stride": 2}),
    "no_dropout": ("without dropout (4.2)", {"dropout_rate": 0.0}, {}),
    "no_pca": ("without PCA lighting (4.1)", {"pca_lighting": False}, {}),
    "one_tower": ("one tower of the same width (3.2)", {}, {"towers": 1}),
}

FLAGS = flags.FLAGS


def variant_config(base, name, output_dir):
    _, changes, model_changes = VARIANTS[name]
    return dataclasses.replace(base, **changes, model={**base.model, **model_changes},
                               model_dir=os.path.join(output_dir, name), export_dir=None)


def read_history(model_dir):
    with tf.io.gfile.GFile(os.path.join(model_dir, checkpoint.HISTORY)) as f:
        return [json.loads(line) for line in f]


def ten_crop_error(model_dir, base):
    """Top-1 and top-5 error of a finished run's model with the paper's 10-crop test."""
    model, run, _ = weights.restore_model(model_dir)
    source = sources.load_source(base.dataset, "validation", base.data_dir, seed=base.seed)
    dataset = data.eval_pipeline(source, base.batch_size, preprocess.Stats.load(run.stats_path), ten_crop=True,
                                 steps=base.eval_steps)
    return metrics.evaluate(metrics.make_eval_step(tf.distribute.get_strategy(), model), dataset)


def standard_error(error, n):
    """Standard error of an error rate measured on n images: a difference under ~2 of these is noise."""
    return math.sqrt(max(error * (1 - error), 1e-12) / max(n, 1))


def table(results, ten_crop, n):
    """The markdown table: final (and best) validation errors, train-val gap and speed per variant."""
    base = results["baseline"][-1]["validation"]["top1_error"] if "baseline" in results else None
    se = standard_error(base if base is not None else 0.5, n)
    lines = [f"Ablation of {n} validation images, {datetime.date.today().isoformat()}; the standard error of a "
             f"top-1 error near the baseline's is {se:.1%}, so differences under {2 * se:.1%} (2 SE) are noise.",
             "", "| variant | what | val top-1 err | val top-5 err | best val top-1 err (epoch) | train-val gap | img/s "
                 "| vs baseline |", "|---|---|---|---|---|---|---|---|"]
    for name, history in results.items():
        last = history[-1]
        top1 = last["validation"]["top1_error"]
        gap = top1 - last["train"]["top1_error"]
        verdict = "" if base is None or name == "baseline" else (
            f"{top1 - base:+.1%}" + (" (within noise)" if abs(top1 - base) < 2 * se else ""))
        best = min(history, key=lambda h: h["validation"]["top1_error"])
        lines.append(f"| {name} | {VARIANTS[name][0]} | {top1:.1%} | {last['validation']['top5_error']:.1%} | "
                     f"{best['validation']['top1_error']:.1%} ({best['epoch']}) | {gap:+.1%} | "
                     f"{last['images_per_second']:.1f} | {verdict} |")
    if ten_crop is not None:
        delta = ten_crop["top1_error"] - base
        lines.append(f"| baseline, 10-crop test | 10-crop test (4.1) | {ten_crop['top1_error']:.1%} | "
                     f"{ten_crop['top5_error']:.1%} | | | | {delta:+.1%}"
                     f"{' (within noise)' if abs(delta) < 2 * se else ''} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    for name, history in results.items():
        epochs = [h["epoch"] for h in history]
        axes[0].plot(epochs, [h["train"]["loss"] for h in history], label=name)
        axes[1].plot(epochs, [h["validation"]["top1_error"] for h in history], label=name)
    for ax, title in zip(axes, ["training loss", "validation top-1 error"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend()
    figure.tight_layout()
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")


@cli.reports_errors
def train_variant(config):
    """Trains one variant in this process; run in a child process, so each starts with fresh memory."""
    distribute.split_cpu(config.cpu_devices)
    strategy, plan = distribute.make_strategy(config.towers_per_replica)
    set_up_process(config)
    try:
        Trainer(config, strategy, plan).fit()
    except TrainingStuck as error:  # Its epochs so far still go in the table.
        print(f"{config.model_dir}: {error}")


def run_ablation(base, names, output_dir):
    results = {}
    processes = multiprocessing.get_context("spawn")
    for name in names:
        print(f"\n=== {name}: {VARIANTS[name][0]}", flush=True)
        config = variant_config(base, name, output_dir)
        if not (tf.io.gfile.exists(os.path.join(config.model_dir, checkpoint.HISTORY))
                and len(read_history(config.model_dir)) >= config.epochs):
            child = processes.Process(target=train_variant, args=(config,))
            child.start()
            child.join()
            if child.exitcode:
                raise UserError(f"variant {name} failed with exit code {child.exitcode} (its error is above)")
        results[name] = read_history(config.model_dir)
    ten_crop = ten_crop_error(variant_config(base, "baseline", output_dir).model_dir, base) \
        if "baseline" in names else None
    n = results[names[0]][-1]["validation"]["images"]
    tf.io.gfile.makedirs(output_dir)
    markdown = table(results, ten_crop, n)
    with atomic_write(os.path.join(output_dir, "ablation.md")) as temporary, tf.io.gfile.GFile(temporary, "w") as f:
        f.write(markdown)
    plot(results, os.path.join(output_dir, "curves.png"))
    print("\n" + markdown)
    return markdown


@cli.reports_errors
def main(argv):
    del argv
    unknown = set(FLAGS.variants) - set(VARIANTS)
    if unknown:
        raise UserError(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    run_ablation(config.config_from_flags(), FLAGS.variants, FLAGS.output_dir)


if __name__ == "__main__":
    config.define_flags()
    flags.DEFINE_string("output_dir", "runs/ablate", "One run directory per variant, the table and the plot.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of: {', '.join(VARIANTS)}.")
    app.run(main)
