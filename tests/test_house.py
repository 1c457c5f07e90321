"""The shape of the code base: one home for defaults (configs/), imports in one direction, no circle."""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from pathlib import Path

import pytest
import yaml

from models.config import SpeculativeDecodingConfig, _TYPES, compose
from models.policy.cost_profile import profile_defaults
from training.learned.predictor import fit_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def yaml_group(group: str, option: str) -> dict:
    """The values of configs/<group>/<option>.yaml as written, its own defaults list merged first."""
    raw = yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text()) or {}
    values = {}
    for base in raw.pop("defaults", []):
        if isinstance(base, str) and base != "_self_":
            values.update(yaml_group(group, base))
    values.update(raw)
    return values


def default_options() -> dict[str, str]:
    """group -> option from configs/config.yaml's defaults list."""
    top = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    return {k: v for d in top["defaults"] if isinstance(d, dict) for k, v in d.items()}


@pytest.mark.parametrize("group", sorted(_TYPES))
def test_config_defaults_are_the_yaml_files(group):
    """Every value of the typed default config is what the YAML file says (interpolations aside),
    and the YAML names every field: Python adds no default of its own."""
    written = yaml_group(group, default_options()[group])
    built = getattr(SpeculativeDecodingConfig(), group)
    names = {f.name for f in dataclasses.fields(built)}
    assert names <= set(written), f"configs/{group} does not set {sorted(names - set(written))}"
    for name in names:
        value = written[name]
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation, resolved against the top-level config
        assert getattr(built, name) == value, f"{group}.{name}: code {getattr(built, name)!r}, YAML {value!r}"


@pytest.mark.parametrize("group", sorted(_TYPES))
def test_config_schema_has_no_python_defaults(group):
    for f in dataclasses.fields(_TYPES[group]):
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
            f"{group}.{f.name} has a Python default; its home is configs/{group}/"


def test_library_defaults_are_read_from_the_yaml_files():
    profile = yaml_group("profile_costs", "default")
    assert profile_defaults() == dict(node_counts=tuple(profile["node_counts"]), widths=tuple(profile["widths"]),
                                      context=profile["context"], repeats=profile["repeats"],
                                      warmup=profile["warmup"])
    fit = yaml_group("train_predictor", "default")
    settings = fit_settings()
    assert settings == {k: tuple(fit[k]) if k == "hidden" else fit[k] for k in settings}
    assert fit_settings(epochs=3)["epochs"] == 3  # an explicit value wins


@pytest.mark.parametrize("overrides", [
    ["tree_search.mode=static"], ["tree_search=static"], ["decoding.method=chain"], ["decoding.method=target_only"],
    ["decoding=sampling"], ["decoding=sampling", "tree_search.child_draw=iid"],
    *[[f"pruning={s}"] for s in ("none", "threshold", "adaptive", "level", "ratio", "budget", "cost_aware")],
    ["affine_alignment=demo", "acceptance_predictor=demo", "tree_search.rank_by=predictor"],
])
def test_default_config_is_valid_for_every_mode_it_names(overrides):
    SpeculativeDecodingConfig.from_overrides(overrides).validate()


def test_every_experiment_preset_composes():
    presets = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    assert presets
    for name in presets:
        cfg = compose([f"experiment={name}"])
        SpeculativeDecodingConfig.from_hydra(cfg).validate()


# ---------------------------------------------------------------------- imports
# Inside models/, a module may import only from a lower layer or its own subpackage.
LAYERS = {"models": 0, "models.errors": 0, "models.config": 0, "models.paths": 0, "models.checkpoint": 0,
          "models.kernels": 1, "models.decoding": 2, "models.drafters": 3, "models.learned": 3, "models.policy": 3,
          "models.io": 4}
TOP = {"models": 0, "speculative_decoder": 1, "training": 2}  # scripts -> training -> speculative_decoder -> models


def project_modules() -> dict[str, Path]:
    files = [p for d in ("models", "training") for p in (ROOT / d).rglob("*.py")] + [ROOT / "speculative_decoder.py"]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports_of(path: Path, modules) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out += [(n, id(node) in top) for n in names if n.split(".")[0] in TOP]
    return out


def layer(module: str) -> tuple[str, int]:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer of models/: add its subpackage to LAYERS")


def test_imports_run_one_way_without_circles():
    modules = project_modules()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, at_top in imports_of(path, modules):
            assert at_top, f"{mod} imports {target} inside a function (circles hide there)"
            assert TOP[target.split(".")[0]] <= TOP[mod.split(".")[0]], f"upward import: {mod} -> {target}"
            if mod.startswith("models") and target.startswith("models"):
                (src_pkg, src), (dst_pkg, dst) = layer(mod), layer(target)
                assert dst < src or (dst == src and dst_pkg == src_pkg) or dst == 0, \
                    f"{mod} ({src_pkg}) imports {target} ({dst_pkg}): models import only toward their core"
            graph[mod].add(target if target in modules else target.rsplit(".", 1)[0])
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph.get(m, ()):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_every_package_ships():
    """pyproject.toml lists every package folder (a plain install would silently drop a new one)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for d in ("models", "training")
             for p in (ROOT / d).rglob("__init__.py")}
    assert found | {"treespec_configs"} == set(project["packages"])
    assert project["package-dir"]["treespec_configs"] == "configs"
