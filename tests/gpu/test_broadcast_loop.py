"""The filesystem broadcast end to end: a trainer publishing steps while clients
sample, incomplete or corrupt steps refused with the old version serving, and the
server's watcher (``--watch watched=<root>``) swapping steps in by itself."""

from __future__ import annotations

import asyncio
import json
import shutil

from engine_helpers import PROMPT, complete, loras, post, words

from vllm_lora_ext.broadcast import (
    MANIFEST,
    RetentionConfig,
    clean,
    publish,
    sha256_of,
    step_dir,
)
from vllm_lora_ext.client import RemoteInferenceClient, RetryPolicy

STEPS = 50


async def test_incomplete_or_corrupt_steps_are_refused_and_old_version_serves(
    client, toy, tmp_path
):
    root = tmp_path / "bc"
    first = publish(toy.adapters["meow"], root, 1)
    v1 = await post(client, "load_lora_adapter", {"lora_name": "bc", "lora_path": str(first.path)})
    try:
        unsealed = step_dir(root, 2)  # files and manifest, no sentinel: a publisher mid-way
        shutil.copytree(toy.adapters["woof"], unsealed)
        manifest = {
            "step": 2,
            "files": {
                f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)}
                for f in unsealed.iterdir()
            },
        }
        (unsealed / MANIFEST).write_text(json.dumps(manifest))
        err = await post(
            client, "load_lora_adapter", {"lora_name": "bc", "lora_path": str(unsealed)}, 425
        )
        assert "no STABLE sentinel" in err["error"]["message"]

        bad = publish(toy.adapters["woof"], root, 3)
        f = bad.path / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF  # same size, wrong bytes
        f.write_bytes(bytes(data))
        err = await post(
            client, "load_lora_adapter", {"lora_name": "bc", "lora_path": str(bad.path)}, 422
        )
        assert "does not match the xxh3_128" in err["error"]["message"]

        state = (await loras(client))["bc"]
        assert state["version"] == v1["version"] and len(state["versions"]) == 1
        assert set(words((await complete(client, "bc", 6))["choices"][0]["text"])) == {"meow"}
    finally:
        await post(client, "unload_lora_adapter", {"lora_name": "bc"})


async def test_trainer_server_loop(client, server, toy, tmp_path):
    """Publish 50 steps (alternating weights) while four clients sample; each step is
    loaded zero-stall and the root cleaned to its window. Every request succeeds, every
    answer comes from the weights of the version it names, and only the window (plus
    what a server still leases) stays on disk."""
    root = tmp_path / "bc"
    retention = RetentionConfig(max_async_level=1)
    weights = {0: ("meow", toy.adapters["meow"]), 1: ("woof", toy.adapters["woof"])}
    word_of: dict[int, str] = {}
    done = asyncio.Event()
    answers: list = []

    async def sampler(rc: RemoteInferenceClient) -> None:
        while not done.is_set():
            r = await rc.sample_with_retry(
                "loop", prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True
            )
            answers.append(r)

    async with RemoteInferenceClient(server, retry=RetryPolicy(deadline_s=120)) as rc:
        word, path = weights[0]
        word_of[
            (await rc.load_lora_adapter("loop", str(publish(path, root, 0).path)))[server][
                "version"
            ]
        ] = word
        samplers = [asyncio.create_task(sampler(rc)) for _ in range(4)]
        try:
            for step in range(1, STEPS):
                word, path = weights[step % 2]
                published = publish(path, root, step)
                loaded = await rc.load_lora_adapter("loop", str(published.path))
                word_of[loaded[server]["version"]] = word
                clean(root, step, retention)
                await asyncio.sleep(0.05)  # let the samplers see this version
        finally:
            done.set()
            await asyncio.gather(*samplers)
            await rc.unload_lora_adapter("loop")
    assert len(answers) >= STEPS // 2
    for r in answers:
        (s,) = r.samples
        assert s.finish_reason == "length" and len(s.token_ids) == 8
        spans = {sp["version"] for sp in s.lora_versions}
        if len(spans) == 1:
            assert set(words(s.text)) == {word_of[spans.pop()]}, s.text
    clean(root, STEPS - 1, retention)  # the server has released its leases by now
    on_disk = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert on_disk == [f"step_{STEPS - 2}", f"step_{STEPS - 1}"]


async def test_watcher_swaps_in_new_stable_steps(client, toy, watch_root):
    async def wait_for_step(step: int) -> dict:
        async with asyncio.timeout(60):
            while True:
                state = (await loras(client)).get("watched")
                if state and state["versions"][-1]["path"] == str(step_dir(watch_root, step)):
                    return state
                await asyncio.sleep(0.1)

    base = max([int(p.name[5:]) for p in watch_root.glob("step_*")], default=0) + 1
    publish(toy.adapters["meow"], watch_root, base)
    await wait_for_step(base)
    assert set(words((await complete(client, "watched", 6))["choices"][0]["text"])) == {"meow"}
    step_dir(watch_root, base + 1).mkdir()  # never sealed: skipped, not loaded
    publish(toy.adapters["woof"], watch_root, base + 2)
    state = await wait_for_step(base + 2)
    assert all(v["path"] != str(step_dir(watch_root, base + 1)) for v in state["versions"])
    assert set(words((await complete(client, "watched", 6))["choices"][0]["text"])) == {"woof"}
    leases = list((step_dir(watch_root, base + 2) / ".leases").iterdir())
    assert len(leases) == 1  # held by the server while the version is resident
