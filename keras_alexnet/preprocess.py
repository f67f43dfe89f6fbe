"""What every image goes through, in training and in serving: sections 2 and 4.1 of the paper.

An encoded image is checked by its header, decoded, its shorter side rescaled to 256 and its central
256x256 patch kept (section 2); the network sees 227x227 crops of it minus the mean image: the centre
crop, the 10-crop test (whose softmax outputs `average_over_views` averages), or a random crop with a
flip and the fancy-PCA lighting change (section 4.1). `Stats` holds the data statistics these need.
It imports nothing of the package: serving (export) and the tools need no more of it.
"""
import dataclasses
import io
import zipfile

import numpy as np
import tensorflow as tf

IMAGE_SIZE = 256
CROP_SIZE = 227
MIN_SIDE = 8  # Decodable images smaller than this (tracking pixels, placeholders) count as corrupt.
MAX_MEGAPIXELS = 64  # Larger images are refused before decoding (a 48 KB PNG can claim 400 megapixels).
FORMATS = "JPEG, PNG, GIF, BMP or WebP"  # Those whose size `image_size` reads from the header.


class DataError(ValueError):
    """A user-facing, one-line problem with the data: bad folder, unknown dataset, missing split."""


@dataclasses.dataclass
class Stats:
    """Data statistics: the mean image (section 2) and the RGB covariance eigen-figures (section 4.1)."""
    mean_image: np.ndarray    # (256, 256, 3) float32, 0-255 units.
    channel_mean: np.ndarray  # (3,)
    eigenvalues: np.ndarray   # (3,) of the RGB covariance of pixel values scaled to 0-1, descending.
    eigenvectors: np.ndarray  # (3, 3), column i belongs to eigenvalues[i].

    def __post_init__(self):
        for name, shape in [("mean_image", (IMAGE_SIZE, IMAGE_SIZE, 3)), ("channel_mean", (3,)),
                            ("eigenvalues", (3,)), ("eigenvectors", (3, 3))]:
            value = np.asarray(getattr(self, name), np.float32)
            if value.shape != shape:
                raise DataError(f"statistics: {name} has shape {value.shape}, expected {shape}")
            setattr(self, name, value)

    @classmethod
    def imagenet(cls):
        """ILSVRC-2012 figures, for when no statistics of the data at hand were computed.

        Channel means (R, G, B) = (123.68, 116.78, 103.94) of the ILSVRC-2012 training set, as used by
        the Caffe / VGG models (Simonyan & Zisserman 2014), broadcast to 256x256 (the paper subtracts
        a mean image; these per-channel means are its spatial average). Eigenvalues and eigenvectors of
        the RGB covariance (pixels in 0-1) as published in fb.resnet.torch (datasets/imagenet.lua,
        `pca`), the figures widely used to reproduce section 4.1's lighting augmentation.
        """
        channel_mean = np.array([123.68, 116.78, 103.94], np.float32)
        return cls(mean_image=np.broadcast_to(channel_mean, (IMAGE_SIZE, IMAGE_SIZE, 3)),
                   channel_mean=channel_mean,
                   eigenvalues=np.array([0.2175, 0.0188, 0.0045]),
                   eigenvectors=np.array([[-0.5675, 0.7192, 0.4009],
                                          [-0.5808, -0.0045, -0.8140],
                                          [-0.5836, -0.6948, 0.4203]]))

    @classmethod
    def load(cls, path):
        """Reads an .npz written by `save` (or `python -m keras_alexnet.stats`)."""
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"statistics file {path} does not exist")
        with tf.io.gfile.GFile(path, "rb") as f:
            try:
                arrays = np.load(io.BytesIO(f.read()))
            except (ValueError, OSError, EOFError, zipfile.BadZipFile):  # Text gets numpy's pickle message.
                arrays = None
            if not isinstance(arrays, np.lib.npyio.NpzFile):  # Also a lone .npy array.
                raise DataError(f"statistics file {path} is not an .npz of python -m keras_alexnet.stats")
            missing = {f.name for f in dataclasses.fields(cls)} - set(arrays.files)
            if missing:
                raise DataError(f"statistics file {path} lacks {', '.join(sorted(missing))}")
            return cls(**{f.name: arrays[f.name] for f in dataclasses.fields(cls)})

    def save(self, path):
        """Writes the .npz to a temporary name, renamed to `path` once complete."""
        buffer = io.BytesIO()
        np.savez(buffer, **dataclasses.asdict(self))
        with tf.io.gfile.GFile(f"{path}.tmp", "wb") as f:
            f.write(buffer.getvalue())
        tf.io.gfile.rename(f"{path}.tmp", str(path), overwrite=True)


def decode_and_resize(image_bytes, max_megapixels=MAX_MEGAPIXELS):
    """Scalar string (JPEG, PNG, GIF's first frame, BMP, WebP) -> uint8 [256, 256, 3] (section 2).

    Greyscale, CMYK and RGBA become RGB; the shorter side is rescaled to 256 (bilinear, antialiased),
    then the central 256x256 patch is cropped. Refused before decoding, by their header, with an
    InvalidArgumentError that names the size: images above `max_megapixels` or under MIN_SIDE pixels a
    side; and bytes of another format (also those tf.io.decode_image takes but whose size is not read
    here, JPEG XL).
    """
    return resize_and_crop(decode(image_bytes, tf.cast(max_megapixels, tf.float64)))


# A graph also when called eagerly: the error then reads "assertion failed: [image of ...]".
@tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.float64)])
def decode(image_bytes, max_megapixels=float(MAX_MEGAPIXELS)):
    height, width = tf.unstack(image_size(image_bytes))
    unknown = height < 0
    too_small = tf.minimum(height, width) < MIN_SIDE
    too_large = tf.cast(height * width, tf.float64) > max_megapixels * 1e6
    size = tf.strings.format("image of {} x {} pixels is ", (width, height))
    limit = tf.strings.as_string(tf.cast(max_megapixels, tf.float32), shortest=True)
    why = tf.where(unknown, f"not a {FORMATS} image", tf.where(
        too_small, size + f"under the minimum of {MIN_SIDE} pixels a side",
        size + "above the limit of " + limit + " megapixels"))
    with tf.control_dependencies([tf.debugging.Assert(~(unknown | too_small | too_large), [why])]):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


HEADER = 30  # Bytes of an image file that hold its size (JPEG aside).


def image_size(image_bytes):
    """int64 [height, width] from the header of a JPEG, PNG, GIF, BMP or WebP, without decoding.

    [-1, -1] for bytes of another kind.
    """
    head = tf.strings.join([tf.strings.substr(image_bytes, 0, HEADER), "\0" * HEADER])  # Short files: zeros.
    head = tf.strings.substr(head, 0, HEADER)
    digits = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def number(start, length, big_endian=False):
        """The unsigned integer in bytes [start, start + length) of the header."""
        places = range(length - 1, -1, -1) if big_endian else range(length)
        return sum(digits[start + i] * 256 ** place for i, place in enumerate(places))

    def starts(magic, at=0):
        return tf.equal(tf.strings.substr(head, at, len(magic)), magic)

    def bmp():  # A negative (two's complement) height: rows stored top to bottom.
        height = number(22, 4)
        return tf.stack([tf.where(height >= 2 ** 31, 2 ** 32 - height, height), number(18, 4)])

    def webp_lossless():  # 14 bits width - 1, then 14 bits height - 1.
        bits = number(21, 4)
        return tf.stack([bits // 2 ** 14 % 2 ** 14 + 1, bits % 2 ** 14 + 1])

    webp = starts(b"RIFF") & starts(b"WEBP", 8)
    sizes = [  # (is this format, lambda: [height, width]), by the magic bytes tf.io.decode_image tests.
        (starts(b"\xff\xd8\xff"), lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)),
        (starts(b"\x89PNG\r\n\x1a\n"), lambda: tf.stack([number(20, 4, True), number(16, 4, True)])),
        (starts(b"GIF8"), lambda: tf.stack([number(8, 2), number(6, 2)])),  # The canvas TF decodes to.
        (starts(b"BM"), bmp),
        (webp & starts(b"VP8 ", 12), lambda: tf.stack([number(28, 2) % 2 ** 14, number(26, 2) % 2 ** 14])),
        (webp & starts(b"VP8L", 12), webp_lossless),
        (webp & starts(b"VP8X", 12), lambda: tf.stack([number(27, 3) + 1, number(24, 3) + 1])),
    ]
    return tf.case(sizes, default=lambda: tf.constant([-1, -1], tf.int64))


def resize_and_crop(image, size=IMAGE_SIZE):
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side to `size`, then the centre crop."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = tf.maximum(tf.cast(tf.round(shape * size / tf.reduce_min(shape)), tf.int32), size)
    image = tf.image.resize(image, scaled, method="bilinear", antialias=True)
    image = center_crop(image, size)
    # Static shape too: cached images must have a known shape (eval_pipeline's padding images).
    return tf.ensure_shape(tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), [size, size, 3])


def center_crop(images, size=CROP_SIZE):
    """The central size x size patch of [..., H, W, C] (a single image or a batch)."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    top, left = (shape[-3] - size) // 2, (shape[-2] - size) // 2
    return images[..., top:top + size, left:left + size, :]


def ten_crop(image, size=CROP_SIZE):
    """The 10-crop test of section 4.1: [H, W, C] -> [10, size, size, C].

    Order: centre, top-left, top-right, bottom-left, bottom-right, then the same five flipped
    horizontally.
    """
    shape = tf.shape(image)
    bottom, right = shape[0] - size, shape[1] - size
    crops = [center_crop(image, size)] + [image[y:y + size, x:x + size, :] for y, x in
                                          [(0, 0), (0, right), (bottom, 0), (bottom, right)]]
    crops = tf.stack(crops)
    return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)


def average_over_views(predict, views):
    """`predict` of views [B, V, H, W, C] run as one batch of B * V, its outputs averaged over each
    image's V views: section 4.1 averages "the predictions made by the network's softmax layer on the
    ten patches"."""
    outputs = predict(tf.reshape(views, tf.concat([[-1], tf.shape(views)[2:]], 0)))
    return tf.reduce_mean(tf.reshape(outputs, [-1, tf.shape(views)[1], outputs.shape[-1]]), axis=1)


def pca_lighting(image, alphas, stats):
    """Section 4.1's lighting change: adds sum_i alpha_i * lambda_i * p_i to every pixel.

    image: float32 in 0-255 units; alphas: [3], drawn from N(0, 0.1) once per image. The eigen-figures
    are of pixel values in 0-1, hence the factor 255. No clipping (the paper mentions none).
    """
    eigenvectors = tf.constant(stats.eigenvectors)
    shift = tf.linalg.matvec(eigenvectors, tf.cast(alphas, tf.float32) * stats.eigenvalues) * 255.0
    return image + shift
