"""The ablation tool: each variant changes exactly one thing (the paper's nets, shape by shape), and a tiny run
of two seeds writes its table of means and standard errors, resumes seed by seed and plots its curves."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import NARROW, reference_errors
from keras_alexnet import ablate, checkpoint, preprocess, sources, weights
from keras_alexnet.config import Config
from keras_alexnet.errors import UserError
from keras_alexnet.lrn import LocalResponseNormalization
from keras_alexnet.model import build_alexnet

BASE = Config(dataset="synthetic", batch_size=8, epochs=1, steps_per_epoch=2, eval_steps=1,
              init="caffe", shuffle_buffer=16, checkpoint_every=100, model=NARROW)  # Variants of a narrow net.


def variant_model(name):
    config = ablate.variant_config(BASE, name, "/unused", BASE.seed)
    return config, build_alexnet(10, dropout_rate=config.dropout_rate, **config.model)


def kernel_shapes(model):
    return {layer.name: tuple(layer.layer.kernel.shape) for layer in model.layers[1:]
            if hasattr(layer.layer, "kernel")}


def inner_layers(model, kind):
    return [layer.layer for layer in model.layers[1:] if isinstance(layer.layer, kind)]  # [0]: the input.


def test_each_variant_changes_one_thing():
    base_config, base = variant_model("baseline")
    assert len(inner_layers(base, LocalResponseNormalization)) == 4
    assert {layer.pool_size for layer in inner_layers(base, keras.layers.MaxPooling2D)} == {(3, 3)}

    _, no_lrn = variant_model("no_lrn")
    assert inner_layers(no_lrn, LocalResponseNormalization) == []
    assert no_lrn.count_params() == base.count_params()

    _, pool = variant_model("pool_2x2")
    pools = inner_layers(pool, keras.layers.MaxPooling2D)
    assert {(p.pool_size, p.strides) for p in pools} == {((2, 2), (2, 2))}
    assert [p.output.shape for p in pool.layers if "pool" in p.name] == \
        [p.output.shape for p in base.layers if "pool" in p.name]  # Same map sizes: 27, 13, 6.

    config, no_dropout = variant_model("no_dropout")
    assert config.dropout_rate == 0.0
    assert {d.rate for d in inner_layers(no_dropout, keras.layers.Dropout)} == {0.0}
    assert {d.rate for d in inner_layers(base, keras.layers.Dropout)} == {0.5}

    config, _ = variant_model("no_pca")
    assert config.pca_lighting is False and base_config.pca_lighting is True

    _, one = variant_model("one_tower")
    assert not any(layer.name.endswith("_b") for layer in one.layers)
    # The same width: conv2 has both towers' kernels (256 in the paper's net), fc7 all units (4096).
    assert one.get_layer("conv2").layer.filters == 2 * base.get_layer("conv2_a").layer.filters
    assert one.get_layer("fc7").output.shape[-1] == base.get_layer("fc7").output.shape[-1]
    for name in ("one_tower", "one_gpu", "no_conv3", "no_conv4"):
        changed = {f.name for f in dataclasses.fields(Config)
                   if getattr(ablate.variant_config(BASE, name, "x", BASE.seed), f.name) != getattr(BASE, f.name)}
        assert changed == {"model", "model_dir"}, name
    assert ablate.variant_config(BASE, "no_lrn", "out", 3).model_dir == "out/no_lrn/seed3"


def test_one_gpu_is_section_3_2s_net_with_footnote_2s_exceptions():
    """Half the two-GPU net's kernels in conv1-4 on one tower; conv5 and the fc layers of the full net."""
    config = ablate.variant_config(BASE, "one_gpu", "/unused", BASE.seed)
    one_gpu = build_alexnet(1000, **{**config.model, "width": 1})  # The paper's size: the count is the point.
    shapes = {"conv1": (11, 11, 3, 48), "conv2": (5, 5, 48, 128), "conv3": (3, 3, 128, 192),
              "conv4": (3, 3, 192, 192), "conv5": (3, 3, 192, 256), "fc6": (6 * 6 * 256, 4096), "fc7": (4096, 4096),
              "fc8": (4096, 1000)}
    assert kernel_shapes(one_gpu) == shapes
    assert one_gpu.get_layer("conv1").layer.strides == (4, 4)
    params = sum(np.prod(shape) + shape[-1] for shape in shapes.values())  # Kernels and biases.
    assert one_gpu.count_params() == params == 59_798_312  # The two-GPU net: 60,965,224 (test_model).


@pytest.mark.parametrize("name, removed, after, channels", [("no_conv3", "conv3", "conv4", 2 * 8),
                                                            ("no_conv4", "conv4", "conv5", 12)])
def test_depth_variants_skip_one_middle_layer(name, removed, after, channels):
    """Section 6: the next layer takes the removed one's input (conv4 both towers' pool2, 2 x 128 / 16 maps;
    conv5 its tower's conv3, 192 / 16) and keeps its own kernels."""
    _, base = variant_model("baseline")
    _, model = variant_model(name)
    names = {layer.name for layer in model.layers}
    assert {f"{removed}_a", f"{removed}_b"} & names == set()
    assert {layer.name for layer in base.layers} - names == {f"{removed}_a", f"{removed}_b"}
    assert kernel_shapes(model)[f"{after}_b"] == (3, 3, channels, base.get_layer(f"{after}_b").layer.filters)
    assert model(np.zeros((2, 227, 227, 3), "float32")).shape == (2, 10)


def test_bad_model_options_are_one_line():
    with pytest.raises(UserError, match="without may name conv3 and conv4, not"):
        build_alexnet(10, without=["conv5"], **NARROW)
    with pytest.raises(UserError, match="needs towers=1"):
        build_alexnet(10, halved=["conv1"], **NARROW)


def test_seeds_and_verdicts():
    assert ablate.seed_list(["3"], 0) == [0, 1, 2] and ablate.seed_list(["2"], 5) == [5, 6]
    assert ablate.seed_list(["4", "1"], 0) == [4, 1]
    for bad in (["0"], ["x"], ["1", "1"]):
        with pytest.raises(UserError, match="--seeds must"):
            ablate.seed_list(bad, 0)
    # Differences of mean 2% and standard error 0.5% (sd 1% over 4 seeds): 4 SE in the paper's direction.
    differences = [0.01, 0.03, 0.01, 0.03]
    assert ablate.mean_se(differences) == pytest.approx((0.02, np.std(differences, ddof=1) / 2))
    assert ablate.verdict(differences, 1) == "confirms"
    assert ablate.verdict(differences, -1) == "contradicts"
    assert ablate.verdict([0.0, 0.03, -0.01, 0.02], 1) == "cannot resolve"  # 1% ± 0.9%.
    assert ablate.verdict([0.05], 1) == "cannot resolve (one seed)"
    assert ablate.verdict(differences, None) == "no claim"
    assert ablate.spread([0.5, 0.6]) == "55.0% ± 5.0%" and ablate.spread([0.02], "+") == "+2.0%"


def test_standard_error_of_an_error_rate():
    assert ablate.standard_error(0.5, 1000) == pytest.approx(0.0158, abs=1e-4)
    assert ablate.standard_error(0.1, 100) == pytest.approx(0.03)


def numbers(cell):
    """'55.0% ± 5.0%' -> [0.55, 0.05]."""
    return [float(x) / 100 for x in re.findall(r"[+-]?[\d.]+(?=%)", cell)]


@pytest.mark.slow
def test_tiny_ablation_of_two_seeds_writes_its_table_and_curves(tmp_path):
    names = ["baseline", "one_gpu"]
    ablate.run_ablation(BASE, names, str(tmp_path), [0])  # Each run in a child process.
    first = {name: (tmp_path / name / "seed0" / checkpoint.HISTORY).stat().st_mtime_ns for name in names}
    markdown = ablate.run_ablation(BASE, names, str(tmp_path), [0, 1])  # Trains seed 1 only.
    assert {name: (tmp_path / name / "seed0" / checkpoint.HISTORY).stat().st_mtime_ns for name in names} == first
    assert (tmp_path / "ablation.md").read_text() == markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == names + ["baseline, 10-crop test"]
    assert "8 validation images, seeds 0, 1," in markdown
    png = np.asarray(Image.open(tmp_path / "curves.png"))
    assert png.shape[0] > 200 and png.shape[1] > 600 and png.std() > 0

    # Each cell from the runs' history.jsonl: mean ± standard error (sd / sqrt 2) over the two seeds.
    last = {name: [json.loads((tmp_path / name / f"seed{seed}" / checkpoint.HISTORY).read_text().splitlines()[-1])
                   for seed in (0, 1)] for name in names}
    assert all(run["epoch"] == 1 and run["validation"]["images"] == 8 for runs in last.values() for run in runs)

    def spread(values, sign=""):
        return f"{np.mean(values):{sign}.1%} ± {np.std(values, ddof=1) / np.sqrt(len(values)):.1%}"

    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}
    base = [run["validation"]["top1_error"] for run in last["baseline"]]
    for name, runs in last.items():
        claim, paper, top1, top5, gap, speed, versus, verdict = cells[name]
        assert (claim, paper) == ablate.VARIANTS[name][:2]
        assert top1 == spread([run["validation"]["top1_error"] for run in runs])
        assert top5 == spread([run["validation"]["top5_error"] for run in runs])
        assert gap == spread([run["validation"]["top1_error"] - run["train"]["top1_error"] for run in runs], "+")
        assert float(speed) == pytest.approx(np.mean([run["images_per_second"] for run in runs]), abs=0.05)
    differences = [run["validation"]["top1_error"] - b for run, b in zip(last["one_gpu"], base)]
    versus, verdict = cells["one_gpu"][-2:]
    assert versus == spread(differences, "+")
    mean, se = numbers(versus)
    assert verdict == ("cannot resolve" if abs(mean) <= 2 * se else "confirms" if mean > 0 else "contradicts")
    assert cells["baseline"][-2:] == ["", ""]

    # The 10-crop row: each seed's final baseline model on its 8 validation images, by numpy.
    ten_crop = []
    for seed in (0, 1):
        model, run, _ = weights.restore_model(str(tmp_path / "baseline" / f"seed{seed}"))
        images, _ = sources.decoded_images(sources.load_source(BASE.dataset, "validation", seed=seed))
        images, labels = zip(*((image, int(label)) for image, label in images.take(8)))
        ten_crop.append(reference_errors(model, images, labels, preprocess.Stats.load(run.stats_path).mean_image,
                                         ten_crop=True))
    claim, paper, top1, top5, gap, speed, versus, verdict = cells["baseline, 10-crop test"]
    assert [top1, top5] == [spread(errors) for errors in zip(*ten_crop)]  # Eighths: exact in binary.
    assert versus == spread([t - b for (t, _), b in zip(ten_crop, base)], "+")
    assert (gap, speed, verdict) == ("", "", "no claim")


@pytest.mark.slow
def test_a_stopped_ablate_stops_its_run_which_the_next_one_resumes(tmp_path):
    """SIGTERM to the ablate (a user's kill, a scheduler's) stops its run's child process too, which saves
    as train does on SIGTERM (else it trains on alone, holding the run's lock); the next ablate goes on."""
    run_dir = tmp_path / "baseline" / "seed0"
    args = [sys.executable, "-m", "keras_alexnet.ablate", "--dataset=synthetic", "--batch_size=8", "--steps_per_epoch=2",
            "--eval_steps=1", "--width=0.0625", "--variants=baseline", "--seeds=1", f"--output_dir={tmp_path}"]
    ablate_process = subprocess.Popen([*args, "--epochs=1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("ckpt-*.index")) and time.monotonic() < deadline:
        assert ablate_process.poll() is None, ablate_process.communicate()[1][-2000:]
        time.sleep(0.5)  # Until the run has its first epoch's checkpoint: it is training.
    child = int((run_dir / checkpoint.LOCK).read_text().split()[1])
    ablate_process.send_signal(signal.SIGTERM)
    _, stderr = ablate_process.communicate(timeout=120)
    assert ablate_process.returncode == 130 and stderr.endswith("interrupted\n"), stderr[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # Gone with it.
    before = ablate.read_history(str(run_dir))
    finished = subprocess.run([*args, f"--epochs={len(before) + 1}"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    after = ablate.read_history(str(run_dir))
    assert len(after) == len(before) + 1 and after[:len(before)] == before  # Resumed, not trained anew.

