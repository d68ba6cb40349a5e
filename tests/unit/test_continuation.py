"""Stitching engine segments into one caller-visible generation, per output kind."""

from __future__ import annotations

import dataclasses

import pytest
from exploration import SEED, announce, examples
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_lora_ext.server.continuation import Stitcher

_STEP = st.tuples(
    st.lists(st.integers(4, 99), max_size=3),  # the tokens an output adds (maybe none)
    st.booleans(),  # with a cumulative logprob
    st.sampled_from([None, None, None, "length", "stop", "abort"]),
    st.booleans(),  # an abort is a keep-mode stop
    st.booleans(),  # with logprobs
)

PROMPT = [1, 2, 3]


def lp(tok: int) -> dict:
    return {tok: Logprob(logprob=-0.1 * tok)}


def out(tokens, finish=None, index=0, prompt=PROMPT, n_outputs=None) -> RequestOutput:
    c = CompletionOutput(
        index=index,
        text="".join(f" t{t}" for t in tokens),
        token_ids=list(tokens),
        cumulative_logprob=-0.1 * sum(tokens),
        logprobs=[lp(t) for t in tokens],
        finish_reason=finish,
    )
    return RequestOutput("r", "p", prompt, None, n_outputs or [c], finish is not None)


def params(kind, n=1, max_tokens=6) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=max_tokens, output_kind=kind, logprobs=0)


def test_uninterrupted_output_passes_through_untouched():
    st = Stitcher("r", params(RequestOutputKind.DELTA))
    o = out([10, 11])
    assert st.absorb(o, None, 1, continuing=False) is o


def test_delta_keep_interruption_then_continuation_concatenates():
    st = Stitcher("r", params(RequestOutputKind.DELTA))
    shown = [st.absorb(out([10, 11]), None, 1, continuing=False)]
    shown.append(st.absorb(out([12], finish="abort"), None, 1, continuing=True))
    assert st.to_continue() == [0]
    assert shown[-1].outputs[0].finish_reason is None and not shown[-1].finished
    assert st.continuation_prompt(0) == [*PROMPT, 10, 11, 12]
    cont = st.continuation_params(params(RequestOutputKind.DELTA), 0)
    assert cont.max_tokens == 3 and cont.n == 1 and cont.prompt_logprobs is None
    st.start_segment([0])
    tail = st.absorb(out([13, 14, 15], finish="length", prompt=[*PROMPT, 10, 11, 12]), 0, 2, True)
    shown.append(tail)
    # The caller sees only the new tokens, no re-sent prompt, and a single finish.
    assert tail.prompt_token_ids is None
    assert [t for o in shown for t in o.outputs[0].token_ids] == [10, 11, 12, 13, 14, 15]
    assert [o.outputs[0].finish_reason for o in shown] == [None, None, "length"]
    assert tail.finished
    assert [len(o.outputs[0].logprobs) for o in shown] == [2, 1, 3]  # one per token shown
    assert "".join(o.outputs[0].text for o in shown) == " t10 t11 t12 t13 t14 t15"
    s = st.samples[0]
    assert s.token_ids == [10, 11, 12, 13, 14, 15]
    assert [(sp.version, sp.start, sp.end) for sp in s.spans] == [(1, 0, 3), (2, 3, 6)]


def test_final_only_yields_one_concatenated_output():
    st = Stitcher("r", params(RequestOutputKind.FINAL_ONLY))
    assert st.absorb(out([10, 11], finish="abort"), None, 1, continuing=True) is None
    st.start_segment([0])
    final = st.absorb(out([12, 13, 14, 15], finish="length"), 0, 2, continuing=False)
    c = final.outputs[0]
    assert c.token_ids == [10, 11, 12, 13, 14, 15]
    assert len(c.logprobs) == 6 and c.text == " t10 t11 t12 t13 t14 t15"
    assert c.cumulative_logprob == -0.1 * (10 + 11) + -0.1 * (12 + 13 + 14 + 15)
    assert final.prompt_token_ids == PROMPT and final.finished


def test_cumulative_outputs_carry_the_whole_prefix():
    st = Stitcher("r", params(RequestOutputKind.CUMULATIVE))
    st.absorb(out([10]), None, 1, False)
    st.absorb(out([10, 11], finish="abort"), None, 1, True)
    st.start_segment([0])
    mid = st.absorb(out([12]), 0, 2, True)
    assert mid.outputs[0].token_ids == [10, 11, 12]
    end = st.absorb(out([12, 13, 14, 15], finish="length"), 0, 2, True)
    assert end.outputs[0].token_ids == [10, 11, 12, 13, 14, 15]
    assert len(end.outputs[0].logprobs) == 6


def test_plain_abort_is_returned_as_abort():
    st = Stitcher("r", params(RequestOutputKind.FINAL_ONLY))
    o = out([10, 11], finish="abort")
    assert st.absorb(o, None, 1, continuing=False) is o
    assert st.to_continue() == [] and st.done


def test_interruption_at_the_budget_ends_as_length():
    st = Stitcher("r", params(RequestOutputKind.FINAL_ONLY, max_tokens=2))
    final = st.absorb(out([10, 11], finish="abort"), None, 1, continuing=True)
    assert st.to_continue() == []
    assert final.outputs[0].finish_reason == "length"


def test_give_up_returns_partial_with_abort():
    st = Stitcher("r", params(RequestOutputKind.DELTA))
    st.absorb(out([10, 11], finish="abort"), None, 1, continuing=True)
    last = st.give_up()
    assert last.outputs[0].finish_reason == "abort" and last.outputs[0].token_ids == []
    assert last.finished and st.samples[0].token_ids == [10, 11]


def test_n_samples_continue_independently():
    st = Stitcher("r", params(RequestOutputKind.FINAL_ONLY, n=2, max_tokens=4))
    both = [
        CompletionOutput(0, " a", [10], None, None, finish_reason="length"),
        CompletionOutput(1, " b", [20], None, None, finish_reason="abort"),
    ]
    assert st.absorb(out([], n_outputs=both), None, 1, continuing=True) is None
    assert st.to_continue() == [1]
    assert st.remaining(1) == 3
    st.start_segment([1])
    final = st.absorb(out([21, 22, 23], finish="length"), 1, 2, continuing=False)
    assert [c.token_ids for c in final.outputs] == [[10], [20, 21, 22, 23]]


def test_vllms_weight_version_spans_pass_through_a_continuation_shifted():
    """vLLM's engine-wide ``weight_versions`` (base weights, 0.33's
    ``return_weight_versions``) stay beside our per-adapter spans: a continued sample
    carries both segments' spans, the second shifted by the tokens before it."""
    span = compat_span()
    st = Stitcher("r", params(RequestOutputKind.FINAL_ONLY))
    first = out([10, 11], finish="abort")
    first.outputs[0].weight_versions = [span("w1", 0, 2)]
    assert st.absorb(first, None, 1, continuing=True) is None
    st.start_segment([0])
    tail = out([12, 13, 14, 15], finish="length", prompt=[*PROMPT, 10, 11])
    tail.outputs[0].weight_versions = [span("w1", 0, 1), span("w2", 1, 4)]
    final = st.absorb(tail, 0, 2, continuing=True)
    c = final.outputs[0]
    assert c.token_ids == [10, 11, 12, 13, 14, 15]
    assert [(w.version, w.start, w.end) for w in c.weight_versions] == [("w1", 0, 3), ("w2", 3, 6)]
    assert [(s.version, s.start, s.end) for s in st.samples[0].spans] == [(1, 0, 2), (2, 2, 6)]


def compat_span():
    import vllm.outputs

    span = getattr(vllm.outputs, "WeightVersionSpan", None)
    if span is None:
        pytest.skip("this vLLM has no weight-version spans")
    return span


class _GeneralOnly(Stitcher):
    """Never takes absorb's fast paths (a stream's steady state, a request's only
    output): the reference."""

    __slots__ = ()
    _at_once = False

    @staticmethod
    def _open(s, version):
        return False


def _prompt_of(s: Stitcher) -> tuple:
    first = s.first and (s.first.request_id, s.first.finished)
    return first, s.prompt, s.prompt_token_ids, s.prompt_logprobs, s.num_cached_tokens


def _ended(s: Stitcher) -> list:
    return [(x.spans, x.finish_reason, x.done) for x in s.samples] + [s.done]


def _view(o: RequestOutput | None, given: RequestOutput) -> object:
    if o is None or o is given:
        return o is given
    return [(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]


@settings(max_examples=examples(local=300), deadline=None, derandomize=False)
@seed(SEED)
@given(kind=st.sampled_from(list(RequestOutputKind)), script=st.lists(_STEP, max_size=12))
def _fast_path_matches_the_general_one(kind, script):
    fast, ref = (
        Stitcher("r", params(kind, max_tokens=20)),
        _GeneralOnly("r", params(kind, max_tokens=20)),
    )
    index, version = None, 1
    for tokens, cumulative, finish, keep, logprobs in script:
        outs = [out(tokens, finish) for _ in range(2)]
        for o in outs:
            o.num_cached_tokens = 2
            if not cumulative:
                o.outputs[0].cumulative_logprob = None
            if not logprobs:
                o.outputs[0].logprobs = None
        seen = [
            sti.absorb(o, index, version, keep) for sti, o in zip((fast, ref), outs, strict=True)
        ]
        assert _view(seen[0], outs[0]) == _view(seen[1], outs[1])
        assert fast.added == ref.added and fast.stopped == ref.stopped
        assert fast.to_continue() == ref.to_continue()
        if finish is not None and not ref.to_continue():
            # The request ended: what is read of it from now on (attribution's spans,
            # the finish) is the same.
            assert _ended(fast) == _ended(ref)
            return
        assert [dataclasses.asdict(x) for x in fast.samples] == [
            dataclasses.asdict(x) for x in ref.samples
        ]
        assert _prompt_of(fast) == _prompt_of(ref)
        if finish is not None:
            fast.start_segment([0])
            ref.start_segment([0])
            index, version = 0, version + 1  # continued: a segment of a later version


def test_absorbs_fast_paths_leave_what_the_general_path_leaves():
    """absorb's fast paths (a one-sample delta stream's outputs between its first and its
    finish; a request's only output, final) against the general path alone, over random
    streams of every output kind: keep-mode stops, continuations, outputs with no token,
    with and without logprobs and cumulative logprobs."""
    announce()
    _fast_path_matches_the_general_one()


def test_a_stream_takes_the_fast_path_between_first_output_and_finish():
    st_ = Stitcher("r", params(RequestOutputKind.DELTA))
    st_.absorb(out([10]), None, 1, False)
    assert st_._flowing
    o = out([11])
    assert st_.absorb(o, None, 1, False) is o and st_.added == 1
    assert [(sp.version, sp.start, sp.end) for sp in st_.samples[0].spans] == [(1, 0, 2)]
    st_.absorb(out([12], finish="abort"), None, 1, True)
    assert not st_._flowing and st_.to_continue() == [0]


def test_a_requests_only_output_takes_one_step_when_final():
    st_ = Stitcher("r", params(RequestOutputKind.FINAL_ONLY))
    o = out([10, 11], finish="length")
    assert st_.absorb(o, None, 3, False) is o and st_.added == len(PROMPT) + 2
    s = st_.samples[0]
    assert s.finish_reason == "length" and st_.done and not st_.stopped
    assert [(sp.version, sp.start, sp.end) for sp in s.spans] == [(3, 0, 2)]
    # A keep-mode stop is not final: the general path takes it (to be continued).
    st_ = Stitcher("r", params(RequestOutputKind.FINAL_ONLY))
    assert st_.absorb(out([10], finish="abort"), None, 1, True) is None
    assert st_.to_continue() == [0]
