import json

import pytest

from diffprobe import prompts as P
from diffprobe.errors import InputError
from diffprobe.prompts import Comp90Object, Prompt, comp90_numerical, load_prompts, read_prompt_file, unique


def test_txt_skips_blank_lines_and_strips(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufeffa cat \n\n  a dog\n\n")
    assert [p.text for p in read_prompt_file(f)] == ["a cat", "a dog"]


def test_csv_keeps_other_columns_as_meta(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,prompt,tag\n1,"a cat, sitting",x\n2,a dog,y\n')
    got = read_prompt_file(f)
    assert [(p.text, p.meta) for p in got] == [("a cat, sitting", {"id": "1", "tag": "x"}),
                                               ("a dog", {"id": "2", "tag": "y"})]


def test_tsv_and_json(tmp_path):
    (tmp_path / "p.tsv").write_text("prompt\tn\na, b\t3\n")
    assert read_prompt_file(tmp_path / "p.tsv") == [Prompt("a, b")]
    (tmp_path / "p.json").write_text(json.dumps(["x", {"prompt": "y", "k": 1}]))
    got = read_prompt_file(tmp_path / "p.json")
    assert [p.text for p in got] == ["x", "y"] and got[1].meta == {"k": 1}


def test_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat", "count": 2}\n\n{"prompt": "a dog"}\n')
    got = read_prompt_file(f)
    assert [p.text for p in got] == ["a cat", "a dog"] and got[0].meta == {"count": 2}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n \n", "holds no prompts"),
        ("empty.csv", "", "holds no prompts"),
        ("header.csv", "prompt\n", "holds no prompts"),
        ("nocol.csv", "text\na cat\n", "no 'prompt' column"),
        ("ragged.csv", "prompt\na cat,extra\n", "line 2: more cells than columns"),
        ("blank.csv", "prompt,x\n,1\n", "line 2: 'prompt' must be a non-empty string"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2: invalid JSON"),
        ("nokey.jsonl", '{"text": "a"}\n', "line 1: expected an object with a 'prompt' field"),
        ("num.jsonl", '{"prompt": 3}\n', "'prompt' must be a non-empty string"),
        ("obj.json", '{"prompt": "a"}', "must hold a JSON list"),
        ("p.yaml", "- a\n", "unsupported prompt file"),
        # hostile files, given as bytes
        ("dup.csv", b"prompt,prompt\na,b\n", "column\\(s\\) 'prompt' more than once"),
        ("dup.tsv", b"prompt\tx\tx\na\t1\t2\n", "column\\(s\\) 'x' more than once"),
        ("big.csv", b"prompt\n" + b"a" * 200_000 + b"\n", "big.csv line [0-9]+: field larger than field limit"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "deep.json: JSON nested too deeply"),
        ("deep.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "line 1: JSON nested too deeply"),
        ("digits.json", b"[" + b"1" * 5000 + b"]", "digits.json: invalid JSON"),
        ("np.jsonl", b'{"prompt": "x", "noun_phrases": 5}\n', "line 1: 'noun_phrases' must be a string"),
        ("np.json", b'[{"prompt": "x", "noun_phrases": ["a", 1]}]', "np.json \\[0\\]: 'noun_phrases' must be"),
        ("latin1.csv", "prompt\ncaf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_malformed_files(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(InputError, match=message):
        read_prompt_file(f)


def test_binary_file_is_refused(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompt_file(f)


def test_missing_file_or_suite():
    with pytest.raises(InputError, match="does not exist and is not a built-in suite"):
        load_prompts("no/such/file.txt")


def test_comp90_numerical_expansion(tmp_path):
    (tmp_path / "objects_eval.txt").write_text("apple, an apple, apples\nmouse, a mouse, mice\n")
    (tmp_path / "backgrounds_eval.txt").write_text("on a sunny beach\nunder a starry desert sky\n")
    got = read_prompt_file(tmp_path / "objects_eval.txt")
    assert len(got) == 2 * 2 * 5
    assert got[0] == Prompt("two apples, on a sunny beach")
    assert got[0].meta == {"count": 2, "object": "apple", "plural": "apples", "background": "on a sunny beach"}
    assert got[5].meta["plural"] == "mice"
    assert got[4].text == "six apples, on a sunny beach"
    assert got[5].text == "two mice, on a sunny beach"
    assert got[-1].text == "six mice, under a starry desert sky"


def test_comp90_errors(tmp_path):
    (tmp_path / "objects_train.txt").write_text("apple, apples\n")
    with pytest.raises(InputError, match="backgrounds_train.txt is missing"):
        read_prompt_file(tmp_path / "objects_train.txt")
    (tmp_path / "backgrounds_train.txt").write_text("on a sunny beach\n")
    with pytest.raises(InputError, match="line 1: expected 'singular, with article, plural'"):
        read_prompt_file(tmp_path / "objects_train.txt")
    with pytest.raises(InputError, match="number word"):
        comp90_numerical([Comp90Object("a", "an a", "as")], ["x"], counts=[11])


def comp90_folder(root, n_train=16, n_train_bg=5):
    """A small prompt_dataset/ folder shaped like the official one (fewer lines)."""
    folder = root / "prompt_dataset"
    folder.mkdir()
    train = [f"thing{i}, a thing{i}, things{i}" for i in range(n_train)]
    (folder / "objects_train.txt").write_text("\n".join(train) + "\n")
    (folder / "objects_eval.txt").write_text("apple, an apple, apples\nmouse, a mouse, mice\nfish, a fish, fish\n")
    (folder / "backgrounds_train.txt").write_text("".join(f"in place {i}\n" for i in range(n_train_bg)))
    (folder / "backgrounds_eval.txt").write_text("dark solid color background\nunder a starry desert sky\n")
    (folder / "spatial_prompts_train.txt").write_text(
        "A pineapple on the left of a monkey\nA snail on the right of a boat\n"
        "a dice on the top of a monkey\na lemon under a watermelon\n")
    (folder / "spatial_prompts_eval.txt").write_text("a cat on the left of a dog\nan owl under a tree\n")
    (folder / "numerical_prompts_train.txt").write_text("")  # empty in the official folder too
    return folder


def test_comp90_suites(tmp_path):
    folder = comp90_folder(tmp_path)
    # eval: every eval object x eval background x counts 2-6, with the file's plurals
    got = load_prompts(f"comp90-numerical-eval:{folder}")
    assert len(got) == 3 * 2 * 5
    assert got[0] == Prompt("two apples, dark solid color background")
    assert {p.meta["plural"] for p in got} == {"apples", "mice", "fish"}
    assert got[-1].text == "six fish, under a starry desert sky"
    # train: all train objects x backgrounds; mining: the first 15 objects x first 4 backgrounds (the paper's subset)
    train = load_prompts(f"comp90-numerical-train:{folder}")
    assert len(train) == 16 * 5 * 5
    mining = load_prompts(f"comp90-numerical-mining:{folder.parent}")  # the repository root works too
    assert len(mining) == 15 * 4 * 5
    assert {p.meta["object"] for p in mining} == {f"thing{i}" for i in range(15)}
    assert {p.meta["background"] for p in mining} == {f"in place {i}" for i in range(4)}
    assert not {p.text for p in got} & {p.text for p in train}
    # spatial: the four relations of the paper, as relation questions
    from diffprobe.judges.questions import question_for

    spatial = load_prompts(f"comp90-spatial-train:{folder}")
    relations = [question_for(p)[0].relation for p in spatial]
    assert relations == ["left_of", "right_of", "above", "below"]
    assert [p.meta["relation_phrase"] for p in spatial] == ["on the left of", "on the right of", "on the top of",
                                                            "under"]
    assert len(load_prompts(f"comp90-spatial-eval:{folder}")) == 2


def test_comp90_suite_as_a_run_spec_prompt_source(tmp_path):
    """``generate --prompts comp90-...:PATH`` builds its spec this way: the suite is the recorded source, and the
    prompts keep the meta that makes their questions (count, object, plural)."""
    from diffprobe.spec import build_spec

    folder = comp90_folder(tmp_path)
    spec, prompts, dropped = build_spec({"model": "shapes", "prompts": f"comp90-numerical-eval:{folder}",
                                         "seeds": "0"})
    assert spec.prompt_source == f"comp90-numerical-eval:{folder}" and dropped == 0
    assert spec.prompts == [p.text for p in prompts] and len(prompts) == 30
    assert prompts[5].meta == {"count": 2, "object": "mouse", "plural": "mice",
                               "background": "dark solid color background"}


def test_comp90_suite_errors(tmp_path):
    with pytest.raises(InputError, match="give the Comp90 folder after a colon"):
        load_prompts("comp90-numerical-eval")
    with pytest.raises(InputError, match="does not exist; give the official"):
        load_prompts(f"comp90-numerical-eval:{tmp_path / 'nowhere'}")
    with pytest.raises(InputError, match="unknown Comp90 suite 'comp90-numerical-test'"):
        load_prompts(f"comp90-numerical-test:{tmp_path}")
    with pytest.raises(InputError, match="has no objects_eval.txt"):
        load_prompts(f"comp90-numerical-eval:{tmp_path}")
    small = comp90_folder(tmp_path, n_train=3, n_train_bg=2)
    with pytest.raises(InputError, match="needs 15 train objects and 4 train backgrounds; .* has 3 and 2"):
        load_prompts(f"comp90-numerical-mining:{small}")


def test_builtin_scs100():
    got = load_prompts("scs100")
    assert len(got) == 100
    assert got[0].text == "a portrait painting of a cat wearing a tuxedo and top hat"
    # the file has 104 lines; the paper used the first 100
    assert got[99].text == "a pencil drawing of a whimsical tree house nestled in the branches of a giant oak tree"
    sdxl, lora = load_prompts("scs100-monet-sdxl"), load_prompts("scs100-monet-lora")
    assert len(sdxl) == len(lora) == 50
    assert all(a.text.endswith("in the style of Monet") and b.text.endswith("in the style of TOK")
               for a, b in zip(sdxl, lora, strict=True))


def test_builtin_cc500_has_reference_noun_phrases():
    got = load_prompts("cc500")
    assert got[0].text == "a green bench and a red car"
    assert got[0].meta["noun_phrases"] == ["a green bench", "a red car"]
    assert got[0].meta["nouns"] == ["bench", "car"]
    kept, dropped = unique(got)
    assert len(got) == 636 and len(kept) == 622 and dropped == 14


def test_suites_ship_with_their_licences():
    for folder in ("scs100", "cc500"):
        assert "MIT License" in (P.DATA / folder / "LICENSE.txt").read_text()
    assert "brinnaebent/semantic-consistency-score" in (P.DATA / "README.md").read_text()


def test_unique_keeps_first_occurrence():
    kept, dropped = unique([Prompt("a", {"i": 0}), Prompt("b"), Prompt("a", {"i": 2})])
    assert [p.text for p in kept] == ["a", "b"] and kept[0].meta == {"i": 0} and dropped == 1


def test_shapes_suite_hook(monkeypatch):
    import diffprobe.worlds.shapes as shapes
    from diffprobe.worlds.shapes.grammar import prompts as shapes_prompts

    calls = []

    def fake(split, category=None):
        calls.append((split, category))
        return shapes_prompts(split, category, n=3)

    monkeypatch.setattr(shapes, "prompts", fake, raising=False)
    got = load_prompts("shapes-eval-count")
    expected = shapes_prompts("eval", "count", n=3)
    assert calls == [("eval", "count")]
    assert [p.text for p in got] == [s.caption for s in expected]
    assert got[0].meta["category"] == "count" and got[0].meta["split"] == "eval"
    load_prompts("shapes-train")
    assert calls[-1] == ("train", None)


def test_shapes_suite_missing_hook(monkeypatch):
    import diffprobe.worlds.shapes as shapes

    monkeypatch.delattr(shapes, "prompts", raising=False)
    with pytest.raises(InputError, match="shapes world is not available"):
        load_prompts("shapes-eval")


@pytest.mark.parametrize("separator", ["\u2028", "\x1c", "\x85", "\x00"])
def test_txt_lines_end_at_newline_only_and_control_characters_are_refused(tmp_path, separator):
    f = tmp_path / "p.txt"
    f.write_text(f"a cat\r\na red{separator}cube\n", encoding="utf-8")  # str.splitlines made two prompts of line 2
    with pytest.raises(InputError, match="p.txt line 2: the prompt holds the control character '\\\\[xu]"):
        read_prompt_file(f)


def test_txt_windows_line_endings_and_tabs_are_kept(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"a cat\r\na\tdog\r\n")
    assert [p.text for p in read_prompt_file(f)] == ["a cat", "a\tdog"]


def test_file_of_nul_bytes_is_not_a_prompt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="p.txt line 1: the prompt holds the control character '\\\\x00'"):
        read_prompt_file(f)


def test_csv_cells_may_hold_line_separators_only_in_quotes(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('prompt,tag\n"a cat\non a mat",x\na dog,y\n')
    with pytest.raises(InputError, match="p.csv line 3: the prompt holds the control character '\\\\n'"):
        read_prompt_file(f)
    f.write_text("prompt,tag\na\u2028cat,x\n", encoding="utf-8")  # splitlines cut this row in two
    with pytest.raises(InputError, match="p.csv line 2: the prompt holds the control character"):
        read_prompt_file(f)


def test_noun_phrases_as_string_or_list_are_kept(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "x", "noun_phrases": "a; b"}\n{"prompt": "y", "noun_phrases": ["c"]}\n')
    assert [p.meta["noun_phrases"] for p in read_prompt_file(f)] == ["a; b", ["c"]]
