"""An epoch's order at the sizes users train on, on index-only sources (the payload and label are the
record's index; nothing is decoded): 20,000 to 1,000,000 records."""
import numpy as np
import tensorflow as tf

from keras_alexnet import data, sources


def order(source, batch_size, steps, epoch, seed=0, first_step=0):
    """The record indices of an epoch's steps [first_step, steps), in order."""
    records = data.epoch_records(source, batch_size, steps, seed, epoch, first_step)
    return np.concatenate([index for index, _, _ in records.as_numpy_iterator()])


def test_short_epochs_draw_from_the_whole_split():
    """200,000 records, 8 steps of 64 an epoch: five epochs draw half their images from the second
    half (a 2,048-image shuffle buffer over a fixed order drew 0%)."""
    source = sources.index_source(200_000)
    drawn = np.concatenate([order(source, 64, 8, epoch) for epoch in range(5)])
    assert len(drawn) == 5 * 512 and len(set(drawn)) == len(drawn)  # One pass: no image twice.
    assert 0.45 <= np.mean(drawn >= 100_000) <= 0.55


def test_two_full_epochs_are_unrelated_permutations():
    """Two epochs of 20,000 records: every image once in each, at positions uncorrelated (|r| < 0.02;
    a fixed order under a buffer gave r = 0.90)."""
    source = sources.index_source(20_000)
    first, second = order(source, 100, 200, 0), order(source, 100, 200, 1)
    assert sorted(first) == sorted(second) == list(range(20_000))
    positions = np.empty((2, 20_000))
    positions[0, first], positions[1, second] = np.arange(20_000), np.arange(20_000)
    assert abs(np.corrcoef(positions)[0, 1]) < 0.02


def test_the_first_batch_of_an_epoch_comes_from_the_whole_split():
    source = sources.index_source(1_000_000)
    for epoch in range(3):
        batch = order(source, 256, 1, epoch)
        assert batch.min() < 50_000 and batch.max() > 950_000 and 0.4 < np.mean(batch >= 500_000) < 0.6


def test_short_epochs_cover_a_pass_before_the_next_begins():
    """1,000 records in epochs of 3 steps of 100: epochs 0-2 are disjoint slices of one permutation
    (900 images; the 100 left out change with the pass), epoch 3 starts a new one."""
    source = sources.index_source(1_000)
    epochs = [order(source, 100, 3, epoch) for epoch in range(6)]
    assert len(set(np.concatenate(epochs[:3]))) == 900 == len(set(np.concatenate(epochs[3:])))
    assert set(range(1000)) - set(np.concatenate(epochs[:3])) != set(range(1000)) - set(np.concatenate(epochs[3:]))
    assert not np.array_equal(epochs[0], epochs[3])


def test_a_resumed_epoch_continues_the_permutation_without_reading_what_came_before():
    """Resumed at step 500 of a 100,000-record epoch: the same records as the uninterrupted epoch's,
    and only those are looked up."""
    plain = sources.index_source(100_000)
    looked_up = tf.Variable(0, dtype=tf.int64)

    def counted(indices):
        with tf.control_dependencies([looked_up.assign_add(tf.size(indices, tf.int64))]):
            return plain.lookup(indices)

    source = plain._replace(lookup=counted)
    whole = order(plain, 100, 1_000, 0)
    resumed = order(source, 100, 503, 0, first_step=500)
    np.testing.assert_array_equal(resumed, whole[50_000:50_300])
    assert int(looked_up.numpy()) == 300


def test_a_source_read_in_order_still_gets_one_permutation_an_epoch():
    """Without random access (TFDS's tfrecord files) each pass is the source's shuffled reading
    through a buffer: every epoch still holds each image once, and passes differ."""
    plain = sources.index_source(1_000)
    source = plain._replace(lookup=None, shuffled=lambda seed: plain.records.shuffle(1000, seed=seed))
    first, second = order(source, 100, 10, 0), order(source, 100, 10, 1)
    assert sorted(first) == sorted(second) == list(range(1000))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(order(source, 100, 10, 1, first_step=4), second[400:])


def test_a_tfds_dataset_in_array_record_files_has_random_access(tmp_path):
    """Prepared with file_format="array_record" (tfds build --file_format=array_record), a TFDS split
    is read by index (tfds's data source): its epochs are permutations of the same images as the
    tfrecord files hold, in their order."""
    import tensorflow_datasets as tfds
    from test_data import AlexnetTestImages  # Defining it registers the builder.
    for file_format in ("tfrecord", "array_record"):
        tfds.builder(AlexnetTestImages.name, data_dir=str(tmp_path / file_format),
                     file_format=file_format).download_and_prepare()
    tfrecord, array_record = (sources.load_source("alexnet_test_images", "train", data_dir=str(tmp_path / f))
                              for f in ("tfrecord", "array_record"))
    assert tfrecord.lookup is None and array_record.lookup is not None and array_record.num_examples == 18
    in_order = [(image, label) for image, label in sources.decoded_images(array_record)[0].as_numpy_iterator()]
    expected = list(sources.decoded_images(tfrecord)[0].as_numpy_iterator())
    for (image, label), (want_image, want_label) in zip(in_order, expected, strict=True):
        np.testing.assert_array_equal(image, want_image)
        assert label == want_label
    epochs = [data.epoch_records(array_record, 6, 3, 0, epoch) for epoch in range(2)]
    for epoch in epochs:
        indices, payloads, labels = (np.concatenate(part) for part in zip(*epoch.as_numpy_iterator()))
        assert sorted(indices) == list(range(18))
        for index, payload, label in zip(indices, payloads, labels):
            np.testing.assert_array_equal(tf.io.decode_png(payload).numpy()[0, 0], in_order[index][0][0, 0])
            assert label == in_order[index][1]
    assert not np.array_equal(*[np.concatenate([b[0] for b in e.as_numpy_iterator()]) for e in epochs])
