"""``oisp demo``: the whole pipeline, offline, in seconds.

Starts a local provider endpoint that answers like OpenAI and Anthropic, the real oisp proxy in front of it
(explicit mode, a throwaway CA), and the real ``openai`` and ``anthropic`` SDK clients, which run an agent turn
each (a tool call, the tool's result sent back, the final answer; streaming and not). Prints the events.
"""

from __future__ import annotations

import functools
import json
import ssl
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from oisp.cli.run import Running, run
from oisp.config import Config
from oisp.demo import HOSTS, stand_in_context
from oisp.demo.provider import DemoProvider
from oisp.errors import OispError
from oisp.sinks.memory import MemorySink
from oisp.tls import CertificateAuthority

__all__ = ["run_demo"]

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]},
}


def run_demo(*, output: Path | None = None, json_lines: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    try:
        import anthropic  # noqa: F401
        import openai  # noqa: F401
    except ImportError as exc:
        raise OispError(f"the demo drives the real SDKs: pip install 'oisp[demo]' ({exc})") from None
    sink = MemorySink()
    summary = anyio.run(functools.partial(_demo, sink, output, json_lines))
    counts = Counter(e.event_type for e in sink.events)
    print(f"\noisp demo: {len(sink.events)} events ({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}); "
          f"dropped {summary['pipeline']['dropped_total']}", file=sys.stderr)
    return 0 if counts["ai.request"] >= 4 and counts["ai.response"] >= 4 else 1


async def _demo(sink: MemorySink, output: Path | None, json_lines: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="oisp-demo-") as tmp:
        provider_ca = CertificateAuthority.load_or_create(Path(tmp) / "provider-ca")
        provider = DemoProvider(stand_in_context(provider_ca))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            port = await tg.start(provider.serve)
            sinks: list[dict[str, Any]] = [{"kind": "stdout", "format": "json" if json_lines else "line"}]
            if output is not None:
                sinks.append({"kind": "jsonl", "path": str(output)})
            options = Config(
                listen="127.0.0.1:0", confdir=Path(tmp) / "oisp", upstream_ca=provider_ca.cert_path,
                resolve=tuple(f"{host}:443:127.0.0.1:{port}" for host in HOSTS), sinks=tuple(sinks),
            )
            result: dict[str, Any] = {}
            done = anyio.Event()

            async def runner(*, task_status: Any) -> None:
                result.update(await run(options, extra_sinks={"demo": sink}, handle_signals=False, stop=stop,
                                        task_status=task_status))
                done.set()

            running: Running = await tg.start(runner)
            try:
                await anyio.to_thread.run_sync(_agent_turns, running.address, str(running.ca.cert_path))
            finally:
                stop.set()
            await done.wait()  # the runner drained the proxy and flushed every sink
            tg.cancel_scope.cancel()  # the local provider serves forever
        return result


def _agent_turns(proxy: tuple[str, int], ca_file: str) -> None:
    """What an agent would do: ask, get a tool call, run the tool, send its result, get the answer."""
    import anthropic
    import openai

    verify = ssl.create_default_context(cafile=ca_file)
    proxy_url = f"http://{proxy[0]}:{proxy[1]}"
    # Each SDK brings its own HTTP client class; both are configured the way a user would: proxy + trust.
    with openai.DefaultHttpxClient(proxy=proxy_url, verify=verify) as http, \
            anthropic.DefaultHttpxClient(proxy=proxy_url, verify=verify) as claude_http:
        client = openai.OpenAI(api_key="sk-proj-DEMOdemoDEMOdemoDEMOdemoDEMOdemo0000", http_client=http,
                               max_retries=0)
        tools: Any = [{"type": "function", "function": WEATHER_TOOL}]
        messages: list[Any] = [{"role": "system", "content": "You are a concise assistant."},
                               {"role": "user", "content": "What is the weather in Paris?"}]
        first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 11, "sky": "cloudy"})}]
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools, stream=True,
                                                stream_options={"include_usage": True})
        for _ in stream:
            pass

        claude = anthropic.Anthropic(api_key="sk-ant-api03-DEMOdemoDEMOdemoDEMOdemoDEMOdemo",
                                     http_client=claude_http, max_retries=0)
        claude_tools: Any = [{"name": WEATHER_TOOL["name"], "description": WEATHER_TOOL["description"],
                              "input_schema": WEATHER_TOOL["parameters"]}]
        conversation: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
        with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=256, tools=claude_tools,
                                    system="You are a concise assistant.", messages=conversation) as s:
            reply = s.get_final_message()
        tool_use = next(block for block in reply.content if block.type == "tool_use")
        conversation += [{"role": "assistant", "content": [b.model_dump() for b in reply.content]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                                       "content": json.dumps({"temp_c": 11, "sky": "cloudy"})}]}]
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=256, tools=claude_tools,
                               messages=conversation)
