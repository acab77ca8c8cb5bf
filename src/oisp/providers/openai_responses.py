"""The OpenAI Responses API (``POST /v1/responses``, also Azure's ``/openai/v1/responses``).

Requests carry ``input`` (a string, or a list of items: messages with ``input_text``/``input_image`` parts,
earlier ``function_call`` items, and ``function_call_output`` items, which are the results of tools the model
asked for in an earlier response, linked by ``call_id``) and ``instructions`` (the system prompt).

Responses are one JSON object, or typed SSE events: ``response.created``, ``response.output_item.added``,
``response.output_text.delta``, ``response.function_call_arguments.delta``, ``response.reasoning_*.delta``,
``response.output_item.done``, then ``response.completed`` (or ``response.incomplete`` / ``response.failed``)
with the whole response and its usage, or an ``error`` event. Deltas are accumulated as they come, so a cut
stream still reports what it carried; the terminal event's full response then replaces them.

Output items with a ``call_id`` (``function_call``, ``custom_tool_call``, ``computer_call``, ``shell_call``,
...) are tools the client runs: they become tool calls and ``agent.tool_call`` events. Hosted tools OpenAI runs
itself (web search, file search, code interpreter, MCP, image generation) are listed in the response's
``hosted_tool_calls``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oisp.events import ResponseError
from oisp.framing import SseEvent
from oisp.http.exchange import HttpExchange
from oisp.provider_kit import RequestFacts, ToolResultFacts, content_facts, json_or_none, message
from oisp.providers.openai_common import (
    OpenAIDialectDecoder,
    as_index,
    as_list,
    as_mapping,
    canonical_json,
    error_from_body,
    openai_usage,
    request_parameters,
    tool_definitions,
    tool_result_content,
)
from oisp.redaction import sha256_text

__all__ = ["ResponsesDecoder", "responses_request_facts"]

#: Client-side tool call item type -> the tool name used when the item has none.
_CALL_NAMES = {"computer_call": "computer_use", "local_shell_call": "local_shell", "shell_call": "shell",
               "apply_patch_call": "apply_patch"}


def _call_arguments(item: Mapping[str, Any]) -> tuple[str | None, Any]:
    """(argument text, parsed arguments) of a tool call item of any kind."""
    if isinstance(item.get("arguments"), str):
        return item["arguments"], None
    if isinstance(item.get("input"), str):  # custom tools take free text
        return None, {"input": item["input"]}
    for key in ("action", "operation", "arguments"):
        if isinstance(item.get(key), Mapping):
            return None, dict(item[key])
    return None, None


def _call_name(item: Mapping[str, Any]) -> str | None:
    name = item.get("name")
    if isinstance(name, str) and name:
        return name
    return _CALL_NAMES.get(str(item.get("type")), str(item.get("type")).removesuffix("_call") or None)


def responses_request_facts(body: Any) -> RequestFacts:
    """The facts of a Responses API request body."""
    if not isinstance(body, Mapping):
        return RequestFacts(request_type="chat")
    messages = []
    results: list[ToolResultFacts] = []
    system: list[str] = []
    call_names: dict[str, str] = {}
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        system.append(instructions)
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            item = {"role": "user", "content": item}
        if not isinstance(item, Mapping):
            continue
        kind = str(item.get("type") or "message")
        call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else None
        if kind == "message" or ("role" in item and "type" not in item):
            role = str(item.get("role") or "user")
            messages.append(message(role, item.get("content")))
            if role in ("system", "developer"):
                text = content_facts(item.get("content")).text
                if text:
                    system.append(text)
        elif kind.endswith("_call_output") and call_id:
            output = item.get("output")
            name = call_names.get(call_id)
            messages.append(message("tool", output if not isinstance(output, Mapping) else canonical_json(output),
                                    tool_call_id=call_id, name=name, item_type=kind))
            results.append(ToolResultFacts(call_id=call_id, content=tool_result_content(output), name=name,
                                           is_error=True if item.get("status") == "failed" else None))
        elif kind.endswith("_call") and call_id:
            name = _call_name(item)
            text, parsed = _call_arguments(item)
            if name:
                call_names[call_id] = name
            arguments = text if text is not None else canonical_json(parsed) if parsed is not None else None
            messages.append(message("assistant", None, tool_calls=[{k: v for k, v in {
                "id": call_id, "name": name, "type": kind,
                "arguments_hash": sha256_text(arguments) if arguments else None}.items() if v is not None}]))
        elif kind == "reasoning":
            summary = item.get("summary")
            text = content_facts(summary).text if isinstance(summary, list) else None
            messages.append(message("assistant", None, reasoning=text, item_type=kind))
        # item references, MCP approvals and similar carry no content of their own
    parameters = request_parameters(body, max_tokens_keys=("max_output_tokens",))
    reasoning = as_mapping(body.get("reasoning"))
    text_config = as_mapping(body.get("text"))
    text_format = as_mapping(text_config.get("format"))
    more = {k: v for k, v in {
        "reasoning_effort": reasoning.get("effort"), "reasoning_summary": reasoning.get("summary"),
        "response_format": text_format.get("type"), "verbosity": text_config.get("verbosity"),
    }.items() if v is not None}
    if more:
        parameters = request_parameters({**body, **more}, max_tokens_keys=("max_output_tokens",))
    request_attrs: dict[str, Any] = {}
    if isinstance(body.get("previous_response_id"), str):
        request_attrs["openai.previous_response_id"] = body["previous_response_id"]
    conversation = body.get("conversation")
    if isinstance(conversation, Mapping):
        conversation = conversation.get("id")
    if isinstance(conversation, str):
        request_attrs["openai.conversation"] = conversation
    prompt = body.get("prompt")
    if isinstance(prompt, Mapping) and isinstance(prompt.get("id"), str):
        request_attrs["openai.prompt_id"] = prompt["id"]
    return RequestFacts(
        request_type="chat", model=str(body["model"]) if body.get("model") else None,
        streaming=bool(body.get("stream")), messages=messages,
        system_prompt="\n".join(system) if system else None, tools=tool_definitions(body.get("tools")),
        tool_choice=body.get("tool_choice"), parameters=parameters, tool_results=results, attrs=request_attrs,
    )


class ResponsesDecoder(OpenAIDialectDecoder):
    """Responses API exchanges, whole or streamed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: output_index -> item type, for deltas that only name the index.
        self._items: dict[int, str] = {}
        self._hosted: dict[int, dict[str, Any]] = {}

    def parse_request(self, exchange: HttpExchange, body: Any) -> RequestFacts:
        facts = responses_request_facts(body)
        facts.model = self.default_model(body)
        facts.attrs.update(self.route_attrs())
        return facts

    # --- items -----------------------------------------------------------------------------------------
    def _item(self, index: int, item: Mapping[str, Any], *, done: bool) -> None:
        """An output item as announced (``done=False``: may be incomplete) or finished."""
        state = self.state
        kind = str(item.get("type"))
        self._items[index] = kind
        call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else None
        if kind == "message" and not done and state.choice(0).text:
            state.add_text("\n", 0)
        if kind.endswith("_call") and call_id:
            text, parsed = _call_arguments(item)
            call = state.choice(0).tool_calls.get(index)
            if done and call is not None and text is not None:
                call.arguments = [text]  # the finished item is authoritative over the fragments
            state.tool_call(index, id=call_id, name=_call_name(item), type="function" if kind == "function_call"
                            else kind, arguments=text if call is None else None, parsed=parsed)
        elif kind.endswith("_call") or kind in ("mcp_list_tools", "mcp_approval_request"):
            hosted = {k: item[k] for k in ("type", "id", "status", "name", "server_label", "action")
                      if item.get(k) is not None}
            self._hosted[index] = hosted
            state.extra["hosted_tool_calls"] = [self._hosted[i] for i in sorted(self._hosted)]

    def _response(self, response: Any, *, final: bool) -> None:
        """A whole response object (a JSON body, or the payload of a lifecycle event)."""
        if not isinstance(response, Mapping):
            return
        state = self.state
        if isinstance(response.get("model"), str) and response["model"]:
            state.model = response["model"]
        if isinstance(response.get("id"), str) and response["id"]:
            state.provider_request_id = response["id"]
        openai_usage(state, response.get("usage"))
        status = response.get("status")
        if isinstance(status, str):
            state.extra["status"] = status
        if not final:
            return
        output = response.get("output")
        if isinstance(output, list) and output:
            self._rebuild(output)
        error = response.get("error")
        if isinstance(error, Mapping):
            state.error = ResponseError(type=str(error.get("type") or "response_failed"),
                                        message=_opt_str(error.get("message")), code=_opt_str(error.get("code")))
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        if status == "failed":
            state.finish("error")
        elif status == "incomplete":
            state.finish(reason or "incomplete")
            if reason is not None:
                state.extra["incomplete_reason"] = reason
        elif status in ("completed", None):
            state.finish("tool_calls" if state.choice(0).tool_calls else "stop")
        else:
            state.finish(status)

    def _rebuild(self, output: list[Any]) -> None:
        """Replace what deltas accumulated with the finished output items."""
        choice = self.state.choice(0)
        choice.text.clear()
        choice.thinking.clear()
        choice.tool_calls.clear()
        self._hosted.clear()
        texts: list[str] = []
        refusals: list[str] = []
        thinking: list[str] = []
        for index, item in enumerate(output):
            if not isinstance(item, Mapping):
                continue
            kind = item.get("type")
            if kind == "message":
                parts = as_list(item.get("content"))
                texts.append("".join(p["text"] for p in parts if isinstance(p, Mapping)
                                     and p.get("type") == "output_text" and isinstance(p.get("text"), str)))
                refusals += [p["refusal"] for p in parts if isinstance(p, Mapping)
                             and isinstance(p.get("refusal"), str)]
            elif kind == "reasoning":
                for key in ("summary", "content"):
                    parts = as_list(item.get(key))
                    thinking += [p["text"] for p in parts if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
            else:
                self._item(index, item, done=True)
        self.state.add_text("\n".join(t for t in texts if t), 0)
        self.state.add_thinking("\n\n".join(thinking), 0)
        if refusals:
            self.state.extra["refusal"] = "".join(refusals)

    # --- decoder hooks ---------------------------------------------------------------------------------
    def on_response_json(self, exchange: HttpExchange, body: Any) -> None:
        if not isinstance(body, Mapping):
            self.state.problems.append("response body: not a JSON object")
            return
        if body.get("object") == "response" or "output" in body:
            self._response(body, final=True)
        elif error_from_body(body) is not None:
            self.state.error = error_from_body(body)

    def on_stream_item(self, exchange: HttpExchange, item: Any) -> None:
        if not isinstance(item, SseEvent) or not item.data.strip() or item.data.strip() == "[DONE]":
            return
        event, problem = json_or_none(item.data)
        if problem is not None or type(event) is not dict:
            self.state.problems.append(f"stream event: {problem or 'not a JSON object'}")
            return
        kind = event.get("type") or item.event
        state = self.state
        delta = event.get("delta")
        if type(delta) is not str:
            delta = None
        if kind == "response.output_text.delta":  # by far the most frequent: first
            state.add_text(delta, 0)
        elif kind == "response.function_call_arguments.delta":
            if delta is not None:
                state.tool_call(as_index(event.get("output_index")), arguments=delta)
        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            state.add_thinking(delta, 0)
        elif kind in ("response.created", "response.in_progress", "response.queued"):
            self._response(event.get("response"), final=False)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self._response(event.get("response"), final=True)
        elif kind == "error" or item.event == "error":
            state.error = error_from_body(event) or ResponseError(type="error", message=item.data[:200])
        elif kind in ("response.output_item.added", "response.output_item.done") \
                and isinstance(event.get("item"), Mapping):
            self._item(as_index(event.get("output_index")), event["item"], done=kind.endswith(".done"))
        elif kind == "response.reasoning_summary_part.added" and state.choice(0).thinking:
            state.add_thinking("\n\n", 0)
        elif kind == "response.refusal.delta" and delta:
            state.extra["refusal"] = state.extra.get("refusal", "") + delta
        # custom tool input deltas are free text: the finished item carries it whole


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
