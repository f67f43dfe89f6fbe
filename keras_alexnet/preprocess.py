"""What every image goes through, in training and in serving: sections 2 and 4.1 of the paper.

An encoded image is checked by its header, decoded (a JPEG turned upright by its Exif orientation), its
shorter side rescaled to 256 and its central 256x256 patch kept (section 2); the network sees 227x227
crops of it minus the mean image: the centre crop, the 10-crop test (whose softmax outputs
`average_over_views` averages), or a random crop with a flip and the fancy-PCA lighting change
(section 4.1). `Stats` holds the data statistics these need.
It imports nothing of the package but `files`: serving (export) and the tools need no more of it.
"""
import dataclasses
import io
import zipfile

import numpy as np
import tensorflow as tf

from keras_alexnet.errors import UserError
from keras_alexnet.files import write_file

IMAGE_SIZE = 256
CROP_SIZE = 227
MIN_SIDE = 8  # Decodable images smaller than this (tracking pixels, placeholders) count as corrupt.
MAX_MEGAPIXELS = 64  # Larger images are refused before decoding (a 48 KB PNG can claim 400 megapixels).
FORMATS = "JPEG, PNG, GIF, BMP or WebP"  # Those whose size `image_size` reads from the header.


class DataError(UserError):
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
        """Writes the .npz (atomically: files.atomic_write)."""
        buffer = io.BytesIO()
        np.savez(buffer, **dataclasses.asdict(self))
        write_file(path, buffer.getvalue())


def decode_and_resize(image_bytes, max_megapixels=MAX_MEGAPIXELS):
    """Scalar string (JPEG, PNG, GIF's first frame, BMP, WebP) -> uint8 [256, 256, 3] (section 2).

    Greyscale, CMYK and RGBA become RGB and a JPEG is turned upright by its Exif orientation; the
    shorter side is rescaled to 256 (bilinear, antialiased), then the central 256x256 patch is cropped.
    Refused before decoding, by their header, with an InvalidArgumentError that names the size: images
    above `max_megapixels` or under MIN_SIDE pixels a side; and bytes of another format (also those
    tf.io.decode_image takes but whose size is not read here, JPEG XL).
    """
    return resize_and_crop(decode(image_bytes, tf.cast(max_megapixels, tf.float64)))


# A graph also when called eagerly: the error then reads "assertion failed: [image of ...]".
@tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.float64)])
def decode(image_bytes, max_megapixels=float(MAX_MEGAPIXELS)):
    """Scalar string -> uint8 [H, W, 3], refused by its header as `decode_and_resize` says, and turned
    upright by a JPEG's Exif orientation (the checks use the stored size: turning keeps both sides)."""
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
    return orient(image, exif_orientation(image_bytes))


HEADER = 30  # Bytes of an image file that hold its size (JPEG aside).


def image_size(image_bytes):
    """int64 [height, width] from the header of a JPEG, PNG, GIF, BMP or WebP, without decoding.

    [-1, -1] for bytes of another kind.
    """
    head = _padded(image_bytes, 0, HEADER)  # Short files: zeros.
    digits = _digits(head)

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


def orient(image, orientation):
    """[H, W, C] as PIL's ImageOps.exif_transpose turns it for an Exif `orientation` of 1-8.

    k = orientation - 1: transposed if k >= 4, then k % 4 flips it: 1 left-right, 2 both ways, 3 up-down.
    """
    k = orientation - 1

    def turn():
        turned = tf.transpose(image, tf.where(k >= 4, [1, 0, 2], [0, 1, 2]))
        return tf.reverse(turned, tf.boolean_mask([0, 1], [k % 4 >= 2, k % 4 % 3 != 0]))

    return tf.cond(k == 0, lambda: image, turn)  # Upright images are not copied.


EXIF_SEARCH = 2 ** 16  # Bytes of a JPEG searched for its Exif (APP1) segment, after SOI, APP0 (JFIF), ...
IFD_ENTRIES = 32  # Entries of IFD0 read: its tags are sorted, Orientation (0x0112) among the first.


def exif_orientation(image_bytes):
    """int64 Orientation (1-8) of a JPEG's Exif segment, tag 0x0112 of its IFD0 (either byte order).

    1 for other formats and when the tag is missing or malformed.
    """
    prefix = tf.strings.split(tf.strings.substr(image_bytes, 0, EXIF_SEARCH), b"Exif\0\0", maxsplit=1)[0]
    tiff = tf.cast(tf.strings.length(prefix), tf.int64) + 6  # "II*\0" or "MM\0*", then IFD0's offset.
    header = _padded(image_bytes, tiff - 10, 18)  # From the APP1 marker FF E1 on.

    def has(data, magic, at=0):
        return tf.strings.substr(data, at, len(magic)) == magic

    big_endian = has(header, b"MM\0*", 10)
    valid = has(image_bytes, b"\xff\xd8\xff") & has(header, b"\xff\xe1") & (big_endian | has(header, b"II*\0", 10))

    def number(digits):
        """The unsigned integers of the last axis of int64 bytes `digits`, in the TIFF's byte order."""
        places = tf.range(tf.shape(digits, tf.int64)[-1])
        return tf.reduce_sum(digits * 256 ** tf.where(big_endian, places[::-1], places), -1)

    ifd = tiff + number(_digits(header)[14:])
    count = number(_digits(_padded(image_bytes, ifd, 2)))
    entries = tf.reshape(_digits(_padded(image_bytes, ifd + 2, 12 * IFD_ENTRIES)), [IFD_ENTRIES, 12])
    value = number(entries[:, 8:10])  # Each entry: tag, type, count (2, 2, 4 bytes), then the value.
    orientation = ((number(entries[:, :2]) == 0x0112) & (number(entries[:, 2:4]) == 3)  # A SHORT.
                   & (tf.range(IFD_ENTRIES, dtype=tf.int64) < count) & (value >= 1) & (value <= 8))
    return tf.where(valid, tf.reduce_max(tf.where(orientation, value, 1)), 1)


def _padded(data, position, length):
    """Bytes [position, position + length) of the scalar string `data`, zeros past its end."""
    position = tf.clip_by_value(tf.cast(position, tf.int64), 0, tf.cast(tf.strings.length(data), tf.int64))
    position = tf.cast(position, tf.int32)
    padded = tf.strings.join([tf.strings.substr(data, position, length), "\0" * length])
    return tf.strings.substr(padded, 0, length)


def _digits(data):
    return tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int64)


def resize_and_crop(image, size=IMAGE_SIZE):
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side to `size`, then the centre crop (section 2).

    Bilinear, antialiased when downscaling. Only the crop is computed, so memory is bounded by it (an
    8 x 200,000 PNG rescaled whole takes 20 GB): tf.image.resize's kernel, ScaleAndTranslate, runs on
    the source window the crop samples, translated by the crop's offset. Same samples, float32 rounding
    aside: within 0.002 of the exact values on photos, as tf.image.resize of the whole image (1 level
    off it on 26 of the shared photos' 589,824 values), and 0.007 on long ones where it drifts (0.12).
    A shorter side already `size` (a prepared 256x256 file) is only cropped: at scale 1 the kernel's
    samples are the pixels themselves, so the output is the same, without the float pass.
    """
    image = tf.convert_to_tensor(image)
    resized = tf.cond(tf.reduce_min(tf.shape(image)[:2]) == size, lambda: center_crop(image, size),
                      lambda: _rescaled_crop(image, size))
    # Static shape too: cached images must have a known shape (eval_pipeline's padding images).
    return tf.ensure_shape(resized, [size, size, 3])


def _rescaled_crop(image, size):
    """`resize_and_crop` by tf.image.resize's kernel on the window the crop samples."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = tf.maximum(tf.cast(tf.round(shape * size / tf.reduce_min(shape)), tf.int32), size)
    scale = tf.cast(scaled, tf.float32) / shape
    # Output pixel x reads the source pixels centred within max(1 / scale, 1) of (x + offset + 0.5) / scale
    # (the kernel's span); floor and ceil leave half a pixel to spare. Float64: the offset is not rounded.
    offset, inverse = tf.cast((scaled - size) // 2, tf.float64), 1 / tf.cast(scale, tf.float64)
    radius = tf.maximum(inverse, 1)
    start = tf.maximum(tf.floor((offset + 0.5) * inverse - radius), 0)
    end = tf.minimum(tf.math.ceil((offset + size - 0.5) * inverse + radius), tf.cast(shape, tf.float64))
    (top, left), (bottom, right) = tf.unstack(tf.cast(start, tf.int32)), tf.unstack(tf.cast(end, tf.int32))
    image = tf.raw_ops.ScaleAndTranslate(
        images=image[None, top:bottom, left:right], size=[size, size], scale=scale,
        translation=tf.cast(start / inverse - offset, tf.float32), kernel_type="triangle", antialias=True)[0]
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


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


def over_views(predict, views):
    """`predict` of views [B, V, H, W, C] run as one batch of B * V: its outputs [B, V, ...], each image's
    V views'."""
    outputs = predict(tf.reshape(views, tf.concat([[-1], tf.shape(views)[2:]], 0)))
    return tf.reshape(outputs, [-1, tf.shape(views)[1], outputs.shape[-1]])


def average_over_views(predict, views):
    """`over_views` averaged over each image's views: section 4.1 averages "the predictions made by the
    network's softmax layer on the ten patches"."""
    return tf.reduce_mean(over_views(predict, views), axis=1)


def lighting_offset(alphas, stats):
    """Section 4.1's lighting change of one image: the RGB offset sum_i alpha_i * lambda_i * p_i, added to
    every pixel (data.network_input).

    alphas: [3], drawn from N(0, 0.1) once per image. The eigen-figures are of pixel values in 0-1, hence
    the factor 255. No clipping (the paper mentions none).
    """
    return tf.linalg.matvec(tf.constant(stats.eigenvectors), tf.cast(alphas, tf.float32) * stats.eigenvalues) * 255.0
