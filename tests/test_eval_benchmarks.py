"""Benchmark loaders on small fixtures written in each official layout (the writers are in
tests/support/benchmark_files.py): the right question per image mode, scenario selection, and no sample ever
dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.benchmark_files import HARMFUL, write_image, write_mmsb, write_vlsafe, write_vlsbench

from ecso.eval.benchmarks import ECSO_SUBSET, MMSB_QUESTION_FIELD, load_benchmark, select_scenarios
from ecso.runtime import InputError

pytestmark = pytest.mark.fast  # no model, no native build

# --- MM-SafetyBench ------------------------------------------------------------------------------------------
def test_mmsb_uses_the_question_field_of_each_image_mode(tmp_path):
    data = write_mmsb(tmp_path)
    samples = load_benchmark("mmsb", data, modes=("SD", "SD_TYPO", "TYPO", "text"))
    assert len(samples) == 2 * 2 * 4
    items = json.loads((data / "processed_questions" / "01-Illegal_Activitiy.json").read_text())
    for s in samples:
        item = json.loads((data / "processed_questions" / f"{s.category}.json").read_text())[s.id.split("/")[-1]]
        assert s.query == item[MMSB_QUESTION_FIELD[s.mode]]
        if s.mode == "text":
            assert s.image is None
        else:
            assert s.image.endswith(f"imgs/{s.category}/{s.mode}/{s.id.split('/')[-1]}.jpg") and Path(s.image).is_file()
        assert s.error is None and s.extra["Key Phrase"] == item["Key Phrase"]
    assert [s.id for s in samples[:2]] == ["01-Illegal_Activitiy/SD/0", "01-Illegal_Activitiy/SD/2"]
    assert items["0"]["Rephrased Question(SD)"] != items["0"]["Rephrased Question"]


def test_mmsb_default_is_the_three_image_modes_and_the_parent_folder_works(tmp_path):
    write_mmsb(tmp_path)
    samples = load_benchmark("mm-safetybench", tmp_path)  # the repo root: data/ is found
    assert {s.mode for s in samples} == {"SD", "SD_TYPO", "TYPO"} and len(samples) == 12


def test_mmsb_scenario_selection_by_number_name_and_ecso_subset(tmp_path):
    names = ["01-Illegal_Activitiy", "02-HateSpeech", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence",
             "13-Gov_Decision"]
    assert select_scenarios(names, ["ecso"]) == ["01-Illegal_Activitiy", "02-HateSpeech", "07-Sex",
                                                  "09-Privacy_Violence"]
    assert select_scenarios(names, ["8", "gov"]) == ["08-Political_Lobbying", "13-Gov_Decision"]
    assert select_scenarios(names, []) == names
    assert set(ECSO_SUBSET) == {"01", "02", "03", "04", "05", "06", "07", "09"}
    with pytest.raises(InputError, match="matches no scenario"):
        select_scenarios(names, ["42"])
    data = write_mmsb(tmp_path)
    assert {s.category for s in load_benchmark("mmsb", data, categories=["ecso"])} == {"01-Illegal_Activitiy"}


def test_mmsb_missing_image_and_malformed_item_are_kept_as_errors(tmp_path):
    data = write_mmsb(tmp_path, missing=(("01-Illegal_Activitiy", "SD", "2"),),
                      malformed=(("08-Political_Lobbying", "1"),))
    samples = load_benchmark("mmsb", data)
    assert len(samples) == 12  # nothing dropped
    errors = {s.id: s.error for s in samples if s.error}
    assert errors["01-Illegal_Activitiy/SD/2"].startswith("missing image")
    assert "Rephrased Question" in errors["08-Political_Lobbying/TYPO/1"]
    assert len(errors) == 1 + 3  # the malformed item fails in every mode


def test_mmsb_unreadable_scenario_file_becomes_one_error_sample_per_mode(tmp_path):
    data = write_mmsb(tmp_path)
    (data / "processed_questions" / "08-Political_Lobbying.json").write_text("{not json")
    samples = load_benchmark("mmsb", data)
    bad = [s for s in samples if s.error]
    assert len(bad) == 3 and all("malformed 08-Political_Lobbying.json" in s.error for s in bad)


def test_mmsb_limit_takes_the_first_samples_in_file_order(tmp_path):
    data = write_mmsb(tmp_path)
    assert [s.id for s in load_benchmark("mmsb", data, limit=3)] == [
        "01-Illegal_Activitiy/SD/0", "01-Illegal_Activitiy/SD/2", "01-Illegal_Activitiy/SD_TYPO/0"]


# --- VLSafe ----------------------------------------------------------------------------------------------------
def test_vlsafe_reads_query_and_coco_image_and_keeps_broken_rows(tmp_path):
    folder = write_vlsafe(tmp_path, n=5, missing=(3,), bad_lines=(1,))
    samples = load_benchmark("vlsafe", folder)
    assert [s.id for s in samples] == ["1", "2", "3", "4", "5"]  # line numbers
    ok = samples[0]
    assert ok.query == HARMFUL[0] and ok.image.endswith("coco/train2017/000000051977.jpg") and ok.error is None
    assert ok.extra["image_id"] == "000000051977.jpg" and ok.category == "all"
    assert samples[1].error.startswith("malformed line 2")
    assert samples[3].error.startswith("missing image 000000051980.jpg")
    # the file itself and an explicit --images folder work too
    assert len(load_benchmark("vlsafe", folder / "harmlessness_examine.jsonl")) == 5
    alone = load_benchmark("vlsafe", folder, images=tmp_path / "coco" / "train2017")
    assert alone[0].image == ok.image
    with pytest.raises(InputError, match="no categories"):
        load_benchmark("vlsafe", folder, categories=["Violent"])


# --- VLSBench --------------------------------------------------------------------------------------------------
def test_vlsbench_reads_data_json_with_categories_and_descriptions(tmp_path):
    root = write_vlsbench(tmp_path / "vlsbench", missing=(2,), malformed=(4,))
    samples = load_benchmark("vlsbench", root)
    assert [s.id for s in samples] == ["0", "1", "2", "3", "4"]
    s0 = samples[0]
    assert (s0.category, s0.subcategory) == ("Violent", "Weapon-Related Violence")
    assert s0.image == str((root / "imgs" / "0.png").resolve())
    assert s0.extra["image_description"].startswith("A photo showing item 0")
    assert samples[2].error.startswith("missing image") and "no 'instruction'" in samples[4].error


def test_vlsbench_category_filter_matches_categories_and_subcategories(tmp_path):
    root = write_vlsbench(tmp_path / "vlsbench")
    assert [s.id for s in load_benchmark("vlsbench", root, categories=["violent"])] == ["0", "2"]
    shared = load_benchmark("vlsbench", root, categories=["Identity Theft and Impersonation"])
    assert {s.category for s in shared} == {"Privacy", "Illegal Activity"}
    with pytest.raises(InputError, match="not found; categories"):
        load_benchmark("vlsbench", root, categories=["Nope"])


def test_wrong_layouts_give_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="processed_questions"):
        load_benchmark("mmsb", tmp_path)
    with pytest.raises(InputError, match="data.json"):
        load_benchmark("vlsbench", tmp_path)
    with pytest.raises(InputError, match="unknown benchmark"):
        load_benchmark("mmbench", tmp_path)
    with pytest.raises(InputError, match="--mode applies to MM-SafetyBench only"):
        load_benchmark("vlsbench", write_vlsbench(tmp_path / "v"), modes=("SD",))


# --- custom JSONL (the data engine on your own images) --------------------------------------------------------
def test_custom_jsonl_resolves_images_next_to_the_file(tmp_path):
    write_image(tmp_path / "pics" / "a.png", (1, 2, 3), "PNG")
    rows = [{"id": "a", "image": "pics/a.png", "query": "What is this?", "category": "mine"},
            {"id": "b", "query": "Text only?"}, {"id": "c", "image": "pics/none.png", "query": "Where?"}]
    path = tmp_path / "queries.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    s = load_benchmark("custom", path)
    assert [(x.id, x.mode, x.category) for x in s] == [("a", "image", "mine"), ("b", "text", "all"),
                                                       ("c", "image", "all"), ("line4", "image", "(unreadable row)")]
    assert s[0].image == str((tmp_path / "pics" / "a.png").resolve()) and s[1].image is None
    assert s[2].error.startswith("missing image") and s[3].error.startswith("malformed")
