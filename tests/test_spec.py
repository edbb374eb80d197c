import hashlib
import json

import pytest

from diffprobe.errors import InputError
from diffprobe.spec import GuidanceSpec, ModelSpec, RunSpec, SamplerSpec, canonical_json, flatten, job_key, parse_seeds


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0-4", [0, 1, 2, 3, 4]),
        ("7", [7]),
        ("3,1,2", [3, 1, 2]),
        ("0-2, 10, 20-21", [0, 1, 2, 10, 20, 21]),
        (" 5 - 6 ", [5, 6]),
        ("scs100:3", [892834, 318110, 724172]),
    ],
)
def test_parse_seeds(text, expected):
    assert parse_seeds(text) == expected


def test_named_seed_list_defaults_to_the_papers_twenty():
    seeds = parse_seeds("scs100")
    assert len(seeds) == 20 and seeds[:2] == [892834, 318110]


def test_seed_file(tmp_path):
    f = tmp_path / "seeds.txt"
    f.write_text("42\n7\n\n1000000\n")
    assert parse_seeds(f"@{f}") == [42, 7, 1000000]
    f.write_text("42\nseven\n")
    with pytest.raises(InputError, match="one integer per line"):
        parse_seeds(f"@{f}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("19-0", "end is below the start"),
        ("0-3,2", "seed 2 is listed twice"),
        ("-3", "bad seed"),
        ("a-b", "bad seed"),
        ("1.5", "bad seed"),
        ("", "empty --seeds"),
        ("0,,1", "bad seed"),
        ("scs100:101", "ask for 1..100"),
        ("foo", "unknown seed list"),
        (str(2**63), "out of range"),
    ],
)
def test_bad_seeds(text, message):
    with pytest.raises(InputError, match=message):
        parse_seeds(text)


def test_job_key_is_sha256_of_canonical_json():
    identity = {"model": "m", "family": "sd", "weights_sha256": "ab"}
    sampler = {"steps": 4, "scheduler": "default", "height": 32, "width": 32, "dtype": "float32",
               "generator_device": "cpu"}
    guidance = {"name": "cfg", "scale": 7.5, "rescale": 0.0}
    expected = hashlib.sha256(
        json.dumps({"guidance": guidance, "model": identity, "prompt": "a cat", "sampler": sampler, "seed": 3},
                   sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert job_key(identity, "a cat", 3, sampler, guidance) == expected
    # Dict order does not matter; every ingredient does.
    assert job_key(dict(reversed(identity.items())), "a cat", 3, sampler, guidance) == expected
    variants = [
        job_key({**identity, "weights_sha256": "cd"}, "a cat", 3, sampler, guidance),
        job_key(identity, "a cat ", 3, sampler, guidance),
        job_key(identity, "a cat", 4, sampler, guidance),
        job_key(identity, "a cat", 3, {**sampler, "steps": 5}, guidance),
        job_key(identity, "a cat", 3, {**sampler, "generator_device": "cuda"}, guidance),
        job_key(identity, "a cat", 3, sampler, {**guidance, "scale": 7.0}),
    ]
    assert len({expected, *variants}) == 1 + len(variants)


def test_canonical_json_is_order_free():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}


def test_mismatch_lists_generation_differences_only():
    base = RunSpec(prompts=["a"], seeds=[0], model=ModelSpec(name="m"), sampler=SamplerSpec(steps=10))
    assert base.mismatch(base) == []
    # prompts, seeds and the device (not part of any image's identity) are not generation settings
    other = base.model_copy(update={"prompts": ["b"], "seeds": [1], "model": ModelSpec(name="m", device="cuda")})
    assert other.mismatch(base) == []
    changed = base.model_copy(update={"sampler": SamplerSpec(steps=20), "guidance": GuidanceSpec(params={"scale": 5})})
    assert changed.mismatch(base) == [
        "guidance.params.scale: 7.5 (run) != 5 (now)",
        "sampler.steps: 10 (run) != 20 (now)",
    ]
    # defaults (None, parameters not given) are resolved when the model loads and compared then
    defaults = base.model_copy(update={"sampler": SamplerSpec(steps=None), "guidance": GuidanceSpec(params={})})
    assert defaults.mismatch(base) == [] and base.mismatch(defaults) == []


def test_runspec_validation():
    with pytest.raises(ValueError):
        RunSpec(prompts=[], seeds=[0])
    with pytest.raises(InputError, match="listed twice"):
        RunSpec(prompts=["a"], seeds=[1, 1])
    with pytest.raises(ValueError):
        SamplerSpec(steps=0)
    spec = RunSpec(prompts=["a"], seeds=[0, 1])
    assert RunSpec.model_validate(json.loads(spec.model_dump_json())) == spec


def test_load_spec_file(tmp_path):
    from diffprobe.spec import load_spec_file

    (tmp_path / "p.txt").write_text("a cat\na dog\na cat\n")
    f = tmp_path / "run.yaml"
    f.write_text("model: {name: some/model, dtype: fp16}\nprompts: p.txt\nseeds: 0-2\n"
                 "sampler: {steps: 30, scheduler: ddim, height: 768, width: 768}\n"
                 "guidance: {name: scfg, scale: 7.5, r: 4}\n")
    spec, items, dropped = load_spec_file(f)
    assert spec.model == ModelSpec(name="some/model", dtype="fp16")
    assert spec.prompts == ["a cat", "a dog"] and dropped == 1 and [p.text for p in items] == spec.prompts
    assert spec.prompt_source == str(tmp_path / "p.txt")
    assert spec.seeds == [0, 1, 2]
    assert spec.sampler == SamplerSpec(steps=30, scheduler="ddim", height=768, width=768)
    assert spec.guidance == GuidanceSpec(name="scfg", params={"scale": 7.5, "r": 4})
    f.write_text("model: m\nprompts: cc500\nseeds: [5, 3]\n")
    spec, items, _ = load_spec_file(f)
    assert spec.seeds == [5, 3] and spec.guidance == GuidanceSpec() and items[0].meta["nouns"] == ["bench", "car"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("prompts: [a]\nseed: 1\n", "unknown key\\(s\\) seed"),
        ("seeds: 0-3\n", "'prompts' is required"),
        ("prompts: [a, '']\n", "list of non-empty strings"),
        ("prompts: [a]\nseeds: [1, x]\n", "list of integers"),
        ("prompts: [a]\nseeds: 3-1\n", "bad seed range"),
        ("prompts: [a]\nsampler: {steps: 0}\n", "steps: Input should be greater than or equal to 1"),
        ("prompts: [a]\nsampler: {stepz: 3}\n", "stepz"),
        ("prompts: [a\n", "line 2: invalid YAML"),
        ("- a\n", "must be a mapping"),
    ],
)
def test_bad_spec_files(tmp_path, content, message):
    from diffprobe.spec import load_spec_file

    f = tmp_path / "run.yaml"
    f.write_text(content)
    with pytest.raises(InputError, match=message):
        load_spec_file(f)


@pytest.mark.parametrize("text", ["²", "①", "٣", "0-٣", "1,²", "scs100:²", "١٢"])
def test_seeds_take_ascii_digits_only(text):
    # str.isdigit and re's \d accept these; int() then crashes ('²') or silently reads '٣' as 3
    with pytest.raises(InputError, match="bad seed|unknown seed list"):
        parse_seeds(text)


@pytest.mark.parametrize("text", ["9" * 5000, "0-" + "9" * 5000, "scs100:" + "9" * 5000, "9" * 20])
def test_seeds_past_the_int_digit_limit_are_out_of_range(text):
    with pytest.raises(InputError, match="out of range"):
        parse_seeds(text)


def test_seed_file_takes_ascii_integers_and_utf8_only(tmp_path):
    f = tmp_path / "seeds.txt"
    f.write_text("1\n٣\n", encoding="utf-8")
    with pytest.raises(InputError, match="one integer per line \\(found '٣'\\)"):
        parse_seeds(f"@{f}")
    f.write_bytes(b"1\n\xff\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        parse_seeds(f"@{f}")
    f.write_text("9" * 5000)
    with pytest.raises(InputError, match="out of range"):
        parse_seeds(f"@{f}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), [1.0, float("nan")]])
def test_guidance_parameters_must_be_finite(value):
    with pytest.raises(ValueError, match="guidance parameter 'scale' must be a finite number"):
        GuidanceSpec(params={"scale": value})


def test_sampler_sizes_are_bounded():
    with pytest.raises(ValueError, match="less than or equal to 16384"):
        SamplerSpec(height=10**9)


def test_flags_and_spec_files_share_one_builder(tmp_path):
    from diffprobe.spec import build_spec, load_spec_file

    f = tmp_path / "run.yaml"
    f.write_text("model: {name: m, dtype: fp32}\nprompts: [a cat, a dog]\nseeds: 0-2\n"
                 "sampler: {steps: 3, height: 16}\nguidance: {name: cfg, scale: 2.5}\n")
    from_file = load_spec_file(f)[0]
    from_flags = build_spec({"model": {"name": "m", "dtype": "fp32"}, "prompts": ["a cat", "a dog"], "seeds": "0-2",
                             "sampler": {"steps": 3, "height": 16},
                             "guidance": {"name": "cfg", "params": {"scale": 2.5}}})
    assert from_flags[0] == from_file
    with pytest.raises(InputError, match="^bad value 0 for --steps: Input should be greater than or equal to 1$"):
        build_spec({"prompts": ["a"], "sampler": {"steps": 0}})
    with pytest.raises(InputError, match="^guidance parameter 'scale' must be a finite number \\(got nan\\)$"):
        build_spec({"prompts": ["a"], "guidance": {"params": {"scale": float("nan")}}})


@pytest.mark.parametrize(
    "content, message",
    [
        (b"prompts: [a]\nguidance: [1, 2]\n", "'guidance' must be a mapping"),
        (b"prompts: [a]\nsampler: 5\n", "'sampler' must be a mapping"),
        (b"prompts: [a]\nmodel: [x]\n", "'model' must be a mapping"),
        (b"prompts: [a]\nseeds: {a: 1}\n", "'seeds' must be a list of integers"),
        (b"prompts: [a]\nseeds: true\n", "'seeds' must be a list of integers"),
        (b"prompts: [a]\nsampler: {steps: [1]}\n", "sampler.steps: Input should be a valid integer"),
        (b"prompts: [a]\nsampler: {height: 1.0e+400}\n", "sampler.height"),
        (b"prompts: [a]\nguidance: {scale: .nan}\n", "guidance: guidance parameter 'scale' must be a finite number"),
        (b"prompts: [a]\nguidance: {name: 1}\n", "guidance.name: Input should be a valid string"),
        (b"prompts: [a]\nmodel: ''\n", "model.name: String should have at least 1 character"),
        (b'prompts: ["a\\0b"]\n', "the prompt holds the control character '\\\\x00'"),
        (b"prompts: [a]\nseeds: " + b"9" * 5000 + b"\n", "spec file"),
        (b"prompts: " + b"[" * 20_000 + b"]" * 20_000 + b"\n", "nested too deeply"),
        (b"prompts: [caf\xe9]\n", "is not UTF-8 text"),
    ],
)
def test_spec_files_of_the_wrong_shape(tmp_path, content, message):
    from diffprobe.spec import load_spec_file

    f = tmp_path / "run.yaml"
    f.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_spec_file(f)
