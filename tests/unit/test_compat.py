"""The compat module: the start-up check refuses an untested vLLM with the range in its
message, the override names a missing hook point, and every hooked method of the vLLM
that runs accepts what we pass it (``./dev test`` runs this on 0.32 and on 0.33's code)."""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
from fakes import FakeEngine
from packaging.requirements import Requirement

from vllm_lora_ext import compat
from vllm_lora_ext.server.plugin import LoraExtPlugin

PACKAGE = Path(compat.__file__).parent


def test_the_vllm_that_runs_is_in_range_and_has_every_hook_point():
    version = compat.check("server")
    assert compat.in_range(version)
    assert compat.problems() == []  # every hook exists and accepts what we pass


@pytest.mark.parametrize("version", ["0.31.0", "0.31.2", "0.34.0", "1.0.0"])
def test_an_untested_vllm_is_refused_naming_the_range(version, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(compat.IncompatibleVLLMError) as e:
        compat.check(version=version)
    assert f"vLLM {version}" in str(e.value)
    assert ">=0.32" in str(e.value) and "<0.34" in str(e.value)
    assert compat.ALLOW_UNTESTED_ENV in str(e.value)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1+cpu", "0.33.0", "0.33.5"])
def test_tested_versions_and_local_builds_pass(version, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    assert compat.check(version=version) == version


def test_the_override_lets_a_newer_vllm_run_when_every_hook_exists(monkeypatch, caplog):
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="vllm.lora_ext"):
        assert compat.check(version="0.34.0") == "0.34.0"
    assert "untested" in caplog.text


def test_the_override_names_a_removed_hook_point(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    processor = compat.get("InputProcessor.assign_request_id").__qualname__.split(".")[0]
    assert processor == "InputProcessor"
    import vllm.v1.engine.input_processor as module

    monkeypatch.delattr(module.InputProcessor, "assign_request_id")
    with pytest.raises(compat.IncompatibleVLLMError) as e:
        compat.check(version="0.34.0")
    assert "InputProcessor.assign_request_id (missing" in str(e.value)


def test_a_removed_override_falls_back_to_a_base_method_with_another_signature(monkeypatch):
    """Without AsyncLLM's own ``abort``, its base class's takes no ``internal``: named."""
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    monkeypatch.delattr(compat.get("AsyncLLM"), "abort")
    with pytest.raises(compat.IncompatibleVLLMError) as e:
        compat.check(version="0.34.0")
    assert "AsyncLLM.abort (no parameter internal)" in str(e.value)


def test_a_changed_signature_is_named(monkeypatch):
    """A hooked method that no longer takes a parameter we pass by name."""
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")

    async def abort(self, request_id):  # no ``internal``
        return None

    monkeypatch.setattr(compat.get("AsyncLLM"), "abort", abort)
    with pytest.raises(compat.IncompatibleVLLMError) as e:
        compat.check(version="0.34.0")
    assert "AsyncLLM.abort (no parameter internal)" in str(e.value)


def test_a_moved_module_uses_its_alternative_location():
    """``make_arg_parser`` moved between 0.32 and 0.33: one of its places resolves."""
    hook = compat.HOOKS["make_arg_parser"]
    assert len(hook.where) == 2
    assert callable(compat.get("make_arg_parser"))


def test_the_plugin_stops_stock_vllm_from_starting_on_an_untested_vllm(monkeypatch):
    """Through vLLM's own plugin loader, which skips a plugin whose constructor raises
    an Exception (the server would start without our routes and guard): it stops."""
    from vllm.plugins import load_endpoint_plugins

    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "lora_ext")
    assert [p.name for p in load_endpoint_plugins(("generate",))] == ["lora_ext"]
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.31.0")
    with pytest.raises(SystemExit, match=r"supports vLLM >=0\.32,<0\.34"):
        load_endpoint_plugins(("generate",))
    with pytest.raises(SystemExit, match="supports vLLM"):
        LoraExtPlugin()


def test_the_engine_check_names_what_a_client_lacks():
    compat.check_engine(FakeEngine())

    class RemoteClient:  # e.g. vLLM's multi-process API server's client
        vllm_config = model_config = None

    with pytest.raises(compat.IncompatibleVLLMError) as e:
        compat.check_engine(RemoteClient())
    assert "output_processor.request_states" in str(e.value)


def test_no_module_but_compat_imports_vllm():
    """Every vLLM internal in one place: other modules import vLLM only through compat."""
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "ray_actors").rglob("*.py")]:
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "vllm"]
    assert offenders == []


def test_the_lane_runs_the_vllm_it_says():
    """``./dev lane`` puts another vLLM's code first on the path: make sure it did."""
    expected = os.environ.get("LORA_EXT_EXPECT_VLLM")
    if not expected:
        pytest.skip("not the second lane (./dev lane sets LORA_EXT_EXPECT_VLLM)")
    assert compat.vllm_version() == expected


def test_the_cuda_extra_admits_exactly_the_supported_range():
    """One source of truth: the install range is the range the start-up check accepts."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    (cuda,) = project["optional-dependencies"]["cuda"]
    assert Requirement(cuda).specifier == compat.SUPPORTED
    pinned = [d for d in project["dependencies"] if "==" in d]
    assert pinned == []  # no exact pins in the library's own dependencies
