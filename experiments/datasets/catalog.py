"""The registered datasets: each one decorated function, with its class names and where it downloads from."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from experiments.datasets import ImageData, Source, register_dataset
from experiments.datasets.arrays import from_npz
from experiments.datasets.local import from_folder, unpack
from experiments.errors import UserError

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
IMAGENETTE_CLASSES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}
IMAGEWOOF_CLASSES = {
    "n02086240": "Shih-Tzu", "n02087394": "Rhodesian ridgeback", "n02088364": "beagle",
    "n02089973": "English foxhound", "n02093754": "Border terrier", "n02096294": "Australian terrier",
    "n02099601": "golden retriever", "n02105641": "Old English sheepdog", "n02111889": "Samoyed",
    "n02115641": "dingo",
}
FASTAI_URL = "https://s3.amazonaws.com/fast-ai-imageclas/"


def archive_download(fname: str, url: str, md5: str | None) -> Callable[[], Path]:
    """A download function for `Source.load`: fetches the archive once into Keras' cache, checking its md5."""

    def download() -> Path:
        import keras

        return Path(keras.utils.get_file(fname, url, file_hash=md5, cache_subdir="datasets"))

    return download


def _keras_dataset(source: Source, name: str, classes: list[str], url: str, local=()) -> ImageData:
    def download() -> ImageData:
        import keras

        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
        return source.arrays(name, x_train, y_train, x_test, y_test, classes, url)

    return source.load(name, (name, *local), download, url, classes)


@register_dataset(hflip=False, native_size=28, channels=1, default_arch="cnn_simple")
def mnist(source: Source) -> ImageData:
    url = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    return _keras_dataset(source, "mnist", MNIST_CLASSES, url)


@register_dataset(hflip=True, native_size=28, channels=1, default_arch="cnn_simple")
def fashion_mnist(source: Source) -> ImageData:
    url = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
    return _keras_dataset(source, "fashion_mnist", FASHION_MNIST_CLASSES, url, ("fashion-mnist",))


@register_dataset(hflip=True, native_size=32, default_arch="cnn_deep")
def cifar10(source: Source) -> ImageData:
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    return _keras_dataset(source, "cifar10", CIFAR10_CLASSES, url, ("cifar-10",))


@register_dataset(hflip=True, native_size=32, default_arch="cnn_deep")
def cifar100(source: Source) -> ImageData:
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    return _keras_dataset(source, "cifar100", CIFAR100_CLASSES, url, ("cifar-100",))


def _fastai(source: Source, name: str, archive: str, md5: str, classes: dict) -> ImageData:
    url = FASTAI_URL + archive + ".tgz"
    local = (archive, archive.replace("-160", ""), archive.replace("-160", "-320"), name)
    return source.load(name, local, archive_download(archive + ".tgz", url, md5), url, classes)


@register_dataset(hflip=True)
def imagenette(source: Source) -> ImageData:
    return _fastai(source, "imagenette", "imagenette2-160", "e793b78cc4c9e9a4ccc0c1155377a412", IMAGENETTE_CLASSES)


@register_dataset(hflip=True)
def imagewoof(source: Source) -> ImageData:
    return _fastai(source, "imagewoof", "imagewoof2-160", "3d200a7be99704a0d7509be2a9fbfe15", IMAGEWOOF_CLASSES)


@register_dataset(hflip=True)
def caltech101(source: Source) -> ImageData:
    url = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
    # BACKGROUND_Google is clutter, not a category; the usual 101-class benchmark leaves it out.
    local = ("caltech101", "caltech-101", "101_ObjectCategories")
    download = archive_download("caltech-101.zip", url, None)
    return source.load("caltech101", local, download, url, exclude=("BACKGROUND_Google",))


@register_dataset(hflip=True)
def folder(source: Source) -> ImageData:
    """Any class-folder tree (or archive of one) at data_dir."""
    if source.data_dir is None:
        raise UserError("the folder dataset needs -P data_dir=<path to class folders or an archive of them>")
    path = source.data_dir
    if path.is_file() and path.suffix == ".npz":
        return from_npz(path, "folder", None, source)
    return from_folder(unpack(path), source, name="folder")
