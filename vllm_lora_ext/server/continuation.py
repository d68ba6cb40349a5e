"""Stitch one caller-visible generation out of several engine segments.

A request stopped by a lora pause in mode ``keep`` is continued after resume from
``prompt + tokens so far`` with the remaining ``max_tokens``. The caller must see one
response whose tokens, text and logprobs are the concatenation, in whatever
``RequestOutputKind`` it asked for. This module holds that bookkeeping, free of I/O.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from vllm_lora_ext import continuable
from vllm_lora_ext.compat import (
    CompletionOutput,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)

ABORT = "abort"
_UNASKED = object()  # Stitcher.not_continuable not worked out yet


@dataclass(slots=True)
class Span:
    """Tokens ``[start, end)`` of one sample were produced by adapter version ``version``."""

    version: int
    start: int
    end: int


@dataclass(slots=True)  # read and written per streamed token
class Sample:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    text: str = ""
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    spans: list[Span] = field(default_factory=list)
    interrupted: bool = False
    note: str | None = None  # why an abort ends it (shown as its stop_reason)
    # vLLM's engine-wide base-weight spans (``weight_versions``), offsets into token_ids.
    weight_versions: list | None = None
    # State at the start of the running segment (for cumulative output kinds).
    base_tokens: int = 0
    base_text: int = 0
    base_cum: float = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None and not self.interrupted

    def start_segment(self) -> None:
        self.base_tokens = len(self.token_ids)
        self.base_text = len(self.text)
        self.base_cum = self.cumulative_logprob or 0.0
        self.interrupted = False

    def add_weight_versions(self, spans: list | None) -> None:
        """vLLM's base-weight spans of the running segment (offsets into its own
        tokens), kept beside ours: shifted to offsets into the whole sample."""
        if not spans:
            return
        kept = self.weight_versions = self.weight_versions or []
        base = self.base_tokens
        for span in spans:  # vLLM's spans are never changed in place, here or there
            start, end = span.start + base, span.end + base
            if kept and kept[-1].version == span.version and kept[-1].end == start:
                kept[-1] = type(span)(version=span.version, start=kept[-1].start, end=end)
            elif base:
                kept.append(type(span)(version=span.version, start=start, end=end))
            else:  # the first segment's, as vLLM made it
                kept.append(span)


class Stitcher:
    """Accumulates segment outputs of one request and says what the caller sees."""

    # One per request, alive while it runs: slotted (no attribute dict to allocate,
    # and less for the garbage collector to traverse while requests are in flight).
    __slots__ = (
        "_delta",
        "_emitted",
        "_flowing",
        "_params",
        "_why",
        "added",
        "first",
        "num_cached_tokens",
        "prompt",
        "prompt_logprobs",
        "prompt_token_ids",
        "request_id",
        "samples",
        "stopped",
    )

    # absorb takes a one-sample request's only output, when final, in one step (off in
    # tests that check it against the general path).
    _at_once = True

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self._delta = params.output_kind == RequestOutputKind.DELTA
        self.samples = [Sample(0)] if params.n == 1 else [Sample(i) for i in range(params.n)]
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] | None = None
        self.prompt_logprobs = None
        self.num_cached_tokens: int | None = None
        self.first: RequestOutput | None = None
        self._emitted = False
        # The first segment of a one-sample delta stream is under way, its sample's last
        # span open: an output with no finish only extends it (absorb's fast path).
        self._flowing = False
        # A sample was stopped to continue (so the caller sees outputs of ours).
        self.stopped = False
        self._params = params
        # Tokens the last output absorbed added (the prompt's too, on the first): what
        # the request's tenant is charged for it, counted here rather than again.
        self.added = 0
        self._why: str | object | None = _UNASKED  # see not_continuable

    @property
    def not_continuable(self) -> str | None:
        """Why this request is not continued exactly (stop strings, penalties,
        grammars...): it then ends partial. Asked only when a segment is stopped."""
        if self._why is _UNASKED:
            self._why = continuable.of_params(self._params)
        return self._why  # type: ignore[return-value]

    @property
    def kind(self) -> RequestOutputKind:
        return self._params.output_kind

    # ---- segments -----------------------------------------------------------------
    def defer(self, first: int) -> None:
        """Samples from ``first`` on wait for their turn (a request wider than its
        tenant may run at once is served in parts): they start as samples a stop left
        with no tokens, continued from the prompt alone, exactly."""
        for s in self.samples[first:]:
            s.interrupted = True
        self.stopped = True

    def start_segment(self, indices: list[int]) -> None:
        for g in indices:
            self.samples[g].start_segment()

    def to_continue(self) -> list[int]:
        return [s.index for s in self.samples if s.interrupted]

    @property
    def done(self) -> bool:
        return all(s.done for s in self.samples)

    def remaining(self, index: int) -> int | None:
        max_tokens = self._params.max_tokens
        if max_tokens is None:
            return None
        return max_tokens - len(self.samples[index].token_ids)

    def continuation_prompt(self, index: int) -> list[int]:
        if self.prompt_token_ids is None:
            raise RuntimeError("no prompt token ids were seen; cannot continue")
        return [*self.prompt_token_ids, *self.samples[index].token_ids]

    def continuation_params(self, params: SamplingParams, index: int) -> SamplingParams:
        """The original params, for one sample, with what is left of its budget."""
        cont = params.clone()
        cont.n = 1
        cont.max_tokens = self.remaining(index)
        cont.min_tokens = max(
            0, (self._params.min_tokens or 0) - len(self.samples[index].token_ids)
        )
        cont.prompt_logprobs = None
        cont.truncate_prompt_tokens = None
        made = len(self.samples[index].token_ids)
        if made or params.seed is None:
            cont.seed = continuation_seed(params.seed, index, made)
        elif params.n > 1:  # nothing made yet: the seed vLLM gives the sample's child
            cont.seed = params.seed + index
        return cont

    # ---- absorbing engine outputs --------------------------------------------------
    def absorb(
        self, out: RequestOutput, index: int | None, version: int, continuing: bool
    ) -> RequestOutput | None:
        """Take one engine output (``index`` maps a continuation's only sample; None for
        the first segment); return what the caller should receive now, if anything.

        ``continuing``: an ``abort`` finish is a keep-mode interruption, not an end.
        """
        outputs = out.outputs
        if self._flowing and index is None and len(outputs) == 1:
            # Most of a stream: one token more, no finish. The general path below would
            # do exactly this (the sample's last span is open, nothing is rewritten).
            c = outputs[0]
            if c.finish_reason is None:
                s = self.samples[0]
                made = c.token_ids
                s.token_ids += made
                s.spans[-1].end += len(made)
                if c.cumulative_logprob is not None:  # (the first segment's base is 0)
                    s.cumulative_logprob = c.cumulative_logprob
                self.added = len(made)
                return out
        if self.first is None and index is None and len(outputs) == 1 and self._at_once:
            # Most requests that are not streamed: one output, final, one sample. It is
            # the caller's as it is, and nothing reads the stitcher after it but the
            # sample's spans (attribution), its finish and ``added``: only those are kept.
            c = outputs[0]
            finish = c.finish_reason
            if (
                finish is not None
                and (finish != ABORT or not continuing)
                and len(self.samples) == 1
            ):
                s = self.samples[0]
                made = len(c.token_ids)
                if made:
                    s.spans.append(Span(version, 0, made))
                s.finish_reason = finish
                self.added = len(out.prompt_token_ids or ()) + made
                return out
        self._flowing = False
        added = 0
        if self.first is None:
            self.first = out
            self.prompt = out.prompt
            # vLLM's own list, not a copy (a prompt may be thousands of tokens; nothing
            # changes it, and a continuation's prompt is a new list).
            self.prompt_token_ids = out.prompt_token_ids or None
            self.prompt_logprobs = out.prompt_logprobs
            self.num_cached_tokens = out.num_cached_tokens
            added = len(self.prompt_token_ids or ())
        rewritten = False  # a finish reason the caller must see differently
        delta = self._delta
        for c in outputs:
            s = self.samples[c.index if index is None else index]
            ids = s.token_ids  # changed in place, never replaced
            before = len(ids)
            if delta:
                # A delta caller is shown deltas only: the text and logprobs so far are
                # never shown again, only the tokens are needed (to continue from).
                ids += c.token_ids  # only read (a delta view shows the engine's own list)
            else:
                if c.logprobs is not None and s.logprobs is None:
                    s.logprobs = []
                ids[s.base_tokens :] = c.token_ids
                s.text = s.text[: s.base_text] + c.text
                if c.logprobs is not None:
                    s.logprobs[s.base_tokens :] = list(c.logprobs)
            if c.cumulative_logprob is not None:
                s.cumulative_logprob = s.base_cum + c.cumulative_logprob
            after = len(ids)
            if after > before:  # the span of the version that made them grows, or starts
                added += after - before
                spans = s.spans
                last = spans[-1] if spans else None
                if last is not None and last.version == version and last.end == before:
                    last.end = after
                else:
                    spans.append(Span(version, before, after))
            finish = c.finish_reason
            if finish is None:  # most outputs: one token more (a set finish is final)
                continue
            s.stop_reason = c.stop_reason  # vLLM's, set with a finish only
            weights = getattr(c, "weight_versions", None)  # vLLM's, on a final output
            if weights:
                s.add_weight_versions(weights)
            if finish == ABORT and continuing:
                rewritten = True
                if self.remaining(s.index) == 0:
                    s.finish_reason = "length"
                elif self.not_continuable is not None:
                    s.finish_reason = ABORT
                    s.note = continuable.PREFIX + self.not_continuable
                else:
                    s.interrupted = self.stopped = True
                    s.finish_reason = None
            else:
                s.finish_reason = finish
        self.added = added
        if index is None and not rewritten and not self.stopped:
            # Nothing was stopped: the engine's own output is exactly what the caller
            # would have seen without us (all its fields kept, nothing rebuilt).
            self._emitted = True
            if delta and len(self.samples) == 1:
                self._flowing = self._open(self.samples[0], version)
            return out
        shown = [
            self._view(self.samples[c.index if index is None else index], c, c.token_ids)
            for c in out.outputs
        ]
        return self._emit([c for c in shown if c is not None])

    @staticmethod
    def _open(s: Sample, version: int) -> bool:
        """Whether ``s``'s tokens so far end in a span of ``version`` (the next ones
        extend it) and it has not finished."""
        spans = s.spans
        return (
            bool(spans)
            and spans[-1].version == version
            and spans[-1].end == len(s.token_ids)
            and s.finish_reason is None
        )

    def give_up(self) -> RequestOutput | None:
        """End every interrupted sample with ``abort`` (resume never came)."""
        shown = []
        for s in self.samples:
            if s.interrupted:
                s.interrupted = False
                s.finish_reason = ABORT
                shown.append(
                    self._completion(s)
                    if self.kind != RequestOutputKind.DELTA
                    else self._completion(s, token_ids=[], text="", logprobs=[])
                )
        return self._emit(shown)

    # ---- views --------------------------------------------------------------------
    def _view(self, s: Sample, c: CompletionOutput, new_ids: list[int]) -> CompletionOutput | None:
        if self.kind == RequestOutputKind.FINAL_ONLY:
            return None
        if self.kind == RequestOutputKind.DELTA:
            if s.interrupted and not new_ids:
                return None
            return self._completion(s, token_ids=list(new_ids), text=c.text, logprobs=c.logprobs)
        return self._completion(s)

    def _completion(self, s: Sample, **delta) -> CompletionOutput:
        # Like vLLM, spans come with a sample's final output only.
        extra = {"weight_versions": s.weight_versions} if s.weight_versions and s.done else {}
        return CompletionOutput(
            **extra,
            index=s.index,
            text=delta.get("text", s.text),
            token_ids=delta.get("token_ids", list(s.token_ids)),
            cumulative_logprob=s.cumulative_logprob,
            logprobs=delta.get("logprobs", s.logprobs),
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason if s.finish_reason not in (None, ABORT) else s.note,
        )

    def _emit(self, shown: list[CompletionOutput]) -> RequestOutput | None:
        if self.kind == RequestOutputKind.FINAL_ONLY:
            if not self.done:
                return None
            shown = [self._completion(s) for s in self.samples]
        if not shown:
            return None
        first_view = not self._emitted
        self._emitted = True
        delta = self.kind == RequestOutputKind.DELTA
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            # Streaming (delta) outputs carry prompt details only once, as vLLM's do.
            prompt_token_ids=self.prompt_token_ids if (first_view or not delta) else None,
            prompt_logprobs=self.prompt_logprobs if (first_view or not delta) else None,
            outputs=shown,
            finished=self.done,
            num_cached_tokens=self.num_cached_tokens,
        )


def continuation_seed(seed: int | None, index: int, made: int) -> int | None:
    """A continuation must not replay its parent's random stream from the start: derive
    a new seed from the parent's, the sample and how far it got (a seeded run stays
    reproducible). A sample that made nothing yet starts its own stream from the start
    (:meth:`Stitcher.continuation_params`)."""
    if seed is None:
        return None
    return zlib.crc32(f"{seed}:{index}:{made}".encode()) & 0x7FFFFFFF
