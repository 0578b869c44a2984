"""A request's per-image values (seeds, class labels, prompts), made for the images a chunk reads, not up front: a
request of any n costs nothing until it is sampled."""

import numpy as np


class PerImage:
    """n values, value(i) for image i from a vectorised `of_index(int64 indices)`; indexed like a numpy array
    (an int gives one value; a slice or an index array gives an array, or a tuple for text)."""

    def __init__(self, n, of_index):
        self.n, self._of_index = n, of_index

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._of_index(np.arange(*key.indices(self.n), dtype=np.int64))
        if np.ndim(key) == 0:
            i = int(key) + (self.n if int(key) < 0 else 0)
            if not 0 <= i < self.n:
                raise IndexError(f"image index {int(key)} is out of range for {self.n} images")
            return self._of_index(np.array([i], dtype=np.int64))[0]
        indices = np.asarray(key, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"image indices must be in [0, {self.n}), got {indices.min()}..{indices.max()}")
        return self._of_index(indices)

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)


def seed_range(first, n):
    """Image i's seed is first + i (uint64; the caller keeps first + n within 64 bits)."""
    return PerImage(n, lambda i: i.astype(np.uint64) + np.uint64(first))


def cycled(values, n, dtype=None):
    """values[i % len(values)] for image i: an array of `dtype` (labels, given seeds), or a tuple (prompts) when
    dtype is None."""
    if dtype is None:
        given = tuple(values)
        return PerImage(n, lambda i: tuple(given[j] for j in (i % len(given)).tolist()))
    array = np.asarray(values, dtype=dtype)
    return PerImage(n, lambda i: array[i % len(array)])
