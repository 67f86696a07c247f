from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moecl.data import templates as T

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO.parent / "shared" / "docs"
MANIFEST = REPO.parent / "shared" / "data" / "MANIFEST.json"


def test_template_counts_and_first_templates_follow_the_protocol():
    counts = {k: len(v) for k, v in T.TEMPLATES.items()}
    expected = dict(aircraft=2, caltech101=34, cifar100=18, dtd=8, eurosat=3, flowers=1, food=1, mnist=1,
                    oxford_pet=1, stanford_cars=9, sun397=2, cifar10=18, clothing=1)
    assert {k: counts[k] for k in expected} == expected
    assert T.templates_for("Aircraft")[0] == "a photo of a {}, a type of aircraft."
    assert T.templates_for("eurosat")[0] == "a centered satellite photo of {}."
    assert T.templates_for("MNIST") == ('a photo of the number: "{}".',)
    assert T.templates_for("OxfordPet") == T.templates_for("oxford_pet") == ("a photo of a {}, a type of pet.",)
    assert T.templates_for("clothing") == ("a photo of a {}, a type of clothing.",)
    assert T.templates_for("imagenet_sample") == T.templates_for("my_own_data") == ("a photo of a {}.",)
    assert T.templates_for("cifar10") == T.templates_for("cifar100")
    assert T.CIL_TEMPLATES == ("a bad photo of a {}.",)
    assert all(t.count("{}") == 1 for ts in T.TEMPLATES.values() for t in ts)


def test_hand_written_class_names_by_position_and_by_standard_folder():
    folders = list(T.CLASS_FOLDERS["caltech101"])
    names = T.classnames_for("caltech101", folders)
    assert len(names) == 101 and names[:2] == ("off-center face", "centered face")
    assert names[folders.index("car_side")] == "side of a car"
    assert T.classnames_for("caltech101", ["yin_yang", "Faces"]) == ("yin and yang symbol", "off-center face")
    assert T.classnames_for("eurosat", ["SeaLake", "Forest"]) == ("lake or sea", "forest")
    flowers = T.classnames_for("flowers", [str(i) for i in range(1, 103)])
    assert flowers[:2] == ("pink primrose", "hard-leaved pocket orchid")
    assert T.classnames_for("flowers", [f"c{i}" for i in range(102)]) == T.CLASSNAMES["flowers"]


def test_class_name_count_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="3 class folders but the protocol's class-name list has 102"):
        T.classnames_for("flowers", ["a", "b", "c"])


def test_default_class_names():
    assert T.classnames_for("mnist", [str(i) for i in range(10)])[:3] == ("0 - zero", "1 - one", "2 - two")
    assert T.classnames_for("cifar100", ["aquarium_fish", "maple_tree"]) == ("aquarium fish", "maple tree")
    assert T.classnames_for("imagenet_sample", ["n01440764", "n01443537"]) == ("tench", "goldfish")
    assert T.classnames_for("tinyimagenet", ["n99999999"]) == ("n99999999",)  # unknown wnid stays
    assert T.rename_classes(["t_shirt", "hat"], {"hat": "cap"}) == ("t shirt", "cap")


def test_cil_class_orders():
    assert len(T.CIL_CLASS_ORDERS["cifar100"]) == 100 and T.CIL_CLASS_ORDERS["cifar100"][:3] == (87, 0, 52)
    assert sorted(T.CIL_CLASS_ORDERS["tinyimagenet"]) == list(range(200))
    assert T.cil_class_order("my_data", 4) == (0, 1, 2, 3)
    assert T.cil_class_order("cifar100") == T.CIL_CLASS_ORDERS["cifar100"]  # fine labels: moecl's index too
    # TinyImageNet: official indices are positions in wnids.txt; moecl's are positions in the sorted wnids
    wnids_txt = T.TINYIMAGENET_WNIDS_TXT
    assert len(set(wnids_txt)) == 200 and wnids_txt[:2] == ("n02124075", "n04067472")
    assert wnids_txt != tuple(sorted(wnids_txt))
    ours = T.cil_class_order("tinyimagenet", 200)
    assert [sorted(wnids_txt)[i] for i in ours] == [wnids_txt[i] for i in T.CIL_CLASS_ORDERS["tinyimagenet"]]
    with pytest.raises(ValueError, match="lists 100 classes, the dataset has 10"):
        T.cil_class_order("cifar100", 10)


@pytest.mark.skipif(not (DOCS / "prompts.yaml").is_file() or not MANIFEST.is_file(), reason="protocol files absent")
def test_generated_block_is_in_sync_with_the_protocol_files():
    spec = importlib.util.spec_from_file_location("make_templates", REPO / "scripts" / "make_templates.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (REPO / "src" / "moecl" / "data" / "templates.py").read_text(encoding="utf-8")
    block = text.split(gen.BEGIN, 1)[1].split(gen.END, 1)[0]
    assert block == gen.generate(DOCS, MANIFEST)
