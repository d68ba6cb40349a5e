"""Launches the extension's guarantees do not hold in are refused before serving, with
what to do instead."""

from __future__ import annotations

from argparse import Namespace

import pytest
from starlette.datastructures import State

from vllm_lora_ext.config import LoraExtConfig
from vllm_lora_ext.server.plugin import LoraExtPlugin, check_launch, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.3", True),
        ("::1", True),
        ("localhost", True),
        (None, False),
        ("", False),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
    ],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_more_than_one_api_server_is_refused():
    with pytest.raises(RuntimeError, match="--api-server-count 1"):
        check_launch(Namespace(api_server_count=2, host="127.0.0.1"), LoraExtConfig())
    check_launch(Namespace(api_server_count=1, host="127.0.0.1"), LoraExtConfig())
    check_launch(Namespace(api_server_count=None, host="127.0.0.1"), LoraExtConfig())


def test_open_bind_needs_an_admin_key_or_an_explicit_opt_out():
    for host in (None, "0.0.0.0", "10.1.2.3"):
        with pytest.raises(RuntimeError, match="LORA_EXT_ALLOW_OPEN_BIND"):
            check_launch(Namespace(host=host), LoraExtConfig())
        check_launch(Namespace(host=host), LoraExtConfig(admin_key="k"))
        check_launch(Namespace(host=host), LoraExtConfig(allow_open_bind=True))


async def test_the_plugin_checks_before_it_touches_the_engine():
    class Engine:
        output_processor = None  # never reached

    with pytest.raises(RuntimeError, match="--api-server-count"):
        await LoraExtPlugin().init_state(
            Engine(), State(), Namespace(api_server_count=4, host="127.0.0.1")
        )
