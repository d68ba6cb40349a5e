"""``python -m vllm_lora_ext {serve,demo,toy}`` (also the ``vllm-lora-ext`` script)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m vllm_lora_ext {serve <vLLM server args> | demo [options] | toy}"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from vllm_lora_ext.server.app import main_serve

        main_serve(rest)
        return 0
    if command == "demo":
        from vllm_lora_ext.toy.demo import main as demo_main

        return demo_main(rest)
    if command == "toy":
        from vllm_lora_ext.toy.assets import build_toy_assets

        print(build_toy_assets().model_dump_json(indent=2))
        return 0
    print(f"unknown command '{command}'\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
