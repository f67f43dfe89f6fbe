"""python -m keras_alexnet.train: trains AlexNet as section 5 did, then exports it (--export_dir).

This program only reads the flags (config.Config's fields), makes the device plan (distribute.py),
runs the trainer (trainer.py) and exports the result (export.py). Stop it with Ctrl-C or SIGTERM and
run the same command again to resume.
"""
import os
import shlex
import sys

from absl import app

from keras_alexnet import cli, export
from keras_alexnet.config import config_from_flags, define_flags
from keras_alexnet.distribute import make_strategy, split_cpu
from keras_alexnet.trainer import Trainer, set_up_process


def print_next_steps(config, exported):
    model_dir = config.model_dir
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    print(f"\nwrote checkpoints, config.json, labels.txt, stats.npz and history.jsonl to {model_dir}"
          + (f"\nexported a SavedModel to {exported}" if exported else ""))
    print("next:")
    print(f"  {python} -m keras_alexnet.evaluate --model_dir={model_dir}      # centre-crop and 10-crop error")
    if exported:
        print(f"  saved_model_cli show --dir {exported} --all")
        data_dir = f" --data_dir={shlex.quote(config.data_dir)}" if config.data_dir else ""
        print(f"  {python} -m keras_alexnet.embed --saved_model={shlex.quote(exported)} "
              f"--dataset={shlex.quote(config.dataset)}{data_dir} --logdir={shlex.quote(model_dir)}/embeddings "
              "--max_images=500")
    print(f"  tensorboard --logdir={model_dir}      # curves, histograms, conv1 kernels, the projector")


@cli.reports_errors
def main(argv):
    del argv
    config = config_from_flags()
    split_cpu(config.cpu_devices)
    set_up_process(config)
    trainer = Trainer(config, *make_strategy(config.towers_per_replica, cluster=config.cluster,
                                             port=config.cluster_port))
    trainer.fit()
    if trainer.chief:
        exported = config.export_dir and export.export_saved_model(
            trainer.model, trainer.train_source.class_names, trainer.stats, config.export_dir, trainer.step)
        print_next_steps(config, exported)


if __name__ == "__main__":
    define_flags()
    app.run(main)
