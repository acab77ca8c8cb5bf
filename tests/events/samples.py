"""Realistic events of every type oisp defines, for conformance and sink tests."""

from __future__ import annotations

from oisp.events import (
    Actor,
    AgentInfo,
    AgentToolCall,
    AgentToolResult,
    AiEmbedding,
    AiRequest,
    AiResponse,
    AiStreamingChunk,
    AuthInfo,
    CertificateInfo,
    Choice,
    ChunkDelta,
    Confidence,
    DnsAnswer,
    Endpoint,
    Event,
    FileDelete,
    FileInfo,
    FileOpen,
    FileRead,
    FileRename,
    FileWrite,
    Message,
    ModelInfo,
    NetworkConnect,
    NetworkDns,
    ParentProcess,
    ProcessExec,
    ProcessExit,
    ProcessFork,
    ProcessInfo,
    ProviderInfo,
    RelatedEvent,
    RequestParameters,
    ResponseError,
    TlsInfo,
    ToolCall,
    ToolDefinition,
    ToolInfo,
    Usage,
)

FULL = Confidence(level="high", completeness="full", content_source="mitm_decryption",
                  ai_detection_method="known_endpoint", process_attribution="direct")
PROCESS = ProcessInfo(
    pid=4242, ppid=4200, exe="/usr/bin/python3.11", name="python3", cmdline="python3 agent.py --task fix",
    cmdline_args=["python3", "agent.py", "--task", "fix"], cwd="/home/dev/agent",
    start_time="2026-11-24T08:00:00.000000Z",
    parent=ParentProcess(pid=4200, exe="/usr/bin/bash", name="bash"),
)
ACTOR = Actor(uid=1000, user="dev")
OPENAI = ProviderInfo(name="openai", endpoint="https://api.openai.com/v1/chat/completions", organization_id="org-42")


def ai_request() -> Event:
    return Event.create(
        AiRequest(
            request_id="req_01",
            provider=OPENAI,
            model=ModelInfo(id="gpt-4o-mini"),
            auth=AuthInfo(type="api_key", key_prefix="sk-proj-", key_hash="sha256:" + "ab" * 32),
            request_type="chat",
            streaming=True,
            messages=[
                Message(role="system", content="You are a careful coding agent.", content_length=31),
                Message(role="user", content="What is the weather in Paris?", content_length=29),
                Message(role="tool", content='{"temp_c": 11}', tool_call_id="call_1"),
            ],
            messages_count=3,
            has_system_prompt=True,
            system_prompt_hash="sha256:" + "cd" * 32,
            tools=[ToolDefinition(name="get_weather", type="function", description="Current weather")],
            tools_count=1,
            tool_choice="auto",
            parameters=RequestParameters(temperature=0.2, max_tokens=512, stop=["\n\n"]),
            has_images=False,
        ),
        confidence=FULL, process=PROCESS, actor=ACTOR,
    )


def ai_response() -> Event:
    return Event.create(
        AiResponse(
            request_id="req_01",
            provider_request_id="chatcmpl-abc",
            provider=OPENAI,
            model=ModelInfo(id="gpt-4o-mini-2024-07-18"),
            status_code=200,
            success=True,
            choices=[Choice(index=0, message=Message(role="assistant", content="Calling the tool."),
                            finish_reason="tool_calls")],
            tool_calls=[ToolCall(id="call_1", name="get_weather", type="function",
                                 arguments='{"city": "Paris"}')],
            tool_calls_count=1,
            usage=Usage(prompt_tokens=120, completion_tokens=18, total_tokens=138, cached_tokens=64,
                        reasoning_tokens=0, cache_creation_tokens=0, total_cost_usd=0.00003),
            latency_ms=812,
            time_to_first_token_ms=230,
            finish_reason="tool_calls",
        ),
        confidence=FULL, process=PROCESS,
        related_events=[RelatedEvent(event_id="01JFWK8X4J5K6L7M8N9O0P1Q2R", relationship="caused_by")],
    )


def ai_response_error() -> Event:
    return Event.create(
        AiResponse(request_id="req_02", status_code=429, success=False,
                   error=ResponseError(type="rate_limit_error", message="Rate limit reached", code="429")),
        confidence=FULL,
    )


def ai_streaming_chunk() -> Event:
    return Event.create(
        AiStreamingChunk(request_id="req_01", chunk_index=3,
                         delta=ChunkDelta(content="Par", role="assistant",
                                          tool_calls=[ToolCall(id="call_1", arguments='{"ci')])),
        confidence=FULL,
    )


def ai_embedding() -> Event:
    return Event.create(
        AiEmbedding(provider=ProviderInfo(name="openai", endpoint="https://api.openai.com/v1/embeddings"),
                    model=ModelInfo(id="text-embedding-3-small"), input_count=4, total_tokens=37,
                    dimensions=1536, latency_ms=95),
        confidence=FULL,
    )


def agent_tool_call() -> Event:
    return Event.create(
        AgentToolCall(agent=AgentInfo(name="custom-agent", type="cli"),
                      tool=ToolInfo(name="get_weather", type="api_call", provider="native"),
                      call_id="call_1", triggered_by="llm_decision", arguments={"city": "Paris"},
                      arguments_hash="sha256:" + "ef" * 32),
        confidence=FULL, process=PROCESS,
    )


def agent_tool_result() -> Event:
    return Event.create(
        AgentToolResult(call_id="call_1", tool=ToolInfo(name="get_weather"), success=True,
                        result={"temp_c": 11}, result_size_bytes=14),
        confidence=FULL, process=PROCESS,
    )


def network_connect() -> Event:
    return Event.create(
        NetworkConnect(
            dest=Endpoint(ip="104.18.7.192", port=443, domain="api.openai.com", is_private=False),
            src=Endpoint(ip="10.0.0.5", port=51234, is_private=True),
            protocol="tcp", success=True, latency_ms=23.4,
            tls=TlsInfo(version="TLSv1.3", sni="api.openai.com", alpn="h2",
                        certificate=CertificateInfo(subject="CN=api.openai.com", issuer="CN=WE1",
                                                    fingerprint_sha256="aa" * 32, san=["api.openai.com"])),
        ),
        confidence=Confidence(level="high", completeness="metadata_only"), process=PROCESS,
        attrs={"oisp.interception": "intercepted"},
    )


def network_dns() -> Event:
    return Event.create(
        NetworkDns(query_name="api.openai.com", query_type="A", response_code="NOERROR",
                   answers=[DnsAnswer(type="A", value="104.18.7.192", ttl=300)], latency_ms=4.1),
        confidence=Confidence(level="high", completeness="full"),
    )


def process_exec() -> Event:
    return Event.create(
        ProcessExec(exe="/usr/bin/git", args=["git", "commit", "-m", "fix"], cwd="/home/dev/agent",
                    is_shell=False),
        confidence=Confidence(level="medium", completeness="full"), process=PROCESS,
    )


def process_exit() -> Event:
    return Event.create(
        ProcessExit(exit_code=0, runtime_ms=1250, termination_type="normal"),
        confidence=Confidence(level="medium", completeness="full"), process=PROCESS,
    )


def file_open() -> Event:
    return Event.create(
        FileOpen(path="/home/dev/agent/main.py", flags=["write", "truncate"], fd=5),
        confidence=Confidence(level="medium", completeness="full"), process=PROCESS,
    )


def file_write() -> Event:
    return Event.create(
        FileWrite(path="/home/dev/agent/main.py", bytes_written=2048, created=False,
                  file=FileInfo(path="/home/dev/agent/main.py", name="main.py", extension="py", size=2048),
                  content_hash="sha256:" + "12" * 32, detected_type="source_code"),
        confidence=Confidence(level="medium", completeness="full"), process=PROCESS,
    )


def process_fork() -> Event:
    return Event.create(ProcessFork(child_pid=4243, is_thread=False),
                        confidence=Confidence(level="high", completeness="full"), process=PROCESS)


def file_read() -> Event:
    return Event.create(FileRead(path="/home/dev/.ssh/id_ed25519", complete=True),
                        confidence=Confidence(level="high", completeness="metadata_only"), process=PROCESS)


def file_delete() -> Event:
    return Event.create(FileDelete(path="/home/dev/agent/old.py"),
                        confidence=Confidence(level="high", completeness="metadata_only"), process=PROCESS)


def file_rename() -> Event:
    return Event.create(FileRename(old_path="/home/dev/agent/a.py", new_path="/home/dev/agent/b.py"),
                        confidence=Confidence(level="high", completeness="metadata_only"), process=PROCESS)


ALL = {
    "ai.request": ai_request,
    "ai.response": ai_response,
    "ai.streaming_chunk": ai_streaming_chunk,
    "ai.embedding": ai_embedding,
    "agent.tool_call": agent_tool_call,
    "agent.tool_result": agent_tool_result,
    "network.connect": network_connect,
    "network.dns": network_dns,
    "process.exec": process_exec,
    "process.exit": process_exit,
    "file.open": file_open,
    "file.write": file_write,
    "process.fork": process_fork,
    "file.read": file_read,
    "file.delete": file_delete,
    "file.rename": file_rename,
}
