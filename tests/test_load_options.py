"""harness.load_options: each load option declared once, and everything built from it agrees --
harness load's parser, Locust's `--llm-*` options, the argv between them and the spec on each
side, the plan stage's fields and its `harness load` argv."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from harness import load_options
from harness.errors import UsageError
from harness.load_options import OPTIONS, LoadSpec


class LocustLikeParser(argparse.ArgumentParser):
    """Takes the keywords Locust's parser adds (include_in_web_ui, env_var)."""

    web_ui: set[str] = set()

    def add_argument(self, *args, include_in_web_ui=False, env_var=None, **kw):
        action = super().add_argument(*args, **kw)
        if include_in_web_ui:
            self.web_ui.add(action.dest)
        return action


def locust_parser() -> LocustLikeParser:
    p = LocustLikeParser()
    p.web_ui = set()
    load_options.add_locust_options(p)
    return p


def harness_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False)   # (a plan's argv has flags of harness load's own)
    load_options.add_load_options(p)
    return p


def a_value(o: load_options.Option):
    """A value of `o` that is not its default."""
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    return {bool: True, int: 7, float: 2.5, str: "x.jsonl",
            tuple: ("ttft_p99_ms<=200", "error_rate<=0.01")}[o.kind]


def test_every_option_is_in_both_parsers_once_with_its_one_default():
    locust = vars(locust_parser().parse_args([]))
    harness = vars(harness_parser().parse_args([]))
    for o in OPTIONS:
        assert "llm_" + o.dest in locust, o.name
        assert (o.dest in harness) == o.harness, o.name
        assert harness.get(o.dest) is None   # not given: from_args fills in the default
    assert load_options.from_locust(argparse.Namespace(**locust)) == LoadSpec()
    assert load_options.from_args(argparse.Namespace(**harness)) == LoadSpec()
    assert load_options.default("output-len") == LoadSpec().output_len == 128


def test_the_web_ui_shows_the_options_it_showed():
    p = locust_parser()
    assert p.web_ui == {"llm_model", "llm_input_len", "llm_output_len", "llm_dataset", "llm_rate", "llm_slo"}


def test_a_spec_crosses_harness_load_to_locust_unchanged():
    """harness load's command line -> LoadSpec -> --llm-* argv -> Locust's parse -> the same LoadSpec."""
    argv = []
    for o in OPTIONS:
        if not o.harness:
            continue
        v = a_value(o)
        if o.kind is bool:
            argv.append("--" + o.name)
        elif o.kind is tuple:
            for item in v:
                argv += ["--" + o.name, item]
        else:
            argv += ["--" + o.name, str(v)]
    spec = load_options.from_args(harness_parser().parse_args(argv))
    assert all(getattr(spec, o.dest) != o.default for o in OPTIONS if o.harness)
    spec = spec.replace(out="/tmp/r", key_origins=("http://a:1", "http://b:2"), expected_workers=3)
    crossed = load_options.from_locust(locust_parser().parse_args(load_options.locust_argv(spec)))
    assert crossed == spec
    assert load_options.locust_argv(LoadSpec()) == []   # only what differs from the defaults


def test_a_web_form_value_is_read_as_the_field_type():
    # Locust's start form sets a text option as text (llm_slo) and converts numbers itself
    o = argparse.Namespace(**vars(locust_parser().parse_args([])))
    o.llm_slo, o.llm_rate = "ttft_p99_ms<=200, error_rate<=0.01", 3
    spec = load_options.from_locust(o)
    assert spec.slo == ("ttft_p99_ms<=200", "error_rate<=0.01") and spec.rate == 3.0


@pytest.mark.parametrize("field, value, line", [
    ("num_requests", -3, "--llm-num-requests must be >= 0 requests (0: no limit), not -3"),
    ("timeout", 0.0, "--llm-timeout must be > 0 seconds (the longest silence a request may have), not 0"),
    ("metrics_port", 70000, "--llm-metrics-port must be a port in 1..65535 (0: off), not 70000"),
])
def test_ranges_name_the_flag(field, value, line):
    with pytest.raises(UsageError) as e:
        load_options.check_ranges(dataclasses.replace(LoadSpec(), **{field: value}), "--llm-")
    assert str(e.value) == line
    load_options.check_ranges(LoadSpec(), "--")   # every default is in range


def test_the_plan_stage_takes_its_fields_and_argv_from_the_options():
    from harness.stages import serving

    assert serving.PARAMS["output_len"].default == 128 and serving.PARAMS["output_len"].kind == "int"
    assert serving.PARAMS["rate"].default == 20.0   # the seed's own
    p = {k: f.default for k, f in serving.PARAMS.items()}
    argv = serving.load_argv(dict(p, input_len=64, warmup=2.5), "http://h:1", "m", Path("o"), ["x<=1"], 4.0)
    assert argv[argv.index("--input-len") + 1] == "64" and argv[argv.index("--warmup") + 1] == "2.5"
    assert "--output-len" not in argv   # the default: harness load's own
    parsed = harness_parser().parse_known_args(argv[argv.index("load") + 1:])[0]
    assert load_options.from_args(parsed).replace(model="") == LoadSpec(
        input_len=64, warmup=2.5, num_requests=500, slo=("x<=1",), rate=4.0)
