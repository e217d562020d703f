"""Every setting is read by code outside the config package: a field nobody reads is a lie in
--help-config. The check walks each command's schema and looks for the field's name as an attribute read
(or a DataSettings field, which the data layer reads by name) anywhere else in the package."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from chatforge.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, describe
from chatforge.data.pipeline import DataSettings
from chatforge.pipeline.config import PipelineConfig, hidden_keys

SRC = Path(__file__).resolve().parents[2] / "src" / "chatforge"


def attributes_read_outside_config() -> set[str]:
    """Attribute names read outside chatforge/config, plus those read inside the config classes' properties
    that are themselves read outside (e.g. `algorithm.kl_in` through `kl_in_loss`)."""
    names: set[str] = set()
    properties: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if path.parent.name == "config":
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
                ):
                    properties[node.name] = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            continue
        names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for prop, inner in properties.items():
        if prop in names:
            names |= inner
    return names | {f.name for f in dataclasses.fields(DataSettings)}


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, DPOConfig, PPOConfig, PipelineConfig])
def test_every_setting_is_read_somewhere(cls):
    read = attributes_read_outside_config()
    hidden = hidden_keys() if cls is PipelineConfig else ()
    unread = [key for key, _, _ in describe(cls, hidden=hidden) if key.rsplit(".", 1)[-1] not in read]
    assert not unread, f"{cls.__name__} settings no code reads: {unread}"


def test_step3_has_fewer_than_60_settings():
    assert len(describe(PPOConfig)) < 60
