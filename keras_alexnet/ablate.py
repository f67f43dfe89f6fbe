"""python -m keras_alexnet.ablate: the paper's AlexNet comparisons re-run, each variant against one baseline.

Every variant (VARIANTS: the paper's claim, its section and figure) trains with the same data, seeds and
flags as the baseline, changing one thing; the baseline's final model is also tested with the 10-crop test
(4.1). Each variant trains once per seed (--seeds) in OUTPUT_DIR/<variant>/seed<seed>/: a run that has its
--epochs is not trained again, an unfinished one resumes from its checkpoint, so a killed ablate resumes.

A row's errors are the final epoch's, mean ± standard error over the seeds. Its difference from the baseline
is taken seed by seed (a seed draws the same images, batches and augmentation for every variant): d ± SE,
SE = sd of the differences / sqrt(seeds). The verdict tests the paper's direction, not its size (the
paper's figure stands beside it): d beyond 2 SE in the paper's direction confirms, beyond 2 SE against it
contradicts, else (or with one seed) cannot resolve; a row the paper makes no claim for says so. Writes
OUTPUT_DIR/ablation.md (the table) and OUTPUT_DIR/curves.png (training loss and validation top-1 error per
epoch, one line a seed).
"""
import collections
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import signal

import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_alexnet import checkpoint, cli, config, data, distribute, metrics, preprocess, sources, weights
from keras_alexnet.epoch_rules import TrainingStuck
from keras_alexnet.errors import UserError
from keras_alexnet.figure1 import mean_sd
from keras_alexnet.files import write_file, write_png
from keras_alexnet.model import ONE_GPU
from keras_alexnet.trainer import Trainer, set_up_process

# claim: what the row tests (paper section); paper: the paper's figure, as a variant's top-1 error minus the
# baseline's on ILSVRC; direction: that difference's sign in the paper (None: no claim); config, model:
# the Config and build_alexnet changes.
Variant = collections.namedtuple("Variant", "claim paper direction config model")
VARIANTS = {
    "baseline": Variant("the paper's network (3.5, Figure 2)", "40.7% top-1, 18.2% top-5 (ILSVRC-2012 val, Table 2)",
                        None, {}, {}),
    "no_lrn": Variant("LRN lowers the error (3.3)", "+1.4% top-1, +1.2% top-5", 1, {}, {"lrn": False}),
    "pool_2x2": Variant("overlapping 3x3/2 pooling beats 2x2/2 (3.4)", "+0.4% top-1, +0.3% top-5", 1, {},
                        {"pool_size": 2, "pool_stride": 2}),
    "no_dropout": Variant("without dropout the net overfits substantially (4.2)", "higher (no figure)", 1,
                          {"dropout_rate": 0.0}, {}),
    "no_pca": Variant("PCA lighting lowers the top-1 error (4.1)", "over +1% top-1", 1, {"pca_lighting": False},
                      {}),
    "one_gpu": Variant("two GPUs beat one with half the kernels in conv1-4 (3.2, footnote 2)",
                       "+1.7% top-1, +1.2% top-5", 1, {}, {"towers": 1, "halved": ONE_GPU}),
    "one_tower": Variant("one tower of the same total width, every layer fully connected (not in the paper; "
                         "3.2's comparison is one_gpu)", "none", None, {}, {"towers": 1}),
    "no_conv3": Variant("removing a middle conv layer costs about 2% top-1 (6)", "about +2% top-1", 1, {},
                        {"without": ["conv3"]}),
    "no_conv4": Variant("removing a middle conv layer costs about 2% top-1 (6)", "about +2% top-1", 1, {},
                        {"without": ["conv4"]}),
}
TEN_CROP = Variant("the 10-crop test (4.1): the baseline's final model", "none (the paper's test)", None, {}, {})

FLAGS = flags.FLAGS


def variant_config(base, name, output_dir, seed):
    variant = VARIANTS[name]
    return dataclasses.replace(base, **variant.config, seed=seed, model={**base.model, **variant.model},
                               model_dir=os.path.join(output_dir, name, f"seed{seed}"), export_dir=None)


def seed_list(values, first):
    """--seeds: one number N is N seeds from --seed on; two or more numbers are the seeds themselves."""
    try:
        seeds = [int(value) for value in values]
    except ValueError:
        raise UserError(f"--seeds must be a number of seeds or a list of seeds, not {','.join(values)}") from None
    if len(seeds) == 1:
        seeds = list(range(first, first + seeds[0]))
    if not seeds or len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds must give at least one seed, each once, not {','.join(values)}")
    return seeds


def read_history(model_dir):
    with tf.io.gfile.GFile(os.path.join(model_dir, checkpoint.HISTORY)) as f:
        return [json.loads(line) for line in f]


def ten_crop_error(config):
    """Top-1 and top-5 error of a finished run's model with the paper's 10-crop test, on its validation images."""
    model, run, _ = weights.restore_model(config.model_dir)
    source = sources.load_source(config.dataset, "validation", config.data_dir, seed=config.seed)
    dataset = data.eval_pipeline(source, config.batch_size, preprocess.Stats.load(run.stats_path), ten_crop=True,
                                 steps=config.eval_steps)
    return metrics.evaluate(metrics.make_eval_step(tf.distribute.get_strategy(), model), dataset)[1]


def standard_error(error, n):
    """Standard error of an error rate measured on n images: a difference under ~2 of these is noise."""
    return math.sqrt(max(error * (1 - error), 1e-12) / max(n, 1))


def mean_se(values):
    """Mean and standard error over seeds (nan for one seed)."""
    mean, sd = mean_sd(values)
    return mean, sd / math.sqrt(len(values))


def spread(values, sign=""):
    """'mean ± SE' over seeds, 'mean' for one seed."""
    mean, se = mean_se(values)
    return f"{mean:{sign}.1%}" + ("" if math.isnan(se) else f" ± {se:.1%}")


def verdict(differences, direction):
    """The module docstring's rule on the seed-by-seed differences from the baseline, in the paper's direction."""
    if direction is None:
        return "no claim"
    mean, se = mean_se(differences)
    if math.isnan(se):
        return "cannot resolve (one seed)"
    if abs(mean) <= 2 * se:
        return "cannot resolve"
    return "confirms" if mean * direction > 0 else "contradicts"


def row(name, variant, top1, top5, gap, speed, base):
    """One line of the table; `base` is the baseline's top-1 errors seed by seed, or None."""
    cells = [name, variant.claim, variant.paper, spread(top1), spread(top5), gap, speed, "", ""]
    if base is not None and name != "baseline":
        differences = [error - b for error, b in zip(top1, base)]
        cells[-2:] = [spread(differences, "+"), verdict(differences, variant.direction)]
    return "| " + " | ".join(cells) + " |"


def table(results, ten_crop, n, seeds):
    """The markdown table: per row its claim and the paper's figure, errors over the seeds, and the verdict."""
    top1 = {name: [h[-1]["validation"]["top1_error"] for h in histories] for name, histories in results.items()}
    base = top1.get("baseline")
    se = standard_error(np.mean(base) if base else 0.5, n)
    lines = [f"Ablation on {n} validation images, seeds {', '.join(map(str, seeds))}, "
             f"{datetime.date.today().isoformat()}: final-epoch errors, mean ± standard error over seeds; vs "
             "baseline: the seed-by-seed difference ± its standard error; verdict: beyond 2 standard errors in the "
             f"paper's direction or against it (ablate's docstring). One error rate on {n} images alone has a binomial "
             f"standard error of {se:.1%} near the baseline's.", "",
             "| variant | paper claim (section) | paper | val top-1 err | val top-5 err | train-val gap | img/s "
             "| vs baseline | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for name, histories in results.items():
        last = [h[-1] for h in histories]
        lines.append(row(name, VARIANTS[name], top1[name], [h["validation"]["top5_error"] for h in last],
                         spread([h["validation"]["top1_error"] - h["train"]["top1_error"] for h in last], "+"),
                         f"{np.mean([h['images_per_second'] for h in last]):.1f}", base))
    if ten_crop is not None:
        lines.append(row("baseline, 10-crop test", TEN_CROP, [t["top1_error"] for t in ten_crop],
                         [t["top5_error"] for t in ten_crop], "", "", base))
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    for i, (name, histories) in enumerate(results.items()):
        for k, history in enumerate(histories):  # One colour a variant, one line a seed.
            epochs = [h["epoch"] for h in history]
            label = name if k == 0 else None
            axes[0].plot(epochs, [h["train"]["loss"] for h in history], color=f"C{i}", label=label)
            axes[1].plot(epochs, [h["validation"]["top1_error"] for h in history], color=f"C{i}", label=label)
    for ax, title in zip(axes, ["training loss", "validation top-1 error"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend()
    figure.tight_layout()
    write_png(figure, path)
    pyplot.close(figure)


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


def run_ablation(base, names, output_dir, seeds):
    """Trains each variant for each seed (those not finished), then writes the table and the curves."""
    results = {name: [] for name in names}
    processes = multiprocessing.get_context("spawn")
    runs = [(seed, name) for seed in seeds for name in names]  # Seed by seed: a stopped ablate has whole seeds.
    for i, (seed, name) in enumerate(runs, 1):
        print(f"\n=== {name}, seed {seed} ({i}/{len(runs)}): {VARIANTS[name].claim}", flush=True)
        config = variant_config(base, name, output_dir, seed)
        if not (tf.io.gfile.exists(os.path.join(config.model_dir, checkpoint.HISTORY))
                and len(read_history(config.model_dir)) >= config.epochs):
            child = processes.Process(target=train_variant, args=(config,))
            child.start()
            try:
                child.join()
            finally:  # The ablate stopped (Ctrl-C, SIGTERM): so is its run, which saves as train does on SIGTERM.
                if child.is_alive():
                    child.terminate()
                    child.join()
            if child.exitcode:
                raise UserError(f"variant {name}, seed {seed} failed with exit code {child.exitcode} (its error "
                                "is above)")
        results[name].append(read_history(config.model_dir))
    ten_crop = [ten_crop_error(variant_config(base, "baseline", output_dir, seed)) for seed in seeds] \
        if "baseline" in names else None
    n = results[names[0]][0][-1]["validation"]["images"]
    tf.io.gfile.makedirs(output_dir)
    markdown = table(results, ten_crop, n, seeds)
    write_file(os.path.join(output_dir, "ablation.md"), markdown)
    plot(results, os.path.join(output_dir, "curves.png"))
    print("\n" + markdown)
    return markdown


@cli.reports_errors
def main(argv):
    del argv
    unknown = set(FLAGS.variants) - set(VARIANTS)
    if unknown or not FLAGS.variants:
        raise UserError(f"--variants: choose one or more of {', '.join(VARIANTS)}, not "
                        f"{', '.join(sorted(unknown)) or 'none'}")
    base = config.config_from_flags()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # As Ctrl-C: its run is stopped with it.
    run_ablation(base, FLAGS.variants, FLAGS.output_dir, seed_list(FLAGS.seeds, base.seed))


if __name__ == "__main__":
    config.define_flags()
    flags.DEFINE_string("output_dir", "runs/ablate", "A run directory per variant and seed, the table and the plot.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of: {', '.join(VARIANTS)}.")
    flags.DEFINE_list("seeds", ["3"], "N: N seeds from --seed on; or a list of seeds (two or more). Every variant "
                      "trains once per seed.")
    app.run(main)
