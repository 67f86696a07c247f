"""Dataset registry: what each dataset is, how its splits are defined, where to get it, and how to open a split.

Every value here is data about the public datasets of the MTIL / CIL protocols (method.md §5). Checksums and sizes
are filled in only where a public record states them (torchvision, tensorflow-datasets url_checksums, the dataset
pages); unknown values stay None and downloads then fall back to a size or md5 check.

Layout under a data root (`locate` looks in this order):
  1. `<root>/<name>.zip`  — ImageFolder layout `<split>/<class>/<file>` (the offline copies in ../shared/data and the
     bundled subset);
  2. an official / torchvision / ZSCL layout (readers.py has one reader per dataset): `<root>/<name>/`, as `moecl
     data download NAME` leaves it, then the standard folder names of layouts.LAYOUTS (`<root>/fgvc-aircraft-2013b`,
     `<root>/cifar-100-python`, `<root>/SUN397`, ...), each recognised by a marker file such as `data/variants.txt`;
  3. `<root>/<name>/`     — an ImageFolder `<split>/<class>/<file>` folder.
The marker check comes before the ImageFolder guess because some official layouts also look like ImageFolders
(Tiny ImageNet's `val/images/*.JPEG` would read as one class "images"); folders without a marker are unaffected.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from moecl.data import layouts
from moecl.data.folder import DataError, ImageDataset, read_image_folder, read_image_zip
from moecl.data.splits import official_sizes


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset's official distribution."""

    filename: str  # name inside <root>/<dataset>/
    urls: tuple[str, ...]  # official first, then mirrors serving the identical file
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None  # bytes
    extract: bool = False  # a .tar/.tgz/.tar.gz/.zip to unpack into <root>/<dataset>/


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # registry key, lower case
    display_name: str
    num_classes: int
    splits: Mapping[str, str]  # split name -> how the protocol defines it
    # split name -> images moecl reads from the official layout (what `moecl plan` assumes without the data);
    # empty where no public record fixes it. Where `splits` prose states a count, it is this one (tested).
    split_sizes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[RemoteFile, ...] = ()
    homepage: str = ""
    hf_mirror: str | None = None  # Hugging Face datasets id (its own splits; see notes)
    license: str = ""
    notes: str = ""
    templates_key: str | None = None  # key in data/templates.py (class names + prompt templates)
    auto_download: bool = True  # False: the official source is gone or gated; `notes` says what to do
    official_layout: str = ""  # what `<root>/<name>/` holds after download / manual placement
    mtil: bool = False  # one of the 11 MTIL datasets

    def manual_instructions(self, root: Path | str) -> str:
        where = Path(root) / self.name
        text = f"put the official files in {where} ({self.official_layout})" if self.official_layout else ""
        if self.notes:
            text = f"{text}; {self.notes}" if text else self.notes
        return text


_TORONTO = "https://www.cs.toronto.edu/~kriz/"
_VGG = "https://www.robots.ox.ac.uk/~vgg/data/"
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_SEEDED = "the official random 80/20 split (torch random_split, seed 42, over torchvision's listing; splits.py)"


def _sizes(**counts: int) -> Mapping[str, int]:
    return MappingProxyType(counts)


def _seeded_sizes(total: int) -> Mapping[str, int]:
    """Split sizes of splits.official_split over `total` images: int(0.8 n) train, the rest test."""
    train, test = official_sizes(total)
    return _sizes(train=train, test=test)


_ALL: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        name="aircraft",
        display_name="FGVC-Aircraft (variant)",
        num_classes=100,
        splits=MappingProxyType(
            {
                "train": "official train list images_variant_train.txt (3,334 images), as the MoE-Adapters/ZSCL code",
                "val": "official val list (3,333 images)",
                "trainval": "official train + val (6,667 images)",
                "test": "official test list images_variant_test.txt (3,333 images)",
            }
        ),
        split_sizes=_sizes(train=3_334, val=3_333, trainval=6_667, test=3_333),
        files=(
            RemoteFile(
                "fgvc-aircraft-2013b.tar.gz",
                (_VGG + "fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",),
                sha256="d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75",
                size=2770575360,
                extract=True,
            ),
        ),
        homepage=_VGG + "fgvc-aircraft/",
        hf_mirror="HuggingFaceM4/FGVC-Aircraft",
        license="research use only (images: photographers' terms, see the dataset page)",
        notes="MTIL trains on the official 'train' list (not trainval), like the paper's code",
        templates_key="aircraft",
        official_layout="fgvc-aircraft-2013b/data/{images/,variants.txt,images_variant_*.txt}",
        mtil=True,
    ),
    DatasetInfo(
        name="caltech101",
        display_name="Caltech-101",
        num_classes=101,
        splits=MappingProxyType(
            {"train": _SEEDED + " (80% of the 8,677 images: 6,941)", "test": "the remaining 20% (1,736)"}
        ),
        split_sizes=_seeded_sizes(8_677),
        files=(
            RemoteFile(
                "101_ObjectCategories.tar.gz",
                (
                    "https://drive.usercontent.google.com/download?id=137RyRjvTBkBiIfeYBNZBtViDHQ6_Ewsp&export=download&confirm=t",
                    "https://drive.google.com/uc?export=download&id=137RyRjvTBkBiIfeYBNZBtViDHQ6_Ewsp",
                ),
                sha256="af6ece2f339791ca20f855943d8b55dd60892c0a25105fcd631ee3d6430f9926",
                md5="b224c7392d521a49829488ab0f1120d9",
                size=131740031,
                extract=True,
            ),
        ),
        homepage="https://data.caltech.edu/records/20086",
        license="CC BY 4.0",
        notes=(
            "BACKGROUND_Google is excluded; the offline caltech101.zip in ../shared/data has its source's own "
            "train/test lists (5,784/2,893), not the seeded 80/20 split; if Google Drive refuses the download, get "
            "101_ObjectCategories.tar.gz from https://data.caltech.edu/records/20086 and unpack it here"
        ),
        templates_key="caltech101",
        official_layout="101_ObjectCategories/<class>/image_XXXX.jpg",
        mtil=True,
    ),
    DatasetInfo(
        name="cifar100",
        display_name="CIFAR-100",
        num_classes=100,
        splits=MappingProxyType({"train": "official train.bin (50,000)", "test": "official test.bin (10,000)"}),
        split_sizes=_sizes(train=50_000, test=10_000),
        files=(
            RemoteFile(
                "cifar-100-binary.tar.gz",
                (_TORONTO + "cifar-100-binary.tar.gz",),
                sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                size=168513733,
                extract=True,
            ),
        ),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        hf_mirror="uoft-cs/cifar100",
        license="no license stated; terms of the CIFAR authors (Krizhevsky, 2009)",
        notes=(
            "the binary version (downloaded) is read with numpy; torchvision's python version (cifar-100-python/) "
            "with a restricted unpickler that admits only numpy arrays and plain values"
        ),
        templates_key="cifar100",
        official_layout="cifar-100-binary/{train.bin,test.bin,fine_label_names.txt} or cifar-100-python/{train,test,meta}",
        mtil=True,
    ),
    DatasetInfo(
        name="dtd",
        display_name="Describable Textures (DTD)",
        num_classes=47,
        splits=MappingProxyType(
            {
                "train": "labels/train1.txt (partition 1, 1,880)",
                "val": "labels/val1.txt (1,880)",
                "test": "labels/test1.txt (1,880)",
            }
        ),
        split_sizes=_sizes(train=1_880, val=1_880, test=1_880),
        files=(
            RemoteFile(
                "dtd-r1.0.1.tar.gz",
                (_VGG + "dtd/download/dtd-r1.0.1.tar.gz",),
                sha256="e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
                md5="fff73e5086ae6bdbea199a49dfb8a4c1",
                size=625239812,
                extract=True,
            ),
        ),
        homepage=_VGG + "dtd/",
        hf_mirror="tanganke/dtd",
        license="research use only",
        notes="MTIL uses partition 1, train (not train+val) vs test, like the paper's code",
        templates_key="dtd",
        official_layout="dtd/{images/<class>/,labels/train1.txt,test1.txt}",
        mtil=True,
    ),
    DatasetInfo(
        name="eurosat",
        display_name="EuroSAT (RGB)",
        num_classes=10,
        splits=MappingProxyType(
            {"train": _SEEDED + " (80% of the 27,000 images: 21,600)", "test": "the remaining 20% (5,400)"}
        ),
        split_sizes=_seeded_sizes(27_000),
        files=(
            RemoteFile(
                "EuroSAT.zip",
                (
                    "https://madm.dfki.de/files/sentinel/EuroSAT.zip",
                    "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                ),
                sha256="8ebea626349354c5328b142b96d0430e647051f26efc2dc974c843f25ecf70bd",
                md5="c8fa014336c82ac7804f0398fcb19387",
                size=94280567,
                extract=True,
            ),
        ),
        homepage="https://github.com/phelber/eurosat",
        hf_mirror="tanganke/eurosat",
        license="MIT",
        templates_key="eurosat",
        official_layout="2750/<class>/<image>.jpg",
        mtil=True,
    ),
    DatasetInfo(
        name="flowers",
        display_name="Oxford Flowers-102",
        num_classes=102,
        splits=MappingProxyType(
            {
                "train": "setid.mat trnid (1,020 images)",
                "val": "setid.mat valid (1,020)",
                "test": "setid.mat tstid (6,149)",
            }
        ),
        split_sizes=_sizes(train=1_020, val=1_020, test=6_149),
        files=(
            RemoteFile(
                "102flowers.tgz",
                (_VGG + "flowers/102/102flowers.tgz",),
                sha256="2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246",
                md5="52808999861908f626f3c1f4e79d11fa",
                size=344862509,
                extract=True,
            ),
            RemoteFile(
                "imagelabels.mat",
                (_VGG + "flowers/102/imagelabels.mat",),
                sha256="4903e94206bac23bf772aadf06451916df56b58fc483a62db32a97b82656651d",
                md5="e0620be6f572b9609742df49c70aed4d",
                size=502,
            ),
            RemoteFile(
                "setid.mat",
                (_VGG + "flowers/102/setid.mat",),
                sha256="46b8678f91fd95d3c8f4feab80d271a6c834a1dd896fe29fd3e6ad9ce5c8dccd",
                md5="a5357ecc9cb78c4bef273ce3793fc85c",
                size=14989,
            ),
        ),
        homepage=_VGG + "flowers/102/",
        hf_mirror="dpdl-benchmark/oxford_flowers102",
        license="research use only",
        notes="reading the .mat label files needs scipy (pip install scipy) or use the HF mirror",
        templates_key="flowers",
        official_layout="jpg/image_XXXXX.jpg, imagelabels.mat, setid.mat",
        mtil=True,
    ),
    DatasetInfo(
        name="food",
        display_name="Food-101",
        num_classes=101,
        splits=MappingProxyType({"train": "meta/train.txt (75,750)", "test": "meta/test.txt (25,250)"}),
        split_sizes=_sizes(train=75_750, test=25_250),
        files=(
            RemoteFile(
                "food-101.tar.gz",
                ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",),
                sha256="d97d15e438b7f4498f96086a4f7e2fa42a32f2712e87d3295441b2b6314053a4",
                md5="85eeb15f3717b99a5da872d97d918f87",
                size=4996278331,
                extract=True,
            ),
        ),
        homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        hf_mirror="ethz/food101",
        license="research use; images from foodspotting.com under their terms",
        templates_key="food",
        official_layout="food-101/{images/<class>/<id>.jpg,meta/classes.txt,train.txt,test.txt}",
        mtil=True,
    ),
    DatasetInfo(
        name="mnist",
        display_name="MNIST",
        num_classes=10,
        splits=MappingProxyType({"train": "official train (60,000)", "test": "official t10k (10,000)"}),
        split_sizes=_sizes(train=60_000, test=10_000),
        files=tuple(
            RemoteFile(fn, tuple(m + fn for m in _MNIST_MIRRORS), sha256=sha, size=size)
            for fn, sha, size in (
                (
                    "train-images-idx3-ubyte.gz",
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                    9912422,
                ),
                (
                    "train-labels-idx1-ubyte.gz",
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                    28881,
                ),
                (
                    "t10k-images-idx3-ubyte.gz",
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                    1648877,
                ),
                ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
            )
        ),
        homepage="http://yann.lecun.com/exdb/mnist/",
        hf_mirror="ylecun/mnist",
        license="CC BY-SA 3.0",
        notes="yann.lecun.com no longer serves the files; the mirrors above do (same sha256)",
        templates_key="mnist",
        official_layout="{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        mtil=True,
    ),
    DatasetInfo(
        name="oxford_pet",
        display_name="Oxford-IIIT Pet",
        num_classes=37,
        splits=MappingProxyType({"train": "annotations/trainval.txt (3,680)", "test": "annotations/test.txt (3,669)"}),
        split_sizes=_sizes(train=3_680, test=3_669),
        files=(
            RemoteFile(
                "images.tar.gz",
                (_VGG + "pets/data/images.tar.gz",),
                sha256="67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d",
                md5="5c4f3ee8e5d25df40f4fd59a7f44e54c",
                size=791918971,
                extract=True,
            ),
            RemoteFile(
                "annotations.tar.gz",
                (_VGG + "pets/data/annotations.tar.gz",),
                sha256="52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91",
                md5="95a8c909bbe2e81eed6a22bccdf3f68f",
                size=19173078,
                extract=True,
            ),
        ),
        homepage=_VGG + "pets/",
        hf_mirror="timm/oxford-iiit-pet",
        license="CC BY-SA 4.0",
        notes="'train' is the official trainval list; class names are title-cased breeds as in torchvision",
        templates_key="oxford_pet",
        official_layout="images/<Breed>_<n>.jpg, annotations/{trainval.txt,test.txt}",
        mtil=True,
    ),
    DatasetInfo(
        name="stanford_cars",
        display_name="Stanford Cars",
        num_classes=196,
        splits=MappingProxyType(
            {"train": "devkit/cars_train_annos.mat (8,144)", "test": "cars_test_annos_withlabels.mat (8,041)"}
        ),
        split_sizes=_sizes(train=8_144, test=8_041),
        files=(
            # Original host (ai.stanford.edu/~jkrause) is gone. Checksums as recorded by tensorflow-datasets;
            # train/devkit sha256 left out because two public records disagree on them.
            RemoteFile("car_devkit.tgz", (), size=330960, extract=True),
            RemoteFile("cars_train.tgz", (), size=979269282, extract=True),
            RemoteFile(
                "cars_test.tgz",
                (),
                sha256="bffea656d6f425cba3c91c6d83336e4c5f86c6cffd8975b0f375d3a10da8e243",
                size=977350468,
                extract=True,
            ),
            RemoteFile(
                "cars_test_annos_withlabels.mat",
                (),
                sha256="790f75be8ea34eeded134cc559332baf23e30e91367e9ddca97d26ed9b895f05",
                size=185758,
            ),
        ),
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        hf_mirror="tanganke/stanford_cars",
        license="research use only (ImageNet-style terms)",
        notes=(
            "the original download link is gone: download car_devkit.tgz, cars_train.tgz, cars_test.tgz and "
            "cars_test_annos_withlabels.mat by hand (e.g. the Kaggle copy linked from "
            "https://github.com/pytorch/vision/issues/7545) into this folder and unpack them, or install `datasets` "
            "and use the Hugging Face mirror tanganke/stanford_cars; reading the .mat files needs scipy"
        ),
        templates_key="stanford_cars",
        auto_download=False,
        official_layout="devkit/{cars_meta.mat,cars_train_annos.mat}, cars_train/, cars_test/, cars_test_annos_withlabels.mat",
        mtil=True,
    ),
    DatasetInfo(
        name="sun397",
        display_name="SUN397",
        num_classes=397,
        splits=MappingProxyType(
            {"train": _SEEDED + " (80% of the 108,754 images: 87,003)", "test": "the remaining 20% (21,751)"}
        ),
        split_sizes=_seeded_sizes(108_754),
        files=(
            RemoteFile(
                "SUN397.tar.gz",
                ("https://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",),
                sha256="f404130965a7ad77bed5ececc71e720ab50f3cc1e1bb257257610d38f3b928ec",
                md5="8ca2778205c41d23104230ba66911c7a",
                size=39077296924,
                extract=True,
            ),
        ),
        homepage="https://vision.princeton.edu/projects/2010/SUN/",
        hf_mirror="tanganke/sun397",
        license="research use only",
        notes="the archive is 39 GB; the HF mirror tanganke/sun397 is a smaller subset with its own split",
        templates_key="sun397",
        official_layout="SUN397/{ClassName.txt,<letter>/<class>[/<sub>]/sun_*.jpg}",
        mtil=True,
    ),
    DatasetInfo(
        name="cifar10",
        display_name="CIFAR-10",
        num_classes=10,
        splits=MappingProxyType({"train": "data_batch_1..5.bin (50,000)", "test": "test_batch.bin (10,000)"}),
        split_sizes=_sizes(train=50_000, test=10_000),
        files=(
            RemoteFile(
                "cifar-10-binary.tar.gz",
                (_TORONTO + "cifar-10-binary.tar.gz",),
                sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                md5="c32a1d4ab5d03f1284b67883e8d87530",
                size=170052171,
                extract=True,
            ),
        ),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        hf_mirror="uoft-cs/cifar10",
        license="no license stated; terms of the CIFAR authors (Krizhevsky, 2009)",
        templates_key="cifar10",
        notes="torchvision's python version (cifar-10-batches-py/) is read too, with a restricted unpickler",
        official_layout=(
            "cifar-10-batches-bin/{data_batch_1..5.bin,test_batch.bin,batches.meta.txt} or "
            "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"
        ),
    ),
    DatasetInfo(
        name="tinyimagenet",
        display_name="Tiny ImageNet (200 classes)",
        num_classes=200,
        splits=MappingProxyType(
            {
                "train": "train/<wnid>/images (100,000)",
                "test": "the labelled official val set (10,000), as in the CIL protocol",
            }
        ),
        split_sizes=_sizes(train=100_000, test=10_000),
        files=(
            RemoteFile(
                "tiny-imagenet-200.zip",
                ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
                md5="90528d7ca1a48142e341f4ef8d21d0de",
                size=248100043,
                extract=True,
            ),
        ),
        homepage="https://www.kaggle.com/c/tiny-imagenet",
        hf_mirror="zh-plus/tiny-imagenet",
        license="ImageNet terms (non-commercial research and education)",
        notes=(
            "class index = sorted wnids; the official CIL class order indexes wnids.txt instead (continuum's "
            "labels) and is mapped onto the sorted index (templates.OFFICIAL_CLASS_INDEX); class names from the "
            "ImageNet wnid names"
        ),
        templates_key="tinyimagenet",
        official_layout="tiny-imagenet-200/{train/<wnid>/images/,val/images/,val/val_annotations.txt,words.txt}",
    ),
    DatasetInfo(
        name="clothing",
        display_name="Clothing dataset (small, top-10)",
        num_classes=10,
        splits=MappingProxyType({"train": "source train (3,068)", "validation": "(341)", "test": "(372)"}),
        split_sizes=_sizes(train=3_068, validation=341, test=372),
        homepage="https://github.com/alexeygrigorev/clothing-dataset-small",
        license="CC0 1.0",
        notes="available as clothing.zip (ImageFolder layout) in ../shared/data and in the bundled subset",
        templates_key="clothing",
        auto_download=False,
        official_layout="<split>/<class>/<image> (ImageFolder), or clothing.zip beside it",
    ),
    DatasetInfo(
        name="imagenet_sample",
        display_name="ImageNet sample (one image per class)",
        num_classes=1000,
        splits=MappingProxyType({"test": "1,000 images, one per ImageNet-1k class"}),
        split_sizes=_sizes(test=1_000),
        homepage="https://github.com/EliSchwartz/imagenet-sample-images",
        license="ImageNet terms (non-commercial research and education)",
        notes="available as imagenet_sample.zip in ../shared/data and in the bundled subset (DDAS/ZSCL reference)",
        templates_key="imagenet_sample",
        auto_download=False,
        official_layout="test/<wnid>/<image> (ImageFolder), or imagenet_sample.zip beside it",
    ),
    DatasetInfo(
        name="imagenet",
        display_name="ImageNet-style reference folder",
        num_classes=1000,
        splits=MappingProxyType({"train": "<root>/imagenet/train/<wnid>/", "val": "<root>/imagenet/val/<wnid>/"}),
        homepage="https://image-net.org/",
        license="ImageNet terms of access (registration required)",
        notes="gated download: get ILSVRC-2012 from image-net.org and arrange it as <split>/<wnid>/<image>",
        templates_key="imagenet",
        auto_download=False,
        official_layout="<split>/<wnid>/<image> (ImageFolder)",
    ),
    DatasetInfo(
        name="folder",
        display_name="Any ImageFolder directory or zip",
        num_classes=0,
        splits=MappingProxyType({"<split>": "every top-level folder of the directory or zip"}),
        notes="pass the folder or zip itself as root; class names = folder names with '_' -> ' '",
        auto_download=False,
        official_layout="<split>/<class>/<image>",
    ),
)

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({info.name: info for info in _ALL})

# Names people type for the same datasets (paper spellings, torchvision class names).
_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "fgvc_aircraft": "aircraft",
        "fgvcaircraft": "aircraft",
        "flowers102": "flowers",
        "oxford_flowers": "flowers",
        "food101": "food",
        "oxfordpet": "oxford_pet",
        "oxford_iiit_pet": "oxford_pet",
        "pets": "oxford_pet",
        "stanfordcars": "stanford_cars",
        "cars": "stanford_cars",
        "tiny_imagenet": "tinyimagenet",
        "tiny-imagenet-200": "tinyimagenet",
    }
)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def get_dataset(name: str) -> DatasetInfo:
    """The registry entry for `name` (case-insensitive; common aliases accepted); unknown -> did-you-mean error."""
    key = _normalise(name)
    key = _ALIASES.get(key, key)
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, list(DATASETS) + list(_ALIASES), n=1, cutoff=0.6)
    hint = f" (did you mean '{_ALIASES.get(close[0], close[0])}'?)" if close else ""
    raise DataError(f"unknown dataset '{name}'{hint}; known: {', '.join(DATASETS)} (see `moecl data list`)")


@dataclass(frozen=True)
class DatasetStatus:
    """One row of `moecl data list`: the registry entry plus where (if anywhere) it is present under a root."""

    info: DatasetInfo
    present: bool
    location: str | None = None  # the zip, ImageFolder dir or official-layout dir found
    layout: str | None = None  # "zip", "folder" or "official"
    found: str | None = None  # what identified it: the official marker path found, or the zip / folder itself
    looked_in: tuple[str, ...] = ()  # where it was looked for, when not present

    def to_dict(self) -> dict[str, object]:
        info = self.info
        return {
            "name": info.name,
            "display_name": info.display_name,
            "num_classes": info.num_classes,
            "splits": dict(info.splits),
            "split_sizes": dict(info.split_sizes),
            "present": self.present,
            "location": self.location,
            "layout": self.layout,
            "found": self.found,
            "looked_in": list(self.looked_in),
            "auto_download": info.auto_download,
            "mtil": info.mtil,
            "hf_mirror": info.hf_mirror,
            "homepage": info.homepage,
            "license": info.license,
            "notes": info.notes,
        }


def locate(name: str, root: Path | str) -> tuple[str, Path] | None:
    """Where dataset `name` is under `root`: ("zip", path), ("official", folder), ("folder", path) or None.

    Looks at `<root>/<name>.zip`, then the official / torchvision / ZSCL folders of layouts.LAYOUTS (`<root>/<name>/`
    first), then `<root>/<name>/` as an ImageFolder.
    """
    from moecl.data import readers

    info = get_dataset(name)
    root = Path(root)
    if info.name == "folder":
        if root.is_file() and root.suffix.lower() == ".zip":
            return ("zip", root)
        return ("folder", root) if root.is_dir() else None
    zip_path = root / f"{info.name}.zip"
    if zip_path.is_file():
        return ("zip", zip_path)
    official = layouts.locate_official(info.name, root)
    if official is not None:
        return ("official", official)
    directory = root / info.name
    if directory.is_dir() and readers.looks_like_image_folder(directory):
        return ("folder", directory)
    return None


def looked_in(name: str, root: Path | str) -> list[str]:
    """The places `locate` tries for dataset `name` under `root`, for "not found" messages."""
    info = get_dataset(name)
    root = Path(root)
    places = [str(root / f"{info.name}.zip")]
    for folder in layouts.candidates(info.name, root):
        if folder == root:  # the root itself: only its marker counts (e.g. <root>/101_ObjectCategories)
            places += [str(root / m) for m in layouts.LAYOUTS[info.name].markers]
        else:
            places.append(f"{folder}/")
    return places


def list_datasets(root: Path | str | None = None) -> list[DatasetStatus]:
    """Every registry entry, with whether and where it is present under `root` (for `moecl data list [--json]`)."""
    rows = []
    for info in DATASETS.values():
        if root is None or info.name == "folder":
            rows.append(DatasetStatus(info=info, present=False))
            continue
        found = locate(info.name, root)
        if found is None:
            rows.append(DatasetStatus(info=info, present=False, looked_in=tuple(looked_in(info.name, root))))
            continue
        layout, path = found
        marker = layouts.match(info.name, path) if layout == "official" else None
        what = str(marker[0] / marker[1]) if marker else str(path)
        rows.append(DatasetStatus(info=info, present=True, location=str(path), layout=layout, found=what))
    return rows


def _classnames(info: DatasetInfo, raw: tuple[str, ...]) -> tuple[str, ...]:
    """Prompt class names for the raw (folder / official) names, via data/templates.py."""
    from moecl.data import templates

    key = info.templates_key or info.name
    try:
        return tuple(templates.classnames_for(key, list(raw)))
    except ValueError as exc:  # count mismatch with the protocol's hand-written list
        raise DataError(str(exc)) from exc


def open_split(name: str, root: Path | str, split: str, on_bad_image: str = "error") -> ImageDataset:
    """Dataset `name`'s `split` under `root`: <root>/<name>.zip, <root>/<name>/ (ImageFolder), official layout.

    Labels follow the dataset's standard class index (sorted folder names for ImageFolder layouts, the official
    index for official layouts); class names are the prompt names from data/templates.py.
    """
    from moecl.data import readers

    info = get_dataset(name)
    root = Path(root)
    found = locate(info.name, root)
    if found is None:
        raise DataError(_missing_message(info, root))
    layout, path = found
    if layout == "zip":
        dataset = read_image_zip(path, split, name=info.name, on_bad_image=on_bad_image)
    elif layout == "folder":
        dataset = read_image_folder(path, split, name=info.name, on_bad_image=on_bad_image)
    else:
        dataset = readers.read_official(info.name, path, split, on_bad_image=on_bad_image)
    if info.name == "folder":
        return dataset
    return dataset.with_classnames(_classnames(info, dataset.classnames))


def _missing_message(info: DatasetInfo, root: Path) -> str:
    if info.name == "folder":
        return f"{root} is neither a folder nor a .zip in <split>/<class>/<image> layout"
    looked = ", ".join(looked_in(info.name, root)) + " (official, torchvision or ImageFolder layout)"
    if info.auto_download:
        how = f"get it with `moecl data download {info.name} --root {root}`"
    else:
        how = info.manual_instructions(root)
    return f"dataset '{info.name}' not found: looked for {looked}; {how}"
