"""What each dataset looks like and which files hold it.

One entry per dataset keeps loaders, error messages and tests agreeing on file names.
"""

from __future__ import annotations

from dataclasses import dataclass

DIGIT_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetSpec:
    """Shape, classes and on-disk names of one dataset.

    >>> SPECS["cifar10"].archive
    'cifar10-jpeg.tar.gz'
    """

    name: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...] | None  # None: read from the source (CIFAR-100's 100 names)
    folder_stem: str | None = None  # image-folder tree: <stem>.tar.gz or <stem>/ under the data dir
    image_ext: str | None = None  # extension of the images inside that tree
    torchvision_files: tuple[str, ...] = ()  # torchvision's layout under root, relative paths

    @property
    def archive(self) -> str | None:
        return f"{self.folder_stem}.tar.gz" if self.folder_stem else None

    @property
    def image_mode(self) -> str:
        """The PIL mode that yields this dataset's channel count."""
        return "L" if self.input_shape[0] == 1 else "RGB"


_MNIST_RAW = "MNIST/raw/"
_CIFAR10_DIR = "cifar-10-batches-py/"
_CIFAR100_DIR = "cifar-100-python/"

SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", (1, 8, 8), DIGIT_CLASSES),
    "mnist": DatasetSpec(
        "mnist", (1, 28, 28), DIGIT_CLASSES, folder_stem="mnist-png", image_ext=".png",
        torchvision_files=tuple(_MNIST_RAW + f for f in (
            "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    ),
    "cifar10": DatasetSpec(
        "cifar10", (3, 32, 32), CIFAR10_CLASSES, folder_stem="cifar10-jpeg", image_ext=".jpg",
        torchvision_files=tuple(_CIFAR10_DIR + f for f in (
            *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
    ),
    "cifar100": DatasetSpec(
        "cifar100", (3, 32, 32), None,
        torchvision_files=tuple(_CIFAR100_DIR + f for f in ("train", "test", "meta")),
    ),
    "svhn": DatasetSpec(
        "svhn", (3, 32, 32), DIGIT_CLASSES,
        torchvision_files=("train_32x32.mat", "test_32x32.mat"),
    ),
}

DATASETS = tuple(SPECS)
