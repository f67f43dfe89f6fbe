"""Images made of tiles: the one grid routine behind the conv1 figure (Figure 3), the projector's
sprite and the nearest-neighbour figure (Figure 4)."""
import math

import numpy as np


def grid(tiles, columns, rows=None, gap=0, background=255):
    """uint8 image of `tiles` (a sequence of equal uint8 [h, w, 3] images, read one at a time, so a
    memmap stays on disk) laid out row-major in `columns`, `gap` pixels of `background` apart.
    `rows` defaults to as many as the tiles need."""
    height, width = tiles[0].shape[:2]
    rows = rows or math.ceil(len(tiles) / columns)
    image = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        y, x = row * (height + gap), col * (width + gap)
        image[y:y + height, x:x + width] = tile
    return image


def scaled_kernels(kernels):
    """[11, 11, 3, n] kernels -> [n, 11, 11, 3], each kernel min-max scaled to [0, 1] on its own."""
    k = np.transpose(np.asarray(kernels, np.float64), [3, 0, 1, 2])
    low, high = k.min((1, 2, 3), keepdims=True), k.max((1, 2, 3), keepdims=True)
    return (k - low) / np.maximum(high - low, 1e-12)


def kernel_grid(towers, columns=16, scale=4):
    """Figure 3: each tower's conv1 kernels ([11, 11, 3, n] each) in rows of `columns`, the first tower's
    rows on top; each kernel min-max scaled on its own, upsampled `scale` times, one white pixel apart."""
    rows = math.ceil(towers[0].shape[-1] / columns)
    tiles = []
    for kernels in towers:
        tower = np.round(np.repeat(np.repeat(scaled_kernels(kernels), scale, 1), scale, 2) * 255).astype(np.uint8)
        tiles += list(tower) + [np.full_like(tower[0], 255)] * (rows * columns - len(tower))
    return grid(tiles, columns, gap=1)
