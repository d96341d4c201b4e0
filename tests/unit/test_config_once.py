"""Every default declared once, in the schema: presets hold only what differs from it, and each
fixed set of values is one Literal, refused outside it and documented as it is."""

import re
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import yaml
from omegaconf import OmegaConf

from r1mega.config import choices
from r1mega.config.choices import choice_fields
from r1mega.config.errors import ConfigError
from r1mega.config.loader import CONF_DIR, compose_config, load_config
from r1mega.config.schema import R1Config

ROOT = CONF_DIR.parent
SCHEMA_FILES = [ROOT / "r1mega" / "config" / f for f in ("schema.py", "sglang_schema.py", "bench_schema.py")]
KEYS = {key: allowed for key, allowed, _ in choice_fields(R1Config)}
CONFIG_KEYS = [key for key in KEYS if "[]" not in key]  # settable with a plain override key=value


def _body(path: Path) -> dict:
    """A preset's own keys (its defaults list aside)."""
    body = yaml.safe_load(path.read_text()) or {}
    body.pop("defaults", None)
    return body


def _leaves(tree: dict, prefix=()):
    """Paths to the preset's values: scalars, lists and empty mappings (a list replaces, a mapping merges)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _without(tree: dict, path) -> dict:
    out = dict(tree)
    if len(path) == 1:
        del out[path[0]]
    else:
        out[path[0]] = _without(tree[path[0]], path[1:])
    return out


def _restated(base, body: dict) -> list:
    """Keys of `body` whose removal leaves the merge onto `base` as it is: they restate `base`."""
    base = OmegaConf.merge(base)  # a copy whose mappings (pipeline.vars) take new keys, as in Hydra's merge
    OmegaConf.set_struct(base, False)
    merged = OmegaConf.to_container(OmegaConf.merge(base, body))
    return [".".join(map(str, p)) for p in _leaves(body)
            if OmegaConf.to_container(OmegaConf.merge(base, _without(body, p))) == merged]


def _nest(package: str, body: dict) -> dict:
    for part in reversed(package.split(".")):
        body = {part: body}
    return body


def _group_presets():
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        if group in (".", "experiment") or group.startswith("hydra"):
            continue
        yield pytest.param(path, group.replace("/", "."), id=f"{group}/{path.stem}")


@pytest.mark.parametrize("path,package", list(_group_presets()))
def test_group_presets_hold_only_what_differs_from_the_schema(path, package):
    body = _body(path)  # empty: the preset is the schema's defaults
    restated = _restated(OmegaConf.structured(R1Config), _nest(package, body)) if body else []
    assert not restated, f"{path.relative_to(ROOT)} restates the schema's defaults"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_experiments_hold_only_what_differs(name):
    """An experiment's keys differ from the schema and from the presets its defaults list picks."""
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    defaults = yaml.safe_load(path.read_text()).get("defaults") or []
    picks = [f"{k.split()[-1].lstrip('/')}={v}" for entry in defaults for k, v in entry.items()]  # data=files
    base = compose_config(picks)  # the config this experiment's own keys are merged onto
    body = _body(path)
    assert not _restated(base, body), f"{path.relative_to(ROOT)} restates what it gets anyway"
    assert not _restated(OmegaConf.structured(R1Config), body), f"{path.relative_to(ROOT)} restates a default"


def test_top_level_config_holds_only_the_default_run_settings():
    """conf/config.yaml's own values are the default run's (40 steps, 48 new tokens, an evaluation every
    20 steps), none of them a schema default."""
    body = _body(CONF_DIR / "config.yaml")
    body.pop("hydra")
    assert not _restated(OmegaConf.structured(R1Config), body)
    cfg = load_config([])
    assert (cfg.trainer.steps, cfg.rollout.max_new_tokens, cfg.trainer.eval_every) == (40, 48, 20)


def test_every_choice_field_is_found():
    assert KEYS["algorithm.advantage"] == get_args(choices.AdvantageMode)
    assert KEYS["model.moe.score_function"] == get_args(choices.ScoreFunction)
    assert KEYS["pipeline.stages[].kind"] == get_args(choices.StageKind)
    assert KEYS["bench.suites[]"] == get_args(choices.BenchSuite)
    assert KEYS["pretrain.optimizer.name"] == get_args(choices.OptimizerName)
    assert KEYS["rollout.sglang.mode"] == get_args(choices.SGLangMode)


def _bad_value_args(key):
    """The overrides that set `key` to a value outside its choices (with what the key sits in)."""
    parents = {"model.moe.": ["model=tiny_moe"]}
    extra = next((v for k, v in parents.items() if key.startswith(k)), [])
    return [*extra, f"{key}=bogus"]


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_a_value_outside_the_choices_is_refused_naming_key_and_choices(key):
    with pytest.raises(ConfigError) as err:
        load_config(_bad_value_args(key))
    assert str(err.value) == f"{key}='bogus' is not one of {sorted(KEYS[key])}"


@pytest.mark.parametrize("args,key", [
    (["bench.suites=[step,bogus]"], "bench.suites"),
    (["bench.rollout.engines=[bogus]"], "bench.rollout.engines"),
    (["+pipeline.stages=[{name: a, kind: bogus}]"], "pipeline.stages[0].kind"),
])
def test_list_values_outside_the_choices_are_refused(args, key):
    allowed = KEYS[key.replace("[0]", "[]") if "[0]" in key else key + "[]"]
    with pytest.raises(ConfigError, match=re.escape(f"{key}='bogus' is not one of {sorted(allowed)}")):
        load_config(args)


def test_optional_choices_take_none():
    cfg = load_config(["model.fp8.format=null", "bench.train.dtype=null"])
    assert cfg.model.fp8.format is None and cfg.bench.train.dtype is None


def _documented_fields():
    """(file:line, class, field, documented names) of every schema field whose comment (on its line or
    the lines just above) lists values as `a | b (why) | c`."""
    for path in SCHEMA_FILES:
        lines = path.read_text().splitlines()
        cls = None
        for i, line in enumerate(lines):
            if line.startswith("class "):
                cls = re.match(r"class (\w+)", line).group(1)
            m = re.match(r"    (\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
            if not m or cls is None:
                continue
            comment = [m.group(2) or ""]
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#"):
                comment.insert(0, lines[j].strip().lstrip("# "))
                j -= 1
            text = re.sub(r"\([^)]*\)", "", " ".join(c for c in comment if c))
            if " | " in text:
                names = [seg.split()[0].rstrip(":,;") for seg in text.split(" | ")]
                yield f"{path.name}:{i + 1}", f"{path.stem}.{cls}", m.group(1), names


def _choice_fields_by_class():
    """{(module.class, field): (allowed values, may be None)} of the choice fields of the schema files."""
    import dataclasses
    import importlib

    out = {}
    for path in SCHEMA_FILES:
        module = importlib.import_module(f"r1mega.config.{path.stem}")
        for cls in vars(module).values():
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__:
                hints = choices._hints(cls)
                for f in dataclasses.fields(cls):
                    choice = choices.literal_of(hints[f.name])
                    if choice is not None:
                        out[(f"{path.stem}.{cls.__name__}", f.name)] = choice[:2]
    return out


def test_schema_comments_list_each_choice_as_its_literal():
    fields = _choice_fields_by_class()
    documented = list(_documented_fields())
    assert len(documented) > 15
    for where, cls, name, names in documented:
        assert (cls, name) in fields, f"{where}: {cls}.{name} documents a choice list but is not a Literal"
        allowed, optional = fields[(cls, name)]
        expected = [*(["None"] if optional and "None" in names else []), *allowed]
        assert sorted(names) == sorted(expected), f"{where}: {cls}.{name} lists {names}, Literal {allowed}"


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_choice_table_matches_the_literals():
    rows = {}
    for line in _readme_section("Configuration").splitlines():
        m = re.match(r"\|([^|]+)\|([^|]+)\|$", line)
        if m:
            names = re.findall(r"`([^`]+)`", m.group(2))
            for key in re.findall(r"`([^`]+)`", m.group(1)):
                rows[key] = names
    assert {k: sorted(v) for k, v in rows.items()} == {k: sorted(v) for k, v in KEYS.items()}


def test_readme_preset_lists_name_the_presets():
    """`group=a|b|c` in the README names presets that exist in conf/group."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"`(\w+(?:/\w+)?)=((?:[\w.-]+\|)+[\w.-]+)`", text)
    assert found
    for group, options in found:
        presets = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
        assert set(options.split("|")) <= presets, (group, options, presets)


def test_rule_sets_are_not_relisted_in_the_config_package():
    """No module of r1mega.config but choices.py spells out a choice set (as a set, tuple or list literal)."""
    sets = {frozenset(get_args(v)) for v in vars(choices).values() if get_origin(v) is Literal}
    assert frozenset(get_args(choices.AggregationMode)) in sets
    strings = re.compile(r"""\s*(?:(["'])[^"']*\1\s*,?\s*)+""")  # only quoted strings and commas
    for path in (ROOT / "r1mega" / "config").glob("*.py"):
        if path.name == "choices.py":
            continue
        for group in re.findall(r"[\[({]([^\[\](){}]*)[\])}]", path.read_text()):
            if strings.fullmatch(group):
                names = frozenset(re.findall(r"""["']([^"']*)["']""", group))
                assert names not in sets, f"{path.name} re-lists {sorted(names)}"


def test_reward_names_come_from_the_config():
    from r1mega.rewards.components import BUILTIN, Scorer

    assert BUILTIN == get_args(choices.RewardName)
    assert Scorer(list(BUILTIN), {}, 1.0).names == list(BUILTIN)  # a function for each name


def test_names_other_packages_implement_match_the_literals():
    """Tables outside the config keyed by a choice set have an entry for each choice."""
    from r1mega.data.conversations import SFT_TEMPLATES
    from r1mega.data.tasks import GENERATORS
    from r1mega.data.templates import TEMPLATES
    from r1mega.recipe.runner import ENTRY

    assert set(GENERATORS) | {"files"} == set(get_args(choices.DataName))
    assert set(TEMPLATES) == set(get_args(choices.PromptTemplate))
    assert set(SFT_TEMPLATES) == set(get_args(choices.SFTTemplate))
    assert set(ENTRY) == set(get_args(choices.StageKind))


def test_config_does_not_import_upward():
    """The config package imports neither the rewards nor the Slurm code."""
    for path in (ROOT / "r1mega" / "config").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) r1mega\.(rewards|slurm)", text, re.M), path.name
