"""Spec reader limits, bounds and strict types: each ends in exit 2 naming the field, never a
traceback, never a run (issue 14: resource exhaustion, unbounded values, device strings)."""

from __future__ import annotations

import pytest
import torch

from diffusers_kit.spec import SpecError, load_spec, parse_yaml
from diffusers_kit.spec.loader import MAX_DEPTH, MAX_NODES
from tests.helpers import TINY_SPEC, run_cli, write_spec


def laughs(levels: int) -> str:
    """The "billion laughs" document: each level repeats the previous one nine times."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def validate(tmp_path, capsys, text: str = TINY_SPEC, *overrides: str):  # type: ignore[no-untyped-def]
    path = write_spec(tmp_path, text)
    code, out, err = run_cli(["validate", str(path), *overrides], capsys)
    assert "Traceback" not in out + err
    return code, " ".join(err.split()), path


def test_billion_laughs_is_refused_at_the_alias_that_overflows(tmp_path, capsys):
    text = TINY_SPEC + laughs(9)
    code, err, path = validate(tmp_path, capsys, text)
    assert code == 2
    assert f"at most {MAX_NODES} values" in err and "aliases" in err
    # level k expands to about 9**k values: level 5 (~600,000) is the first past MAX_NODES
    overflow_line = next(i for i, line in enumerate(text.splitlines(), 1) if "a5: &a5" in line)
    assert f"{path}:{overflow_line}" in err


def test_aliases_that_stay_small_are_still_plain_yaml():
    document = parse_yaml("opt: &adam {kind: adam, lr: 0.001}\nagain: *adam\nlist: [*adam]\n",
                          "s.yaml")
    assert document.data["again"] == {"kind": "adam", "lr": 0.001}
    assert document.data["list"] == [{"kind": "adam", "lr": 0.001}]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000])
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(tmp_path, capsys, depth):
    text = TINY_SPEC + "extra: " + "[" * depth + "]" * depth + "\n"
    code, err, path = validate(tmp_path, capsys, text)
    assert code == 2 and f"nested at most {MAX_DEPTH} levels" in err
    assert f"{path}:{len(TINY_SPEC.splitlines()) + 1}" in err


def test_block_nesting_at_the_limit_is_accepted_and_one_more_is_refused():
    def nested(depth: int) -> str:  # depth mappings, the outermost being the document itself
        return "".join("  " * i + f"k{i}:\n" for i in range(depth - 1)) + "  " * (depth - 1) \
            + "leaf: 1\n"

    assert parse_yaml(nested(MAX_DEPTH), "s.yaml").data["k0"]["k1"]
    with pytest.raises(SpecError, match="nested at most"):
        parse_yaml(nested(MAX_DEPTH + 1), "s.yaml")


@pytest.mark.parametrize("text,given", [("a: &x [1, *x]\n", "*x"), ("a: *nowhere\n", "*nowhere")])
def test_recursive_or_undefined_aliases_are_refused(text, given):
    with pytest.raises(SpecError) as caught:
        parse_yaml(text, "s.yaml")
    (issue,) = caught.value.issues
    assert issue.line == 1 and issue.given == given and "earlier anchor" in issue.expected


def test_an_oversized_file_is_refused_before_parsing(tmp_path, capsys):
    code, err, _ = validate(tmp_path, capsys, TINY_SPEC + "# " + "x" * (1 << 20) + "\n")
    assert code == 2 and "characters" in err


def test_an_alias_bomb_in_an_override_is_refused_with_the_command_line(tmp_path, capsys):
    bomb = "{" + laughs(9).replace("\n", ", ").rstrip(", ") + "}"
    code, err, _ = validate(tmp_path, capsys, TINY_SPEC, f"data.extra={bomb}")
    assert code == 2 and "command line 'data.extra=" in err and "aliases" in err


# -- unbounded values, non-finite floats, strict types --------------------------------------
BAD_VALUES = [
    # (override, field, phrase in the expectation)
    ("seed=100000000000000000000", "seed", "less than or equal to 9223372036854775807"),
    ("seed=-1", "seed", "greater than or equal to 0"),
    ("sample.n=1000000000000000000000000000000", "sample.n", "less than or equal to"),
    ("train.steps=1000000000000000000000000000000", "train.steps", "less than or equal to"),
    ("process.num_levels=1000000000", "process.num_levels", "less than or equal to 100000"),
    ("evaluate.metrics.0.projections=1000000000000", "evaluate.metrics[0].projections",
     "less than or equal to 65536"),
    ("sample.solver.steps_per_level=1000000000", "sample.solver.steps_per_level",
     "less than or equal to"),
    ("data.split_seed=100000000000000000000", "data.split_seed", "9223372036854775807"),
    ("train.optimizer.lr=.inf", "train.optimizer.lr", "a finite number"),
    ("process.sigma_max=.inf", "process.sigma_max", "a finite number"),
    ("process.sigma_min=.nan", "process.sigma_min", "a finite number"),
    ("train.grad_clip=.inf", "train.grad_clip", "finite number"),
    ("train.steps=true", "train.steps", "valid integer"),
    ("train.compile=1", "train.compile", "valid boolean"),
    ("sample.n='12'", "sample.n", "valid integer"),
    ("process.sigma_max='8.0'", "process.sigma_max", "a number (not true/false"),
    ("sample.solver.denoise=1", "sample.solver.denoise", "true or false"),
    ("sample.solver.steps_per_level=true", "sample.solver.steps_per_level", "an integer"),
    ("network.channels=8.5", "network.channels", "valid integer"),
    ("name=..", "name", "pattern"),
    ("name=.", "name", "pattern"),
    ("name=" + "n" * 300, "name", "pattern"),
    ("output.root=''", "output.root", "at least 1 character"),
    ("device=cuda:99999999999999999999", "device", "pattern"),
    ("device=gpu:0", "device", "pattern"),
]


@pytest.mark.parametrize("override,field,phrase", BAD_VALUES, ids=[b[0][:40] for b in BAD_VALUES])
def test_values_that_would_crash_later_are_refused_by_validate(tmp_path, capsys, override, field,
                                                               phrase):
    code, err, _ = validate(tmp_path, capsys, TINY_SPEC, override)
    assert code == 2, err
    assert f"command line '{override}' {field}:" in err, err
    assert phrase in err, err


def test_a_nul_byte_in_the_output_root_is_a_spec_error(tmp_path, capsys):
    code, err, path = validate(tmp_path, capsys,
                               TINY_SPEC.replace("root: {root}", 'root: "runs\\0x"'))
    assert code == 2 and "output.root" in err and f"{path}:" in err


def test_strict_types_in_the_file_name_the_field_and_its_line(tmp_path, capsys):
    text = TINY_SPEC.replace("steps: 6", "steps: true").replace("sigma_max: 8.0",
                                                                "sigma_max: .inf")
    code, err, path = validate(tmp_path, capsys, text)
    assert code == 2
    lines = text.splitlines()
    steps_line = next(i for i, line in enumerate(lines, 1) if "steps: true" in line)
    sigma_line = next(i for i, line in enumerate(lines, 1) if "sigma_max: .inf" in line)
    assert f"{path}:{steps_line} train.steps:" in err
    assert f"{path}:{sigma_line} process.sigma_max: expected a finite number" in err


def test_bounds_at_their_limits_still_validate(tmp_path):
    path = write_spec(tmp_path)
    spec, _ = load_spec(path, [f"seed={2**63 - 1}", "process.num_levels=100000",
                               "evaluate.metrics.0.projections=65536", "train.steps=0",
                               "name=a.b-c_d"])
    assert spec.seed == 2**63 - 1 and spec.train.steps == 0


def test_mps_without_mps_is_a_spec_error(tmp_path, capsys):
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, err, _ = validate(tmp_path, capsys, TINY_SPEC, "device=mps")
    assert code == 2 and "device:" in err and "no MPS" in err


def test_a_cuda_index_this_machine_lacks_is_a_spec_error(tmp_path, capsys):
    code, err, _ = validate(tmp_path, capsys, TINY_SPEC, "device=cuda:9999")
    assert code == 2 and "device:" in err
    assert ("no CUDA here" in err) if not torch.cuda.is_available() else ("below" in err)


def test_resolve_device_says_what_is_missing():
    from diffusers_kit.diffusion import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:9999"):
        resolve_device("cuda:9999")


def test_an_unknown_override_is_blamed_on_the_command_line_not_line_1(tmp_path, capsys):
    code, err, path = validate(tmp_path, capsys, TINY_SPEC, "foo.bar=1", "train.stepz=3")
    assert code == 2
    assert "command line 'foo.bar=1' foo:" in err
    assert "command line 'train.stepz=3' train.stepz:" in err and "did you mean 'steps'" in err
    assert f"{path}:1" not in err
