"""The one alpha rule (clm_ext.alpha): what every entry point accepts and refuses, and how it says so."""
import json
import math

import pytest
import torch

from clm_ext.alpha import (
    AlphaError,
    alpha_from_request,
    alpha_number,
    alpha_tensor,
    check_alpha_shape,
    check_alpha_values,
)


@pytest.mark.parametrize("value", [0, 1, -2.0000001, 3.4e38, -1.5, 10**30])
def test_numbers_finite_in_float32_pass_unchanged(value):
    assert alpha_number(value) == float(value)


@pytest.mark.parametrize("value, error, shown", [
    (True, TypeError, "True"),
    ("1.5", TypeError, "'1.5'"),
    (None, TypeError, "None"),
    ([1.0], TypeError, r"\[1.0\]"),
    (math.nan, ValueError, "nan"),
    (-math.inf, ValueError, "-inf"),
    (1e300, ValueError, "1e\\+300"),  # a finite Python float, inf in float32
    (json.loads("1" + "0" * 400), ValueError, "an integer of about 401 digits"),  # no OverflowError
    (-(10**39), ValueError, "-1000000000000000000000000000000000000000"),
])
def test_bad_numbers_name_the_argument_and_show_the_value(value, error, shown):
    with pytest.raises(error, match=f"my_alpha must be .*got {shown}") as err:
        alpha_number(value, "my_alpha")
    assert isinstance(err.value, AlphaError) and err.value.param == "my_alpha"


def test_the_value_is_shown_exactly():
    with pytest.raises(AlphaError, match=r"got -2\.0000001e\+300$"):
        alpha_number(-2.0000001e300)
    with pytest.raises(AlphaError, match=r"got 3\.5000001e\+38$"):
        alpha_number(3.5000001e38)


def test_float64_computations_accept_what_float32_cannot_hold():
    assert alpha_number(1e300, dtype=torch.float64) == 1e300
    with pytest.raises(AlphaError, match="finite in float64"):
        alpha_number(10**400, dtype=torch.float64)


def test_tensor_values_report_the_first_bad_one_and_its_index():
    small = torch.tensor([0.5, 1e300, math.nan], dtype=torch.float64)
    with pytest.raises(AlphaError, match=r"finite in float32 .*got 1e\+300 at index 1"):
        check_alpha_values(small)
    per_token = torch.zeros(1000, dtype=torch.float64)
    per_token[700] = -2.0000001e300
    with pytest.raises(AlphaError, match=r"got -2\.0000001e\+300 at index 700"):
        check_alpha_values(per_token, "token alpha")
    check_alpha_values(per_token, dtype=torch.float64)
    check_alpha_values(torch.full((1000,), 3.0))


def test_shapes_per_sequence_and_per_token():
    check_alpha_shape(torch.tensor(0.5), length=4)
    check_alpha_shape(torch.ones(4), length=4)
    with pytest.raises(AlphaError, match=r"alpha has 2 values but the batch has 4 sequences"):
        check_alpha_shape(torch.ones(2), length=4)
    with pytest.raises(AlphaError, match=r"one value per token\), got shape \(2, 2\)"):
        check_alpha_shape(torch.ones(2, 2), per="token")
    with pytest.raises(AlphaError, match="at least one value"):
        check_alpha_shape(torch.ones(0))


def test_alpha_tensor_checks_each_list_element_by_name():
    assert alpha_tensor([0, 1.5, -2]).tolist() == [0.0, 1.5, -2.0]
    with pytest.raises(TypeError, match=r"alpha\[1\] must be .*got '1.5'"):
        alpha_tensor([0.0, "1.5"])  # was float()-converted before: a string is not an alpha
    with pytest.raises(AlphaError, match=r"alpha\[0\] .*401 digits"):
        alpha_tensor([10**400])
    with pytest.raises(AlphaError, match="at least one value"):
        alpha_tensor([])


@pytest.mark.parametrize("body, expected", [
    ({}, None),
    ({"alpha": 1.5}, 1.5),
    ({"vllm_xargs": {"alpha": -2}}, -2.0),
    ({"vllm_xargs": {"other": 1}}, None),
    ({"alpha": 2, "vllm_xargs": {"alpha": 2.0}}, 2.0),  # both, agreeing
])
def test_request_alpha_top_level_or_vllm_xargs(body, expected):
    assert alpha_from_request(body) == expected


@pytest.mark.parametrize("body, param, match", [
    ({"alpha": None}, "alpha", "alpha must be a number, got None"),
    ({"alpha": "1"}, "alpha", "got '1'"),
    ({"vllm_xargs": {"alpha": False}}, "vllm_xargs.alpha", "got False"),
    ({"vllm_xargs": [1]}, "vllm_xargs", "must be an object"),
    ({"alpha": 1, "vllm_xargs": {"alpha": 1.0000001}}, "alpha", r"alpha \(1.0\) and vllm_xargs.alpha \(1.0000001\) disagree"),
    (json.loads('{"alpha": 1' + "0" * 400 + "}"), "alpha", "401 digits"),
])
def test_bad_request_alphas_name_their_field(body, param, match):
    with pytest.raises(AlphaError, match=match) as err:
        alpha_from_request(body)
    assert err.value.param == param


def test_request_rule_takes_another_value_checker():
    """The rule for where a request's alpha is does not depend on what an alpha is (a dial vector later)."""

    def dials(value, name):
        if not isinstance(value, dict):
            raise AlphaError(f"{name} must be an object of named alphas", name)
        return {k: alpha_number(v, f"{name}.{k}") for k, v in value.items()}

    assert alpha_from_request({"alpha": {"tone": 1, "length": -0.5}}, dials) == {"tone": 1.0, "length": -0.5}
    with pytest.raises(AlphaError, match=r"vllm_xargs.alpha.tone must be finite") as err:
        alpha_from_request({"vllm_xargs": {"alpha": {"tone": math.inf}}}, dials)
    assert err.value.param == "vllm_xargs.alpha.tone"


@pytest.mark.parametrize("raw, param, match", [
    ('{"alpha": 1' + "0" * 400 + "}", "alpha", "401 digits"),  # was a 500 OverflowError
    ('{"alpha": -2.0000001}', "alpha", r"--alpha-range \[-2.0, 4.0\], got -2.0000001$"),  # was "got -2"
    ('{"vllm_xargs": {"alpha": 4.0000001}}', "vllm_xargs.alpha", "got 4.0000001$"),
    ('{"alpha": null}', "alpha", "got None"),
    ('{"alpha": 1, "vllm_xargs": {"alpha": 2}}', "alpha", "disagree"),
])
def test_clm_serve_and_the_vllm_front_door_refuse_the_same_alphas(raw, param, match):
    from clm_ext.serve.protocol import BadRequest, Limits, parse_request
    from clm_ext.vllm.middleware import rewrite

    body = {"model": "m", "prompt": "hi", **json.loads(raw)}
    with pytest.raises(BadRequest, match=match) as err:
        parse_request(body, Limits("m"), chat=False)
    assert err.value.param == param and err.value.status == 400
    if "range" not in match and "4.0000001" not in match:  # the vLLM server has no range of its own
        with pytest.raises(AlphaError, match=match) as err:
            rewrite(json.dumps(body).encode())
        assert err.value.param == param


@pytest.mark.parametrize("alpha, param, match", [
    (1.5, "alpha", r"object of dial alphas such as \{'positive': 1.0\}.*\['positive', 'concise'\], got 1.5"),
    ({"sincere": 1}, "alpha", "'sincere'.*does not have"),
    ({"positive": math.nan}, "alpha['positive']", "must be finite"),
])
def test_clm_serve_and_the_vllm_plugin_read_a_dial_vector_by_one_rule(alpha, param, match):
    from types import SimpleNamespace

    from clm_ext.serve.protocol import BadRequest, Limits, parse_request
    from clm_ext.vllm.alpha import request_alpha

    dials = ("positive", "concise")
    body = {"model": "m", "prompt": "hi", "alpha": alpha}
    with pytest.raises(BadRequest, match=match) as err:
        parse_request(body, Limits("m", dials=dials), chat=False)
    assert err.value.param == param
    with pytest.raises(AlphaError, match=match) as err:
        request_alpha(SimpleNamespace(extra_args={"alpha": alpha}), (1.0, 1.0), list(dials))
    assert err.value.param == param.replace("alpha", "vllm_xargs.alpha", 1)
    ok = {"model": "m", "prompt": "hi", "alpha": {"concise": -0.5}}
    assert parse_request(ok, Limits("m", dials=dials), chat=False).alpha == (0.0, -0.5)


def test_a_one_dial_server_takes_a_plain_number_and_names_it_out_of_range():
    from clm_ext.serve.protocol import BadRequest, Limits, parse_request

    limits = Limits("m", dials=("positive",))
    assert parse_request({"model": "m", "prompt": "hi", "alpha": 3}, limits, chat=False).alpha == (3.0,)
    with pytest.raises(BadRequest, match=r"alpha\['positive'\] must lie in .*got 9$") as err:
        parse_request({"model": "m", "prompt": "hi", "alpha": 9}, limits, chat=False)
    assert err.value.param == "alpha['positive']"
