"""The OpenAI-compatible APIs of the OISP spec bundle's provider list that have a host of their own.

Each entry is an endpoint of a provider whose API speaks the OpenAI dialect (``/chat/completions``,
``/completions``, ``/embeddings``, ``/responses`` under any path prefix), so the OpenAI provider plugin decodes its
exchanges (:data:`~oisp.providers.openai_common.OPENAI_DIALECT` includes every name here). Names are the bundle's
provider ids (``spec/v0.1/bundle.json``).

Left out on purpose: providers the bundle gives no fixed host (a per-account URL: Azure Cognitive Services, SAP AI
Core, Cloudflare Workers AI, v0) and those whose API is a path of their public website (``inference.net``,
``lucidquery.com``, ``nano-gpt.com``, ``opencode.ai``, ``zenmux.ai``, ``aihubmix.com``): intercepting those hosts
would report every page a browser loads from them. Users add such a host with
``--add-endpoint PROVIDER=HOST`` when they call it.
"""

from __future__ import annotations

from collections.abc import Iterable

from oisp.hookspecs import EndpointSpec, hookimpl

__all__ = ["COMPATIBLE_ENDPOINTS", "COMPATIBLE_PROVIDERS"]

_HOSTS: tuple[tuple[str, str], ...] = (
    ("abacus", "routellm.abacus.ai"),
    ("alibaba", "dashscope-intl.aliyuncs.com"),
    ("alibaba_cn", "dashscope.aliyuncs.com"),
    ("bailing", "api.tbox.cn"),
    ("baseten", "inference.baseten.co"),
    ("cerebras", "api.cerebras.ai"),
    ("chutes", "llm.chutes.ai"),
    ("cloudflare_ai_gateway", "gateway.ai.cloudflare.com"),
    ("cortecs", "api.cortecs.ai"),
    ("deepinfra", "api.deepinfra.com"),
    ("fastrouter", "go.fastrouter.ai"),
    ("friendli", "api.friendli.ai"),
    ("github_models", "models.github.ai"),
    ("github_models", "models.inference.ai.azure.com"),
    ("helicone", "ai-gateway.helicone.ai"),
    ("iflowcn", "apis.iflow.cn"),
    ("inception", "api.inceptionlabs.ai"),
    ("io_net", "api.intelligence.io.solutions"),
    ("kimi_for_coding", "api.kimi.com"),
    ("llama", "api.llama.com"),
    ("minimax", "api.minimax.io"),
    ("minimax_cn", "api.minimaxi.com"),
    ("modelscope", "api-inference.modelscope.cn"),
    ("moonshotai", "api.moonshot.ai"),
    ("moonshotai_cn", "api.moonshot.cn"),
    ("morph", "api.morphllm.com"),
    ("nebius", "api.tokenfactory.nebius.com"),
    ("nvidia", "integrate.api.nvidia.com"),
    ("ollama", "ollama.com"),
    ("ovhcloud", "oai.endpoints.kepler.ai.cloud.ovh.net"),
    ("poe", "api.poe.com"),
    ("requesty", "router.requesty.ai"),
    ("scaleway", "api.scaleway.ai"),
    ("siliconflow", "api.siliconflow.com"),
    ("siliconflow_cn", "api.siliconflow.cn"),
    ("submodel", "llm.submodel.ai"),
    ("synthetic", "api.synthetic.new"),
    ("upstage", "api.upstage.ai"),
    ("venice", "api.venice.ai"),
    ("vercel", "ai-gateway.vercel.sh"),
    ("vultr", "api.vultrinference.com"),
    ("wandb", "api.inference.wandb.ai"),
    ("xiaomi", "api.xiaomimimo.com"),
    ("zai", "api.z.ai"),
    ("zhipuai", "open.bigmodel.cn"),
)

#: The endpoints (all TLS on 443).
COMPATIBLE_ENDPOINTS: tuple[EndpointSpec, ...] = tuple(EndpointSpec(name, host) for name, host in _HOSTS)
#: Their provider names (each speaks the OpenAI dialect).
COMPATIBLE_PROVIDERS: frozenset[str] = frozenset(name for name, _ in _HOSTS)


@hookimpl
def oisp_endpoints() -> Iterable[EndpointSpec]:
    return COMPATIBLE_ENDPOINTS
