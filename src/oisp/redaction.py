"""Redaction: secrets never reach an event, a sink or a log.

Three layers, all on by default:

* **Headers and URLs** (:func:`redact_headers`, :func:`redact_url`): credentials in ``Authorization``,
  ``x-api-key``, ``api-key``, ``x-goog-api-key``, AWS SigV4 headers, cookies and key-like query parameters are
  replaced before anything is recorded.
* **API keys** (:func:`key_fingerprint`): an API key is kept only as its public prefix (``sk-proj-``,
  ``sk-ant-``, ...) and a SHA-256 hash, so accounts can be told apart without the key.
* **Content** (:class:`Redactor`): every string of an event is scanned for secret-looking values (API keys,
  private keys, bearer tokens, JWTs). A value that *is* a secret becomes a ``{"$redacted": {...}}`` marker
  with reason, detector, length and hash; a secret inside longer text (a prompt) is replaced in place by
  ``[REDACTED:<detector>:<hash prefix>]`` so the rest of the prompt stays readable. The ``metadata-only``
  profile replaces all message and tool content with markers, for privacy-strict deployments.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

from oisp.errors import ConfigurationError
from oisp.events import Event

__all__ = [
    "PROFILES",
    "REDACTED",
    "SCANNED_KEYS",
    "SENSITIVE_HEADERS",
    "SENSITIVE_QUERY_PARAMS",
    "KeyFingerprint",
    "Redactor",
    "key_fingerprint",
    "redact_headers",
    "redact_url",
    "sha256_text",
]

Profile = Literal["default", "metadata-only"]
PROFILES: tuple[str, ...] = ("default", "metadata-only")

#: What a redacted header or query value is replaced with.
REDACTED = "[REDACTED]"

SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
        "x-amz-security-token",
        "x-amz-credential",
        "x-amz-signature",
        "x-auth-token",
        "x-access-token",
        "ocp-apim-subscription-key",
    }
)

SENSITIVE_QUERY_PARAMS = frozenset(
    {
        "key",
        "api_key",
        "apikey",
        "api-key",
        "access_token",
        "token",
        "auth",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "code",
    }
)

# Public prefixes of known API key formats, longest first (AuthInfo.key_prefix allows at most 8 characters).
_KEY_PREFIXES = (
    "sk-proj-",
    "sk-ant-",
    "sk-svcacct-",
    "sk-admin-",
    "sk-or-",
    "pplx-",
    "AIza",
    "gsk_",
    "xai-",
    "r8_",
    "hf_",
    "sk-",
    "AKIA",
    "ASIA",
)

_DETECTORS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("private_key", re.compile(
        r"(?s:-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|.*\Z))"
    )),
    ("anthropic_api_key", re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}")),
    ("openai_api_key", re.compile(r"\bsk-(?:proj-|svcacct-|admin-|or-v1-)?[A-Za-z0-9_-]{20,}")),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
    ("aws_access_key_id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})")),
    ("slack_token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("huggingface_token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("groq_api_key", re.compile(r"\bgsk_[A-Za-z0-9]{40,}")),
    ("xai_api_key", re.compile(r"\bxai-[A-Za-z0-9]{40,}")),
    ("replicate_token", re.compile(r"\br8_[A-Za-z0-9]{30,}")),
    ("perplexity_api_key", re.compile(r"\bpplx-[A-Za-z0-9]{40,}")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),
    ("bearer_token", re.compile(r"(?i:\bbearer\s+[A-Za-z0-9._~+/=-]{16,})")),
    # Detectors with a group named ``secret`` redact that group only (the name it is assigned to stays readable).
    ("aws_secret_access_key", re.compile(
        r"(?i:aws_?secret_?access_?key|aws_?secret_?key|secret_?access_?key)[\"']?\s*(?:[:=]|=>)\s*[\"']?"
        r"(?P<secret>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
    )),
    # A 40-character secret key shortly after its access key id (credentials files, CSV exports, prose).
    ("aws_secret_access_key", re.compile(
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b[^\n]{0,100}?(?<![A-Za-z0-9/+=])"
        r"(?P<secret>(?=[A-Za-z0-9/+=]{0,39}[A-Z])(?=[A-Za-z0-9/+=]{0,39}[a-z])(?=[A-Za-z0-9/+=]{0,39}[0-9/+])"
        r"[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
    )),
    ("gcp_service_account_key", re.compile(r"\"private_key_id\"\s*:\s*\"(?P<secret>[0-9a-f]{40})\"")),
    ("azure_connection_string", re.compile(
        r"\b(?:AccountKey|SharedAccessKey|SharedAccessSignature|sig)=(?P<secret>[A-Za-z0-9+/%=]{20,})"
    )),
    ("slack_token", re.compile(r"\bxox(?:e\.xox[bp]|e|[abposr])-[A-Za-z0-9-]{10,}")),
    ("slack_webhook", re.compile(r"\bhooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]{20,}")),
    ("stripe_key", re.compile(r"\b(?:[sr]k_(?:live|test)|whsec)_[0-9A-Za-z]{20,}")),
    ("npm_token", re.compile(r"\bnpm_[A-Za-z0-9]{36}\b")),
    ("pypi_token", re.compile(r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}")),
    ("huggingface_token", re.compile(r"\bapi_org_[A-Za-z0-9]{34}\b")),
    ("database_url_password", re.compile(
        r"(?i:(?:postgres(?:ql)?|mysql|mariadb|mongodb(?:\+srv)?|rediss?|amqps?|mssql|sqlserver|oracle|"
        r"cockroachdb|clickhouse)(?:\+[a-z0-9]+)?)://[^\s:/@]*:(?P<secret>[^\s@/]+)@"
    )),
    # A value assigned to a name ending in secret, password or token; kept only when it looks random (see
    # _VALIDATORS), so prose and placeholders stay.
    ("generic_secret_assignment", re.compile(
        r"(?i:secret|password|passwd|pwd|token)[\"']?\s*(?:[:=]|=>)\s*[\"']?"
        r"(?P<secret>[A-Za-z0-9_\-+/=.~!@#%^&*]{8,})"
    )),
)


def _looks_random(value: str) -> bool:
    """High Shannon entropy (at least 3 bits a character) and more than letters alone: a generated secret, not
    a word or a placeholder."""
    if value.isalpha() or len(set(value)) < 6:
        return False
    counts: dict[str, int] = {}
    for char in value:
        counts[char] = counts.get(char, 0) + 1
    entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    return entropy >= 3.0


#: Checks a detector's finding must pass (the ``secret`` group, else the whole match).
_VALIDATORS: dict[str, Callable[[str], bool]] = {"generic_secret_assignment": _looks_random}


#: The parts of an event's dict form that :class:`Redactor` scans for secrets.
SCANNED_KEYS: tuple[str, ...] = ("data", "attrs", "ext", "process", "web_context")
#: Strings up to this length that hold no secret are remembered (at most this many of them).
_CLEAN_MAX_LENGTH = 4096
_CLEAN_MAX_ENTRIES = 4096

#: What every built-in detector's match contains, in the order of _DETECTORS: (case-sensitive substrings,
#: substrings of the lower-cased text). A string with none of them holds no built-in secret, which a few
#: substring searches (fast, in C) establish; a string with some runs only the detectors they belong to.
_TRIGGERS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("-----BEGIN",), ()),
    (("sk-ant-",), ()),
    (("sk-",), ()),
    (("AIza",), ()),
    (("AKIA", "ASIA"), ()),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), ()),
    (("xox",), ()),
    (("hf_",), ()),
    (("gsk_",), ()),
    (("xai-",), ()),
    (("r8_",), ()),
    (("pplx-",), ()),
    (("eyJ",), ()),
    ((), ("bearer",)),
    ((), ("secret",)),  # an assignment: see _gate
    (("AKIA", "ASIA"), ()),
    (("private_key_id",), ()),
    (("AccountKey=", "SharedAccess", "sig="), ()),
    (("xox",), ()),
    (("hooks.slack.com",), ()),
    (("k_live_", "k_test_", "whsec_"), ()),
    (("npm_",), ()),
    (("pypi-",), ()),
    (("api_org_",), ()),
    ((), ("postgres", "mysql", "mariadb", "mongodb", "redis", "amqp", "mssql", "sqlserver", "oracle",
          "cockroachdb", "clickhouse")),  # a URL with a password: see _gate
    ((), ("secret", "passw", "pwd", "token")),  # an assignment: see _gate
)
assert len(_TRIGGERS) == len(_DETECTORS)


def _index(pairs: Iterable[tuple[int, tuple[str, ...]]]) -> tuple[tuple[str, frozenset[int]], ...]:
    found: dict[str, set[int]] = {}
    for index, literals in pairs:
        for literal in literals:
            found.setdefault(literal, set()).add(index)
    return tuple((literal, frozenset(indexes)) for literal, indexes in found.items())


_CASED = _index((i, cased) for i, (cased, _) in enumerate(_TRIGGERS))
_LOWER = _index((i, lower) for i, (_, lower) in enumerate(_TRIGGERS))

#: What must also be in a text for a literal to be worth searching for. Most literals share a character ("_",
#: "-", "="), so a text without it skips them all at once; assignments need ":" or "=", URL passwords "://" and
#: "@". Each gate is one cheap test of the text, named for grouping.
_Gate = tuple[str, Callable[[str], bool]]
_ALWAYS: _Gate = ("", lambda text: True)
_DATABASE_SCHEMES = frozenset(_TRIGGERS[-2][1])


def _gate(literal: str, lower: bool) -> _Gate:
    if lower:
        if literal == "bearer":
            return _ALWAYS
        if literal in _DATABASE_SCHEMES:
            return ("url", lambda text: "@" in text and "://" in text)
        return ("assignment", lambda text: "=" in text or ":" in text)
    if literal.startswith("gh") and literal.endswith("_"):
        return ("gh", lambda text: "gh" in text)
    if "_" in literal:
        return ("_", lambda text: "_" in text)
    if "=" in literal or literal == "SharedAccess":
        return ("=", lambda text: "=" in text)
    if "-" in literal:
        return ("-", lambda text: "-" in text)
    return _ALWAYS


_Literals = tuple[tuple[str, frozenset[int]], ...]


def _group(entries: _Literals, lower: bool) -> tuple[tuple[Callable[[str], bool], _Literals], ...]:
    groups: dict[str, tuple[Callable[[str], bool], list[tuple[str, frozenset[int]]]]] = {}
    for literal, indexes in entries:
        name, test = _gate(literal, lower)
        groups.setdefault(name, (test, []))[1].append((literal, indexes))
    return tuple((test, tuple(items)) for test, items in groups.values())


_CASED_GROUPS = _group(_CASED, lower=False)
_LOWER_GROUPS = _group(_LOWER, lower=True)


def _candidate_detectors(text: str) -> set[int]:
    """The indexes (in _DETECTORS) of the built-in detectors that may match ``text``: usually none."""
    candidates: set[int] = set()
    for test, literals in _CASED_GROUPS:
        if test(text):
            for literal, indexes in literals:
                if literal in text:
                    candidates |= indexes
    lowered = text.lower()
    for test, literals in _LOWER_GROUPS:
        if test(text):
            for literal, indexes in literals:
                if literal in lowered:
                    candidates |= indexes
    return candidates


def sha256_text(value: str | bytes) -> str:
    """``sha256:<hex>`` of a value (text is hashed as UTF-8)."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.frozen
class KeyFingerprint:
    """What oisp keeps of an API key: its public prefix (may be empty) and a SHA-256 hash."""

    prefix: str
    hash: str


def key_fingerprint(key: str) -> KeyFingerprint:
    """The public prefix and hash of an API key or token (``Bearer`` stripped); never the key itself."""
    key = key.strip()
    if key.lower().startswith("bearer "):
        key = key[7:].strip()
    prefix = next((p for p in _KEY_PREFIXES if key.startswith(p) and len(key) > len(p) + 8), "")
    return KeyFingerprint(prefix=prefix[:8], hash=sha256_text(key))


def redact_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header fields with every credential value replaced by ``[REDACTED]`` (names and order kept)."""
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in SENSITIVE_HEADERS or "secret" in lname or lname.endswith(("-token", "-api-key", "-apikey")):
            out.append((name, REDACTED))
        else:
            out.append((name, value))
    return out


#: redact_url's answers for URLs without a query or userinfo (nothing secret in them): an exchange's events ask
#: for the same few paths again and again. Bounded: cleared when full.
_PLAIN_URLS: dict[str, str] = {}
_PLAIN_URLS_MAX = 1024


def redact_url(url: str) -> str:
    """A URL (or a path with a query) with key-like query parameter values and userinfo replaced."""
    if "?" in url or "@" in url:
        return _redact_url(url)
    done = _PLAIN_URLS.get(url)
    if done is None:
        if len(_PLAIN_URLS) >= _PLAIN_URLS_MAX:
            _PLAIN_URLS.clear()
        done = _PLAIN_URLS[url] = _redact_url(url)
    return done


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    if not parts.query:
        return urlunsplit(parts._replace(netloc=netloc))
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    cleaned = [(k, REDACTED if k.lower() in SENSITIVE_QUERY_PARAMS else v) for k, v in pairs]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(cleaned, safe="[]:/")))


def marker(value: str, *, reason: str, detector: str | None = None, profile: str | None = None,
           findings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A ``{"$redacted": {...}}`` marker standing for ``value``."""
    body: dict[str, Any] = {"reason": reason, "original_length": len(value), "hash": sha256_text(value)}
    if detector:
        body["detector"] = detector
    if profile:
        body["redaction_profile"] = profile
    if findings:
        body["findings"] = findings
    return {"$redacted": body}


# Positions (in an event's dict form) that hold message or tool content; the metadata-only profile
# replaces whatever is there. ``*`` is any list index.
_CONTENT_PATHS: tuple[tuple[str, ...], ...] = (
    ("data", "messages", "*", "content"),
    ("data", "choices", "*", "message", "content"),
    ("data", "tool_calls", "*", "arguments"),
    ("data", "delta", "content"),
    ("data", "delta", "tool_calls", "*", "arguments"),
    ("data", "arguments"),
    ("data", "result"),
    ("data", "tools", "*", "description"),
    ("data", "thinking"),
    ("data", "system_prompt"),
    ("data", "content_preview"),
    ("data", "structured_content"),  # an MCP tool's structured result
    ("data", "query"),  # what an agent retrieved (agent.rag_retrieve: an MCP resource's URI)
    ("data", "results", "*", "source"),
)


@attrs.define
class Redactor:
    """Applies a redaction profile to events; used by the pipeline before any sink sees an event."""

    profile: str = "default"
    extra_patterns: Mapping[str, str] = attrs.field(factory=dict)
    _detectors: tuple[tuple[str, re.Pattern[str]], ...] = attrs.field(init=False)
    #: One pass that tells whether any detector could match: most strings hold no secret, and then this
    #: single search is all the work done for them.
    _custom: tuple[re.Pattern[str], ...] = attrs.field(init=False)
    #: Strings :meth:`scan` found nothing in, recently: the same command lines, paths and names come back in
    #: every event of a connection, and a lookup is all they cost the next time.
    _clean: dict[str, None] = attrs.field(init=False, factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ConfigurationError(
                f"redaction.profile: {self.profile!r} is not a profile; allowed: {', '.join(PROFILES)}"
            )
        extra = []
        for name, pattern in self.extra_patterns.items():
            try:
                extra.append((name, re.compile(pattern)))
            except re.error as exc:
                raise ConfigurationError(f"redaction.patterns.{name}: {pattern!r} is not a regex: {exc}") from None
        self._detectors = (*_DETECTORS, *extra)
        # Custom patterns always run on their own: combined with others, their group references would point
        # at the wrong groups.
        self._custom = tuple(regex for _, regex in extra)

    def redact_text(self, text: str) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
        """Scan one string: the whole-secret marker, or the text with secrets replaced, plus findings."""
        candidates = _candidate_detectors(text)
        if not candidates and not any(regex.search(text) for regex in self._custom):
            return text, []
        findings: dict[str, int] = {}
        spans: list[tuple[int, int, str]] = []
        builtin = len(_DETECTORS)
        for index, (name, regex) in enumerate(self._detectors):
            if index < builtin and index not in candidates:
                continue
            grouped = "secret" in regex.groupindex
            validate = _VALIDATORS.get(name)
            for m in regex.finditer(text):
                start, end = m.span("secret") if grouped else m.span()
                if any(s < end and start < e for s, e, _ in spans):
                    continue
                if validate is not None and not validate(text[start:end]):
                    continue
                spans.append((start, end, name))
                findings[name] = findings.get(name, 0) + 1
        if not spans:
            return text, []
        found = [{"type": k, "count": v} for k, v in findings.items()]
        spans.sort()
        if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] >= len(text.rstrip()):
            return marker(text, reason="secret_detected", detector=spans[0][2], findings=found), found
        pieces: list[str] = []
        last = 0
        for start, end, name in spans:
            secret = text[start:end]
            pieces.append(text[last:start])
            pieces.append(f"[REDACTED:{name}:{sha256_text(secret)[7:19]}]")
            last = end
        pieces.append(text[last:])
        return "".join(pieces), found

    def __call__(self, event: Event) -> Event:
        """The event with secrets (and, for ``metadata-only``, all content) redacted."""
        raw = event.to_dict()
        changed = False
        if self.profile == "metadata-only":
            for path in _CONTENT_PATHS:
                changed |= _replace_at(raw, path, self._content_marker)
        for key in SCANNED_KEYS:
            if key in raw:
                before = raw[key]
                after = self.scan(before)
                if after is not before:
                    raw[key] = after
                    changed = True
        if not changed:
            return event
        confidence = dict(raw.get("confidence", {}))
        confidence["redaction_applied"] = True
        confidence["redaction_profile"] = self.profile
        raw["confidence"] = confidence
        return Event.from_dict(raw)

    def scan(self, value: Any) -> Any:
        """A JSON value (an event's ``data``, ``process``, ...) with every secret in it redacted, and values under
        credential-like keys replaced; ``value`` itself (not a copy) when nothing in it needed redaction."""
        if type(value) is str:
            return value if value in self._clean else self._scan_text(value)
        if isinstance(value, dict):
            if "$redacted" in value:
                return value
            clean = self._clean
            new: dict[str, Any] | None = None
            for key, item in value.items():
                if type(item) is str:
                    if item and _is_sensitive_key(key):
                        result: Any = item if item == REDACTED else REDACTED
                    elif item in clean:
                        continue
                    else:
                        result = self._scan_text(item)
                else:
                    result = _scrub_mapping_value(key, item, self.scan)
                if result is not item:
                    if new is None:
                        new = dict(value)
                    new[key] = result
            return value if new is None else new
        if isinstance(value, list):
            items: list[Any] | None = None
            for index, item in enumerate(value):
                result = self.scan(item)
                if result is not item:
                    if items is None:
                        items = list(value)
                    items[index] = result
            return value if items is None else items
        if isinstance(value, str):
            return self._scan_text(value)
        return value

    def _scan_text(self, text: str) -> str | dict[str, Any]:
        result, found = self.redact_text(text)
        if not found and len(text) <= _CLEAN_MAX_LENGTH:
            if len(self._clean) >= _CLEAN_MAX_ENTRIES:
                self._clean.clear()
            self._clean[text] = None
        return result

    def _content_marker(self, value: Any) -> Any:
        if isinstance(value, dict) and "$redacted" in value:
            return value
        text = value if isinstance(value, str) else repr(value)
        return marker(text, reason="metadata_only", profile=self.profile)


#: Keys whose (non-empty string) values are replaced outright, wherever they appear in an event.
_SENSITIVE_KEYS = frozenset(
    SENSITIVE_HEADERS | (SENSITIVE_QUERY_PARAMS - {"code", "key", "token", "auth"})
    | {"password", "passwd", "secret", "client_secret", "aws_secret_access_key"}
)


#: key -> whether it is credential-like, for the keys seen so far (events use few distinct keys).
_SENSITIVE_KEY_MEMO: dict[str, bool] = {}


def _is_sensitive_key(key: str) -> bool:
    sensitive = _SENSITIVE_KEY_MEMO.get(key)
    if sensitive is None:
        sensitive = key.lower() in _SENSITIVE_KEYS
        if len(_SENSITIVE_KEY_MEMO) < 4096 and type(key) is str:
            _SENSITIVE_KEY_MEMO[key] = sensitive
    return sensitive


def _scrub_mapping_value(key: str, value: Any, scan: Callable[[Any], Any]) -> Any:
    """Values under credential-like keys (``authorization``, ``api_key``, ...) are replaced outright."""
    if isinstance(value, str) and value and _is_sensitive_key(key):
        return value if value == REDACTED else REDACTED
    return scan(value)


def _replace_at(node: Any, path: tuple[str, ...], replace: Callable[[Any], Any]) -> bool:
    if not path:
        return False
    head, rest = path[0], path[1:]
    if head == "*":
        if not isinstance(node, list):
            return False
        changed = False
        for i, item in enumerate(node):
            if rest:
                changed |= _replace_at(item, rest, replace)
            elif item is not None:
                node[i] = replace(item)
                changed = True
        return changed
    if not isinstance(node, dict) or head not in node or node[head] is None:
        return False
    if rest:
        return _replace_at(node[head], rest, replace)
    new = replace(node[head])
    if new == node[head]:
        return False
    node[head] = new
    return True
